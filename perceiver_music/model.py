"""Perceiver AR: model construction, a fast forward over the library's parameters, the loss.

`perceiver_ar_pytorch.PerceiverAR` defines the parameters and their state-dict layout; this
module never adds or renames one. Its own forward materialises every attention score
matrix (einsum), which dominates memory and time for long windows. `forward` computes the
same function with `torch.nn.functional.scaled_dot_product_attention` (flash and
memory-efficient kernels), and can fill a `DecodeCache` so that `decode_step` extends a window
one token at a time (the generation engine's building blocks).

What the library does, and this file reproduces:
- embeddings: token embedding + learned absolute position embedding, positions counted
  from the window start;
- rotary embeddings on queries and keys of every attention layer, on the first
  max(32, dim_head // 2) dimensions of each head, with the same window positions;
- the first layer(s) cross-attend from the latents to prefix + latents; prefix rows go
  through ``context_norm``, latent rows through ``norm``; ``prefix_mask`` (True = real
  token) hides PAD prefix positions; attention is causal among latents;
- in training, each example keeps exactly m - int(m * p) random prefix positions (p =
  ``cross_attn_dropout``), each with its own rotary position, and dropout applies;
- the next layers are causal self-attention over the latents only.
"""

from __future__ import annotations

import functools
import threading
import time
from collections.abc import Callable
from contextlib import nullcontext
from typing import NamedTuple

import torch
import torch.nn.functional as F
from perceiver_ar_pytorch import PerceiverAR
from perceiver_ar_pytorch.perceiver_ar_pytorch import CausalAttention, CausalPrefixAttention
from torch import Tensor, nn

from midi_processor.vocab import PAD

from .config import ModelConfig


def build_model(cfg: ModelConfig, initialise: bool = True) -> PerceiverAR:
    """A library model for ``cfg`` (its state dict is the file format): freshly initialised,
    or with ``initialise=False`` left unfilled for a state dict to be loaded into."""
    with nullcontext() if initialise else _Unfilled():
        return PerceiverAR(**cfg.model_kwargs())


class _Unfilled(torch.overrides.TorchFunctionMode):
    """While a model is built: ``torch.nn.init``'s fills are skipped and, with ``meta``,
    parameters (``torch.empty``) are allocated on the meta device. The rest (the rotary
    buffer) runs as usual: on the meta device it would run torch's Python references,
    whose first call imports torch._dynamo, a second at every script start."""

    def __init__(self, meta: bool = False) -> None:
        super().__init__()
        self.meta = meta

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if getattr(func, "__module__", None) == "torch.nn.init":  # fill(tensor, ...)
            return args[0] if args else kwargs["tensor"]
        if self.meta and func is torch.empty:
            kwargs["device"] = "meta"
        return func(*args, **kwargs)


def model_shapes(cfg: ModelConfig) -> dict[str, torch.Size]:
    """The shape of every state-dict tensor of ``cfg``'s model, without allocating its
    parameters (they live on the meta device)."""
    with _Unfilled(meta=True):
        model = build_model(cfg)
    return {k: v.shape for k, v in model.state_dict().items()}


PRECISIONS = ("float32", "int8")


