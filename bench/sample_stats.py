"""Describe generated pieces honestly: note density, pitch range, repeated-note runs.

    python bench/sample_stats.py output/run1 [output/run2 ...]

For each run folder written by generate.py: the primer's figures beside each
continuation's, from primer.mid and continuation*.mid.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import pretty_midi


def stats(path: Path) -> str:
    """notes/s, pitch range, mean velocity, longest run of one pitch struck repeatedly."""
    notes = sorted(pretty_midi.PrettyMIDI(str(path)).instruments[0].notes,
                   key=lambda n: (n.start, n.pitch))
    if not notes:
        return f"{path.name}: no notes"
    span = max(n.end for n in notes) - min(n.start for n in notes)
    melody = [n.pitch for n in notes]  # onset order
    run = best = 1
    for a, b in zip(melody, melody[1:], strict=False):
        run = run + 1 if a == b else 1
        best = max(best, run)
    lo, hi = min(melody), max(melody)
    vel = sum(n.velocity for n in notes) / len(notes)
    return (f"{path.name}: {len(notes)} notes over {span:.1f} s ({len(notes) / span:.1f}/s), "
            f"pitch {pretty_midi.note_number_to_name(lo)}-{pretty_midi.note_number_to_name(hi)}"
            f" ({hi - lo} semitones), mean velocity {vel:.0f}, longest same-pitch run {best}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("runs", nargs="+", type=Path)
    for run in ap.parse_args().runs:
        print(f"{run}:")
        for f in [run / "primer.mid", *sorted(run.glob("continuation*.mid"))]:
            print("  " + stats(f))


if __name__ == "__main__":
    sys.exit(main())
