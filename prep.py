"""MIDI files -> token data for train.py: OUTPUT/{train,val,test}/*.pickle + manifest.jsonl.

    python prep.py --input maestro-v3.0.0 --output data   # MAESTRO v3: splits from its CSV/JSON
    python prep.py --input my_midi --val_share 0.1        # any folder: split by piece
    python prep.py --input asap,piano-midi-de             # several folders, each split alone

Each piece becomes one pickled list of token ids ending with END (the original scripts'
format). A folder other than MAESTRO is split by a hash of each file's group, the piece it
performs (GROUP_BY), so that performances of one piece never straddle train, val and test.
OUTPUT/manifest.jsonl records every source file: split, group (and a MAESTRO listing's
composer and title), status, error, notes, tokens, seconds, the sha256 of its bytes and its
output file. Bad files are recorded as
failed and never stop the run. Results are appended to the manifest as they arrive, so a
rerun skips every file whose bytes are unchanged and resumes an interrupted run; the end of
a run rewrites the manifest in path order and removes leftovers, so the output does not
depend on how often the run was interrupted. Files the manifest records that are no longer
in the input (another input given the same OUTPUT, or files deleted) stop the run before
any work: their token files go only with PRUNE. With several input folders, each is split as
it would be alone and its files are recorded under its name ("asap/Bach/...").
"""

from __future__ import annotations

import csv
import hashlib
import json
import multiprocessing
import os
import pickle
import signal
import sys
import time
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from contextlib import closing
from functools import partial
from pathlib import Path
from typing import NamedTuple

from tqdm import tqdm

from midi_processor import (
    NOTE_OFF,
    MidiError,
    midi_files,
    piece_seconds,
    read_midi,
    write_atomic,
)
from midi_processor.core import encode_notes
from perceiver_music.cli import (
    check_writable,
    fail,
    given_options,
    os_error_message,
    parse_constants,
    printable,
    run_script,
)

INPUT = "maestro-v3.0.0"  # input folder(s), comma-separated: MAESTRO v3 or any MIDI folder
OUTPUT = "data"  # output folder: train/, val/, test/ pickles and manifest.jsonl
WORKERS = os.cpu_count() or 1  # worker processes (1: encode in this process)
VAL_SHARE = 0.05  # share of pieces for val/ (not MAESTRO: split by a hash of the group)
TEST_SHARE = 0.05  # share of pieces for test/ (not MAESTRO: split by a hash of the group)
GROUP_BY = "auto"  # files of one piece share a split: auto, folder, file, or a metadata.csv column
MAX_SECONDS = 4 * 3600.0  # a piece longer than this is recorded as failed (absurd tempo/ticks)
FORCE = False  # re-encode every file, also those unchanged since the last run
PRUNE = False  # remove the token files of recorded files no longer in the input (else: refused)

_SPLITS = ("train", "val", "test")
_MAESTRO_SPLITS = {"train": "train", "validation": "val", "test": "test"}
_LISTINGS = ("maestro-v*.csv", "maestro-v*.json")  # MAESTRO v1-v3 (the CSV first)
_MANIFEST = "manifest.jsonl"
_FAILURES_SHOWN = 10
_MAX_NAME_BYTES = 200  # + ".NAME.xxxxxxxx.tmp" while writing stays under 255


class OutputError(Exception):
    """Writing to the output folder failed (disk full, read-only...): stops the run."""


class Job(NamedTuple):
    """One source file to encode: its path as the manifest records it (relative to the
    input folder, after the folder's name when there are several), the file, its split, its
    output file relative to the output folder, its manifest entry from an earlier run, and
    its group and, from a MAESTRO listing, the piece's composer and title."""

    path: str
    source: Path
    split: str
    output: str
    previous: dict | None
    group: str = ""
    piece: tuple[str, str] = ("", "")


def find_listing(root: Path) -> Path | None:
    """The MAESTRO listing in ``root`` (the newest version's, its CSV before its JSON), or
    None."""
    found = [f for pattern in _LISTINGS for f in root.glob(pattern)]
    return max(found, key=lambda f: (f.stem, f.suffix == ".csv"), default=None)


