"""train.py through its CLI: it learns, resumes bit-exactly, runs on two processes, and
refuses bad settings with one line."""

from __future__ import annotations

import csv
import json
import os
import pickle
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import zygote
from conftest import free_port
from safetensors.numpy import load_file

from midi_processor import encode_midi

ROOT = Path(__file__).resolve().parent.parent
TINY = [
    "--preset",
    "tiny",
    "--batch_size",
    "8",
    "--log_interval",
    "5",
    "--warmup_steps",
    "5",
    "--learning_rate",
    "3e-3",
    "--eval_windows",
    "64",
    "--no-tensorboard",
    # one thread: the tiny model gains little from more, and the tuner's trials with every
    # core cost the CPU that the suite's other worker needs
    "--threads",
    "1",
]


def run(args: list[str], **kw) -> subprocess.CompletedProcess:
    return zygote.run(
        [sys.executable, "train.py", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
        **kw,
    )


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    """The bundled real pieces: one for validation, the rest for training."""
    d = tmp_path_factory.mktemp("tokens")
    for f in sorted((ROOT / "tests" / "data").glob("*.mid")):
        split = d / ("val" if f.stem == "scn15_4" else "train")
        split.mkdir(exist_ok=True)
        with open(split / f"{f.stem}.pickle", "wb") as fh:
            pickle.dump(encode_midi(f), fh)
    return d


def unigram_entropy(folder: Path) -> float:
    """Entropy in nats of the token frequencies of every piece below ``folder``."""
    tokens = np.concatenate([pickle.loads(f.read_bytes()) for f in folder.rglob("*.pickle")])
    p = np.bincount(tokens) / len(tokens)
    p = p[p > 0]
    return float(-(p * np.log(p)).sum())


def metric_rows(run_dir: Path) -> list[tuple[str, bool]]:
    """(step, is a validation row) of every row of a run's metrics.csv."""
    rows = (run_dir / "metrics.csv").read_text().splitlines()[1:]
    return [(row.split(",")[0], bool(row.split(",")[2])) for row in rows]


def weights(run_dir: Path) -> dict[str, np.ndarray]:
    return load_file(str(run_dir / "last" / "model.safetensors"))


def test_tiny_model_learns_below_unigram_entropy(data_dir, tmp_path):
    out = tmp_path / "run"
    r = run(
        [
            "--data_dir",
            str(data_dir),
            "--out_dir",
            str(out),
            *TINY,
            "--max_steps",
            "250",
            "--batch_size",
            "16",
            "--eval_interval",
            "250",
            "--save_interval",
            "250",
            "--transpose",
            "6",
            "--stretch",
            "0.1",
            "--tensorboard",
        ]
    )
    assert r.returncode == 0, r.stderr
    rows = (out / "metrics.csv").read_text().splitlines()
    val = float([row for row in rows if row.split(",")[2]][-1].split(",")[2])
    # Measured: ~3.98 nats against 4.43 for the corpus and 4.17 for the validation piece's
    # own token frequencies (an oracle unigram model).
    assert val < unigram_entropy(data_dir) - 0.25, val
    assert val < unigram_entropy(data_dir / "val"), val
    for path in (
        "last/config.json",
        "last/model.safetensors",
        "last/state",
        "best/config.json",
        "best/model.safetensors",
    ):
        assert (out / path).exists(), path
    assert list((out / "tb").iterdir())


def test_resume_after_kill_is_bitwise_equal_to_an_uninterrupted_run(data_dir, tmp_path):
    common = [
        "--data_dir",
        str(data_dir),
        *TINY,
        "--max_steps",
        "24",
        "--save_interval",
        "4",
        "--eval_interval",
        "12",
        "--dropout",
        "0.1",
        "--threads",  # bitwise needs a fixed thread count: sums split differently
        "1",
    ]
    full = tmp_path / "full"
    assert run([*common, "--out_dir", str(full)]).returncode == 0

    cut = tmp_path / "cut"
    proc = zygote.start([sys.executable, "train.py", *common, "--out_dir", str(cut)], cwd=ROOT)
    deadline = time.time() + 300
    while time.time() < deadline:
        meta = cut / "last" / "config.json"
        if meta.exists() and '"step": 8' in meta.read_text():
            break
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    r = run(["--out_dir", str(cut), "--resume"])  # the run's own settings, from last/
    assert r.returncode == 0, r.stderr
    assert "note: resumed with" not in r.stdout
    a, b = weights(full), weights(cut)
    assert a.keys() == b.keys()
    assert all(np.array_equal(a[k], b[k]) for k in a)
    # metrics.csv holds each step's rows once, as the uninterrupted run's does
    assert metric_rows(cut) == metric_rows(full)
    assert all(b"\r" not in (run / "metrics.csv").read_bytes() for run in (full, cut))  # LF


def test_a_second_stop_signal_ends_at_once_with_its_status():
    """The first SIGINT/SIGTERM lets the step finish and saves (below); a second one ends
    the run at once, with the shell's status for that signal, not always Ctrl-C's 130."""
    import train
    from perceiver_music.cli import run_script

    run = train.Run.__new__(train.Run)  # the handler reads nothing else
    for sig, code in ((signal.SIGTERM, 143), (signal.SIGINT, 130)):
        run.signal = 0
        run.request_stop(sig, None)
        assert run.signal == sig
        with pytest.raises(SystemExit) as stop:
            run_script(lambda: run.request_stop(sig, None), "interrupted")  # noqa: B023
        assert stop.value.code == code
    with pytest.raises(SystemExit) as stop:  # Ctrl-C anywhere else in a script
        run_script(lambda: (_ for _ in ()).throw(KeyboardInterrupt), "interrupted")
    assert stop.value.code == 130


def test_a_rows_tokens_per_second_leaves_out_validations_and_saves():
    """metrics.csv's and the bar's tokens/s is the rate of the training steps since the
    last row: the minutes of a validation or a save between them do not lower it (they
    did: the row after each validation showed a fraction of the real rate)."""
    from types import SimpleNamespace

    import train

    rows: list[tuple] = []
    run = train.Run.__new__(train.Run)
    run.args = SimpleNamespace(grad_accum=2)
    run.tokens_per_step, run.budget_s, run.step = 1000, 0, 2
    run.previous_s, run.started = 0.0, time.time() - 60  # a minute in, mostly validating
    run.loss_sum, run.loss_n, run.steps_s = 8.0, 4, 0.5  # two steps that took 0.5 s
    run.log = SimpleNamespace(row=lambda *values: rows.append(values),
                              scalars=lambda *values: None)
    run.log_train(1e-3, SimpleNamespace(set_postfix=lambda **shown: None))
    assert rows[0][2] == "2.00000" and rows[0][-1] == "4000", rows
    assert run.steps_s == 0.0 and run.loss_n == 0  # the next row counts from here


@pytest.mark.parametrize(("sig", "code"), [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_a_signal_saves_last_and_says_how_to_resume(data_dir, tmp_path, sig, code):
    out, output = tmp_path / "run", tmp_path / "output.txt"
    proc = zygote.start(
        [
            sys.executable,
            "train.py",
            "--data_dir",
            str(data_dir),
            "--out_dir",
            str(out),
            *TINY,
            "--max_steps",
            "100000",
            "--save_interval",
            "100000",
            "--eval_interval",
            "100000",
        ],
        cwd=ROOT,
        stdout=output,
    )
    deadline = time.time() + 300
    while time.time() < deadline and not (out / "metrics.csv").exists():
        time.sleep(0.05)
    time.sleep(1.0)
    proc.send_signal(sig)
    proc.wait(timeout=120)
    text = output.read_text()  # universal newlines, as a text pipe reads it
    assert proc.returncode == code, text  # the shell's status for the signal, after saving
    # the command to continue is the one that started the run, with --resume
    assert f"Continue with: python train.py --data_dir {data_dir} --out_dir {out}" in text
    assert "--eval_interval 100000 --resume\n" in text, text[-500:]
    assert (out / "last" / "state").is_dir()
    assert "Traceback" not in text and not list(out.glob("last.*"))


def test_max_minutes_stops_and_saves_last(data_dir, tmp_path):
    out = tmp_path / "run"
    r = run(["--data_dir", str(data_dir), "--out_dir", str(out), *TINY, "--max_steps", "100000",
             "--max_minutes", "0.0001"])
    assert r.returncode == 0, r.stderr
    # a budget shorter than any step: one step, or two before the step time is known
    assert '"step": 1,' in (out / "last" / "config.json").read_text() or (
        '"step": 2,' in (out / "last" / "config.json").read_text())
    text = r.stdout + r.stderr
    assert "the schedule is complete" in text and "--resume" not in text  # nothing to resume


def test_width_depth_and_heads_override_the_preset(data_dir, tmp_path):
    """A size sweep's way: --dim/--depth/--heads change the preset's shape, and the
    checkpoint describes the shape it has."""
    out = tmp_path / "run"
    r = run(["--data_dir", str(data_dir), "--out_dir", str(out), *TINY, "--max_steps", "2",
             "--dim", "48", "--depth", "1", "--heads", "3"])
    assert r.returncode == 0, r.stderr
    model = json.loads((out / "last" / "config.json").read_text())["model"]
    assert (model["dim"], model["depth"], model["heads"]) == (48, 1, 3)
    assert model["max_seq_len"] == 64  # the rest is the preset's


def test_the_resume_command_drops_init_and_names_the_launcher(monkeypatch):
    """A fine-tuning run's hint must not keep --init (refused beside --resume); under
    accelerate launch it says where the launch options go."""
    import train

    monkeypatch.setattr(sys, "argv", ["train.py", "--init", "ckpt/demo", "--data_dir",
                                      "my data", "--init=x", "--no-resume"])
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    monkeypatch.delenv("ACCELERATE_MIXED_PRECISION", raising=False)
    assert train.resume_command() == "python train.py --data_dir 'my data' --resume"
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "no")
    assert train.resume_command().startswith("accelerate launch <the same launch options> "
                                             "train.py --data_dir")


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--data_dir", "/nonexistent"], "no such data folder"),
        (["--preset", "huge"], "unknown preset"),
        (["--window", "100"], "longer than the model's context"),
        (["--latents", "64"], "must be smaller than the context"),
        (["--batch_size", "0"], "--batch_size must be at least 1"),
        (["--mixed_precision", "fp8"], "--mixed_precision"),
        (["--depth", "-2"], "--depth must be positive"),
        (["--learning_rate", "-1"], "--learning_rate must be positive"),
        (["--learning_rate", "nan"], "--learning_rate: invalid finite number value: 'nan'"),
        (["--min_lr", "1"], "--min_lr must be in [0, --learning_rate"),
        (["--stretch", "2"], "--stretch must be below 1"),
        (["--transpose", "-1"], "--transpose must not be negative"),
        (["--eval_windows", "-1"], "--eval_windows must not be negative"),
        (["--prefix_fill", "2"], "--prefix_fill must be in [0, 1]"),
        (["--init", "ckpt/demo", "--dim", "128"], "--init takes the checkpoint's shape"),
        (["--bogus"], "unrecognized arguments: --bogus (--help lists the options)"),
    ],
)
def test_bad_settings_get_one_clear_line(data_dir, tmp_path, extra, message):
    """Refused before any work, in one line, and nothing is left in --out_dir (a crash on
    the first step used to leave a metrics.csv that then blocked the retry)."""
    args = ["--data_dir", str(data_dir), "--out_dir", str(tmp_path / "x"), *TINY, *extra]
    r = run(args)
    assert r.returncode != 0
    assert message in r.stderr and "Traceback" not in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "x").exists()


