"""Train a Perceiver AR model on prep.py's token data.

    python train.py --preset tiny --max_steps 200                 # one process
    accelerate launch train.py --preset ctx2048                   # GPUs / TPU cores
    python train.py --out_dir ckpt/run --resume                   # continue a run, same settings

Every constant below is a command-line option (``--help`` lists them). The run folder gets
``last/`` (every SAVE_INTERVAL steps and on Ctrl-C / SIGTERM, with the optimizer, RNG and
data position in ``last/state``), ``best/`` (lowest validation loss), ``metrics.csv`` and
TensorBoard logs in ``tb/``.
"""

from __future__ import annotations

import csv
import json
import math
import os
import shutil
import signal
import sys
import time
from contextlib import nullcontext
from pathlib import Path

from perceiver_music.cli import (
    bundled,
    cpu_only,
    fail,
    given_options,
    launched_rank,
    os_error_message,
    parse_constants,
    printable,
    run_script,
)

DATA_DIR = "data"  # prep.py output: holds train/ and val/
OUT_DIR = "ckpt/run"  # run folder: last/, best/, metrics.csv, tb/
PRESET = "auto"  # auto (CPU: demo, GPU: ctx2048), tiny, demo, ctx2048, ctx4096, ctx8192, ctx16384
LATENTS = 0  # number of latents (0: the preset's)
DIM = 0  # model width (0: the preset's)
DEPTH = 0  # self-attention layers after the cross-attention one (0: the preset's)
HEADS = 0  # attention heads of 64 dimensions each (0: the preset's)
WINDOW = 0  # training window in tokens, <= the preset's context (0: the full context)
DROPOUT = 0.1  # dropout inside the model
PREFIX_DROPOUT = 0.5  # share of prefix positions dropped in cross-attention (paper: 0.5)
BATCH_SIZE = 4  # windows per process per micro-step
GRAD_ACCUM = 1  # micro-steps per optimizer step
LEARNING_RATE = 3e-4  # peak learning rate (AdamW)
MIN_LR = 3e-5  # learning rate at the end of the cosine decay
WARMUP_STEPS = 200  # linear warmup steps
WARMUP_SHARE = 0.1  # with --max_minutes, warmup takes at most this share of the time
MAX_STEPS = 10000  # optimizer steps of the whole run
WEIGHT_DECAY = 0.1  # AdamW weight decay on matrices
GRAD_CLIP = 1.0  # clip the gradient norm (0: off)
EVAL_INTERVAL = 250  # steps between validations (and best/ updates)
EVAL_WINDOWS = 256  # fixed validation windows (0: all)
SAVE_INTERVAL = 250  # steps between saves of last/
LOG_INTERVAL = 10  # steps between metric rows
MIXED_PRECISION = "auto"  # auto (bf16 on GPUs with it, or accelerate's fp16/bf16), no, fp16, bf16
PREFIX_FILL = 0.5  # share of windows whose prefix is cut to a random length
TRANSPOSE = 3  # augment: transpose by up to +-N semitones (0: off)
STRETCH = 0.05  # augment: stretch time by a factor in 1 +- S (0: off)
SEED = 1337  # seed of weights, data order and dropout
MAX_MINUTES = 0.0  # time budget: the schedule ends with it, then stop and save (0: no limit)
RESUME = False  # continue the run in OUT_DIR from last/
INIT = ""  # start from this checkpoint's weights and shape (fine-tuning), a new schedule
CPU = False  # run on the CPU even if an accelerator is present
THREADS = 0  # CPU threads per process (0: 1 or its share of the cores, chosen by timing steps)
TENSORBOARD = True  # write TensorBoard logs to OUT_DIR/tb


def lr_at(step: int, args, elapsed_s: float = 0.0, projected_s: float | None = None) -> float:
    """Linear warmup over WARMUP_STEPS, then cosine decay from LEARNING_RATE to MIN_LR at
    MAX_STEPS. With a time budget (MAX_MINUTES) the schedule also runs on the clock and
    follows whichever is further along: warmup ends by WARMUP_SHARE of the budget (on
    ``elapsed_s``, the time at the end of this step) and the decay reaches MIN_LR when the
    budget is spent (on ``projected_s``, that time plus the final validation and save: the
    last step runs at MIN_LR), so a time-limited run anneals."""
    budget, share = args.max_minutes * 60, args.warmup_share
    projected_s = elapsed_s if projected_s is None else projected_s
    warm = (step + 1) / args.warmup_steps
    if budget:
        warm = max(warm, elapsed_s / (share * budget)) if share > 0 else 1.0
    if warm < 1.0:
        return args.learning_rate * warm
    progress = (step - args.warmup_steps) / max(1, args.max_steps - args.warmup_steps)
    if budget:
        progress = max(progress, (projected_s / budget - share) / (1 - share))
    progress = min(1.0, max(0.0, progress))
    return args.min_lr + 0.5 * (1 + math.cos(math.pi * progress)) * (
        args.learning_rate - args.min_lr
    )


def overhead_note(overhead_s: float, budget_s: float, steps: int) -> str | None:
    """The note for a time budget (``budget_s``: this run's share) of which validations
    and saves took over half (``overhead_s``), leaving ``steps`` trained; else None."""
    if overhead_s <= 0.5 * budget_s:
        return None
    return (f"note: validation and saving took {overhead_s:.0f} s of the {budget_s:.0f} s "
            f"this run had, training {steps} steps; a longer --max_minutes, a smaller "
            "--eval_windows or a larger --eval_interval trains more")


