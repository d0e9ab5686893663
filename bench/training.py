"""Training step speed and peak memory: the library's forward against the fast forward.

Both run forward + backward of the same loss (`perceiver_music.loss_fn`) on the same
random batch, in training mode (prefix dropout on). Each variant runs in its own
subprocess so that its peak memory is its own: peak RSS on CPU (torch allocations are
invisible to tracemalloc), max allocated memory on CUDA. "activations" is the peak minus
the memory held just before the first step (interpreter, torch, model). Figures only.

    python -m bench.training                          # 4096 context, 3072 latents, CPU
    python -m bench.training --device cuda --batch 8
    python -m bench.training --loop --preset demo     # whole steps through train.py

With ``--loop`` it times whole optimizer steps instead: train.py's own loop (window
sampling with augmentation, fast forward, PAD-free loss, AdamW, clipping; run as a
subprocess on synthetic token data, tokens/s from its metrics.csv) beside the library's
forward with its own loss and the same optimizer step, for a named preset.
"""

from __future__ import annotations

import argparse
import csv
import json
import pickle
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # for python bench/NAME.py too

from midi_processor.vocab import PAD  # noqa: E402
from perceiver_music.config import ModelConfig, preset  # noqa: E402
from perceiver_music.model import build_model, forward, loss_fn  # noqa: E402

VARIANTS = ("library", "fast")
ROOT = Path(__file__).resolve().parent.parent


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--context", type=int, default=4096, help="max_seq_len")
    parser.add_argument(
        "--latents",
        type=int,
        default=3072,
        help="latents (the original 4096 run used a 1024-token prefix)",
    )
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--depth", type=int, default=8)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--cross_attn_dropout", type=float, default=0.5)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--steps", type=int, default=2, help="timed steps per variant")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--loop", action="store_true", help="whole steps through train.py")
    parser.add_argument("--preset", default="demo", help="model preset for --loop")
    parser.add_argument("--variant", choices=(*VARIANTS, "library_loop"),
                        help=argparse.SUPPRESS)
    return parser.parse_args()


def rss_mb() -> float:
    """Peak resident set size of this process so far (ru_maxrss is in KiB on Linux)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def run_variant(args: argparse.Namespace) -> dict[str, float]:
    """Time ``args.variant`` in this process; its figures as a dict."""
    device = torch.device(args.device)
    cfg = ModelConfig(
        dim=args.dim,
        depth=args.depth,
        heads=args.heads,
        max_seq_len=args.context,
        cross_attn_seq_len=args.context - args.latents,
        cross_attn_dropout=args.cross_attn_dropout,
    )
    torch.manual_seed(args.seed)
    model = build_model(cfg).to(device).train()
    seq = torch.randint(0, PAD, (args.batch, args.context + 1), device=device)
    x, y = seq[:, :-1], seq[:, 1:]
    run = model if args.variant == "library" else lambda tokens: forward(model, tokens)

    def step() -> None:
        model.zero_grad(set_to_none=True)
        loss_fn(run(x), y).backward()

    cuda = device.type == "cuda"
    before = torch.cuda.memory_allocated(device) / 2**20 if cuda else rss_mb()
    if cuda:
        torch.cuda.reset_peak_memory_stats(device)
    for _ in range(args.warmup):
        step()
    if cuda:
        torch.cuda.synchronize(device)
    began = time.perf_counter()
    for _ in range(args.steps):
        step()
    if cuda:
        torch.cuda.synchronize(device)
    seconds = (time.perf_counter() - began) / args.steps
    peak = torch.cuda.max_memory_allocated(device) / 2**20 if cuda else rss_mb()
    return {
        "tokens_per_s": args.batch * args.context / seconds,
        "s_per_step": seconds,
        "peak_mb": peak,
        "activations_mb": peak - before,
    }


def run_library_loop(args: argparse.Namespace) -> dict[str, float]:
    """Whole steps the library's way: its forward and loss (labels=), AdamW, clipping."""
    cfg = preset(args.preset)
    torch.manual_seed(args.seed)
    model = build_model(cfg).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    before = rss_mb()

    def step() -> None:
        seq = torch.randint(1, PAD, (args.batch, cfg.max_seq_len + 1))
        loss = model(seq[:, :-1], labels=seq[:, 1:])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()

    for _ in range(args.warmup):
        step()
    began = time.perf_counter()
    for _ in range(args.steps):
        step()
    seconds = (time.perf_counter() - began) / args.steps
    return {"tokens_per_s": args.batch * cfg.num_latents / seconds, "s_per_step": seconds,
            "peak_mb": rss_mb(), "activations_mb": rss_mb() - before}