def test_empty_split_is_refused(tmp_path):
    (tmp_path / "train").mkdir()
    (tmp_path / "val").mkdir()
    r = run(["--data_dir", str(tmp_path), "--out_dir", str(tmp_path / "x"), *TINY])
    assert r.returncode != 0 and "no .pickle token files (run prep.py first)" in r.stderr
    assert "Traceback" not in r.stderr
    # prep.py's output whose val/ got no piece (--val_share 0): said so, not "run prep.py"
    (tmp_path / "manifest.jsonl").write_text("")
    (tmp_path / "train" / "a.pickle").write_bytes(pickle.dumps(list(range(1, 200))))
    r = run(["--data_dir", str(tmp_path), "--out_dir", str(tmp_path / "x"), *TINY])
    assert r.stderr.strip() == (
        f"error: {tmp_path / 'val'}: no .pickle token files: prep.py put no piece there "
        "(its manifest.jsonl says where each went); raise --val_share when you run it "
        "again"), r.stderr


def test_symlinked_last_is_resumed_and_stays_a_link(data_dir, tmp_path):
    common = ["--data_dir", str(data_dir), *TINY, "--max_steps", "8", "--save_interval", "4",
              "--eval_interval", "4"]
    out, elsewhere = tmp_path / "run", tmp_path / "big_disk"
    assert run([*common, "--out_dir", str(out), "--max_steps", "4"]).returncode == 0
    (out / "last").rename(elsewhere)
    (out / "last").symlink_to(elsewhere, target_is_directory=True)
    r = run([*common, "--out_dir", str(out), "--resume"])
    assert r.returncode == 0, r.stderr
    assert "note: resumed with --max_steps 8 (the run had 4)" in r.stdout
    assert (out / "last").is_symlink() and '"step": 8' in (elsewhere / "config.json").read_text()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["big_disk", "run"]


