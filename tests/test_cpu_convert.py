"""cpu_convert.py and safe checkpoint loading, on every kind of source built here."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import zygote

from perceiver_music.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from perceiver_music.config import preset
from perceiver_music.model import build_model, forward

ROOT = Path(__file__).resolve().parent.parent
TINY_FLAGS = ["--heads", "2", "--prefix", "32"]  # what shapes cannot tell for the tiny preset


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return build_model(preset("tiny")).eval()


def convert(*args) -> subprocess.CompletedProcess:
    return zygote.run([sys.executable, "cpu_convert.py", *map(str, args)], cwd=ROOT,
                      capture_output=True, text=True, timeout=300)


def same_logits(a, b) -> bool:
    x = torch.randint(0, 388, (2, 64), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        return torch.equal(forward(a, x), forward(b, x))


def check_converted(r, dest: Path, model) -> None:
    assert r.returncode == 0, r.stderr
    assert "max logit difference 0" in r.stdout
    assert {p.name for p in dest.iterdir()} == {"config.json", "model.safetensors"}
    converted, cfg, _ = load_checkpoint(dest)
    assert (cfg.heads, cfg.cross_attn_seq_len, cfg.dim_head) == (2, 32, 32)
    assert same_logits(model, converted)


class FakeXlaTensor:
    """Pickles like a tensor that lives on a TPU (torch_xla's reduction), without torch_xla."""

    def __init__(self, t: torch.Tensor):
        self.t = t

    def __reduce_ex__(self, protocol):
        return (torch._utils._rebuild_device_tensor_from_numpy,
                (self.t.numpy(), self.t.dtype, "xla:0", False))


class Evil:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_project_checkpoint(model, tmp_path):
    save_checkpoint(tmp_path / "src", model, preset("tiny"), {"step": 5})
    r = convert(tmp_path / "src", tmp_path / "dest")
    check_converted(r, tmp_path / "dest", model)
    assert "from its config" in r.stdout


def test_accelerate_state_folder(model, tmp_path):
    from accelerate import Accelerator

    acc = Accelerator(cpu=True)
    wrapped = acc.prepare(build_model(preset("tiny")))
    wrapped.load_state_dict(model.state_dict())
    acc.save_state(str(tmp_path / "state"))
    check_converted(convert(tmp_path / "state", tmp_path / "dest", *TINY_FLAGS),
                    tmp_path / "dest", model)


def test_original_pth_with_module_prefixes_and_optimizer(model, tmp_path):
    opt = torch.optim.Adam(model.parameters())
    state = {"module." + k: v for k, v in model.state_dict().items()}
    torch.save({"state_dict": state, "optimizer": opt.state_dict(), "epoch": 3},
               tmp_path / "model.pth")
    r = convert(tmp_path / "model.pth", tmp_path / "dest", *TINY_FLAGS)
    check_converted(r, tmp_path / "dest", model)
    assert "(shapes, with the given heads and prefix)" in r.stdout
    # generate.py on the result does not call the given heads and prefix assumed
    g = zygote.run([sys.executable, "generate.py", "--ckpt", str(tmp_path / "dest"),
                    "--new_tokens", "2", "--seconds", "0", "--no-audio", "--out_dir",
                    str(tmp_path / "takes")], cwd=ROOT, capture_output=True, text=True,
                   timeout=300)
    assert g.returncode == 0 and "shapes, with the given heads and prefix" in g.stderr, (
        g.stderr)
    for bad in (["--heads", "0"], ["--prefix", "0"]):  # one line, not a ZeroDivisionError
        r = convert(tmp_path / "model.pth", tmp_path / "no", *bad)
        assert r.returncode == 1 and len(r.stderr.strip().splitlines()) == 1, r.stderr
        assert f"{bad[0]} must be a whole number of at least 1, got 0" in r.stderr
    with pytest.raises(CheckpointError, match="--heads must be a whole number"):
        load_checkpoint(tmp_path / "model.pth", heads="4")
    # a checkpoint with a config.json is what it says: other heads or prefix are refused
    with pytest.raises(CheckpointError, match="config.json says heads 2 and prefix 32; "):
        load_checkpoint(tmp_path / "dest", heads=8, prefix=100)
    assert load_checkpoint(tmp_path / "dest", heads=2, prefix=32)[1].heads == 2  # the same
    # without --heads and --prefix the result is a guess (a 4-head model read as 8 heads
    # of half the width), and the line says so
    four = build_model(preset("tiny", heads=4, dim_head=64))
    torch.save({"state_dict": four.state_dict()}, tmp_path / "four.pth")
    r = convert(tmp_path / "four.pth", tmp_path / "guessed")
    assert r.returncode == 0, r.stderr
    assert ("heads 8 (shapes; heads and prefix assumed (see --heads and --prefix): "
            "give --heads and --prefix if the model used others)") in r.stdout


def test_tensors_saved_on_xla_are_rebuilt_on_cpu(model, tmp_path):
    state = {k: FakeXlaTensor(v) for k, v in model.state_dict().items()}
    torch.save({"state_dict": state}, tmp_path / "tpu.pth")
    with pytest.raises(Exception):  # noqa: B017 - plain torch cannot rebuild it without XLA
        torch.load(tmp_path / "tpu.pth", weights_only=False)
    check_converted(convert(tmp_path / "tpu.pth", tmp_path / "dest", *TINY_FLAGS),
                    tmp_path / "dest", model)


def test_malicious_pickle_is_refused_and_never_runs(tmp_path):
    marker = tmp_path / "pwned"
    torch.save({"state_dict": {"token_emb.weight": Evil(marker)}}, tmp_path / "evil.pth")
    r = convert(tmp_path / "evil.pth", tmp_path / "dest")
    assert r.returncode != 0
    assert "refuses global" in r.stderr and "system" in r.stderr
    assert "Traceback" not in r.stderr and len(r.stderr.strip().splitlines()) == 1
    assert not marker.exists() and not (tmp_path / "dest").exists()
    with pytest.raises(CheckpointError, match="refuses global"):
        load_checkpoint(tmp_path / "evil.pth")
    assert not marker.exists()


@pytest.mark.parametrize("kind", ["truncated", "text", "not_state_dict", "wrong_prefix",
                                  "bad_heads", "assumed_heads", "missing", "dest_exists"])
def test_bad_sources_fail_with_one_line(model, tmp_path, kind):
    src, extra = tmp_path / "src.pth", list(TINY_FLAGS)
    torch.save({"state_dict": model.state_dict()}, src)
    dest = tmp_path / "dest"
    message = {
        "truncated": "not a readable checkpoint",
        "text": "not a readable checkpoint",
        "not_state_dict": "no state dict of tensors",
        "wrong_prefix": "--prefix 64 must be between",
        "bad_heads": "not divisible by --heads 3",
        "assumed_heads": "108 is not divisible by the 8 heads assumed without a config: give "
                         "--heads (one of 1, 2, 3: heads of 32 dimensions or more)",
        "missing": "does not exist",
        "dest_exists": "already exists",
    }[kind]
    if kind == "truncated":
        src.write_bytes(src.read_bytes()[:2000])
    elif kind == "text":
        src.write_text("hello, this is not a checkpoint")
    elif kind == "not_state_dict":
        torch.save({"state_dict": {"a": 1}}, src)
    elif kind == "wrong_prefix":
        extra = ["--heads", "2", "--prefix", "64"]
    elif kind == "bad_heads":
        extra = ["--heads", "3"]
    elif kind == "assumed_heads":  # 3 heads of 36: a width of 108, which 8 does not divide
        torch.save(build_model(preset("tiny", heads=3, dim_head=36)).state_dict(), src)
        extra = []
    elif kind == "missing":
        src = tmp_path / "nowhere.pth"
    elif kind == "dest_exists":
        dest.mkdir()
    r = convert(src, dest, *extra)
    assert r.returncode != 0
    assert message in r.stderr, r.stderr
    assert "Traceback" not in r.stderr and len(r.stderr.strip().splitlines()) == 1
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".dest")]


