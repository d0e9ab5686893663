"""Evaluate checkpoints: loss on the test split, music statistics of continuations, plots.

    python evaluate.py                                       # the demo model on data/test
    python evaluate.py --ckpts ckpt/a/best,ckpt/b/best --runs ckpt/a,ckpt/b --out eval

For each checkpoint: the loss in nats per token over every window of the split (as
train.py validates, all of them), beside a unigram model's; then continuations of
NUM_PRIMERS primers taken from the split's pieces (PRIME_SECONDS each, at seeded offsets;
the performances of one piece, as prep.py's manifest groups them, count as one piece),
SECONDS long, compared with the pieces' real continuations and with the primers by
notes per second, polyphony, pitch range and mean, velocity, note durations (median,
share held over 4 s) and the correlation of their pitch-class histogram with the
primer's; each model's difference from the real continuations comes with its standard
error (takes paired by primer), so a report of a few takes says what it can resolve. The
continuations are sampled as generate.py samples by default (its temperature, top-p,
release and tonality).
With --runs, the training curves of those run folders (their metrics.csv).

Writes OUT/report.json, OUT/report.html (tables and plots) and the plots as PNG.
"""

from __future__ import annotations

import math
import time
from pathlib import Path

from perceiver_music.cli import bundled, cpu_only, fail, parse_constants, printable, run_script

CKPTS = "ckpt/demo"  # checkpoints to evaluate, comma-separated (folders or .pth files)
DATA_DIR = "data"  # prep.py output
SPLIT = "test"  # the split to evaluate on (a folder of DATA_DIR)
NUM_PRIMERS = 8  # continuations per checkpoint, from this many primers of the split
PRIME_SECONDS = 15.0  # primer length, in seconds of music
SECONDS = 15.0  # continuation length, compared with as much of the real continuation
TEMPERATURE = 1.0  # sampling temperature of the continuations (generate.py's default)
TOP_P = 0.0  # nucleus sampling of the continuations (0: off; generate.py's default)
RELEASE = 3.0  # NOTE_OFF bias per second a note is held past 1 s (generate.py's default)
TONALITY = 0.5  # pull towards the pitch classes of the last seconds (generate.py's default)
SEED = 0  # seed of the primer offsets and the sampling
RUNS = ""  # run folders (with metrics.csv) whose training curves to plot, comma-separated
OUT = "eval"  # report folder
BATCH_SIZE = 8  # windows per forward pass for the loss
CPU = False  # run on the CPU even if an accelerator is present
DTYPE = "auto"  # auto (bfloat16 on GPUs with it, else float32), float32 or bfloat16


def piece_of_each(data_dir: Path, split: str, names: list[str]) -> list[str]:
    """The piece each file of ``split`` (``names``) performs: its group in prep.py's
    ``manifest.jsonl`` beside the split (ASAP's performances of one piece share one), or
    the file itself where the manifest is missing or does not name it."""
    from prep import load_manifest  # the last line of a file wins; broken lines are skipped

    groups = {}
    for entry in load_manifest(data_dir / "manifest.jsonl").values():
        where, _, name = str(entry.get("output")).partition("/")
        if where == split and entry.get("status") == "ok":
            groups[name] = str(entry.get("group"))
    return [groups.get(name, name) for name in names]


def primer_windows(split, pieces: list[str], count: int, prime_s: float, cont_s: float,
                   seed: int) -> list:
    """(file name, primer tokens, real continuation notes, primer notes) for ``count``
    primers from files long enough for primer and continuation, drawn across the split
    by ``seed`` piece by piece (``pieces``: each file's piece): every piece once in a
    seeded order, then again, each time its next performance (in a seeded order), so a
    piece with many performances counts no more than one with one; each primer at a
    seeded offset. The real continuation's notes start at 0 where the primer ends."""
    import numpy as np

    from midi_processor import cut_tokens, decode_midi, piece_seconds

    rng = np.random.default_rng(seed)
    files: dict[str, list[int]] = {}
    for i in range(len(split.names)):
        if piece_seconds(split.piece(i)) >= prime_s + cont_s + 1:
            files.setdefault(pieces[i], []).append(i)
    if not files:
        fail(f"no piece of the {SPLIT} split lasts {prime_s + cont_s + 1:g} s "
             "(lower --prime_seconds and --seconds)")
    names = sorted(files)
    turns = {name: rng.permutation(files[name]).tolist() for name in names}
    order: list[int] = []
    for round_ in range(math.ceil(count / len(names))):
        order += [turns[names[k]][round_ % len(turns[names[k]])]
                  for k in rng.permutation(len(names))]
    out = []
    for i in order[:count]:
        tokens = split.piece(i).tolist()
        offset = float(rng.uniform(0, piece_seconds(tokens) - prime_s - cont_s))
        head = cut_tokens(tokens, seconds=offset + prime_s)
        primer = cut_tokens(head, seconds=prime_s, from_end=True)
        notes = decode_midi(tokens).instruments[0].notes
        start = piece_seconds(head)
        real = [_shifted(n, -start, cont_s) for n in notes if start <= n.start < start + cont_s]
        before = [n for n in notes if start - prime_s <= n.start < start]
        out.append((split.names[i], primer, real, before))
    return out


