"""Token-level data augmentation: transposition and time stretch (numpy, any window).

Both work on any slice of a token stream (a training window may start mid-note) and keep
it decodable: transposition drops the NOTE_ON and NOTE_OFF of pitches pushed out of
0..127 alike; time stretch rescales the absolute time of every event and re-quantises it,
so rounding never accumulates.
"""

from __future__ import annotations

import numpy as np

from .core import layout_time_shifts, shift_steps
from .vocab import NOTE_OFF, TIME_SHIFT, VELOCITY


def transpose(tokens: np.ndarray, semitones: int) -> np.ndarray:
    """Shift every NOTE_ON / NOTE_OFF by ``semitones``; notes leaving 0..127 are dropped.

    Transposing by k then -k gives back every note that stayed in range.
    """
    tokens = np.asarray(tokens, dtype=np.int64)
    is_on = tokens < NOTE_OFF
    is_off = (tokens >= NOTE_OFF) & (tokens < TIME_SHIFT)
    pitch = np.where(is_on, tokens, tokens - NOTE_OFF) + semitones
    is_note = is_on | is_off
    out = np.where(is_note, np.where(is_on, pitch, pitch + NOTE_OFF), tokens)
    keep = ~is_note | ((pitch >= 0) & (pitch <= 127))
    return out[keep]


def stretch_time(tokens: np.ndarray, factor: float) -> np.ndarray:
    """Play ``factor`` times slower (factor > 1) or faster (< 1).

    Each event keeps its order; its absolute time (from the slice start, in 10 ms steps) is
    multiplied by ``factor`` and rounded, and the TIME_SHIFTs are re-emitted canonically
    (100-step shifts, then the rest). Trailing time shifts are stretched the same way.
    """
    if factor <= 0:
        raise ValueError(f"time-stretch factor must be positive, got {factor}")
    tokens = np.asarray(tokens, dtype=np.int64)
    steps = shift_steps(tokens)
    clock = np.cumsum(steps)
    events = np.flatnonzero((tokens < TIME_SHIFT) | (tokens >= VELOCITY))
    # Times at each event, plus the slice's end so trailing silence is kept.
    times = np.append(clock[events], clock[-1] if len(tokens) else 0)
    new_times = np.floor(times * factor + 0.5).astype(np.int64)
    n_payload = np.ones(len(times), dtype=np.int64)
    n_payload[-1] = 0  # the slice's end carries no event
    out, at = layout_time_shifts(np.diff(new_times, prepend=0), n_payload)
    out[at[:-1]] = tokens[events]
    return out
