"""prep.py throughput against the straightforward approach, on one folder in one run.

    python bench/prep.py [FOLDER] [--repeat N]

FOLDER defaults to ../shared/data/piano-midi-de. Runs ``prep.main`` with --force into
temporary folders with 1 and 2 workers (best of N runs each, imports already done), then
the whole command line once (``python prep.py --workers 2 --force``: interpreter start and
imports included), then the straightforward approach: one process reads each file with
``pretty_midi.PrettyMIDI``, encodes it with ``midi_processor.reference.reference_encode``
and pickles it. Prints wall time, files/s, notes/s and the speed-up over the latter.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import pickle
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

import pretty_midi

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import prep  # noqa: E402
from midi_processor import NOTE_OFF, midi_files  # noqa: E402
from midi_processor.reference import reference_encode  # noqa: E402

DEFAULT_FOLDER = REPO.parent / "shared/data/piano-midi-de"


def time_prep(folder: Path, workers: int, repeat: int) -> tuple[float, int, int]:
    """Best wall time of ``prep.main`` over ``repeat`` forced runs, files and notes encoded."""
    best = float("inf")
    for _ in range(repeat):
        with tempfile.TemporaryDirectory() as out:
            args = ["--input", str(folder), "--output", out, "--workers", str(workers), "--force"]
            sink = io.StringIO()  # the progress bar and summary
            start = time.perf_counter()
            with contextlib.redirect_stdout(sink), contextlib.redirect_stderr(sink):
                prep.main(args)
            best = min(best, time.perf_counter() - start)
            lines = (Path(out) / "manifest.jsonl").read_text().splitlines()
            ok = [e for e in map(json.loads, lines) if e["status"] == "ok"]
    return best, len(ok), sum(e["notes"] for e in ok)


def time_cli(folder: Path) -> float:
    """Wall time of the command line with 2 workers, interpreter start and imports included."""
    with tempfile.TemporaryDirectory() as out:
        cmd = [sys.executable, "prep.py", "--input", str(folder), "--output", out, "--workers", "2"]
        start = time.perf_counter()
        subprocess.run([*cmd, "--force"], cwd=REPO, check=True, capture_output=True)
        return time.perf_counter() - start


def time_baseline(files: list[Path]) -> tuple[float, int, int]:
    """pretty_midi + reference_encode + pickle, one process: wall time, files, notes."""
    warnings.simplefilter("ignore")  # pretty_midi warns about some files' meta events
    done = notes = 0
    with tempfile.TemporaryDirectory() as out:
        start = time.perf_counter()
        for i, path in enumerate(files):
            try:
                tokens = reference_encode(pretty_midi.PrettyMIDI(str(path)))
            except Exception:
                continue
            with open(Path(out) / f"{i}.pickle", "wb") as f:
                pickle.dump(tokens, f)
            done += 1
            notes += sum(t < NOTE_OFF for t in tokens)
        return time.perf_counter() - start, done, notes


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("folder", nargs="?", type=Path, default=DEFAULT_FOLDER)
    ap.add_argument("--repeat", type=int, default=3, help="prep.main runs per setting (best)")
    args = ap.parse_args()
    files = midi_files(args.folder)
    if not files:
        sys.exit(f"{args.folder}: no MIDI files found")

    rows = [
        (f"prep.main, {w} worker{'s' * (w > 1)}", *time_prep(args.folder, w, args.repeat))
        for w in (1, 2)
    ]
    cli_s = time_cli(args.folder)
    base = ("pretty_midi + reference_encode + pickle", *time_baseline(files))
    rows.append(("python prep.py --workers 2 (whole CLI)", cli_s, rows[1][2], rows[1][3]))
    rows.append(base)

    print(f"{args.folder}: {len(files)} MIDI files")
    print(f"{'':42}{'wall s':>8}{'files':>7}{'files/s':>9}{'notes/s':>11}{'speed-up':>10}")
    for label, wall, n, notes in rows:
        print(
            f"{label:42}{wall:8.2f}{n:7}{n / wall:9.1f}{notes / wall:11,.0f}{base[1] / wall:9.1f}x"
        )


if __name__ == "__main__":
    main()
