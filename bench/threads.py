"""Thread counts against background load: decoding and training tokens/s on this machine.

Users' machines are busy (a browser, another job, the app serving two people, CI). An
OpenMP team of as many threads as cores then waits at every barrier for a thread the OS
has descheduled, and a step can take several times longer than on one thread. This
prints, for 0, 1 and 2 busy background processes (each a pure-Python loop on one core),
the demo model's decoding tokens/s (generate, 800 tokens from the bundled primer: about
20 s of music) and 40 demo-preset training steps' tokens/s, with 1 thread, every core,
and the default
("auto": what the toolkit picks when nothing is set). Settings take turns within each
load, so drifts of the machine hit all alike; the median of the rounds is printed, as
beside busy processes one run can be 40 % faster than the next. First, on the quiet
machine, two generations decode at once in app.py's two generation processes (as
--concurrency 2 runs them), in two threads of one process and batched in one decode
(num_samples 2, on 1 thread and on every core), each against one generation alone on one
thread; then, to tell why two at once lose speed, bare one-thread processes
alone and two at once: decoding with float32 weights, with int8 weights a quarter the
size (the model's copies), and a pure-Python loop with no memory traffic (the clock).
Figures only.

    python -m bench.threads [--loads 0,1,2] [--decode_tokens 800] [--train_steps 40]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from contextlib import nullcontext
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # for python bench/NAME.py too

from app import Workers, process_context  # noqa: E402
from midi_processor.vocab import PAD  # noqa: E402
from perceiver_music.api import DEMO_PRIMER, PerceiverMusic  # noqa: E402
from perceiver_music.cli import bundled  # noqa: E402
from perceiver_music.config import preset  # noqa: E402
from perceiver_music.model import build_model, loss_fn, use_fast_forward  # noqa: E402
from perceiver_music.threads import ThreadTuner  # noqa: E402


def _busy() -> None:
    x = 0
    while True:
        x += 1


def decode_rate(music: PerceiverMusic, threads: int | None, tokens: int,
                precision: str = "float32", samples: int = 1) -> float:
    """Tokens/s of each of ``samples`` continuations decoded together (one batch)."""
    take = music.generate(DEMO_PRIMER, seconds=None, max_new_tokens=tokens, seed=1,
                          stop_at_end=False, decode_threads=threads, precision=precision,
                          num_samples=samples)
    return tokens / take.generate_s


def _decode_job(music: PerceiverMusic, tokens: int, link) -> float:
    """In an app.py generation process: decode ``tokens`` on that process's threads."""
    return decode_rate(music, link.threads, tokens)


def _in_worker(workers, tokens: int) -> float:
    """Tokens/s of one decode in the first idle generation process of ``workers``."""
    for kind, value in workers.run(_decode_job, tokens):
        if kind == "done":
            return value
    raise RuntimeError("the generation process ended without a result")


def concurrent_decode_rates(music: PerceiverMusic, workers, tokens: int) -> dict[str, list]:
    """Tokens/s of each of two generations decoding at once: in app.py's two generation
    processes (``workers``, as ``--concurrency 2`` runs them) and, for comparison, in two
    threads of this process (as the app did before)."""
    import threading

    rates: dict[str, list[float]] = {"processes": [], "threads": []}

    def one(kind: str) -> None:
        rates[kind].append(
            _in_worker(workers, tokens) if kind == "processes"
            else decode_rate(music, None, tokens))

    for kind in rates:
        pair = [threading.Thread(target=one, args=(kind,)) for _ in range(2)]
        for t in pair:
            t.start()
        for t in pair:
            t.join()
    return rates


CONTROLS = ("decode, float32 weights (tokens/s)", "decode, int8 weights, a quarter the size",
            "pure-Python loop, no memory traffic (M adds/s)")
PRECISIONS = ("float32", "int8")  # the first two controls


def _control_process(tokens: int, adds: int, out, start) -> None:
    """A bare process on one thread, as app.py's processes of two: loads the demo, warms
    up, then runs each of `CONTROLS` when ``start`` (a barrier) lets it, putting (index,
    rate) on ``out``: decoding with float32 and with int8 weights (tokens/s), and a
    pure-Python loop of ``adds`` additions (millions per second)."""
    torch.set_num_threads(1)
    music = PerceiverMusic.from_pretrained(device="cpu")
    for precision in PRECISIONS:
        decode_rate(music, 1, 50, precision)  # warm-up
    for i, precision in enumerate(PRECISIONS):
        start.wait()
        out.put((i, decode_rate(music, 1, tokens, precision)))
    start.wait()
    began, x = time.perf_counter(), 0
    for n in range(adds):
        x += n
    out.put((len(PRECISIONS), adds / 1e6 / (time.perf_counter() - began)))