class Budget:
    """The time budget (--max_minutes) as the loop sees it, so that the run ends inside it.

    The last step, the final validation and the save all fit: each step's learning rate
    and the decision to make it the last one use the time the run will have spent when
    that step and the final work are done (`projected`), where the final work is the
    last measured validation and save, or before any an estimate from the step time (a
    validation batch costs about a third of a training step).
    """

    def __init__(self, val_batches: int) -> None:
        self.val_batches = val_batches
        self.step_s = 0.0
        self.validation_s: float | None = None
        self.save_s: float | None = None

    def record_step(self, seconds: float) -> None:
        self.step_s = seconds if not self.step_s else 0.8 * self.step_s + 0.2 * seconds

    def projected(self, elapsed_s: float) -> float:
        """Seconds spent once the next step, a validation and a save are done."""
        validation = self.validation_s
        if validation is None:
            validation = self.step_s * self.val_batches / 3
        save = self.save_s if self.save_s is not None else 2 * self.step_s
        return elapsed_s + self.step_s + validation + save


def make_optimizer(model, args):
    """AdamW; matrices and embeddings decay, norms and biases do not (as nanoGPT)."""
    import torch

    params = [p for p in model.parameters() if p.requires_grad]
    decay = [p for p in params if p.dim() >= 2]
    other = [p for p in params if p.dim() < 2]
    groups = [
        {"params": decay, "weight_decay": args.weight_decay},
        {"params": other, "weight_decay": 0.0},
    ]
    return torch.optim.AdamW(groups, lr=args.learning_rate, betas=(0.9, 0.95))


def windows_id(windows) -> str:
    """A fingerprint of the validation windows: a resumed run whose windows differ
    (another --data_dir, or its data prepared anew) cannot compare losses with its past."""
    import hashlib

    digest = hashlib.sha256()
    for tensor in windows:
        digest.update(tensor.cpu().numpy().tobytes())
    return digest.hexdigest()[:16]


def evaluate(model, windows, accelerator, batch_size: int) -> float:
    """Mean loss in nats per token over the fixed validation windows, each process taking
    every num_processes-th window."""
    import torch

    from perceiver_music.model import window_losses

    tokens, mask = windows
    rank, world = accelerator.process_index, accelerator.num_processes
    net = accelerator.unwrap_model(model).eval()
    total, count = window_losses(net, tokens[rank::world], mask[rank::world], batch_size)
    net.train()
    sums = accelerator.reduce(
        torch.tensor([total, count], dtype=torch.float64, device=accelerator.device), "sum"
    )
    return float(sums[0] / sums[1])


def model_config(args):
    """The run's ModelConfig from the preset and overrides; one clear line if impossible.
    ``auto`` picks the demo preset on a CPU-only machine (ctx2048 would take days there)."""
    from perceiver_music.config import PRESETS, preset

    if args.preset == "auto":
        args.preset = "demo" if cpu_only(args.cpu) else "ctx2048"
    if args.preset not in PRESETS:
        fail(f"unknown preset {args.preset!r}; choose one of {', '.join(PRESETS)}")
    context = PRESETS[args.preset]["max_seq_len"]
    overrides = {"dropout": args.dropout, "cross_attn_dropout": args.prefix_dropout}
    if args.latents:
        if args.latents >= context:
            fail(f"--latents {args.latents} must be smaller than the context {context}")
        overrides["num_latents"] = args.latents
    for name in ("dim", "depth", "heads"):
        value = getattr(args, name)
        if value < 0:
            fail(f"--{name} must be positive (0: the preset's), not {value}")
        if value:
            overrides[name] = value
    try:
        return preset(args.preset, **overrides)
    except ValueError as exc:
        fail(str(exc))


def init_from(args):
    """(model, config) to fine-tune: the --init checkpoint's weights and shape, with this
    run's dropout settings (they change no weight). Its optimizer, schedule and step are
    not taken: the run starts at step 0 with its own learning-rate schedule, so it can
    continue from committed weights when the run folder that made them is gone."""
    import dataclasses

    from perceiver_music.checkpoint import CheckpointError, load_checkpoint
    from perceiver_music.model import build_model

    try:
        loaded, cfg, _ = load_checkpoint(bundled(args.init))
    except CheckpointError as exc:
        fail(f"cannot start from --init: {exc}")
    cfg = dataclasses.replace(cfg, dropout=args.dropout, cross_attn_dropout=args.prefix_dropout)
    model = build_model(cfg)
    model.load_state_dict(loaded.state_dict())
    return model, cfg


def exit_all(accelerator, code: int) -> None:
    """Leave with ``code`` from every process. Several processes skip torch's gloo teardown,
    which can deadlock at exit (see the end of main)."""
    sys.stdout.flush()
    sys.stderr.flush()
    if accelerator.num_processes > 1:
        os._exit(code)
    raise SystemExit(code)


def fail_together(accelerator, problem: str | None) -> None:
    """A collective check: when any process met a problem, the first such process prints
    it as one ``error:`` line and every process exits, so that no process waits forever
    for one that left."""
    import torch

    flags = accelerator.gather(torch.tensor([problem is not None], device=accelerator.device))
    failed = flags.nonzero().flatten().tolist()
    if failed:
        if accelerator.process_index == failed[0]:
            from tqdm import tqdm

            # on a line of its own, not after the progress bar
            tqdm.write(f"error: {printable(problem)}", file=sys.stderr)
        exit_all(accelerator, 1)


