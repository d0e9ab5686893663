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


def _marker_events() -> bytes:
    """16 zero-length notes (channel c, pitch c, velocity 1), the first taking the delta
    of the End-of-Track event they are inserted before."""
    out = bytearray()
    for c in range(16):
        if c:
            out += b"\x00"
        out += bytes([0x90 | c, c, 1, 0, 0x80 | c, c, 0])
    return bytes(out)


_MARKERS = _marker_events()
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
            if len(body) >= 4 and body.endswith(_END_OF_TRACK) and body[-4] < 0x80:
                body = body[:-3] + _MARKERS + b"\x00" + _END_OF_TRACK
            else:
                all_tagged = False
        parts.append(cid + len(body).to_bytes(4, "big") + body)
        pos += 8 + clen
    if n_tracks == 0:
        raise MidiError(f"{name}: no tracks")
    return b"".join(parts), division, all_tagged


def _tick_scales(tempo_ticks: np.ndarray, tempo_mspq: np.ndarray, tpq: int) -> tuple:
    """Tempo segments as pretty_midi builds them: (start ticks, seconds per tick, start s)."""
    scales = [(0, 60.0 / (120.0 * tpq))]
    for tick, mspq in zip(tempo_ticks.tolist(), tempo_mspq.tolist(), strict=True):
        if mspq <= 0:
            continue
        scale = 60.0 / ((6e7 / mspq) * tpq)
        if tick == 0:
            scales = [(0, scale)]
        elif scale != scales[-1][1]:
            scales.append((tick, scale))
    ticks = np.array([s[0] for s in scales], dtype=np.int64)
    per_tick = np.array([s[1] for s in scales], dtype=np.float64)
    start = np.zeros(len(scales))
    for i in range(1, len(scales)):
        start[i] = start[i - 1] + per_tick[i - 1] * float(ticks[i] - ticks[i - 1])
    return ticks, per_tick, start


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
        raise MidiError(f"{name}: no notes (drum tracks are ignored)")
    return data


def _repair_pairing(start: np.ndarray, end: np.ndarray, pitch: np.ndarray, vel: np.ndarray):
    """Re-pair one track-channel's notes the way pretty_midi (and so note-seq) does.

    symusic pairs note-offs with note-ons first-in first-out. pretty_midi lets a note-off
    close every open note of its key that started on an earlier tick, and a note-off that
    finds only notes started on its own tick deletes them. The two differ only where notes
    of one pitch overlap or last zero ticks, so only those pitches are replayed: a
    zero-tick pair from symusic is exactly pretty_midi's deleting note-off, and otherwise a
    note-off closes every open note (replaying note-offs before note-ons on one tick gives
    pretty_midi's result whatever their order in the file).
    """
    order = np.lexsort((start, pitch))
    start, end, pitch, vel = start[order], end[order], pitch[order], vel[order]
    clash = end == start
    overlap = (pitch[1:] == pitch[:-1]) & (start[1:] < end[:-1])
    clash[1:] |= overlap
    clash[:-1] |= overlap
    if not clash.any():
        return start, end, pitch, vel
    keep = ~np.isin(pitch, pitch[clash])
    out = [(start[keep], end[keep], pitch[keep], vel[keep])]
    for p in np.unique(pitch[clash]):
        sel = pitch == p
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
        out.append((arr[:, 0], arr[:, 1], np.full(len(arr), p), arr[:, 2]))
    return tuple(np.concatenate([o[i] for o in out]) for i in range(4))


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
    notes, pedals = [], []
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
        part = _repair_pairing(t, t + dur[real], pitch[real].astype(np.int64), vel[real])
        notes.append((*part, np.full(len(part[0]), channel)))
        cc = track.controls.numpy()
        sus = cc["number"] == SUSTAIN_CC
        if sus.any():
            pedals.append((cc["time"][sus], np.full(sus.sum(), channel), cc["value"][sus]))
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
