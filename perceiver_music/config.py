"""Model hyper-parameters: one dataclass, validated, with the named presets.

`ModelConfig` holds every argument of `perceiver_ar_pytorch.PerceiverAR`, so a config plus a
state dict fully describes a model, plus the vocabulary version the token ids mean.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from midi_processor.vocab import VOCAB_SIZE, VOCAB_VERSION

# Upper bounds of every size, far above any model this toolkit trains (the largest preset
# has dim 1024 and a 16,384-token context), so that a config.json from anywhere is refused
# before it can allocate gigabytes. The parameter budget is checked where models are built
# from files (`perceiver_music.checkpoint.load_checkpoint`).
MAX_SIZES = {"dim": 16384, "depth": 256, "max_seq_len": 1 << 20, "heads": 256,
             "dim_head": 1024, "perceive_depth": 64, "perceive_max_heads_process": 256}
MAX_FF_MULT = 64.0
MAX_PARAMETERS = 2_000_000_000


@dataclass(frozen=True)
class ModelConfig:
    """Hyper-parameters of a Perceiver AR model (the arguments of `PerceiverAR`).

    ``cross_attn_seq_len`` is the prefix length m: tokens seen only by the first,
    cross-attention layer. The last ``num_latents = max_seq_len - m`` positions of a window
    are the latents, the only positions that get logits. Invalid values raise ValueError
    at construction, so a config that exists can always build a model.
    """

    dim: int
    depth: int
    max_seq_len: int
    cross_attn_seq_len: int
    num_tokens: int = VOCAB_SIZE
    dim_head: int = 64
    heads: int = 8
    dropout: float = 0.0
    cross_attn_dropout: float = 0.0
    ff_mult: float = 4
    perceive_depth: int = 1
    perceive_max_heads_process: int = 2
    vocab_version: str = VOCAB_VERSION

    def __post_init__(self) -> None:
        for name in ("dim", "depth", "max_seq_len", "heads", "perceive_depth",
                     "perceive_max_heads_process"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        for name, limit in MAX_SIZES.items():
            value = getattr(self, name)
            if isinstance(value, int) and value > limit:
                raise ValueError(f"{name} {value} exceeds the limit {limit}")
        if isinstance(self.cross_attn_seq_len, bool) or not isinstance(
            self.cross_attn_seq_len, int
        ):
            raise ValueError(f"cross_attn_seq_len must be an integer, got "
                             f"{self.cross_attn_seq_len!r}")
        if self.cross_attn_seq_len < 1:
            raise ValueError(f"cross_attn_seq_len (prefix length) must be >= 1, got "
                             f"{self.cross_attn_seq_len}")
        if self.num_latents < 1:
            raise ValueError(
                f"num_latents = max_seq_len - cross_attn_seq_len = {self.max_seq_len} - "
                f"{self.cross_attn_seq_len} = {self.num_latents}; it must be >= 1"
            )
        if self.num_tokens != VOCAB_SIZE:
            raise ValueError(f"num_tokens must be the vocabulary size {VOCAB_SIZE}, got "
                             f"{self.num_tokens!r}")
        # PerceiverAR rotates max(32, dim_head // 2) dimensions of every head.
        if isinstance(self.dim_head, bool) or not isinstance(self.dim_head, int) or (
            self.dim_head < 32
        ):
            raise ValueError(f"dim_head must be an integer >= 32 (rotary embeddings use 32 "
                             f"dimensions of each head), got {self.dim_head!r}")
        for name in ("dropout", "cross_attn_dropout"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not (
                    0.0 <= value < 1.0):
                raise ValueError(f"{name} must be in [0, 1), got {value!r}")
        if isinstance(self.ff_mult, bool) or not isinstance(self.ff_mult, (int, float)) or not (
                0 < self.ff_mult <= MAX_FF_MULT) or int(self.dim * self.ff_mult) < 1:
            raise ValueError(f"ff_mult must be a number in (0, {MAX_FF_MULT:g}] giving at "
                             f"least one hidden unit, got {self.ff_mult!r}")
        if self.vocab_version != VOCAB_VERSION:
            raise ValueError(
                f"vocab_version {self.vocab_version!r} does not match this toolkit's "
                f"vocabulary {VOCAB_VERSION!r}: token ids would mean different events"
            )

    @property
    def num_latents(self) -> int:
        """Number of latent positions n = max_seq_len - cross_attn_seq_len."""
        return self.max_seq_len - self.cross_attn_seq_len

    def model_kwargs(self) -> dict[str, Any]:
        """Keyword arguments for `PerceiverAR(**kwargs)` (everything but vocab_version)."""
        kwargs = self.to_dict()
        del kwargs["vocab_version"]
        return kwargs

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-serialisable dict of every field."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> ModelConfig:
        """Build a config from `to_dict` output.

        Unknown keys are refused rather than ignored: a typo or a config from another tool
        must not silently produce a different model.
        """
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown model config keys: {', '.join(unknown)}")
        required = {f.name for f in dataclasses.fields(cls)
                    if f.default is dataclasses.MISSING}
        missing = sorted(required - set(data))
        if missing:
            raise ValueError(f"model config is missing: {', '.join(missing)}")
        return cls(**dict(data))


# The four models the original project trained (8 layers each), plus a tiny one for tests.
# Every preset states its prefix explicitly; all use 1024 latents.
PRESETS: dict[str, dict[str, Any]] = {
    "ctx2048": dict(dim=512, depth=8, heads=8, max_seq_len=2048, cross_attn_seq_len=1024,
                    cross_attn_dropout=0.5),
    "ctx4096": dict(dim=512, depth=8, heads=8, max_seq_len=4096, cross_attn_seq_len=3072,
                    cross_attn_dropout=0.5),
    "ctx8192": dict(dim=1024, depth=8, heads=8, max_seq_len=8192, cross_attn_seq_len=7168,
                    cross_attn_dropout=0.5),
    "ctx16384": dict(dim=512, depth=8, heads=4, max_seq_len=16384, cross_attn_seq_len=15360,
                     cross_attn_dropout=0.5),
    # The bundled demo model: small enough to train on a CPU and ship (~4.5M parameters).
    "demo": dict(dim=256, depth=4, heads=4, max_seq_len=1024, cross_attn_seq_len=768,
                 cross_attn_dropout=0.5),
    "tiny": dict(dim=64, depth=2, heads=2, dim_head=32, max_seq_len=64, cross_attn_seq_len=32),
}


def preset(name: str, **overrides: Any) -> ModelConfig:
    """Config of the named preset with some fields replaced.

    ``num_latents=n`` is accepted as an override and sets ``cross_attn_seq_len`` to
    ``max_seq_len - n`` (after any ``max_seq_len`` override).
    """
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; choose one of {', '.join(PRESETS)}")
    values = {**PRESETS[name], **overrides}
    if "num_latents" in values:
        if "cross_attn_seq_len" in overrides:
            raise ValueError("give either num_latents or cross_attn_seq_len, not both")
        values["cross_attn_seq_len"] = values["max_seq_len"] - values.pop("num_latents")
    return ModelConfig.from_dict(values)