@pytest.mark.parametrize("problem", ["read-only", "disk full"])
def test_output_problems_are_one_line_and_leave_no_temporaries(data_dir, tmp_path, problem):
    out = tmp_path / "run"
    out.mkdir()
    if problem == "read-only":
        out.chmod(0o555)
        preexec, message = zygote.without_root_privileges, "Permission denied"
    else:
        preexec, message = zygote.file_size_limit(200_000), "File too large"
    args = ["--data_dir", str(data_dir), "--out_dir", str(out), *TINY, "--max_steps", "4",
            "--save_interval", "2", "--eval_interval", "2"]
    r = run(args, preexec_fn=preexec)
    out.chmod(0o755)
    assert r.returncode == 1, r.stderr
    assert "Traceback" not in r.stderr
    last = r.stderr.strip().splitlines()[-1]
    assert last.startswith("error: ") and message in last, r.stderr
    assert not list(out.glob("last*")) and not list(out.glob(".*"))


def test_a_full_disk_is_reported_on_a_line_of_its_own_in_a_terminal(data_dir, tmp_path):
    """In a terminal the progress bar redraws its line with carriage returns: the error
    line must not start where the bar's text is (a pseudo-terminal shows what a user
    sees)."""
    import fcntl
    import pty
    import select
    import struct
    import termios

    out = tmp_path / "run"
    args = ["--data_dir", str(data_dir), "--out_dir", str(out), *TINY, "--max_steps", "60",
            "--save_interval", "30", "--eval_interval", "100"]  # last/ is saved first
    leader, follower = pty.openpty()
    fcntl.ioctl(follower, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 100, 0, 0))
    terminal = os.ttyname(follower)
    proc = zygote.start([sys.executable, "train.py", *args], cwd=ROOT, stdin=terminal,
                        stdout=terminal, setup=zygote.file_size_limit(200_000))
    chunks, deadline = [], time.monotonic() + 300
    while True:  # the terminal stays open here until the child has ended (it opens the
        try:  # terminal itself, maybe after a close here would have left it with no user)
            status = proc.wait(timeout=0.2)
        except subprocess.TimeoutExpired:
            status = None
            assert time.monotonic() < deadline
        while select.select([leader], [], [], 0)[0]:
            chunks.append(os.read(leader, 65536))
        if status is not None:
            break
    os.close(follower)
    os.close(leader)
    assert status == 1
    text = b"".join(chunks).decode(errors="replace")
    at = text.index("error: ")
    assert "File too large" in text[at:] and "/last/" in text[at:], text[-500:]
    line_before = text[:at].rsplit("\n", 1)[-1]
    assert line_before.rsplit("\r", 1)[-1] == "", repr(line_before[-200:])


