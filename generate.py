"""Continue a primer MIDI file with a trained Perceiver AR checkpoint.

    python generate.py                                   # the bundled demo model and primer
    python generate.py --primer my.mid --seconds 30 --num_samples 3 --top_p 0.95
    accelerate launch generate.py --ckpt ckpt/run/best --primer my.mid

Every constant below is a command-line option (``--help`` lists them). By default the
model continues the first 20 seconds of the primer. Each run writes a folder OUT_DIR/NAME
with primer.mid (the primer as the model saw it), continuation.mid, full.mid (both
together), audio.wav (full.mid rendered with a General MIDI SoundFont, loudness-normalised),
pianoroll.png (a labelled piano roll: primer and continuation in two colours, velocity as
shade, the boundary marked) and generation.json (settings, checkpoint, seed, timings).
With several samples, each file but the primer gets a suffix _1, _2...
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

from perceiver_music.cli import cpu_only, fail, os_error_message, parse_constants, run_script

CKPT = "ckpt/demo"  # checkpoint folder (config.json + model.safetensors) or .pth file
PRIMER = "samples/primers/mz_570_3_opening.mid"  # primer MIDI file ('' = from scratch)
PRIME_SECONDS = 20.0  # continue the primer's first this many seconds (0: all of it)
NUM_PRIME = 0  # or: its first this many tokens (0: as --prime_seconds says)
PRIME_FROM_END = False  # take the primer's last seconds/tokens instead of its first
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
AUDIO = True  # write audio.wav (--no-audio: MIDI and piano roll only)
RENDERER = "midirenderer"  # midirenderer (pip, default) or fluidsynth (the system program)
SOUNDFONT = ""  # .sf2 SoundFont for the audio ('': the small General MIDI one of pretty_midi)
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
    if args.temperature == 0:
        fail("--temperature must be positive; for the most likely token every time, use "
             "--greedy")
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
    if args.renderer not in ("midirenderer", "fluidsynth"):
        fail(f"--renderer must be midirenderer or fluidsynth, not {args.renderer!r}")
    if args.soundfont and not Path(args.soundfont).is_file():
        fail(f"{args.soundfont}: soundfont not found (give a .sf2 file, or '' for the default)")


def primer_tokens(args) -> tuple[list[int], str]:
    """The primer's tokens, cut as the settings say, without its END, and a line saying
    what was taken. With --num_prime, --prime_seconds is not used."""
    from midi_processor import VELOCITY, MidiError, cut_tokens, encode_midi, piece_seconds

    if not args.primer:
        return [VELOCITY + START_TOKEN_BIN], "primer: none (from scratch)"
    path = Path(args.primer)
    if path.is_dir():
        example = next(iter(sorted(path.glob("*.mid"))), path / "piece.mid")
        fail(f"{path} is a folder: give one MIDI file as --primer (e.g. {example})")
    if not path.is_file():
        fail(f"{path}: primer file not found")
    try:
        tokens = encode_midi(path)
    except MidiError as exc:
        fail(str(exc))
    total = piece_seconds(tokens)
    end = "last" if args.prime_from_end else "first"
    if args.num_prime:
        cut = cut_tokens(tokens, count=args.num_prime, from_end=args.prime_from_end)
        what = f"{end} {args.num_prime} tokens"
    else:
        cut = cut_tokens(tokens, seconds=args.prime_seconds, from_end=args.prime_from_end)
        what = (f"{end} {args.prime_seconds:g} s" if args.prime_seconds
                and args.prime_seconds < total else "all")
    note = f"primer: {what} of {path.name} ({piece_seconds(cut):.1f} of {total:.1f} s, " \
           f"{len(cut)} tokens)"
    if what != "all" and not args.num_prime:
        note += "; --prime_seconds 0 takes all of it"
    return cut or [VELOCITY + START_TOKEN_BIN], note


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
    primer, primer_note = primer_tokens(args)
    final = output_folder(args)

    from accelerate import PartialState
    from tqdm import tqdm

    from midi_processor import decode_midi, piece_seconds
    from perceiver_music.checkpoint import CheckpointError, atomic_folder, load_checkpoint
    from perceiver_music.engine import SamplingConfig, generate
    from perceiver_music.render import AudioError, render_audio, save_pianoroll

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
    print(primer_note, file=sys.stderr)

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

    title = f"{Path(args.primer).name or 'from scratch'}, continued by {Path(args.ckpt).name}"
    audio_problem = None
    with atomic_folder(final) as tmp:
        primer_notes = len(decode_midi(primer, tmp / "primer.mid").instruments[0].notes)
        boundary = piece_seconds(primer)
        samples = []
        for i, new in enumerate(result.tokens):
            sfx = f"_{i + 1}" if len(result.tokens) > 1 else ""
            cont = decode_midi(new, tmp / f"continuation{sfx}.mid")
            full = decode_midi(primer + new, tmp / f"full{sfx}.mid")
            notes = sorted(full.instruments[0].notes, key=lambda n: (n.start, n.pitch))
            save_pianoroll(tmp / f"pianoroll{sfx}.png",
                           [n for n in notes if n.start < boundary],
                           [n for n in notes if n.start >= boundary], boundary,
                           f"{title}, seed {result.seed}" + (f", sample {i + 1}" if sfx else ""))
            sample = {
                "tokens": len(new),
                "seconds": result.seconds[i],
                "stop_reason": result.stop_reasons[i],
                "notes": len(cont.instruments[0].notes),
                "primer_notes": primer_notes,
                "token_ids": new,
            }
            if args.audio and audio_problem is None:
                try:
                    info = render_audio(full, tmp / f"audio{sfx}.wav", args.soundfont or None,
                                        args.renderer)
                    sample["audio"] = {"seconds": round(info.seconds, 3),
                                       "gain_db": round(info.gain_db, 2),
                                       "renderer": info.renderer}
                except AudioError as exc:
                    audio_problem = str(exc)
            samples.append(sample)
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
    if audio_problem:
        print(f"warning: no audio.wav: {audio_problem}; MIDI and piano roll are written",
              file=sys.stderr)
    print(
        f"wrote {final}: {total_new} tokens, "
        f"{', '.join(f'{s:.1f}' for s in result.seconds)} s of music in {gen_s:.1f} s "
        f"({total_new / gen_s:.0f} tokens/s), seed {result.seed}"
    )
    state.wait_for_everyone()


if __name__ == "__main__":
    run_script(main, "interrupted: nothing was written")
