"""Token vocabulary of the performance-event encoding (see design.md, Vocabulary).

Ids are fixed so that checkpoints trained by the original scripts stay usable.
"""

from __future__ import annotations

VOCAB_VERSION = "performance-390/1"

NOTE_ON = 0  # 0..127: NOTE_ON pitch
NOTE_OFF = 128  # 128..255: NOTE_OFF pitch
TIME_SHIFT = 256  # 256..355: TIME_SHIFT of k * 10 ms, k = 1..100 (id 255 + k)
VELOCITY = 356  # 356..387: velocity bin b = velocity // 4 (id 356 + b)
END = 388
PAD = 389
VOCAB_SIZE = 390

STEPS_PER_SECOND = 100
MAX_SHIFT_STEPS = 100
VELOCITY_BINS = 32
DEFAULT_VELOCITY_BIN = 16  # used when a NOTE_ON arrives before any VELOCITY event


def time_shift_id(steps: int) -> int:
    """Id of a TIME_SHIFT of ``steps`` x 10 ms (1..100)."""
    if not 1 <= steps <= MAX_SHIFT_STEPS:
        raise ValueError(f"time shift of {steps} steps is outside 1..{MAX_SHIFT_STEPS}")
    return TIME_SHIFT + steps - 1


def velocity_to_bin(velocity: int) -> int:
    """MIDI velocity 1..127 -> bin 0..31."""
    return min(max(int(velocity), 0), 127) // 4


def bin_to_velocity(b: int) -> int:
    """Bin 0..31 -> the velocity it decodes to: the bin's centre, never 0."""
    return 4 * b + 2