def folder_bytes(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*"))
            if p.is_file()}


def refused_in_an_occupied_folder(r: subprocess.CompletedProcess) -> None:
    """``r`` was refused in one line naming --resume and another --out_dir."""
    assert r.returncode != 0
    errors = [line for line in r.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and "already holds a training run" in errors[0], r.stderr
    assert "--resume" in errors[0] and "--out_dir" in errors[0]


def test_a_new_run_never_replaces_one_in_its_folder(data_dir, tmp_path):
    """A second run started into a folder that holds one, without --resume, is refused
    in one line; the first run's files stay byte-identical (under accelerate launch too:
    `test_two_processes_through_accelerate_launch`)."""
    out = tmp_path / "run"
    args = ["--data_dir", str(data_dir), "--out_dir", str(out), *TINY, "--max_steps", "4",
            "--save_interval", "2", "--eval_interval", "2"]
    assert run(args).returncode == 0
    before = folder_bytes(out)
    refused_in_an_occupied_folder(run([*args, "--max_steps", "6"]))
    assert folder_bytes(out) == before


def test_an_unfinished_save_is_tidied_at_the_next_start(data_dir, tmp_path):
    """A save stopped midway (a second Ctrl-C) leaves last.tmp/ beside an intact last/:
    the next start removes it and says so."""
    out = tmp_path / "run"
    args = ["--data_dir", str(data_dir), "--out_dir", str(out), *TINY, "--save_interval",
            "2", "--eval_interval", "2"]
    assert run([*args, "--max_steps", "2"]).returncode == 0
    shutil.copytree(out / "last", out / "last.tmp")
    (out / "last.tmp" / "model.safetensors").write_bytes(b"half written")
    r = run([*args, "--max_steps", "4", "--resume"])
    assert r.returncode == 0, r.stderr
    assert "removed" in r.stdout and "last.tmp" in r.stdout and "unfinished save" in r.stdout
    assert not (out / "last.tmp").exists()
    assert '"step": 4' in (out / "last" / "config.json").read_text()


def launch_two(*args: str) -> subprocess.CompletedProcess:
    launch = "--multi_gpu --num_processes 2 --num_machines 1 --mixed_precision no "
    launch += f"--dynamo_backend no --main_process_port {free_port()}"
    cmd = [sys.executable, "-m", "accelerate.commands.launch", *launch.split(), "train.py",
           *args]
    return zygote.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)


