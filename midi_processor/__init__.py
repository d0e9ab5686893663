"""MIDI <-> performance-event tokens for Perceiver AR piano models (no torch).

>>> from midi_processor import encode_midi, decode_midi
>>> tokens = encode_midi("piece.mid")          # list of ints, ends with END
>>> pm = decode_midi(tokens, "roundtrip.mid")  # pretty_midi.PrettyMIDI, also written
"""

from __future__ import annotations

import errno
import io
import os
import tempfile
from pathlib import Path

import numpy as np
import pretty_midi

from .core import (
    NoteData,
    cut_tokens,
    decode_tokens,
    encode_notes,
    shift_steps,
    token_to_text,
    tokens_to_text,
)
from .reader import MAX_SECONDS, MidiError, MidiSource, read_midi, read_midi_mido
from .vocab import (
    END,
    NOTE_OFF,
    NOTE_ON,
    PAD,
    STEPS_PER_SECOND,
    TIME_SHIFT,
    VELOCITY,
    VOCAB_SIZE,
    VOCAB_VERSION,
)

__all__ = [
    "END",
    "MAX_SECONDS",
    "NOTE_OFF",
    "NOTE_ON",
    "PAD",
    "TIME_SHIFT",
    "VELOCITY",
    "VOCAB_SIZE",
    "VOCAB_VERSION",
    "MidiError",
    "NoteData",
    "cut_tokens",
    "decode_midi",
    "default_permissions",
    "encode_midi",
    "midi_files",
    "read_midi",
    "read_midi_mido",
    "shift_steps",
    "token_to_text",
    "tokens_to_text",
    "write_atomic",
]


def encode_midi(source: MidiSource, name: str | None = None,
                max_seconds: float = MAX_SECONDS) -> list[int]:
    """Tokens of a MIDI file path, raw MIDI bytes or a ``pretty_midi.PrettyMIDI``.

    All non-drum instruments merge into one piano stream, the sustain pedal is applied,
    times are quantised to 10 ms, and the list ends with END. ``name`` labels errors for
    bytes input. Raises MidiError (message: file and reason) for unreadable or empty input
    and for pieces whose events reach past ``max_seconds`` (4 h by default: longer ones
    come from absurd tempos or ticks), checked before any token is allocated.
    """
    return encode_notes(read_midi(source, name, max_seconds)).tolist()


def decode_midi(tokens, path: str | os.PathLike | None = None) -> pretty_midi.PrettyMIDI:
    """A one-piano ``PrettyMIDI`` from any token ids (see ``core.decode_tokens``).

    With ``path`` the file is also written, atomically (temporary file, then rename).
    """
    start, end, pitch, velocity = decode_tokens(tokens)
    pm = pretty_midi.PrettyMIDI(resolution=480, initial_tempo=120.0)
    piano = pretty_midi.Instrument(program=0, name="Piano")
    scale = 1.0 / STEPS_PER_SECOND
    piano.notes = [
        pretty_midi.Note(velocity=int(v), pitch=int(p), start=s * scale, end=e * scale)
        for s, e, p, v in zip(
            start.tolist(), end.tolist(), pitch.tolist(), velocity.tolist(), strict=True
        )
    ]
    pm.instruments.append(piano)
    if path is not None:
        write_midi_atomic(pm, path)
    return pm


def midi_files(root: str | os.PathLike) -> list[Path]:
    """Every .mid / .midi file (any case, any depth) below ``root``, sorted."""
    return sorted(
        p for p in Path(root).rglob("*") if p.suffix.lower() in (".mid", ".midi") and p.is_file()
    )


def default_permissions(path: str | os.PathLike) -> None:
    """Give a file or folder made through a private temporary name (mode 0600 / 0700) the
    permissions a plain ``open``/``mkdir`` would have given it under the current umask."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(path, (0o777 if Path(path).is_dir() else 0o666) & ~umask)


def write_atomic(path: str | os.PathLike, data: bytes) -> None:
    """Write ``data`` to a temporary file beside ``path`` (``.NAME.*.tmp``), then rename it
    over ``path`` with the permissions the umask gives, so a crash never leaves ``path``
    half-written."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        default_permissions(tmp)
        os.replace(tmp, path)
    except IsADirectoryError:  # named as the folder, not the temporary file's name
        Path(tmp).unlink(missing_ok=True)
        raise IsADirectoryError(errno.EISDIR, "is a folder, not a file to write", str(path)) \
            from None
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_midi_atomic(pm: pretty_midi.PrettyMIDI, path: str | os.PathLike) -> None:
    """Write ``pm`` as a MIDI file at ``path`` with `write_atomic`."""
    buf = io.BytesIO()
    pm.write(buf)
    write_atomic(path, buf.getvalue())


def piece_seconds(tokens) -> float:
    """Seconds of music the tokens span (sum of TIME_SHIFTs up to END)."""
    ids = np.asarray(list(tokens), dtype=np.int64)
    stop = np.flatnonzero(ids == END)
    ids = ids[: stop[0]] if len(stop) else ids
    return float(shift_steps(ids).sum()) / STEPS_PER_SECOND
