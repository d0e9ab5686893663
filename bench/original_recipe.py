"""Train a model with the original scripts' recipe, as a reference for train.py's.

    python bench/original_recipe.py --data_dir data --preset demo --minutes 45 --out ckpt/orig
    python bench/original_recipe.py --cpu_minutes 100 --minutes 1000   # equal CPU, busy machine

The recipe the toolkit replaces, on the same model shape and the same fast forward (so
only the recipe differs): each epoch takes one random crop of context + 1 tokens per file
(files shorter than that are padded with PAD at the end), the loss counts every target
including PAD, Adam with betas (0.1, 0.999), a constant learning rate, no prefix mask, no
augmentation. Trains for a wall-clock budget (or until Ctrl-C / SIGTERM), then saves a
portable checkpoint whose validation and test loss ``evaluate.py`` measures like any
other.
"""

from __future__ import annotations

import argparse
import signal
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from midi_processor.vocab import PAD  # noqa: E402
from perceiver_music.checkpoint import save_checkpoint  # noqa: E402
from perceiver_music.config import preset  # noqa: E402
from perceiver_music.data import load_split  # noqa: E402
from perceiver_music.model import build_model, forward  # noqa: E402


def epoch_batches(split, length: int, batch_size: int, rng: np.random.Generator):
    """One random crop per file, files in random order, PAD appended to short files."""
    order = rng.permutation(len(split.names))
    for i in range(0, len(order), batch_size):
        rows = []
        for j in order[i : i + batch_size]:
            piece = split.piece(int(j)).astype(np.int64)
            start = int(rng.integers(0, max(1, len(piece) - length + 1)))
            crop = piece[start : start + length]
            rows.append(np.concatenate([crop, np.full(length - len(crop), PAD)]))
        yield torch.from_numpy(np.stack(rows))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--data_dir", type=Path, default=Path("data"))
    ap.add_argument("--preset", default="demo")
    ap.add_argument("--batch_size", type=int, default=8)
    ap.add_argument("--learning_rate", type=float, default=1e-3)
    ap.add_argument("--minutes", type=float, default=45.0, help="wall-clock training budget")
    ap.add_argument("--cpu_minutes", type=float, default=0.0,
                    help="CPU-time budget of this process, all its threads (0: none), to\n"
                         "compare recipes at equal CPU on a machine that does other work")
    ap.add_argument("--out", type=Path, default=Path("ckpt/original_recipe"))
    ap.add_argument("--seed", type=int, default=1)
    args = ap.parse_args()

    torch.manual_seed(args.seed)
    rng = np.random.default_rng(args.seed)
    cfg = preset(args.preset, cross_attn_dropout=0.5)
    model = build_model(cfg).train()
    optimizer = torch.optim.Adam(model.parameters(), lr=args.learning_rate, betas=(0.1, 0.999))
    split = load_split(args.data_dir / "train")
    m, length = cfg.cross_attn_seq_len, cfg.max_seq_len + 1

    stop = []
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.append(True))

    def out_of_time() -> bool:
        return (bool(stop) or time.time() - started >= args.minutes * 60
                or 0 < args.cpu_minutes * 60 <= time.process_time() - cpu_started)

    started, cpu_started, step, epoch = time.time(), time.process_time(), 0, 0
    while not out_of_time():
        epoch += 1
        for batch in epoch_batches(split, length, args.batch_size, rng):
            logits = forward(model, batch[:, :-1])
            targets = batch[:, m + 1 :]  # every latent target, PAD included
            loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            step += 1
            if step % 50 == 0:
                print(f"epoch {epoch} step {step} loss {loss.item():.4f} "
                      f"{(time.time() - started) / 60:.1f} min "
                      f"{(time.process_time() - cpu_started) / 60:.1f} CPU-min", flush=True)
            if out_of_time():
                break
    minutes, cpu_minutes = (time.time() - started) / 60, (time.process_time() - cpu_started) / 60
    save_checkpoint(args.out, model, cfg, {"step": step, "recipe": "original", "epochs": epoch,
                                           "minutes": round(minutes, 2),
                                           "cpu_minutes": round(cpu_minutes, 2)})
    print(f"done: {step} steps, {epoch} epochs in {minutes:.1f} min ({cpu_minutes:.1f} "
          f"CPU-min); saved {args.out}")


if __name__ == "__main__":
    main()