class DecodeCache:
    """What `decode_step` needs besides the model, for one batch of windows split at
    ``prefix_len`` (default: the model's own prefix length m).

    Keys and values of every attention layer (a gpt-fast style static KV cache: allocated
    once, written in place, so a captured CUDA graph keeps reading the right memory):
    cross-attention layers store all window positions (prefix and latents),
    self-attention layers the latent positions only, each as (batch, heads, positions,
    dim_head) with rotary embeddings applied. ``key_valid`` is the cross-attention key
    mask of the window (batch, 1, 1, max_seq_len), True for real tokens; ``key_mask`` is
    it, or None when no prefix position is PAD.

    A step multiplies one row per sample by every weight, so the cache also holds each
    attention block's parts ready for it (``steps``, one `LayerStep` per block, then
    ``logits``). The cross-attention layers' ``to_q`` and ``to_kv`` take the same input
    in a step, so they become one fused product, like the self-attention layers'
    ``to_qkv``. On CPU each linear weight is laid out for one-token steps (`cpu_linear`): a
    step is a chain of matrix products with a few rows, bound by how fast the weights
    stream from memory. ``precision="int8"`` stores them as int8 with one scale per output
    (weight-only quantisation: a quarter of the bytes; CPU only; the deviation from
    float32 is measured by bench/decode.py). The copies are taken when the cache is
    built, so build a new cache after changing the weights.
    """

    def __init__(self, model: PerceiverAR, batch: int, prefix_len: int | None = None,
                 precision: str = "float32") -> None:
        param = model.token_emb.weight
        if precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
        if precision != "float32" and param.device.type != "cpu":
            raise ValueError(f"{precision} decoding is a CPU mode; on {param.device.type} "
                             "run the model in bfloat16 instead")
        heads, dim_head = _head_shape(model.perceive_layers[0][0])
        self.prefix_len = prefix_length(model, prefix_len)
        n = model.max_seq_len - self.prefix_len

        def empty(length: int) -> Tensor:
            return param.new_zeros(batch, heads, length, dim_head)

        self.cross = [(empty(model.max_seq_len), empty(model.max_seq_len))
                      for _ in model.perceive_layers]
        self.self = [(empty(n), empty(n)) for _ in model.layers]
        self.key_valid = torch.ones(batch, 1, 1, model.max_seq_len, dtype=torch.bool,
                                    device=param.device)
        self.key_mask: Tensor | None = None
        self.shared = (0, 0)

        def linear(layer: nn.Linear, gelu: bool = False) -> Callable[[Tensor], Tensor]:
            if param.device.type == "cpu":
                return cpu_linear(layer, batch, precision, gelu)
            return functools.partial(_linear_gelu, layer) if gelu else layer

        self.steps: list[LayerStep] = []
        for attn, ff in (*model.perceive_layers, *model.layers):
            qkv = getattr(attn, "to_qkv", None)
            if qkv is None:  # cross-attention: to_q and to_kv as one product
                qkv = nn.Linear(attn.to_q.in_features,
                                attn.to_q.out_features + attn.to_kv.out_features,
                                bias=False, device="meta")
                qkv.weight = nn.Parameter(torch.cat((attn.to_q.weight, attn.to_kv.weight)),
                                          requires_grad=False)
            ff_norm, proj_in, _, _, proj_out = ff  # the library's FeedForward, eval mode
            self.steps.append(LayerStep(_norm(attn.norm), linear(qkv), linear(attn.to_out),
                                        _norm(ff_norm), linear(proj_in, gelu=True),
                                        linear(proj_out), *_head_shape(attn), attn.scale))
        self.logits = linear(model.to_logits)

    def set_prefix_mask(self, prefix_mask: Tensor | None) -> None:
        """Record the window's prefix mask (batch, m) in ``key_valid`` (in place)."""
        if prefix_mask is None:
            self.key_valid.fill_(True)
        else:
            self.key_valid.copy_(_key_mask(prefix_mask, self.key_valid.shape[-1]))
        self.key_mask = None if prefix_mask is None else self.key_valid

    def set_shared(self, tokens: Tensor, prefix_mask: Tensor | None) -> None:
        """Record in ``shared`` how many leading window positions the rows of ``tokens``
        (batch, t) share, as (cross-attention positions, self-attention latents).

        Every key and value depends only on its token, its position and the positions
        before it, so where all rows hold the same tokens (samples of one primer, before
        their windows move past it) every layer's keys and values are the same in every
        row too. Attention then reads them once, from row 0, for all rows: 8 samples cost
        little more than one. CPU only (the static step reads the whole cache), and only
        for runs of at least `SHARED_MIN` positions with a real token among them.
        """
        self.shared = (0, 0)
        if tokens.shape[0] == 1 or tokens.device.type != "cpu":
            return
        same = (tokens == tokens[:1]).all(0)
        if prefix_mask is not None:
            same[: self.prefix_len] &= (prefix_mask == prefix_mask[:1]).all(0)
        length = int(same.cumprod(0).sum())
        real = length > self.prefix_len or prefix_mask is None or bool(
            prefix_mask[0, :length].any())
        latents = length - self.prefix_len
        self.shared = (length if length >= SHARED_MIN and real else 0,
                       latents if latents >= SHARED_MIN else 0)

    def reorder(self, index: Tensor) -> None:
        """Keep rows ``index`` of every tensor (beam search); the batch size may change."""
        self.cross = [(k.index_select(0, index), v.index_select(0, index))
                      for k, v in self.cross]
        self.self = [(k.index_select(0, index), v.index_select(0, index))
                     for k, v in self.self]
        masked = self.key_mask is not None
        self.key_valid = self.key_valid.index_select(0, index)
        self.key_mask = self.key_valid if masked else None


SHARED_MIN = 64  # shorter shared runs are read per row: merging two softmaxes costs more


