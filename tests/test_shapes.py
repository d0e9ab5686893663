"""Every model shape decodes: attention widths (heads x dim_head) below, equal to and above
dim, 1-4 heads, several cross-attention layers, odd dims, and each preset's proportions,
through every engine path that runs on a CPU, each step compared with the library."""

from __future__ import annotations

import copy

import pytest
import torch
import zygote

from midi_processor.vocab import PAD
from perceiver_music.config import PRESETS, ModelConfig, preset
from perceiver_music.engine import StepInfo, generate
from perceiver_music.model import DecodeCache, build_model, decode_step, forward

TOL = 1e-4
CONTEXT = 48  # every test model's max_seq_len


def tiny_like(name: str) -> dict:
    """A preset's proportions at test size: its attention width / dim and prefix /
    context ratios, with at most two heads of 32."""
    p = PRESETS[name]
    heads = min(p["heads"], 2)
    width = p["heads"] * p.get("dim_head", 64)
    return dict(dim=heads * 32 * p["dim"] // width, heads=heads, dim_head=32, depth=2,
                max_seq_len=CONTEXT,
                cross_attn_seq_len=round(CONTEXT * p["cross_attn_seq_len"] / p["max_seq_len"]))


GRID = {  # name: (dim, heads, dim_head, perceive_depth)
    "narrower, 1 head": (64, 1, 32, 1),
    "narrower, 2 heads": (96, 2, 32, 1),
    "equal": (64, 2, 32, 1),
    "wider, 4 heads": (48, 4, 32, 1),
    "odd dim, 3 heads, 2 cross layers": (33, 3, 32, 2),
    "narrower, 2 cross layers": (80, 2, 40, 2),
}
SHAPES = {name: dict(dim=d, heads=h, dim_head=dh, perceive_depth=pd, depth=3,
                     max_seq_len=CONTEXT, cross_attn_seq_len=24)
          for name, (d, h, dh, pd) in GRID.items()}
SHAPES.update({f"{name} proportions": tiny_like(name) for name in PRESETS if name != "tiny"})


def shaped_model(shape: dict, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return build_model(ModelConfig(**shape)).eval()


def primer_of(length: int, seed: int = 0) -> list[int]:
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, PAD, (length,), generator=gen).tolist()


def worst_step_error(model: torch.nn.Module, prefix_len: int | None = None,
                     **kwargs: object) -> float:
    """Generate with ``kwargs`` and return the largest logit difference from the
    library's forward on each step's reported window (with that prefix length)."""
    reference = copy.copy(model)
    if prefix_len is not None:
        reference.cross_attn_seq_len = prefix_len
    worst = [0.0]

    def check(info: StepInfo) -> None:
        with torch.no_grad():
            expected = reference(info.window, prefix_mask=info.prefix_mask)[:, -1]
        worst[0] = max(worst[0], (expected - info.logits).abs().max().item())

    generate(model, on_step=check, stop_on_end=False, cross_attn_seq_len=prefix_len,
             **kwargs)
    return worst[0]


@pytest.mark.parametrize("shape", SHAPES.values(), ids=SHAPES.keys())
def test_every_engine_path_matches_the_library(shape, monkeypatch):
    """Re-encodes (a short stride over 3 contexts), PAD prefixes, samples that share their
    primer's reads, beam search and a prefix length chosen at generation: every step's
    logits equal the library's; int8 weights stay close to them."""
    import perceiver_music.model as model_module

    monkeypatch.setattr(model_module, "SHARED_MIN", 1)  # shared reads for any run length
    model = shaped_model(shape, seed=len(shape) + shape["dim"])
    steps = 3 * CONTEXT
    n = CONTEXT - model.cross_attn_seq_len
    assert worst_step_error(model, primer=primer_of(10), max_new_tokens=steps, stride=min(5, n),
                            num_samples=2, seed=1) <= TOL
    assert worst_step_error(model, primer=primer_of(60), max_new_tokens=CONTEXT,
                            num_beams=3) <= TOL
    assert worst_step_error(model, prefix_len=CONTEXT - 8, primer=primer_of(30),
                            max_new_tokens=CONTEXT, stride=3, num_samples=2, seed=2) <= TOL
    assert worst_step_error(model, primer=primer_of(30), max_new_tokens=20, seed=3,
                            precision="int8") <= 0.05


