"""What the app's Data and Runs tabs show: a prep.py output folder, indexed once, and the
training runs under a folder.

- `index_data` reads a data folder's manifest and counts, for every piece, its notes per
  pitch, its velocity events and its token types. The counts are kept in
  ``.browse-index.npz`` in the folder (by each file's sha256 and output), so a folder of
  10,000 pieces is read once and then opens in a moment.
- `DataIndex.table` pages and filters the pieces (split, composer, title, group, length,
  tokens; failed files with their reasons); `DataIndex.figure` draws durations, notes/s,
  pitches, velocities and token-type shares per split; `DataIndex.piece` gives one
  piece's notes, tokens and text.
- `find_runs`, `run_summary` and `curves_figure`: the runs under a folder (those with a
  metrics.csv), their best validation loss and evaluate.py report, their loss curves on
  one plot.
"""

from __future__ import annotations

import contextlib
import csv
import io
import json
import math
import os
import time
import unicodedata
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from midi_processor import write_atomic
from midi_processor.vocab import END, NOTE_OFF, TIME_SHIFT, VELOCITY
from perceiver_music.render import whole_number_ticks

INDEX_NAME = ".browse-index.npz"
SPLITS = ("train", "val", "test")
KINDS = ("note-on", "note-off", "time shift", "velocity")
COLUMNS = ("split", "composer", "title", "group", "file", "minutes", "tokens", "status")


class BrowseError(Exception):
    """A folder cannot be browsed; the message says which and why."""


def _title(entry: dict) -> tuple[str, str]:
    """(composer, title) of a manifest entry: a MAESTRO listing's, which prep.py records
    (an older manifest has only the group "composer / title"). In a folder the composer
    is the path's first folder (after the input folder's name, when prep.py read several:
    "asap/Bach/..."), and the title the piece its group names
    ("folder:Bach/Fugue/bwv_848" -> "Fugue bwv 848", "title:Espana_Opus_165" -> "Espana
    Opus 165"), or the file's name when the group is a bare folder."""
    if entry.get("title"):
        return str(entry.get("composer") or ""), str(entry["title"])
    group = str(entry.get("group") or entry["path"])
    if " / " in group:
        composer, title = group.split(" / ", 1)
        return composer, title
    kind, _, piece = group.rpartition(":")
    dataset = kind.rsplit("/", 1)[0] + "/" if "/" in kind else ""
    parts = entry["path"].removeprefix(dataset).split("/")
    composer = parts[0] if len(parts) > 1 else ""
    if not kind:
        return composer, Path(parts[-1]).stem.replace("_", " ")
    words = piece.split("/")
    if len(words) > 1 and words[0] == composer:
        words = words[1:]
    return composer, " ".join(words).replace("_", " ")


_LETTERS = str.maketrans({"ø": "o", "ł": "l", "đ": "d", "æ": "ae", "œ": "oe", "ı": "i"})


def _folded(text: str) -> str:
    """``text`` in lower case without accents, for search (also the letters that Unicode
    does not write as a letter and an accent: ø, ł...)."""
    return "".join(c for c in unicodedata.normalize("NFKD", text.casefold().translate(
        _LETTERS)) if not unicodedata.combining(c))


