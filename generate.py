"""Continue a primer MIDI file with a trained Perceiver AR checkpoint.

    python generate.py                                   # the bundled demo model and primer
    python generate.py --primer my.mid --seconds 30 --num_samples 3 --top_p 0.95
    accelerate launch generate.py --ckpt ckpt/run/best --primer my.mid

Every constant below is a command-line option (``--help`` lists them). By default the
model continues the first 20 seconds of the primer. Each run writes a folder OUT_DIR/NAME
with primer.mid (the primer as tokenised: all of it that was chosen, though a long one is
read only up to the model's context before the continuation), continuation.mid, full.mid (both
together), audio.wav (full.mid rendered with a General MIDI SoundFont, loudness-normalised),
pianoroll.png (a labelled piano roll: primer and continuation in two colours, velocity as
shade, the boundary marked) and generation.json (settings, checkpoint, seed, timings).
With several samples, each file but the primer gets a suffix _1, _2...

With --stream the music also goes to standard output as it is generated, for front ends
that play or draw it: one JSON line per second of new music (first sample),
{"seconds": music so far, "tokens": the new token ids, "notes": the notes that have ended
since the line before, [start, end, pitch, velocity] in seconds from the primer's start},
each note once, and a last line {"done": true, "folder": ..., "seconds": ..., "tokens": N}
once the files are written (the progress bar and messages stay on standard error).
"""

from __future__ import annotations

import errno
import json
import os
import sys
import time
from pathlib import Path

from perceiver_music.cli import (
    bundled,
    check_writable,
    cpu_only,
    fail,
    given_options,
    os_error_message,
    parse_constants,
    run_script,
)

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
CREATIVITY = 0.0  # logit bias towards notes over rests (>0: more notes; <0: sparser)
RELEASE = 3.0  # NOTE_OFF logit bias per second a note is held past 1 s (>0: fewer drones)
TONALITY = 0.5  # pull the notes towards the pitch classes of the last seconds (0: off)
BEAMS = 1  # beam search with this many beams (deterministic; 1: sampling)
STRIDE = 0  # tokens dropped when the window is full (0: half the latents)
CROSS_ATTN_SEQ_LEN = 0  # prefix length m at generation (0: the checkpoint's)
NUM_LATENTS = 0  # or: latents n at generation, m = context - n (0: the checkpoint's)
SEED = -1  # seed that makes a run repeatable (-1: random, reported in generation.json)
OUT_DIR = "output"  # where run folders go
NAME = ""  # run folder name ('' : primer name and time)
AUDIO = True  # write audio.wav (--no-audio: MIDI and piano roll only)
RENDERER = "midirenderer"  # midirenderer (pip, default) or fluidsynth (the system program)
SOUNDFONT = ""  # .sf2 SoundFont for the audio ('': the small General MIDI one of pretty_midi)
CPU = False  # run on the CPU even if an accelerator is present
INT8 = False  # CPU: decode with int8 weights (about 1.7x faster, near-identical odds)
DTYPE = "auto"  # auto (bfloat16 on GPUs with it, else float32), float32 or bfloat16
CUDA_GRAPHS = True  # GPU: replay each decoding step as one captured CUDA graph
STREAM = False  # print the music as it grows, a JSON line a second on stdout (README: Streaming)