def test_two_processes_through_accelerate_launch(data_dir, tmp_path):
    """Two processes train one model (each with its own RNG); a second run into their
    folder is refused and leaves it as it was; a bad setting both processes meet is one
    line, not two; a problem one process meets alone (its resume state is missing) stops
    both instead of leaving one waiting. (accelerate's launcher then adds its own report
    of the failed command.) One test, as each launch costs two processes' start-up."""
    out = tmp_path / "ddp"
    common = ["--data_dir", str(data_dir), "--out_dir", str(out), *TINY, "--max_steps", "4",
              "--save_interval", "2", "--eval_interval", "2"]
    r = launch_two(*common)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "2 process(es)" in r.stdout
    assert "weights identical across 2 processes: True" in r.stdout
    assert (out / "last" / "state" / "process_1.json").exists()
    # each process seeds its own RNG (its dropout masks differ), the weights stay one
    states = [load_file(str(out / "last" / "state" / f"process_{i}.safetensors"))["torch_cpu"]
              for i in (0, 1)]
    assert not np.array_equal(*states)

    before = folder_bytes(out)
    refused_in_an_occupied_folder(launch_two(*common, "--max_steps", "6"))
    assert folder_bytes(out) == before

    r = launch_two("--data_dir", str(data_dir), "--out_dir", str(tmp_path / "x"), *TINY,
                   "--batch_size", "0")
    assert r.returncode != 0
    assert r.stderr.count("error: --batch_size must be at least 1") == 1, r.stderr

    for f in (out / "last" / "state").glob("process_1.*"):
        f.unlink()
    r = launch_two(*common, "--max_steps", "6", "--resume")
    assert r.returncode != 0
    lines = [line for line in r.stderr.splitlines() if line.startswith("error: ")]
    assert len(lines) == 1 and "process_1.json: missing" in lines[0], r.stderr


def test_a_resume_on_other_validation_data_measures_best_again(data_dir, tmp_path):
    """best/'s loss was measured on the run's validation windows: resumed on other ones
    (another --data_dir, or the data prepared anew), best/'s weights are measured on the
    new windows first, and only a step that beats that replaces best/. The same data
    measures nothing again."""
    import torch

    from perceiver_music.checkpoint import load_checkpoint
    from perceiver_music.data import load_split, validation_windows
    from perceiver_music.model import window_losses

    out, other = tmp_path / "run", tmp_path / "other"
    common = [*TINY, "--out_dir", str(out), "--save_interval", "4", "--eval_interval", "4"]
    assert run(["--data_dir", str(data_dir), *common, "--max_steps", "4"]).returncode == 0
    r = run(["--data_dir", str(data_dir), *common, "--max_steps", "6", "--resume"])
    assert r.returncode == 0 and "windows are not the run's" not in r.stdout, r.stdout
    shutil.copytree(data_dir, other)
    for f in (other / "val").iterdir():
        f.unlink()
    piece = sorted((other / "train").iterdir())[0]  # a training piece as validation
    shutil.copy(piece, other / "val" / piece.name)
    best_before = load_checkpoint(out / "best")[0]
    r = run(["--data_dir", str(other), *common, "--max_steps", "8", "--resume"])
    assert r.returncode == 0, r.stderr
    line = next(x for x in r.stdout.splitlines() if "windows are not the run's" in x)
    measured = float(re.search(r"best/ measured on them, ([\d.]+) nats", line).group(1))
    cfg = load_checkpoint(out / "last")[1]
    tokens, mask = validation_windows(load_split(other / "val"), cfg.max_seq_len,
                                      cfg.cross_attn_seq_len, 256)
    with torch.no_grad():
        total, count = window_losses(best_before.eval(), tokens, mask, 8)
    assert measured == pytest.approx(total / count, abs=1e-3)
    config = json.loads((out / "last" / "config.json").read_text())
    assert config["best_val_loss"] <= measured + 1e-9


