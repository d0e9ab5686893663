"""MIDI sources -> NoteData (notes and sustain-pedal events in seconds, with channels).

Files are parsed with symusic (a C++ parser, ~100x faster than pretty_midi). Two facts
about both symusic and pretty_midi shape this module:

* neither tells which MIDI channel a track's notes are on, and
* both drop a track that holds control changes but no notes, which is exactly where many
  piano files keep the sustain pedal (150 of the 273 piano-midi.de files).

So before parsing, ``_tag_tracks`` appends to every track one tiny marker note per channel
(pitch = channel, velocity 1, zero length, at the track's end). Every (track, channel) part
then survives with its controls, and its marker names its channel. One tick later it adds
a note-off for every key of those channels: symusic silently drops a note-on that no
note-off matches, where pretty_midi may keep it (one note-off closes all open notes of its
key); a note that ends on that extra tick reveals such a file. Such files, and those where
the markers cannot be placed or found (a malformed track end, a program change splitting
a channel within a track), fall back to an exact pure-Python reader built on mido.

symusic keeps ticks in 32-bit integers, so a track whose delta times add up to 2**31 or
more (a hostile or broken file: four-byte deltas of up to 2**28 - 1 each) would silently
wrap. ``_fits_int32`` proves for every track that it cannot, from a bound computed at C
speed or else by adding up its deltas exactly; files it cannot clear go to mido.

Ticks become seconds with pretty_midi's own arithmetic, so times match pretty_midi's to
the bit. Tempo events count from every track, as a synthesiser plays them. A piece whose
events reach past ``max_seconds`` (default `MAX_SECONDS`) is refused before anything is
built from it, so no file can make the encoder allocate without bound.
"""

from __future__ import annotations

import io
import os
import re
from collections import defaultdict
from pathlib import Path

import mido
import numpy as np
import pretty_midi
import symusic

from .core import NoteData

SUSTAIN_CC = 64
DRUM_CHANNEL = 9
MAX_SECONDS = 4 * 3600.0  # longer "pieces" come from absurd tempos or ticks: refused
# The exact pure-Python reader (mido) parses about 200,000 events a second. The fast path
# settles every one of the 1,245 ASAP and piano-midi.de files (the largest 0.27 MiB); a
# file it cannot settle that is larger than this is refused rather than holding a process
# (or the web app's queue) for seconds.
MAX_EXACT_BYTES = 1 << 20
_TICK_LIMIT = 2**31  # symusic's ticks are int32
# Beyond 2**53 ticks (over-long delta varints) no tempo brings an event within hours, and
# ticks no longer fit the int64 and float64 arrays they become: such files are refused.
_MAX_TICKS = 2**53
_HIGH_BYTES = bytes(range(0x80, 0x100))
_HIGH_PAIR = re.compile(rb"[\x80-\xff]{2}")
# Data bytes after each channel status (high nibble 0x8..0xE); the rest are 0.
_DATA_BYTES = [0] * 128 + [2 if (s >> 4) not in (0xC, 0xD) else 1 for s in range(0x80, 0xF0)] + [
    0] * 16


class MidiError(Exception):
    """A MIDI source could not be read or holds nothing to encode; says which and why."""


MidiSource = str | os.PathLike | bytes | pretty_midi.PrettyMIDI


_MARKER = [bytes([0x90 | c, c, 1, 0, 0x80 | c, c, 0]) for c in range(16)]
_CLOSING = [b"\x00".join(bytes([0x80 | c, k, 0]) for k in range(128)) for c in range(16)]


def _markers(channels: np.ndarray) -> bytes:
    """Zero-length notes (channel c, pitch c, velocity 1), one per channel, the first
    taking the delta of the End-of-Track event they are inserted before; then, one tick
    later, a note-off for every key of those channels."""
    chans = channels.tolist()
    return (b"\x00".join(_MARKER[c] for c in chans) + b"\x01"
            + b"\x00".join(_CLOSING[c] for c in chans))


