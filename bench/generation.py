"""Generation speed: the library's naive loop against the cached engine.

The naive loop is what `AutoregressiveWrapper.generate` does: a full library forward over
the last max_seq_len tokens for every new token. The engine (`perceiver_music.generate`)
caches keys and values and re-encodes every `stride` tokens. Both decode greedily from
the same random model and primer, so while their windows agree their logits must agree;
the largest difference over those steps is printed. Figures only: no assertions.

    python -m bench.generation                      # 4096 context, 512 new tokens, CPU
    python -m bench.generation --preset ctx8192 --primer_len 8000 --device cuda
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # for python bench/NAME.py too

from midi_processor.vocab import PAD  # noqa: E402
from perceiver_music.config import ModelConfig, preset  # noqa: E402
from perceiver_music.engine import SamplingConfig, StepInfo, generate  # noqa: E402
from perceiver_music.model import build_model  # noqa: E402


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", help="model preset (overrides the shape flags)")
    parser.add_argument("--context", type=int, default=4096, help="max_seq_len")
    parser.add_argument("--latents", type=int, default=1024)
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--depth", type=int, default=8)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--dim_head", type=int, default=64)
    parser.add_argument("--primer_len", type=int, default=3500)
    parser.add_argument("--new_tokens", type=int, default=512)
    parser.add_argument(
        "--naive_tokens",
        type=int,
        default=24,
        help="tokens timed with the naive loop (each is a full forward)",
    )
    parser.add_argument("--stride", type=int, help="engine re-encode stride (default n/2)")
    parser.add_argument(
        "--decode_threads",
        type=int,
        help="intra-op threads for the engine's one-token steps on CPU",
    )
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--seed", type=int, default=0)
    return parser.parse_args()


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def main() -> None:
    args = parse_args()
    device = torch.device(args.device)
    if args.preset:
        cfg = preset(args.preset)
    else:
        cfg = ModelConfig(
            dim=args.dim,
            depth=args.depth,
            heads=args.heads,
            dim_head=args.dim_head,
            max_seq_len=args.context,
            cross_attn_seq_len=args.context - args.latents,
        )
    torch.manual_seed(args.seed)
    model = build_model(cfg).to(device=device, dtype=getattr(torch, args.dtype)).eval()
    primer = torch.randint(0, PAD, (args.primer_len,), device=device)
    print(f"model: {cfg.to_dict()}")
    print(
        f"device {device}, {args.dtype}, threads {torch.get_num_threads()}, primer "
        f"{args.primer_len} tokens"
    )

    # Naive loop: full library forward on the last max_seq_len tokens per new token.
    # A primer of at most m tokens cannot be fed to the library without padding.
    naive_logits: list[torch.Tensor] = []
    naive_windows: list[torch.Tensor] = []
    naive_ms = float("nan")
    if args.primer_len > cfg.cross_attn_seq_len and args.naive_tokens > 0:
        seq = primer[None]
        with torch.inference_mode():
            model(seq[:, -cfg.max_seq_len :])  # warm-up
            sync(device)
            began = time.perf_counter()
            for _ in range(args.naive_tokens):
                window = seq[:, -cfg.max_seq_len :]
                logits = model(window)[:, -1]
                naive_windows.append(window)
                naive_logits.append(logits.float())
                seq = torch.cat((seq, logits.argmax(-1, keepdim=True)), dim=1)
            sync(device)
            naive_ms = (time.perf_counter() - began) * 1000 / args.naive_tokens

    engine_logits: list[torch.Tensor] = []
    engine_windows: list[torch.Tensor] = []
    step_ms: list[tuple[float, bool]] = []
    last = [0.0]

    def on_step(info: StepInfo) -> None:
        sync(device)
        now = time.perf_counter()
        step_ms.append(((now - last[0]) * 1000, info.reencoded))
        last[0] = now
        if info.step < len(naive_logits):
            engine_logits.append(info.logits.clone())
            engine_windows.append(info.window.clone())

    greedy = SamplingConfig(greedy=True)
    generate(model, primer[: min(args.primer_len, 64)], max_new_tokens=4, sampling=greedy)
    sync(device)
    began = last[0] = time.perf_counter()
    result = generate(
        model,
        primer,
        max_new_tokens=args.new_tokens,
        sampling=greedy,
        stop_on_end=False,
        stride=args.stride,
        decode_threads=args.decode_threads,
        on_step=on_step,
    )
    sync(device)
    engine_ms = (time.perf_counter() - began) * 1000 / len(result.tokens[0])

    cached = [ms for ms, full in step_ms if not full]
    full = [ms for ms, full in step_ms if full]
    if naive_logits:
        print(f"naive loop:  {naive_ms:9.2f} ms/token over {len(naive_logits)} tokens")
    else:
        print(
            f"naive loop:  skipped (the library needs a primer longer than the "
            f"{cfg.cross_attn_seq_len}-token prefix: raise --primer_len)"
        )
    print(
        f"engine:      {engine_ms:9.2f} ms/token over {len(result.tokens[0])} tokens "
        f"(cached step {sum(cached) / max(len(cached), 1):.2f} ms x {len(cached)}, "
        f"full forward {sum(full) / max(len(full), 1):.1f} ms x {len(full)})"
    )
    if naive_logits:
        print(f"speed-up:    {naive_ms / engine_ms:9.1f}x")
    same = [
        (a - b).abs().max().item()
        for a, b, wa, wb in zip(
            naive_logits, engine_logits, naive_windows, engine_windows, strict=False
        )
        if torch.equal(wa, wb)
    ]
    if same:
        print(f"max |logit diff| on {len(same)} identical windows: {max(same):.2e}")


if __name__ == "__main__":
    main()