class LayerStep(NamedTuple):
    """One attention block as a decode step runs it: norms and linears as functions of
    (rows, dim) tensors (``ff_in`` includes the GELU)."""

    norm: Callable[[Tensor], Tensor]
    qkv: Callable[[Tensor], Tensor]
    out: Callable[[Tensor], Tensor]
    ff_norm: Callable[[Tensor], Tensor]
    ff_in: Callable[[Tensor], Tensor]
    ff_out: Callable[[Tensor], Tensor]
    heads: int
    dim_head: int
    scale: float


def cpu_linear(layer: nn.Linear, batch: int, precision: str = "float32",
               gelu: bool = False) -> Callable[[Tensor], Tensor]:
    """``layer`` (then GELU, exact, if asked) as a function of (rows, in_features) tensors,
    its weight laid out for products with a few rows on CPU.

    float32 (or the model's dtype): packed by oneDNN (torch's ``mkldnn`` ops) for ``batch``
    rows, or an (in, out)-major copy multiplied through BLAS, whichever this CPU runs faster
    (`_packed_layout_wins`): on an AVX-512 VM (Zen 4) the packed weights streamed at near
    copy speed with every core where BLAS reached about half of it; on an AVX2 one (Zen 3)
    BLAS decodes the demo 15-25 % faster. int8:
    ``round(W / s)`` with s = max |row| / 127 per output, multiplied in bfloat16 by torch's
    weight-only int8 kernel (the one gpt-fast uses), the result returned as float32. A
    decode step makes 37 of these calls for this model size, so each is one closure
    around one op call.
    """
    weight = layer.weight.detach()
    bias = None if layer.bias is None else layer.bias.detach()

    def finish(out: Tensor) -> Tensor:
        out = out if bias is None else out + bias
        return F.gelu(out) if gelu else out

    if precision == "int8":
        scale = weight.abs().amax(dim=1).clamp(min=1e-12) / 127
        quantised = (weight / scale[:, None]).round().clamp(-127, 127).to(torch.int8)
        scale = scale.to(torch.bfloat16)
        pad = -weight.shape[1] % INT8_K_MULTIPLE
        if pad:  # the kernel reads garbage (or crashes) past a ragged row: zero columns
            quantised = F.pad(quantised, (0, pad))
        return lambda x: finish(torch.ops.aten._weight_int8pack_mm(
            F.pad(x, (0, pad)).to(torch.bfloat16) if pad else x.to(torch.bfloat16),
            quantised, scale).to(x.dtype))
    if _packed_layout_wins(weight.dtype, batch):
        packed = torch.ops.mkldnn._reorder_linear_weight(weight, batch)
        attr, algorithm = ("gelu", "none") if gelu else ("none", "")
        linear = torch.ops.mkldnn._linear_pointwise.default
        return lambda x: linear(x, packed, bias, attr, [], algorithm)
    transposed = weight.t().contiguous()
    return lambda x: finish(x @ transposed)


INT8_K_MULTIPLE = 16  # torch's int8 kernel needs in_features in multiples of this


def _packed_layout_wins(dtype: torch.dtype, batch: int) -> bool:
    """Whether oneDNN's packed weights beat the (in, out)-major copy for products of
    ``batch`` rows in ``dtype`` on this CPU at the current torch thread count."""
    return _packed_wins(dtype, batch, torch.get_num_threads())


LAYOUT_PROBE = (12, 1024, 256)  # weights, out and in features: 12 MB in float32


@functools.cache
def _onednn_works(dtype: torch.dtype) -> bool:
    """Whether this torch build and CPU run oneDNN's packed linear ops in ``dtype``
    (bfloat16 needs AVX-512 or AVX-NE-CONVERT)."""
    try:
        w = torch.ops.mkldnn._reorder_linear_weight(torch.ones(2, 3, dtype=dtype), 1)
        out = torch.ops.mkldnn._linear_pointwise(torch.ones(1, 3, dtype=dtype), w, None,
                                                 "none", [], "")
        return torch.equal(out.float(), torch.full((1, 2), 3.0))
    except (AttributeError, RuntimeError, NotImplementedError):
        return False