_END_OF_TRACK = b"\xff\x2f\x00"
_TEMPO = b"\xff\x51"


def _varint(body: bytes, pos: int) -> tuple[int, int]:
    """The variable-length number at ``pos`` and the position after it (IndexError if it
    runs past the end)."""
    byte = body[pos]
    value = byte & 0x7F
    while byte & 0x80:
        pos += 1
        byte = body[pos]
        value = (value << 7) | (byte & 0x7F)
    return value, pos + 1


def _track_ticks(body: bytes, tempos: list[tuple[int, int]] | None = None) -> int | None:
    """Sum of the delta times of a track chunk's events, exactly (Python integers), or
    None when the bytes do not parse as a sequence of events. With ``tempos``, appends
    (tick, microseconds per quarter) of each tempo event to it, in file order."""
    pos, end, total, running, data_bytes = 0, len(body), 0, 0, _DATA_BYTES
    try:
        while pos < end:
            byte = body[pos]  # the delta time, inline: this loop may run millions of times
            pos += 1
            if byte < 0x80:
                total += byte
            else:
                delta = byte & 0x7F
                while byte >= 0x80:
                    byte = body[pos]
                    pos += 1
                    delta = (delta << 7) | (byte & 0x7F)
                total += delta
            status = body[pos]
            if status < 0x80:  # running status: data bytes of the last channel status
                if not running:
                    return None
                pos += data_bytes[running]
            elif status < 0xF0:
                running = status
                pos += 1 + data_bytes[status]
            elif status == 0xFF:  # meta: FF type length data
                length, after = _varint(body, pos + 2)
                if body[pos + 1] == 0x51 and tempos is not None:
                    if length != 3:
                        return None
                    tempos.append((total, int.from_bytes(body[after : after + 3], "big")))
                pos = after + length
            elif status in (0xF0, 0xF7):  # sysex: F0/F7 length data
                length, pos = _varint(body, pos + 1)
                pos += length
                running = 0  # data after a sysex is no running status (mido: an error)
            else:  # system common and real-time messages do not belong in files
                return None
    except IndexError:
        return None
    return total if pos == end else None


def _fits_int32(body: bytes) -> bool:
    """Whether a track chunk's delta times add up to less than 2**31 ticks.

    Without two high bytes in a row, every delta has at most two bytes: below 2**14 when
    its low byte follows a high byte (one per high byte at most), below 2**7 otherwise.
    That bound clears almost every track at C speed; the rest are added up exactly.
    """
    if not _HIGH_PAIR.search(body):
        lows = len(body.translate(None, _HIGH_BYTES))
        if 16383 * (len(body) - lows) + 127 * lows < _TICK_LIMIT:
            return True
    total = _track_ticks(body)
    return total is not None and total < _TICK_LIMIT


