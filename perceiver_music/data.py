"""Training data: prep.py's token pickles -> packed splits -> model windows.

A split folder (``data/train`` ...) holds one pickled list of ints per piece. Each split is
loaded once through the project's restricted unpickler, allowing no global at all (a list
of ints needs none), checked, and packed into one contiguous uint16 array with offsets.

A window is ``context + 1`` tokens: the model reads the first ``context`` and predicts the
next token at each of the last ``latents`` positions. Latents are always real tokens;
padding lives only in the prefix (masked). Training draws windows uniformly over token
positions, so long pieces are seen in proportion to their length, and a window may start
before its piece (PAD prefix), so piece openings are learned too.
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from midi_processor.augment import stretch_time, transpose
from midi_processor.vocab import END, PAD, VOCAB_SIZE

from .safe_pickle import RestrictedUnpickler


class DataError(Exception):
    """A token folder or file is missing or malformed; the message names it."""


def load_token_file(path: Path) -> np.ndarray:
    """One piece's tokens from a pickle that may hold nothing but a list of ints."""
    try:
        raw = path.read_bytes()
    except OSError as exc:
        why = (f"a link to {path.readlink()}, which does not exist" if path.is_symlink()
               and not path.exists() else f"cannot read it ({exc.strerror or exc})")
        raise DataError(f"{path}: {why}") from None
    try:
        obj = RestrictedUnpickler(io.BytesIO(raw), allow={}).load()
    except Exception as exc:
        raise DataError(f"{path}: not a token pickle ({exc})") from None
    if not isinstance(obj, list | tuple) or not all(type(t) is int for t in obj):
        raise DataError(f"{path}: expected a list of ints, got {type(obj).__name__}")
    bad = next((t for t in obj if not 0 <= t < VOCAB_SIZE), None)
    if bad is not None:
        raise DataError(f"{path}: token id {str(bad)[:30]} is outside 0..{VOCAB_SIZE - 1}")
    return np.asarray(obj, dtype=np.int64)


@dataclass
class TokenSplit:
    """All pieces of one split in one array: piece i is ``tokens[offsets[i]:offsets[i+1]]``."""

    tokens: np.ndarray  # uint16
    offsets: np.ndarray  # int64, len = pieces + 1
    names: list[str]

    @property
    def lengths(self) -> np.ndarray:
        return np.diff(self.offsets)

    def piece(self, i: int) -> np.ndarray:
        return self.tokens[self.offsets[i] : self.offsets[i + 1]]


def load_split(folder: str | Path) -> TokenSplit:
    """Pack every ``*.pickle`` of ``folder`` (sorted by name). Pieces written by the
    original scripts may lack the final END; it is added so every piece ends with one."""
    folder = Path(folder)
    prepped = (folder.parent / "manifest.jsonl").is_file()  # prep.py's output: say more
    if not folder.is_dir():
        raise DataError(f"{folder}: no such data folder (" + (
            f"{folder.parent} holds prep.py's train, val and test)" if prepped
            else "run prep.py first)"))
    files = sorted(folder.glob("*.pickle"))
    if not files:
        share = {"val": "; raise --val_share when you run it again",
                 "test": "; raise --test_share when you run it again"}.get(folder.name, "")
        raise DataError(f"{folder}: no .pickle token files" + (
            f": prep.py put no piece there (its manifest.jsonl says where each went){share}"
            if prepped else " (run prep.py first)"))
    pieces = []
    for f in files:
        t = load_token_file(f)
        pieces.append(t if len(t) and t[-1] == END else np.append(t, END))
    lengths = np.array([len(p) for p in pieces], dtype=np.int64)
    return TokenSplit(
        tokens=np.concatenate(pieces).astype(np.uint16),
        offsets=np.concatenate([[0], np.cumsum(lengths)]),
        names=[f.name for f in files],
    )


@dataclass
class WindowSpec:
    """Window geometry and augmentation settings for training batches."""

    context: int  # tokens the model reads (max_seq_len)
    prefix: int  # prefix length m; latents = context - prefix
    prefix_fill_share: float = 0.5  # share of examples whose prefix is cut to a random length
    transpose: int = 0  # transpose by a uniform random number of semitones in -k..k
    stretch: float = 0.0  # stretch time by a uniform random factor in 1-s..1+s

    @property
    def latents(self) -> int:
        return self.context - self.prefix


def _window(piece: np.ndarray, start: int, length: int) -> np.ndarray:
    """``piece[start:start+length]`` with PAD where it reaches before or after the piece."""
    lead = max(0, -start)
    body = piece[max(0, start) : start + length]
    tail = length - lead - len(body)
    return np.concatenate([np.full(lead, PAD, np.int64), body, np.full(tail, PAD, np.int64)])