@functools.cache
def _packed_wins(dtype: torch.dtype, batch: int, threads: int) -> bool:
    """`_packed_layout_wins`, timed once per process: best of 3 passes over a stack of
    weights about the demo model's size (`LAYOUT_PROBE`), which streams from the caches as
    a decode step's weights do; about 50 ms in all. The packed layout must be 10 %
    faster."""
    if not _onednn_works(dtype):
        return False
    count, out_features, in_features = LAYOUT_PROBE
    generator = torch.Generator().manual_seed(0)
    weights = [torch.randn(out_features, in_features, generator=generator).to(dtype)
               for _ in range(count)]
    x = torch.randn(batch, in_features, generator=generator).to(dtype)
    linear = torch.ops.mkldnn._linear_pointwise.default
    packed = [torch.ops.mkldnn._reorder_linear_weight(w, batch) for w in weights]
    transposed = [w.t().contiguous() for w in weights]

    def best_of_3(product: Callable[[Tensor], Tensor], stack: list[Tensor]) -> float:
        best = float("inf")
        for _ in range(3):
            start = time.perf_counter()
            for w in stack:
                product(w)
            best = min(best, time.perf_counter() - start)
        return best

    with torch.no_grad():
        packed_s = best_of_3(lambda w: linear(x, w, None, "none", [], ""), packed)
        plain_s = best_of_3(lambda w: x @ w, transposed)
    # a clear win only, so that a near tie goes the same way (BLAS) in most processes:
    # two processes on different layouts decode with logits a rounding apart, and a seed
    # may then, rarely, not repeat a take between them
    return packed_s < 0.9 * plain_s


def prefix_length(model: PerceiverAR, prefix_len: int | None = None) -> int:
    """``prefix_len``, checked, or the model's own prefix length m (``cross_attn_seq_len``).

    The prefix length changes no parameter: any m in [1, max_seq_len) runs the same
    weights, with the window's last max_seq_len - m positions as latents.
    """
    if prefix_len is None:
        return model.cross_attn_seq_len
    if isinstance(prefix_len, bool) or not isinstance(prefix_len, int) or not (
            0 < prefix_len < model.max_seq_len):
        raise ValueError(f"the prefix length (cross_attn_seq_len) must be an integer in "
                         f"[1, {model.max_seq_len - 1}], got {prefix_len!r}")
    return prefix_len


def forward(
    model: PerceiverAR,
    tokens: Tensor,
    prefix_mask: Tensor | None = None,
    *,
    cache: DecodeCache | None = None,
    prefix_len: int | None = None,
) -> Tensor:
    """Logits of the latent positions of ``tokens``, as ``model(tokens, prefix_mask)``.

    ``tokens`` is (batch, t) with m < t <= max_seq_len, where m is the prefix length
    (``prefix_len``, or the cache's, or the model's ``cross_attn_seq_len``); the result is
    (batch, t - m, num_tokens). ``prefix_mask`` is (batch, m), True for real tokens. In
    training mode the library's prefix dropout and dropout apply. With ``cache`` (eval mode
    only) the keys and values of every layer are also stored there, so that `decode_step`
    can continue this window.
    """
    batch, length = tokens.shape
    m = cache.prefix_len if cache is not None else prefix_length(model, prefix_len)
    if cache is not None and prefix_len is not None and prefix_len != m:
        raise ValueError(f"prefix_len {prefix_len} differs from the cache's {m}")
    if not m < length <= model.max_seq_len:
        raise ValueError(f"window length {length} must be in ({m}, {model.max_seq_len}]: "
                         f"the prefix takes {m} positions and at least one latent is needed")
    if prefix_mask is not None:
        if prefix_mask.shape != (batch, m):
            raise ValueError(f"prefix_mask must have shape {(batch, m)}, got "
                             f"{tuple(prefix_mask.shape)}")
        prefix_mask = prefix_mask.to(device=tokens.device, dtype=torch.bool)
    if cache is not None and model.training:
        raise ValueError("a KV cache is for inference: call model.eval() first")

    h = model.token_emb(tokens) + model.pos_emb.weight[:length]
    cos, sin = _rotary(model, torch.arange(length, device=tokens.device))
    prefix, x = h[:, :m], h[:, m:]

    if cache is not None:
        cache.set_prefix_mask(prefix_mask)
        cache.set_shared(tokens, prefix_mask)

    for i, (attn, ff) in enumerate(model.perceive_layers):
        kv = cache.cross[i] if cache is not None else None
        x = x + _prefix_attention(attn, x, prefix, prefix_mask, cos, sin, kv)
        x = x + ff(x)
    for i, (attn, ff) in enumerate(model.layers):
        kv = cache.self[i] if cache is not None else None
        x = x + _self_attention(attn, x, cos[m:], sin[m:], kv)
        x = x + ff(x)
    return model.to_logits(x)


