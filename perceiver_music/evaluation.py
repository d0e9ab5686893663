"""Evaluation: loss over every window of a split, music statistics, plots, a report page.

Music statistics describe a stretch of piano music by what a listener hears in it: how
busy it is (notes per second, polyphony), where it lies (pitch range, mean pitch), how
loud (velocity), how the notes are held (median duration, share held over 4 s, which
catches the hanging notes an undertrained model leaves), and whether it stays in the
primer's key (correlation of its pitch-class histogram with the primer's). evaluate.py
compares model continuations of test-split primers with the pieces' real continuations
and with the primers themselves.
"""

from __future__ import annotations

import csv
import html
import io
import json
import math
import os
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pretty_midi

from midi_processor import write_atomic
from perceiver_music.render import whole_number_ticks

STATISTICS = {  # name: (label, unit) in the order of the report
    "notes_per_s": ("notes per second", "notes/s"),
    "polyphony": ("mean polyphony", "sounding notes"),
    "pitch_range": ("pitch range", "semitones"),
    "mean_pitch": ("mean pitch", "MIDI pitch"),
    "velocity": ("mean velocity", "MIDI velocity"),
    "median_duration": ("median note duration", "s"),
    "held_over_4s": ("notes held over 4 s", "share"),
    "pitch_class_correlation": ("pitch-class correlation with the primer", "Pearson r"),
    "density_vs_primer": ("notes per second against the primer's", "ratio"),
    "top_pitch_share": ("notes on the most frequent pitch", "share"),
    "repeated_4grams": ("4-note pitch patterns heard earlier in the stretch", "share"),
}
HELD_SECONDS = 4.0
PATTERN = 4  # notes in a pitch pattern for `repeated_4grams`


def repeated_patterns(notes: Sequence[pretty_midi.Note], size: int = PATTERN) -> float:
    """Share of the ``size``-note pitch patterns (notes in onset order) that already
    occurred earlier in the same notes: the loops and repeated figures of a model that
    "repeats the same note over and over". NaN for fewer than ``size`` notes."""
    pitches = [n.pitch for n in sorted(notes, key=lambda n: (n.start, n.pitch))]
    grams = [tuple(pitches[i : i + size]) for i in range(len(pitches) - size + 1)]
    if not grams:
        return math.nan
    seen: set[tuple[int, ...]] = set()
    repeats = 0
    for gram in grams:
        repeats += gram in seen
        seen.add(gram)
    return repeats / len(grams)


def pitch_class_histogram(notes: Sequence[pretty_midi.Note]) -> np.ndarray:
    """Share of the notes' total duration in each of the 12 pitch classes (C first)."""
    hist = np.zeros(12)
    for n in notes:
        hist[n.pitch % 12] += n.end - n.start
    return hist / hist.sum() if hist.sum() > 0 else hist


def music_statistics(notes: Sequence[pretty_midi.Note], seconds: float,
                     reference: Sequence[pretty_midi.Note] | None = None,
                     reference_seconds: float | None = None) -> dict[str, float]:
    """`STATISTICS` of ``notes`` over a stretch of ``seconds``; the pitch-class correlation
    is with ``reference`` (the primer) and NaN without one or when either is silent or
    holds a single pitch class; the density ratio is against the reference's notes over
    ``reference_seconds`` (NaN without them). Empty ``notes`` give zeros and NaN."""
    density = math.nan
    if reference and reference_seconds:
        density = (len(notes) / seconds) / (len(reference) / reference_seconds)
    if not notes:
        return {name: (0.0 if name in ("notes_per_s", "polyphony") else
                       density if name == "density_vs_primer" else math.nan)
                for name in STATISTICS}
    durations = np.array([n.end - n.start for n in notes])
    pitches = np.array([n.pitch for n in notes])
    correlation = math.nan
    if reference:
        a, b = pitch_class_histogram(notes), pitch_class_histogram(reference)
        if a.std() > 0 and b.std() > 0:
            correlation = float(np.corrcoef(a, b)[0, 1])
    return {
        "notes_per_s": len(notes) / seconds,
        "polyphony": float(durations.sum() / max(
            max(n.end for n in notes) - min(n.start for n in notes), 1e-9)),
        "pitch_range": float(pitches.max() - pitches.min()),
        "mean_pitch": float(pitches.mean()),
        "velocity": float(np.mean([n.velocity for n in notes])),
        "median_duration": float(np.median(durations)),
        "held_over_4s": float((durations > HELD_SECONDS).mean()),
        "pitch_class_correlation": correlation,
        "density_vs_primer": density,
        "top_pitch_share": float(np.bincount(pitches).max() / len(pitches)),
        "repeated_4grams": repeated_patterns(notes),
    }


def differences_from_real(stats: Mapping[str, Mapping[str, Mapping[str, float]]],
                          real: str = "real continuations") -> dict[str, dict[str, float]]:
    """For each group of ``stats`` (`summarise` output by group) but the primers and the
    real continuations: each statistic's mean minus the real continuations' mean, the
    figure that says how far a model is from the music it continues."""
    return {group: {name: values[name]["mean"] - stats[real][name]["mean"]
                    for name in STATISTICS}
            for group, values in stats.items() if group not in (real, "primers")}


