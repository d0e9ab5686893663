"""Every preset's real shape generates through generate.py and the Python API.

A randomly initialised model of each preset (ctx2048, ctx4096, ctx8192 with dim 1024 and a
512-wide attention, ctx16384 with dim 512 and a 256-wide one, demo) is saved as a
checkpoint folder; generate.py continues the bundled primer with it (CLI, float32), then
the API does (float32 and int8). Prints seconds and tokens/s per preset; exit status 1 if
any run fails. Figures only: random weights make no music.

    python -m bench.presets [--new_tokens 64] [--presets ctx8192,ctx16384]
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # for python bench/NAME.py too

from perceiver_music.api import PerceiverMusic  # noqa: E402
from perceiver_music.checkpoint import save_checkpoint  # noqa: E402
from perceiver_music.config import PRESETS, preset  # noqa: E402
from perceiver_music.model import build_model  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
PRIMER = ROOT / "samples" / "primers" / "mz_570_3_opening.mid"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--new_tokens", type=int, default=64)
    parser.add_argument("--presets", default="ctx2048,ctx4096,ctx8192,ctx16384,demo")
    args = parser.parse_args()
    failed = 0
    print(f"{'preset':10} {'dim':>5} {'width':>6} {'params':>8} {'generate.py s':>14} "
          f"{'API tok/s':>10} {'int8 tok/s':>10}")
    for name in args.presets.split(","):
        if name not in PRESETS:
            parser.error(f"unknown preset {name}")
        cfg = preset(name)
        torch.manual_seed(0)
        model = build_model(cfg).eval()
        params = sum(p.numel() for p in model.parameters())
        with tempfile.TemporaryDirectory() as tmp:
            save_checkpoint(Path(tmp) / name, model, cfg, {"step": 0})
            start = time.perf_counter()
            run = subprocess.run(
                [sys.executable, "generate.py", "--ckpt", str(Path(tmp) / name),
                 "--primer", str(PRIMER), "--out_dir", tmp, "--name", "take", "--new_tokens",
                 str(args.new_tokens), "--seconds", "0", "--no-stop_at_end", "--no-audio",
                 "--seed", "1"], cwd=ROOT, capture_output=True, text=True)
            cli_s = time.perf_counter() - start
        if run.returncode != 0:
            failed += 1
            print(f"{name}: generate.py failed: {run.stderr.strip().splitlines()[-1:]}")
            continue
        music = PerceiverMusic(model, cfg, {"model": cfg.to_dict()}, name)
        speeds = []
        for precision in ("float32", "int8"):
            take = music.generate(PRIMER, seconds=None, max_new_tokens=args.new_tokens,
                                  stop_at_end=False, seed=1, precision=precision)
            speeds.append(args.new_tokens / take.generate_s)
        width = cfg.heads * cfg.dim_head
        print(f"{name:10} {cfg.dim:5} {width:6} {params / 1e6:7.1f}M {cli_s:14.1f} "
              f"{speeds[0]:10.1f} {speeds[1]:10.1f}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
