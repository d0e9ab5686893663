"""GPU figures: cached decoding with and without CUDA graphs, and bf16 training steps.

One run on one CUDA GPU, random weights of a preset (default ctx8192: context 8192,
prefix 7168 / 1024 latents, dim 1024, 8 layers):
- decoding at batch 1 through `perceiver_music.engine.generate` (sampling), float32 and
  bfloat16 weights, each with ``cuda_graphs`` off (one launch per kernel) and on (one
  replay per step), interleaved over ``--rounds``: tokens/s over the whole run (the
  re-encodes included) and the median one-token step;
- the logits of the graph steps against the eager steps (max |diff|, same weights);
- training steps (forward + backward of the fast forward, prefix dropout on) in float32
  against bfloat16 autocast with SDPA restricted to flash attention.
Figures only, no assertions.

    python -m bench.gpu
    python -m bench.gpu --preset ctx4096 --tokens 2048
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # for python bench/NAME.py too

from midi_processor.vocab import PAD  # noqa: E402
from perceiver_music.config import preset  # noqa: E402
from perceiver_music.engine import StepInfo, generate  # noqa: E402
from perceiver_music.model import (  # noqa: E402
    CudaGraphStep,
    DecodeCache,
    build_model,
    decode_step,
    forward,
    loss_fn,
)


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default="ctx8192")
    parser.add_argument("--tokens", type=int, default=1536, help="new tokens per decode run")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--train_batch", type=int, default=4)
    parser.add_argument("--train_steps", type=int, default=5)
    parser.add_argument("--seed", type=int, default=0)
    return parser.parse_args()


def decode(model, primer: torch.Tensor, tokens: int, graphs: bool) -> tuple[float, float]:
    """(tokens/s over the run, median ms of a cached step) of one sampling run."""
    times: list[float] = []
    last = [0.0]

    def on_step(info: StepInfo) -> None:
        torch.cuda.synchronize()
        now = time.perf_counter()
        if not info.reencoded and last[0]:
            times.append(now - last[0])
        last[0] = now

    torch.cuda.synchronize()
    start = time.perf_counter()
    result = generate(model, primer, max_new_tokens=tokens, stop_on_end=False, seed=0,
                      cuda_graphs=graphs, on_step=on_step)
    torch.cuda.synchronize()
    return len(result.tokens[0]) / (time.perf_counter() - start), statistics.median(times) * 1e3


def graph_deviation(model, count: int = 64) -> float:
    """Max |logit diff| between graph and eager steps over the same ``count`` tokens."""
    m = model.cross_attn_seq_len
    count = min(count, model.max_seq_len - m - 1)
    tokens = torch.randint(0, PAD, (1, m + 1 + count), device="cuda")
    eager, graphed = DecodeCache(model, 1), DecodeCache(model, 1)
    step = CudaGraphStep(model, graphed, 1)
    worst = 0.0
    with torch.no_grad():
        forward(model, tokens[:, : m + 1], cache=eager)
        forward(model, tokens[:, : m + 1], cache=graphed)
        for p in range(m + 1, m + 1 + count):
            diff = step(tokens[:, p], p).float() - decode_step(model, tokens[:, p], p, eager)
            worst = max(worst, float(diff.abs().max()))
    return worst


def train_steps(model, batch: int, steps: int, bf16: bool) -> float:
    """Training tokens (latent targets) per second of forward + backward."""
    m = model.cross_attn_seq_len
    tokens = torch.randint(0, PAD, (batch, model.max_seq_len + 1), device="cuda")
    model.train()
    elapsed = []
    for i in range(steps + 1):
        torch.cuda.synchronize()
        start = time.perf_counter()
        if bf16:
            with sdpa_kernel(SDPBackend.FLASH_ATTENTION), torch.autocast("cuda", torch.bfloat16):
                loss = loss_fn(forward(model, tokens[:, :-1]), tokens[:, 1:])
        else:
            loss = loss_fn(forward(model, tokens[:, :-1]), tokens[:, 1:])
        loss.backward()
        model.zero_grad(set_to_none=True)
        torch.cuda.synchronize()
        if i:  # the first step warms up
            elapsed.append(time.perf_counter() - start)
    model.eval()
    return batch * (model.max_seq_len - m) / statistics.median(elapsed)


def main() -> None:
    args = parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("bench.gpu needs a CUDA GPU")
    torch.manual_seed(args.seed)
    cfg = preset(args.preset)
    m, n = cfg.cross_attn_seq_len, cfg.num_latents
    print(f"{torch.cuda.get_device_name()}; torch {torch.__version__}; {args.preset}: d{cfg.dim}"
          f", {cfg.perceive_depth}+{cfg.depth} layers, context {cfg.max_seq_len}, prefix {m} "
          f"/ {n} latents")
    models = {"float32": build_model(cfg).cuda().eval()}
    models["bfloat16"] = build_model(cfg).cuda().eval().to(torch.bfloat16)
    models["bfloat16"].load_state_dict(models["float32"].state_dict())
    primer = torch.randint(0, PAD, (m + n // 2,))

    results: dict[tuple[str, bool], list[tuple[float, float]]] = {}
    for _ in range(args.rounds):
        for dtype, model in models.items():
            for graphs in (False, True):
                results.setdefault((dtype, graphs), []).append(
                    decode(model, primer, args.tokens, graphs))
    print(f"decoding, batch 1, {args.tokens} tokens per run (re-encodes every {n // 2}), "
          f"median of {args.rounds} interleaved rounds:")
    print(f"{'weights':10s} {'CUDA graphs':12s} {'tokens/s':>9s} {'ms/step':>8s}")
    for (dtype, graphs), runs in results.items():
        print(f"{dtype:10s} {'on' if graphs else 'off':12s} "
              f"{statistics.median(r[0] for r in runs):9.0f} "
              f"{statistics.median(r[1] for r in runs):8.3f}")
    for dtype, model in models.items():
        print(f"graph vs eager steps, {dtype}: max |logit diff| "
              f"{graph_deviation(model):.2e}")

    model = models["float32"]
    del models["bfloat16"]
    torch.cuda.empty_cache()
    fp32 = train_steps(model, args.train_batch, args.train_steps, bf16=False)
    bf16 = train_steps(model, args.train_batch, args.train_steps, bf16=True)
    print(f"training, batch {args.train_batch}, forward + backward: float32 {fp32:,.0f} "
          f"tokens/s, bf16 autocast + flash attention {bf16:,.0f} tokens/s ({bf16 / fp32:.2f}x)")


if __name__ == "__main__":
    main()
