"""midi_processor through its public functions: properties, classic-encoder regressions,
real files read by both parsers, and bad input."""

from __future__ import annotations

import io
import random
import subprocess
import sys
import warnings
from collections import Counter

import mido
import numpy as np
import pretty_midi
import pytest
from conftest import make_pm
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from midi_processor import (
    END,
    NOTE_OFF,
    PAD,
    TIME_SHIFT,
    VELOCITY,
    VOCAB_SIZE,
    MidiError,
    cut_tokens,
    decode_midi,
    encode_midi,
    piece_seconds,
    read_midi_mido,
    tokens_to_text,
)
from midi_processor.core import encode_notes
from midi_processor.reader import read_midi
from midi_processor.reference import reference_encode, reference_notes


def notes_of(pm: pretty_midi.PrettyMIDI) -> list[tuple[int, int, int, int]]:
    """(start step, end step, pitch, velocity) of every note, sorted."""
    out = [
        (round(n.start * 100), round(n.end * 100), n.pitch, n.velocity)
        for inst in pm.instruments
        for n in inst.notes
    ]
    return sorted(out)


def midi_bytes(tracks: list[list[tuple]], tpq: int = 480) -> bytes:
    """A type-1 MIDI file from tracks of (delta, mido message type, kwargs)."""
    mf = mido.MidiFile(ticks_per_beat=tpq)
    for events in tracks:
        track = mido.MidiTrack()
        for delta, kind, kw in events:
            cls = mido.MetaMessage if kind in ("set_tempo", "end_of_track") else mido.Message
            track.append(cls(kind, time=delta, **kw))
        mf.tracks.append(track)
    buf = io.BytesIO()
    mf.save(file=buf)
    return buf.getvalue()


def on(delta, pitch, vel=80, ch=0):
    return (delta, "note_on", {"note": pitch, "velocity": vel, "channel": ch})


def off(delta, pitch, ch=0):
    return (delta, "note_off", {"note": pitch, "velocity": 0, "channel": ch})


def pedal(delta, value, ch=0):
    return (delta, "control_change", {"control": 64, "value": value, "channel": ch})


# --- hypothesis strategies -------------------------------------------------------------