def _tag_tracks(data: bytes, name: str) -> tuple[bytes, int, bool, np.ndarray]:
    """Insert channel markers before each track's End-of-Track.

    Returns the new bytes, the ticks per quarter, whether symusic can read them exactly
    (every track took markers and its ticks stay below 2**31), and the tempo events as
    (tick, microseconds per quarter) rows in the reference order: by tick, then track,
    then file order (symusic sorts its own list of them without keeping the order of
    events on one tick). Raises MidiError for a missing header, SMPTE timing, or a
    truncated chunk.
    """
    if len(data) < 14 or data[:4] != b"MThd":
        raise MidiError(f"{name}: not a MIDI file (no MThd header)")
    hlen = int.from_bytes(data[4:8], "big")
    if hlen < 6 or 8 + hlen > len(data):
        raise MidiError(f"{name}: truncated MIDI header")
    division = int.from_bytes(data[12:14], "big")
    if division & 0x8000:
        raise MidiError(f"{name}: SMPTE time division is not supported")
    if division == 0:
        raise MidiError(f"{name}: invalid time division 0")
    parts = [data[: 8 + hlen]]
    pos, exact, n_tracks, tempos = 8 + hlen, True, 0, []
    while pos + 8 <= len(data):
        cid, clen = data[pos : pos + 4], int.from_bytes(data[pos + 4 : pos + 8], "big")
        body = data[pos + 8 : pos + 8 + clen]
        if len(body) < clen:
            raise MidiError(f"{name}: truncated file (chunk at byte {pos} ends past the end)")
        if cid == b"MTrk":
            n_tracks += 1
            # Every channel a track uses has at least one explicit status byte 0x8c..0xEc
            # (running status needs one first), so marking each channel whose status byte
            # occurs anywhere (delta times and meta data may add a few) misses none.
            raw = np.frombuffer(body, dtype=np.uint8)
            channels = np.unique(raw[(raw >= 0x80) & (raw < 0xF0)] & 0x0F)
            if len(body) >= 4 and body.endswith(_END_OF_TRACK) and body[-4] < 0x80:
                if _TEMPO in body:  # read tempo events exactly, adding up the ticks too
                    ticks = _track_ticks(body, tempos)
                    exact = exact and ticks is not None and ticks < _TICK_LIMIT
                else:
                    exact = exact and _fits_int32(body)
                if len(channels):
                    body = body[:-3] + _markers(channels) + b"\x00" + _END_OF_TRACK
            else:
                exact = False
        parts.append(cid + len(body).to_bytes(4, "big") + body)
        pos += 8 + clen
    if n_tracks == 0:
        raise MidiError(f"{name}: no tracks")
    _check_ticks(max((t for t, _ in tempos), default=0), name)
    table = np.array(tempos, dtype=np.int64).reshape(-1, 2)
    return b"".join(parts), division, exact, table[np.argsort(table[:, 0], kind="stable")]


def _check_ticks(ticks: int, name: str) -> None:
    if ticks >= _MAX_TICKS:
        raise MidiError(f"{name}: implausibly long (delta times add up to {ticks:.3g} ticks)")


def _tick_scales(tempo_ticks: np.ndarray, tempo_mspq: np.ndarray, tpq: int) -> tuple:
    """Tempo segments as pretty_midi builds them: (start ticks, seconds per tick, start s).

    120 bpm until the first tempo event; the last event at tick 0 replaces that; later
    events open a segment when the tempo changes. Segment start times accumulate
    sequentially (np.cumsum), with the same float operations as pretty_midi.
    """
    ok = tempo_mspq > 0
    ticks, mspq = tempo_ticks[ok].astype(np.int64), tempo_mspq[ok].astype(np.float64)
    scale = 60.0 / ((6e7 / mspq) * tpq)
    at_zero = ticks == 0
    first = scale[at_zero][-1] if at_zero.any() else 60.0 / (120.0 * tpq)
    ticks = np.concatenate([[0], ticks[~at_zero]])
    scale = np.concatenate([[first], scale[~at_zero]])
    changed = np.concatenate([[True], scale[1:] != scale[:-1]])
    ticks, scale = ticks[changed], scale[changed]
    start = np.concatenate([[0.0], np.cumsum(scale[:-1] * np.diff(ticks).astype(np.float64))])
    return ticks, scale, start


def _to_seconds(ticks: np.ndarray, scales: tuple) -> np.ndarray:
    seg_ticks, per_tick, start = scales
    idx = np.searchsorted(seg_ticks, ticks, side="right") - 1
    return start[idx] + per_tick[idx] * (ticks - seg_ticks[idx]).astype(np.float64)