def decode_step(model: PerceiverAR, token: Tensor, position: int | Tensor,
                cache: DecodeCache) -> Tensor:
    """Logits for the token after ``token``, placed at window ``position``, using ``cache``.

    ``cache`` holds the window's positions before ``position`` (from `forward` with a cache
    and earlier steps); this step adds ``position``. ``token`` is (batch,); the result is
    (batch, num_tokens). Exact while the window start and the prefix stay put, because
    every key and value depends only on its token, its position and earlier positions.
    The prefix length is the cache's.

    ``position`` is an int, or a 0-dim long tensor on the model's device: then every
    shape in the step is fixed and the host never reads the position, so the step can be
    captured once as a CUDA graph (`CudaGraphStep`); attention reads the whole cache,
    masked after ``position``. The caller checks the position's range in that case.
    """
    m = cache.prefix_len
    static = isinstance(position, Tensor)
    if static:
        pos = position.reshape(1)
        cos, sin = _rotary(model, pos)
        keys = torch.arange(model.max_seq_len, device=token.device)
        cross_mask = (keys <= pos) & cache.key_valid
        self_mask = (keys[: model.max_seq_len - m] <= pos - m)[None, None, None]
        cross_index, self_index = pos, pos - m
        cross_shared = self_shared = 0

        def rotate(t: Tensor) -> Tensor:
            return _rotate(t, cos, sin)
    else:
        _check_position(position, m, model.max_seq_len)
        pos = torch.tensor([position], device=token.device)
        cos, sin = _rotary(model, pos)
        rotation = _rotation_matrix(cos[0], sin[0], _head_shape(model.perceive_layers[0][0])[1]
                                    ).to(model.token_emb.weight.dtype)
        cross_mask, self_mask = cache.key_mask, None
        cross_index, self_index = position, position - m
        cross_shared, self_shared = cache.shared

        def rotate(t: Tensor) -> Tensor:
            return t @ rotation

    x = model.token_emb(token) + model.pos_emb(pos)  # (batch, dim)
    cross = len(cache.cross)
    for steps, caches, index, mask, shared in (
            (cache.steps[:cross], cache.cross, cross_index, cross_mask, cross_shared),
            (cache.steps[cross:], cache.self, self_index, self_mask, self_shared)):
        for layer, (k_cache, v_cache) in zip(steps, caches, strict=True):
            qkv = layer.qkv(layer.norm(x)).view(-1, 3, layer.heads, layer.dim_head)
            qk = rotate(qkv[:, :2])  # queries and keys: (batch, 2, heads, dim_head)
            out = _cached_attention(qk[:, 0], qk[:, 1], qkv[:, 2], k_cache, v_cache, index,
                                    mask, layer.scale, shared)
            x = x + layer.out(out.reshape(x.shape[0], -1))  # heads x dim_head wide
            x = x + layer.ff_out(layer.ff_in(layer.ff_norm(x)))
    return cache.logits(x)


def _check_position(position: int, prefix_len: int, max_seq_len: int) -> None:
    if not prefix_len <= position < max_seq_len:
        raise ValueError(f"position {position} is not a latent position of a window of at "
                         f"most {max_seq_len} tokens with a {prefix_len}-token prefix")


def _cached_attention(q: Tensor, k: Tensor, v: Tensor, k_cache: Tensor, v_cache: Tensor,
                      index: int | Tensor, mask: Tensor | None, scale: float,
                      shared: int = 0) -> Tensor:
    """Store ``k`` and ``v`` (batch, heads, dim_head) at cache position ``index`` and attend
    from ``q`` to positions 0..index (``mask``: the keys' mask over the whole cache, or
    None). A tensor ``index`` keeps every shape fixed (the static step). Positions before
    ``shared`` hold the same keys and values in every row (`DecodeCache.set_shared`)."""
    if isinstance(index, Tensor):
        k_cache.index_copy_(2, index, k[:, :, None])
        v_cache.index_copy_(2, index, v[:, :, None])
        keys, values = k_cache, v_cache
    else:
        k_cache[:, :, index] = k
        v_cache[:, :, index] = v
        mask = None if mask is None else mask[..., : index + 1]
        if shared:
            return _shared_prefix_attention(q, k_cache, v_cache, index, mask, scale, shared)
        keys, values = k_cache[:, :, : index + 1], v_cache[:, :, : index + 1]
    return F.scaled_dot_product_attention(q[:, :, None], keys, values, attn_mask=mask,
                                          scale=scale)