@dataclass
class DataIndex:
    """A prep.py output folder: its manifest entries (with composer and title) and, for
    each, its counts of notes per pitch (128), velocity events per bin (32) and tokens per
    kind (`KINDS`); a failed file counts zeros."""

    folder: Path
    entries: list[dict]
    pitch: np.ndarray
    velocity: np.ndarray
    kinds: np.ndarray

    def table(self, split: str = "all", query: str = "", page: int = 0,
              per_page: int = 50) -> tuple[list[list[Any]], int]:
        """One page of rows (`COLUMNS`) of the pieces in ``split`` ("all", a split or
        "failed") whose path, group, composer or title holds ``query`` (any case, with or
        without accents: "dvorak" finds Dvořák); and how many rows match in all."""
        q = _folded(query.strip())
        rows = []
        for e in self.entries:
            if split == "failed" and e["status"] == "ok" or split not in ("all", "failed") and (
                    e["status"] != "ok" or e["split"] != split):
                continue
            text = _folded(f"{e['path']} {e.get('group', '')} {e['composer']} {e['title']}")
            if q and q not in text:
                continue
            status = "ok" if e["status"] == "ok" else f"failed: {e.get('error')}"
            rows.append([e["split"], e["composer"], e["title"], e.get("group", ""), e["path"],
                         round((e.get("seconds") or 0) / 60, 2), e.get("tokens") or 0,
                         status])
        start = max(0, page) * per_page
        return rows[start:start + per_page], len(rows)

    def figure(self) -> Any:
        """A matplotlib Figure: durations and notes/s of the pieces, the share of notes
        on each pitch and of velocity events in each bin, and the token-type shares, each
        per split, with axes and labels."""
        from matplotlib.figure import Figure

        fig = Figure(figsize=(14, 7.5), dpi=100, layout="constrained")
        axes = fig.subplots(2, 3).flatten()
        ok = [i for i, e in enumerate(self.entries) if e["status"] == "ok"]
        for split in SPLITS:
            rows = [i for i in ok if self.entries[i]["split"] == split]
            if not rows:
                continue
            seconds = np.array([self.entries[i]["seconds"] for i in rows], dtype=float)
            notes = np.array([self.entries[i]["notes"] for i in rows], dtype=float)
            label = f"{split} ({len(rows)})"
            axes[0].hist(seconds / 60, bins=30, histtype="step", label=label)
            axes[1].hist(notes / np.maximum(seconds, 1e-9), bins=30, histtype="step",
                         label=label)
            pitch = self.pitch[rows].sum(0)
            axes[2].plot(np.arange(128), pitch / max(pitch.sum(), 1), label=label)
            velocity = self.velocity[rows].sum(0)
            axes[3].plot(np.arange(32) * 4 + 2, velocity / max(velocity.sum(), 1),
                         label=label)
        shares = np.array([self.kinds[[i for i in ok if self.entries[i]["split"] == s]]
                           .sum(0) for s in SPLITS], dtype=float)
        shares /= np.maximum(shares.sum(1, keepdims=True), 1)
        bottom = np.zeros(len(SPLITS))
        for k, kind in enumerate(KINDS):
            axes[4].bar(SPLITS, shares[:, k], bottom=bottom, label=kind)
            bottom += shares[:, k]
        titles = [("duration of the pieces", "minutes", "pieces"),
                  ("density", "notes per second", "pieces"),
                  ("pitches", "MIDI pitch (60 = C4)", "share of notes"),
                  ("velocities", "velocity", "share of velocity events"),
                  ("token types", "split", "share of tokens")]
        for ax in axes[:2]:  # counts of pieces: whole numbers
            whole_number_ticks(ax.yaxis)
        for ax, (title, x, y) in zip(axes, titles, strict=False):
            ax.set(title=title, xlabel=x, ylabel=y)
            ax.legend(fontsize=8, loc="upper left" if ax is axes[4] else "best",
                      bbox_to_anchor=(1.0, 1.0) if ax is axes[4] else None)
        failed = len(self.entries) - len(ok)
        axes[5].axis("off")
        axes[5].text(0, 0.5, f"{self.folder}\n{len(ok)} pieces, "
                     f"{sum(self.entries[i]['seconds'] for i in ok) / 3600:.1f} hours, "
                     f"{sum(self.entries[i]['tokens'] for i in ok):,} tokens\n"
                     f"{failed} failed file(s)", fontsize=11, va="center")
        return fig

    def piece(self, path: str) -> tuple[dict, np.ndarray]:
        """The manifest entry of the piece recorded as ``path`` and its tokens."""
        from .data import DataError, load_token_file

        entry = next((e for e in self.entries if e["path"] == path), None)
        if entry is None:
            raise BrowseError(f"no piece {path!r} in {self.folder}")
        if entry["status"] != "ok":
            raise BrowseError(f"{path} failed in prep.py: {entry.get('error')}")
        try:
            return entry, load_token_file(self.folder / entry["output"])
        except DataError as exc:
            raise BrowseError(str(exc)) from None


