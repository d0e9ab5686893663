"""prep.py through its command line, on corpora built in each test: MAESTRO listings (CSV and
JSON), a plain nested folder, bad files, interrupted runs, reruns, --force, exit status."""

from __future__ import annotations

import csv
import io
import json
import os
import pickle
import signal
import subprocess
import sys
import time
from pathlib import Path

import mido
import pytest
import zygote
from conftest import REAL_FILES

from midi_processor import END, encode_midi

ROOT = Path(__file__).resolve().parent.parent


def run_prep(*args: str | Path, workers: int = 2) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "prep.py", "--workers", str(workers), *map(str, args)]
    return zygote.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=120)


def ok_run(*args: str | Path, workers: int = 2) -> str:
    """Run prep, insist on exit status 0, return its stdout (the summary)."""
    proc = run_prep(*args, workers=workers)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


def manifest(out: Path) -> dict[str, dict]:
    lines = (out / "manifest.jsonl").read_text().splitlines()
    return {e["path"]: e for e in map(json.loads, lines)}


def tokens_of(path: Path) -> list:
    with open(path, "rb") as f:
        tokens = pickle.load(f)
    assert type(tokens) is list and all(type(t) is int for t in tokens) and tokens[-1] == END
    return tokens


def snapshot(out: Path) -> dict[str, bytes]:
    """Every file below ``out`` by relative path: what two runs must agree on."""
    return {p.relative_to(out).as_posix(): p.read_bytes() for p in out.rglob("*") if p.is_file()}


def midi_bytes(notes: list[tuple[int, int, int]], tpq=480, tempo=500000, channel=0) -> bytes:
    """A one-track MIDI file of notes (start tick, end tick, pitch). On one tick, note-offs
    come first, then note-ons, then the note-offs of zero-length notes."""
    events = [(s, 1, "note_on", p) for s, _, p in notes]
    events += [(e, 0 if e > s else 2, "note_off", p) for s, e, p in notes]
    track = mido.MidiTrack([mido.MetaMessage("set_tempo", tempo=tempo, time=0)])
    now = 0
    for tick, _, kind, pitch in sorted(events):
        track.append(mido.Message(kind, note=pitch, velocity=80, channel=channel, time=tick - now))
        now = tick
    mf = mido.MidiFile(ticks_per_beat=tpq)
    mf.tracks.append(track)
    buf = io.BytesIO()
    mf.save(file=buf)
    return buf.getvalue()