def alone_and_paired(tokens: int, adds: int, rounds: int) -> list[tuple[float, float]]:
    """For each of `CONTROLS`: the median rate of one `_control_process` alone, and of the
    slower of two started together, over ``rounds`` rounds."""
    ctx = process_context()
    alone: list[list[float]] = [[] for _ in CONTROLS]
    paired: list[list[float]] = [[] for _ in CONTROLS]
    for _ in range(rounds):
        for count, rates in ((1, alone), (2, paired)):
            out, start = ctx.Queue(), ctx.Barrier(count)
            procs = [ctx.Process(target=_control_process, args=(tokens, adds, out, start))
                     for _ in range(count)]
            for proc in procs:
                proc.start()
            got: list[list[float]] = [[] for _ in CONTROLS]
            for _ in range(count * len(CONTROLS)):
                i, rate = out.get()
                got[i].append(rate)
            for i, values in enumerate(got):
                rates[i].append(min(values))
            for proc in procs:
                proc.join()
    return [(statistics.median(a), statistics.median(p))
            for a, p in zip(alone, paired, strict=True)]


def train_rate(threads: int | None, steps: int) -> float:
    """Tokens/s of demo-preset training steps (batch 4, the full window), as train.py."""
    torch.manual_seed(0)
    cfg = preset("demo", dropout=0.1, cross_attn_dropout=0.5)
    model = use_fast_forward(build_model(cfg)).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    x = torch.randint(0, PAD, (4, cfg.max_seq_len + 1))
    mask = torch.ones(4, cfg.cross_attn_seq_len, dtype=torch.bool)
    tuner = ThreadTuner() if threads is None else None
    previous = torch.get_num_threads()
    try:
        torch.set_num_threads(threads or previous)
        start = time.perf_counter()
        for _ in range(steps):
            with tuner.step() if tuner else nullcontext():
                loss_fn(model(x[:, :-1], mask), x[:, 1:]).backward()
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
        return steps * 4 * cfg.num_latents / (time.perf_counter() - start)
    finally:
        torch.set_num_threads(previous)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--loads", default="0,1,2", help="busy background processes")
    parser.add_argument("--decode_tokens", type=int, default=800)
    parser.add_argument("--train_steps", type=int, default=40)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--loop_adds", type=int, default=20_000_000,
                        help="additions of the pure-Python loop")
    args = parser.parse_args()
    cores = os.cpu_count() or 1
    music = PerceiverMusic.from_pretrained(device="cpu")
    settings = {"1 thread": 1, f"{cores} threads": cores, "auto (default)": None}
    print(f"{cores} cores; tokens/s, median of {args.rounds} rounds")
    print(f"{'load':>5} {'what':7} " + " ".join(f"{name:>15}" for name in settings))
    ctx = process_context()

    workers = Workers(bundled("ckpt/demo"), "cpu", "float32", 2)
    for _ in range(2):
        _in_worker(workers, 50)  # warm-up
    alone, both, batched = [], [], {1: [], cores: []}
    for _ in range(args.rounds):
        alone.append(decode_rate(music, 1, args.decode_tokens))
        both.append(concurrent_decode_rates(music, workers, args.decode_tokens))
        for threads, rates in batched.items():
            rates.append(decode_rate(music, threads, args.decode_tokens, samples=2))
    workers.close()
    print(f"one generation alone on 1 thread, quiet: {statistics.median(alone):.0f}")
    print("two takes batched in one decode (num_samples 2), each: " + ", ".join(
        f"{statistics.median(rates):.0f} on {threads} thread(s)"
        for threads, rates in batched.items()))
    for kind in ("processes", "threads"):
        print(f"two at once in two {kind}" + (" (app.py --concurrency 2)" if kind ==
              "processes" else " of one process") + ": "
              f"{statistics.median(min(r[kind]) for r in both):.0f} and "
              f"{statistics.median(max(r[kind]) for r in both):.0f} (slower and faster)")
    print("why two at once lose speed: one process alone against the slower of two at once")
    for name, (one, two) in zip(CONTROLS, alone_and_paired(args.decode_tokens, args.loop_adds,
                                                           args.rounds), strict=True):
        print(f"  {name}: {one:.0f} alone, {two:.0f} two at once ({two / one:.0%})")
    for load in (int(v) for v in args.loads.split(",")):
        workers = [ctx.Process(target=_busy, daemon=True) for _ in range(load)]
        for w in workers:
            w.start()
        time.sleep(0.5)
        try:
            rates: dict[tuple[str, str], list[float]] = {
                (what, name): [] for what in ("decode", "train") for name in settings}
            for _ in range(args.rounds):
                for name, threads in settings.items():
                    rates["decode", name].append(decode_rate(music, threads,
                                                             args.decode_tokens))
                    rates["train", name].append(train_rate(threads, args.train_steps))
        finally:
            for w in workers:
                w.kill()
        for what in ("decode", "train"):
            print(f"{load:5} {what:7} " + " ".join(
                f"{statistics.median(rates[what, name]):15.0f}" for name in settings))


if __name__ == "__main__":
    main()
