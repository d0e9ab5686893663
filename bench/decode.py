"""Cached decoding on CPU against its memory floor: float32 and int8, batch 1 and 8.

One run measures, side by side on one random model (default: d512, 8 layers + the
cross-attention layer, context 4096, prefix 3072 / 1024 latents, the shapes of issue 16):
- the floor: bytes one step must read (the linear weights and the keys and values
  attention reads, averaged over the window positions decoded) over this machine's read
  bandwidth (a sum over 256 MB with every core; a step only reads its big tensors), and
  the same for 8 samples of one primer, which share the primer's keys and values (read
  once) and read their own positions each;
- the reference: the engine's previous layout (an (in, out)-major weight copy, ``x @ W``
  through MKL, one thread);
- the float32 step now (the weight layout this CPU runs fastest, every core), and int8 weights;
- num_samples 8 against 1, and tokens/s over a long run that includes the re-encodes;
- the host-side cost of generate.py's default sampling biases (release and tonality, which
  follow the notes sounding in each sample) on top of the int8 step;
- exactness: float32 cached logits against the library's forward on the same windows, and
  int8's deviation from float32 (max |logit diff|, KL divergence, top-1 agreement).
Figures only, no assertions.

    python -m bench.decode
    python -m bench.decode --dim 256 --depth 4 --context 1024 --latents 256   # quicker
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # for python bench/NAME.py too

import perceiver_music.model as model_module  # noqa: E402
from midi_processor.vocab import PAD  # noqa: E402
from perceiver_music.api import RELEASE, TONALITY  # noqa: E402
from perceiver_music.config import ModelConfig  # noqa: E402
from perceiver_music.engine import SamplingConfig, StepInfo, generate  # noqa: E402
from perceiver_music.model import DecodeCache, build_model, decode_step, forward  # noqa: E402


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--depth", type=int, default=8)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--context", type=int, default=4096)
    parser.add_argument("--latents", type=int, default=1024)
    parser.add_argument("--steps", type=int, default=200, help="timed steps per setting")
    parser.add_argument("--rounds", type=int, default=3, help="turns each setting takes")
    parser.add_argument("--long", type=int, default=1500,
                        help="tokens of the long run (re-encodes included)")
    parser.add_argument("--seed", type=int, default=0)
    return parser.parse_args()


def read_bandwidth() -> float:
    """Bytes read per second by a sum over 256 MB (best of 10). A copy moves each byte
    twice (counted once, it reads at about half this speed)."""
    src = torch.ones(64 * 2**20)
    best = float("inf")
    for _ in range(10):
        t = time.perf_counter()
        src.sum()
        best = min(best, time.perf_counter() - t)
    return src.numel() * 4 / best


@contextmanager
def reference_layout() -> Iterator[None]:
    """The engine before oneDNN: every linear as ``x @ W`` with an (in, out)-major copy."""
    saved = model_module._packed_layout_wins
    model_module._packed_layout_wins = lambda dtype, batch: False
    try:
        yield
    finally:
        model_module._packed_layout_wins = saved


def step_ms(model, primer: torch.Tensor, steps: int, **kwargs) -> tuple[float, float]:
    """(median ms of a cached step, tokens/s of all samples over the run) of `generate`."""
    times: list[float] = []
    last = [0.0]

    def on_step(info: StepInfo) -> None:
        now = time.perf_counter()
        if not info.reencoded and last[0]:
            times.append(now - last[0])
        last[0] = now

    start = time.perf_counter()
    with torch.no_grad():
        result = generate(model, primer, max_new_tokens=steps, stop_on_end=False, seed=0,
                          on_step=on_step, **kwargs)
    elapsed = time.perf_counter() - start
    return statistics.median(times) * 1000, sum(map(len, result.tokens)) / elapsed


def deviation(model, tokens: torch.Tensor, count: int) -> dict[str, float]:
    """Cached logits of ``count`` steps in float32 and int8 against the library forward."""
    m = model.cross_attn_seq_len
    logits = {}
    with torch.no_grad():
        for precision in ("float32", "int8"):
            cache = DecodeCache(model, 1, precision=precision)
            forward(model, tokens[None, : m + 1], cache=cache)
            logits[precision] = torch.cat([decode_step(model, tokens[p : p + 1], p, cache)
                                           for p in range(m + 1, m + 1 + count)])
        reference = model(tokens[None, : m + 1 + count])[0, 1:]
    a, b = logits["float32"], logits["int8"]
    pa, pb = a.log_softmax(-1), b.log_softmax(-1)
    return {"fp32_vs_library": float((a - reference).abs().max()),
            "int8_max_logit_diff": float((b - a).abs().max()),
            "int8_kl": float((pa.exp() * (pa - pb)).sum(-1).mean()),
            "int8_top1": float((a.argmax(-1) == b.argmax(-1)).float().mean())}


def model_config(args: argparse.Namespace) -> ModelConfig:
    """The model of the --dim, --depth, --heads, --context and --latents options."""
    return ModelConfig(dim=args.dim, depth=args.depth, heads=args.heads,
                       dim_head=args.dim // args.heads, max_seq_len=args.context,
                       cross_attn_seq_len=args.context - args.latents)


def main() -> None:
    args = parse_args()
    torch.manual_seed(args.seed)
    cfg = model_config(args)
    model = build_model(cfg).eval()
    m, n = cfg.cross_attn_seq_len, cfg.max_seq_len - cfg.cross_attn_seq_len
    threads = torch.get_num_threads()
    # Start half a stride into the latents, as a window does after its first re-encode.
    primer = torch.randint(0, PAD, (m + n // 2,))

    linear_bytes = sum(x.weight.numel() * 4 for x in model.modules()
                       if isinstance(x, torch.nn.Linear))
    positions = range(m + n // 2, m + n // 2 + args.steps)  # where the timed steps decode
    kv_per_position = 2 * cfg.heads * (cfg.dim // cfg.heads) * 4
    shared = len(primer)  # the samples' windows agree on the primer's positions
    shared_bytes = kv_per_position * (shared * cfg.perceive_depth + (shared - m) * cfg.depth)
    own_bytes = statistics.mean(kv_per_position * (p + 1 - shared) * (cfg.perceive_depth
                                                                      + cfg.depth)
                                for p in positions)
    print(f"model: d{cfg.dim}, {cfg.perceive_depth}+{cfg.depth} layers, context "
          f"{cfg.max_seq_len}, prefix {m} / {n} latents; {threads} threads")
    settings = {  # name: (weight bytes per element, samples, generate() arguments, layout)
        "reference: x @ W, 1 thread": (4, 1, {"decode_threads": 1}, reference_layout),
        "float32 (fastest layout)": (4, 1, {}, nullcontext),
        "int8 weights": (1, 1, {"precision": "int8"}, nullcontext),
        "int8, release": (1, 1, {"precision": "int8", "sampling": SamplingConfig(
            release=RELEASE)}, nullcontext),
        "int8, release + tonality": (1, 1, {"precision": "int8", "sampling": SamplingConfig(
            release=RELEASE, tonality=TONALITY)}, nullcontext),
        "float32, num_samples 8": (4, 8, {"num_samples": 8}, nullcontext),
        "int8, num_samples 8": (1, 8, {"num_samples": 8, "precision": "int8"}, nullcontext),
    }
    # A shared VM's bandwidth drifts (and differs between buffers): settings take turns
    # over the rounds, and the bandwidth is measured around each round (floor: median).
    times: dict[str, list[float]] = {name: [] for name in settings}
    bandwidths = [read_bandwidth()]
    for _ in range(args.rounds):
        for name, (_, _, kwargs, layout) in settings.items():
            with layout():
                times[name].append(step_ms(model, primer, args.steps, **kwargs)[0])
        bandwidths.append(read_bandwidth())
    bandwidth = statistics.median(bandwidths)
    print(f"read bandwidth {min(bandwidths) / 1e9:.1f}-{max(bandwidths) / 1e9:.1f} GB/s over "
          f"the run, median {bandwidth / 1e9:.1f}; "
          f"a step reads {linear_bytes / 1e6:.0f} MB of float32 weights + "
          f"{(shared_bytes + own_bytes) / 1e6:.0f} MB of keys/values, of which "
          f"{own_bytes / 1e6:.1f} MB are each sample's own")
    print(f"{'cached step (median of ' + str(args.rounds) + ' rounds)':34s} {'ms/step':>8s} "
          f"{'floor ms':>8s} {'x floor':>8s}")
    ms = {name: statistics.median(t) for name, t in times.items()}
    for name, (size, samples, _, _) in settings.items():
        floor = (linear_bytes * size / 4 + shared_bytes + samples * own_bytes) / bandwidth * 1000
        print(f"{name:34s} {ms[name]:8.2f} {floor:8.2f} {ms[name] / floor:8.2f}")
    ref, fp32, int8, released, tonal, fp32_8, int8_8 = ms.values()
    print(f"float32 vs reference: {ref / fp32:.2f}x faster; int8 vs float32: "
          f"{fp32 / int8:.2f}x faster")
    print(f"int8 with release {RELEASE:g}: {released - int8:+.3f} ms/step "
          f"({released / int8 - 1:+.1%}); tonality {TONALITY:g} on top: "
          f"{tonal - released:+.3f} ms/step ({tonal / released - 1:+.1%})")
    print(f"num_samples 8 / 1: float32 {fp32_8 / fp32:.2f}x, int8 {int8_8 / int8:.2f}x "
          "the time of one sample")

    long = {(precision, samples): step_ms(model, primer, args.long, precision=precision,
                                          num_samples=samples, stride=n // 2)[1]
            for precision in ("float32", "int8") for samples in (1, 8)}
    print(f"{args.long} tokens with re-encodes every {n // 2} (tok/s, all samples): "
          + ", ".join(f"{precision} x{samples} {rate:.0f}"
                      for (precision, samples), rate in long.items()))

    tokens = torch.randint(0, PAD, (cfg.max_seq_len,))
    dev = deviation(model, tokens, min(64, n - 1))
    print(f"exactness: float32 cached vs library forward max |logit diff| "
          f"{dev['fp32_vs_library']:.1e}; int8 vs float32: max |logit diff| "
          f"{dev['int8_max_logit_diff']:.3f}, KL {dev['int8_kl']:.1e} nats/token, top-1 "
          f"agreement {dev['int8_top1']:.1%}")


if __name__ == "__main__":
    main()