def _shared_prefix_attention(q: Tensor, k_cache: Tensor, v_cache: Tensor, index: int,
                             mask: Tensor | None, scale: float, shared: int) -> Tensor:
    """`_cached_attention` over positions 0..index when positions before ``shared`` are
    the same in every row: those are read once, from row 0, with every row's query as
    one sequence of queries, the rest per row; the two softmaxes merge through their
    log-sum-exps (which torch's CPU flash kernel returns). Memory traffic, which bounds
    a step, then grows with the rows' own positions only."""
    flash = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu
    bias = None  # that kernel takes an additive mask
    if mask is not None:
        bias = torch.zeros(mask.shape, dtype=q.dtype).masked_fill_(~mask, float("-inf"))
    queries = q.transpose(0, 1)[None]  # (1, heads, batch, dim_head)
    common, common_lse = flash(queries, k_cache[:1, :, :shared], v_cache[:1, :, :shared],
                               scale=scale,
                               attn_mask=None if bias is None else bias[:1, ..., :shared])
    own, own_lse = flash(q[:, :, None], k_cache[:, :, shared : index + 1],
                         v_cache[:, :, shared : index + 1], scale=scale,
                         attn_mask=None if bias is None else bias[..., shared:])
    common = common[0].transpose(0, 1)[:, :, None]  # (batch, heads, 1, dim_head)
    common_lse = common_lse[0].transpose(0, 1)[..., None, None]
    own_lse = own_lse[..., None]  # (batch, heads, 1, 1)
    total = torch.logaddexp(common_lse, own_lse)  # float32, whatever q's dtype
    return (common * (common_lse - total).exp() + own * (own_lse - total).exp()).to(q.dtype)


class CudaGraphStep:
    """`decode_step` captured once as a CUDA graph and replayed for every token.

    At batch 1 a step launches a few hundred small kernels, and on a fast GPU launching
    them from Python takes longer than running them; a replay launches them all at once.
    Capture writes warm-up steps into ``cache``, so build this before `forward` fills the
    cache. The cache must stay the one captured: `forward` with it rewrites its tensors in
    place, `DecodeCache.reorder` does not (beam search runs without graphs).
    """

    def __init__(self, model: PerceiverAR, cache: DecodeCache, batch: int) -> None:
        device = self.device = cache.key_valid.device
        self.prefix_len, self.max_seq_len = cache.prefix_len, model.max_seq_len
        self.token = torch.zeros(batch, dtype=torch.long, device=device)
        self.position = torch.full((), cache.prefix_len, dtype=torch.long, device=device)
        # On the cache's device (not whichever is current: from_pretrained(device="cuda:1")),
        # on a stream of its own, one capture at a time in the process (the app decodes
        # several generations in threads); "thread_local" lets the other threads go on
        # launching kernels meanwhile.
        with _CAPTURE_LOCK, torch.cuda.device(device):
            stream = torch.cuda.Stream(device)
            stream.wait_stream(torch.cuda.current_stream(device))
            with torch.cuda.stream(stream):
                for _ in range(2):  # warm-up: lazy initialisation must not happen in capture
                    decode_step(model, self.token, self.position, cache)
            torch.cuda.current_stream(device).wait_stream(stream)
            self.graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(self.graph, stream=stream, capture_error_mode="thread_local"):
                self.logits = decode_step(model, self.token, self.position, cache)

    def __call__(self, token: Tensor, position: int) -> Tensor:
        """`decode_step` (``token``, ``position``) through the graph; a new tensor."""
        _check_position(position, self.prefix_len, self.max_seq_len)
        self.token.copy_(token)
        self.position.fill_(position)
        with torch.cuda.device(self.device):
            self.graph.replay()
        return self.logits.clone()


_CAPTURE_LOCK = threading.Lock()


def loss_fn(logits: Tensor, targets: Tensor) -> Tensor:
    """Mean cross entropy over the latent positions, ignoring PAD targets.

    ``logits`` is (batch, n, vocab) from `forward`. ``targets`` is (batch, n), or the
    targets of the whole window (batch, t >= n), of which the last n are used. The
    library's own loss ignores id 0, which is a real note (NOTE_ON pitch 0); this one
    ignores PAD only. Returns 0 when every target is PAD.
    """
    n = logits.shape[1]
    if targets.shape[0] != logits.shape[0] or targets.shape[1] < n:
        raise ValueError(f"targets {tuple(targets.shape)} do not cover logits "
                         f"{tuple(logits.shape[:2])}")
    targets = targets[:, -n:]
    total = F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(),
                            targets.reshape(-1), ignore_index=PAD, reduction="sum")
    return total / (targets != PAD).sum().clamp(min=1)