def _assemble(name: str, tpq: int, tempos: tuple, notes: list, pedals: list,
              max_seconds: float) -> NoteData:
    """Build NoteData from per-part tick arrays: notes are (start, end, pitch, vel, chan).
    Refuses a piece whose notes or pedal events reach past ``max_seconds``."""
    scales = _tick_scales(*tempos, tpq)

    def cat(parts: list, i: int, dtype) -> np.ndarray:
        return np.concatenate([p[i] for p in parts]).astype(dtype) if parts else np.zeros(0, dtype)

    data = NoteData(
        onset=_to_seconds(cat(notes, 0, np.int64), scales),
        offset=_to_seconds(cat(notes, 1, np.int64), scales),
        pitch=cat(notes, 2, np.int64),
        velocity=cat(notes, 3, np.int64),
        channel=cat(notes, 4, np.int64),
        pedal_time=_to_seconds(cat(pedals, 0, np.int64), scales),
        pedal_channel=cat(pedals, 1, np.int64),
        pedal_value=cat(pedals, 2, np.int64),
    )
    if len(data) == 0 or not (data.velocity > 0).any():
        raise MidiError(f"{name}: no notes (drum tracks and zero-length notes are ignored)")
    check_duration(data, name, max_seconds)
    return data


def check_duration(notes: NoteData, name: str, max_seconds: float = MAX_SECONDS) -> None:
    """Raise MidiError when the last note or pedal event is later than ``max_seconds``:
    such times come from absurd tempos or ticks, and would give millions of TIME_SHIFTs."""
    last = max(float(notes.offset.max(initial=0.0)), float(notes.pedal_time.max(initial=0.0)))
    if not last <= max_seconds:
        raise MidiError(f"{name}: implausibly long ({last / 3600:,.1f} h of events, more than "
                        f"the limit of {max_seconds:g} s)")


def _repair_pairing(start, end, pitch, vel, part):
    """Re-pair notes the way pretty_midi (and so note-seq) does, within each part (one
    track's notes on one channel). Arrays in, arrays out (reordered); None when symusic's
    output cannot tell (use mido).

    symusic pairs note-offs with note-ons first-in first-out. pretty_midi lets a note-off
    close every open note of its key that started on an earlier tick, and a note-off that
    finds only notes started on its own tick deletes them. With every note-on matched (see
    the closing note-offs), the two differ only where notes of one pitch overlap or last
    zero ticks:
    - a zero-tick pair from symusic is exactly pretty_midi's deleting note-off: such
      notes are dropped;
    - otherwise a note-off closes every open note, so each note of a key whose notes
      overlap ends at the first of the key's note-off ticks after its start (replaying
      note-offs before note-ons on one tick gives pretty_midi's result whatever their
      order in the file).
    Both are array operations, so floods of such notes cost no more than others. A
    deleting note-off on a tick where its key also starts a note that lasts deletes the
    notes before it in the file and not those after, an order symusic's output does not
    keep: those files return None.
    """
    key = part * 128 + pitch
    order = np.lexsort((start, key))
    start, end, pitch, vel, part, key = (a[order] for a in (start, end, pitch, vel, part, key))
    zero = end == start
    same_onset = (key[1:] == key[:-1]) & (start[1:] == start[:-1])
    if (same_onset & (zero[1:] != zero[:-1])).any():
        return None  # a deleting note-off among lasting note-ons of its tick: order unknown
    if zero.any():
        start, end, pitch, vel, part, key = (a[~zero] for a in (start, end, pitch, vel, part,
                                                               key))
    overlap = (key[1:] == key[:-1]) & (start[1:] < end[:-1])
    if overlap.any():
        clash = np.zeros(len(key), dtype=bool)
        clash[1:] |= overlap
        clash[:-1] |= overlap
        clash = np.isin(key, key[clash])  # every note of a key with an overlap
        # (key, tick) as one sortable number: ticks are below 2**31 here
        offs = np.unique((key[clash] << 32) | end[clash])
        ons = (key[clash] << 32) | start[clash]
        end = end.copy()
        end[clash] = offs[np.searchsorted(offs, ons, side="right")] & 0xFFFFFFFF
    return start, end, pitch, vel, part