note_st = st.tuples(
    st.floats(0, 20, allow_nan=False),  # start
    st.floats(0, 3, allow_nan=False),  # length
    st.integers(0, 127),  # pitch
    st.integers(1, 127),  # velocity
).map(lambda n: (n[0], n[0] + n[1], n[2], n[3]))
pedal_st = st.lists(st.tuples(st.floats(0, 25, allow_nan=False), st.integers(0, 127)), max_size=8)
piece_st = st.tuples(st.lists(note_st, min_size=1, max_size=40), pedal_st, st.integers(1, 3))


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(piece_st)
def test_encoder_matches_reference_and_decode_gives_pedalled_quantised_notes(piece):
    notes, pedals, n_inst = piece
    pm = make_pm(notes, pedals, instruments=n_inst)
    tokens = encode_midi(pm)
    assert tokens == reference_encode(pm)
    expected = [(s, e, p, 4 * (v // 4) + 2) for s, e, p, v in reference_notes(pm)]
    assert notes_of(decode_midi(tokens)) == expected


@settings(max_examples=150, deadline=None)
@given(piece_st)
def test_encode_decode_encode_is_identity_on_canonical_sequences(piece):
    notes, pedals, n_inst = piece
    tokens = encode_midi(make_pm(notes, pedals, instruments=n_inst))
    assert tokens[-1] == END
    assert encode_midi(decode_midi(tokens)) == tokens


@settings(max_examples=300, deadline=None)
@given(st.lists(st.integers(0, VOCAB_SIZE - 1), max_size=300))
def test_decoding_any_ids_never_fails_and_gives_valid_notes(ids):
    pm = decode_midi(ids)
    for n in pm.instruments[0].notes:
        assert n.end > n.start >= 0
        assert 0 <= n.pitch <= 127
        assert 2 <= n.velocity <= 126


def test_decoding_rules_for_non_canonical_ids():
    ts = TIME_SHIFT + 9  # 100 ms
    ids = [NOTE_OFF + 61, 60, ts, 60, ts, NOTE_OFF + 60, 62, 62, ts, PAD, 64, END, 65]
    got = notes_of(decode_midi(ids))
    # stray off ignored; re-struck 60 ends the first; 62 struck twice on one step is one
    # note; PAD skipped; 62 and 64 still sounding at END last 1 s, the least; 65 after END
    # is ignored.
    assert got == [(0, 10, 60, 66), (10, 20, 60, 66), (20, 120, 62, 66), (30, 130, 64, 66)]
    # a note held to the end sounds to it (a drone stays one), one struck there lasts 1 s
    held = [60, TIME_SHIFT + 99, TIME_SHIFT + 99, 62, TIME_SHIFT + 9, 64]
    assert notes_of(decode_midi(held)) == [(0, 210, 60, 66), (200, 300, 62, 66),
                                           (210, 310, 64, 66)]
    with pytest.raises(ValueError, match="outside the vocabulary"):
        decode_midi([VOCAB_SIZE])


# --- regressions: each defect of the classic midi-neural-processor encoder --------------


def test_file_without_pedal_keeps_all_notes():
    data = midi_bytes([[on(0, 60), off(480, 60), on(0, 64), off(480, 64)]])
    assert notes_of(decode_midi(encode_midi(data))) == [(0, 50, 60, 82), (50, 100, 64, 82)]


def test_notes_after_last_pedal_release_are_kept():
    data = midi_bytes(
        [[pedal(0, 127), on(0, 60), off(240, 60), pedal(240, 0), on(480, 62), off(480, 62)]]
    )
    # 60 is held by the pedal until 0.5 s; 62 starts after the last release and is kept.
    assert notes_of(decode_midi(encode_midi(data))) == [(0, 50, 60, 82), (100, 150, 62, 82)]


def test_velocity_event_only_when_bin_changes():
    pm = make_pm([(0, 0.1, 60, 80), (0.2, 0.3, 62, 81), (0.4, 0.5, 64, 83), (0.6, 0.7, 65, 84)])
    tokens = encode_midi(pm)
    assert [t for t in tokens if VELOCITY <= t < END] == [VELOCITY + 20, VELOCITY + 21]


def test_absolute_quantisation_does_not_drift():
    # 200 notes 14.9 ms apart: rounding each interval to 10 ms would drift by 0.49 s.
    pm = make_pm([(i * 0.0149, i * 0.0149 + 0.005, 60 + i % 2, 64) for i in range(200)])
    starts = [n[0] for n in notes_of(decode_midi(encode_midi(pm)))]
    assert starts == [int(np.floor(i * 1.49 + 0.5)) for i in range(200)]


def test_lowest_velocity_bin_is_audible():
    pm = decode_midi(encode_midi(make_pm([(0, 0.5, 60, 2)])))
    assert pm.instruments[0].notes[0].velocity == 2


# --- pedal semantics ---------------------------------------------------------------------


def test_pedal_in_control_only_track_acts_on_its_channel_only():
    data = midi_bytes(
        [
            [on(0, 60, ch=0), off(240, 60, ch=0), on(0, 70, ch=1), off(240, 70, ch=1)],
            [pedal(0, 127, ch=0), pedal(960, 0, ch=0)],  # no notes in this track
        ]
    )
    got = notes_of(decode_midi(encode_midi(data)))
    assert got == [(0, 100, 60, 82), (25, 50, 70, 82)]
    # pretty_midi's loader drops the control-only track, so it loses the pedal.
    assert notes_of(decode_midi(encode_midi(pretty_midi.PrettyMIDI(io.BytesIO(data))))) == [
        (0, 25, 60, 82),
        (25, 50, 70, 82),
    ]


def test_restrike_under_pedal_ends_the_sustained_note():
    pm = make_pm([(0, 0.1, 60, 64), (0.5, 0.6, 60, 64)], pedal=[(0, 127), (2.0, 0)])
    assert notes_of(decode_midi(encode_midi(pm))) == [(0, 50, 60, 66), (50, 200, 60, 66)]


def test_simultaneous_pedal_events_apply_in_track_order():
    # One track resets the pedal at t=0 while the next presses it (as alb_se3.mid does).
    data = midi_bytes([[pedal(0, 0), on(0, 60), off(240, 60)], [pedal(0, 127), pedal(960, 0)]])
    assert notes_of(decode_midi(encode_midi(data))) == [(0, 100, 60, 82)]


def test_pedal_never_released_holds_to_the_end_of_the_piece():
    pm = make_pm([(0, 0.1, 60, 64), (1.0, 3.0, 62, 64)], pedal=[(0, 100)])
    assert notes_of(decode_midi(encode_midi(pm)))[0] == (0, 300, 60, 66)


# --- real files -----------------------------------------------------------------------


def test_fast_reader_equals_exact_mido_reader_on_real_files(real_files):
    for f in real_files:
        fast = encode_midi(f)
        exact = encode_notes(read_midi_mido(f.read_bytes(), str(f))).tolist()
        assert fast == exact, f.name


def test_fast_reader_equals_pretty_midi_path_where_pretty_midi_keeps_the_pedal(real_files):
    kept = {"scn15_4.mid", "haydn_9_3.mid"}  # pedal in a note track, or no pedal
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for f in real_files:
            via_pm = encode_midi(pretty_midi.PrettyMIDI(str(f)))
            assert (encode_midi(f) == via_pm) == (f.name in kept), f.name


def test_pedal_applied_on_real_piece_with_control_only_pedal_track(real_files):
    f = next(p for p in real_files if p.name == "clementi_opus36_3_2.mid")
    mf = mido.MidiFile(str(f))
    assert any(m.type == "control_change" and m.control == 64 for m in mf.tracks[3])
    unpedalled = mido.MidiFile(ticks_per_beat=mf.ticks_per_beat)
    for track in mf.tracks:
        t = mido.MidiTrack()
        for m in track:  # keep timing, turn the pedal into a harmless controller
            t.append(m.copy(control=1) if m.type == "control_change" and m.control == 64 else m)
        unpedalled.tracks.append(t)
    buf = io.BytesIO()
    unpedalled.save(file=buf)
    with_pedal = notes_of(decode_midi(encode_midi(f)))
    without = notes_of(decode_midi(encode_midi(buf.getvalue())))
    assert [n[0] for n in with_pedal] == [n[0] for n in without]
    longer = sum(a[1] > b[1] for a, b in zip(with_pedal, without, strict=True))
    assert longer >= 15  # 20 notes of this piece are held by the pedal
    assert all(a[1] >= b[1] for a, b in zip(with_pedal, without, strict=True))


def test_real_file_roundtrip(real_files, tmp_path):
    tokens = encode_midi(real_files[0])
    out = tmp_path / "sub" / "roundtrip.mid"
    decode_midi(tokens, out)
    assert encode_midi(out) == tokens
    assert not list(out.parent.glob("*.tmp"))


def test_a_cut_from_the_end_starts_as_the_music_is_there():
    """The last seconds of a piece that ends on a held chord hold the chord: the notes
    sounding where the cut begins are struck again there, each at its own velocity (not a
    note that ends at that very moment), the velocity in force follows them, and the cut
    lasts exactly the seconds asked for (the rest across its start is kept in part). The
    first seconds cut as before; a count of tokens from the end gets the same state."""
    piece = make_pm([(0.0, 1.0, 60, 80), (1.0, 6.0, 64, 100), (1.5, 6.0, 67, 40),
                     (2.0, 3.0, 72, 90), (3.0, 3.5, 48, 70)])
    tokens = encode_midi(piece)
    for seconds, expected in (
            (3.0, [(0, 50, 48, 70), (0, 300, 64, 102), (0, 300, 67, 42)]),  # 72 ends at 3 s
            (3.25, [(0, 25, 72, 90), (0, 325, 64, 102), (0, 325, 67, 42), (25, 75, 48, 70)]),
            (5.0, [(0, 500, 64, 102), (50, 500, 67, 42), (100, 200, 72, 90),
                   (200, 250, 48, 70)])):
        cut = cut_tokens(tokens, seconds=seconds, from_end=True)
        assert piece_seconds(cut) == seconds
        assert notes_of(decode_midi(cut)) == expected, seconds
    first = cut_tokens(tokens, seconds=2.0)  # the opening, its notes as they start
    assert piece_seconds(first) == 2.0 and [n[:1] + n[2:] for n in notes_of(
        decode_midi(first))] == [(0, 60, 82), (100, 64, 102), (150, 67, 42)]
    last = cut_tokens(tokens, count=5, from_end=True)  # 2.5 s of rest, then two note-offs
    assert last[-5:] == tokens[-6:-1] and notes_of(decode_midi(last)) == [
        (0, 250, 64, 102), (0, 250, 67, 42)]


def test_tokens_to_text():
    text = tokens_to_text([VELOCITY + 20, 60, TIME_SHIFT + 24, NOTE_OFF + 60, END, PAD])
    assert text == "VELOCITY(20) NOTE_ON(60) TIME_SHIFT(250ms) NOTE_OFF(60) END PAD"
    assert tokens_to_text([60] * 5, limit=2) == "NOTE_ON(60) NOTE_ON(60) ... (+3 more)"


# --- bad input --------------------------------------------------------------------------


def test_very_large_tick_values_are_read():
    data = midi_bytes([[on(20_000_000, 60), off(480, 60)]], tpq=480)
    with pytest.raises(ValueError):
        pretty_midi.PrettyMIDI(io.BytesIO(data))  # pretty_midi refuses ticks > 1e7
    got = notes_of(decode_midi(encode_midi(data, max_seconds=6 * 3600)))
    start = round(20_000_000 / 960 * 100)  # 120 bpm, 480 ticks per quarter: 5.8 h
    assert got == [(start, start + 50, 60, 82)]
    with pytest.raises(MidiError, match="implausibly long"):  # the default limit is 4 h
        encode_midi(data)


@pytest.mark.parametrize(
    ("content", "reason"),
    [
        (b"", "empty file"),
        (b"this is not midi at all", "not a MIDI file"),
        (b"MThd\x00\x00\x00\x06\x00\x01\x00\x01\x01\xe0MTrk\x00\x00\x01\x00\x00\x90", "truncated"),
        ("drums", "no notes"),
        ("silent", "no notes"),
    ],
)
def test_bad_files_raise_one_clear_error(tmp_path, content, reason):
    if content == "drums":
        content = midi_bytes([[on(0, 36, ch=9), off(480, 36, ch=9)]])
    elif content == "silent":
        content = midi_bytes([[pedal(0, 127)]])
    f = tmp_path / "bad.mid"
    f.write_bytes(content)
    with pytest.raises(MidiError) as err:
        encode_midi(f)
    assert str(f) in str(err.value) and reason in str(err.value)


def test_truncated_real_file_raises_midi_error(real_files, tmp_path):
    f = tmp_path / "cut.mid"
    f.write_bytes(real_files[0].read_bytes()[:1500])
    with pytest.raises(MidiError, match="cut.mid"):
        encode_midi(f)


def test_missing_file_raises_midi_error(tmp_path):
    with pytest.raises(MidiError, match="cannot read"):
        encode_midi(tmp_path / "nope.mid")


def test_public_import_in_a_fresh_interpreter():
    code = (
        "from midi_processor import encode_midi, decode_midi; import sys; "
        "sys.exit('torch' in sys.modules)"
    )
    assert subprocess.run([sys.executable, "-c", code], check=False).returncode == 0


# --- limits: what symusic's 32-bit ticks and FIFO pairing would get wrong ------------------

HUGE = 0x0FFFFFFF  # the largest delta time a MIDI file can hold (four bytes)


def cc(delta, control=7, value=100, ch=0):
    return (delta, "control_change", {"control": control, "value": value, "channel": ch})


def same_as_mido(data: bytes, max_seconds: float = 4 * 3600) -> list[int] | str:
    """encode_midi's tokens (or its MidiError) after checking they equal the exact mido
    reader's."""
    try:
        fast = encode_midi(data, max_seconds=max_seconds)
    except MidiError as err:
        with pytest.raises(MidiError):
            read_midi_mido(data, max_seconds=max_seconds)
        return str(err)
    assert fast == encode_notes(read_midi_mido(data, max_seconds=max_seconds)).tolist()
    return fast


@pytest.mark.parametrize("count", [1, 7, 8, 9, 16, 17, 40])
def test_huge_delta_times_never_wrap(count):
    """count x 0x0FFFFFFF ticks before a note: 8 pass 2**31 (where symusic's int32 ticks
    went negative: "negative dimensions"), 16 pass 2**32 (wrapped to a plausible onset)."""
    track = [on(0, 60), off(100, 60), *[cc(HUGE) for _ in range(count)], on(0, 62), off(100, 62)]
    data = midi_bytes([track])
    assert "implausibly long" in same_as_mido(data)
    late = read_midi(data, max_seconds=float("inf"))
    assert late.onset.max() == pytest.approx((count * HUGE + 100) / 960)  # 120 bpm, 480 tpq


def test_huge_delta_times_after_the_music_keep_the_music():
    data = midi_bytes([[on(0, 60), off(480, 60), *[cc(HUGE) for _ in range(17)]]])
    assert notes_of(decode_midi(same_as_mido(data))) == [(0, 50, 60, 82)]


def test_a_part_with_one_note_keeps_it():
    """A program change splits a track into two parts for symusic; the one with a single
    note and no controls was taken for a marker and lost (2 notes instead of 3)."""
    data = midi_bytes([[on(0, 60), off(100, 60),
                        (0, "program_change", {"program": 5, "channel": 0}),
                        on(0, 62), off(100, 62), on(0, 64), off(100, 64)]])
    assert len(decode_midi(same_as_mido(data)).instruments[0].notes) == 3


def test_one_note_off_closes_every_open_note_of_its_key():
    """Three note-ons, one note-off: pretty_midi (and so the reference) ends all three;
    symusic pairs one and silently drops the other two."""
    data = midi_bytes([[on(0, 60), on(100, 60), on(100, 60), off(100, 60), on(0, 64),
                        off(100, 64)]])
    got = notes_of(decode_midi(same_as_mido(data)))
    # all three end at the note-off, each cut where the next starts; then the 64
    assert [n[:3] for n in got] == [(0, 10, 60), (10, 21, 60), (21, 31, 60), (31, 42, 64)]


def test_note_off_deleting_notes_of_its_own_tick_keeps_later_ones():
    """On, off, on on one tick: the note-off deletes only the note-on before it."""
    data = midi_bytes([[on(0, 60, vel=40), off(0, 60), on(0, 60, vel=90), off(240, 60)]])
    assert notes_of(decode_midi(same_as_mido(data))) == [(0, 25, 60, 90)]


def test_tempo_events_on_one_tick_apply_in_track_order():
    """A tempo event on the tick of another track's: the later track's wins, as a
    sequencer merging the tracks plays it. symusic sorts its list of tempo events without
    keeping that order on one tick once it holds more than a few (here 41)."""
    changes = [(10, "set_tempo", {"tempo": 500_000 + i}) for i in range(40)]  # to tick 400
    data = midi_bytes([[*changes[:20], on(0, 60), *changes[20:21], (0, "note_off",
                        {"note": 60, "velocity": 0, "channel": 0}), *changes[21:]],
                       [(200, "set_tempo", {"tempo": 2_000_000})]])
    (start, end, _, _), = notes_of(decode_midi(same_as_mido(data)))
    assert end - start == 4  # ticks 200-210 at 2 s per quarter: 41.7 ms, not 10.4


def test_mutated_valid_files_read_exactly_as_the_reference(real_files):
    """Valid files with odd contents (huge or zero deltas, unreleased, doubled and
    re-channelled notes, pedal storms, extreme tempos, program changes): the fast reader
    equals the exact mido reader on every one."""
    from bench.fuzz_midi import _structured

    rng = random.Random(7)
    seeds = [f.read_bytes() for f in real_files]
    for _ in range(60):
        same_as_mido(_structured(rng.choice(seeds), rng))


def test_fuzzed_files_raise_midi_error_and_nothing_else(real_files):
    """A short run of bench/fuzz_midi.py's mutations (that script runs 3,000 with memory
    and time limits): encode_midi returns tokens or raises MidiError, nothing else."""
    from bench.fuzz_midi import mutations, outcome

    seeds = [f.read_bytes() for f in real_files]
    results = Counter(outcome(data) for _, data in mutations(seeds, 400, seed=11))
    assert set(results) <= {"tokens", "MidiError"}, results
    assert results["tokens"] > 40 and results["MidiError"] > 40  # both paths exercised


def test_pairings_of_one_key_on_few_ticks_read_exactly_as_the_reference():
    """Random note-on/note-off orders of two keys over a few ticks: zero-length notes,
    overlaps, deleting note-offs, notes never closed. The fast path decides most of them
    (all but a lasting note starting on the tick of a deleting note-off) and equals mido."""
    from midi_processor import reader

    rng = random.Random(3)
    fast = 0
    for _ in range(300):
        events, delta = [], 0
        for _ in range(rng.randint(1, 12)):
            pitch = rng.choice([60, 61])
            events.append(on(delta, pitch) if rng.random() < 0.55 else off(delta, pitch))
            delta = rng.choice([0, 0, 1, 5])
        closing = [off(3, 40)] + [off(0, p) for p in (60, 61) for _ in range(12)]
        data = midi_bytes([[on(0, 40), *events, *closing]])
        same_as_mido(data)
        try:
            fast += reader._read_symusic(data, "x", 3600.0) is not None
        except MidiError:
            fast += 1
    assert fast > 240, fast


def test_floods_of_zero_length_and_overlapping_notes_stay_on_the_fast_path(monkeypatch):
    """200,000 zero-length notes on one tick, and 100,000 notes of one key started on one
    tick: array work on the fast path, never the pure-Python reader (seconds for such
    files), with its result."""
    from midi_processor import reader

    def track(events: list[bytes]) -> bytes:
        body = b"".join(events) + b"\x00\xff\x2f\x00"
        return b"MTrk" + len(body).to_bytes(4, "big") + body

    header = b"MThd\x00\x00\x00\x06\x00\x01\x00\x01\x01\xe0"
    def zero(count: int) -> bytes:
        return header + track([b"\x00\x90\x3c\x40\x00\x80\x3c\x00"] * count)

    def overlap(count: int) -> bytes:
        return header + track([b"\x00\x90\x3c\x40"] * count + [b"\x01\x80\x3c\x00"]
                              + [b"\x00\x80\x3c\x00"] * (count - 1))

    assert "no notes" in same_as_mido(zero(100))  # the patterns at a size mido reads fast
    assert len(same_as_mido(overlap(100))) == 5
    monkeypatch.setattr(reader, "read_midi_mido", lambda *a, **k: pytest.fail("mido ran"))
    with pytest.raises(MidiError, match="no notes"):
        encode_midi(zero(200_000))
    assert len(encode_midi(overlap(100_000))) == 5  # one note: all end at the first note-off


def test_a_large_file_the_fast_path_cannot_settle_is_refused(monkeypatch):
    """The exact reader is slow (mido): past MAX_EXACT_BYTES such a file gets a reason."""
    from midi_processor import reader

    data = midi_bytes([[on(0, 60), off(0, 60), on(0, 60), off(5, 60)]])  # order decides
    assert len(same_as_mido(data)) > 2
    monkeypatch.setattr(reader, "MAX_EXACT_BYTES", len(data) - 1)
    with pytest.raises(MidiError, match="the exact reader takes files of up to"):
        encode_midi(data)
