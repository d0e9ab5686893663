"""Turn any checkpoint into a portable one: config.json + model.safetensors, CPU tensors.

    python cpu_convert.py ckpt/run/last ckpt/portable            # this project's folders
    python cpu_convert.py old/model.pth ckpt/old --heads 8 --prefix 1024
    python cpu_convert.py old-run/state ckpt/from_state  # an accelerate save_state folder

Reads this project's checkpoint folders, accelerate save_state folders and the original
scripts' .pth files (``{'state_dict': ...}``, ``module.`` / ``_orig_mod.`` / ``net.``
prefixes, tensors saved on a TPU's XLA device), always through the restricted unpickler.
What tensor shapes cannot tell (heads, prefix length) comes from --heads and --prefix.
The result is reloaded and its logits compared with the source model's on a sample input;
the conversion fails, leaving nothing behind, if they differ by more than 1e-5.
"""

from __future__ import annotations

import argparse
from pathlib import Path

TOLERANCE = 1e-5


def compare_logits(source, converted, cfg, seed: int = 0) -> float:
    """Largest absolute logit difference of two models on one random window, with half
    its prefix masked as PAD, so both the prefix mask and the latents are exercised."""
    import torch

    from perceiver_music.model import forward

    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, 388, (1, cfg.max_seq_len), generator=g)
    mask = torch.ones(1, cfg.cross_attn_seq_len, dtype=torch.bool)
    mask[:, : cfg.cross_attn_seq_len // 2] = False
    with torch.no_grad():
        a = forward(source, tokens, mask)
        b = forward(converted, tokens, mask)
    return float((a - b).abs().max())


def main(argv: list[str] | None = None) -> None:
    from perceiver_music.cli import OneLineParser

    ap = OneLineParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("source", type=Path, help="checkpoint folder, state folder or .pth file")
    ap.add_argument("dest", type=Path, help="folder to write (must not exist, see --force)")
    ap.add_argument("--heads", type=int, default=None,
                    help="attention heads, when the source has no config (default: the "
                         "original scripts' 8)")
    ap.add_argument("--prefix", type=int, default=None,
                    help="prefix length m, when the source has no config (default: the "
                         "original scripts' 1024, or half a context of 1024 or less)")
    ap.add_argument("--force", action="store_true", help="replace an existing DEST")
    args = ap.parse_args(argv)

    from perceiver_music.checkpoint import (
        CheckpointError,
        atomic_folder,
        config_origin,
        load_checkpoint,
        save_checkpoint,
    )
    from perceiver_music.cli import fail

    if args.dest.exists() and not args.force:
        fail(f"{args.dest} already exists (use --force to replace it)")
    try:
        model, cfg, meta = load_checkpoint(args.source, heads=args.heads, prefix=args.prefix)
    except CheckpointError as err:
        fail(str(err))
    with atomic_folder(args.dest, replace=True) as tmp:
        extra = {k: v for k, v in meta.items() if k not in ("model", "vocab_version")}
        extra["converted_from"] = str(args.source)
        save_checkpoint(tmp, model, cfg, extra)
        converted, _, _ = load_checkpoint(tmp)
        diff = compare_logits(model, converted, cfg)
        if not diff <= TOLERANCE:
            fail(f"{args.source}: converted logits differ by {diff:.3g} (> {TOLERANCE}); "
                 "nothing written")
    print(f"converted {args.source} -> {args.dest}: context {cfg.max_seq_len}, prefix "
          f"{cfg.cross_attn_seq_len}, dim {cfg.dim}, depth {cfg.depth}, heads {cfg.heads} "
          f"({config_origin(meta, args.heads, args.prefix)}); max logit difference {diff:.3g}")


if __name__ == "__main__":
    from perceiver_music.cli import run_script

    run_script(main, "interrupted: nothing was written")
