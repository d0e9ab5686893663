"""The Python API: load a checkpoint, continue a primer, hear and save the result.

    from perceiver_music import PerceiverMusic

    model = PerceiverMusic.from_pretrained("ckpt/demo")      # any checkpoint folder or .pth
    take = model.generate("primer.mid", seconds=20, top_p=0.95, seed=1)
    take.midi()                     # pretty_midi.PrettyMIDI: primer + continuation
    take.audio("take.wav")          # a normalised WAV file
    take.save("output/take1")       # MIDI, audio, piano roll and generation.json
    for chunk in model.stream("primer.mid", seconds=60):   # the same, a chunk at a time
        print(chunk.seconds, len(chunk.notes))
    model.save_pretrained("ckpt/mine")

generate.py, app.py and evaluate.py are built on this module, so the Python API and the
scripts write the same files and accept the same settings.
"""

from __future__ import annotations

import contextlib
import inspect
import io
import json
import math
import numbers
import os
import queue
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pretty_midi
import torch

from midi_processor import (
    MidiError,
    cut_tokens,
    decode_midi,
    encode_midi,
    piece_seconds,
)
from midi_processor.core import shift_steps
from midi_processor.vocab import END, NOTE_OFF, PAD, STEPS_PER_SECOND, VELOCITY, VOCAB_SIZE

from .checkpoint import (
    CheckpointError,  # noqa: F401 (an error of the API, re-exported)
    atomic_folder,
    load_checkpoint,
    save_checkpoint,
)
from .config import ModelConfig
from .engine import SamplingConfig, StepInfo, generate
from .render import AudioInfo, pianoroll_figure, render_audio, save_pianoroll

DEMO_CHECKPOINT = Path(__file__).resolve().parent.parent / "ckpt" / "demo"
# The bundled primer (the opening of Mozart's K. 570, iii; see samples/README.md), for
# examples that run from any folder.
DEMO_PRIMER = DEMO_CHECKPOINT.parent.parent / "samples" / "primers" / "mz_570_3_opening.mid"
START_TOKEN = VELOCITY + 16  # an empty primer starts from VELOCITY(16), as many pieces open
TOKENS_PER_SECOND = 100  # a generous bound on the music's density, for default lengths
DTYPES = ("auto", "float32", "bfloat16")  # what from_pretrained(dtype=...) takes
RELEASE = 3.0  # generate()'s default `SamplingConfig.release`
TONALITY = 0.5  # generate()'s default `SamplingConfig.tonality`

Primer = str | os.PathLike | bytes | pretty_midi.PrettyMIDI | Sequence[int] | np.ndarray | None


