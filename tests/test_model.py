"""Model config, fast forward against the library, loss, checkpoints (tiny models, CPU)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from midi_processor.vocab import PAD, VOCAB_SIZE, VOCAB_VERSION
from perceiver_music.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from perceiver_music.config import PRESETS, ModelConfig, preset
from perceiver_music.model import build_model, forward, loss_fn, model_shapes, use_fast_forward

ROOT = Path(__file__).resolve().parents[1]

TOL = 1e-4


def tiny_model(seed: int = 0, **overrides: object) -> torch.nn.Module:
    torch.manual_seed(seed)
    return build_model(preset("tiny", **overrides))


# ---------------------------------------------------------------------------------------
# fast forward == library forward


@pytest.mark.parametrize(
    "overrides",
    [
        {},
        {"dim_head": 64},  # rotary covers half of each head
        {"perceive_depth": 2, "cross_attn_dropout": 0.5},
        {"cross_attn_seq_len": 48},  # prefix longer than the latents
    ],
)
@pytest.mark.parametrize("length", [64, 50, 49])
@pytest.mark.parametrize("masked", [False, True])
def test_fast_forward_matches_library_in_eval(overrides, length, masked):
    model = tiny_model(**overrides).eval()
    m = model.cross_attn_seq_len
    if length <= m:
        length = m + 1  # shortest legal window: one latent
    gen = torch.Generator().manual_seed(1)
    tokens = torch.randint(0, VOCAB_SIZE, (3, length), generator=gen)
    mask = None
    if masked:
        mask = torch.rand(3, m, generator=gen) > 0.4
        mask[0, :] = False  # a prefix of PAD only
        mask[1, :] = True
    with torch.no_grad():
        expected = model(tokens, prefix_mask=mask)
        got = forward(model, tokens, mask)
    assert got.shape == (3, length - m, VOCAB_SIZE)
    assert (got - expected).abs().max().item() <= TOL


def test_use_fast_forward_routes_module_calls():
    model = tiny_model().eval()
    tokens = torch.randint(0, VOCAB_SIZE, (2, 60))
    mask = torch.rand(2, 32) > 0.5
    keys = list(model.state_dict())
    with torch.no_grad():
        library = model(tokens, prefix_mask=mask)
        fast = use_fast_forward(model)(tokens, mask)
        assert torch.equal(fast, forward(model, tokens, mask))
    assert (fast - library).abs().max().item() <= TOL
    assert list(model.state_dict()) == keys


def test_forward_rejects_bad_windows():
    model = tiny_model().eval()
    with pytest.raises(ValueError, match="window length"):
        forward(model, torch.zeros(1, 32, dtype=torch.long))  # no latent
    with pytest.raises(ValueError, match="window length"):
        forward(model, torch.zeros(1, 65, dtype=torch.long))
    with pytest.raises(ValueError, match="prefix_mask"):
        forward(model, torch.zeros(1, 64, dtype=torch.long), torch.ones(1, 64, dtype=bool))


@pytest.mark.parametrize("masked", [False, True])
def test_training_prefix_dropout_matches_library_seeded(masked):
    # Same seed -> the same uniform draw -> the same kept prefix positions as the library.
    model = tiny_model(cross_attn_dropout=0.5, perceive_depth=2).train()
    tokens = torch.randint(0, VOCAB_SIZE, (4, 64), generator=torch.Generator().manual_seed(2))
    mask = torch.rand(4, 32, generator=torch.Generator().manual_seed(3)) > 0.3 if masked else None
    torch.manual_seed(7)
    expected = model(tokens, prefix_mask=mask)
    torch.manual_seed(7)
    got = forward(model, tokens, mask)
    assert (got - expected).abs().max().item() <= TOL
    torch.manual_seed(8)
    other = forward(model, tokens, mask)
    assert (other - expected).abs().max().item() > 1e-3  # a new draw drops other positions


@pytest.mark.parametrize("p", [0.3, 0.5, 0.7])
def test_training_prefix_dropout_keeps_exact_count_per_example(p):
    model = tiny_model(cross_attn_dropout=p).train()
    m = model.cross_attn_seq_len
    keep = m - int(m * p)
    # Distinct token ids per prefix position: a prefix token's embedding gets a gradient
    # exactly when its position was kept.
    tokens = torch.cat((torch.arange(m), torch.arange(200, 232)))[None]
    kept_sets = set()
    for seed in range(4):
        model.zero_grad()
        torch.manual_seed(seed)
        forward(model, tokens).sum().backward()
        grad = model.token_emb.weight.grad[:m].abs().sum(dim=1)
        kept = tuple((grad > 0).nonzero().flatten().tolist())
        assert len(kept) == keep
        kept_sets.add(kept)
    assert len(kept_sets) > 1  # random positions, not a fixed slice

    seen = []
    hook = model.perceive_layers[0][0].context_norm.register_forward_hook(
        lambda module, args, out: seen.append(args[0].shape)
    )
    forward(model, torch.randint(0, VOCAB_SIZE, (3, 64)))
    hook.remove()
    assert seen == [torch.Size([3, keep, 64])]


def test_training_dropout_is_applied_and_eval_is_deterministic():
    model = tiny_model(dropout=0.3).train()
    tokens = torch.randint(0, VOCAB_SIZE, (2, 64))
    assert not torch.allclose(forward(model, tokens), forward(model, tokens))
    model.eval()
    with torch.no_grad():
        assert torch.equal(forward(model, tokens), forward(model, tokens))


# ---------------------------------------------------------------------------------------
# loss


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs a CUDA GPU"))])
def test_bf16_training_step_runs_on_flash_attention_alone(device):
    """Under bfloat16 autocast (train.py --mixed_precision bf16) a training step with
    prefix dropout runs with SDPA restricted to its flash kernel: no mask or dtype mix
    sends it to the slower kernels. (CPU's flash kernel has no attention dropout; CUDA's
    has.)"""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    dropout = 0.1 if device == "cuda" else 0.0
    model = tiny_model(dropout=dropout, cross_attn_dropout=0.5).to(device).train()
    tokens = torch.randint(0, PAD, (2, model.max_seq_len + 1), device=device)
    with sdpa_kernel(SDPBackend.FLASH_ATTENTION), torch.autocast(device, torch.bfloat16):
        logits = forward(model, tokens[:, :-1])
        loss = loss_fn(logits, tokens[:, 1:])
    loss.backward()
    assert logits.dtype == torch.bfloat16 and torch.isfinite(loss)
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


def test_a_bfloat16_model_keeps_float32_rotary_angles():
    """model.to(torch.bfloat16) rounds the inv_freq buffer, and bfloat16 cannot count
    past 256; the forward still computes the same float32 angles, so a long window's
    next-token distributions stay close to the float32 model's."""
    from perceiver_music.model import _rotary

    torch.manual_seed(0)
    cfg = preset("tiny", max_seq_len=2048, cross_attn_seq_len=1900)
    model = build_model(cfg).eval()
    half = build_model(cfg).eval().to(torch.bfloat16)
    half.load_state_dict(model.state_dict())
    assert half.rotary_pos_emb.inv_freq.dtype == torch.bfloat16
    positions = torch.arange(2048)
    for ours, theirs in zip(_rotary(half, positions), _rotary(model, positions), strict=True):
        assert ours.dtype == torch.float32 and torch.equal(ours, theirs)
    tokens = torch.randint(0, PAD, (1, 2048))
    with torch.no_grad():
        p32 = forward(model, tokens).log_softmax(-1)
        p16 = forward(half, tokens).float().log_softmax(-1)
    assert (p32.exp() * (p32 - p16)).sum(-1).mean() < 1e-4