def test_a_time_budget_anneals_and_ends_with_validation(data_dir, tmp_path):
    out = tmp_path / "run"
    r = run(["--data_dir", str(data_dir), "--out_dir", str(out), *TINY, "--max_steps",
             "1000000", "--max_minutes", "0.12", "--min_lr", "3e-5", "--eval_interval",
             "1000000"])
    assert r.returncode == 0, r.stderr
    assert "spent at step" in r.stdout + r.stderr
    rows = [row.split(",") for row in (out / "metrics.csv").read_text().splitlines()[1:]]
    lrs = [float(row[3]) for row in rows if row[1]]
    assert lrs[-1] == pytest.approx(3e-5, rel=1e-3)  # the last step runs at MIN_LR
    assert max(lrs) == pytest.approx(3e-3, rel=0.05)  # after a warmup to the peak
    assert rows[-1][2] and (out / "best" / "config.json").exists()  # validated at the end
    # the final validation ends inside the budget (its time was projected), not after it
    assert 0.5 * 0.12 * 60 <= float(rows[-1][-1]) <= 0.12 * 60 + 1.0
    frames = r.stderr.replace("\r", "\n")
    assert "/7 s [" in frames and "step=" in frames  # the bar counts the budget's seconds
    shown = [line for line in frames.splitlines() if "step=" in line]
    logged = next(i for i, line in enumerate(shown) if "loss=" in line)
    assert all("loss=" in line for line in shown[logged:]), shown  # the loss stays in sight
    assert "100%" in frames  # a full bar at the end of the budget
    peak = lrs.index(max(lrs))  # the warmup only rises, the decay only falls
    assert lrs[:peak + 1] == sorted(lrs[:peak + 1]) and lrs[peak:] == sorted(lrs[peak:])[::-1]
    r = run(["--out_dir", str(out), "--resume"])  # nothing left of the budget
    assert r.returncode == 1 and "spent its time budget of 0.12 min; raise --max_minutes" in (
        r.stderr) and r.stderr.count("\n") == 1


def test_a_resumed_run_takes_its_settings_from_the_run(monkeypatch, tmp_path):
    """inherit_settings: what the command line leaves out comes from last/config.json (or
    from last.old/, which a stopped save leaves and the start restores); what it gives
    anew is named, except the shape, which last/ decides anyway; abbreviations, which
    would hide what was given, are refused."""
    import train

    saved = {"train": {"max_steps": 7, "max_minutes": 0.5, "batch_size": 2, "preset": "tiny",
                       "learning_rate": 1e-4, "data_dir": "elsewhere"}}
    (tmp_path / "last.old").mkdir()  # a save stopped between its two renames
    (tmp_path / "last.old" / "config.json").write_text(json.dumps(saved))
    argv = ["--out_dir", str(tmp_path), "--resume", "--batch_size", "3", "--preset", "demo"]
    monkeypatch.setattr(sys, "argv", ["train.py", *argv])
    args = train.parse_constants(train.__file__, vars(train), None)
    notes = train.inherit_settings(args)
    assert (args.max_steps, args.max_minutes, args.learning_rate, args.data_dir) == (
        7, 0.5, 1e-4, "elsewhere")
    assert (args.batch_size, args.preset) == (3, "demo")
    assert notes == ["note: resumed with --batch_size 3 (the run had 2)"]
    r = run(["--out_dir", str(tmp_path), "--resume", "--max_min", "1"])
    assert r.returncode == 2 and "unrecognized arguments: --max_min 1" in r.stderr