def write(path: Path, data: bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


MAESTRO_ROWS = [  # (midi_filename, split): the five real pieces and one missing file
    ("2017/a.midi", "train"),
    ("2017/b.midi", "train"),
    ("2018/c.midi", "validation"),
    ("2018/d.midi", "test"),
    ("2018/e.midi", "train"),
    ("2018/missing.midi", "test"),
]


COMPOSERS = ["Franz Schubert / Franz Liszt", "Frédéric Chopin", "Antonín Dvořák"]


@pytest.mark.parametrize("listing", ["csv", "json", "json-v2"])
def test_maestro_splits_from_listing(tmp_path: Path, listing: str) -> None:
    """The listing's splits, composers and titles (a CSV saved with a byte-order mark, as
    Excel does; v3's JSON of columns, v2's of rows); a missing and an unlisted file are
    reported, and a rerun leaves the manifest alone; the folder above the listing is
    refused."""
    src, out = tmp_path / "maestro-v3.0.0", tmp_path / "data"
    for (name, _), real in zip(MAESTRO_ROWS, REAL_FILES, strict=False):
        write(src / name, real.read_bytes())
    write(src / "2018/not_listed.midi", REAL_FILES[0].read_bytes())  # MAESTRO lists its files
    rows = [
        {
            "canonical_composer": COMPOSERS[i % 3],
            "canonical_title": f'Sonata in A Major, D. 959 "No. {i}"',
            "split": split,
            "year": 2018,
            "midi_filename": name,
            "audio_filename": name.replace(".midi", ".wav"),
            "duration": 60.0,
        }
        for i, (name, split) in enumerate(MAESTRO_ROWS)
    ]
    columns = list(rows[0])
    if listing == "csv":
        with open(src / "maestro-v3.0.0.csv", "w", newline="", encoding="utf-8-sig") as f:
            writer = csv.DictWriter(f, columns)
            writer.writeheader()
            writer.writerows(rows)
    elif listing == "json":
        table = {c: {str(i): row[c] for i, row in enumerate(rows)} for c in columns}
        (src / "maestro-v3.0.0.json").write_text(json.dumps(table))
    else:
        (src / "maestro-v2.0.0.json").write_text(json.dumps(rows))

    proc = run_prep("--input", src, "--output", out, "--group_by", "file")
    assert proc.returncode == 0, proc.stderr
    summary = proc.stdout
    assert "note: --group_by does not apply to" in proc.stderr  # the listing's groups
    assert "1 MIDI file(s) that maestro-v" in proc.stderr and "2018/not_listed.midi" in proc.stderr
    assert "1 file(s) that maestro-v" in proc.stderr and "2018/missing.midi" in proc.stderr
    assert "byte-identical" not in proc.stderr  # every split's files differ
    entries = manifest(out)
    assert list(entries) == sorted(name for name, _ in MAESTRO_ROWS)
    splits = {"train": "train", "validation": "val", "test": "test"}
    for i, ((name, split), real) in enumerate(zip(MAESTRO_ROWS, REAL_FILES, strict=False)):
        e = entries[name]
        assert (e["split"], e["status"], e["error"]) == (splits[split], "ok", None)
        title = f'Sonata in A Major, D. 959 "No. {i}"'
        assert (e["composer"], e["title"]) == (COMPOSERS[i % 3], title)
        assert e["group"] == f"{COMPOSERS[i % 3]} / {title}"
        assert e["output"] == f"{splits[split]}/{name.replace('/', '__')}.pickle"
        tokens = tokens_of(out / e["output"])
        assert tokens == encode_midi(real)
        assert e["tokens"] == len(tokens) and e["notes"] > 0 and e["seconds"] > 0
    missing = entries["2018/missing.midi"]
    assert missing["status"] == "failed" and missing["error"] == "file not found"
    assert missing["output"] is None and missing["split"] == "test"
    assert sorted(p.name for p in out.rglob("*.pickle")) == sorted(
        name.replace("/", "__") + ".pickle" for name, _ in MAESTRO_ROWS[:5]
    )
    assert "5 encoded" in summary and "1 failed" in summary
    assert "2018/missing.midi: file not found" in summary
    before = (out / "manifest.jsonl").stat().st_mtime_ns
    assert "5 unchanged" in ok_run("--input", src, "--output", out)
    assert (out / "manifest.jsonl").stat().st_mtime_ns == before  # a file failing as before

    # one folder too high (a zip unpacked into a folder of its own): its splits would be
    # lost, and performances of one piece split apart by year
    proc = run_prep("--input", tmp_path, "--output", tmp_path / "data2")
    assert proc.returncode == 1 and not (tmp_path / "data2").exists()
    assert proc.stderr.count("\n") == 1 and "MAESTRO listing below the input folder" in proc.stderr
    assert f"({src})" in proc.stderr


def test_a_listing_that_puts_a_file_in_two_splits_is_refused(tmp_path: Path) -> None:
    src = tmp_path / "maestro-v3.0.0"
    write(src / "2018/a.midi", REAL_FILES[0].read_bytes())
    (src / "maestro-v3.0.0.csv").write_text("canonical_composer,canonical_title,split,"
                                            "midi_filename\nA,B,train,2018/a.midi\n"
                                            "A,B,test,2018/a.midi\n")
    proc = run_prep("--input", src, "--output", tmp_path / "data")
    assert proc.returncode == 1 and proc.stderr.count("\n") == 1
    assert "2018/a.midi is listed twice, in two splits" in proc.stderr


EACH = ("--group_by", "file")  # each file a piece of its own


def test_any_folder_rerun_and_force(tmp_path: Path) -> None:
    src, out = tmp_path / "corpus", tmp_path / "data"
    names = [f"set{i % 3}/deep/piece{i}.{'MID' if i % 4 else 'midi'}" for i in range(20)]
    for i, name in enumerate(names):
        write(src / name, REAL_FILES[i % 5].read_bytes())
    (src / "readme.txt").write_text("not music")
    (src / "folder.mid").mkdir()  # a folder named like a MIDI file is no MIDI file

    summary = ok_run("--input", src, "--output", out, "--val_share", "0.3", "--test_share", "0.3",
                     *EACH)
    entries = manifest(out)
    assert sorted(entries) == sorted(names)
    assert {e["split"] for e in entries.values()} == {"train", "val", "test"}
    for name, e in entries.items():
        assert e["status"] == "ok" and e["output"].startswith(e["split"] + "/")
        assert tokens_of(out / e["output"]) == encode_midi(src / name)
    assert "20 encoded" in summary

    # The same command again: nothing is encoded, no file is rewritten.
    before = {p: (p.stat().st_ino, p.stat().st_mtime_ns) for p in out.rglob("*")}
    summary = ok_run("--input", src, "--output", out, "--val_share", "0.3", "--test_share",
                     "0.3", *EACH)
    assert "0 encoded, 20 unchanged" in summary
    assert {p: (p.stat().st_ino, p.stat().st_mtime_ns) for p in out.rglob("*")} == before

    # A changed file is encoded again; --force redoes every file, with the same result.
    write(src / names[0], REAL_FILES[4].read_bytes())
    summary = ok_run("--input", src, "--output", out, "--val_share", "0.3", "--test_share",
                     "0.3", *EACH)
    assert "1 encoded, 19 unchanged" in summary
    assert tokens_of(out / manifest(out)[names[0]]["output"]) == encode_midi(REAL_FILES[4])
    old = snapshot(out)
    inodes = {p: p.stat().st_ino for p in out.rglob("*.pickle")}
    summary = ok_run(
        "--input", src, "--output", out, "--val_share", "0.3", "--test_share", "0.3", "--force",
        *EACH)
    assert "20 encoded, 0 unchanged" in summary
    assert all(p.stat().st_ino != ino for p, ino in inodes.items())  # rewritten...
    assert snapshot(out) == old  # ...to the same bytes


def test_bad_files_are_recorded_and_skipped(tmp_path: Path) -> None:
    src, out = tmp_path / "corpus", tmp_path / "data"
    real = REAL_FILES[0].read_bytes()
    write(src / "good.mid", real)
    write(src / "also_good.mid", REAL_FILES[1].read_bytes())
    bad = {  # file -> (bytes, expected reason)
        "empty.mid": (b"", "empty file"),
        "truncated.mid": (real[: len(real) // 2], "truncated"),
        "text.mid": (b"just some text, not MIDI\n", "not a MIDI file"),
        "garbage.midi": (real[:14] + bytes(range(256)) * 3, "truncated"),
        "drums.mid": (midi_bytes([(0, 240, 36), (240, 480, 38)], channel=9), "no notes"),
        "zero_length.mid": (midi_bytes([(0, 0, 60), (10, 10, 62)]), "no notes"),
        "slow_tempo.mid": (midi_bytes([(0, 2000, 60)], tpq=1, tempo=0xFFFFFF), "implausibly long"),
        "huge_ticks.mid": (midi_bytes([(0x0FFFFFFF, 0x0FFFFFFF + 5, 60)], tpq=1), "implausibly"),
    }
    for name, (data, _) in bad.items():
        write(src / name, data)
    write(src / "some_zero_length.mid", midi_bytes([(0, 0, 60), (0, 480, 62)]))

    summary = ok_run("--input", src, "--output", out)
    entries = manifest(out)
    for name, (_, reason) in bad.items():
        e = entries[name]
        assert e["status"] == "failed" and reason in e["error"] and "\n" not in e["error"], e
        assert f"{name}: {e['error']}" in summary
    for name in ("good.mid", "also_good.mid", "some_zero_length.mid"):
        assert entries[name]["status"] == "ok"
        tokens_of(out / entries[name]["output"])
    assert tokens_of(out / entries["good.mid"]["output"]) == encode_midi(REAL_FILES[0])
    assert f"3 encoded, 0 unchanged (skipped), {len(bad)} failed" in summary
    assert len(list(out.rglob("*.pickle"))) == 3


def test_unexpected_worker_error_is_recorded(tmp_path: Path, monkeypatch, capsys) -> None:
    """A bug inside a worker fails that file only, with the exception's type and message."""
    import prep

    src, out = tmp_path / "corpus", tmp_path / "data"
    for real in REAL_FILES[:3]:
        write(src / real.name, real.read_bytes())
    read_midi = prep.read_midi

    def buggy(data, name, max_seconds):
        if name == REAL_FILES[1].name:
            raise RuntimeError("boom\nsecond line")
        return read_midi(data, name, max_seconds)

    monkeypatch.setattr(prep, "read_midi", buggy)
    prep.main(["--input", str(src), "--output", str(out), "--workers", "2"])  # forked workers
    entries = manifest(out)
    assert entries[REAL_FILES[1].name]["error"] == "RuntimeError: boom second line"
    assert [e["status"] for e in entries.values()].count("ok") == 2
    assert "2 encoded, 0 unchanged (skipped), 1 failed" in capsys.readouterr().out


def start_and_stop(args: list, sig: int, after_lines: int, workers: int) -> subprocess.Popen:
    """Start prep and send ``sig`` to its process group once the manifest has some lines."""
    log = Path(args[args.index("--output") + 1]) / "manifest.jsonl"
    cmd = [sys.executable, "prep.py", "--workers", str(workers), *map(str, args)]
    proc = subprocess.Popen(
        cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True
    )
    deadline = time.monotonic() + 60
    while not (log.exists() and log.read_bytes().count(b"\n") >= after_lines):
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
        time.sleep(0.001)
    os.killpg(proc.pid, sig)
    proc.wait(timeout=30)
    return proc


def test_interrupted_runs_resume_to_the_same_output(tmp_path: Path) -> None:
    src, out, ref = tmp_path / "corpus", tmp_path / "data", tmp_path / "reference"
    n = 300
    for i in range(n):
        write(src / f"dir{i % 7}" / f"p{i:03}.mid", REAL_FILES[i % 5].read_bytes())
    args = ["--input", src, "--output", out]

    # Ctrl-C (to the whole process group, as a terminal sends it): one line, resumable.
    proc = start_and_stop(args, signal.SIGINT, after_lines=5, workers=2)
    err = proc.stderr.read().decode()
    assert proc.returncode == 130 and "Traceback" not in err
    assert "run the same command again to resume" in err.strip().splitlines()[-1]
    assert not list(out.rglob("*.tmp"))  # workers stopped mid-write leave nothing behind

    # kill -9 of a single-process run, then a leftover temporary and a stale pickle.
    proc = start_and_stop(args, signal.SIGKILL, after_lines=20, workers=1)
    assert proc.returncode == -signal.SIGKILL
    done = (out / "manifest.jsonl").read_bytes().count(b"\n")
    assert done < n, "the run finished before it was killed"
    write(out / "train" / ".p.mid.pickle.abc.tmp", b"half")
    write(out / "val" / "gone.mid.pickle", pickle.dumps([1, END]))  # from a removed source
    with open(out / "manifest.jsonl", "a") as log:
        log.write(json.dumps({"path": "gone.mid", "split": "val", "status": "ok",
                              "output": "val/gone.mid.pickle"}) + "\n")
    write(out / "val" / "mine.pickle", pickle.dumps([2, END]))  # not prep's: kept

    before = snapshot(out)  # a recorded file left the input: refused until --prune
    one_error_line(run_prep(*args), "1 of the ")
    assert snapshot(out) == before
    summary = ok_run(*args, "--prune", workers=2)
    assert "; 1 no longer in the input removed (--prune)" in summary
    skipped = int(summary.split(" unchanged")[0].rsplit(" ", 1)[1])
    assert skipped >= 10 and f"{n - skipped} encoded" in summary
    ok_run("--input", src, "--output", ref, workers=2)
    assert not (out / "val" / "gone.mid.pickle").exists()
    (out / "val" / "mine.pickle").unlink()
    assert snapshot(out) == snapshot(ref)
    assert len(manifest(out)) == n and len(list(out.rglob("*.pickle"))) == n


def test_another_input_into_the_same_output_is_refused(tmp_path: Path) -> None:
    """A second input given the same --output (say, your own folder after MAESTRO, both
    into the default data/) would have removed the first dataset: it is refused, the
    folder left byte-identical, until --prune."""
    first, second, out = tmp_path / "first", tmp_path / "second", tmp_path / "data"
    for i in range(4):
        write(first / f"a{i}.mid", REAL_FILES[i].read_bytes())
    write(second / "mine.mid", REAL_FILES[4].read_bytes())
    ok_run("--input", first, "--output", out, *EACH)
    before = snapshot(out)
    proc = run_prep("--input", second, "--output", out, *EACH)
    one_error_line(proc, f"{out / 'manifest.jsonl'}: 4 of the 4 files it records are not "
                         "in this input (e.g. a0.mid), and this run would remove their "
                         "token files: give this input another --output, or add --prune")
    assert snapshot(out) == before
    summary = ok_run("--input", second, "--output", out, *EACH, "--prune")
    assert "; 4 no longer in the input removed (--prune)" in summary
    assert list(manifest(out)) == ["mine.mid"] and len(list(out.rglob("*.pickle"))) == 1


def one_error_line(proc: subprocess.CompletedProcess, text: str) -> None:
    """Non-zero exit with one clear line at the end of stderr (after the progress bar)."""
    assert proc.returncode != 0
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("error: ") and text in last, proc.stderr


def test_exit_status(tmp_path: Path) -> None:
    one_error_line(run_prep("--input", tmp_path / "nowhere"), "input folder not found")
    empty = tmp_path / "empty"
    write(empty / "notes.txt", b"no MIDI here")
    proc = run_prep("--input", empty, "--output", tmp_path / "out1")
    one_error_line(proc, "no MIDI files")
    one = tmp_path / "one"
    write(one / "sub" / "a.mid", REAL_FILES[0].read_bytes())
    for spec, said in ((f"{one},{one}/", f"{one} twice"),
                       (f"{one},{one / 'sub'}", f"{one / 'sub'} inside {one}")):
        one_error_line(run_prep("--input", spec, "--output", tmp_path / "x"),
                       f"--input names {said}: its files would be encoded twice")
    one_error_line(run_prep("--input", tmp_path / "one", "--output", empty / "notes.txt"),
                   f"cannot write the token files (--output): {empty / 'notes.txt'} is a "
                   "file, not a folder")
    one_error_line(run_prep("--input", empty / "notes.txt", "--output", tmp_path / "out2"),
                   f"--input {empty / 'notes.txt'}: a file; give the folder that holds the "
                   f"MIDI files ({empty})")
    assert proc.stderr.count("\n") == 1
    bad = tmp_path / "bad"
    write(bad / "a.mid", b"")
    write(bad / "b.mid", b"MThd nonsense")
    proc = run_prep("--input", bad, "--output", tmp_path / "out2")
    one_error_line(proc, "no file could be encoded")
    assert len(manifest(tmp_path / "out2")) == 2


def test_help_lists_every_constant() -> None:
    proc = run_prep("--help")
    assert proc.returncode == 0
    for option in ("--input", "--output", "--workers", "--val_share", "--test_share"):
        assert option in proc.stdout
    assert "--max_seconds" in proc.stdout and "--force" in proc.stdout
    assert "--group_by" in proc.stdout and "metadata.csv column" in proc.stdout


@pytest.mark.parametrize("script", ["prep.py", "train.py", "generate.py", "evaluate.py",
                                    "app.py"])
def test_every_option_says_what_it_does(script: str) -> None:
    """Each constant a script offers as an option (a number, text or switch) carries its
    help, the trailing comment that --help shows."""
    import ast

    from perceiver_music.cli import script_constants

    helps = script_constants(ROOT / script)
    options = [node.targets[0].id for node in ast.parse((ROOT / script).read_text()).body
               if isinstance(node, ast.Assign) and isinstance(node.targets[0], ast.Name)
               and node.targets[0].id in helps and not isinstance(
                   node.value, ast.Tuple | ast.Dict | ast.List | ast.Set)]
    assert options and not [name for name in options if not helps[name]]


def test_awkward_file_names_are_encoded(tmp_path: Path) -> None:
    """A name that is not UTF-8, and one whose output name would pass the 255-byte limit."""
    src, out = tmp_path / "corpus", tmp_path / "data"
    raw = os.fsencode(src) + b"/caf\xe9 (latin-1).mid"  # not decodable as UTF-8
    write(Path(os.fsdecode(raw)), REAL_FILES[0].read_bytes())
    deep = src / ("long folder name " * 6).strip() / ("very long piece name " * 8 + ".mid")
    write(deep, REAL_FILES[1].read_bytes())
    assert len(os.fsencode(deep.relative_to(src).as_posix().replace("/", "__"))) > 255
    r = run_prep("--input", src, "--output", out, "--val_share", "0", "--test_share", "0")
    assert r.returncode == 0, r.stderr
    assert "2 encoded" in r.stdout
    assert "note: --val_share 0 leaves val/ empty, and train.py needs" in r.stderr
    entries = manifest(out)
    assert os.fsdecode(raw).rsplit("/", 1)[1] in entries  # the name as the file system has it
    assert [e["status"] for e in entries.values()] == ["ok", "ok"]
    assert all(len(os.fsencode(Path(e["output"]).name)) <= 200 for e in entries.values())
    for e in entries.values():
        assert tokens_of(out / e["output"])[-1] == END
    again = run_prep("--input", src, "--output", out, "--val_share", "0", "--test_share", "0")
    assert "0 encoded, 2 unchanged" in again.stdout, again.stdout
    # a failing file whose name holds a line break and a terminal's colour code: one
    # line of the failure list, the codes shown, not obeyed
    write(src / "trunc\nname\x1b[31mred.mid", b"MThd broken")
    r = run_prep("--input", src, "--output", out, "--val_share", "0", "--test_share", "0")
    failure = [line for line in r.stdout.splitlines() if "red.mid" in line]
    assert failure == ["  'trunc\\nname\\x1b[31mred.mid': not a MIDI file (no MThd header)"]
    assert "\x1b" not in r.stdout, r.stdout


@pytest.mark.parametrize("problem", ["read-only", "disk full"])
def test_output_problems_stop_with_one_line_and_no_temporaries(tmp_path: Path, problem) -> None:
    src, out = tmp_path / "corpus", tmp_path / "data"
    for i, real in enumerate(REAL_FILES * 4):
        write(src / f"p{i}.mid", real.read_bytes())
    if problem == "read-only":
        out.mkdir()
        out.chmod(0o555)
        preexec = zygote.without_root_privileges
    else:
        preexec = zygote.file_size_limit(3000)  # the first pickles fit, then writes fail
    cmd = [sys.executable, "prep.py", "--input", str(src), "--output", str(out)]
    r = zygote.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=120,
                   preexec_fn=preexec)
    out.chmod(0o755)
    one_error_line(r, "Permission denied" if problem == "read-only" else ".pickle: File too large")
    assert "Traceback" not in r.stderr
    assert not [p for p in out.rglob("*") if p.name.startswith(".")]


def test_outputs_follow_the_umask(tmp_path: Path) -> None:
    src, out = tmp_path / "corpus", tmp_path / "data"
    write(src / "a.mid", REAL_FILES[0].read_bytes())
    cmd = [sys.executable, "prep.py", "--input", str(src), "--output", str(out)]
    r = zygote.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=120,
                   preexec_fn=zygote.umask(0o022))
    assert r.returncode == 0, r.stderr
    for f in out.rglob("*"):
        assert f.stat().st_mode & 0o777 == (0o755 if f.is_dir() else 0o644), f


def test_a_small_folder_still_gets_validation_and_test_files(tmp_path: Path) -> None:
    """The path hash would put all 3 files in train/ (shares 5 %): one moves to val/ and
    one to test/; a single file stays in train/ with a warning that val/ is empty."""
    src, out = tmp_path / "corpus", tmp_path / "data"
    for real in REAL_FILES[:3]:
        write(src / real.name, real.read_bytes())
    r = run_prep("--input", src, "--output", out)
    assert r.returncode == 0, r.stderr
    splits = sorted(e["split"] for e in manifest(out).values())
    assert splits == ["test", "train", "val"] and "warning" not in r.stderr
    again = run_prep("--input", src, "--output", out)
    assert sorted(e["split"] for e in manifest(out).values()) == splits  # stable
    assert "0 encoded, 3 unchanged" in again.stdout

    from prep import hash_split

    one, out1 = tmp_path / "one", tmp_path / "data1"
    name = next(f"p{i}.mid" for i in range(100) if hash_split(f"p{i}.mid", 0.05, 0.05) == "train")
    write(one / name, REAL_FILES[0].read_bytes())
    r = run_prep("--input", one, "--output", out1)
    assert r.returncode == 0
    assert "too few to put one in val/" in r.stderr
    assert "no piece went to val/, which train.py needs" in r.stderr
    # beside a folder that fills val/, the small one's note stays, the alarm does not
    r = run_prep("--input", f"{one},{src}", "--output", tmp_path / "data2")
    assert r.returncode == 0 and "too few to put one in val/" in r.stderr, r.stderr
    assert "val" in {e["split"] for e in manifest(tmp_path / "data2").values()}
    assert "train.py needs" not in r.stderr


def test_a_folder_of_different_pieces_gets_told_how_to_split_it(tmp_path: Path) -> None:
    """A user's folder often holds one folder per composer: grouped by folder (the
    default) it is one piece, so val/ stays empty, and with few folders a split can take
    most files; the warnings say to split file by file, and --group_by file does."""
    from prep import hash_split

    flat, nested = tmp_path / "flat", tmp_path / "nested"
    for i in range(6):  # six different files (a copy would be warned about)
        data = REAL_FILES[i].read_bytes() if i < 5 else midi_bytes([(0, 480, 60)])
        write(flat / "Grieg" / f"p{i}.mid", data)
    r = run_prep("--input", flat, "--output", tmp_path / "d1")
    assert r.returncode == 0
    assert "too few to put one in val/; if a folder holds different pieces, --group_by " \
           "file splits file by file" in r.stderr
    assert "no piece went to val/, which train.py needs: add files" in r.stderr
    r = run_prep("--input", flat, "--output", tmp_path / "d2", "--group_by", "file")
    assert r.returncode == 0 and "warning" not in r.stderr, r.stderr
    assert {"train", "val", "test"} == {e["split"] for e in manifest(tmp_path / "d2").values()}
    # two folders of five files whose hash is test's, three single files in train
    names = (f"c{i}" for i in range(1000))
    tested = [n for n in names if hash_split(n, 0.05, 0.05) == "test"][:2]
    trained = [n for n in (f"t{i}" for i in range(1000))
               if hash_split(n, 0.05, 0.05) == "train"][:3]
    for folder in tested:
        for i in range(5):
            write(nested / folder / f"p{i}.mid", REAL_FILES[i].read_bytes())
    for folder in trained:
        write(nested / folder / "p.mid", REAL_FILES[0].read_bytes())
    r = run_prep("--input", nested, "--output", tmp_path / "d3")
    assert r.returncode == 0
    assert "warning: test/ gets 10 of 13 MIDI files (77%, --test_share 0.05): " \
           "5 piece(s) split coarsely; if a folder holds different pieces" in r.stderr


def test_performances_of_one_piece_never_straddle_splits(tmp_path: Path) -> None:
    """An ASAP-like folder (Composer/Work/Piece/Performer.mid and a metadata.csv naming
    each file's piece): every piece's performances land in one split, the manifest records
    the group, and --group_by folder / file change the grouping. A movement kept in two
    folders (with and without its repeat, one composer and title) is one piece."""
    src = tmp_path / "asap"
    rows = []
    for piece in range(13):  # piece 12 is piece 0 without its repeat, in a folder of its own
        folder = f"Comp{piece % 3}/Work/piece_{piece % 12}" + ("_no_repeat" if piece == 12 else "")
        for player in range(3):
            path = f"{folder}/Player{player}.mid"
            write(src / path, REAL_FILES[(piece + player) % len(REAL_FILES)].read_bytes())
            rows.append({"composer": f"Comp{piece % 3}", "title": f"piece_{piece % 12}",
                         "folder": folder, "midi_performance": path})
    rows.append({**rows[0], "midi_performance": "Comp0/Work/piece_0/player0.mid"})  # case
    with open(src / "metadata.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    for group_by, expected_groups in (("auto", 12), ("folder", 13), ("file", 39),
                                      ("composer", 3)):
        out = tmp_path / f"data-{group_by}"
        r = run_prep("--input", src, "--output", out, "--val_share", "0.25", "--test_share",
                     "0.25", "--group_by", group_by)
        assert r.returncode == 0, r.stderr
        entries = manifest(out).values()
        by_group: dict[str, set[str]] = {}
        for e in entries:
            by_group.setdefault(e["group"], set()).add(e["split"])
        assert len(by_group) == expected_groups, sorted(by_group)
        assert all(len(splits) == 1 for splits in by_group.values())  # no group straddles
        if group_by in ("auto", "composer"):  # pieces named by metadata: never split by file
            assert "--group_by file" not in r.stderr
        if group_by == "auto":  # the twin joins the first folder's group, under its name
            assert "warning: 1 row(s) of " in r.stderr and "name no file here (e.g. " \
                   "Comp0/Work/piece_0/player0.mid; names are case-sensitive)" in r.stderr
            twins = {e["group"] for p, e in manifest(out).items() if "piece_0" in p}
            assert twins == {"folder:Comp0/Work/piece_0"}
        if expected_groups >= 12:
            assert {e["split"] for e in entries} == {"train", "val", "test"}
        # a few files' bytes stand for all 13 pieces: copies straddle splits, said once
        assert r.stderr.count("byte-identical files in different splits (e.g. ") == 1
    assert any(g.startswith("folder:Comp0/Work/") for g in by_group) is False
    # grouping anew moves files between splits: the summary counts them
    before = {p: e["split"] for p, e in manifest(tmp_path / "data-file").items()}
    r = run_prep("--input", src, "--output", tmp_path / "data-file", "--val_share", "0.25",
                 "--test_share", "0.25", "--group_by", "composer")
    moved = sum(before[p] != e["split"] for p, e in manifest(tmp_path / "data-file").items())
    assert r.returncode == 0 and moved > 0, r.stderr
    assert f"; {moved} moved to another split than the last run's" in r.stdout, r.stdout
    bad = run_prep("--input", src, "--output", tmp_path / "x", "--group_by", "nonsense")
    assert bad.returncode == 1 and "not auto, folder, file or a column" in bad.stderr
    plain = tmp_path / "plain"  # no metadata.csv: a typo is named as one, not a bad CSV
    write(plain / "a.mid", REAL_FILES[0].read_bytes())
    bad = run_prep("--input", plain, "--output", tmp_path / "x", "--group_by", "flie")
    assert bad.returncode == 1 and bad.stderr.strip() == (
        f"error: --group_by 'flie': not auto, folder or file, and {plain} has no "
        "metadata.csv to name a column of"), bad.stderr


def test_several_input_folders_are_each_split_as_alone(tmp_path: Path) -> None:
    """``--input a,b``: files are recorded under their folder's name, each folder is split
    exactly as it would be alone, and a metadata.csv whose paths carry an extra leading
    folder (piano-midi-de's "midis/Composer/x.mid") still names each file's piece."""
    pmd, solo = tmp_path / "pmd", tmp_path / "solo"
    rows = []
    for i in range(10):
        path = f"Comp{i % 2}/piece{i}.mid"
        write(pmd / path, REAL_FILES[i % len(REAL_FILES)].read_bytes())
        rows.append({"composer": f"Comp{i % 2}", "title": f"Piece {i // 2}",
                     "midi": f"midis/{path}"})  # pieces 0-1, 2-3, ...: two files each
    with open(pmd / "metadata.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    for i in range(6):
        write(tmp_path / "other" / "pmd" / f"set{i % 3}" / f"x{i}.mid",
              REAL_FILES[i % len(REAL_FILES)].read_bytes())
    shares = ("--val_share", "0.2", "--test_share", "0.2")
    ok_run("--input", pmd, "--output", solo, *shares)
    alone = manifest(solo)
    assert {e["group"] for e in alone.values()} == {f"title:Piece {i}" for i in range(5)}
    out = tmp_path / "both"
    ok_run("--input", f"{pmd},{tmp_path / 'other' / 'pmd'}", "--output", out, *shares)
    both = manifest(out)
    assert len(both) == 16
    for path, e in alone.items():
        assert both[f"pmd/{path}"]["split"] == e["split"]
        assert both[f"pmd/{path}"]["group"] == f"pmd/{e['group']}"
        assert tokens_of(out / both[f"pmd/{path}"]["output"]) == tokens_of(solo / e["output"])
    assert {e["group"] for p, e in both.items() if p.startswith("pmd-2/")} == {
        f"pmd-2/set{i}" for i in range(3)}  # the same folder name twice: told apart
    r = run_prep("--input", f"{pmd},{tmp_path / 'missing'}", "--output", tmp_path / "x")
    one_error_line(r, f"input folder not found: {tmp_path / 'missing'}")
