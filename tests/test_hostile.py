"""Untrusted checkpoints, configs and data: nothing in them runs, nothing absurd allocates,
and every problem is one line. Each hostile payload would create a marker file if it ran.
"""

from __future__ import annotations

import json
import math
import pickle
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import zygote
from hostile import Payload, hostile_files
from safetensors.torch import save_file

from perceiver_music.checkpoint import (
    CheckpointError,
    load_checkpoint,
    load_train_state,
    save_checkpoint,
    save_train_state,
)
from perceiver_music.config import preset
from perceiver_music.data import DataError, load_token_file
from perceiver_music.model import build_model
from perceiver_music.safe_pickle import read_torch_file

ROOT = Path(__file__).resolve().parent.parent
PRIMER = ROOT / "tests" / "data" / "scn15_4.mid"


@pytest.fixture(scope="module")
def attacks(tmp_path_factory) -> tuple[dict[str, Path], Path]:
    folder = tmp_path_factory.mktemp("hostile")
    marker = folder / "PWNED"
    return hostile_files(folder / "files", marker), marker


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("tiny") / "ckpt"
    save_checkpoint(folder, build_model(preset("tiny")), preset("tiny"), {"step": 3})
    return folder


def script(*args: str, cwd: Path = ROOT) -> subprocess.CompletedProcess:
    return zygote.run([sys.executable, *args], cwd=cwd, capture_output=True, text=True,
                      timeout=300)


def one_line_failure(r: subprocess.CompletedProcess, *needles: str) -> None:
    assert r.returncode != 0, r.stdout
    assert "Traceback" not in r.stderr, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), r.stderr
    for needle in needles:
        assert needle in lines[0], lines[0]


def optimizer_for(model: torch.nn.Module) -> torch.optim.Optimizer:
    return torch.optim.AdamW(model.parameters(), lr=1e-3)


# ---------------------------------------------------------------------------------------
# every attack through every loader, in-process


def test_every_attack_is_refused_by_every_loader(attacks, tmp_path):
    files, marker = attacks
    model = build_model(preset("tiny"))
    for name, path in files.items():
        for suffix in (".pt", ".pth", ".ckpt", ".bin"):
            copy = tmp_path / f"{path.stem}{suffix}"
            shutil.copy(path, copy)
            with pytest.raises(CheckpointError) as err:
                load_checkpoint(copy)
            assert len(str(err.value).splitlines()) == 1, name
        with pytest.raises(Exception) as err:  # noqa: PT011 - the two refusal types
            read_torch_file(path)
        assert type(err.value).__name__ in ("UnsafePickleError", "TorchFileError"), name
        # an accelerate state folder holding only the model as pytorch_model.bin
        state = tmp_path / f"state_{path.stem}"
        state.mkdir()
        shutil.copy(path, state / "pytorch_model.bin")
        with pytest.raises(CheckpointError, match="pytorch_model.bin"):
            load_checkpoint(state)
        # the optimizer and RNG states of an older run's last/state
        shutil.copy(path, state / "optimizer.bin")
        with pytest.raises(CheckpointError, match="optimizer.bin"):
            load_train_state(state, optimizer_for(model), 0)
        torch.save(optimizer_for(model).state_dict(), state / "optimizer.bin")
        shutil.copy(path, state / "random_states_0.pkl")
        with pytest.raises(CheckpointError, match="random_states_0.pkl"):
            load_train_state(state, optimizer_for(model), 0)
    assert not marker.exists()


def test_token_files_allow_no_global_at_all(tmp_path):
    marker = tmp_path / "PWNED"
    evil = tmp_path / "evil.pickle"
    evil.write_bytes(pickle.dumps([1, 2, Payload(marker)]))
    with pytest.raises(DataError, match="refuses global posix.system"):
        load_token_file(evil)
    assert not marker.exists()


# ---------------------------------------------------------------------------------------
# the scripts: cpu_convert.py, generate.py, train.py --resume, train.py on hostile data


@pytest.mark.parametrize("attack", ["zip data.pkl", "legacy sys_info record",
                                    "torchscript constants.pkl"])
def test_cpu_convert_refuses_with_one_line(attacks, tmp_path, attack):
    files, marker = attacks
    r = script("cpu_convert.py", str(files[attack]), str(tmp_path / "out"))
    one_line_failure(r, str(files[attack]))
    assert not marker.exists() and not (tmp_path / "out").exists()
    assert not list(tmp_path.iterdir())


def test_generate_refuses_a_hostile_file_and_a_hostile_state_folder(attacks, tmp_path):
    files, marker = attacks
    state = tmp_path / "state"
    state.mkdir()
    shutil.copy(files["legacy object"], state / "pytorch_model.bin")
    for ckpt in (files["legacy sys_info record"], state):
        r = script("generate.py", "--ckpt", str(ckpt), "--primer", str(PRIMER), "--out_dir",
                   str(tmp_path / "out"), "--new_tokens", "5")
        one_line_failure(r, "unsafe pickle")
    assert not marker.exists()
    assert not (tmp_path / "out").exists() or not list((tmp_path / "out").iterdir())