def difference_errors(groups: Mapping[str, Sequence[Mapping[str, float]]],
                      real: str = "real continuations") -> dict[str, dict[str, float]]:
    """For each model group of per-take ``groups`` (take k of every group continues primer
    k): the standard error of each statistic's model-minus-real difference, from the takes'
    paired differences (std / sqrt(n), pairs with a NaN left out; NaN under two pairs).
    It says which differences a report of a few takes can resolve: pitch-class correlation
    varies so much from piece to piece that 16 takes leave about +-0.1."""
    out = {}
    for group, rows in groups.items():
        if group in (real, "primers"):
            continue
        out[group] = {}
        for name in STATISTICS:
            d = np.array([r[name] - t[name] for r, t in zip(rows, groups[real], strict=True)],
                         dtype=float)
            d = d[np.isfinite(d)]
            out[group][name] = float(d.std(ddof=1) / math.sqrt(len(d))) if len(d) > 1 \
                else math.nan
    return out


def summarise(rows: Sequence[Mapping[str, float]]) -> dict[str, dict[str, float]]:
    """Mean, standard deviation and count (NaN ignored) of each statistic over ``rows``."""
    out = {}
    for name in STATISTICS:
        values = np.array([r[name] for r in rows], dtype=float)
        values = values[np.isfinite(values)]
        out[name] = {"mean": float(values.mean()) if len(values) else math.nan,
                     "std": float(values.std()) if len(values) else math.nan,
                     "n": len(values)}
    return out


def split_loss(model: Any, split: Any, batch_size: int = 8,
               progress: Callable[[int], object] | None = None) -> tuple[float, int]:
    """Mean loss in nats per token over every fixed window of ``split`` (as train.py
    validates), and the number of target tokens."""
    from .data import validation_windows
    from .model import window_losses

    tokens, mask = validation_windows(split, model.max_seq_len, model.cross_attn_seq_len)
    total, count = window_losses(model, tokens, mask, batch_size, progress)
    return total / count, count


def unigram_loss(train_tokens: np.ndarray, tokens: np.ndarray, vocab: int = 390) -> float:
    """Cross-entropy (nats/token) on ``tokens`` of a model that always predicts the
    training data's token frequencies: the floor any trained model must beat."""
    p = np.bincount(train_tokens, minlength=vocab) / len(train_tokens)
    q = np.bincount(tokens, minlength=vocab) / len(tokens)
    return float(-(q[q > 0] * np.log(np.maximum(p[q > 0], 1e-12))).sum())


# ---------------------------------------------------------------------------------------
# plots