def test_min_lr_is_a_tenth_of_a_lower_learning_rate(monkeypatch):
    """Without --min_lr, a --learning_rate below the default's takes a tenth of itself as
    the minimum (as README says), unless a resumed run keeps its own."""
    import train

    for argv, resume, expected in ((["--learning_rate", "1e-4"], False, 1e-5),
                                   (["--learning_rate", "1e-4", "--min_lr", "2e-5"], False, 2e-5),
                                   (["--learning_rate", "1e-3"], False, train.MIN_LR),
                                   ([], True, 7e-6)):
        monkeypatch.setattr(sys, "argv", ["train.py", *argv])
        args = train.parse_constants(train.__file__, vars(train), None)
        if resume:  # inherited from the run: lr 1e-4, min_lr 7e-6
            args.resume, args.learning_rate, args.min_lr = True, 1e-4, 7e-6
        train.check_settings(args)
        assert args.min_lr == pytest.approx(expected), argv


def test_a_budget_spent_mostly_on_validation_says_so():
    """The note when validations and saves took over half the run's budget (on real
    runs whether they do depends on the machine's speed, so the rule is tested here)."""
    from train import overhead_note

    assert overhead_note(10.0, 30.0, 50) is None
    note = overhead_note(20.0, 30.0, 2)
    assert note and "took 20 s of the 30 s this run had, training 2 steps" in note
    assert "a smaller --eval_windows or a larger --eval_interval" in note


def test_the_last_step_of_a_budget_is_at_the_end_of_the_schedule():
    """lr_at on an injected clock: warmup by WARMUP_SHARE of the budget, MIN_LR at its end
    (and after it), whatever the step count says."""
    from types import SimpleNamespace

    from train import lr_at

    args = SimpleNamespace(max_minutes=1.0, warmup_share=0.1, warmup_steps=1000,
                           learning_rate=1e-3, min_lr=1e-5, max_steps=10**6)
    assert lr_at(0, args, 0.0) == pytest.approx(1e-3 / 1000)
    assert lr_at(5, args, 6.0) == pytest.approx(1e-3)  # warmup over at 10 % of 60 s
    assert lr_at(10, args, 33.0) == pytest.approx((1e-3 + 1e-5) / 2)  # halfway down
    assert lr_at(11, args, 60.0) == lr_at(12, args, 75.0) == pytest.approx(1e-5)
    # the warmup follows the time at the end of the step, the decay that plus the final
    # validation and save (an estimate, before one is measured: it must not end the warmup)
    assert lr_at(0, args, 0.0, 30.0) == pytest.approx(1e-3 / 1000)
    assert lr_at(10, args, 30.0, 33.0) == pytest.approx((1e-3 + 1e-5) / 2)


def test_auto_preset_and_threads_on_a_cpu(data_dir, tmp_path):
    """Without a GPU, auto picks the demo preset, and accelerate launch's
    OMP_NUM_THREADS=1 does not leave the other cores idle."""
    assert "demo" in run(["--help"]).stdout
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", "1",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
           "train.py", "--data_dir", str(data_dir), "--out_dir", str(tmp_path / "run"),
           "--max_steps", "1", "--batch_size", "1", "--eval_windows", "2", "--no-tensorboard"]
    r = zygote.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert "model: demo" in r.stdout
    cores = len(os.sched_getaffinity(0))
    assert (f"(1 or {cores} threads each, chosen by timing steps)" if cores > 1
            else "(1 threads each)") in r.stdout


def test_bf16_mixed_precision_trains(data_dir, tmp_path):
    """--mixed_precision bf16 runs the whole loop under autocast (on a GPU: flash
    attention); checkpoints keep float32 weights."""
    out = tmp_path / "bf16"
    r = run(["--data_dir", str(data_dir), "--out_dir", str(out), *TINY, "--cpu",
             "--mixed_precision", "bf16", "--max_steps", "10", "--eval_interval", "10"])
    assert r.returncode == 0, r.stderr
    assert "mixed precision bf16" in r.stdout
    with open(out / "metrics.csv") as fh:
        losses = [float(row[1]) for row in csv.reader(fh) if row[1] and row[0] != "step"]
    assert losses and all(np.isfinite(losses))
    assert all(w.dtype == np.float32 for w in weights(out).values())


