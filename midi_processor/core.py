"""Notes <-> performance-event tokens, vectorised with numpy (design.md, Vocabulary).

The encoder works on plain arrays of notes (onset/offset in seconds, pitch, velocity,
channel) and sustain-pedal events, so every MIDI reader feeds the same code and yields the
same tokens. Rules, in order: sustain pedal per channel (Magenta note-seq semantics),
absolute 10 ms quantisation (round half up, zero length -> 1 step), one sounding note per
pitch, canonical event order, END.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .vocab import (
    DEFAULT_VELOCITY_BIN,
    END,
    MAX_SHIFT_STEPS,
    NOTE_OFF,
    NOTE_ON,
    PAD,
    STEPS_PER_SECOND,
    TIME_SHIFT,
    VELOCITY,
    VOCAB_SIZE,
)

# A note still sounding when the tokens run out (a cut-off generation or primer) sounds to
# the end of the music, and at least this long, so that a note struck at the end is heard.
DANGLING_NOTE_STEPS = 100


@dataclass
class NoteData:
    """Notes and sustain-pedal events of one piece, times in seconds.

    ``channel`` / ``pedal_channel`` group notes with the pedal that acts on them: CC64 is a
    channel message, so it sustains every note of its channel whatever track holds it.
    """

    onset: np.ndarray  # float64
    offset: np.ndarray  # float64
    pitch: np.ndarray  # int
    velocity: np.ndarray  # int, 1..127
    channel: np.ndarray  # int
    pedal_time: np.ndarray  # float64, in file order within a channel
    pedal_channel: np.ndarray  # int
    pedal_value: np.ndarray  # int, 0..127; >= 64 is down

    def __len__(self) -> int:
        return len(self.onset)


def apply_sustain(notes: NoteData) -> np.ndarray:
    """Offsets after the sustain pedal: a note released while the pedal is down sounds
    until the pedal's next release (note-seq's ``apply_sustain_control_changes``).

    A pedal event at the very time of a release counts as already applied (note-seq sorts
    sustain events before note-offs). A pedal never released holds until the last event of
    the piece. Re-striking a sustained pitch is handled later by the one-note-per-pitch rule.
    """
    offset = notes.offset.copy()
    if len(notes.pedal_time) == 0 or len(offset) == 0:
        return offset
    end_time = max(float(notes.offset.max()), float(notes.pedal_time.max()))
    for ch in np.unique(notes.pedal_channel):
        sel = notes.pedal_channel == ch
        order = np.argsort(notes.pedal_time[sel], kind="stable")
        times = notes.pedal_time[sel][order]
        down = notes.pedal_value[sel][order] >= 64
        # Time of the first release strictly after each pedal event (end_time if none).
        release = np.where(down, np.inf, times)
        next_release = np.minimum.accumulate(release[::-1])[::-1]
        next_release = np.append(next_release[1:], np.inf)
        next_release[np.isinf(next_release)] = end_time
        idx = np.flatnonzero(notes.channel == ch)
        last = np.searchsorted(times, offset[idx], side="right") - 1
        held = (last >= 0) & down[np.maximum(last, 0)]
        offset[idx[held]] = np.maximum(offset[idx[held]], next_release[last[held]])
    return offset


def quantize(seconds: np.ndarray) -> np.ndarray:
    """Absolute times -> 10 ms steps, rounding half up (never per interval: that drifts)."""
    return np.floor(np.asarray(seconds, dtype=np.float64) * STEPS_PER_SECOND + 0.5).astype(np.int64)


def performance_notes(notes: NoteData) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """The notes the tokens describe: ``(start_step, end_step, pitch, velocity)``.

    Sustain applied, quantised, zero-length notes lengthened to one step, and one sounding
    note per pitch (an earlier note ends where the next of the same pitch starts; of notes
    starting on the same step and pitch, the longest, then loudest, is kept). Sorted by
    pitch, then start.
    """
    keep = (notes.velocity > 0) & (notes.pitch >= 0) & (notes.pitch <= 127)
    offset = apply_sustain(notes)[keep]
    start = quantize(notes.onset[keep])
    end = np.maximum(quantize(offset), start + 1)
    pitch = notes.pitch[keep].astype(np.int64)
    vel = notes.velocity[keep].astype(np.int64)
    order = np.lexsort((vel, end, start, pitch))
    start, end, pitch, vel = start[order], end[order], pitch[order], vel[order]
    # Of several notes with the same pitch and start step keep the last (longest, loudest).
    last_of_group = np.ones(len(start), dtype=bool)
    last_of_group[:-1] = (pitch[1:] != pitch[:-1]) | (start[1:] != start[:-1])
    start, end, pitch, vel = (a[last_of_group] for a in (start, end, pitch, vel))
    same_pitch_next = np.zeros(len(start), dtype=bool)
    same_pitch_next[:-1] = pitch[1:] == pitch[:-1]
    end[:-1] = np.where(same_pitch_next[:-1], np.minimum(end[:-1], start[1:]), end[:-1])
    return start, end, pitch, vel


def notes_to_tokens(
    start: np.ndarray, end: np.ndarray, pitch: np.ndarray, velocity: np.ndarray
) -> np.ndarray:
    """Canonical token array (ending with END) for quantised, non-overlapping notes.

    Within one step: note-offs first, then note-ons, each in ascending pitch; a VELOCITY
    event precedes a note-on only when its bin differs from the current one; gaps longer
    than 1 s become several TIME_SHIFTs (100 steps each, then the rest).
    """
    n = len(start)
    steps = np.concatenate([end, start])
    kinds = np.concatenate([np.zeros(n, np.int64), np.ones(n, np.int64)])
    pitches = np.concatenate([pitch, pitch])
    bins = np.concatenate([np.full(n, -1, np.int64), np.clip(velocity, 0, 127) // 4])
    order = np.lexsort((pitches, kinds, steps))
    steps, kinds, pitches, bins = steps[order], kinds[order], pitches[order], bins[order]

    on_idx = np.flatnonzero(kinds == 1)
    has_vel = np.zeros(len(steps), dtype=bool)
    has_vel[on_idx] = np.diff(bins[on_idx], prepend=-1) != 0
    out, at = layout_time_shifts(np.diff(steps, prepend=0), has_vel + 1, extra=1)
    out[at[has_vel]] = VELOCITY + bins[has_vel]
    out[at + has_vel] = np.where(kinds == 1, NOTE_ON + pitches, NOTE_OFF + pitches)
    out[-1] = END
    return out


def shift_steps(tokens) -> np.ndarray:
    """The 10 ms steps each token moves time on: k for a TIME_SHIFT of k steps, else 0.

    Its cumulative sum is the clock of a token stream.
    """
    ids = np.asarray(tokens, dtype=np.int64)
    return np.where((ids >= TIME_SHIFT) & (ids < VELOCITY), ids - TIME_SHIFT + 1, 0)


def cut_tokens(tokens, *, seconds: float = 0.0, count: int = 0,
               from_end: bool = False) -> list[int]:
    """The first (or, ``from_end``, the last) ``seconds`` of music or ``count`` tokens of
    a token sequence (0: all); END and what follows it are dropped. Either way ``seconds``
    last exactly that long when the piece does (a rest across the limit is shortened).

    A cut that starts inside the piece starts as the music is there: the notes sounding
    at that moment are struck again at its start (each with its own velocity), and the
    VELOCITY event in force follows them, so the last seconds of a piece that ends on a held
    chord hold the chord. Notes cut at the end simply stay unfinished.
    """
    ids = [int(t) for t in tokens]
    ids = ids[: ids.index(END)] if END in ids else ids
    start, stop, lead = 0, len(ids), []
    if seconds and ids:
        steps = shift_steps(ids)
        clock = np.cumsum(steps) - steps  # when each token happens, in 10 ms steps
        limit = round(seconds * STEPS_PER_SECOND)
        if from_end:
            at = int(clock[-1] + steps[-1]) - limit  # where the last ``seconds`` begin
            start = int(np.searchsorted(clock, at, side="left")) if at > 0 else 0
            rest = int(clock[start - 1] + steps[start - 1]) - at if start else 0
            if rest > 0:  # a rest across the cut is kept from it on: exactly ``seconds``
                lead = [TIME_SHIFT + rest - 1]
        else:
            stop = int(np.searchsorted(clock, limit, side="left"))
    elif count:
        start, stop = (max(0, len(ids) - count), len(ids)) if from_end else (0, count)
    cut = ids[start:stop]
    if seconds and not from_end and cut:
        over = int(clock[stop - 1] + steps[stop - 1]) - limit  # a last shift past the limit
        if over > 0:
            cut[-1] -= over  # ... ends at the limit instead: exactly ``seconds`` of music
    return (_state_at(ids[:start], cut, at_once=not lead) if start else []) + lead + cut


def _state_at(before: list[int], after: list[int], at_once: bool) -> list[int]:
    """The events that put a cut (``after``) in the state the music is in after
    ``before``: a NOTE_ON (after its VELOCITY) for every note sounding then, except one
    that ``after`` ends ``at_once`` (before its first TIME_SHIFT: it would last no time),
    then the VELOCITY in force unless ``after`` sets one before its first note."""
    sounding: dict[int, int | None] = {}  # pitch -> the VELOCITY it was struck with
    velocity = None
    for t in before:
        if VELOCITY <= t < END:
            velocity = t
        elif t < NOTE_OFF:
            sounding[t] = velocity
        elif t < TIME_SHIFT:
            sounding.pop(t - NOTE_OFF, None)
    for t in after if at_once else ():  # what happens at the cut's first moment
        if t >= TIME_SHIFT:
            break
        if t >= NOTE_OFF:
            sounding.pop(t - NOTE_OFF, None)
    state, current = [], None
    for pitch, struck in sorted(sounding.items()):
        if struck is not None and struck != current:
            state.append(struck)
            current = struck
        state.append(pitch)
    first_on = next((i for i, t in enumerate(after) if t < NOTE_OFF), len(after))
    sets_own = any(VELOCITY <= t < END for t in after[:first_on])
    if velocity is not None and velocity != current and not sets_own:
        state.append(velocity)
    return state


def layout_time_shifts(
    gaps: np.ndarray, n_payload: np.ndarray, extra: int = 0
) -> tuple[np.ndarray, np.ndarray]:
    """Token array with the TIME_SHIFTs of every event already in place.

    Event i is preceded by a silence of ``gaps[i]`` steps (full 1 s shifts, then the
    rest) and owns ``n_payload[i]`` token slots after it; ``extra`` slots end the array.
    Returns the array and where each event's payload starts, for the caller to fill.
    """
    n_shift = gaps // MAX_SHIFT_STEPS + (gaps % MAX_SHIFT_STEPS > 0)
    count = n_shift + n_payload
    first = np.cumsum(count) - count
    out = np.empty(int(count.sum()) + extra, dtype=np.int64)
    shift_pos = np.repeat(first, n_shift) + (
        np.arange(int(n_shift.sum())) - np.repeat(np.cumsum(n_shift) - n_shift, n_shift)
    )
    out[shift_pos] = TIME_SHIFT + MAX_SHIFT_STEPS - 1
    rest = gaps % MAX_SHIFT_STEPS
    out[(first + n_shift - 1)[rest > 0]] = TIME_SHIFT + rest[rest > 0] - 1
    return out, first + n_shift


def encode_notes(notes: NoteData) -> np.ndarray:
    """NoteData -> canonical token array ending with END."""
    return notes_to_tokens(*performance_notes(notes))


def decode_tokens(tokens) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Any id sequence -> notes ``(start_step, end_step, pitch, velocity)``, never failing.

    Stray NOTE_OFFs are ignored, a NOTE_ON on a sounding pitch ends the earlier note (one
    started on the same step is replaced), a NOTE_OFF on the step its note started gives a
    one-step note, notes still sounding at the end sound to it and at least
    ``DANGLING_NOTE_STEPS`` (a note held to the end of a take is heard as held), END stops,
    PAD is skipped. Ids outside the vocabulary raise ValueError.
    """
    ids = [int(t) for t in tokens]
    bad = [t for t in ids if not 0 <= t < VOCAB_SIZE]
    if bad:
        raise ValueError(f"token id {bad[0]} is outside the vocabulary 0..{VOCAB_SIZE - 1}")
    now = 0
    vel_bin = DEFAULT_VELOCITY_BIN
    sounding: dict[int, tuple[int, int]] = {}  # pitch -> (start, velocity bin)
    out: list[tuple[int, int, int, int]] = []
    for t in ids:
        if t < NOTE_OFF:
            if t in sounding and sounding[t][0] < now:
                out.append((sounding[t][0], now, t, sounding[t][1]))
            sounding[t] = (now, vel_bin)
        elif t < TIME_SHIFT:
            p = t - NOTE_OFF
            if p in sounding:
                s, b = sounding.pop(p)
                out.append((s, max(now, s + 1), p, b))
        elif t < VELOCITY:
            now += t - TIME_SHIFT + 1
        elif t < END:
            vel_bin = t - VELOCITY
        elif t == END:
            break
        # PAD: skipped
    for p, (s, b) in sounding.items():
        out.append((s, max(now, s + DANGLING_NOTE_STEPS), p, b))
    out.sort(key=lambda n: (n[0], n[2]))
    arr = np.array(out, dtype=np.int64).reshape(-1, 4)
    return arr[:, 0], arr[:, 1], arr[:, 2], 4 * arr[:, 3] + 2


def token_to_text(token: int) -> str:
    """One id as a readable event, e.g. ``NOTE_ON(60)`` or ``TIME_SHIFT(250ms)``."""
    t = int(token)
    if 0 <= t < NOTE_OFF:
        return f"NOTE_ON({t})"
    if t < TIME_SHIFT:
        return f"NOTE_OFF({t - NOTE_OFF})"
    if t < VELOCITY:
        return f"TIME_SHIFT({(t - TIME_SHIFT + 1) * 1000 // STEPS_PER_SECOND}ms)"
    if t < END:
        return f"VELOCITY({t - VELOCITY})"
    if t == END:
        return "END"
    if t == PAD:
        return "PAD"
    return f"INVALID({t})"


def tokens_to_text(tokens, limit: int | None = None) -> str:
    """Render ids as space-separated events for debugging and error messages."""
    ids = list(tokens)
    shown = ids if limit is None else ids[:limit]
    text = " ".join(token_to_text(t) for t in shown)
    if limit is not None and len(ids) > limit:
        text += f" ... (+{len(ids) - limit} more)"
    return text