def test_generate_runs_on_a_converted_checkpoint_and_reads_pth_directly(model, tmp_path):
    torch.save({"state_dict": model.state_dict()}, tmp_path / "m.pth")
    assert convert(tmp_path / "m.pth", tmp_path / "dest", *TINY_FLAGS).returncode == 0
    torch.save({"state_dict": build_model(preset("tiny", heads=4, dim_head=64)).state_dict()},
               tmp_path / "four.pth")
    for name, ckpt in (("g", tmp_path / "dest"), ("p", tmp_path / "four.pth")):
        r = zygote.run([sys.executable, "generate.py", "--ckpt", str(ckpt), "--primer",
                            str(ROOT / "tests/data/scn15_4.mid"), "--new_tokens", "20",
                            "--out_dir", str(tmp_path / "out"), "--name", name, "--seed", "1",
                            "--no-audio"],
                           cwd=ROOT, capture_output=True, text=True, timeout=300)
        assert r.returncode == 0, r.stderr
        assert (tmp_path / "out" / name / "full.mid").exists()
    # a .pth names neither heads nor prefix: generate.py says what it assumed
    assert f"{tmp_path / 'four.pth'}: heads 8, prefix 32: shapes; heads and prefix assumed" \
        in r.stderr
    loaded, cfg, meta = load_checkpoint(tmp_path / "m.pth", heads=2, prefix=32)
    assert meta["inferred"] and same_logits(model, loaded)
    assert np.isclose(cfg.ff_mult, 4)


def test_force_replaces_the_folder_a_symlinked_dest_points_to(model, tmp_path):
    save_checkpoint(tmp_path / "src", model, preset("tiny"), {"step": 5})
    real, link = tmp_path / "real", tmp_path / "link"
    real.mkdir()
    (real / "old.txt").write_text("old")
    link.symlink_to(real, target_is_directory=True)
    r = convert(tmp_path / "src", link, "--force")
    check_converted(r, link, model)
    assert link.is_symlink() and not (real / "old.txt").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["link", "real", "src"]