def primer_tokens(primer: Primer, *, seconds: float = 0.0, count: int = 0,
                  from_end: bool = False) -> tuple[list[int], str]:
    """A primer's tokens for the engine, and a line saying what was taken.

    ``primer`` is a MIDI file path, raw MIDI bytes, a ``pretty_midi.PrettyMIDI``, token
    ids, or None (from scratch). The first (``from_end``: last) ``seconds`` of music or
    ``count`` tokens are kept (0: all). Raises MidiError for unreadable MIDI and ValueError
    for ids outside the vocabulary.
    """
    if primer is None:
        return [START_TOKEN], "primer: none (from scratch)"
    _check_whole("prime_tokens", count, 0)
    if not math.isfinite(seconds) or seconds < 0:
        raise ValueError(f"prime_seconds must be 0 (all) or more, got {seconds}")
    if isinstance(primer, io.TextIOBase):  # its read() decodes the MIDI bytes as text
        raise ValueError(f"a primer file must be opened in binary mode (open(path, 'rb')), "
                         f"got {_kind(primer)}")
    if hasattr(primer, "read"):  # an open file or BytesIO of MIDI
        primer = primer.read()
    if isinstance(primer, str | os.PathLike):
        if not os.fspath(primer):  # "" would be read as the working folder
            raise MidiError("the primer path is empty: give a MIDI file, or None for none")
        path = Path(primer)
        if path.is_dir():
            hint = ""  # a folder that cannot be listed: no example to name
            with contextlib.suppress(OSError):
                example = next(iter(sorted(p for p in path.iterdir()
                                           if p.suffix.lower() in (".mid", ".midi"))), None)
                hint = f" (e.g. {example})" if example else ", and it holds none"
            raise MidiError(f"{path} is a folder: give one MIDI file{hint}")
        if not path.is_file():
            raise MidiError(f"{path}: primer file not found")
        tokens, name = encode_midi(path), path.name
    elif isinstance(primer, bytes | bytearray | memoryview | pretty_midi.PrettyMIDI):
        data = primer if isinstance(primer, pretty_midi.PrettyMIDI) else bytes(primer)
        tokens, name = encode_midi(data), "the primer"
    else:
        ids = primer.tolist() if hasattr(primer, "tolist") else primer
        if not isinstance(ids, list | tuple) or not all(
                isinstance(t, numbers.Integral) and not isinstance(t, bool) for t in ids):
            raise ValueError("a primer is a MIDI file's path, its bytes, a pretty_midi."
                             f"PrettyMIDI, a list of token ids or None, not {_kind(primer)}")
        tokens = [int(t) for t in ids]
        bad = [t for t in tokens if not 0 <= t < VOCAB_SIZE or t == PAD]
        if bad:
            raise ValueError(f"primer token {bad[0]} is not an event id (0..{END})")
        name = "the primer tokens"
    total = piece_seconds(tokens)
    side = "last" if from_end else "first"
    cut = cut_tokens(tokens, seconds=0.0 if count else seconds, count=count, from_end=from_end)
    part = 0 < count < len(tokens[: tokens.index(END)] if END in tokens else tokens)
    if part:
        what = f"{side} {count} tokens"
    elif seconds and seconds < total:
        what = f"{side} {seconds:g} s"
    else:
        what = "all"
    added = len(cut) - count if part else 0  # the notes and velocity it starts in
    state = f", {added} of them setting the notes and velocity in force there" if added else ""
    note = f"primer: {what} of {name} ({piece_seconds(cut):.1f} of {total:.1f} s, {len(cut)} " \
           f"tokens{state})"
    if not cut and tokens:
        note += "; nothing of it is kept, so the model starts from scratch"
    elif not any(t < NOTE_OFF for t in cut) and any(t < NOTE_OFF for t in tokens):
        note += "; it holds no notes, only silence, which the model continues"
    return cut or [START_TOKEN], note


def _check_whole(name: str, value: object, least: int, optional: bool = False) -> None:
    """Raise ValueError naming ``name`` unless ``value`` is a whole number >= ``least``
    (or None, when ``optional``): a float count would fail deep inside torch instead."""
    if value is None and optional:
        return
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < least:
        raise ValueError(f"{name} must be a whole number of at least {least}"
                         f"{' (or None)' if optional else ''}, got {value!r}")


def _check_number(name: str, value: object, optional: bool = False) -> None:
    """Raise ValueError naming ``name`` unless ``value`` is a real number (or None, when
    ``optional``): a string would fail as a TypeError that names no setting. Its range
    is checked where it is used."""
    if not (value is None and optional) and (isinstance(value, bool) or not isinstance(
            value, numbers.Real)):
        raise ValueError(f"{name} must be a number{' (or None)' if optional else ''}, "
                         f"got {_kind(value)}")
    try:
        if value is not None:
            float(value)  # type: ignore[arg-type]
    except OverflowError:  # 10**400: torch and json would fail on it later
        raise ValueError(f"{name} must be a number a float can hold, got one beyond "
                         "1.8e308") from None


def _plain_number(value: Any) -> Any:
    """``value`` as generation.json can hold it: numpy scalars as Python's, other real
    numbers (a Fraction, a Decimal) as floats; anything else as it is."""
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, numbers.Real) and not isinstance(value, int | float):
        return float(value)
    return value


def _device(device: object) -> torch.device:
    """``device`` as a torch.device this machine has, or a ValueError naming it (torch
    would fail on first use with an AssertionError or a list of device types)."""
    try:
        parsed = torch.device(device) if isinstance(device, str | torch.device) else None
    except RuntimeError:
        parsed = None
    if parsed is None:
        raise ValueError(f"device must be a device name such as 'cpu' or 'cuda:0', got "
                         f"{_kind(device)}")
    if parsed.type == "cuda" and (parsed.index or 0) >= torch.cuda.device_count():
        raise ValueError(f"device {parsed}: this machine has "
                         f"{torch.cuda.device_count()} CUDA GPU(s) that torch can use")
    return parsed