def check_settings(args) -> None:
    """Refuse impossible settings before any work, with one line each."""
    if args.new_tokens < 1:
        fail(f"--new_tokens must be at least 1, got {args.new_tokens}")
    for name in ("seconds", "prime_seconds", "num_prime", "top_k", "min_p", "top_p", "stride",
                 "cross_attn_seq_len", "num_latents", "release", "tonality"):
        if getattr(args, name) < 0:
            fail(f"--{name} must not be negative, got {getattr(args, name)}")
    if args.seed < -1:
        fail(f"--seed must be -1 (random) or a whole number >= 0, got {args.seed}")
    if args.num_samples < 1:
        fail(f"--num_samples must be at least 1, got {args.num_samples}")
    if args.temperature == 0:
        fail("--temperature must be positive" + (
            " (--greedy and --beams do not use it: leave it out)" if args.greedy or args.beams > 1
            else "; for the most likely token every time, use --greedy"))
    if not args.temperature > 0:
        fail(f"--temperature must be positive, got {args.temperature}")
    if args.top_p > 1:
        fail(f"--top_p must be in (0, 1], got {args.top_p}")
    if args.min_p >= 1:
        fail(f"--min_p must be below 1, got {args.min_p}")
    if args.beams < 1:
        fail(f"--beams must be at least 1, got {args.beams}")
    if args.stream and args.beams > 1:
        fail("--stream needs sampling: beam search picks its sequence only at the end")
    sampling = [f"--{n}" for n, off in (("temperature", (1.0,)), ("top_k", (0,)),
                                        ("top_p", (0.0,)), ("min_p", (0.0,)),
                                        ("greedy", (False,)), ("creativity", (0.0,)),
                                        ("release", (RELEASE, 0.0)),  # unused by --beams
                                        ("tonality", (TONALITY, 0.0)))
                if getattr(args, n) not in off]
    if args.beams > 1 and sampling:
        fail(f"beam search (--beams) takes no sampling setting: leave out {' '.join(sampling)}")
    if args.beams > 1 and args.num_samples > 1:
        fail("beam search returns one continuation: use --num_samples 1 with --beams")
    if args.cross_attn_seq_len and args.num_latents:
        fail("give --cross_attn_seq_len or --num_latents, not both")
    if args.name and (Path(args.name).name != args.name or args.name in (".", "..")):
        fail(f"--name must be a plain folder name (it goes inside --out_dir), got "
             f"{args.name!r}")
    from perceiver_music.render import audio_options_problem

    problem = audio_options_problem(args.renderer, args.soundfont)
    if problem:
        fail(problem)


def primer_tokens(args) -> tuple[list[int], str]:
    """The primer's tokens, cut as the settings say, and a line saying what was taken;
    one error line for a missing, unreadable or folder primer."""
    from midi_processor import MidiError
    from perceiver_music.api import primer_tokens as cut

    try:
        tokens, note = cut(args.primer or None, seconds=args.prime_seconds,
                           count=args.num_prime, from_end=args.prime_from_end)
    except MidiError as exc:
        fail(str(exc))
    if args.prime_seconds and not args.num_prime and args.primer and " all of " not in note:
        note += "; --prime_seconds 0 takes all of it"
    if args.num_prime and "prime_seconds" in given_options():
        note += f"; --num_prime takes the place of --prime_seconds {args.prime_seconds:g}"
    return tokens, note


def output_folder(args) -> Path:
    """The run folder to write, checked before any work: it must not exist yet, and its
    parent must be a folder this user can write to (so that no generation is lost). An
    automatic name (primer and time) that is taken, by a run started in the same second,
    gets a suffix: NAME-2, NAME-3..."""
    name = args.name or f"{Path(args.primer).stem or 'scratch'}-{time.strftime('%Y%m%d-%H%M%S')}"
    final = Path(args.out_dir) / name
    if final.exists() and args.name:
        fail(f"{final} already exists: choose another --name")
    check_writable(final.parent, "the output")
    free = free_folder(final)
    if free != final:
        print(f"note: {final} exists (a run started in the same second); this take goes to "
              f"{free}", file=sys.stderr)
    return free


def free_folder(final: Path) -> Path:
    """``final``, or the first of FINAL-2, FINAL-3... that does not exist."""
    candidate, n = final, 1
    while candidate.exists() or candidate.is_symlink():
        n += 1
        candidate = final.with_name(f"{final.name}-{n}")
    return candidate


