"""What a person sees and hears: a labelled piano roll and loudness-normalised audio.

- `pianoroll_figure` draws primer and continuation notes with matplotlib: time in seconds,
  pitch with note names, velocity as shade, the two parts in two colours with a legend,
  the boundary marked; the figure has the same size for any length of music.
- `render_audio` turns MIDI into a WAV file with a pip-only synthesiser (midirenderer, a
  SoundFont renderer) and the small General MIDI SoundFont that pretty_midi ships, or with
  the FluidSynth program when asked; the result is normalised to a common loudness.
  `render_span` renders a stretch of it for a stream, at the cost of its own length.

Neither needs torch; generate.py, app.py and evaluate.py share them.
"""

from __future__ import annotations

import io
import math
import os
import shutil
import subprocess
import tempfile
import wave
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pretty_midi

from midi_processor import write_atomic

PRIMER_COLOUR = "Blues"  # matplotlib colour maps: the shade follows the velocity
CONTINUATION_COLOUR = "Oranges"
BOUNDARY_COLOUR = "#c0392b"
FIGURE_SIZE = (12.0, 4.8)  # inches, at DPI dots per inch: 1440 x 576 pixels
DPI = 120
RENDERERS = ("midirenderer", "fluidsynth")
TARGET_RMS_DB = -20.0  # loudness after normalisation (root mean square, dB full scale)
PEAK_CEILING_DB = -1.0  # ... unless that would push a peak above this
NOTE_NAMES = ("C", "C#", "D", "D#", "E", "F", "F#", "G", "G#", "A", "A#", "B")


class AudioError(Exception):
    """Audio could not be rendered; the message says why and what to install."""


def note_name(pitch: int) -> str:
    """MIDI pitch -> scientific pitch name: 60 -> "C4", 61 -> "C#4"."""
    return f"{NOTE_NAMES[pitch % 12]}{pitch // 12 - 1}"


def audio_options_problem(renderer: str, soundfont: str | None) -> str | None:
    """What is wrong with ``--renderer``/``--soundfont``, checked before any work (a bad
    one would otherwise surface only when the first audio is rendered), or None."""
    if renderer not in RENDERERS:
        return f"--renderer must be {' or '.join(RENDERERS)}, not {renderer!r}"
    if soundfont and not Path(soundfont).is_file():
        return f"{soundfont}: soundfont not found (give a .sf2 file, or '' for the default)"
    if soundfont:  # a SoundFont (.sf2, .sf3) is a RIFF file of form "sfbk"
        try:
            with open(soundfont, "rb") as f:
                head = f.read(12)
        except OSError as exc:
            return f"{soundfont}: cannot read the soundfont ({exc.strerror})"
        if head[:4] != b"RIFF" or head[8:12] != b"sfbk":
            return f"{soundfont}: not a SoundFont (give a .sf2 file, or '' for the default)"
    return None


def default_soundfont() -> Path:
    """The General MIDI SoundFont that pretty_midi ships (TimGM6mb.sf2, 6 MB)."""
    return Path(pretty_midi.__file__).resolve().parent / "TimGM6mb.sf2"


def whole_number_ticks(axis: Any) -> None:
    """Mark a matplotlib ``axis`` of whole numbers (pieces, steps) at whole numbers only, 1,
    2 or 5 times a power of ten apart: on a short range matplotlib put ticks at 2.5, 1.25."""
    from matplotlib.ticker import MaxNLocator

    axis.set_major_locator(MaxNLocator(integer=True, steps=[1, 2, 5, 10]))


# ---------------------------------------------------------------------------------------
# the piano roll