def statistics_figure(groups: Mapping[str, Sequence[Mapping[str, float]]]) -> Any:
    """One panel per statistic: each group's values (primers, real continuations, each
    checkpoint's continuations) as dots with their mean as a bar."""
    import matplotlib
    from matplotlib.figure import Figure

    columns = 4
    rows = -(-len(STATISTICS) // columns)
    fig = Figure(figsize=(13, 3.25 * rows), dpi=110, layout="constrained")
    axes = fig.subplots(rows, columns).flatten()
    for ax in axes[len(STATISTICS):]:  # a grid holds more panels than statistics
        fig.delaxes(ax)
    axes = axes[: len(STATISTICS)]
    names = list(groups)
    colours = matplotlib.colormaps["tab10"](np.arange(len(names)) % 10)
    rng = np.random.default_rng(0)
    for ax, (stat, (label, unit)) in zip(axes, STATISTICS.items(), strict=True):
        for i, name in enumerate(names):
            values = np.array([r[stat] for r in groups[name]], dtype=float)
            values = values[np.isfinite(values)]
            if len(values):
                ax.scatter(i + rng.uniform(-0.15, 0.15, len(values)), values, s=12,
                           color=colours[i], alpha=0.6)
                ax.hlines(values.mean(), i - 0.3, i + 0.3, color=colours[i], lw=2.5)
        ax.set_title(label, fontsize=10)
        ax.set_ylabel(unit, fontsize=9)
        ax.set_xticks(range(len(names)), [_short(n) for n in names], rotation=20,
                      fontsize=8, ha="right")
        ax.grid(axis="y", color="0.9")
    fig.suptitle("Music statistics: each dot one stretch of music, the bar its group's mean",
                 fontsize=11)
    return fig


def training_curves_figure(runs: Mapping[str, Path]) -> Any:
    """Training and validation loss (nats/token) and the learning rate against the step,
    from each run's metrics.csv."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(12, 4.5), dpi=110, layout="constrained")
    loss_ax, lr_ax = fig.subplots(1, 2, width_ratios=(2, 1))
    for i, (name, path) in enumerate(runs.items()):
        rows = read_metrics(path)
        colour = f"C{i}"
        train = [(r["step"], r["train_loss"]) for r in rows if r["train_loss"] is not None]
        val = [(r["step"], r["val_loss"]) for r in rows if r["val_loss"] is not None]
        lr = [(r["step"], r["lr"]) for r in rows if r["train_loss"] is not None]
        if train:
            loss_ax.plot(*zip(*train, strict=True), color=colour, alpha=0.45, lw=1,
                         label=f"{_short(name)}: training")
            lr_ax.plot(*zip(*lr, strict=True), color=colour, label=_short(name))
        if val:
            loss_ax.plot(*zip(*val, strict=True), color=colour, marker="o", ms=4, lw=2,
                         label=f"{_short(name)}: validation")
    loss_ax.set(xlabel="optimizer step", ylabel="loss (nats/token)", title="loss")
    lr_ax.set(xlabel="optimizer step", ylabel="learning rate", title="learning rate")
    for ax in (loss_ax, lr_ax):
        whole_number_ticks(ax.xaxis)
        ax.grid(color="0.9")
        if ax.lines:
            ax.legend(fontsize=8)
    return fig


def read_metrics(path: Path) -> list[dict[str, float | None]]:
    """Rows of a train.py metrics.csv: step, train_loss, val_loss, lr, tokens_per_s,
    seconds (None where a row leaves a column empty)."""
    with open(path, newline="") as f:
        return [{k: (float(v) if v not in ("", None) else None) for k, v in row.items()}
                for row in csv.DictReader(f)]


def save_figure(fig: Any, path: Path) -> None:
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    write_atomic(path, buf.getvalue())


# ---------------------------------------------------------------------------------------
# the report


def write_report(folder: Path, report: dict[str, Any], images: Sequence[tuple[str, str]]) -> None:
    """report.json (``report``; a figure that cannot be computed, NaN here, is null there,
    so that strict JSON readers take the file) and report.html (its tables and ``images``:
    (file name, caption) pairs of PNGs in ``folder``), each written atomically."""
    write_atomic(folder / "report.json", (json.dumps(_nulls(report), indent=2, default=_plain,
                                                     allow_nan=False) + "\n").encode())
    rows = []
    for name, loss in report.get("loss", {}).items():
        rows.append(f"<tr><td>{html.escape(name)}</td><td>{_fmt(loss['nats_per_token'])}"
                    f"</td><td>{loss.get('tokens', '')}</td></tr>")
    stats = report.get("statistics", {})
    groups = list(stats)
    head = "".join(f"<th>{html.escape(_short(g))}</th>" for g in groups)
    deltas = report.get("difference_from_real", {})
    errors = report.get("difference_standard_error", {})

    def cell(group: str, name: str) -> str:
        text = f"{_fmt(stats[group][name]['mean'])} &plusmn; {_fmt(stats[group][name]['std'])}"
        if group in deltas:
            delta = deltas[group][name]
            error = errors.get(group, {}).get(name, math.nan)
            text += (f" <b>({'n/a' if not math.isfinite(delta) else f'{delta:+.3g}'}"
                     f"{f' &plusmn; {error:.2g}' if math.isfinite(error) else ''} vs real)</b>")
        return f"<td>{text}</td>"

    body = "".join(
        f"<tr><td>{html.escape(label)} ({html.escape(unit)})</td>"
        + "".join(cell(g, name) for g in groups) + "</tr>"
        for name, (label, unit) in STATISTICS.items())
    figures = "".join(
        f'<figure><img src="{html.escape(src)}" alt="{html.escape(cap)}">'
        f"<figcaption>{html.escape(cap)}</figcaption></figure>" for src, cap in images)
    settings = html.escape(json.dumps(report.get("settings", {}), indent=2, default=_plain))
    page = f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>Evaluation report</title>
<style>body{{font-family:sans-serif;max-width:1200px;margin:2em auto;padding:0 1em}}
table{{border-collapse:collapse;margin:1em 0}}td,th{{border:1px solid #ccc;padding:4px 10px;
text-align:right}}td:first-child{{text-align:left}}img{{max-width:100%}}
figcaption{{color:#555}}</style></head><body>
<h1>Evaluation report</h1>
<h2>Loss on the {html.escape(str(report.get("split", "test")))} split</h2>
<table id="loss"><tr><th>model</th><th>nats per token</th><th>target tokens</th></tr>
{"".join(rows)}</table>
<h2>Music statistics (mean &plusmn; standard deviation; in bold, a model's mean minus the
real continuations' &plusmn; its standard error, from the takes paired by primer)</h2>
<table id="statistics"><tr><th>statistic</th>{head}</tr>{body}</table>
{figures}
<h2>Settings</h2><pre>{settings}</pre>
</body></html>
"""
    write_atomic(folder / "report.html", page.encode())


def _short(name: str) -> str:
    return name if len(name) <= 28 else "..." + name[-25:]


def _fmt(value: float) -> str:
    return "n/a" if value is None or not math.isfinite(value) else f"{value:.3g}"


def _nulls(value: Any) -> Any:
    """``value`` with every non-finite float (in dicts and lists, at any depth) as None."""
    if isinstance(value, dict):
        return {k: _nulls(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_nulls(v) for v in value]
    if isinstance(value, float | np.floating) and not math.isfinite(value):
        return None
    return value


def _plain(value: Any) -> Any:
    if isinstance(value, os.PathLike):
        return str(value)
    if isinstance(value, np.generic):
        return value.item()
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")