def _kind(value: object) -> str:
    """How an error names a value of the wrong kind: its type, and a short repr."""
    text = repr(value)
    return f"{type(value).__name__} {text[:40] + '...' if len(text) > 40 else text}"


@dataclass
class Generation:
    """Continuations of one primer: tokens, and the ways to hear, see and save them.

    Sample ``i`` is ``primer + continuations[i]`` (token ids). ``stop_reasons[i]`` says
    why it stopped ("end", "seconds", "max_tokens"), ``seconds[i]`` how much music it
    added; ``seed`` repeats the run; ``settings`` are the generation arguments.
    """

    primer: list[int]
    continuations: list[list[int]]
    stop_reasons: list[str]
    seconds: list[float]
    seed: int | None
    settings: dict[str, Any]
    checkpoint: str = ""
    generate_s: float = 0.0
    primer_note: str = ""
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def primer_seconds(self) -> float:
        """Where the continuation starts, in seconds of music."""
        return piece_seconds(self.primer)

    def tokens(self, i: int = 0) -> list[int]:
        """Primer and continuation ``i`` as one token list."""
        return self.primer + self.continuations[i]

    def midi(self, i: int = 0) -> pretty_midi.PrettyMIDI:
        """Primer and continuation ``i`` as one piano part."""
        return decode_midi(self.tokens(i))

    def continuation_midi(self, i: int = 0) -> pretty_midi.PrettyMIDI:
        """Continuation ``i`` alone, from time 0."""
        return decode_midi(self.continuations[i])

    def notes(self, i: int = 0) -> list[pretty_midi.Note]:
        """The notes of continuation ``i`` as they sound after the primer (times from the
        start of the primer)."""
        boundary = self.primer_seconds
        return [n for n in self._sorted_notes(i) if n.start >= boundary]

    def audio(self, path: str | os.PathLike, i: int = 0, soundfont: str | None = None,
              renderer: str = "midirenderer") -> AudioInfo:
        """Render primer + continuation ``i`` to a WAV file (see `render.render_audio`);
        ``path`` must end in .wav (ValueError otherwise: WAV is the only format written)."""
        if Path(path).suffix.lower() != ".wav":
            raise ValueError(f"audio is written as WAV: give a path ending in .wav, got "
                             f"{os.fspath(path)!r}")
        return render_audio(self.midi(i), path, soundfont, renderer)

    def pianoroll(self, path: str | os.PathLike | None = None, i: int = 0,
                  title: str | None = None) -> Any:
        """The piano roll of sample ``i``: written as PNG to ``path``, or returned as a
        matplotlib Figure when ``path`` is None."""
        notes = self._sorted_notes(i)
        boundary = self.primer_seconds
        parts = ([n for n in notes if n.start < boundary], [n for n in notes
                                                             if n.start >= boundary])
        title = self._title(i) if title is None else title
        if path is None:
            return pianoroll_figure(*parts, boundary, title)
        save_pianoroll(path, *parts, boundary, title)
        return None

    def save(self, folder: str | os.PathLike, *, audio: bool = True,
             soundfont: str | None = None, renderer: str = "midirenderer",
             report: dict[str, Any] | None = None) -> list[str]:
        """Write the take to ``folder`` (which must not exist; written atomically):
        primer.mid, continuation.mid, full.mid, audio.wav, pianoroll.png and
        generation.json, with suffixes _1, _2... for several samples. ``report`` entries
        go into generation.json. Returns the problems met on the way (audio that could not
        be rendered: everything else is still written)."""
        from .render import AudioError

        final = Path(folder)
        if final.exists():
            raise FileExistsError(f"{final} already exists")
        problems: list[str] = []
        samples = []
        with atomic_folder(final) as tmp:
            primer_notes = len(decode_midi(self.primer, tmp / "primer.mid").instruments[0].notes)
            for i, new in enumerate(self.continuations):
                sfx = f"_{i + 1}" if len(self.continuations) > 1 else ""
                cont = decode_midi(new, tmp / f"continuation{sfx}.mid")
                full = decode_midi(self.tokens(i), tmp / f"full{sfx}.mid")
                self.pianoroll(tmp / f"pianoroll{sfx}.png", i)
                sample = {"tokens": len(new), "seconds": self.seconds[i],
                          "stop_reason": self.stop_reasons[i],
                          "notes": len(cont.instruments[0].notes),
                          "primer_notes": primer_notes, "token_ids": new}
                if audio and not problems:
                    try:
                        info = render_audio(full, tmp / f"audio{sfx}.wav", soundfont, renderer)
                        sample["audio"] = {"seconds": round(info.seconds, 3),
                                           "gain_db": round(info.gain_db, 2),
                                           "renderer": info.renderer}
                    except AudioError as exc:
                        problems.append(str(exc))
                samples.append(sample)
            total = sum(len(t) for t in self.continuations)
            document = {
                **(report or {}),
                "checkpoint": self.checkpoint,
                "generation": self.settings,
                "seed": self.seed,
                "primer_tokens": len(self.primer),
                "primer_seconds": self.primer_seconds,
                "timings": {"generate_s": round(self.generate_s, 3),
                            "tokens_per_s": round(total / self.generate_s, 1)
                            if self.generate_s else None,
                            **(report or {}).get("timings", {})},
                "samples": samples,
            }
            (tmp / "generation.json").write_text(json.dumps(document, indent=2) + "\n")
        return problems

    def _sorted_notes(self, i: int) -> list[pretty_midi.Note]:
        return sorted(self.midi(i).instruments[0].notes, key=lambda n: (n.start, n.pitch))

    def _title(self, i: int) -> str:
        name = self.extra.get("primer_name") or "primer"
        sample = f", sample {i + 1}" if len(self.continuations) > 1 else ""
        ckpt = Path(self.checkpoint)  # a run's best/ or last/ is named with its run
        model = f"{ckpt.absolute().parent.name}/{ckpt.name}" if ckpt.name in (
            "best", "last") else ckpt.name
        return f"{name}, continued by {model}, seed {self.seed}{sample}"