class WindowSampler:
    """Random training windows, uniform over token positions, reproducible from its state.

    Valid window starts of a piece of P tokens run from -prefix (all-PAD prefix, the
    latents on the piece's first tokens) to P - context - 1 (the last target is the END);
    pieces too short to fill the latents (P <= latents) are skipped.
    """

    def __init__(self, split: TokenSplit, spec: WindowSpec, seed: int):
        self.split, self.spec = split, spec
        counts = np.maximum(split.lengths - spec.latents, 0)  # starts per piece
        if counts.sum() == 0:
            raise DataError(
                f"no piece is longer than the {spec.latents} latent tokens of the model"
            )
        self.cum = np.cumsum(counts)
        self.rng = np.random.default_rng(seed)

    @property
    def state(self) -> dict:
        """JSON-serialisable generator state: saving it is saving the data position."""
        return self.rng.bit_generator.state

    @state.setter
    def state(self, value: dict) -> None:
        self.rng.bit_generator.state = value

    def _augment(self, raw: np.ndarray) -> np.ndarray:
        spec, rng = self.spec, self.rng
        out = raw
        if spec.transpose:
            out = transpose(out, int(rng.integers(-spec.transpose, spec.transpose + 1)))
        if spec.stretch:
            out = stretch_time(out, float(rng.uniform(1 - spec.stretch, 1 + spec.stretch)))
        return out if len(out) > spec.latents else raw

    def draw(self) -> tuple[int, int]:
        """A (piece, window start) pair, uniform over all valid starts of all pieces."""
        u = int(self.rng.integers(self.cum[-1]))
        i = int(np.searchsorted(self.cum, u, side="right"))
        return i, u - (int(self.cum[i - 1]) if i else 0) - self.spec.prefix

    def sample(self, batch_size: int) -> tuple[torch.Tensor, torch.Tensor]:
        """``(tokens [B, context+1] long, prefix_mask [B, prefix] bool)``; mask True = real."""
        spec, rng, n = self.spec, self.rng, self.spec.context + 1
        rows, masks = [], []
        for _ in range(batch_size):
            i, start = self.draw()
            piece = self.split.piece(i)
            real = self._augment(piece[max(0, start) : start + n].astype(np.int64))[-n:]
            keep = len(real) - (spec.latents + 1)  # real prefix tokens
            if rng.random() < spec.prefix_fill_share:
                keep = min(keep, int(rng.integers(0, spec.prefix + 1)))
                real = real[len(real) - (spec.latents + 1) - keep :]
            row = np.concatenate([np.full(n - len(real), PAD, np.int64), real])
            rows.append(row)
            masks.append(np.arange(spec.prefix) >= spec.prefix - keep)
        return torch.from_numpy(np.stack(rows)), torch.from_numpy(np.stack(masks))


def to_device(tokens: torch.Tensor, prefix_mask: torch.Tensor,
              device: torch.device) -> tuple[torch.Tensor, torch.Tensor | None]:
    """A sampled batch on ``device``, ready for the model: the prefix mask becomes None
    when every prefix position is real, so that the cross-attention layer asks SDPA for a
    causal bias alone, which flash kernels run (a mask sends them to slower ones). On
    CUDA the tokens are copied from pinned memory without waiting for the GPU. The check
    runs on the CPU tensor: it costs no device synchronisation."""
    mask = None if bool(prefix_mask.all()) else prefix_mask
    if device.type == "cuda":
        tokens = tokens.pin_memory()
        mask = None if mask is None else mask.pin_memory()
    tokens = tokens.to(device, non_blocking=True)
    return tokens, None if mask is None else mask.to(device, non_blocking=True)


def validation_windows(
    split: TokenSplit, context: int, prefix: int, max_windows: int = 0
) -> tuple[torch.Tensor, torch.Tensor]:
    """Fixed windows for a loss comparable between runs and steps, in which every token of
    every piece but its first is a target exactly once.

    Per piece, windows step by the latent count from start -prefix, so their latents tile
    the piece; the last one reaches past the piece's end, padded there with PAD. Those PAD
    positions are ignored targets, and as attention is causal they change no logit of a
    real target before them. With ``max_windows`` an evenly spaced subset is kept.
    """
    latents, n = context - prefix, context + 1
    rows = []
    for i in range(len(split.names)):
        piece = split.piece(i).astype(np.int64)
        if len(piece) < 2:
            continue
        starts = range(-prefix, len(piece) - prefix - 1, latents)
        rows += [_window(piece, s, n) for s in starts]
    if not rows:
        raise DataError("no validation piece holds two tokens")
    if max_windows and len(rows) > max_windows:
        rows = [rows[int(j)] for j in np.linspace(0, len(rows) - 1, max_windows)]
    tokens = torch.from_numpy(np.stack(rows))
    return tokens, tokens[:, :prefix] != PAD