def run_folder(tiny: Path, folder: Path) -> Path:
    """A run folder whose last/ is ``tiny`` plus a training state in the current format."""
    shutil.copytree(tiny, folder / "last")
    model, _, _ = load_checkpoint(tiny)
    save_train_state(folder / "last" / "state", optimizer_for(model), 0, {"state": 1})
    return folder


def data_folder(folder: Path) -> Path:
    from midi_processor import encode_midi

    for split in ("train", "val"):
        (folder / split).mkdir(parents=True)
        (folder / split / "piece.pickle").write_bytes(pickle.dumps(encode_midi(PRIMER)))
    return folder


def test_train_resume_refuses_a_hostile_older_state(attacks, tiny, tmp_path):
    files, marker = attacks
    run = run_folder(tiny, tmp_path / "run")
    state = run / "last" / "state"
    for f in state.iterdir():
        f.unlink()
    shutil.copy(files["legacy object"], state / "optimizer.bin")
    data = data_folder(tmp_path / "data")
    r = script("train.py", "--preset", "tiny", "--data_dir", str(data), "--out_dir", str(run),
               "--resume", "--max_steps", "5", "--no-tensorboard")
    one_line_failure(r, "cannot resume", "optimizer.bin", "unsafe pickle")
    assert not marker.exists()


def test_train_refuses_a_hostile_data_pickle(tmp_path):
    marker = tmp_path / "PWNED"
    data = data_folder(tmp_path / "data")
    (data / "train" / "evil.pickle").write_bytes(pickle.dumps([Payload(marker)]))
    r = script("train.py", "--preset", "tiny", "--data_dir", str(data), "--out_dir",
               str(tmp_path / "run"), "--max_steps", "2", "--no-tensorboard")
    one_line_failure(r, "evil.pickle", "refuses global")
    assert not marker.exists()


def test_corrupt_rng_state_is_an_error_not_ignored(tiny, tmp_path):
    run = run_folder(tiny, tmp_path / "run")
    info = run / "last" / "state" / "process_0.json"
    state = json.loads(info.read_text())
    state["numpy_random"][1] = [1, 2, 3]  # 3 keys instead of 624
    info.write_text(json.dumps(state))
    model, _, _ = load_checkpoint(tiny)
    with pytest.raises(CheckpointError, match="corrupt RNG state"):
        load_train_state(run / "last" / "state", optimizer_for(model), 0)
    (run / "last" / "state" / "process_0.safetensors").write_bytes(b"garbage")
    with pytest.raises(CheckpointError, match="process_0.safetensors"):
        load_train_state(run / "last" / "state", optimizer_for(model), 0)


def test_older_accelerate_state_folders_still_resume(tmp_path):
    """A run saved by accelerate's save_state (this toolkit's earlier format) restores its
    optimizer and RNG states through the restricted unpickler."""
    from accelerate import Accelerator

    torch.manual_seed(0)
    model = build_model(preset("tiny"))
    acc = Accelerator(cpu=True)
    wrapped, opt = acc.prepare(model, optimizer_for(model))
    wrapped(torch.randint(0, 388, (2, 64))).sum().backward()
    opt.step()
    acc.save_state(str(tmp_path / "state"))
    (tmp_path / "state" / "data_0.json").write_text('{"position": 7}')
    expected_rng = torch.get_rng_state()
    torch.manual_seed(123)
    fresh = optimizer_for(build_model(preset("tiny")))
    assert load_train_state(tmp_path / "state", fresh, 0) == {"position": 7}
    assert torch.equal(torch.get_rng_state(), expected_rng)
    restored = fresh.state_dict()["state"][0]["exp_avg"]
    assert torch.equal(restored, opt.state_dict()["state"][0]["exp_avg"])


# ---------------------------------------------------------------------------------------
# config.json and weights: bounds before allocation, dtypes, values


@pytest.mark.parametrize(("change", "message"), [
    ({"dim": 10**9}, "dim 1000000000 exceeds"),
    ({"depth": 10**6}, "depth 1000000 exceeds"),
    ({"max_seq_len": 10**12, "cross_attn_seq_len": 32}, "max_seq_len"),
    ({"heads": 0}, "heads must be a positive integer"),
    ({"ff_mult": 1e308}, "ff_mult"),
    ({"ff_mult": float("nan")}, "ff_mult"),
    ({"dropout": float("inf")}, "dropout"),
    ({"dim_head": 10**7}, "dim_head"),
    ({"dim": 16384, "depth": 256}, "over the budget"),  # each size allowed, the total not
])
def test_absurd_configs_are_refused_before_allocation(tiny, tmp_path, change, message):
    folder = tmp_path / "ckpt"
    shutil.copytree(tiny, folder)
    config = json.loads((folder / "config.json").read_text())
    config["model"].update(change)
    (folder / "config.json").write_text(json.dumps(config))  # NaN/Infinity as JSON allows
    with pytest.raises(CheckpointError, match=message) as err:
        load_checkpoint(folder)
    assert len(str(err.value).splitlines()) == 1