def continuation_notes(tokens: list[int], primer_seconds: float, seconds: float) -> list:
    """The notes of a take's continuation (``tokens``: primer and continuation) that start
    in its first ``seconds``, from time 0, each ended by ``seconds`` at the latest. A note
    still sounding at the take's end lasts to it, as in the take's MIDI file: a drone held
    to the end counts as held."""
    from perceiver_music.api import notes_so_far

    return [_shifted(n, -primer_seconds, seconds) for n in notes_so_far(tokens)
            if primer_seconds <= n.start < primer_seconds + seconds]


def _shifted(note, by: float, until: float):
    """``note`` moved by ``by`` seconds and ended by ``until`` at the latest: real and
    generated continuations are measured over the same stretch (a real note may sound on
    past it, a generated one may never be released)."""
    import pretty_midi

    return pretty_midi.Note(note.velocity, note.pitch, note.start + by,
                            min(note.end + by, until))


def main() -> None:
    args = parse_constants(__file__, globals(), __doc__.split("\n\n")[0])
    ckpts = [c for c in args.ckpts.split(",") if c]  # as given: the report's labels
    runs = [r for r in args.runs.split(",") if r]
    if not ckpts and not runs:
        fail("nothing to evaluate: give --ckpts and/or --runs")
    for name in ("num_primers", "prime_seconds", "seconds", "batch_size"):
        if not getattr(args, name) > 0:
            fail(f"--{name} must be positive, got {getattr(args, name)}")
    if not args.temperature > 0:
        fail(f"--temperature must be positive, got {args.temperature}")
    if not 0 <= args.top_p <= 1:
        fail(f"--top_p must be in [0, 1] (0: off), got {args.top_p}")
    for name in ("release", "tonality"):
        if getattr(args, name) < 0:
            fail(f"--{name} must not be negative, got {getattr(args, name)}")
    for run in runs:
        if not (Path(run) / "metrics.csv").is_file():
            fail(f"{run}: no metrics.csv (give train.py run folders to --runs)")

    import torch
    from tqdm import tqdm

    from perceiver_music.api import PerceiverMusic
    from perceiver_music.checkpoint import CheckpointError
    from perceiver_music.data import DataError, load_split
    from perceiver_music.evaluation import (
        STATISTICS,
        difference_errors,
        differences_from_real,
        music_statistics,
        save_figure,
        split_loss,
        statistics_figure,
        summarise,
        training_curves_figure,
        unigram_loss,
        write_report,
    )

    out = Path(args.out)
    device = "cpu" if cpu_only(args.cpu) or not torch.cuda.is_available() else "cuda"
    report: dict = {"settings": vars(args), "split": args.split, "loss": {},
                    "statistics": {}, "continuations": {}}
    images: list[tuple[str, str]] = []
    start = time.perf_counter()
    if ckpts:
        try:
            split = load_split(Path(args.data_dir) / args.split)
        except DataError as exc:
            fail(str(exc))
        train = None  # the unigram baseline needs the training split; a test folder alone
        if (Path(args.data_dir) / "train").is_dir():  # (no train/) is evaluated without it
            try:
                train = load_split(Path(args.data_dir) / "train")
            except DataError as exc:
                fail(str(exc))
        models = {}
        for ckpt in ckpts:
            try:
                models[ckpt] = PerceiverMusic.from_pretrained(bundled(ckpt), device=device,
                                                              dtype=args.dtype)
            except (CheckpointError, ValueError) as exc:
                fail(str(exc))
        if train is not None:
            report["loss"]["unigram (training-data frequencies)"] = {
                "nats_per_token": unigram_loss(train.tokens, split.tokens),
                "tokens": len(split.tokens)}
        for ckpt, model in models.items():
            from perceiver_music.data import validation_windows

            windows = len(validation_windows(split, model.config.max_seq_len,
                                             model.config.cross_attn_seq_len)[0])
            with tqdm(total=windows, desc=f"loss {Path(ckpt).name}", unit="win") as bar:
                loss, count = split_loss(model.model, split, args.batch_size, bar.update)
            report["loss"][ckpt] = {"nats_per_token": loss, "tokens": count}

        pieces = piece_of_each(Path(args.data_dir), args.split, split.names)
        windows = primer_windows(split, pieces, args.num_primers, args.prime_seconds,
                                 args.seconds, args.seed)
        groups = {"primers": [music_statistics(p, args.prime_seconds)
                              for _, _, _, p in windows],
                  "real continuations": [music_statistics(r, args.seconds, p,
                                                          args.prime_seconds)
                                         for _, _, r, p in windows]}
        with tqdm(total=len(models) * len(windows), desc="continuations", unit="take") as bar:
            for ckpt, model in models.items():
                rows, takes = [], []
                for k, (name, primer, _, before) in enumerate(windows):
                    take = model.generate(primer, seconds=args.seconds, prime_seconds=0,
                                          temperature=args.temperature,
                                          top_p=args.top_p or None, release=args.release,
                                          tonality=args.tonality,
                                          seed=args.seed + k,
                                          stop_at_end=False)
                    notes = continuation_notes(take.tokens(0), take.primer_seconds,
                                               args.seconds)
                    rows.append(music_statistics(notes, args.seconds, before,
                                                 args.prime_seconds))
                    takes.append({"piece": name, "seconds": take.seconds[0],
                                  "tokens": len(take.continuations[0])})
                    bar.update(1)
                groups[ckpt] = rows
                report["continuations"][ckpt] = takes
        report["statistics"] = {name: summarise(rows) for name, rows in groups.items()}
        report["difference_from_real"] = differences_from_real(report["statistics"])
        report["difference_standard_error"] = difference_errors(groups)
        report["statistics_per_take"] = groups
        out.mkdir(parents=True, exist_ok=True)
        save_figure(statistics_figure(groups), out / "statistics.png")
        images.append(("statistics.png", f"Music statistics of {len(windows)} stretches per "
                       f"group: the primers ({args.prime_seconds:g} s), the pieces' real "
                       f"continuations and each model's ({args.seconds:g} s)"))
    if runs:
        out.mkdir(parents=True, exist_ok=True)
        save_figure(training_curves_figure({r: Path(r) / "metrics.csv" for r in runs}),
                    out / "training_curves.png")
        images.append(("training_curves.png", "Training curves from metrics.csv"))
    report["seconds"] = round(time.perf_counter() - start, 1)
    replacing = (out / "report.json").exists()
    write_report(out, report, images)
    for stale in {"statistics.png", "training_curves.png"} - {name for name, _ in images}:
        (out / stale).unlink(missing_ok=True)  # an earlier report's, which this one lacks
    for name, loss in report["loss"].items():
        print(printable(f"{name}: {loss['nats_per_token']:.4f} nats/token on {args.split}"))
    real = report["statistics"].get("real continuations", {})
    for name, deltas in report.get("difference_from_real", {}).items():
        for stat, delta in deltas.items():
            label = STATISTICS[stat][0]
            error = report["difference_standard_error"][name][stat]
            spread = f" +- {error:.2g}" if math.isfinite(error) else ""  # none from one pair
            print(printable(f"{name}: {label}: {report['statistics'][name][stat]['mean']:.3g}, "
                            f"real {real[stat]['mean']:.3g} ({delta:+.3g}{spread})"))
    print(f"wrote {out / 'report.html'} and {out / 'report.json'} "
          f"({report['seconds']:.0f} s)" + (", replacing the earlier report there" if
                                            replacing else ""))


if __name__ == "__main__":
    run_script(main, "interrupted: the report was not written")