def maestro_splits(listing: Path) -> dict[str, tuple[str, str, str]]:
    """MAESTRO's relative MIDI path -> (split, composer, title) from its ``listing`` (a CSV,
    or JSON mapping column -> {row -> value}). A file listed twice in two splits fails."""
    try:
        if listing.suffix == ".csv":  # utf-8-sig: a CSV saved by Excel starts with a BOM
            with open(listing, newline="", encoding="utf-8-sig") as f:
                rows = [(r["midi_filename"], r["split"], r.get("canonical_composer") or "",
                         r.get("canonical_title") or "") for r in csv.DictReader(f)]
        else:
            table = json.loads(listing.read_text(encoding="utf-8"))
            if isinstance(table, list):  # v1, v2: a list of rows
                table = {c: {str(i): row.get(c) for i, row in enumerate(table)}
                         for c in ("midi_filename", "split", "canonical_composer",
                                   "canonical_title")}
            files, splits = table["midi_filename"], table["split"]
            composers = table.get("canonical_composer", {})
            titles = table.get("canonical_title", {})
            rows = [(files[i], splits[i], composers.get(i) or "", titles.get(i) or "")
                    for i in files]
    except (OSError, ValueError, KeyError, TypeError, AttributeError, csv.Error) as exc:
        fail(f"{listing}: not a readable MAESTRO listing ({type(exc).__name__}: {exc})")
    if not all(isinstance(path, str) and path for path, _, _, _ in rows):
        fail(f"{listing}: not a readable MAESTRO listing (a row names no midi_filename)")
    unknown = {s for _, s, _, _ in rows} - set(_MAESTRO_SPLITS)
    if unknown:
        fail(f"{listing}: unknown split {sorted(map(str, unknown))[0]!r}")
    out: dict[str, tuple[str, str, str]] = {}
    for path, split, composer, title in rows:
        if path in out and out[path][0] != _MAESTRO_SPLITS[split]:
            fail(f"{listing}: {path} is listed twice, in two splits")
        out[path] = (_MAESTRO_SPLITS[split], str(composer), str(title))
    return out


def _unit(path: str) -> float:
    """A number in [0, 1) from a hash of the relative path: the same on every machine."""
    return int.from_bytes(hashlib.sha256(os.fsencode(path)).digest()[:8], "big") / 2**64


def hash_split(group: str, val_share: float, test_share: float) -> str:
    """Split of a group (a piece) outside MAESTRO, from a hash of its name: stable across
    runs and machines, and raising a share only moves pieces out of train."""
    u = _unit(group)
    return "test" if u < test_share else "val" if u < test_share + val_share else "train"


_FILE_HINT = "if a folder holds different pieces, --group_by file splits file by file"


def hash_splits(groups: dict[str, str], val_share: float, test_share: float,
                by_folder: bool = False) -> tuple[dict[str, str], list[str]]:
    """Relative path -> split for ``groups`` (relative path -> group), every file of a
    group in its group's `hash_split`; and warnings. A small folder could leave val/ (which
    train.py needs) or test/ empty: then the train group nearest to that split's share of
    the hash range moves there, as long as train keeps a group; else a warning says so.
    With few pieces a split can also get far more than its share: a warning says so too.
    When the groups are folders (``by_folder``) holding several files, the warnings say
    how to split file by file instead (not for pieces that metadata names: their files
    are performances of one piece, which must not straddle splits)."""
    of_group = {g: hash_split(g, val_share, test_share) for g in set(groups.values())}
    hint = f"; {_FILE_HINT}" if by_folder and len(of_group) < len(groups) else ""
    warnings = []
    for split, share in (("val", val_share), ("test", test_share)):
        if share <= 0 or split in of_group.values():
            continue
        train = sorted((g for g, s in of_group.items() if s == "train"), key=_unit)
        if len(train) >= 2:
            of_group[train[0]] = split
        else:
            warnings.append(f"warning: {len(of_group)} piece(s) ({len(groups)} MIDI files) "
                            f"are too few to put one in {split}/{hint}")
    splits = {p: of_group[g] for p, g in groups.items()}
    for split, share in (("val", val_share), ("test", test_share)):
        got = sum(s == split for s in splits.values())
        if got > 1 and got / len(splits) > 2 * share + 0.1:
            warnings.append(f"warning: {split}/ gets {got} of {len(splits)} MIDI files "
                            f"({got / len(splits):.0%}, --{split}_share {share:g}): "
                            f"{len(of_group)} piece(s) split coarsely{hint}")
    return splits, warnings


