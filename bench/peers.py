"""The engine against a peer: Hugging Face transformers' GPT-2 with its KV cache.

Same width, depth, heads, feed-forward size, vocabulary and context as the Perceiver AR
model (default: d512, the cross-attention layer + 8 layers as 9 GPT-2 blocks, context
4096, prefix 3072 / 1024 latents), random weights, float32, every core. Both continue the
same primer, positioned where the engine's window is half full of latents: the engine
through `perceiver_music.engine.generate` (one-token cached steps), GPT-2 through a
plain loop over its forward with ``past_key_values`` (no `generate` overhead). They take
turns over ``--rounds``; the figures are medians of the per-token step. Where they differ
by design: GPT-2's every layer attends to every earlier position, a Perceiver AR's
self-attention layers only to the latents. Figures only.

    pip install -r requirements-bench.txt    # transformers, for this bench only
    python -m bench.peers
"""

from __future__ import annotations

import argparse
import inspect
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # for python bench/NAME.py too

from bench.decode import model_config, step_ms  # noqa: E402
from midi_processor.vocab import PAD, VOCAB_SIZE  # noqa: E402
from perceiver_music.config import ModelConfig  # noqa: E402
from perceiver_music.model import build_model  # noqa: E402


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--depth", type=int, default=8, help="self-attention layers")
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--context", type=int, default=4096)
    parser.add_argument("--latents", type=int, default=1024)
    parser.add_argument("--steps", type=int, default=200, help="timed steps per turn")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    return parser.parse_args()


def gpt2(cfg: ModelConfig):
    """A GPT-2 of the Perceiver AR's sizes: one block per attention layer."""
    try:
        from transformers import GPT2Config, GPT2LMHeadModel
    except ImportError:
        raise SystemExit("bench.peers needs Hugging Face transformers: "
                         "pip install -r requirements-bench.txt") from None
    config = GPT2Config(vocab_size=VOCAB_SIZE, n_positions=cfg.max_seq_len, n_embd=cfg.dim,
                        n_layer=cfg.perceive_depth + cfg.depth, n_head=cfg.heads,
                        n_inner=int(cfg.dim * cfg.ff_mult), attn_pdrop=0.0, embd_pdrop=0.0,
                        resid_pdrop=0.0, bos_token_id=None, eos_token_id=None)
    return GPT2LMHeadModel(config).eval()


def gpt2_step_ms(model, primer: torch.Tensor, steps: int) -> float:
    """Median ms of GPT-2's cached one-token step after a prefill of ``primer``."""
    # transformers 5 calls the KV cache ``cache``, 4.x ``past_key_values``
    name = "cache" if "cache" in inspect.signature(model.forward).parameters else (
        "past_key_values")
    times = []
    with torch.inference_mode():
        out = model(input_ids=primer[None], use_cache=True)
        for _ in range(steps):
            token = out.logits[:, -1].argmax(-1, keepdim=True)
            start = time.perf_counter()
            out = model(input_ids=token, use_cache=True, **{name: out[name]})
            times.append(time.perf_counter() - start)
    return statistics.median(times) * 1000


def main() -> None:
    args = parse_args()
    torch.manual_seed(args.seed)
    cfg = model_config(args)
    engine_model = build_model(cfg).eval()
    peer = gpt2(cfg)
    m, n = cfg.cross_attn_seq_len, cfg.num_latents
    primer = torch.randint(0, PAD, (m + n // 2,))
    count = {name: sum(p.numel() for p in model.parameters())
             for name, model in (("engine", engine_model), ("gpt2", peer))}
    print(f"d{cfg.dim}, {cfg.perceive_depth + cfg.depth} attention layers, {cfg.heads} heads, "
          f"context {cfg.max_seq_len}; Perceiver AR {count['engine'] / 1e6:.1f}M parameters "
          f"(prefix {m} / {n} latents), GPT-2 {count['gpt2'] / 1e6:.1f}M; "
          f"{torch.get_num_threads()} threads; steps from position {len(primer)}")
    times: dict[str, list[float]] = {"engine float32": [], "engine int8": [],
                                     "transformers GPT-2 + KV cache": []}
    for _ in range(args.rounds):
        times["engine float32"].append(step_ms(engine_model, primer, args.steps)[0])
        times["engine int8"].append(step_ms(engine_model, primer, args.steps,
                                            precision="int8")[0])
        times["transformers GPT-2 + KV cache"].append(gpt2_step_ms(peer, primer, args.steps))
    ms = {name: statistics.median(t) for name, t in times.items()}
    peer_ms = ms["transformers GPT-2 + KV cache"]
    print(f"{'median of ' + str(args.rounds) + ' interleaved rounds':32s} {'ms/token':>9s} "
          f"{'tokens/s':>9s} {'vs GPT-2':>9s}")
    for name, value in ms.items():
        print(f"{name:32s} {value:9.2f} {1000 / value:9.0f} {peer_ms / value:8.2f}x")


if __name__ == "__main__":
    main()