def _read_symusic(data: bytes, name: str, max_seconds: float) -> NoteData | None:
    """Fast path. Returns None (use mido) when symusic cannot parse the file, the channel
    markers do not resolve, a track's ticks reach symusic's 32-bit limit, or symusic's
    pairing of note-offs cannot be turned into pretty_midi's."""
    tagged, tpq, exact, tempos = _tag_tracks(data, name)
    if not exact:
        return None
    try:
        score = symusic.Score.from_midi(tagged)
    except Exception:  # mido is more lenient (it clips data bytes > 127): it decides
        return None
    parts, channels, pedals = [], [], []
    for track in score.tracks:
        if track.note_num() == 1 and not track.controls:
            note = track.notes[0]  # a marker alone: the channel is unused in this track;
            if note.velocity == 1 and note.duration == 0 and note.pitch < 16:
                continue
            return None  # one real note in a part without its marker (a program change)
        arr = track.notes.numpy()
        time, dur, pitch, vel = arr["time"], arr["duration"], arr["pitch"], arr["velocity"]
        candidate = (vel == 1) & (dur == 0) & (pitch < 16)
        end_tick = time[candidate].max(initial=-1)
        marker = candidate & (time == end_tick)
        if marker.sum() != 1:
            return None
        channel = int(pitch[marker][0])
        if channel == DRUM_CHANNEL:
            continue
        if (time + dur == end_tick + 1).any():
            return None  # a note-on no note-off of the file matched
        real = ~marker
        t = time[real].astype(np.int64)
        part = np.full(real.sum(), len(channels))
        parts.append((t, t + dur[real], pitch[real].astype(np.int64), vel[real], part))
        channels.append(channel)
        cc = track.controls.numpy()
        sus = cc["number"] == SUSTAIN_CC
        if sus.any():
            pedals.append((cc["time"][sus], np.full(sus.sum(), channel), cc["value"][sus]))
    notes = []
    if parts:
        paired = _repair_pairing(*(np.concatenate([p[i] for p in parts]) for i in range(5)))
        if paired is None:
            return None
        *note, part = paired
        notes.append((*note, np.array(channels)[part]))
    return _assemble(name, tpq, (tempos[:, 0], tempos[:, 1]), notes, pedals, max_seconds)


def read_midi_mido(data: bytes, name: str = "<bytes>",
                   max_seconds: float = MAX_SECONDS) -> NoteData:
    """Exact, slow reader on mido; the fallback for files symusic cannot tag, and the
    reference the fast path is tested against.

    Notes pair as pretty_midi pairs them, per track: a note-off closes every open note of
    its channel and key that started on an earlier tick, and one that finds only notes
    started on its own tick drops them; a note-on never closed is dropped; drums (channel
    10) are ignored.
    """
    _tag_tracks(data, name)  # same header and truncation checks as the fast path
    try:
        mf = mido.MidiFile(file=io.BytesIO(data), clip=True)
    except Exception as exc:
        msg = str(exc).strip() or type(exc).__name__
        raise MidiError(f"{name}: unreadable MIDI ({msg})") from None
    tempos: list[tuple[int, int]] = []
    notes: list[tuple[int, int, int, int, int]] = []
    pedals: list[tuple[int, int, int]] = []
    for track in mf.tracks:
        tick = 0
        open_notes: dict[tuple[int, int], list] = defaultdict(list)
        for msg in track:
            tick += msg.time
            if msg.type == "set_tempo":
                tempos.append((tick, msg.tempo))
            elif msg.type == "note_on" and msg.velocity > 0:
                open_notes[(msg.channel, msg.note)].append((tick, msg.velocity))
            elif msg.type in ("note_on", "note_off"):
                pending = open_notes.pop((msg.channel, msg.note), [])
                closed = [(s, v) for s, v in pending if s != tick]
                if closed:
                    open_notes[(msg.channel, msg.note)] = [n for n in pending if n[0] == tick]
                if msg.channel != DRUM_CHANNEL:
                    notes += [(s, tick, msg.note, v, msg.channel) for s, v in closed]
            elif (
                msg.type == "control_change"
                and msg.control == SUSTAIN_CC
                and msg.channel != DRUM_CHANNEL
            ):
                pedals.append((tick, msg.channel, msg.value))
        _check_ticks(tick, name)  # ticks only grow along a track
    tempos.sort(key=lambda t: t[0])
    tempo_arr = np.array(tempos, dtype=np.int64).reshape(-1, 2)
    note_arr = np.array(notes, dtype=np.int64).reshape(-1, 5)
    pedal_arr = np.array(pedals, dtype=np.int64).reshape(-1, 3)
    return _assemble(name, mf.ticks_per_beat, (tempo_arr[:, 0], tempo_arr[:, 1]), [note_arr.T],
                     [pedal_arr.T], max_seconds)