_METADATA = "metadata.csv"  # in the input folder: which piece each file performs
_PIECE_COLUMNS = ("piece", "folder", "title")  # what GROUP_BY auto takes, in this order


def file_groups(root: Path, paths: list[str], group_by: str,
                warnings: list[str] | None = None) -> dict[str, str]:
    """Relative path -> group (the piece it performs) by ``group_by`` (see GROUP_BY).
    A warning for metadata rows that name no file here goes to ``warnings``.

    A metadata.csv in ``root`` names each file in some column (the one whose values cover
    the most of ``paths``, also as paths below an extra leading folder); its group is that
    row's piece column, groups of one composer and title joined (`same_piece`). Files it
    does not list fall back to their folder; a file at the top of ``root`` is a group of
    its own."""
    folder = {p: p.rsplit("/", 1)[0] if "/" in p else p for p in paths}  # top level: alone
    if group_by == "file":
        return {p: p for p in paths}
    if group_by == "folder" or (group_by == "auto" and not (root / _METADATA).is_file()):
        return folder
    if not (root / _METADATA).is_file():  # a column name, or a typo of auto/folder/file
        fail(f"--group_by {group_by!r}: not auto, folder or file, and {root} has no "
             f"{_METADATA} to name a column of")
    try:
        with open(root / _METADATA, newline="", encoding="utf-8") as f:
            rows = list(csv.DictReader(f))
    except (OSError, ValueError, csv.Error) as exc:
        fail(f"{root / _METADATA}: not a readable CSV file ({exc})")
    columns = list(rows[0]) if rows else []
    if group_by == "auto":
        column = next((c for c in _PIECE_COLUMNS if c in columns), None)
        if column is None:
            return folder
    elif group_by in columns:
        column = group_by
    else:
        fail(f"--group_by {group_by!r}: not auto, folder, file or a column of "
             f"{root / _METADATA} ({', '.join(columns) or 'none'})")
    wanted = set(paths)

    def named(value: str | None) -> str | None:
        """The file a metadata path names: itself, or itself without leading folders that
        the input folder lacks ("midis/Bach/a.mid" names "Bach/a.mid")."""
        parts = (value or "").replace("\\", "/").split("/")
        return next((p for i in range(len(parts)) if (p := "/".join(parts[i:])) in wanted),
                    None)

    path_column = max(columns, key=lambda c: sum(named(r.get(c)) is not None for r in rows))
    listed = {named(r[path_column]): r[column] for r in rows
              if named(r.get(path_column)) is not None and r.get(column)}
    unmatched = [r[path_column] for r in rows if r.get(path_column) and named(
        r[path_column]) is None]
    if unmatched and warnings is not None:
        warnings.append(f"warning: {len(unmatched)} row(s) of {root / _METADATA} name no "
                        f"file here (e.g. {unmatched[0]}; names are case-sensitive): "
                        "such files are grouped by their folder")
    if group_by == "auto":  # folders of one composer and title are one piece
        twins = same_piece(rows, column)
        listed = {p: twins.get(g, g) for p, g in listed.items()}
    return {p: f"{column}:{listed[p]}" if p in listed else folder[p] for p in paths}


def same_piece(rows: list[dict], column: str) -> dict[str, str]:
    """Groups (values of ``column``) whose metadata rows share a composer and a title, each
    mapped to the first of them: one piece, whatever the column says. ASAP keeps some
    movements twice, with and without the repeat (``21-1`` and ``21-1_no_repeat``), and
    its folder column split them apart. The first name keeps its split; every group that
    has no twin keeps its name and split. Empty without composer and title columns."""
    named = sorted((r[column], (r["composer"], r["title"])) for r in rows
                   if r.get(column) and r.get("composer") and r.get("title"))
    first: dict[tuple[str, str], str] = {}
    for group, piece in named:
        first.setdefault(piece, group)
    return {group: first[piece] for group, piece in named if first[piece] != group}


Source = tuple[str, str, tuple[str, str]]  # split, group, (composer, title) from a listing