def test_loss_ignores_pad_but_not_note_zero():
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 5, VOCAB_SIZE, generator=gen)
    targets = torch.tensor([[0, 5, PAD, 0, 7], [PAD, PAD, 1, 2, 0]])
    valid = targets != PAD
    expected = F.cross_entropy(logits[valid], targets[valid])
    assert torch.allclose(loss_fn(logits, targets), expected)

    changed = logits.clone()
    changed[~valid] += torch.randn(int((~valid).sum()), VOCAB_SIZE, generator=gen)
    assert torch.allclose(loss_fn(changed, targets), expected)  # PAD positions: no effect
    changed = logits.clone()
    changed[0, 0, 0] += 5.0  # target id 0 is a real note
    assert not torch.allclose(loss_fn(changed, targets), expected)


def test_loss_takes_window_targets_and_all_pad():
    logits = torch.randn(1, 3, VOCAB_SIZE)
    window_targets = torch.tensor([[9, 9, 9, 4, 5, 6]])
    assert torch.equal(loss_fn(logits, window_targets), loss_fn(logits, window_targets[:, 3:]))
    assert loss_fn(logits, torch.full((1, 3), PAD)).item() == 0.0
    with pytest.raises(ValueError):
        loss_fn(logits, torch.zeros(1, 2, dtype=torch.long))