def run_train_py(args: argparse.Namespace) -> dict[str, float]:
    """Whole steps through train.py on synthetic token pickles, in a child process."""
    cfg = preset(args.preset)
    steps = args.warmup + args.steps
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "data"
        rng = torch.Generator().manual_seed(args.seed)
        for split, pieces in (("train", 16), ("val", 2)):
            (data / split).mkdir(parents=True)
            for i in range(pieces):
                ids = torch.randint(0, 388, (4 * cfg.max_seq_len,), generator=rng).tolist()
                (data / split / f"{i}.pickle").write_bytes(pickle.dumps(ids + [388]))
        cmd = [sys.executable, "train.py", "--preset", args.preset, "--data_dir", str(data),
               "--out_dir", str(Path(tmp) / "run"), "--batch_size", str(args.batch),
               "--max_steps", str(steps), "--log_interval", str(args.warmup or 1),
               "--eval_interval", str(10**9), "--save_interval", str(10**9),
               "--eval_windows", "1", "--no-tensorboard", "--seed", str(args.seed),
               # the library side runs the preset as is: same dropout settings here
               "--dropout", str(cfg.dropout), "--prefix_dropout", str(cfg.cross_attn_dropout)]
        subprocess.run(cmd, cwd=ROOT, check=True, capture_output=True)
        text = (Path(tmp) / "run" / "metrics.csv").read_text()
    rows = list(csv.DictReader(text.splitlines()))
    tps = float([r for r in rows if r["tokens_per_s"]][-1]["tokens_per_s"])
    # Peak of the largest child so far: call this before starting any other child.
    peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    return {"tokens_per_s": tps, "s_per_step": args.batch * cfg.num_latents / tps,
            "peak_mb": peak, "activations_mb": float("nan")}


def main_loop(args: argparse.Namespace) -> None:
    """--loop: library whole steps against train.py's, same preset and batch."""
    cfg = preset(args.preset)
    print(f"whole training steps, preset {args.preset} (context {cfg.max_seq_len}, "
          f"{cfg.num_latents} latents, dim {cfg.dim}, depth {cfg.depth}), batch {args.batch}, "
          f"{args.steps} timed steps after {args.warmup}; tokens = latent targets")
    ours = run_train_py(args)
    child = [sys.executable, "-m", "bench.training", *sys.argv[1:], "--variant", "library_loop"]
    out = subprocess.run(child, check=True, capture_output=True, text=True).stdout
    lib = json.loads(out.strip().splitlines()[-1])
    for name, r in (("library loop", lib), ("train.py", ours)):
        print(f"{name:12s} {r['tokens_per_s']:9.0f} tokens/s  {r['s_per_step']:7.2f} s/step  "
              f"peak {r['peak_mb']:8.0f} MB")
    print(f"train.py / library: {ours['tokens_per_s'] / lib['tokens_per_s']:.2f}x tokens/s, "
          f"peak {ours['peak_mb'] / lib['peak_mb']:.2f}x")


def main() -> None:
    args = parse_args()
    if args.variant == "library_loop":
        print(json.dumps(run_library_loop(args)))
        return
    if args.variant:
        print(json.dumps(run_variant(args)))
        return
    if args.loop:
        main_loop(args)
        return
    print(
        f"context {args.context}, {args.latents} latents, dim {args.dim}, depth "
        f"{args.depth}, heads {args.heads}, batch {args.batch}, device {args.device}, "
        f"threads {torch.get_num_threads()}, {args.steps} timed steps"
    )
    results = {}
    for variant in VARIANTS:
        child = [sys.executable, "-m", "bench.training", *sys.argv[1:], "--variant", variant]
        out = subprocess.run(child, check=True, capture_output=True, text=True).stdout
        results[variant] = json.loads(out.strip().splitlines()[-1])
        r = results[variant]
        print(
            f"{variant:8s} {r['tokens_per_s']:9.0f} tokens/s  {r['s_per_step']:7.2f} s/step  "
            f"peak {r['peak_mb']:8.0f} MB  activations {r['activations_mb']:8.0f} MB"
        )
    lib, fast = results["library"], results["fast"]
    print(
        f"fast / library: {fast['tokens_per_s'] / lib['tokens_per_s']:.2f}x tokens/s, "
        f"peak {fast['peak_mb'] / lib['peak_mb']:.2f}x, "
        f"activations {fast['activations_mb'] / lib['activations_mb']:.2f}x"
    )


if __name__ == "__main__":
    main()