def window_losses(
    model: PerceiverAR, tokens: Tensor, prefix_mask: Tensor, batch_size: int = 16,
    progress: Callable[[int], object] | None = None,
) -> tuple[float, int]:
    """Summed cross entropy (nats) and the number of targets over whole windows.

    ``tokens`` is (windows, t + 1) as `perceiver_music.data.validation_windows` makes them,
    ``prefix_mask`` (windows, m). Runs without gradients on the model's device, in
    whatever mode the model is in; divide the two for nats per token. ``progress`` is
    called with the number of windows after each batch (``tqdm.update`` fits).
    """
    device = next(model.parameters()).device
    total, count = 0.0, 0
    with torch.no_grad():
        for i in range(0, len(tokens), batch_size):
            x = tokens[i : i + batch_size].to(device)
            logits = forward(model, x[:, :-1], prefix_mask[i : i + batch_size].to(device))
            n = int((x[:, -logits.shape[1] :] != PAD).sum())
            total += float(loss_fn(logits, x[:, 1:])) * n
            count += n
            if progress is not None:
                progress(len(x))
    return total, count

# ---------------------------------------------------------------------------------------
# attention layers


def _prefix_attention(
    attn: CausalPrefixAttention,
    x: Tensor,
    prefix: Tensor,
    prefix_mask: Tensor | None,
    cos: Tensor,
    sin: Tensor,
    kv_cache: tuple[Tensor, Tensor] | None,
) -> Tensor:
    """The cross-attention layer: latents attend to the prefix and, causally, to latents."""
    batch, n, _ = x.shape
    m = prefix.shape[1]
    heads, _ = _head_shape(attn)
    k_cos, k_sin = cos, sin
    if attn.training and attn.cross_attn_dropout > 0.0:
        # Same draw as the library (uniform scores, top-k), so a seeded run keeps the same
        # positions; gathered in window order, each with its rotary position.
        keep = m - int(m * attn.cross_attn_dropout)
        rand = torch.zeros((batch, m), device=x.device).uniform_()
        idx = rand.topk(keep, dim=-1).indices.sort(dim=-1).values
        prefix = prefix.gather(1, idx[..., None].expand(-1, -1, prefix.shape[-1]))
        if prefix_mask is not None:
            prefix_mask = prefix_mask.gather(1, idx)
        k_cos = torch.cat((cos[idx], cos[m:].expand(batch, -1, -1)), dim=1)[:, None]
        k_sin = torch.cat((sin[idx], sin[m:].expand(batch, -1, -1)), dim=1)[:, None]
        m = keep

    xn = attn.norm(x)
    q = _split_heads(attn.to_q(xn), heads)
    kv = attn.to_kv(torch.cat((attn.context_norm(prefix), xn), dim=1))
    k, v = (_split_heads(t, heads) for t in kv.chunk(2, dim=-1))
    q = _rotate(q, cos[-n:], sin[-n:])
    k = _rotate(k, k_cos, k_sin)
    if kv_cache is not None:
        kv_cache[0][:, :, : m + n] = k
        kv_cache[1][:, :, : m + n] = v

    # Latent i sees every prefix position and latents 0..i: causal, aligned bottom-right.
    if prefix_mask is None:
        mask = lower_right_causal(n, m + n, x.device)
    else:
        causal = torch.ones(n, m + n, dtype=torch.bool, device=x.device).tril(m)
        mask = causal & _key_mask(prefix_mask, m + n)
    out = F.scaled_dot_product_attention(
        q, k, v, attn_mask=mask, scale=attn.scale,
        dropout_p=attn.dropout.p if attn.training else 0.0)
    return attn.to_out(_merge_heads(out))


def _self_attention(
    attn: CausalAttention,
    x: Tensor,
    cos: Tensor,
    sin: Tensor,
    kv_cache: tuple[Tensor, Tensor] | None,
) -> Tensor:
    """A causal self-attention layer over the latents."""
    heads, _ = _head_shape(attn)
    q, k, v = (_split_heads(t, heads) for t in attn.to_qkv(attn.norm(x)).chunk(3, dim=-1))
    q, k = _rotate(q, cos, sin), _rotate(k, cos, sin)
    if kv_cache is not None:
        n = x.shape[1]
        kv_cache[0][:, :, :n] = k
        kv_cache[1][:, :, :n] = v
    out = F.scaled_dot_product_attention(
        q, k, v, is_causal=True, scale=attn.scale,
        dropout_p=attn.dropout.p if attn.training else 0.0)
    return attn.to_out(_merge_heads(out))


# ---------------------------------------------------------------------------------------
# helpers


def _norm(norm: nn.LayerNorm) -> Callable[[Tensor], Tensor]:
    """``norm`` without a module call's overhead (a decode step makes 18 calls)."""
    return functools.partial(torch.layer_norm, normalized_shape=norm.normalized_shape,
                             weight=norm.weight, bias=norm.bias, eps=norm.eps)


