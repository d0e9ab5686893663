"""MIDI sources -> NoteData (notes and sustain-pedal events in seconds, with channels).

Files are parsed with symusic (a C++ parser, ~100x faster than pretty_midi). Two facts
about both symusic and pretty_midi shape this module:

* neither tells which MIDI channel a track's notes are on, and
* both drop a track that holds control changes but no notes, which is exactly where many
  piano files keep the sustain pedal (150 of the 273 piano-midi.de files).

So before parsing, ``_tag_tracks`` appends to every track one tiny marker note per channel
(pitch = channel, velocity 1, zero length, at the track's end). Every (track, channel) part
then survives with its controls, and its marker names its channel. Files where the markers
cannot be placed or found (a malformed track end, a program change splitting a channel
within a track) fall back to an exact pure-Python reader built on mido.

Ticks become seconds with pretty_midi's own arithmetic, so times match pretty_midi's to
the bit. Tempo events count from every track, as a synthesiser plays them.
"""

from __future__ import annotations

import io
import os
from collections import defaultdict
from pathlib import Path

import mido
import numpy as np
import pretty_midi
import symusic

from .core import NoteData

SUSTAIN_CC = 64
DRUM_CHANNEL = 9


class MidiError(Exception):
    """A MIDI source could not be read or holds nothing to encode; says which and why."""


MidiSource = str | os.PathLike | bytes | pretty_midi.PrettyMIDI


def _markers(channels: np.ndarray) -> bytes:
    """Zero-length notes (channel c, pitch c, velocity 1), one per channel, the first
    taking the delta of the End-of-Track event they are inserted before."""
    return b"\x00".join(bytes([0x90 | c, c, 1, 0, 0x80 | c, c, 0]) for c in channels.tolist())


_END_OF_TRACK = b"\xff\x2f\x00"


def _tag_tracks(data: bytes, name: str) -> tuple[bytes, int, bool]:
    """Insert channel markers before each track's End-of-Track.

    Returns the new bytes, the ticks per quarter and whether every track took markers.
    Raises MidiError for a missing header, SMPTE timing, or a truncated chunk.
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
    pos, all_tagged, n_tracks = 8 + hlen, True, 0
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
                if len(channels):
                    body = body[:-3] + _markers(channels) + b"\x00" + _END_OF_TRACK
            else:
                all_tagged = False
        parts.append(cid + len(body).to_bytes(4, "big") + body)
        pos += 8 + clen
    if n_tracks == 0:
        raise MidiError(f"{name}: no tracks")
    return b"".join(parts), division, all_tagged


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


def _assemble(name: str, tpq: int, tempos: tuple, notes: list, pedals: list) -> NoteData:
    """Build NoteData from per-part tick arrays: notes are (start, end, pitch, vel, chan)."""
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
    return data


def _repair_pairing(start, end, pitch, vel, part):
    """Re-pair notes the way pretty_midi (and so note-seq) does, within each part (one
    track's notes on one channel). Arrays in, arrays out (reordered).

    symusic pairs note-offs with note-ons first-in first-out. pretty_midi lets a note-off
    close every open note of its key that started on an earlier tick, and a note-off that
    finds only notes started on its own tick deletes them. The two differ only where notes
    of one pitch overlap or last zero ticks, so only those pitches are replayed: a
    zero-tick pair from symusic is exactly pretty_midi's deleting note-off, and otherwise a
    note-off closes every open note (replaying note-offs before note-ons on one tick gives
    pretty_midi's result whatever their order in the file).
    """
    key = part * 128 + pitch
    order = np.lexsort((start, key))
    start, end, pitch, vel, part, key = (a[order] for a in (start, end, pitch, vel, part, key))
    clash = end == start
    overlap = (key[1:] == key[:-1]) & (start[1:] < end[:-1])
    clash[1:] |= overlap
    clash[:-1] |= overlap
    if not clash.any():
        return start, end, pitch, vel, part
    keep = ~np.isin(key, key[clash])
    out = [(start[keep], end[keep], pitch[keep], vel[keep], part[keep])]
    for k in np.unique(key[clash]).tolist():
        sel = key == k
        s, e, v = start[sel].tolist(), end[sel].tolist(), vel[sel].tolist()
        wiped = {a for a, b in zip(s, e, strict=True) if a == b}
        events = [(b, 0, 0) for a, b in zip(s, e, strict=True) if a != b]
        events += [(a, 1, v0) for a, b, v0 in zip(s, e, v, strict=True) if a not in wiped]
        events.sort()
        open_notes: list[tuple[int, int]] = []
        notes: list[tuple[int, int, int]] = []
        for t, kind, v0 in events:
            if kind == 1:
                open_notes.append((t, v0))
            else:
                notes += [(a, t, v1) for a, v1 in open_notes]
                open_notes = []
        arr = np.array(notes, dtype=np.int64).reshape(-1, 3)
        n = len(arr)
        out.append((arr[:, 0], arr[:, 1], np.full(n, k % 128), arr[:, 2], np.full(n, k // 128)))
    return tuple(np.concatenate([o[i] for o in out]) for i in range(5))


def _read_symusic(data: bytes, name: str) -> NoteData | None:
    """Fast path. Returns None when the channel markers do not resolve (use mido)."""
    tagged, tpq, all_tagged = _tag_tracks(data, name)
    if not all_tagged:
        return None
    try:
        score = symusic.Score.from_midi(tagged)
    except Exception as exc:  # the parser's own message, on one line
        msg = str(exc).strip() or type(exc).__name__
        raise MidiError(f"{name}: unreadable MIDI ({msg})") from None
    parts, channels, pedals = [], [], []
    for track in score.tracks:
        if track.note_num() == 1 and not track.controls:
            continue  # only a marker: the channel is unused in this track
        arr = track.notes.numpy()
        time, dur, pitch, vel = arr["time"], arr["duration"], arr["pitch"], arr["velocity"]
        marker = (vel == 1) & (dur == 0) & (pitch < 16) & (time == time.max())
        if marker.sum() != 1:
            return None
        channel = int(pitch[marker][0])
        if channel == DRUM_CHANNEL:
            continue
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
        *note, part = _repair_pairing(*(np.concatenate([p[i] for p in parts]) for i in range(5)))
        notes.append((*note, np.array(channels)[part]))
    tempo = score.tempos.numpy()
    order = np.argsort(tempo["time"], kind="stable")
    return _assemble(name, tpq, (tempo["time"][order], tempo["mspq"][order]), notes, pedals)


def read_midi_mido(data: bytes, name: str = "<bytes>") -> NoteData:
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
    tempos.sort(key=lambda t: t[0])
    tempo_arr = np.array(tempos, dtype=np.int64).reshape(-1, 2)
    note_arr = np.array(notes, dtype=np.int64).reshape(-1, 5)
    pedal_arr = np.array(pedals, dtype=np.int64).reshape(-1, 3)
    return _assemble(
        name, mf.ticks_per_beat, (tempo_arr[:, 0], tempo_arr[:, 1]), [note_arr.T], [pedal_arr.T]
    )


def from_pretty_midi(pm: pretty_midi.PrettyMIDI) -> NoteData:
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
    return data


def read_midi(source: MidiSource, name: str | None = None) -> NoteData:
    """Read a path, raw bytes or a PrettyMIDI object into NoteData.

    Raises MidiError naming the file and the reason for anything unreadable or empty.
    """
    if isinstance(source, pretty_midi.PrettyMIDI):
        return from_pretty_midi(source)
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
    fast = _read_symusic(data, name)
    return fast if fast is not None else read_midi_mido(data, name)