def find_sources(root: Path, val_share: float, test_share: float,
                 group_by: str = "auto") -> tuple[dict[str, Source], list[str]]:
    """Relative path -> (split, group, piece) of every source file, and warnings: the
    files of MAESTRO's listing if ``root`` has one (the group: canonical composer and
    title), else every .mid/.midi file (any case) below ``root``, split by group
    (`hash_splits`). A listing further down fails: its splits would be ignored, and its
    performances of one piece split apart by folder."""
    paths = [p.relative_to(root).as_posix() for p in midi_files(root)]
    listing = find_listing(root)
    if listing is not None:
        listed = maestro_splits(listing)
        warnings = []
        unlisted = sorted(set(paths) - set(listed))
        if unlisted:
            warnings.append(f"warning: {len(unlisted)} MIDI file(s) that {listing.name} does "
                            f"not list are left out, e.g. {unlisted[0]}")
        missing = sorted(p for p in listed if not (root / p).is_file())
        if missing:
            warnings.append(f"warning: {len(missing)} file(s) that {listing.name} lists are "
                            f"missing (recorded as failed), e.g. {missing[0]}")
        return {p: (split, f"{composer} / {title}" if composer and title else p,
                    (composer, title)) for p, (split, composer, title) in listed.items()}, warnings
    below = min((f for f in root.rglob("maestro-v*.*") if f.suffix in (".csv", ".json")),
                default=None)  # one walk of the tree
    if below is not None:
        fail(f"{below}: a MAESTRO listing below the input folder; give its folder as --input "
             f"({below.parent}), or that and the other folders comma-separated, so that its "
             "splits are used")
    unlisted: list[str] = []
    groups = file_groups(root, paths, group_by, unlisted)
    by_folder = group_by != "file" and groups == file_groups(root, paths, "folder")
    splits, warnings = hash_splits(groups, val_share, test_share, by_folder)
    warnings = unlisted + warnings
    return {p: (splits[p], groups[p], ("", "")) for p in paths}, warnings


def input_folders(spec: str) -> dict[str, Path]:
    """The input folders of ``--input`` (comma-separated, unless the whole text names a
    folder) by the name their files are recorded under: "" for a single folder, else each
    folder's own name (with "-2", "-3"... when two share one). Fails on a missing folder."""
    parts = [spec] if Path(spec).is_dir() else [p for p in spec.split(",") if p.strip()]
    if not parts:
        fail("--input names no folder")
    folders: dict[str, Path] = {}
    for part in parts:
        root = Path(part.strip())
        if root.is_file():
            fail(f"--input {root}: a file; give the folder that holds the MIDI files "
                 f"({root.parent})")
        if not root.is_dir():
            fail(f"input folder not found: {root}")
        for other in folders.values():  # a folder twice, or inside another: its files too
            a, b = sorted((root.resolve(), other.resolve()), key=lambda p: len(p.parts))
            if b == a or a in b.parents:
                fail(f"--input names {b} {'twice' if a == b else f'inside {a}'}: its files "
                     "would be encoded twice")
        name = root.resolve().name or "input"
        label, n = name, 1
        while label in folders:
            n += 1
            label = f"{name}-{n}"
        folders[label] = root
    return {"": folders.popitem()[1]} if len(folders) == 1 else folders


def gather_sources(folders: dict[str, Path], val_share: float, test_share: float,
                   group_by: str) -> tuple[dict[str, tuple[Path, Source]], list[str]]:
    """Recorded path -> (file, (split, group, piece)) of every source file of ``folders``
    (see `input_folders`), each folder split by `find_sources` as if it were alone; and
    warnings."""
    out, warnings = {}, []
    for label, root in folders.items():
        sources, notes = find_sources(root, val_share, test_share, group_by)
        prefix = f"{label}/" if label else ""
        out.update({prefix + p: (root / p, (split, prefix + group, piece))
                    for p, (split, group, piece) in sources.items()})
        warnings += [f"{root}: {line}" if prefix else line for line in notes]
    if out and all(split != "val" for _, (split, _, _) in out.values()):
        warnings.append("warning: no piece went to val/, which train.py needs: add files"
                        if val_share > 0 else
                        "note: --val_share 0 leaves val/ empty, and train.py needs "
                        "validation pieces: give a share, or put token files there yourself")
    return out, warnings


