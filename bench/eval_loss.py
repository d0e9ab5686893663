"""Validation and test loss of checkpoints, beside the unigram references.

    python bench/eval_loss.py ckpt/demo ckpt/original_recipe --data_dir data

For each checkpoint: the mean loss in nats per token over every fixed window of each split
(the windows train.py validates on, all of them, so figures compare across runs). The
references: the entropy of the training data's token frequencies, and the loss on each
split of a model that always predicts those frequencies (a unigram model).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from perceiver_music.checkpoint import load_checkpoint  # noqa: E402
from perceiver_music.data import load_split, validation_windows  # noqa: E402
from perceiver_music.model import window_losses  # noqa: E402


def split_loss(model, cfg, split) -> float:
    """Mean nats per token over all fixed windows of ``split``."""
    total, count = window_losses(
        model, *validation_windows(split, cfg.max_seq_len, cfg.cross_attn_seq_len)
    )
    return total / count


def unigram(train, other) -> tuple[float, float]:
    """(entropy of train's token frequencies, cross-entropy of those on ``other``)."""
    p = np.bincount(train.tokens, minlength=390) / len(train.tokens)
    q = np.bincount(other.tokens, minlength=390) / len(other.tokens)
    entropy = float(-(p[p > 0] * np.log(p[p > 0])).sum())
    cross = float(-(q[q > 0] * np.log(np.maximum(p[q > 0], 1e-12))).sum())
    return entropy, cross


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("checkpoints", nargs="+", type=Path)
    ap.add_argument("--data_dir", type=Path, default=Path("data"))
    ap.add_argument("--splits", default="val,test")
    args = ap.parse_args()
    train = load_split(args.data_dir / "train")
    splits = {name: load_split(args.data_dir / name) for name in args.splits.split(",")}
    for name, split in splits.items():
        entropy, cross = unigram(train, split)
        print(f"unigram ({name}): training-data entropy {entropy:.4f}, unigram model loss "
              f"{cross:.4f} nats/token ({len(split.tokens):,} tokens)")
    for ckpt in args.checkpoints:
        model, cfg, meta = load_checkpoint(ckpt)
        losses = ", ".join(f"{name} {split_loss(model, cfg, s):.4f}" for name, s in splits.items())
        print(f"{ckpt} (step {meta.get('step')}): {losses} nats/token")


if __name__ == "__main__":
    main()