def _linear_gelu(layer: nn.Linear, x: Tensor) -> Tensor:
    return F.gelu(layer(x))


def lower_right_causal(rows: int, keys: int, device: torch.device) -> Tensor | object:
    """The mask of ``rows`` queries that see all ``keys`` but the last rows-1-i (causal,
    aligned bottom-right). On an accelerator a CausalBias, which CUDA runs with flash
    kernels; on a CPU, which would only materialise it, the boolean mask itself (the
    CausalBias module imports torch._dynamo: 1.4 s at the start of every script)."""
    if device.type == "cpu":
        return torch.ones(rows, keys, dtype=torch.bool, device=device).tril(keys - rows)
    from torch.nn.attention.bias import causal_lower_right

    return causal_lower_right(rows, keys)


def _key_mask(prefix_mask: Tensor, length: int) -> Tensor:
    """(batch, 1, 1, length) key mask: the prefix mask, then True for every latent."""
    batch, m = prefix_mask.shape
    latents = prefix_mask.new_ones(batch, length - m)
    return torch.cat((prefix_mask, latents), dim=1)[:, None, None, :]


def _rotary(model: PerceiverAR, positions: Tensor) -> tuple[Tensor, Tensor]:
    """cos and sin of the rotary angles at ``positions``: (len, rotary_dim) each, float32.

    Angles reach thousands of radians, so they are computed in float32 even for a model
    cast to bfloat16 (whose rounded ``inv_freq`` buffer is recomputed; bfloat16 positions
    above 256 are not even integers)."""
    inv_freq = model.rotary_pos_emb.inv_freq
    if inv_freq.dtype != torch.float32:
        dim = 2 * inv_freq.numel()
        inv_freq = 1.0 / 10000 ** (torch.arange(0, dim, 2, device=inv_freq.device).float() / dim)
    freqs = positions.float()[:, None] * inv_freq
    freqs = torch.cat((freqs, freqs), dim=-1)
    return freqs.cos(), freqs.sin()


def _rotation_matrix(cos: Tensor, sin: Tensor, dim_head: int) -> Tensor:
    """(dim_head, dim_head) R with ``t @ R == _rotate(t, cos, sin)`` at one position
    (``cos``, ``sin``: (rotary_dim,)): one small product per rotation in a decode step,
    instead of eight element-wise ops."""
    rot, half = cos.shape[-1], cos.shape[-1] // 2
    r = torch.eye(dim_head, dtype=cos.dtype, device=cos.device)
    i = torch.arange(half, device=cos.device)
    r[:rot, :rot] = torch.diag(cos)
    r[i + half, i] = -sin[:half]  # out[j] = t[j] cos[j] - t[j + half] sin[j]
    r[i, i + half] = sin[half:]  # out[j + half] = t[j + half] cos[j + half] + t[j] sin[j + half]
    return r


def _rotate(t: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate the first rotary_dim features of ``t`` (..., len, dim_head) by the angles,
    in ``t``'s dtype (under bfloat16 autocast, queries, keys and values stay bfloat16 so
    that attention runs one kernel, flash where it can)."""
    rot = cos.shape[-1]
    cos, sin = cos.to(t.dtype), sin.to(t.dtype)
    t_rot, t_pass = t[..., :rot], t[..., rot:]
    x1, x2 = t_rot.chunk(2, dim=-1)
    t_rot = t_rot * cos + torch.cat((-x2, x1), dim=-1) * sin
    return torch.cat((t_rot, t_pass), dim=-1) if t_pass.shape[-1] else t_rot


def _head_shape(attn: CausalAttention | CausalPrefixAttention) -> tuple[int, int]:
    """(heads, dim_head) of an attention layer."""
    return attn.heads, attn.to_out.in_features // attn.heads


def _split_heads(t: Tensor, heads: int) -> Tensor:
    batch, length, inner = t.shape
    return t.view(batch, length, heads, inner // heads).transpose(1, 2)


def _merge_heads(t: Tensor) -> Tensor:
    batch, heads, length, dim_head = t.shape
    return t.transpose(1, 2).reshape(batch, length, heads * dim_head)


def use_fast_forward(model: PerceiverAR) -> PerceiverAR:
    """Make ``model(tokens, prefix_mask)`` run `forward` (SDPA) instead of the library's.

    The module, its parameters and its state-dict layout stay the library's; only the
    instance's forward changes, so wrappers that call the module (DDP, accelerate's
    mixed precision) run the fast path with their hooks intact. Returns ``model``.
    """
    model.forward = functools.partial(forward, model)
    return model