def output_names(paths: Iterable[str]) -> dict[str, str]:
    """A unique pickle name per relative path: "a/b.mid" -> "a__b.mid.pickle". Paths whose
    names would clash (say "a__b.mid" beside "a/b.mid", or case only) get a hash added, and
    so do names longer than file systems allow (255 bytes, with room for the temporary
    name), which are shortened."""
    names = {p: p.replace("/", "__") + ".pickle" for p in paths}
    count = Counter(n.lower() for n in names.values())
    for p, n in names.items():
        if count[n.lower()] > 1 or len(os.fsencode(n)) > _MAX_NAME_BYTES:
            stem, tag = n[:-7], hashlib.sha256(os.fsencode(p)).hexdigest()[:8]
            while len(os.fsencode(f"{stem}.{tag}.pickle")) > _MAX_NAME_BYTES:
                stem = stem[:-1]
            names[p] = f"{stem}.{tag}.pickle"
    return names


def load_manifest(path: Path) -> dict[str, dict]:
    """Entries of an earlier run by source path; the last line for a path wins. A line cut
    short by a killed run is ignored."""
    entries = {}
    if path.is_file():
        for line in path.read_text(encoding="utf-8").splitlines():
            try:
                entry = json.loads(line)
                entries[entry["path"]] = entry
            except (ValueError, KeyError, TypeError):
                continue
    return entries


def one_line(text: str, limit: int = 300) -> str:
    """``text`` on one line, at most ``limit`` characters: the form of every error."""
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _piece_fields(job: Job) -> dict[str, str]:
    """The composer and title a MAESTRO listing gives the file, for its manifest entry (the
    group joins them with " / ", which names like "Franz Schubert / Franz Liszt" share)."""
    return {"composer": job.piece[0], "title": job.piece[1]} if job.piece[1] else {}


def encode_file(job: Job, output: Path, max_seconds: float) -> tuple[dict, str]:
    """Encode one source file into its pickle. Returns its manifest entry and the outcome:
    "encoded", "unchanged" (same bytes and output as the earlier entry: nothing written) or
    "failed" (the entry's error says why). Never raises for bad input."""
    entry = {
        "path": job.path,
        "split": job.split,
        "group": job.group,
        **_piece_fields(job),
        "status": "failed",
        "error": None,
        "notes": None,
        "tokens": None,
        "seconds": None,
        "sha256": None,
        "output": None,
    }
    try:
        data = job.source.read_bytes()
    except FileNotFoundError:  # named by a listing, or removed while prep.py ran
        entry["error"] = "file not found"
        return entry, "failed"
    except OSError as exc:
        entry["error"] = one_line(f"cannot read file ({exc.strerror or exc})")
        return entry, "failed"
    entry["sha256"] = hashlib.sha256(data).hexdigest()
    old = job.previous
    if (
        old is not None
        and old.get("status") == "ok"
        and old.get("sha256") == entry["sha256"]
        and old.get("output") == job.output
        and (output / job.output).is_file()
    ):
        measured = ("status", "error", "notes", "tokens", "seconds", "sha256", "output")
        return {**entry, **{k: old.get(k) for k in measured}}, "unchanged"  # keys in order
    try:
        # read_midi refuses pieces longer than max_seconds before anything is encoded.
        ids = encode_notes(read_midi(data, job.path, max_seconds))
        tokens = ids.tolist()
    except MidiError as exc:
        entry["error"] = one_line(str(exc).removeprefix(f"{job.path}: "))
        return entry, "failed"
    except Exception as exc:  # a bug or a file no one foresaw: record it, go on
        entry["error"] = one_line(f"{type(exc).__name__}: {exc}")
        return entry, "failed"
    try:
        write_atomic(output / job.output, pickle.dumps(tokens, protocol=4))
    except OSError as exc:  # the output's problem, not the file's: every file would fail
        raise OutputError(os_error_message(exc, output / job.output)) from None
    entry.update(
        status="ok",
        notes=int((ids < NOTE_OFF).sum()),
        tokens=len(tokens),
        seconds=piece_seconds(tokens),
        output=job.output,
    )
    return entry, "encoded"