def from_pretty_midi(pm: pretty_midi.PrettyMIDI, max_seconds: float = MAX_SECONDS) -> NoteData:
    """NoteData of a PrettyMIDI object.

    pretty_midi keeps no channels, so every non-drum instrument counts as one channel: all
    of them merge into one piano stream and any instrument's pedal sustains them all (a
    piano file keeps its pedal in one hand's track). Note that pretty_midi's own file
    loader drops pedal tracks without notes; pass a path to keep those.
    """
    insts = [i for i in pm.instruments if not i.is_drum]
    notes = [n for i in insts for n in i.notes]
    ccs = [c for i in insts for c in i.control_changes if c.number == SUSTAIN_CC]
    data = NoteData(
        onset=np.array([n.start for n in notes], dtype=np.float64),
        offset=np.array([n.end for n in notes], dtype=np.float64),
        pitch=np.array([n.pitch for n in notes], dtype=np.int64),
        velocity=np.array([n.velocity for n in notes], dtype=np.int64),
        channel=np.zeros(len(notes), dtype=np.int64),
        pedal_time=np.array([c.time for c in ccs], dtype=np.float64),
        pedal_channel=np.zeros(len(ccs), dtype=np.int64),
        pedal_value=np.array([c.value for c in ccs], dtype=np.int64),
    )
    if len(data) == 0 or not (data.velocity > 0).any():
        raise MidiError("<PrettyMIDI>: no notes (drum instruments are ignored)")
    check_duration(data, "<PrettyMIDI>", max_seconds)
    return data


def read_midi(source: MidiSource, name: str | None = None,
              max_seconds: float = MAX_SECONDS) -> NoteData:
    """Read a path, raw bytes or a PrettyMIDI object into NoteData.

    Raises MidiError naming the file and the reason for anything unreadable, empty, or
    with events later than ``max_seconds``.
    """
    if isinstance(source, pretty_midi.PrettyMIDI):
        return from_pretty_midi(source, max_seconds)
    if isinstance(source, bytes | bytearray):
        data, name = bytes(source), name or "<bytes>"
    else:
        name = name or str(source)
        try:
            data = Path(source).read_bytes()
        except OSError as exc:
            raise MidiError(f"{name}: cannot read file ({exc.strerror or exc})") from None
    if not data:
        raise MidiError(f"{name}: empty file")
    fast = _read_symusic(data, name, max_seconds)
    if fast is not None:
        return fast
    if len(data) > MAX_EXACT_BYTES:
        raise MidiError(f"{name}: its notes cannot be paired on the fast path (unmatched, "
                        f"overlapping or zero-length notes in an order only a full parse "
                        f"tells, or a malformed track), and the exact reader takes files of "
                        f"up to {MAX_EXACT_BYTES / 2**20:g} MiB, not "
                        f"{len(data) / 2**20:.1f} MiB")
    return read_midi_mido(data, name, max_seconds)