def test_loss_of_fast_forward_backpropagates():
    model = tiny_model().train()
    seq = torch.randint(0, PAD, (2, 65))
    loss = loss_fn(forward(model, seq[:, :-1]), seq[:, 1:])
    loss.backward()
    assert loss.item() > 0
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)


# ---------------------------------------------------------------------------------------
# config and presets


def test_config_round_trip_through_json():
    cfg = preset("tiny", dropout=0.1, cross_attn_dropout=0.25)
    data = json.loads(json.dumps(cfg.to_dict()))
    assert ModelConfig.from_dict(data) == cfg
    assert cfg.num_latents == 32
    assert data["vocab_version"] == VOCAB_VERSION


def test_config_rejects_unknown_keys_and_wrong_vocab():
    data = preset("tiny").to_dict()
    with pytest.raises(ValueError, match="unknown model config keys: colour"):
        ModelConfig.from_dict({**data, "colour": 1})
    with pytest.raises(ValueError, match="vocab_version"):
        ModelConfig.from_dict({**data, "vocab_version": "remi-500/1"})
    del data["dim"]
    with pytest.raises(ValueError, match="missing: dim"):
        ModelConfig.from_dict(data)


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"cross_attn_seq_len": 64}, "num_latents"),
        ({"cross_attn_seq_len": 70}, "num_latents"),
        ({"cross_attn_seq_len": 0}, "prefix length"),
        ({"dim_head": 16}, "dim_head"),
        ({"dropout": 1.0}, "dropout"),
        ({"cross_attn_dropout": -0.1}, "cross_attn_dropout"),
        ({"num_tokens": 388}, "num_tokens"),
        ({"depth": 0}, "depth"),
        ({"heads": 2.5}, "heads"),
    ],
)
def test_config_validation(overrides, message):
    with pytest.raises(ValueError, match=message):
        preset("tiny", **overrides)


def test_presets():
    expected = {
        "ctx2048": (2048, 512, 8),
        "ctx4096": (4096, 512, 8),
        "ctx8192": (8192, 1024, 8),
        "ctx16384": (16384, 512, 4),
    }
    for name, (context, dim, heads) in expected.items():
        cfg = preset(name)
        assert (cfg.max_seq_len, cfg.dim, cfg.heads, cfg.depth) == (context, dim, heads, 8)
        assert cfg.num_latents == 1024
        assert PRESETS[name]["cross_attn_seq_len"] == context - 1024
    tiny = preset("tiny")
    assert (
        tiny.dim,
        tiny.depth,
        tiny.max_seq_len,
        tiny.num_latents,
        tiny.heads,
        tiny.dim_head,
    ) == (64, 2, 64, 32, 2, 32)
    assert preset("ctx4096", num_latents=3072).cross_attn_seq_len == 1024
    assert preset("tiny", max_seq_len=80, num_latents=16).cross_attn_seq_len == 64
    with pytest.raises(ValueError, match="unknown preset 'ctx999'.*ctx2048"):
        preset("ctx999")
    with pytest.raises(ValueError, match="unknown model config keys: layers"):
        preset("tiny", layers=3)
    with pytest.raises(ValueError, match="not both"):
        preset("tiny", num_latents=8, cross_attn_seq_len=8)