@pytest.mark.parametrize("shape", [SHAPES["narrower, 2 cross layers"],
                                   SHAPES["wider, 4 heads"]], ids=["narrower", "wider"])
def test_static_step_follows_the_attention_width(shape):
    """The step a CUDA graph captures (a tensor position, whole-cache reads) on CPU."""
    model = shaped_model(shape)
    m = model.cross_attn_seq_len
    tokens = torch.tensor([primer_of(CONTEXT, seed) for seed in (1, 2)])
    prefix_mask = torch.ones(2, m, dtype=torch.bool)
    prefix_mask[0, :5] = False
    with torch.no_grad():
        reference = model(tokens, prefix_mask=prefix_mask)[:, 1:]
        cache = DecodeCache(model, 2)
        forward(model, tokens[:, : m + 1], prefix_mask, cache=cache)
        steps = [decode_step(model, tokens[:, p], torch.tensor(p), cache)
                 for p in range(m + 1, CONTEXT)]
    torch.testing.assert_close(torch.stack(steps, dim=1), reference, atol=TOL, rtol=TOL)


def test_the_tiny_proportions_are_the_presets():
    for name in PRESETS:
        if name == "tiny":
            continue
        small, real = tiny_like(name), PRESETS[name]
        width = real["heads"] * real.get("dim_head", 64)
        assert small["heads"] * small["dim_head"] / small["dim"] == width / real["dim"]
        assert abs(small["cross_attn_seq_len"] / CONTEXT
                   - real["cross_attn_seq_len"] / real["max_seq_len"]) < 0.02


@pytest.mark.parametrize("name", ["ctx2048", "ctx4096", "ctx8192", "ctx16384", "demo"])
def test_api_generates_with_every_presets_real_shape(name):
    """A randomly initialised model of the preset's real size continues a primer through
    the Python API, with several samples, with beam search and with int8 weights."""
    from perceiver_music.api import PerceiverMusic

    cfg = preset(name)
    torch.manual_seed(0)
    model = build_model(cfg).eval()
    music = PerceiverMusic(model, cfg, {"model": cfg.to_dict()}, name)
    primer = primer_of(40)
    take = music.generate(primer, seconds=None, max_new_tokens=3, num_samples=2, seed=1,
                          stop_at_end=False)
    assert [len(c) for c in take.continuations] == [3, 3]
    beams = music.generate(primer, seconds=None, max_new_tokens=2, num_beams=2,
                           stop_at_end=False)
    assert len(beams.continuations[0]) == 2
    quantised = music.generate(primer, seconds=None, max_new_tokens=2, precision="int8",
                               seed=4, stop_at_end=False)
    assert len(quantised.continuations[0]) == 2



@pytest.mark.parametrize("in_features", [33, 40, 48])
def test_int8_weights_of_any_width(in_features):
    """torch's int8 kernel reads rows in blocks of 16: other widths are zero-padded."""
    from perceiver_music.model import cpu_linear

    torch.manual_seed(0)
    layer = torch.nn.Linear(in_features, 24)
    x = torch.randn(3, in_features)
    kernel = cpu_linear(layer, batch=3, precision="int8")
    with torch.no_grad():
        torch.testing.assert_close(kernel(x), layer(x), atol=0.05, rtol=0.05)


def test_generate_py_continues_with_a_narrow_original_checkpoint(tmp_path):
    """An original-script .pth whose attention (8 heads x 32) is narrower than dim (384):
    shapes give the width, generate.py decodes through the cache."""
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent
    model = shaped_model(dict(dim=384, heads=8, dim_head=32, depth=1, max_seq_len=64,
                              cross_attn_seq_len=32))
    torch.save({"state_dict": model.state_dict()}, tmp_path / "narrow.pth")
    r = zygote.run([sys.executable, "generate.py", "--ckpt", str(tmp_path / "narrow.pth"),
                        "--primer", "tests/data/scn15_4.mid", "--out_dir", str(tmp_path),
                        "--name", "take", "--new_tokens", "90", "--seconds", "0", "--seed",
                        "1", "--no-audio", "--no-stop_at_end"],
                       cwd=root, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "take" / "continuation.mid").is_file()