def save_take(take, final: Path, **options) -> tuple[Path, list[str]]:
    """`Generation.save` to ``final``; when another run took that folder while this one
    was decoding, to the next free FINAL-2, FINAL-3... instead, with a note: a finished
    take is never thrown away. Returns the folder and the problems `save` met."""
    asked = final
    while True:
        try:
            problems = take.save(final, **options)
            break
        except OSError as exc:  # FileExistsError, or a rename onto a filled folder
            taken = isinstance(exc, FileExistsError) or exc.errno in (errno.EEXIST,
                                                                     errno.ENOTEMPTY)
            free = free_folder(asked)
            if not taken or free == final:  # not a folder another run took: a real error
                raise
            final = free
    if final != asked:
        print(f"note: {asked} was written by another run meanwhile; this take is in {final}",
              file=sys.stderr)
    return final, problems


def stream_print(line: dict) -> None:
    """One --stream JSON line on standard output. Once its reader has gone (``| head -n
    2``) the lines stop, said once on standard error, and the take is still generated and
    written: nothing is lost to a closed pipe."""
    try:
        print(json.dumps(line), flush=True)
    except BrokenPipeError:  # standard output becomes /dev/null: no second error, at exit too
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        from tqdm import tqdm

        tqdm.write("note: standard output was closed: no more --stream lines; the take is "
                   "still written", file=sys.stderr)  # above the progress bar


def stream_lines(model, primer: list[int], settings: dict, bar, by_seconds: bool,
                 seconds: float):
    """`PerceiverMusic.stream` to standard output, a JSON line per chunk (the module
    docstring says what each holds); returns the finished take."""
    sent, told = 0, set()
    for chunk in model.stream(primer, **settings, chunk_seconds=1.0):
        now = chunk.primer_seconds + chunk.seconds
        final = chunk.take is not None
        ended = [n for n in chunk.notes if (final or n.end < now) and n.start >=
                 chunk.primer_seconds and (n.start, n.pitch) not in told]
        told.update((n.start, n.pitch) for n in ended)
        stream_print({"seconds": round(chunk.seconds, 2), "tokens": chunk.tokens[sent:],
                      "notes": [[round(n.start, 2), round(n.end, 2), n.pitch, n.velocity]
                                for n in ended]})
        sent = len(chunk.tokens)
        bar.update((min(chunk.seconds, seconds) if by_seconds else sent) - bar.n)
    return chunk.take