@dataclass
class Chunk:
    """A streamed generation so far (`PerceiverMusic.stream`; its first sample).

    ``tokens`` are its new tokens so far and ``seconds`` their music; ``notes`` are the
    notes of primer and continuation so far, sorted, times from the start of the primer
    (a note still sounding ends at ``primer_seconds + seconds``, where the music is). The
    last chunk carries ``take``: the finished `Generation`, the same as `generate`
    returns for the same arguments, and its notes (there a note never released sounds to
    the end and at least 1 s, as in the take's MIDI file)."""

    tokens: list[int]
    seconds: float
    notes: list[pretty_midi.Note]
    primer_seconds: float
    take: Generation | None = None


_TF32 = {"users": 0, "saved": "highest"}  # decodings inside tf32_products, the setting before
_TF32_LOCK = threading.Lock()


@contextlib.contextmanager
def tf32_products(on: bool) -> Iterator[None]:
    """With ``on``: float32 matrix products on TF32 tensor cores (precision "high") for
    the block, and torch's process-wide setting as it was once the last of several
    overlapping blocks (streams decode in threads) ends: a caller's own work keeps its
    precision. Without ``on`` nothing is touched."""
    if not on:
        yield
        return
    with _TF32_LOCK:
        if _TF32["users"] == 0:
            _TF32["saved"] = torch.get_float32_matmul_precision()
            torch.set_float32_matmul_precision("high")
        _TF32["users"] += 1
    try:
        yield
    finally:
        with _TF32_LOCK:
            _TF32["users"] -= 1
            if _TF32["users"] == 0:
                torch.set_float32_matmul_precision(_TF32["saved"])


def notes_so_far(tokens: Sequence[int]) -> list[pretty_midi.Note]:
    """The notes of ``tokens``, sorted, those still sounding at its end ending there."""
    closed = [*tokens, *range(NOTE_OFF, NOTE_OFF + 128)]  # stray note-offs are ignored
    return sorted(decode_midi(closed).instruments[0].notes, key=lambda n: (n.start, n.pitch))