def save_last(accelerator, model, optimizer, cfg, data_state, meta: dict, out_dir: Path) -> None:
    """Write last/ atomically: every process writes its part of last.tmp/, then the main
    process swaps it in. A ``last`` that is a symbolic link keeps pointing where it did.
    Any process's failure (disk full...) removes last.tmp/ and stops every process."""
    from perceiver_music.checkpoint import named_as_final, save_checkpoint, save_train_state

    last, tmp, old = last_paths(out_dir)
    main_proc, problem = accelerator.is_main_process, None
    if main_proc and tmp.exists():
        shutil.rmtree(tmp)
    accelerator.wait_for_everyone()
    try:
        save_train_state(tmp / "state", optimizer, accelerator.process_index, data_state,
                         scaler=accelerator.scaler, shared=main_proc)
        if main_proc:
            save_checkpoint(tmp, accelerator.unwrap_model(model), cfg, meta)
    except OSError as exc:  # named as last/ would hold it, not the temporary folder
        problem = os_error_message(named_as_final(exc, tmp, last), tmp)
    try:
        fail_together(accelerator, problem)
        if main_proc:
            if last.exists():
                last.rename(old)
            tmp.rename(last)
            shutil.rmtree(old, ignore_errors=True)
    finally:
        if main_proc:
            shutil.rmtree(tmp, ignore_errors=True)


RUN_FILES = ("last", "best", "metrics.csv")  # what makes a folder hold a training run


def occupied(out_dir: Path, init: bool = False) -> str | None:
    """Why a new run must not start in ``out_dir`` (it holds another run's files), or None;
    with ``init`` (--init given, which --resume refuses) the way to continue says so."""
    found = [name for name in RUN_FILES if (out_dir / name).exists()]
    if not found:
        return None
    resume = "--resume in place of --init" if init else "--resume"
    return (f"{out_dir} already holds a training run ({', '.join(found)}); continue it with "
            f"{resume}, or start a new one with another --out_dir (or delete {out_dir})")


def last_paths(out_dir: Path) -> tuple[Path, Path, Path]:
    """(last/, last.tmp/, last.old/) of a run folder, beside the folder a symbolic link
    ``last`` points to (saves replace that folder and keep the link)."""
    last = out_dir / "last"
    last = last.resolve() if last.is_symlink() else last
    return last, last.with_name(last.name + ".tmp"), last.with_name(last.name + ".old")


def tidy_unfinished_save(out_dir: Path) -> None:
    """Settle a save of last/ that was killed midway (a second Ctrl-C, a crash): a
    leftover last.tmp/ is removed, and a last.old/ that was not swapped back is restored
    or removed. Says what it did. Only the first process touches the files."""
    if launched_rank() != 0:
        return
    last, tmp, old = last_paths(out_dir)
    if old.is_dir() and not last.exists():
        old.rename(last)
        print(f"restored {last} from {old.name}/, left by a save that was stopped")
    elif old.is_dir():
        shutil.rmtree(old, ignore_errors=True)
    if tmp.is_dir():
        shutil.rmtree(tmp, ignore_errors=True)
        print(f"removed {tmp}, an unfinished save (a stopped run); {last} is intact")


def trim_metrics(path: Path, step: int) -> None:
    """Drop the rows of metrics.csv after ``step``: a run resumed from there logs them
    again."""
    from midi_processor import write_atomic

    lines = path.read_text().splitlines(keepends=True)
    kept = lines[:1] + [row for row in lines[1:] if int(row.split(",", 1)[0]) <= step]
    if kept != lines:
        write_atomic(path, "".join(kept).encode())


def resume_meta(meta: dict, where: Path) -> tuple[int, float, float, int | None]:
    """The step, best validation loss, training seconds and the step of the best
    validation (None when unknown) of the run being resumed, checked."""
    step, best, seconds = meta.get("step"), meta.get("best_val_loss"), meta.get(
        "train_seconds", 0.0)
    if type(step) is not int or step < 0:
        fail(f"cannot resume: {where}: step {step!r} is not a step count")
    for name, value in (("best_val_loss", best), ("train_seconds", seconds)):
        if value is not None and (not isinstance(value, int | float) or not math.isfinite(
                value) or isinstance(value, bool)):
            fail(f"cannot resume: {where}: {name} {value!r} is not a number")
    best_step = meta.get("best_step")
    return (step, math.inf if best is None else float(best), float(seconds or 0.0),
            best_step if type(best_step) is int else None)


def mixed_precision(args) -> dict[str, str]:
    """Accelerator's mixed_precision argument: the setting, or for "auto" bf16 (the fast
    path: flash attention, no loss scaling) on a CUDA GPU that supports it, unless
    accelerate launch was told fp16 or bf16 (its config or --mixed_precision).

    accelerate launch always exports ACCELERATE_MIXED_PRECISION, "no" when nothing was
    chosen, so its "no" cannot tell a choice from the default: auto reads it as unset.
    ``train.py --mixed_precision no`` is how to insist on float32."""
    import torch

    choice = args.mixed_precision
    if choice == "auto":
        launched = os.environ.get("ACCELERATE_MIXED_PRECISION", "no")
        bf16 = (not cpu_only(args.cpu) and torch.cuda.is_available()
                and torch.cuda.is_bf16_supported())
        choice = launched if launched != "no" else ("bf16" if bf16 else "no")
    return {"mixed_precision": choice}