def pianoroll_figure(
    primer: Sequence[pretty_midi.Note],
    continuation: Sequence[pretty_midi.Note],
    boundary_s: float | None,
    title: str = "",
) -> Any:
    """A matplotlib Figure of the notes: primer and continuation in two colours (the shade
    follows the velocity), the boundary as a vertical line, a legend, time in seconds on
    the x axis and note names on the y axis. With ``boundary_s`` None the notes are one
    piece (``primer``): no boundary. Needs no display and leaves matplotlib's backend as it
    is (a notebook's stays)."""
    import matplotlib
    from matplotlib.collections import PatchCollection
    from matplotlib.figure import Figure
    from matplotlib.lines import Line2D
    from matplotlib.patches import Patch, Rectangle

    fig = Figure(figsize=FIGURE_SIZE, dpi=DPI, layout="constrained")
    ax = fig.add_subplot()
    notes = list(primer) + list(continuation)
    end = max([n.end for n in notes] + [boundary_s or 0.0, 1.0])
    low = min((n.pitch for n in notes), default=60) - 2
    high = max((n.pitch for n in notes), default=72) + 2
    for group, cmap in ((primer, PRIMER_COLOUR), (continuation, CONTINUATION_COLOUR)):
        if not group:
            continue
        colours = matplotlib.colormaps[cmap](0.35 + 0.65 * np.array(
            [n.velocity for n in group]) / 127)
        boxes = [Rectangle((n.start, n.pitch - 0.4), max(n.end - n.start, 0.01), 0.8)
                 for n in group]
        ax.add_collection(PatchCollection(boxes, facecolors=colours, edgecolors="white",
                                          linewidths=0.4))
    for pitch in range(low + 1, high):
        if pitch % 12 in (1, 3, 6, 8, 10):  # black keys: a faint band, as on a keyboard
            ax.axhspan(pitch - 0.5, pitch + 0.5, color="0.95", zorder=0, lw=0)
    if boundary_s is not None:
        ax.axvline(boundary_s, color=BOUNDARY_COLOUR, lw=1.5)
    ax.set_xlim(0, end * 1.01)
    ax.set_ylim(low, high)
    cs = [p for p in range(low, high + 1) if p % 12 == 0]
    step = max(1, len(cs) // 8)
    ax.set_yticks(cs[::step], [note_name(p) for p in cs[::step]])
    ax.set_yticks([p for p in range(low, high + 1) if p % 12 in (4, 7)], minor=True)
    ax.grid(axis="y", which="major", color="0.8", lw=0.6)
    ax.grid(axis="x", color="0.9", lw=0.6)
    ax.set_xlabel("time (s)")
    ax.set_ylabel("pitch")
    if title:
        ax.set_title(title, loc="left", fontsize=11)
    shade = matplotlib.colormaps
    handles = [Patch(color=shade[PRIMER_COLOUR](0.8), label=f"notes ({len(primer)})")]
    if boundary_s is not None:
        handles = [Patch(color=shade[PRIMER_COLOUR](0.8), label=f"primer ({len(primer)} notes)"),
                   Patch(color=shade[CONTINUATION_COLOUR](0.8),
                         label=f"continuation ({len(continuation)} notes)"),
                   Line2D([], [], color=BOUNDARY_COLOUR, lw=1.5,
                          label=f"continuation starts ({boundary_s:.1f} s)")]
    ax.legend(handles=[*handles, Patch(color="none", label="darker = louder (velocity)")],
              loc="upper left", bbox_to_anchor=(1.0, 1.0), fontsize=9, frameon=False)
    return fig


def save_pianoroll(
    path: str | os.PathLike,
    primer: Sequence[pretty_midi.Note],
    continuation: Sequence[pretty_midi.Note],
    boundary_s: float | None,
    title: str = "",
) -> None:
    """Draw `pianoroll_figure` and write it to ``path`` as PNG (atomically)."""
    buf = io.BytesIO()
    pianoroll_figure(primer, continuation, boundary_s, title).savefig(buf, format="png")
    write_atomic(path, buf.getvalue())


# ---------------------------------------------------------------------------------------
# audio


@dataclass(frozen=True)
class AudioInfo:
    """What `render_audio` wrote: length in seconds, sample rate, the gain applied, the
    peak after it (0..1 of full scale), and the renderer used."""

    seconds: float
    sample_rate: int
    gain_db: float
    peak: float
    renderer: str


def render_audio(
    midi: pretty_midi.PrettyMIDI | bytes,
    path: str | os.PathLike,
    soundfont: str | os.PathLike | None = None,
    renderer: str = "midirenderer",
) -> AudioInfo:
    """Render ``midi`` to a 16-bit stereo WAV file at ``path`` (atomically), normalised to
    TARGET_RMS_DB unless a peak would then pass PEAK_CEILING_DB.

    ``soundfont`` is any .sf2 file (default: `default_soundfont`). ``renderer`` is
    "midirenderer" (a pip wheel; no system package needed) or "fluidsynth" (the program,
    from the system's package manager). Raises AudioError with one line for a missing
    renderer or SoundFont, or a failed render.
    """
    font = Path(soundfont) if soundfont else default_soundfont()
    if not font.is_file():
        raise AudioError(f"soundfont {font} not found (pass --soundfont with a .sf2 file)")
    if isinstance(midi, pretty_midi.PrettyMIDI):
        buf = io.BytesIO()
        midi.write(buf)
        midi = buf.getvalue()
    if renderer == "midirenderer":
        samples, rate = _midirenderer(midi, font)
    elif renderer == "fluidsynth":
        samples, rate = _fluidsynth(midi, font)
    else:
        raise AudioError(f"unknown renderer {renderer!r}; choose {' or '.join(RENDERERS)}")
    samples, gain_db = normalise(samples)
    write_atomic(path, wav_bytes(samples, rate))
    return AudioInfo(len(samples) / rate, rate, gain_db, float(np.abs(samples).max(initial=0)),
                     renderer)


def render_span(notes: Sequence[pretty_midi.Note], start: float, end: float,
                soundfont: str | os.PathLike | None = None, renderer: str = "midirenderer",
                tail: float = 4.0, longest: float = 30.0) -> tuple[np.ndarray, int]:
    """The audio of ``notes`` from ``start`` to ``end`` seconds, unnormalised (frames x
    channels, and the sample rate), rendering only from where the notes sounding at
    ``start`` began (at least ``tail`` seconds before it, for the release of notes that
    ended just before): a stream's chunk costs about its own length, not the piece's.

    The samples are the same as in a render of the whole piece, unless a note sounding
    at ``start`` began more than ``longest`` seconds before it (it is struck again there,
    by then faded much as it would have) or a release outlasts ``tail``. A synthesiser
    applies events at the start of its block of samples, so the audio up to ``end`` also
    depends on events up to 50 ms after it: a stream renders up to 0.1 s before the
    music it has, with notes still sounding held past that. The render starts on a 50 ms
    grid, where 120 bpm at 480 ticks per beat puts a whole tick, so the notes land on the
    same samples as in the whole piece's render. Notes still sounding end 1 s after
    ``end``, past any effect on the span, so that the synthesiser does not render their
    whole length (a stream holds them 30 s past the music it has)."""
    sounding = [n.start for n in notes if n.start < start < n.end]
    origin = max(min([start - tail, *sounding]), start - longest, 0.0)
    origin = max(0.0, math.floor(origin * 20) / 20)
    pm = pretty_midi.PrettyMIDI(resolution=480, initial_tempo=120.0)
    piano = pretty_midi.Instrument(program=0, name="Piano")
    piano.notes = [pretty_midi.Note(n.velocity, n.pitch, max(n.start, origin) - origin,
                                    min(n.end, end + 1.0) - origin)  # later: no effect
                   for n in notes if n.end > origin and n.start < end + 0.1]
    pm.instruments.append(piano)
    buf = io.BytesIO()
    pm.write(buf)
    font = Path(soundfont) if soundfont else default_soundfont()
    if renderer == "fluidsynth":
        samples, rate = _fluidsynth(buf.getvalue(), font)
    elif renderer == "midirenderer":
        samples, rate = _midirenderer(buf.getvalue(), font)
    else:
        raise AudioError(f"unknown renderer {renderer!r}; choose {' or '.join(RENDERERS)}")
    first, last = round((start - origin) * rate), round((end - origin) * rate)
    out = np.zeros((last - first, samples.shape[1] if samples.ndim == 2 else 2), np.float32)
    got = samples[first:last]
    out[: len(got)] = got
    return out, rate


def normalise(samples: np.ndarray) -> tuple[np.ndarray, float]:
    """``samples`` (float, full scale 1.0) scaled to TARGET_RMS_DB, or less so that the
    peak stays at PEAK_CEILING_DB; returns them and the gain in dB. Silence stays silent."""
    peak = float(np.abs(samples).max(initial=0.0))
    rms = float(np.sqrt(np.mean(np.square(samples, dtype=np.float64)))) if samples.size else 0
    if peak == 0.0 or rms == 0.0:
        return samples, 0.0
    gain = min(10 ** (TARGET_RMS_DB / 20) / rms, 10 ** (PEAK_CEILING_DB / 20) / peak)
    return (samples * gain).astype(np.float32), 20 * float(np.log10(gain))


def wav_bytes(samples: np.ndarray, rate: int) -> bytes:
    """A 16-bit PCM WAV file of ``samples`` (frames x channels, float in -1..1)."""
    pcm = np.round(np.clip(samples, -1.0, 1.0) * 32767).astype("<i2")
    buf = io.BytesIO()
    with wave.open(buf, "wb") as w:
        w.setnchannels(pcm.shape[1] if pcm.ndim == 2 else 1)
        w.setsampwidth(2)
        w.setframerate(rate)
        w.writeframes(pcm.tobytes())
    return buf.getvalue()


def read_wav(data: bytes) -> tuple[np.ndarray, int]:
    """(frames x channels float32 in -1..1, sample rate) of a 16-bit PCM WAV file."""
    with wave.open(io.BytesIO(data)) as w:
        if w.getsampwidth() != 2:
            raise AudioError(f"expected 16-bit audio, got {8 * w.getsampwidth()}-bit")
        raw = np.frombuffer(w.readframes(w.getnframes()), dtype="<i2")
        return (raw.reshape(-1, w.getnchannels()).astype(np.float32) / 32768.0,
                w.getframerate())


def _midirenderer(midi: bytes, font: Path) -> tuple[np.ndarray, int]:
    try:
        import midirenderer
    except ImportError:
        raise AudioError("audio needs the midirenderer wheel (pip install midirenderer; it "
                         "has no build for this platform: use --renderer fluidsynth)") from None
    try:
        return read_wav(midirenderer.render_wave_from(font.read_bytes(), midi))
    except (RuntimeError, ValueError, OSError, wave.Error) as err:
        raise AudioError(f"midirenderer could not render with {font.name}: {err}") from None


def _fluidsynth(midi: bytes, font: Path) -> tuple[np.ndarray, int]:
    exe = shutil.which("fluidsynth")
    if exe is None:
        raise AudioError("--renderer fluidsynth needs the FluidSynth program (Debian/Ubuntu: "
                         "apt-get install fluidsynth; macOS: brew install fluid-synth)")
    with tempfile.TemporaryDirectory() as tmp:
        src, out = Path(tmp) / "in.mid", Path(tmp) / "out.wav"
        src.write_bytes(midi)
        r = subprocess.run([exe, "-ni", "-g", "1.0", "-r", "44100", "-F", str(out), str(font),
                            str(src)], capture_output=True, text=True)
        if r.returncode != 0 or not out.is_file():
            raise AudioError(f"fluidsynth failed: {r.stderr.strip()[:200]}")
        return read_wav(out.read_bytes())