def test_absurd_config_through_generate_is_one_line(tiny, tmp_path):
    folder = tmp_path / "ckpt"
    shutil.copytree(tiny, folder)
    config = json.loads((folder / "config.json").read_text())
    config["model"]["max_seq_len"] = 10**15
    (folder / "config.json").write_text(json.dumps(config))
    r = script("generate.py", "--ckpt", str(folder), "--primer", str(PRIMER), "--out_dir",
               str(tmp_path / "out"))
    one_line_failure(r, "max_seq_len")


@pytest.mark.parametrize("content", [
    "[" * 100_000 + "]" * 100_000,  # nesting deeper than the parser's recursion limit
    '{"model": ' + " " * (2 << 20) + "{}}",  # larger than any config
    "\udcff".encode("utf-8", "surrogateescape").decode("latin-1"),
])
def test_malformed_config_files_are_one_line(tiny, tmp_path, content):
    folder = tmp_path / "ckpt"
    shutil.copytree(tiny, folder)
    (folder / "config.json").write_text(content, encoding="latin-1")
    with pytest.raises(CheckpointError) as err:
        load_checkpoint(folder)
    assert len(str(err.value).splitlines()) == 1


@pytest.mark.parametrize(("value", "message"), [
    (torch.zeros(390, 64, dtype=torch.int64), "dtype torch.int64; weights must be floating"),
    (torch.full((390, 64), math.nan), "NaN or infinite"),
    (torch.full((390, 64), math.inf, dtype=torch.float16), "NaN or infinite"),
])
def test_non_float_and_non_finite_weights_are_refused(tiny, tmp_path, value, message):
    model, _, _ = load_checkpoint(tiny)
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    state["token_emb.weight"] = value
    folder = tmp_path / "ckpt"
    shutil.copytree(tiny, folder)
    save_file(state, str(folder / "model.safetensors"))
    torch.save({"state_dict": state}, tmp_path / "model.pth")
    for source in (folder, tmp_path / "model.pth"):
        with pytest.raises(CheckpointError, match=message):
            load_checkpoint(source, heads=2, prefix=32)


@pytest.mark.parametrize("defect", ["misshapen", "zero-stride legacy"])
def test_train_resume_refuses_an_optimizer_state_that_does_not_fit(tiny, tmp_path, defect):
    """AdamW moments of another shape, or (an older accelerate optimizer.bin) views that
    repeat one element: torch loads both and fails at the first step; --resume says so
    in one line instead."""
    from types import SimpleNamespace

    from safetensors.torch import load_file

    from train import make_optimizer  # the optimizer train.py resumes into

    model, _, _ = load_checkpoint(tiny)
    optimizer = make_optimizer(model, SimpleNamespace(weight_decay=0.1, learning_rate=1e-3))
    model(torch.randint(0, 388, (2, 64))).sum().backward()
    optimizer.step()
    run = tmp_path / "run"
    shutil.copytree(tiny, run / "last")
    state = run / "last" / "state"
    save_train_state(state, optimizer, 0, {"state": 1})
    if defect == "misshapen":
        tensors = load_file(state / "optimizer.safetensors")
        tensors["0.exp_avg"] = torch.zeros(3, 5)
        save_file(tensors, state / "optimizer.safetensors")
        needles = ("cannot resume", "exp_avg of parameter 0 has shape (3, 5)")
    else:
        for f in state.iterdir():
            f.unlink()
        legacy = optimizer.state_dict()
        moments = legacy["state"][0]
        moments["exp_avg"] = torch.zeros(1).expand_as(moments["exp_avg"])
        torch.save(legacy, state / "optimizer.bin")
        needles = ("cannot resume", "optimizer.bin", "zero-stride")
    r = script("train.py", "--preset", "tiny", "--data_dir", str(data_folder(tmp_path / "d")),
               "--out_dir", str(run), "--resume", "--max_steps", "5", "--no-tensorboard")
    one_line_failure(r, *needles)


@pytest.mark.parametrize("kind", ["fifo", "device"])
def test_a_pipe_or_device_given_as_a_checkpoint_is_named(tiny, tmp_path, kind):
    """Neither is read (a FIFO would block, /dev/zero never ends): the line says what it is."""
    import os

    if kind == "fifo":
        os.mkfifo(tmp_path / "model.pth")
        path, what = tmp_path / "model.pth", "named pipe"
    else:
        path, what = Path("/dev/zero"), "character device"
    r = script("generate.py", "--ckpt", str(path), "--primer", str(PRIMER), "--no-audio")
    one_line_failure(r, str(path), what)
    folder = tmp_path / "ckpt"
    shutil.copytree(tiny, folder)
    (folder / "config.json").unlink()
    os.mkfifo(folder / "config.json")
    r = script("generate.py", "--ckpt", str(folder), "--primer", str(PRIMER), "--no-audio")
    one_line_failure(r, "config.json: not a regular file (it is a named pipe")