def resume_command() -> str:
    """The command that continues this run: the one that started it, without --init
    (the weights now come from last/), plus --resume: the settings it repeats are the
    run's own, which `inherit_settings` would give anyway. Under accelerate launch its own
    options are not visible here: a placeholder says where they go."""
    import shlex

    argv, skip = [], False
    for arg in sys.argv[1:]:
        if skip or arg in ("--resume", "--no-resume") or arg.startswith("--init="):
            skip = False
            continue
        if arg == "--init":
            skip = True
            continue
        argv.append(arg)
    launched = "WORLD_SIZE" in os.environ or "ACCELERATE_MIXED_PRECISION" in os.environ
    launcher = "accelerate launch <the same launch options>" if launched else "python"
    return f"{launcher} {shlex.join([sys.argv[0], *argv, '--resume'])}"


def check_settings(args) -> None:
    """One clear line for settings that cannot work, before anything is loaded."""
    if args.mixed_precision not in ("auto", "no", "fp16", "bf16"):
        fail(f"--mixed_precision must be auto, no, fp16 or bf16, not {args.mixed_precision!r}")
    for name in ("batch_size", "grad_accum", "max_steps", "warmup_steps", "eval_interval",
                 "save_interval", "log_interval"):
        if getattr(args, name) < 1:
            fail(f"--{name} must be at least 1")
    if not 0 <= args.warmup_share < 1:
        fail(f"--warmup_share must be in [0, 1), got {args.warmup_share}")
    if args.max_minutes < 0 or args.threads < 0:
        fail("--max_minutes and --threads must not be negative")
    if args.init and args.resume:
        fail("--init starts a new run from a checkpoint's weights; --resume continues the "
             "run in --out_dir: choose one")
    shape = [f"--{n}" for n in ("latents", "dim", "depth", "heads") if getattr(args, n)]
    if args.init and shape:
        fail(f"--init takes the checkpoint's shape: leave out {' '.join(shape)}")
    if not args.learning_rate > 0:
        fail(f"--learning_rate must be positive, got {args.learning_rate}")
    given = given_options()  # a resumed run's min_lr is the run's, unless lr is given anew
    if args.learning_rate < LEARNING_RATE and "min_lr" not in given and (
            not args.resume or "learning_rate" in given):
        args.min_lr = args.learning_rate * MIN_LR / LEARNING_RATE  # the default's ratio
    if not 0 <= args.min_lr <= args.learning_rate:
        fail(f"--min_lr must be in [0, --learning_rate {args.learning_rate:g}], got "
             f"{args.min_lr}")
    for name in ("weight_decay", "grad_clip", "eval_windows", "transpose", "stretch"):
        if getattr(args, name) < 0:
            fail(f"--{name} must not be negative, got {getattr(args, name)}")
    for name in ("dropout", "prefix_dropout", "stretch"):
        if not getattr(args, name) < 1:
            fail(f"--{name} must be below 1, got {getattr(args, name)}")
    if not 0 <= args.prefix_fill <= 1:
        fail(f"--prefix_fill must be in [0, 1], got {args.prefix_fill}")


# not taken from the run on --resume: its shape comes from last/ whatever these say
_NOT_INHERITED = ("resume", "init", "out_dir", "preset", "latents", "dim", "depth", "heads")


def inherit_settings(args) -> list[str]:
    """With --resume, every setting not given on the command line becomes the run's own
    (its last/config.json records them), so that ``--resume`` alone continues the run as it
    was started. Returns notes naming the settings given anew that differ from the run's
    (a changed --max_minutes or --max_steps reshapes the rest of the schedule)."""
    last, _, old = last_paths(Path(args.out_dir))
    # a save stopped midway leaves last.old/, which starting_point restores as last/
    path = (last if last.exists() or not old.is_dir() else old) / "config.json"
    try:
        saved = json.loads(path.read_text(encoding="utf-8"))["train"]
        items = list(saved.items())
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return []  # starting_point names what is wrong with last/
    given, changed = given_options(), []
    for name, value in items:
        current = getattr(args, name, None)
        if name in _NOT_INHERITED or current is None or not (
                type(value) is type(current) or type(current) is float and type(value) is int):
            continue
        if name not in given:
            setattr(args, name, type(current)(value))
        elif value != current:
            changed.append(f"--{name} {current} (the run had {value})")
    return [f"note: resumed with {', '.join(changed)}"] if changed else []