def run_jobs(fn: Callable, jobs: list[Job], workers: int) -> Iterator:
    """``fn`` over ``jobs``, results in the order they finish: in this process for one
    worker, else in forked workers that ignore Ctrl-C (the main process handles it)."""
    if workers == 1:
        yield from map(fn, jobs)
        return
    ctx = multiprocessing.get_context("fork")
    ignore_sigint = (signal.SIGINT, signal.SIG_IGN)
    with ctx.Pool(workers, initializer=signal.signal, initargs=ignore_sigint) as pool:
        yield from pool.imap_unordered(fn, jobs)


def finish(output: Path, entries: list[dict], recorded: set[str]) -> None:
    """Rewrite the manifest in path order (only if it changed) and remove temporaries and
    the pickles an earlier run recorded (``recorded``) that no ok entry names now (a
    source removed, or moved to another split). Pickles prep never wrote are left alone."""
    manifest = output / _MANIFEST
    text = "".join(json.dumps(e) + "\n" for e in entries)
    if not manifest.is_file() or manifest.read_text(encoding="utf-8") != text:
        write_atomic(manifest, text.encode("utf-8"))
    keep = {e["output"] for e in entries if e["status"] == "ok"}
    for split in _SPLITS:
        for f in (output / split).iterdir():
            name = f"{split}/{f.name}"
            if f.suffix == ".pickle" and name in recorded and name not in keep:
                f.unlink()
    remove_temporaries(output)


def remove_temporaries(output: Path) -> None:
    """Delete the temporary files of interrupted writes (``.NAME.*.tmp``) in ``output``."""
    for folder in (output, *(output / split for split in _SPLITS)):
        for f in folder.glob(".*.tmp") if folder.is_dir() else ():
            f.unlink(missing_ok=True)


def summarize(entries: list[dict], outcomes: Counter, seconds: float, manifest: Path,
              moved: int = 0, pruned: int = 0) -> str:
    """The report printed at the end: what happened (``moved``: files an earlier run had
    put in another split; ``pruned``: recorded files no longer in the input, removed),
    totals per split, first failures."""
    n = len(entries)
    lines = [
        f"{n} files in {seconds:.2f} s ({n / max(seconds, 1e-9):.0f} files/s): "
        f"{outcomes['encoded']} encoded, {outcomes['unchanged']} unchanged (skipped), "
        f"{outcomes['failed']} failed" + (f"; {moved} moved to another split than the "
                                          "last run's" if moved else "")
        + (f"; {pruned} no longer in the input removed (--prune)" if pruned else ""),
        f"{'split':6}{'ok':>8}{'failed':>8}{'notes':>13}{'tokens':>14}{'hours':>9}",
    ]
    for split in (*_SPLITS, "total"):
        part = [e for e in entries if split in (e["split"], "total")]
        ok = [e for e in part if e["status"] == "ok"]
        lines.append(
            f"{split:6}{len(ok):8}{len(part) - len(ok):8}"
            f"{sum(e['notes'] for e in ok):13,}{sum(e['tokens'] for e in ok):14,}"
            f"{sum(e['seconds'] for e in ok) / 3600:9.2f}"
        )
    failed = [e for e in entries if e["status"] == "failed"]
    if failed:
        shown = min(len(failed), _FAILURES_SHOWN)
        lines.append(f"first {shown} of {len(failed)} failures (all in {manifest}):")
        lines += [f"  {e['path']!r}: {e['error']}" if "\n" in e["path"] else
                  f"  {e['path']}: {e['error']}" for e in failed[:_FAILURES_SHOWN]]
    return printable("\n".join(lines))


def twins_across_splits(entries: list[dict]) -> str | None:
    """A warning when byte-identical files (one recording under two names) are in
    different splits: a held-out split would then hold music the model trained on."""
    by_hash: dict[str, list[dict]] = {}
    for e in entries:
        if e["status"] == "ok" and e.get("sha256"):
            by_hash.setdefault(e["sha256"], []).append(e)
    straddling = [g for g in by_hash.values() if len({e["split"] for e in g}) > 1]
    if not straddling:
        return None
    a = straddling[0][0]
    b = next(e for e in straddling[0] if e["split"] != a["split"])
    return (f"warning: {len(straddling)} recording(s) are byte-identical files in different "
            f"splits (e.g. {a['path']} in {a['split']}/ and {b['path']} in {b['split']}/): "
            "validation or test figures would count music seen elsewhere (in training, or "
            "in the other held-out split); remove the copies")