def main() -> None:
    args = parse_constants(__file__, globals(), __doc__.split("\n\n")[0])
    args.ckpt, args.primer = bundled(args.ckpt), bundled(args.primer)
    check_settings(args)
    primer, primer_note = primer_tokens(args)
    final = output_folder(args)

    from accelerate import PartialState
    from tqdm import tqdm

    from perceiver_music.api import PerceiverMusic
    from perceiver_music.checkpoint import CheckpointError, config_origin

    state = PartialState(cpu=cpu_only(args.cpu))
    if not state.is_main_process:  # one generation per run, on the main process
        state.wait_for_everyone()
        return
    t0 = time.perf_counter()
    try:
        model = PerceiverMusic.from_pretrained(args.ckpt, device=state.device,
                                               dtype=args.dtype)
    except (CheckpointError, ValueError) as exc:
        fail(str(exc))
    load_s = time.perf_counter() - t0
    cfg = model.config
    if model.meta.get("inferred"):
        print(f"{args.ckpt}: heads {cfg.heads}, prefix {cfg.cross_attn_seq_len}: "
              f"{config_origin(model.meta)} (with cpu_convert.py)", file=sys.stderr)
    prefix = args.cross_attn_seq_len or (cfg.max_seq_len - args.num_latents
                                         if args.num_latents else cfg.cross_attn_seq_len)
    if not 0 < prefix < cfg.max_seq_len:
        option = "--cross_attn_seq_len" if args.cross_attn_seq_len else "--num_latents"
        fail(f"{option} must be in [1, {cfg.max_seq_len - 1}] for this checkpoint's context "
             f"of {cfg.max_seq_len} tokens, got "
             f"{args.cross_attn_seq_len or args.num_latents}")
    if args.stride > cfg.max_seq_len - prefix:
        fail(f"--stride {args.stride} exceeds the {cfg.max_seq_len - prefix} latents")
    if args.int8 and state.device.type != "cpu":
        fail(f"--int8 is a CPU mode; on {state.device.type} the model runs in its own dtype "
             "(add --cpu to decode on the CPU)")
    print(primer_note, file=sys.stderr)

    # With a length in seconds the bar counts seconds of music (its ETA then tells when
    # the take ends); without one, tokens up to --new_tokens.
    by_seconds = bool(args.seconds)
    with tqdm(total=args.seconds if by_seconds else args.new_tokens, dynamic_ncols=True,
              unit="s music" if by_seconds else "tok",
              bar_format="{l_bar}{bar}| {n:.1f}/{total:g} s of music [{elapsed}<{remaining}"
                         "{postfix}]" if by_seconds else None) as bar:

        def on_step(info) -> None:
            if by_seconds:
                bar.update(min(info.seconds, args.seconds) - bar.n)
                bar.set_postfix(tokens=info.step + 1, refresh=False)
            else:
                bar.update(1)
                bar.set_postfix(music_s=f"{info.seconds:.1f}", refresh=False)

        if args.beams > 1:  # it applies neither: recorded as it was applied
            args.release = args.tonality = 0.0
        settings = dict(
            seconds=args.seconds or None, max_new_tokens=args.new_tokens,
            prime_seconds=0, num_samples=args.num_samples, temperature=args.temperature,
            top_k=args.top_k or None, top_p=args.top_p or None, min_p=args.min_p or None,
            greedy=args.greedy, creativity=args.creativity, release=args.release,
            tonality=args.tonality, num_beams=args.beams,
            seed=None if args.seed < 0 else args.seed, stop_at_end=args.stop_at_end,
            cross_attn_seq_len=prefix, stride=args.stride or None,
            precision="int8" if args.int8 else "float32", cuda_graphs=args.cuda_graphs)
        if args.stream:
            take = stream_lines(model, primer, settings, bar, by_seconds, args.seconds)
        else:
            take = model.generate(primer, **settings, progress=on_step)
    take.extra["primer_name"] = Path(args.primer).name or "from scratch"
    # the primer as the user gave it replays the take: its cut, not the cut tokens passed
    take.settings.update(prime_seconds=args.prime_seconds, prime_tokens=args.num_prime,
                         prime_from_end=args.prime_from_end)
    report = {"settings": vars(args), "model": cfg.to_dict(),
              "checkpoint_step": model.meta.get("step"), "device": str(state.device),
              "timings": {"load_s": round(load_s, 3)}}
    try:
        final, problems = save_take(take, final, audio=args.audio,
                                    soundfont=args.soundfont or None, renderer=args.renderer,
                                    report=report)
    except OSError as exc:  # a write error names no file; this says where it went
        fail(f"cannot write the take: {os_error_message(exc, final)}")
    for problem in problems:
        print(f"warning: no audio.wav: {problem}; MIDI and piano roll are written",
              file=sys.stderr)
    total = sum(len(t) for t in take.continuations)
    each = f" ({' + '.join(str(len(t)) for t in take.continuations)})" if len(
        take.continuations) > 1 else ""
    print(
        f"wrote {final}: {total} tokens{each}, "
        f"{', '.join(f'{s:.1f}' for s in take.seconds)} s of music in {take.generate_s:.1f} s "
        f"({total / take.generate_s:.0f} tokens/s), "
        + ("beam search" if args.beams > 1 else f"seed {take.seed}"),
        file=sys.stderr if args.stream else sys.stdout)
    if args.seconds and "max_tokens" in take.stop_reasons:
        print(f"note: --new_tokens {args.new_tokens} ended the music before --seconds "
              f"{args.seconds:g}: raise --new_tokens for longer takes", file=sys.stderr)
    if args.stream:
        stream_print({"done": True, "folder": str(final), "seconds": take.seconds[0],
                      "tokens": len(take.continuations[0])})
    state.wait_for_everyone()


if __name__ == "__main__":
    run_script(main, "interrupted: nothing was written")