def starting_point(args, out_dir: Path):
    """Where the run starts: (model, config, step, best validation loss, training seconds
    so far, the best validation's step, the fingerprint of the validation windows it was
    measured on (`windows_id`; None: not resumed, or not recorded)). Resumed from
    ``out_dir/last``, started from
    --init's weights, or a new model of the preset (model None: it is built once the seed
    is set)."""
    from perceiver_music.checkpoint import CheckpointError, load_checkpoint

    try:
        tidy_unfinished_save(out_dir)
    except OSError as exc:
        fail(os_error_message(exc, out_dir))
    if args.resume:
        try:
            model, cfg, meta = load_checkpoint(out_dir / "last")
        except CheckpointError as exc:
            fail(f"cannot resume: {exc}")
        if not (out_dir / "last" / "state").is_dir():
            fail(f"cannot resume: {out_dir / 'last' / 'state'} is missing")
        step, best, previous_s, best_step = resume_meta(meta,
                                                        out_dir / "last" / "config.json")
        if step >= args.max_steps:
            fail(f"the run in {out_dir} already did {step} steps; raise --max_steps")
        spent = meta.get("budget_spent")
        if isinstance(spent, int | float) and spent >= args.max_minutes > 0:
            fail(f"the run in {out_dir} spent its time budget of {args.max_minutes:g} min; "
                 "raise --max_minutes to train on")
        windows = meta.get("val_windows")
        return (model, cfg, step, best, previous_s, best_step,
                windows if isinstance(windows, str) else None)
    model, cfg = init_from(args) if args.init else (None, model_config(args))
    return model, cfg, 0, math.inf, 0.0, None, None


def load_data(args, cfg, data_dir: Path):
    """(training split, window spec, fixed validation windows) for ``cfg``'s context; one
    line when the data or the window does not fit."""
    from perceiver_music.data import DataError, WindowSpec, load_split, validation_windows

    window = args.window or cfg.max_seq_len
    if window > cfg.max_seq_len:
        fail(f"--window {window} is longer than the model's context {cfg.max_seq_len}")
    if window <= cfg.cross_attn_seq_len:
        fail(f"--window {window} leaves no latents after the {cfg.cross_attn_seq_len}-token prefix")
    try:
        train_split = load_split(data_dir / "train")
        val_split = load_split(data_dir / "val")
        spec = WindowSpec(
            window, cfg.cross_attn_seq_len, args.prefix_fill, args.transpose, args.stretch
        )
        val = validation_windows(val_split, window, cfg.cross_attn_seq_len, args.eval_windows)
    except DataError as exc:
        fail(str(exc))
    return train_split, spec, val


