"""A slow, obviously-correct encoder: one Python loop per note and per event.

It exists to check the vectorised encoder in ``core`` (tests compare the two on generated
and real pieces) and as the baseline of ``bench/tokenizer.py``. It follows note-seq's
sustain algorithm literally: events sorted by time, then pedal before note-on before
note-off, notes released under the pedal held until it lifts or the pitch is struck
again. One difference: pedal events at the same time apply in file order (as a sequencer
merges tracks), where note-seq would apply presses before releases.
"""

from __future__ import annotations

import math

import pretty_midi

from .vocab import END, NOTE_OFF, NOTE_ON, TIME_SHIFT, VELOCITY

_PEDAL, _ON, _OFF = range(3)


def reference_notes(pm: pretty_midi.PrettyMIDI) -> list[tuple[int, int, int, int]]:
    """Pedal-applied, quantised notes ``(start_step, end_step, pitch, velocity)``, sorted.

    All non-drum instruments form one stream and share one pedal (as ``from_pretty_midi``).
    """
    insts = [i for i in pm.instruments if not i.is_drum]
    notes = [[n.start, n.end, n.pitch, n.velocity] for i in insts for n in i.notes]
    notes = [n for n in notes if n[3] > 0 and 0 <= n[2] <= 127]
    events = []
    for i in insts:
        for cc in i.control_changes:
            if cc.number == 64:
                events.append((cc.time, _PEDAL, cc.value))
    for k, n in enumerate(notes):
        events.append((n[0], _ON, k))
        events.append((n[1], _OFF, k))
    events.sort(key=lambda e: (e[0], e[1]))  # stable: same time and kind keep file order
    pedal_down, sustained = False, {}  # pitch -> indices of notes released under the pedal
    last_time = 0.0
    for time, kind, k in events:
        last_time = time
        if kind == _PEDAL and k >= 64:
            pedal_down = True
        elif kind == _PEDAL:
            pedal_down = False
            for held in sustained.values():
                for j in held:
                    notes[j][1] = time
            sustained.clear()
        elif kind == _ON:
            for j in sustained.pop(notes[k][2], []):
                notes[j][1] = time
        elif pedal_down:  # note-off under the pedal: keep sounding
            notes[k][1] = math.inf
            sustained.setdefault(notes[k][2], []).append(k)
    for held in sustained.values():
        for j in held:
            notes[j][1] = last_time

    def step(t: float) -> int:
        return math.floor(t * 100 + 0.5)

    by_pitch: dict[int, dict[int, tuple[int, int]]] = {}
    for start, end, pitch, vel in notes:
        s = step(start)
        e = max(step(end), s + 1)
        best = by_pitch.setdefault(pitch, {}).get(s)
        if best is None or (e, vel) > best:
            by_pitch[pitch][s] = (e, vel)
    out = []
    for pitch, starts in by_pitch.items():
        ordered = sorted(starts.items())
        for i, (s, (e, vel)) in enumerate(ordered):
            if i + 1 < len(ordered):
                e = min(e, ordered[i + 1][0])
            out.append((s, e, pitch, vel))
    out.sort()
    return out


def reference_encode(pm: pretty_midi.PrettyMIDI) -> list[int]:
    """Canonical tokens of ``pm``, built one event at a time."""
    events = []
    for s, e, pitch, vel in reference_notes(pm):
        events.append((s, 1, pitch, vel // 4))
        events.append((e, 0, pitch, -1))
    events.sort()
    tokens, now, current_bin = [], 0, None
    for when, kind, pitch, vbin in events:
        gap = when - now
        while gap > 0:
            shift = min(gap, 100)
            tokens.append(TIME_SHIFT + shift - 1)
            gap -= shift
        now = when
        if kind == 1:
            if vbin != current_bin:
                tokens.append(VELOCITY + vbin)
                current_bin = vbin
            tokens.append(NOTE_ON + pitch)
        else:
            tokens.append(NOTE_OFF + pitch)
    tokens.append(END)
    return tokens