def test_build_model_matches_config():
    cfg = preset("tiny", perceive_depth=2, ff_mult=2)
    model = build_model(cfg)
    assert model.max_seq_len == 64 and model.cross_attn_seq_len == 32
    assert len(model.layers) == 2 and len(model.perceive_layers) == 2
    assert model.layers[0][1][1].out_features == 128


# ---------------------------------------------------------------------------------------
# checkpoints


def test_checkpoint_round_trip(tmp_path):
    model = tiny_model(3, cross_attn_dropout=0.5).eval()
    cfg = preset("tiny", cross_attn_dropout=0.5)
    save_checkpoint(
        tmp_path / "run", model, cfg, {"step": 12, "val_loss": 2.5, "training": {"lr": 3e-4}}
    )
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == [
        "config.json",
        "model.safetensors",
    ]  # no temporary files left
    loaded, loaded_cfg, meta = load_checkpoint(tmp_path / "run")
    assert loaded_cfg == cfg
    assert meta == {
        "vocab_version": VOCAB_VERSION,
        "step": 12,
        "val_loss": 2.5,
        "training": {"lr": 3e-4},
    }
    assert not loaded.training
    tokens = torch.randint(0, VOCAB_SIZE, (2, 64))
    with torch.no_grad():
        assert torch.equal(forward(loaded, tokens), forward(model, tokens))


class _Wrapper(torch.nn.Module):
    """Holds a model the way DDP (``module``) or torch.compile (``_orig_mod``) does."""

    def __init__(self, name: str, inner: torch.nn.Module) -> None:
        super().__init__()
        self.add_module(name, inner)


def test_checkpoint_strips_wrapper_prefixes(tmp_path):
    model = tiny_model(4)
    wrapped = _Wrapper("module", _Wrapper("_orig_mod", model))
    assert all(k.startswith("module._orig_mod.") for k in wrapped.state_dict())
    save_checkpoint(tmp_path, wrapped, preset("tiny"))
    loaded, _, _ = load_checkpoint(tmp_path)
    assert loaded.state_dict().keys() == model.state_dict().keys()
    for key, value in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value)


def test_checkpoint_refuses_reserved_extra_keys(tmp_path):
    with pytest.raises(ValueError, match="reserved"):
        save_checkpoint(tmp_path, tiny_model(), preset("tiny"), {"model": {}})


@pytest.fixture
def saved(tmp_path):
    save_checkpoint(tmp_path / "ck", tiny_model(), preset("tiny"), {"step": 1})
    return tmp_path / "ck"


def test_checkpoint_missing_directory(tmp_path):
    with pytest.raises(CheckpointError, match="nowhere: not a checkpoint directory"):
        load_checkpoint(tmp_path / "nowhere")


@pytest.mark.parametrize("name", ["config.json", "model.safetensors"])
def test_checkpoint_missing_file(saved, name):
    (saved / name).unlink()
    with pytest.raises(CheckpointError, match=f"{name}: missing"):
        load_checkpoint(saved)


def test_checkpoint_bad_json(saved):
    (saved / "config.json").write_text('{"model": {"dim": 64,')
    with pytest.raises(CheckpointError, match="config.json: not valid JSON"):
        load_checkpoint(saved)


def test_checkpoint_invalid_config(saved):
    data = json.loads((saved / "config.json").read_text())
    data["model"]["typo"] = 1
    (saved / "config.json").write_text(json.dumps(data))
    with pytest.raises(CheckpointError, match="invalid model config: unknown .* typo"):
        load_checkpoint(saved)
    data["model"].pop("typo")
    data["vocab_version"] = "other/1"
    (saved / "config.json").write_text(json.dumps(data))
    with pytest.raises(CheckpointError, match="vocab_version"):
        load_checkpoint(saved)