def make_accelerator(args):
    """The Accelerator (TF32 matrix products on CUDA) and, on a CPU, the thread count:
    fixed by --threads, else a `ThreadTuner` choosing between one thread and this
    process's share of the cores (None when there is no choice)."""
    import torch
    from accelerate import Accelerator

    from perceiver_music.threads import ThreadTuner, cpu_cores

    accelerator = Accelerator(cpu=cpu_only(args.cpu), **mixed_precision(args))
    if accelerator.device.type == "cuda":  # float32 products (where they stay) on TF32 cores
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    tuner = None
    if accelerator.device.type == "cpu":
        # accelerate launch sets OMP_NUM_THREADS=1 for each process: share the cores
        # instead; with no --threads, steps are timed to choose between one thread and
        # the share (beside another busy process, one thread is often faster)
        local = int(os.environ.get("LOCAL_WORLD_SIZE", accelerator.num_processes))
        share = max(1, cpu_cores() // local)
        torch.set_num_threads(args.threads or share)
        tuner = None if args.threads or share == 1 else ThreadTuner((1, share))
    return accelerator, tuner


class RunLog:
    """What the main process records as the run goes (the other processes record
    nothing): rows of metrics.csv (a resumed run's file is cut back to its step and
    continued) and TensorBoard scalars."""

    HEADER = ["step", "train_loss", "val_loss", "lr", "tokens_per_s", "seconds"]

    def __init__(self, args, out_dir: Path, step: int, enabled: bool) -> None:
        self.file = self.rows = self.writer = None
        if not enabled:
            return
        out_dir.mkdir(parents=True, exist_ok=True)
        if args.tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(str(out_dir / "tb"))
        path = out_dir / "metrics.csv"
        new = not (args.resume and path.exists())
        if not new:
            trim_metrics(path, step)
        self.file = open(path, "w" if new else "a", newline="")  # noqa: SIM115
        self.rows = csv.writer(self.file, lineterminator="\n")  # not csv's CRLF
        if new:
            self.rows.writerow(self.HEADER)

    def row(self, step: int, seconds: float, train_loss: str = "", val_loss: str = "",
            lr: str = "", tokens_per_s: str = "") -> None:
        if self.rows:
            self.rows.writerow([step, train_loss, val_loss, lr, tokens_per_s, f"{seconds:.1f}"])
            self.file.flush()

    def scalars(self, step: int, values: dict[str, float]) -> None:
        if self.writer:
            for name, value in values.items():
                self.writer.add_scalar(name, value, step)

    def close(self) -> None:
        if self.file:
            self.file.close()
        if self.writer:
            self.writer.close()


class Run:
    """The training loop and what it carries from step to step (the step, the best
    validation loss, the time budget, the signal that asks it to stop), so that `loop`
    reads as its steps: `train_step`, `log_train`, `validate`, `save_last`."""

    def __init__(self, args, accelerator, model, optimizer, sampler, tuner, cfg, val,
                 out_dir: Path, log: RunLog, step: int, best: float, previous_s: float,
                 best_step: int | None, resumed_windows: str | None = None) -> None:
        self.args, self.accelerator, self.model = args, accelerator, model
        self.optimizer, self.sampler, self.tuner = optimizer, sampler, tuner
        self.cfg, self.val, self.out_dir, self.log = cfg, val, out_dir, log
        self.step, self.best, self.previous_s = step, best, previous_s
        self.first_step = step
        self.best_step = best_step  # the step of the best validation (0: the start's)
        self.val_id = windows_id(val)  # a resumed run on other windows measures best/ again
        self.new_windows = resumed_windows not in (None, self.val_id)
        self.main = accelerator.is_main_process
        self.settings = {k: v for k, v in vars(args).items() if k != "resume"}
        self.val_loss: float | None = None
        self.signal = 0  # the signal that asked the run to stop (SIGINT, SIGTERM), if any
        self.spent = False  # the time budget is spent: the last step has run
        self.overhead_s = 0.0  # seconds of validations and saves
        self.shown: dict[str, str] = {}  # the bar's last loss, tokens/s and rate
        self.started = time.time()
        self.budget_s = args.max_minutes * 60
        self.budget = Budget(math.ceil(len(val[0]) / accelerator.num_processes
                                       / args.batch_size))
        self.tokens_per_step = (args.batch_size * args.grad_accum * accelerator.num_processes
                                * sampler.spec.latents)  # the latents' targets
        # since the last row: the summed loss, its micro-steps, and the seconds of training
        # steps (not of validations and saves, which would lower the row's tokens/s)
        self.loss_sum, self.loss_n, self.steps_s = 0.0, 0, 0.0

    def request_stop(self, signum, frame) -> None:
        """SIGINT/SIGTERM: finish the step, save last/, exit; a second one interrupts at
        once, with the shell's status for it (130, 143)."""
        if self.signal:
            raise KeyboardInterrupt(128 + signum)
        self.signal = signum

    def elapsed(self) -> float:
        """Training seconds of the whole run, earlier runs resumed from included."""
        return self.previous_s + time.time() - self.started

    def meta(self) -> dict:
        """What a checkpoint of this moment records about the run."""
        return {"step": self.step, "val_loss": self.val_loss,
                "best_val_loss": self.best if self.best < math.inf else None,
                "best_step": self.best_step, "val_windows": self.val_id,
                "train_seconds": round(self.elapsed(), 3), "train": self.settings,
                **({"budget_spent": self.args.max_minutes} if self.spent else {})}

    def train_step(self, lr: float) -> None:
        """One optimizer step of GRAD_ACCUM micro-steps at learning rate ``lr``."""
        from perceiver_music.data import to_device
        from perceiver_music.model import loss_fn

        args, accelerator, model, optimizer = (self.args, self.accelerator, self.model,
                                               self.optimizer)
        for group in optimizer.param_groups:
            group["lr"] = lr
        t_step = time.perf_counter()
        with self.tuner.step() if self.tuner else nullcontext():
            for micro in range(args.grad_accum):
                x, mask = to_device(*self.sampler.sample(args.batch_size), accelerator.device)
                last_micro = micro == args.grad_accum - 1
                with nullcontext() if last_micro else accelerator.no_sync(model):
                    loss = loss_fn(model(x[:, :-1], mask), x[:, 1:])
                    accelerator.backward(loss / args.grad_accum)
                # summed on the device: reading a loss every micro-step would wait for it
                self.loss_sum, self.loss_n = self.loss_sum + loss.detach(), self.loss_n + 1
            if args.grad_clip:
                accelerator.clip_grad_norm_(model.parameters(), args.grad_clip)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        self.step += 1
        self.budget.record_step(time.perf_counter() - t_step)

    def log_train(self, lr: float, bar) -> None:
        """The mean training loss and tokens/s of the steps since the last row: bar,
        metrics.csv, tb."""
        tps = self.tokens_per_step * (self.loss_n / self.args.grad_accum) / self.steps_s
        train_loss = float(self.loss_sum) / self.loss_n
        self.shown = {"loss": f"{train_loss:.3f}", "tok_s": f"{tps:,.0f}", "lr": f"{lr:.2e}"}
        bar.set_postfix(**({"step": self.step} if self.budget_s else {}), **self.shown)
        self.log.row(self.step, self.elapsed(), f"{train_loss:.5f}", "", f"{lr:.3e}", f"{tps:.0f}")
        self.log.scalars(self.step, {"loss/train": train_loss, "lr": lr, "tokens_per_s": tps})
        self.loss_sum, self.loss_n, self.steps_s = 0.0, 0, 0.0

    def validate(self, lr: float, bar) -> None:
        """Validation loss on the fixed windows; best/ when it is the lowest so far."""
        from perceiver_music.checkpoint import save_checkpoint

        t_final = time.perf_counter()
        # in the training's precision: bf16 validation on a GPU runs on flash too
        with self.tuner.use() if self.tuner else nullcontext(), self.accelerator.autocast():
            self.val_loss = evaluate(self.model, self.val, self.accelerator, self.args.batch_size)
        improved = self.val_loss < self.best
        self.best = min(self.best, self.val_loss)
        if improved:
            self.best_step = self.step
        if self.main:
            mark = " (the starting weights: best/ until a step beats them)" if \
                self.step == 0 else " (best)" if improved else ""
            bar.write(f"step {self.step}: validation loss {self.val_loss:.4f} nats/token"
                      + mark)
            self.log.row(self.step, self.elapsed(), "", f"{self.val_loss:.5f}", f"{lr:.3e}")
            self.log.scalars(self.step, {"loss/val": self.val_loss})
            if improved:
                save_checkpoint(self.out_dir / "best", self.accelerator.unwrap_model(self.model),
                                self.cfg, self.meta())
        self.accelerator.wait_for_everyone()
        self.budget.validation_s = time.perf_counter() - t_final
        self.overhead_s += self.budget.validation_s

    def measure_best_again(self, bar) -> None:
        """A resumed run whose validation windows changed: best/'s loss was measured on
        the old ones, so best/'s weights are measured on these before a step competes."""
        from perceiver_music.checkpoint import load_checkpoint

        model = self.accelerator.unwrap_model(self.model)
        own = {k: v.detach().clone() for k, v in model.state_dict().items()}
        self.best = math.inf
        if (self.out_dir / "best").is_dir():
            model.load_state_dict(load_checkpoint(self.out_dir / "best")[0].state_dict())
            with self.tuner.use() if self.tuner else nullcontext(), \
                    self.accelerator.autocast():
                self.best = evaluate(self.model, self.val, self.accelerator,
                                     self.args.batch_size)
            model.load_state_dict(own)
        if self.main:
            bar.write(f"note: the validation windows are not the run's (another --data_dir, "
                      f"or its data prepared anew): best/ measured on them, "
                      f"{self.best:.4f} nats/token, is the loss to beat")

    def best_line(self) -> str:
        """The run's last words on its best validation loss, saying plainly when no step
        of a fine-tuning run beat the weights it started from."""
        line = f"best validation loss {self.best:.4f} nats/token"
        if self.best_step == 0:
            line += (" at step 0: no step beat the weights the run started from, which "
                     "best/ holds (try a lower --learning_rate or fewer steps)")
        return f"{line}; checkpoints in {self.out_dir}"

    def save_last(self) -> None:
        t_final = time.perf_counter()
        save_last(self.accelerator, self.model, self.optimizer, self.cfg, self.sampler.state,
                  self.meta(), self.out_dir)
        self.budget.save_s = time.perf_counter() - t_final
        self.overhead_s += self.budget.save_s

    def agree(self) -> tuple[bool, float, float]:
        """(whether any process was signalled, the time at the end of the next step, and
        that plus the final validation and save (`Budget.projected`)), the times averaged
        over processes: every process stops at the same step and sets the same rate."""
        import torch

        now = self.elapsed()
        flags = torch.tensor([bool(self.signal), now + self.budget.step_s,
                              self.budget.projected(now)],
                             dtype=torch.float32, device=self.accelerator.device)
        flags = self.accelerator.reduce(flags, "sum") / self.accelerator.num_processes
        return bool(flags[0] > 0), float(flags[1]), float(flags[2])

    def loop(self) -> None:
        """Train until MAX_STEPS, the time budget (the last step, validation and save fit
        inside it) or a signal; validate and save on their intervals and at the end."""
        from tqdm import tqdm

        args, budget_s = self.args, self.budget_s
        # With a time budget the bar counts its seconds (its ETA is the budget's end), else steps.
        bar_args = dict(total=budget_s, initial=min(self.previous_s, budget_s), unit="s",
                        bar_format="{l_bar}{bar}| {n:.0f}/{total:.0f} s [{elapsed}<{remaining}"
                                   "{postfix}]") if budget_s else dict(total=args.max_steps,
                                                                      initial=self.step)
        with tqdm(disable=not self.main, dynamic_ncols=True, **bar_args) as bar:
            if args.init and self.step == 0:  # fine-tuning: the loss to beat is the start's
                self.validate(lr_at(0, args), bar)
            if self.new_windows:
                self.measure_best_again(bar)
            clock = projected = self.previous_s  # the same everywhere
            decay_s = projected  # never back: a measured validation may be shorter than its
            while self.step < args.max_steps:  # estimate, and the rate would rise again
                # the last step of a budget runs at the end of the schedule: MIN_LR
                self.spent = bool(budget_s) and projected >= budget_s
                decay_s = max(decay_s, projected)
                lr = lr_at(self.step, args, clock, decay_s)
                t_step = time.perf_counter()
                self.train_step(lr)
                bar.update(min(self.elapsed(), budget_s) - bar.n if budget_s else 1)
                if budget_s:
                    bar.set_postfix(step=self.step, **self.shown, refresh=False)
                signalled, clock, projected = self.agree()
                self.steps_s += time.perf_counter() - t_step  # agree() waited for the device
                final = self.step == args.max_steps or self.spent
                if self.step % args.log_interval == 0 or final or signalled:
                    self.log_train(lr, bar)
                if self.step % args.eval_interval == 0 or final:
                    self.validate(lr, bar)
                if self.step % args.save_interval == 0 or final or signalled:
                    self.save_last()
                if signalled:
                    if self.main:
                        bar.write(f"stopped at step {self.step}; saved {self.out_dir / 'last'}. "
                                  f"Continue with: {resume_command()}")
                    break
                if self.spent:
                    bar.update(budget_s - bar.n)  # the schedule is complete: a full bar
                    note = overhead_note(self.overhead_s, budget_s - self.previous_s,
                                         self.step - self.first_step)
                    if self.main and note:
                        bar.write(note)
                    if self.main:
                        bar.write(f"time budget of {args.max_minutes:g} min spent at step "
                                  f"{self.step} ({self.elapsed():.0f} s): the schedule is "
                                  f"complete (lr {lr:.2e}); {self.best_line()}")
                    break


def check_replicas(accelerator, model) -> None:
    """Several processes: print whether every process holds the same weights (DDP keeps
    them equal; three weighted sums prove it cheaply)."""
    import torch

    flat = torch.cat([p.detach().double().flatten() for p in model.parameters()])
    ramp = torch.linspace(1, 2, len(flat), dtype=flat.dtype, device=flat.device)
    sums = torch.stack([flat.sum(), (flat * flat).sum(), (flat * ramp).sum()])
    every = accelerator.gather(sums[None])
    if accelerator.is_main_process:
        same = bool((every == every[0]).all())
        print(f"weights identical across {accelerator.num_processes} processes: {same}")


def describe(args, accelerator, model, cfg, train_split, tuner) -> str:
    """The run's first line: the model, the data and where it trains."""
    import torch

    n_params = sum(p.numel() for p in model.parameters())
    origin = "resumed" if args.resume else f"from {args.init}" if args.init else args.preset
    threads = (f" (1 or {tuner.candidates[-1]} threads each, chosen by timing steps)" if tuner
               else f" ({torch.get_num_threads()} threads each)"
               if accelerator.device.type == "cpu" else "")
    notes = []
    if args.init and args.preset != "auto":
        notes.append(f"note: --preset {args.preset} is not used: --init takes the checkpoint's "
                     "shape")
    if args.warmup_steps > args.max_steps and not args.max_minutes:
        notes.append(f"note: --warmup_steps {args.warmup_steps} exceeds --max_steps "
                     f"{args.max_steps}: the learning rate stays below --learning_rate")
    return "\n".join([
        f"model: {origin} {n_params / 1e6:.2f}M parameters, context {cfg.max_seq_len}, "
        f"{cfg.num_latents} latents; {len(train_split.tokens):,} training tokens; "
        f"{accelerator.num_processes} process(es) on {accelerator.device}{threads}, "
        f"mixed precision {accelerator.mixed_precision}", *notes])


def main() -> None:
    args = parse_constants(__file__, globals(), __doc__.split("\n\n")[0])
    notes = inherit_settings(args) if args.resume else []
    check_settings(args)
    from accelerate.utils import set_seed

    from perceiver_music.checkpoint import CheckpointError, load_train_state
    from perceiver_music.data import DataError, WindowSampler
    from perceiver_music.model import build_model, use_fast_forward

    out_dir, data_dir = Path(args.out_dir), Path(args.data_dir)
    model, cfg, step, best, previous_s, best_step, windows = starting_point(args, out_dir)
    train_split, spec, val = load_data(args, cfg, data_dir)
    accelerator, tuner = make_accelerator(args)
    if not args.resume:  # checked by the first process alone, before any process writes
        fail_together(accelerator, occupied(out_dir, bool(args.init)) if accelerator.is_main_process
                      else None)
    set_seed(args.seed)  # the same initial weights in every process
    if model is None:
        model = build_model(cfg)
    # then a seed of each process's own, so that processes draw different dropout masks
    # and prefix-dropout positions (a resumed run restores every process's RNG states)
    set_seed(args.seed + accelerator.process_index)
    use_fast_forward(model)
    model.train()
    try:
        sampler = WindowSampler(train_split, spec, seed=args.seed + accelerator.process_index)
    except DataError as exc:
        fail(f"{data_dir / 'train'}: {exc}")
    optimizer = make_optimizer(model, args)
    model, optimizer = accelerator.prepare(model, optimizer)

    if args.resume:
        problem = None
        try:
            sampler.state = load_train_state(out_dir / "last" / "state", optimizer,
                                             accelerator.process_index, scaler=accelerator.scaler)
        except CheckpointError as exc:
            problem = f"cannot resume: {exc}"
        except (TypeError, ValueError, KeyError) as exc:
            problem = f"cannot resume: {out_dir / 'last' / 'state'}: bad data position ({exc})"
        fail_together(accelerator, problem)

    log = RunLog(args, out_dir, step, accelerator.is_main_process)
    if accelerator.is_main_process:
        print("\n".join([describe(args, accelerator, model, cfg, train_split, tuner), *notes]))
    run = Run(args, accelerator, model, optimizer, sampler, tuner, cfg, val, out_dir, log,
              step, best, previous_s, best_step, windows)
    signal.signal(signal.SIGINT, run.request_stop)
    signal.signal(signal.SIGTERM, run.request_stop)
    run.loop()

    if accelerator.num_processes > 1:
        check_replicas(accelerator, model)
    log.close()
    if accelerator.is_main_process and run.step == args.max_steps:
        print(f"done: {run.step} steps, {run.best_line()}")
    accelerator.wait_for_everyone()
    accelerator.end_training()
    # Stopped by Ctrl-C or SIGTERM: the shell's status for that signal (130, 143), after
    # saving. Several processes: freeing the DDP reducer destroys torch's gloo process
    # group, which joins a worker thread that may be waiting for the GIL to free a finished
    # collective (a deadlock seen here at exit); everything is saved and flushed, so
    # exit_all skips that teardown.
    code = 128 + run.signal if run.signal else 0
    if code or accelerator.num_processes > 1:
        exit_all(accelerator, code)


if __name__ == "__main__":
    run_script(main, "interrupted before the run could save (last/, if any, holds the latest "
                     "save; continue with --resume)")