@pytest.mark.parametrize(("launched", "gpu_bf16", "choice", "expected"), [
    (None, True, "auto", "bf16"),  # plain python on a bf16 GPU
    ("no", True, "auto", "bf16"),  # accelerate launch's default export is not a choice
    ("fp16", True, "auto", "fp16"),  # accelerate launch --mixed_precision fp16
    ("bf16", False, "auto", "bf16"),
    ("no", False, "auto", "no"),  # a CPU, or a GPU without bf16
    ("bf16", True, "no", "no"),  # train.py's own setting wins
])
def test_mixed_precision_auto_under_a_simulated_accelerate_launch(monkeypatch, launched,
                                                                  gpu_bf16, choice, expected):
    from types import SimpleNamespace

    import torch

    import train

    if launched is None:
        monkeypatch.delenv("ACCELERATE_MIXED_PRECISION", raising=False)
    else:
        monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", launched)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: gpu_bf16)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: gpu_bf16)
    monkeypatch.setattr(train, "cpu_only", lambda cpu: not gpu_bf16)
    args = SimpleNamespace(mixed_precision=choice, cpu=False)
    assert train.mixed_precision(args) == {"mixed_precision": expected}


def test_init_fine_tunes_from_a_checkpoint_with_a_new_schedule(data_dir, tmp_path):
    """--init CKPT: the new run starts from that checkpoint's weights and shape (its first
    validation is as good as the checkpoint, not a random model's), at step 0 with its own
    schedule, in a new folder; with --resume it is refused."""
    first = tmp_path / "first"
    base = ["--data_dir", str(data_dir), *TINY, "--eval_interval", "20", "--save_interval",
            "20"]
    assert run([*base, "--out_dir", str(first), "--max_steps", "40"]).returncode == 0
    trained = float((first / "metrics.csv").read_text().splitlines()[-1].split(",")[2])
    second = tmp_path / "second"
    r = run([*base, "--out_dir", str(second), "--max_steps", "1", "--eval_interval", "1",
             "--init", str(first / "last"), "--preset", "demo", "--learning_rate", "1e-9"])
    assert r.returncode == 0, r.stderr
    assert f"model: from {first / 'last'}" in r.stdout and "context 64" in r.stdout
    assert "note: --preset demo is not used: --init takes the checkpoint's shape" in r.stdout
    assert "note: --warmup_steps 5 exceeds --max_steps 1" in r.stdout
    rows = (second / "metrics.csv").read_text().splitlines()
    start = rows[1].split(",")  # validated before the first step: the loss to beat
    assert start[0] == "0" and float(start[2]) == pytest.approx(trained, abs=1e-4)
    assert "step 0: validation loss" in r.stdout and "(the starting weights" in r.stdout
    val = float(rows[-1].split(",")[2])
    assert val == pytest.approx(trained, abs=0.05)  # the same weights, not a fresh model
    assert '"step": 1,' in (second / "last" / "config.json").read_text()
    # a fine-tuning that makes things worse: best/ keeps the starting weights, and says so
    worse = tmp_path / "worse"
    r = run([*base, "--out_dir", str(worse), "--max_steps", "3", "--eval_interval", "3",
             "--init", str(first / "last"), "--learning_rate", "0.5", "--warmup_steps", "1"])
    assert r.returncode == 0, r.stderr
    assert "no step beat the weights the run started from" in r.stdout.strip().splitlines()[-1]
    r = run(["--out_dir", str(worse), "--resume", "--max_steps", "6"])  # a second sitting
    assert r.returncode == 0, r.stderr
    assert "no step beat the weights the run started from" in r.stdout.strip().splitlines()[-1]
    assert '"step": 0,' in (worse / "best" / "config.json").read_text()
    import torch
    from safetensors.torch import load_file

    kept, started = (load_file(f / "model.safetensors") for f in (worse / "best", first / "last"))
    assert kept.keys() == started.keys()
    assert all(torch.equal(kept[k], started[k]) for k in kept)
    r = run([*base, "--out_dir", str(second), "--init", str(first / "last"), "--resume"])
    assert r.returncode == 1 and "choose one" in r.stderr
    r = run([*base, "--out_dir", str(second), "--init", str(first / "last")])  # once more
    refused_in_an_occupied_folder(r)  # and told the --resume that works
    assert "continue it with --resume in place of --init, or" in r.stderr