def test_checkpoint_corrupt_weights(saved):
    (saved / "model.safetensors").write_bytes(b"\x00\x01 not safetensors at all")
    with pytest.raises(CheckpointError, match="model.safetensors: cannot read"):
        load_checkpoint(saved)


def test_checkpoint_shape_mismatch(saved):
    data = json.loads((saved / "config.json").read_text())
    data["model"]["dim"] = 96
    (saved / "config.json").write_text(json.dumps(data))
    with pytest.raises(CheckpointError, match=r"token_emb.weight has shape \(390, 64\)"):
        load_checkpoint(saved)


def test_checkpoint_missing_tensor(saved):
    data = json.loads((saved / "config.json").read_text())
    data["model"]["depth"] = 3
    (saved / "config.json").write_text(json.dumps(data))
    with pytest.raises(CheckpointError, match="missing layers.2"):
        load_checkpoint(saved)


def test_training_batches_without_padding_reach_sdpa_as_a_causal_bias(monkeypatch):
    """train.py's batches go through `to_device`: where every prefix position is real the
    mask is dropped, so the cross-attention asks SDPA for a causal mask alone (on an
    accelerator a CausalBias, which flash kernels run) instead of the prefix mask, with
    the same logits; a padded batch keeps its mask."""
    from torch.nn.attention.bias import CausalBias

    import perceiver_music.model as model_module
    from perceiver_music.data import to_device

    torch.manual_seed(0)
    model = build_model(preset("tiny")).eval()
    m = model.cross_attn_seq_len
    tokens = torch.randint(0, 388, (2, model.max_seq_len))
    full = torch.ones(2, m, dtype=torch.bool)
    asked = []

    class Functional:  # torch.nn.functional as model.py sees it, SDPA calls recorded
        def __getattr__(self, name):
            return getattr(F, name)

        @staticmethod
        def scaled_dot_product_attention(*args, **kwargs):
            asked.append(kwargs.get("attn_mask"))
            return F.scaled_dot_product_attention(*args, **kwargs)

    # (torch's own F stays intact: a CausalBias dispatches on its identity)
    monkeypatch.setattr(model_module, "F", Functional())
    x, mask = to_device(tokens, full, torch.device("cpu"))
    assert mask is None
    with torch.no_grad():
        free = model_module.forward(model, x, mask)
        n = model.max_seq_len - m
        assert torch.equal(asked[0], torch.ones(n, m + n, dtype=torch.bool).tril(m))
        assert isinstance(model_module.lower_right_causal(n, m + n, torch.device("cuda")),
                          CausalBias)  # what an accelerator gets (made without one)
        asked.clear()
        masked = model_module.forward(model, tokens, full)
        assert isinstance(asked[0], torch.Tensor) and asked[0].dtype == torch.bool
    torch.testing.assert_close(free, masked, atol=1e-5, rtol=1e-5)
    padded = full.clone()
    padded[0, :3] = False
    assert torch.equal(to_device(tokens, padded, torch.device("cpu"))[1], padded)


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_model_shapes_are_the_built_models(name):
    """Checkpoint checks compare against `model_shapes`: a model on the meta device whose
    fills are skipped, shaped exactly as `build_model` makes it."""
    with torch.device("meta"):
        built = {k: v.shape for k, v in build_model(preset(name)).state_dict().items()}
    assert model_shapes(preset(name)) == built


def test_loading_a_checkpoint_does_not_import_dynamo(saved):
    """Reading and checking a checkpoint stays off torch._dynamo, whose import costs every
    generate.py, evaluate.py and app.py start about a second."""
    code = ("import sys; from perceiver_music.api import PerceiverMusic; "
            f"PerceiverMusic.from_pretrained({str(saved)!r}, device='cpu'); "
            "print('torch._dynamo' in sys.modules)")
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                       timeout=120)
    assert r.stdout.strip() == "False", r.stderr