def main(argv: list[str] | None = None) -> None:
    """Encode the input folder into the output folder (see the module docstring)."""
    args = parse_constants(__file__, globals(), __doc__.split("\n\n")[0], argv)
    folders, output = input_folders(args.input), Path(args.output)
    if args.workers < 1:
        fail(f"--workers must be at least 1, not {args.workers}")
    if min(args.val_share, args.test_share) < 0 or args.val_share + args.test_share > 1:
        fail("--val_share and --test_share must be >= 0 and add up to at most 1")
    if not args.max_seconds > 0:
        fail(f"--max_seconds must be positive, not {args.max_seconds}")
    sources, warnings = gather_sources(folders, args.val_share, args.test_share,
                                       args.group_by)
    unused = sorted({"val_share", "test_share", "group_by"} & given_options(argv))
    listed = [str(root) for root in folders.values() if find_listing(root) is not None]
    if unused and listed:
        warnings.append(f"note: {' and '.join('--' + n for n in unused)} "
                        f"{'does' if len(unused) == 1 else 'do'} not apply to "
                        f"{', '.join(listed)}: a MAESTRO listing decides its splits and groups")
    if not sources:
        fail(f"no MIDI files (.mid, .midi) found in {', '.join(map(str, folders.values()))}")

    check_writable(output, "the token files (--output)")
    for split in _SPLITS:
        (output / split).mkdir(parents=True, exist_ok=True)
    manifest = output / _MANIFEST
    recorded = load_manifest(manifest)
    gone = sorted(p for p, e in recorded.items() if p not in sources and e.get("output"))
    if gone and not args.prune:  # another input into the same folder would empty it
        fail(f"{manifest}: {len(gone)} of the {len(recorded)} files it records are not in "
             f"this input (e.g. {gone[0]}), and this run would remove their token files: "
             "give this input another --output, or add --prune to remove them (after "
             "deleting files from the input)")
    previous = {} if args.force else recorded
    names = output_names(sources)
    jobs = [Job(p, source, s, f"{s}/{names[p]}", previous.get(p), group, piece)
            for p, (source, (s, group, piece)) in sorted(sources.items())]
    work = partial(encode_file, output=output, max_seconds=args.max_seconds)

    start, done, outcomes = time.perf_counter(), {}, Counter()
    try:
        with (
            closing(run_jobs(work, jobs, args.workers)) as results,
            open(manifest, "a", encoding="utf-8") as log,
            tqdm(total=len(jobs), unit=" files", desc="prep", dynamic_ncols=True) as bar,
        ):
            for entry, outcome in results:
                done[entry["path"]] = entry
                outcomes[outcome] += 1
                if entry != recorded.get(entry["path"]):  # a resumed run skips it; a file
                    log.write(json.dumps(entry) + "\n")  # failing as before changes nothing
                    log.flush()
                bar.set_postfix_str(f"failed {outcomes['failed']}", refresh=False)
                bar.update()
    except OutputError as exc:
        fail(f"{exc}; the files encoded so far are kept, run again to go on")
    finally:  # workers are stopped by now: nothing writes while this cleans up
        remove_temporaries(output)
    entries = [done[job.path] for job in jobs]
    finish(output, entries, {e["output"] for e in recorded.values() if e.get("output")})
    moved = sum(1 for e in entries if recorded.get(e["path"], {}).get("status") == "ok"
                and recorded[e["path"]].get("split") != e["split"])
    print(summarize(entries, outcomes, time.perf_counter() - start, manifest, moved,
                    len(gone)))
    twins = twins_across_splits(entries)
    for line in warnings + [twins] * bool(twins):
        print(printable(line), file=sys.stderr)
    if not any(e["status"] == "ok" for e in entries):
        fail(f"no file could be encoded ({len(entries)} failed; reasons in {manifest})")


if __name__ == "__main__":
    run_script(main, "interrupted; run the same command again to resume")