class PerceiverMusic:
    """A Perceiver AR checkpoint, ready to continue music (`generate`, `stream`)."""

    def __init__(self, model: torch.nn.Module, config: ModelConfig, meta: dict[str, Any],
                 source: str = "") -> None:
        self.model, self.config, self.meta, self.source = model, config, meta, source

    @property
    def device(self) -> torch.device:
        return self.model.token_emb.weight.device

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike | None = None, *,
                        device: str | torch.device | None = None, heads: int | None = None,
                        prefix: int | None = None, dtype: str = "auto") -> PerceiverMusic:
        """Load any checkpoint: a folder (config.json + model.safetensors), an accelerate
        state folder, or a ``.pth``/``.pt`` file of the original scripts (``heads`` and
        ``prefix`` say what its shapes cannot); None loads the bundled demo model.
        ``device`` defaults to CUDA when present. ``dtype`` is the weights' and
        activations' type (`DTYPES`); "auto" is bfloat16 on a CUDA GPU that supports it
        (decoding reads half the bytes; the deviation from float32 is measured in the
        README) and float32 elsewhere; float32 on CUDA decodes with TF32 matrix products
        (only while decoding: torch's process-wide setting is put back after).
        Raises CheckpointError with one line, ValueError for an unknown dtype."""
        path = DEMO_CHECKPOINT if path is None else Path(path)
        if dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
        if device is None:
            device = "cuda" if torch.cuda.is_available() else "cpu"
        device = _device(device)
        model, config, meta = load_checkpoint(path, device, heads=heads, prefix=prefix)
        if dtype == "auto":
            dtype = "bfloat16" if device.type == "cuda" and torch.cuda.is_bf16_supported(
            ) else "float32"
        if dtype == "bfloat16":
            model = model.to(torch.bfloat16)
        return cls(model, config, meta, str(path))

    @property
    def dtype(self) -> str:
        """The weights' type: "float32" or "bfloat16"."""
        return str(self.model.token_emb.weight.dtype).removeprefix("torch.")

    def save_pretrained(self, path: str | os.PathLike) -> Path:
        """Write config.json + model.safetensors to ``path`` (loadable by
        `from_pretrained`, generate.py --ckpt and every other loader)."""
        extra = {k: v for k, v in self.meta.items() if k not in ("model", "vocab_version")}
        return save_checkpoint(path, self.model, self.config, extra)

    def generate(
        self,
        primer: Primer = None,
        *,
        seconds: float | None = 20.0,
        max_new_tokens: int | None = None,
        prime_seconds: float = 20.0,
        prime_tokens: int = 0,
        prime_from_end: bool = False,
        num_samples: int = 1,
        temperature: float = 1.0,
        top_k: int | None = None,
        top_p: float | None = None,
        min_p: float | None = None,
        greedy: bool = False,
        creativity: float = 0.0,
        release: float = RELEASE,
        tonality: float = TONALITY,
        num_beams: int = 1,
        seed: int | None = None,
        stop_at_end: bool = True,
        cross_attn_seq_len: int | None = None,
        stride: int | None = None,
        precision: str = "float32",
        cuda_graphs: bool = True,
        decode_threads: int | None = None,
        progress: Callable[[StepInfo], object] | None = None,
        stop: Callable[[], bool] | None = None,
    ) -> Generation:
        """Continue ``primer`` (see `primer_tokens`: a path, bytes, PrettyMIDI, token ids
        or None) for ``seconds`` of music (None: until END or ``max_new_tokens``).

        The primer is cut to its first ``prime_seconds`` (or ``prime_tokens`` tokens; from
        its end with ``prime_from_end``; 0: all). Sampling: ``temperature``, ``top_k``,
        ``top_p``, ``min_p``, ``greedy``, ``creativity`` (a bias towards notes over rests),
        ``release`` (ends long-held notes), ``tonality`` (keeps to the key of the last
        seconds; both explained in `SamplingConfig`); ``num_beams`` > 1 runs beam search
        instead, which applies neither release nor tonality (each takes 0 or its default,
        and the take's settings record 0).
        ``num_samples`` continuations decode as one batch; ``seed`` repeats a run.
        ``cross_attn_seq_len`` sets the prefix length at generation (default: the
        model's). ``precision="int8"`` decodes with int8 weights on CPU (about 1.7x as
        fast, KL divergence from float32 about 1e-4 nats per token on the demo model).
        On a GPU each sampling step replays a CUDA graph (``cuda_graphs=False``: not).
        On a CPU ``decode_threads`` fixes the thread count of decoding steps (None: chosen
        by timing them, which keeps decoding fast beside other busy processes).
        ``progress`` receives each step's `StepInfo` (its ``step`` and ``seconds`` tell
        how far the slowest sample has come). ``stop`` is asked after every step: True
        ends the take there (stop reason "stopped"). Raises ValueError for impossible
        settings and MidiError for an unreadable primer.
        """
        _check_whole("num_samples", num_samples, 1)
        _check_whole("num_beams", num_beams, 1)
        for name, value, optional in (("temperature", temperature, False),
                                      ("top_p", top_p, True), ("min_p", min_p, True),
                                      ("creativity", creativity, False),
                                      ("release", release, False),
                                      ("tonality", tonality, False),
                                      ("prime_seconds", prime_seconds, False)):
            _check_number(name, value, optional)
        for name, value in (("greedy", greedy), ("prime_from_end", prime_from_end),
                            ("stop_at_end", stop_at_end)):
            if not isinstance(value, bool | np.bool_):  # "no" would count as True
                raise ValueError(f"{name} must be True or False, got {_kind(value)}")
        for count in (("max_new_tokens", max_new_tokens, 1), ("top_k", top_k, 1),
                      ("seed", seed, 0), ("cross_attn_seq_len", cross_attn_seq_len, 1),
                      ("stride", stride, 1), ("decode_threads", decode_threads, 1)):
            _check_whole(*count, optional=True)
        _check_number("seconds", seconds, optional=True)
        if seconds is not None and not 0 < seconds < math.inf:
            raise ValueError("seconds must be positive and finite (or None for no limit), "
                             f"got {seconds!r}")
        # the arguments as given, numpy scalars as Python numbers (generation.json holds
        # them), before max_new_tokens is derived: a replay with other seconds derives anew
        arguments = inspect.signature(self.generate).parameters
        settings = {k: _plain_number(v) for k, v in locals().items()
                    if k in arguments and k not in ("primer", "progress", "stop")}
        if max_new_tokens is None:
            max_new_tokens = int(TOKENS_PER_SECOND * seconds) + 100 if seconds else 2000
        tokens, note = primer_tokens(primer, seconds=prime_seconds, count=prime_tokens,
                                     from_end=prime_from_end)
        given = [(name, unused) for name, value, unused in (  # what beam search can take
            ("temperature", temperature, (1.0,)), ("top_k", top_k, (None,)),
            ("top_p", top_p, (None,)), ("min_p", min_p, (None,)), ("greedy", greedy, (False,)),
            ("creativity", creativity, (0.0,)), ("release", release, (RELEASE, 0.0)),
            ("tonality", tonality, (TONALITY, 0.0)))
            if value not in unused]
        if num_beams != 1 and given:  # a default besides 0: beam search applies neither
            named = [name if len(unused) == 1 else
                     f"{name} (or set it to 0 or {unused[0]:g}: beam search applies none)"
                     for name, unused in given]
            raise ValueError(f"beam search (num_beams {num_beams}) takes no sampling setting: "
                             f"leave out {', '.join(named)}")
        sampling = None
        if num_beams != 1:
            # what beam search applies, so that a replay gives the same
            settings.update(release=0.0, tonality=0.0)
        else:
            sampling = SamplingConfig(temperature=temperature, top_k=top_k, top_p=top_p,
                                      min_p=min_p, greedy=greedy, creativity=creativity,
                                      release=release, tonality=tonality)
        start = time.perf_counter()
        with tf32_products(self.device.type == "cuda" and self.dtype == "float32"):
            result = generate(self.model, tokens, max_new_tokens=max_new_tokens,
                              num_samples=num_samples, sampling=sampling, num_beams=num_beams,
                              max_seconds=seconds, stop_on_end=stop_at_end, stride=stride,
                              seed=seed, cross_attn_seq_len=cross_attn_seq_len,
                              precision=precision, cuda_graphs=cuda_graphs,
                              decode_threads=decode_threads, on_step=progress, stop=stop)
        name = Path(primer).name if isinstance(primer, str | os.PathLike) else (
            "from scratch" if primer is None else "primer")
        drawn = None if result.seed is None else int(result.seed)
        return Generation(  # settings with the seed drawn: they replay the take
            primer=tokens, continuations=result.tokens, stop_reasons=result.stop_reasons,
            seconds=result.seconds, seed=drawn, settings={**settings, "seed": drawn},
            checkpoint=self.source, generate_s=time.perf_counter() - start,
            primer_note=note, extra={"primer_name": name,
                                     "scores": result.scores,
                                     "model": asdict(self.config), "dtype": self.dtype})

    def stream(self, primer: Primer = None, *, chunk_seconds: float = 1.0,
               **settings: Any) -> Iterator[Chunk]:
        """`generate` a chunk at a time: yields a first `Chunk` once the first token is
        decoded (no new tokens: the primer, so that a player can start), another each
        time the first sample's music has grown by ``chunk_seconds``, while decoding goes
        on in a thread, and a last one holding the finished take (the same as `generate`
        with the same arguments and seed). Leaving the loop early stops the generation; a
        ``stop`` that returns True ends the take there and still yields it. Takes every
        argument of `generate` but ``progress``; beam search, which picks its sequence
        only at the end, cannot stream. Impossible settings raise `generate`'s errors
        before the first chunk."""
        _check_number("chunk_seconds", chunk_seconds)
        if not chunk_seconds > 0:
            raise ValueError(f"chunk_seconds must be positive, got {chunk_seconds}")
        if settings.get("num_beams", 1) != 1:
            raise ValueError("beam search cannot stream: it picks its sequence at the end")
        if "progress" in settings:
            raise TypeError("stream() takes no progress argument: each chunk is progress")
        asked = settings.pop("stop", None) or (lambda: False)
        cut = {name: settings.get(name, param.default) for name, param in
               inspect.signature(self.generate).parameters.items() if name.startswith("prime_")}
        prime = primer_tokens(primer, seconds=cut["prime_seconds"], count=cut["prime_tokens"],
                              from_end=cut["prime_from_end"])[0]
        start = piece_seconds(prime)
        shifts = shift_steps(range(VOCAB_SIZE)).tolist()
        events: queue.Queue = queue.Queue(maxsize=64)
        stopping = threading.Event()
        made: list[int] = []
        state = {"steps": 0, "shown": 0.0, "ended": False, "began": False}

        def on_step(info: StepInfo) -> None:  # in the decoding thread
            if not state["began"]:  # the settings passed generate's checks
                state["began"] = True
                events.put(None)
            token = int(info.tokens[0])
            if state["ended"] or token == PAD:
                return
            made.append(token)
            state["steps"] += shifts[token]
            state["ended"] = token == END
            seconds = state["steps"] / STEPS_PER_SECOND
            if seconds - state["shown"] >= chunk_seconds:
                state["shown"] = seconds
                chunk = Chunk(list(made), seconds, notes_so_far(prime + made), start)
                while not stopping.is_set():  # a slow reader holds the decoding back
                    try:
                        events.put(chunk, timeout=0.1)
                        break
                    except queue.Full:
                        continue

        def run() -> None:
            try:
                take = self.generate(primer, **settings, progress=on_step,
                                     stop=lambda: stopping.is_set() or asked())
                if not state["began"]:  # no step was reported: the reader waits for one
                    events.put(None)
                events.put(Chunk(take.continuations[0], take.seconds[0],
                                 take._sorted_notes(0), start, take))
            except BaseException as exc:  # noqa: BLE001 (raised again in the reader)
                events.put(exc)

        worker = threading.Thread(target=run, name="perceiver-music-stream", daemon=True)
        worker.start()
        try:
            began = events.get()
            if isinstance(began, BaseException):
                raise began
            yield Chunk([], 0.0, notes_so_far(prime), start)
            while True:
                item = events.get()
                if isinstance(item, BaseException):
                    raise item
                yield item
                if item.take is not None:
                    return
        finally:
            stopping.set()
            while worker.is_alive():  # let a blocked put go on to the end
                with contextlib.suppress(queue.Empty):
                    events.get(timeout=0.1)
            worker.join()
