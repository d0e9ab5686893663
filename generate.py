"""Continue a primer MIDI file with a trained Perceiver AR checkpoint.

    python generate.py                                   # the bundled demo model and primer
    python generate.py --primer my.mid --seconds 30 --num_samples 3 --top_p 0.95
    accelerate launch generate.py --ckpt ckpt/run/best --primer my.mid

Every constant below is a command-line option (``--help`` lists them). Each run writes a
folder OUT_DIR/NAME with primer.mid (the primer as the model saw it), continuation.mid,
full.mid (both together), pianoroll.png (primer and continuation in two colours, the
boundary marked), generation.json (settings, checkpoint, seed, timings) and, with
--render, audio.wav. With several samples, each file but the primer gets a suffix _1, _2...
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

from perceiver_music.cli import cpu_only, fail, os_error_message, parse_constants, run_script

CKPT = "ckpt/demo"  # checkpoint folder (config.json + model.safetensors) or .pth file
PRIMER = "samples/primers/mz_570_3_opening.mid"  # primer MIDI file ('' = from scratch)
NUM_PRIME = 0  # use this many primer tokens (0: all, or as --prime_seconds says)
PRIME_SECONDS = 0.0  # use this many seconds of the primer (0: all)
PRIME_FROM_END = False  # take the primer's end instead of its start
NEW_TOKENS = 2000  # generate at most this many tokens per sample
SECONDS = 20.0  # stop a sample after this many seconds of new music (0: no limit)
STOP_AT_END = True  # stop a sample when the model ends the piece
NUM_SAMPLES = 1  # continuations of the same primer, decoded as one batch
TEMPERATURE = 1.0  # softmax temperature (lower: safer, higher: wilder)
TOP_K = 0  # sample among the k likeliest tokens (0: off)
TOP_P = 0.0  # sample from the smallest set with this probability mass (0: off)
MIN_P = 0.0  # drop tokens below this share of the likeliest one's probability (0: off)
GREEDY = False  # always take the likeliest token
BEAMS = 1  # beam search with this many beams (deterministic; 1: sampling)
STRIDE = 0  # tokens dropped when the window is full (0: half the latents)
SEED = -1  # seed that makes a run repeatable (-1: random, reported in generation.json)
OUT_DIR = "output"  # where run folders go
NAME = ""  # run folder name ('' : primer name and time)
RENDER = False  # also render audio.wav with FluidSynth
SOUNDFONT = "/usr/share/sounds/sf2/FluidR3_GM.sf2"  # General MIDI soundfont for --render
CPU = False  # run on the CPU even if an accelerator is present

START_TOKEN_BIN = 16  # an empty primer starts from VELOCITY(16), as many pieces open


def bundled(path: str) -> str:
    """``path`` as given, or inside the toolkit's folder when it is a relative path that
    exists only there (so the defaults work from any working directory)."""
    here = Path(__file__).resolve().parent / path
    return str(here) if path and not Path(path).exists() and here.exists() else path


def check_settings(args) -> None:
    """Refuse impossible settings before any work, with one line each."""
    if args.new_tokens < 1:
        fail(f"--new_tokens must be at least 1, got {args.new_tokens}")
    for name in ("seconds", "prime_seconds", "num_prime", "top_k", "min_p", "top_p", "stride"):
        if getattr(args, name) < 0:
            fail(f"--{name} must not be negative, got {getattr(args, name)}")
    if args.num_samples < 1:
        fail(f"--num_samples must be at least 1, got {args.num_samples}")
    if not args.temperature > 0:
        fail(f"--temperature must be positive, got {args.temperature}")
    if args.top_p > 1:
        fail(f"--top_p must be in (0, 1], got {args.top_p}")
    if args.min_p >= 1:
        fail(f"--min_p must be below 1, got {args.min_p}")
    if args.beams < 1:
        fail(f"--beams must be at least 1, got {args.beams}")
    if args.beams > 1 and args.num_samples > 1:
        fail("beam search returns one continuation: use --num_samples 1 with --beams")
    if args.num_prime and args.prime_seconds:
        fail("give --num_prime or --prime_seconds, not both")


def primer_tokens(args) -> list[int]:
    """The primer's tokens, cut as the settings say, without its END.

    A cut that starts inside the piece gets the VELOCITY event in force there, so its
    first notes keep their dynamics.
    """
    import numpy as np

    from midi_processor import END, NOTE_OFF, VELOCITY, MidiError, encode_midi, shift_steps

    if not args.primer:
        return [VELOCITY + START_TOKEN_BIN]
    if not Path(args.primer).is_file():
        fail(f"{args.primer}: primer file not found")
    try:
        tokens = encode_midi(args.primer)[:-1]  # drop END: the model is to go on
    except MidiError as exc:
        fail(str(exc))
    start, stop = 0, len(tokens)
    if args.prime_seconds:
        steps = shift_steps(tokens)
        clock = np.cumsum(steps) - steps  # when each token happens, in 10 ms steps
        limit = round(args.prime_seconds * 100)
        if args.prime_from_end:
            start = int(np.searchsorted(clock, clock[-1] - limit, side="left"))
        else:
            stop = int(np.searchsorted(clock, limit, side="left"))
    elif args.num_prime:
        if args.prime_from_end:
            start = max(0, len(tokens) - args.num_prime)
        else:
            stop = args.num_prime
    cut = tokens[start:stop]
    first_on = next((i for i, t in enumerate(cut) if t < NOTE_OFF), len(cut))
    if start and not any(VELOCITY <= t < END for t in cut[:first_on]):
        cut = [t for t in tokens[:start] if VELOCITY <= t < END][-1:] + cut
    return cut or [VELOCITY + START_TOKEN_BIN]


def pianoroll(primer_notes, continuation_notes, boundary_s: float, path: Path) -> None:
    """PNG piano roll: primer notes blue, continuation orange, a red line at the boundary.

    One pixel row per pitch over the notes' range (x3 tall), one column per 20 ms.
    """
    import numpy as np
    from PIL import Image

    notes = list(primer_notes) + list(continuation_notes)
    end_s = max([n.end for n in notes] + [boundary_s, 1.0])
    lo, hi = (
        (min(n.pitch for n in notes) - 2, max(n.pitch for n in notes) + 2) if notes else (48, 72)
    )
    width, rows = int(end_s * 50) + 10, hi - lo + 1
    img = np.full((rows, width, 3), 255, np.uint8)
    img[[r for r in range(rows) if (lo + r) % 12 == 0]] = 235  # C lines
    for group, colour in ((primer_notes, (40, 90, 200)), (continuation_notes, (235, 120, 20))):
        for n in group:
            a, b = int(n.start * 50), max(int(n.start * 50) + 1, int(n.end * 50))
            img[hi - n.pitch, a:b] = colour
    img[:, min(width - 1, int(boundary_s * 50))] = (220, 20, 20)
    Image.fromarray(np.repeat(img, 3, axis=0)).save(path)


def render_audio(midi: Path, wav: Path, soundfont: str) -> str | None:
    """Render ``midi`` to ``wav`` with the FluidSynth program; a reason when it cannot."""
    exe = shutil.which("fluidsynth")
    if exe is None:
        return (
            "--render needs FluidSynth: install it (Debian/Ubuntu: apt-get install "
            "fluidsynth fluid-soundfont-gm); the MIDI files are written"
        )
    if not Path(soundfont).is_file():
        return (
            f"--render: soundfont {soundfont} not found (apt-get install "
            "fluid-soundfont-gm, or pass --soundfont); the MIDI files are written"
        )
    r = subprocess.run(
        [exe, "-ni", "-g", "0.8", "-r", "44100", "-F", str(wav), soundfont, str(midi)],
        capture_output=True,
        text=True,
    )
    if r.returncode != 0 or not wav.exists():
        return f"--render: fluidsynth failed ({r.stderr.strip()[:200]}); MIDI written"
    return None


def output_folder(args) -> Path:
    """The run folder to write, checked before any work: it must not exist yet, and its
    parent must be a folder this user can write to (so that no generation is lost)."""
    import tempfile

    name = args.name or f"{Path(args.primer).stem or 'scratch'}-{time.strftime('%Y%m%d-%H%M%S')}"
    final = Path(args.out_dir) / name
    if final.exists():
        fail(f"{final} already exists: choose another --name")
    try:
        final.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=final.parent):
            pass
    except OSError as exc:
        fail(f"cannot write the output: {os_error_message(exc)}")
    return final


def main() -> None:
    args = parse_constants(__file__, globals(), __doc__.split("\n\n")[0])
    args.ckpt, args.primer = bundled(args.ckpt), bundled(args.primer)
    check_settings(args)
    primer = primer_tokens(args)
    final = output_folder(args)

    from accelerate import PartialState
    from tqdm import tqdm

    from midi_processor import decode_midi, piece_seconds
    from perceiver_music.checkpoint import CheckpointError, atomic_folder, load_checkpoint
    from perceiver_music.engine import SamplingConfig, generate

    state = PartialState(cpu=cpu_only(args.cpu))
    if not state.is_main_process:  # one generation per run, on the main process
        state.wait_for_everyone()
        return
    t0 = time.perf_counter()
    try:
        model, cfg, meta = load_checkpoint(args.ckpt, map_location=state.device)
    except CheckpointError as exc:
        fail(str(exc))
    load_s = time.perf_counter() - t0
    if args.stride > cfg.num_latents:
        fail(f"--stride {args.stride} exceeds the model's {cfg.num_latents} latents")

    sampling = None
    if args.beams == 1:
        sampling = SamplingConfig(
            temperature=args.temperature,
            top_k=args.top_k or None,
            top_p=args.top_p or None,
            min_p=args.min_p or None,
            greedy=args.greedy,
        )
    with tqdm(total=args.new_tokens, unit="tok", dynamic_ncols=True) as bar:

        def on_step(info) -> None:
            bar.update(1)
            bar.set_postfix(music_s=f"{info.seconds:.1f}", refresh=False)

        t1 = time.perf_counter()
        result = generate(
            model,
            primer,
            max_new_tokens=args.new_tokens,
            num_samples=args.num_samples,
            sampling=sampling,
            num_beams=args.beams,
            max_seconds=args.seconds or None,
            stop_on_end=args.stop_at_end,
            stride=args.stride or None,
            seed=None if args.seed < 0 else args.seed,
            on_step=on_step,
        )
        gen_s = time.perf_counter() - t1

    with atomic_folder(final) as tmp:
        primer_notes = len(decode_midi(primer, tmp / "primer.mid").instruments[0].notes)
        boundary = piece_seconds(primer)
        samples = []
        for i, new in enumerate(result.tokens):
            sfx = f"_{i + 1}" if len(result.tokens) > 1 else ""
            cont = decode_midi(new, tmp / f"continuation{sfx}.mid")
            full = decode_midi(primer + new, tmp / f"full{sfx}.mid")
            notes = sorted(full.instruments[0].notes, key=lambda n: (n.start, n.pitch))
            pianoroll(
                [n for n in notes if n.start < boundary],
                [n for n in notes if n.start >= boundary],
                boundary,
                tmp / f"pianoroll{sfx}.png",
            )
            samples.append(
                {
                    "tokens": len(new),
                    "seconds": result.seconds[i],
                    "stop_reason": result.stop_reasons[i],
                    "notes": len(cont.instruments[0].notes),
                    "primer_notes": primer_notes,
                    "token_ids": new,
                }
            )
            if args.render:
                problem = render_audio(
                    tmp / f"full{sfx}.mid", tmp / f"audio{sfx}.wav", args.soundfont
                )
                if problem:
                    print(problem, file=sys.stderr)
        total_new = sum(len(t) for t in result.tokens)
        report = {
            "settings": vars(args),
            "checkpoint": str(Path(args.ckpt).resolve()),
            "model": cfg.to_dict(),
            "checkpoint_step": meta.get("step"),
            "seed": result.seed,
            "primer_tokens": len(primer),
            "primer_seconds": boundary,
            "device": str(state.device),
            "timings": {
                "load_s": round(load_s, 3),
                "generate_s": round(gen_s, 3),
                "tokens_per_s": round(total_new / gen_s, 1) if gen_s else None,
            },
            "samples": samples,
        }
        (tmp / "generation.json").write_text(json.dumps(report, indent=2) + "\n")
    print(
        f"wrote {final}: {total_new} tokens, "
        f"{', '.join(f'{s:.1f}' for s in result.seconds)} s of music in {gen_s:.1f} s "
        f"({total_new / gen_s:.0f} tokens/s), seed {result.seed}"
    )
    state.wait_for_everyone()


if __name__ == "__main__":
    run_script(main, "interrupted: nothing was written")