def _counts(tokens: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    ids = tokens[tokens < END]
    pitch = np.bincount(ids[ids < NOTE_OFF], minlength=128)
    velocity = np.bincount(ids[ids >= VELOCITY] - VELOCITY, minlength=32)
    kinds = np.bincount(np.searchsorted([NOTE_OFF, TIME_SHIFT, VELOCITY], ids, side="right"),
                        minlength=4)
    return pitch, velocity, kinds


def index_data(folder: str | os.PathLike,
               progress: Callable[[int, int], object] | None = None) -> DataIndex:
    """Index a prep.py output folder (see the module docstring); ``progress(done, total)``
    follows the pieces read. Raises BrowseError when it is not one."""
    from .data import DataError, load_token_file

    folder = Path(folder)
    manifest = folder / "manifest.jsonl"
    try:
        lines = manifest.read_text(encoding="utf-8").splitlines()
        entries = [json.loads(line) for line in lines if line.strip()]
    except FileNotFoundError:
        raise BrowseError(f"{folder}: no manifest.jsonl here; is it a prep.py output "
                          "folder? (python prep.py --input MIDI_FOLDER --output "
                          f"{folder})") from None
    except (OSError, ValueError) as exc:
        raise BrowseError(f"{manifest}: unreadable ({exc})") from None
    for e in entries:
        e["composer"], e["title"] = _title(e)
    keys = [f"{e.get('sha256')}:{e.get('output')}" for e in entries]
    cached: dict[str, int] = {}
    try:
        with np.load(folder / INDEX_NAME) as old:
            stored = {name: old[name] for name in ("keys", "pitch", "velocity", "kinds")}
        cached = {str(k): i for i, k in enumerate(stored["keys"])}
    except (OSError, ValueError, KeyError):
        stored = {}
    pitch = np.zeros((len(entries), 128), np.int64)
    velocity = np.zeros((len(entries), 32), np.int64)
    kinds = np.zeros((len(entries), 4), np.int64)
    fresh = 0
    for i, (e, key) in enumerate(zip(entries, keys, strict=True)):
        if e["status"] == "ok" and key in cached:
            j = cached[key]
            pitch[i], velocity[i], kinds[i] = (stored["pitch"][j], stored["velocity"][j],
                                               stored["kinds"][j])
        elif e["status"] == "ok":
            try:
                pitch[i], velocity[i], kinds[i] = _counts(
                    load_token_file(folder / e["output"]))
            except DataError as exc:
                e["status"], e["error"] = "failed", f"unreadable output: {exc}"
            fresh += 1
        if progress is not None and (i % 200 == 0 or i == len(entries) - 1):
            progress(i + 1, len(entries))
    if fresh:
        _save_index(folder, keys, pitch, velocity, kinds)
    return DataIndex(folder, entries, pitch, velocity, kinds)


def _save_index(folder: Path, keys: Sequence[str], *arrays: np.ndarray) -> None:
    """Write the counts next to the manifest (atomically); a read-only folder keeps none."""
    buf = io.BytesIO()
    np.savez(buf, keys=np.array(keys), pitch=arrays[0], velocity=arrays[1], kinds=arrays[2])
    with contextlib.suppress(OSError):
        write_atomic(folder / INDEX_NAME, buf.getvalue())


# ---------------------------------------------------------------------------------------
# training runs


def find_runs(root: str | os.PathLike) -> list[Path]:
    """The training runs in ``root`` or one level below it (folders with a metrics.csv),
    newest first."""
    root = Path(root)
    found = [p.parent for pattern in ("metrics.csv", "*/metrics.csv", "*/*/metrics.csv")
             for p in root.glob(pattern)]
    return sorted(set(found), key=lambda p: (p / "metrics.csv").stat().st_mtime,
                  reverse=True)


def read_metrics(run: Path) -> dict[str, np.ndarray]:
    """metrics.csv as columns: step, train_loss, val_loss, lr, tokens_per_s, seconds (an
    empty cell is NaN)."""
    columns: dict[str, list[float]] = {}
    try:
        with open(run / "metrics.csv", newline="", encoding="utf-8") as f:
            for row in csv.DictReader(f):
                for key, value in row.items():
                    try:
                        number = float(value) if value not in ("", None) else math.nan
                    except ValueError:
                        number = math.nan
                    columns.setdefault(str(key), []).append(number)
    except OSError:
        return {}
    return {key: np.array(values) for key, values in columns.items()}


def run_name(run: Path, root: Path) -> str:
    """How the Runs tab names a run: its path below ``root`` (its own name if it is)."""
    return str(run.relative_to(root)) if run != root else run.name


def run_report(run: Path) -> Path | None:
    """evaluate.py's report.json for this run, if one is in the run folder or its eval/."""
    return next((p for p in (run / "report.json", run / "eval" / "report.json")
                 if p.is_file()), None)


def run_summary(run: Path, root: Path) -> list[Any]:
    """One row of the runs table: name, steps, best validation loss (at step), last
    training loss, minutes of training, updated (minutes ago; "running" within 2
    minutes), and the report's loss on its split when evaluate.py has written one."""
    m = read_metrics(run)
    step, val, train = (m.get(k, np.array([])) for k in ("step", "val_loss", "train_loss"))
    best = ""
    if np.isfinite(val).any():
        i = int(np.nanargmin(val))
        best = f"{val[i]:.3f} (step {step[i]:.0f})"
    last_train = f"{train[np.isfinite(train)][-1]:.3f}" if np.isfinite(train).any() else ""
    seconds = m.get("seconds", np.array([]))
    minutes = f"{np.nanmax(seconds) / 60:.1f}" if np.isfinite(seconds).any() else ""
    age = (time.time() - (run / "metrics.csv").stat().st_mtime) / 60
    report = ""
    if (path := run_report(run)) is not None:
        try:
            data = json.loads(path.read_text())
            report = "; ".join(f"{Path(k).name}: {v['nats_per_token']:.3f}"
                               for k, v in data.get("loss", {}).items()
                               if "unigram" not in k)
            report = f"{data.get('split', '')} {report}".strip()
        except (OSError, ValueError, AttributeError, KeyError, TypeError):
            report = f"{path} unreadable"
    steps = int(np.nanmax(step)) if np.isfinite(step).any() else 0
    return [run_name(run, root), steps, best, last_train, minutes,
            "running" if age < 2 else f"{age:.0f} min ago", report]


def curves_figure(runs: Sequence[Path], root: Path) -> Any:
    """Training (line) and validation (points) loss against step of ``runs``, on one
    plot, with axes and a legend."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(10, 4.5), dpi=100, layout="constrained")
    ax = fig.add_subplot()
    for k, run in enumerate(runs):
        m = read_metrics(run)
        colour = f"C{k % 10}"
        name = run_name(run, root)
        step = m.get("step", np.array([]))
        for key, style in (("train_loss", "-"), ("val_loss", "o-")):
            y = m.get(key, np.array([]))
            keep = np.isfinite(y)
            if keep.any():
                ax.plot(step[keep], y[keep], style, color=colour, markersize=3,
                        alpha=0.6 if key == "train_loss" else 1.0,
                        label=f"{name}: {'training' if key == 'train_loss' else 'validation'}")
    ax.set(title="loss per token", xlabel="step", ylabel="nats per token")
    whole_number_ticks(ax.xaxis)
    if runs:
        ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    return fig
