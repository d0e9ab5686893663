"""Generation engine: cached decoding with exact re-encoding, sampling and beam search.

The library's loop (`AutoregressiveWrapper.generate`) runs the whole window through the
model for every new token. Here each layer's keys and values are cached and one token is
fed per step. A cache stays exact only while the window start (positions count from it)
and the prefix/latent boundary (the two are normalised differently) stay put, so:

1. The first window is the primer: its last max_seq_len tokens when it has more than m
   (prefix length) tokens; otherwise it is right-aligned behind PAD so that up to n
   (latent count) primer tokens are latents, the PAD prefix masked with ``prefix_mask``.
2. The window grows one latent per step, using the caches, until it holds max_seq_len.
3. Then ``stride`` tokens (default n // 2) are dropped from its left and one full forward
   over the new window rebuilds the caches.

So at every step the next-token logits equal the library's forward on the window the
engine reports (`StepInfo`), and that window holds at least min(L, max_seq_len - stride)
real tokens of the L so far.
"""

from __future__ import annotations

import functools
import math
import secrets
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from perceiver_ar_pytorch import PerceiverAR
from torch import Tensor

from midi_processor.vocab import (
    END,
    MAX_SHIFT_STEPS,
    NOTE_OFF,
    NOTE_ON,
    PAD,
    STEPS_PER_SECOND,
    TIME_SHIFT,
    VOCAB_SIZE,
)

from .model import CudaGraphStep, DecodeCache, decode_step, forward, prefix_length
from .threads import ThreadTuner

STOP_END = "end"
STOP_SECONDS = "seconds"
STOP_MAX_TOKENS = "max_tokens"
STOP_ASKED = "stopped"  # the caller's ``stop`` said so
RELEASE_AFTER_S = 1.0  # `SamplingConfig.release` acts on notes held longer than this
KEY_MEMORY_S = 10.0  # `SamplingConfig.tonality`: a note heard this long ago weighs 1/e
KEY_FLOOR = 0.02  # `SamplingConfig.tonality`: each pitch class's share counts at least this
_PITCH_CLASS = np.arange(NOTE_OFF - NOTE_ON) % 12  # of each NOTE_ON


@dataclass(frozen=True)
class SamplingConfig:
    """How the next token is drawn from the logits.

    ``creativity`` is a logit bias added to every NOTE_ON before anything else: each note
    becomes e**creativity times as likely against time shifts and the other events, so
    positive values give more notes and fewer rests, negative values sparser music (0: the
    model's own distribution). Filters then compose in this order: temperature, top-k,
    top-p, min-p. ``greedy`` takes the most likely token (after the biases; the filters
    cannot change it, so they are ignored). PAD is never drawn: it is not a musical event.

    ``release`` counters drones: for every second a note has sounded past
    ``RELEASE_AFTER_S``, its NOTE_OFF gets ``release`` added to its logit (0: the model's
    own distribution). The demo model under-predicts the end of notes it has held a while
    (its card measures how), so without it some notes sound on for many seconds.

    ``tonality`` keeps the music in the key it is in: each NOTE_ON gets ``tonality`` times
    the log of its pitch class's share of the music heard so far (primer and continuation;
    how long each pitch class has sounded, a second `KEY_MEMORY_S` ago weighing 1/e, every
    share counted at least `KEY_FLOOR`), then the NOTE_ONs are shifted together back to
    their total chance, so (at temperature 1, before the filters) it changes which
    pitches are struck, not how often notes are (0: the model's own distribution). The
    demo model follows the primer's key less than the real music does (its card measures
    how). With 1, each pitch's odds among the notes are the model's times its class's share
    (plus the floor).
    """

    temperature: float = 1.0
    top_k: int | None = None
    top_p: float | None = None
    min_p: float | None = None
    greedy: bool = False
    creativity: float = 0.0
    release: float = 0.0
    tonality: float = 0.0

    def __post_init__(self) -> None:
        if not math.isfinite(self.creativity):
            raise ValueError(f"creativity must be a finite number, got {self.creativity}")
        if not (math.isfinite(self.release) and self.release >= 0.0):
            raise ValueError(f"release must be a finite number >= 0, got {self.release}")
        if not (math.isfinite(self.tonality) and self.tonality >= 0.0):
            raise ValueError(f"tonality must be a finite number >= 0, got {self.tonality}")
        if not self.temperature > 0.0 or not math.isfinite(self.temperature):
            raise ValueError(f"temperature must be a positive number, got {self.temperature}")
        if self.top_k is not None and self.top_k < 1:
            raise ValueError(f"top_k must be >= 1, got {self.top_k}")
        if self.top_p is not None and not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.min_p is not None and not 0.0 <= self.min_p <= 1.0:
            raise ValueError(f"min_p must be in [0, 1], got {self.min_p}")


@dataclass
class StepInfo:
    """What one decoding step computed, passed to the ``on_step`` hook.

    ``logits[i]`` are the model's raw next-token logits for ``window[i]`` (with
    ``prefix_mask``, None when no prefix position is PAD): they equal the library's
    forward on that window. ``tokens`` are the tokens chosen; with beam search, new row j
    continues row ``parents[j]``. The tensors are views, valid during the call only.
    """

    step: int
    window: Tensor
    prefix_mask: Tensor | None
    logits: Tensor
    tokens: Tensor
    parents: Tensor | None
    reencoded: bool
    seconds: float  # music generated so far by the longest sample (or beam), in seconds
    cross_attn_seq_len: int  # the prefix length m of ``window``: its first m are the prefix


@dataclass
class GenerationResult:
    """New tokens per sample (END included when it stopped a sample), why each sample
    stopped, the seconds of music each holds, the seed that repeats the run, the beam
    score (sum of log-probabilities) for beam search, and how many full forwards ran."""

    tokens: list[list[int]]
    stop_reasons: list[str]
    seconds: list[float]
    seed: int | None
    scores: list[float] | None
    full_forwards: int


def filter_logits(logits: Tensor, sampling: SamplingConfig) -> Tensor:
    """Logits after temperature, top-k, top-p and min-p; removed tokens get -inf.

    top-p keeps the smallest set of most likely tokens whose probability reaches top_p;
    min-p keeps tokens at least min_p times as likely as the most likely one.
    """
    logits = logits.float() / sampling.temperature
    if sampling.top_k is not None and sampling.top_k < logits.shape[-1]:
        keep = torch.zeros_like(logits, dtype=torch.bool)
        keep.scatter_(-1, logits.topk(sampling.top_k, dim=-1).indices, True)
        logits = logits.masked_fill(~keep, -math.inf)
    if sampling.top_p is not None and sampling.top_p < 1.0:
        ordered, order = logits.sort(dim=-1, descending=True)
        probs = ordered.softmax(dim=-1)
        before = probs.cumsum(dim=-1) - probs  # mass of the more likely tokens
        drop = before >= sampling.top_p
        drop[..., 0] = False
        logits = logits.masked_fill(torch.zeros_like(drop).scatter(-1, order, drop), -math.inf)
    if sampling.min_p is not None and sampling.min_p > 0.0:
        probs = logits.softmax(dim=-1)
        floor = sampling.min_p * probs.max(dim=-1, keepdim=True).values
        logits = logits.masked_fill(probs < floor, -math.inf)
    return logits


def sample_next(logits: Tensor, sampling: SamplingConfig,
                generators: Sequence[torch.Generator]) -> Tensor:
    """One token per row of ``logits`` (batch, vocab); row i draws from ``generators[i]``.

    One generator per row makes sample i of a batch independent of the batch size.
    """
    logits = logits.float().index_fill(1, _pad_index(logits.device), -math.inf)
    if sampling.creativity:
        logits = logits.clone()
        logits[:, NOTE_ON:NOTE_OFF] += sampling.creativity
    if sampling.greedy:
        return logits.argmax(dim=-1)
    probs = filter_logits(logits, sampling).softmax(dim=-1)
    return torch.cat([torch.multinomial(row, 1, generator=gen)
                      for row, gen in zip(probs, generators, strict=True)])


@functools.cache
def _pad_index(device: torch.device) -> Tensor:
    """PAD's index as a tensor on ``device``, made once (not a host copy every step)."""
    return torch.tensor([PAD], device=device)


@torch.inference_mode()
def generate(
    model: PerceiverAR,
    primer: Sequence[int] | Tensor,
    *,
    max_new_tokens: int,
    num_samples: int = 1,
    sampling: SamplingConfig | None = None,
    num_beams: int = 1,
    length_penalty: float = 0.0,
    max_seconds: float | None = None,
    stop_on_end: bool = True,
    stride: int | None = None,
    seed: int | None = None,
    decode_threads: int | None = None,
    precision: str = "float32",
    cross_attn_seq_len: int | None = None,
    cuda_graphs: bool = True,
    on_step: Callable[[StepInfo], object] | None = None,
    progress: Callable[[int], object] | None = None,
    stop: Callable[[], bool] | None = None,
) -> GenerationResult:
    """Continue ``primer`` with up to ``max_new_tokens`` tokens per sample.

    ``num_samples`` samples of the primer decode together as one batch; each sample stops
    on END (if ``stop_on_end``), once its music reaches ``max_seconds`` (TIME_SHIFT ids
    add up), or at ``max_new_tokens``. Sample i draws its randomness from its own
    generator derived from ``seed`` (random and reported when None), so a seed repeats a
    run and sample i does not depend on ``num_samples``.

    ``num_beams > 1`` runs beam search instead (deterministic; ``sampling`` must be left
    unset): it returns the finished beam with the best sum of log-probabilities divided by
    length ** ``length_penalty``.

    On CPU, one-token steps run with ``decode_threads`` torch threads. None (the
    default) chooses by timing the steps (`perceiver_music.threads.ThreadTuner`, full
    forwards following its choice): on a quiet machine every core wins, as the weights
    stream faster with every core (`perceiver_music.model.cpu_linear` lays them out as
    this CPU multiplies fastest), while beside another busy process one thread is several
    times faster. ``precision="int8"``
    (CPU only) decodes with int8 weights: about 1.7x as fast, its next-token distribution
    a KL divergence of about 1e-4 nats from float32's on the demo model (bench/decode.py
    measures both); full forwards stay in the model's dtype.

    ``cross_attn_seq_len`` chooses the prefix length m at generation (default: the
    model's): the window keeps max_seq_len tokens, of which the last max_seq_len - m are
    latents. It changes no weight, and the logits stay exactly the library's forward on
    the reported window with that split (the original scripts used half the primer).

    On a CUDA device, sampling replays each one-token step as a CUDA graph captured once
    per call (`perceiver_music.model.CudaGraphStep`; ``cuda_graphs=False`` launches its
    kernels one by one instead, as beam search always does). The logits are the same
    function either way.

    ``on_step`` receives a `StepInfo` after every step; ``progress`` is called with 1
    after every step (``tqdm.update`` fits). ``stop`` is asked after every step: when it
    returns True the samples end there, with the stop reason "stopped" (beam search
    returns the best sequence so far). The model runs in eval mode and is put back in its
    previous mode afterwards.
    """
    primer_ids = _check_primer(primer)
    m, max_seq_len = prefix_length(model, cross_attn_seq_len), model.max_seq_len
    n = max_seq_len - m
    stride = max(1, n // 2) if stride is None else stride
    if not 1 <= stride <= n:
        raise ValueError(f"stride must be in [1, {n}] (the number of latents), got {stride}")
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    if num_samples < 1:
        raise ValueError(f"num_samples must be >= 1, got {num_samples}")
    if max_seconds is not None and not max_seconds > 0:
        raise ValueError(f"max_seconds must be positive, got {max_seconds}")
    if num_beams < 1:
        raise ValueError(f"num_beams must be >= 1, got {num_beams}")
    if num_beams > 1 and (sampling is not None or num_samples != 1):
        raise ValueError("beam search is deterministic and returns one sequence: "
                         "leave sampling unset and num_samples at 1")

    device = model.token_emb.weight.device
    first = torch.tensor(_primer_window(primer_ids, m, max_seq_len), device=device)
    limits = _Limits(max_new_tokens, max_seconds, stop_on_end, stop)
    was_training = model.training
    model.eval()
    window = None
    try:
        if num_beams > 1:
            window = _Window(model, first[None], max_new_tokens, stride, decode_threads, m,
                             precision, cuda_graphs=False)
            return _beam_search(window, num_beams, length_penalty, limits, on_step, progress)
        if seed is None:
            seed = secrets.randbits(63)
        window = _Window(model, first.expand(num_samples, -1), max_new_tokens, stride,
                         decode_threads, m, precision, cuda_graphs)
        generators = _row_generators(seed, num_samples, device)
        return _sample(window, sampling or SamplingConfig(), generators, seed, limits,
                       on_step, progress, primer_ids)
    finally:
        model.train(was_training)
        if window is not None:
            window.close()


# ---------------------------------------------------------------------------------------
# the window and its caches


class _Window:
    """Token buffer of a batch, the current window in it, and the window's KV cache."""

    def __init__(self, model: PerceiverAR, first: Tensor, capacity: int, stride: int,
                 decode_threads: int | None, prefix_len: int, precision: str,
                 cuda_graphs: bool) -> None:
        batch, length = first.shape
        self.model = model
        self.prefix_len = prefix_len
        self.stride = stride
        on_cpu = first.device.type == "cpu"
        self.decode_threads = decode_threads if on_cpu else None
        self.primer_len = length
        self.buf = first.new_full((batch, length + capacity), PAD)
        self.buf[:, :length] = first
        self.start, self.end = 0, length
        with _intra_op_threads(self.decode_threads):  # the weight layout is timed for it
            self.cache = DecodeCache(model, batch, prefix_len, precision)
        # Captured before the first encode: capture writes warm-up steps into the cache.
        self.graph = (CudaGraphStep(model, self.cache, batch)
                      if cuda_graphs and first.device.type == "cuda" else None)
        self.prefix_mask: Tensor | None = None
        self.reencoded = True
        self.full_forwards = 0
        # None on CPU: the thread count is chosen by timing the steps (busy machines);
        # made last, as nothing after it can fail before `close`
        self.tuner = ThreadTuner() if on_cpu and decode_threads is None else None

    def tokens(self) -> Tensor:
        """The current window (batch, length), a view of the buffer."""
        return self.buf[:, self.start:self.end]

    def generated(self, row: int) -> list[int]:
        """Tokens appended after the primer window, for one row."""
        return self.buf[row, self.primer_len:self.end].tolist()

    def encode(self) -> Tensor:
        """Full forward over the window; rebuilds the caches; next-token logits."""
        window = self.tokens()
        mask = window[:, : self.prefix_len] != PAD
        self.prefix_mask = None if bool(mask.all()) else mask
        self.reencoded = True
        self.full_forwards += 1
        with self.tuner.use() if self.tuner else nullcontext():
            return forward(self.model, window, self.prefix_mask, cache=self.cache)[:, -1].float()

    def append(self, tokens: Tensor) -> Tensor:
        """Add one token per row; logits for the next one (re-encoding if the window is
        full)."""
        self.buf[:, self.end] = tokens
        self.end += 1
        if self.end - self.start > self.model.max_seq_len:
            self.start += self.stride
            return self.encode()
        self.reencoded = False
        position = self.end - 1 - self.start
        if self.graph is not None:
            return self.graph(tokens, position).float()
        with self.tuner.step() if self.tuner else _intra_op_threads(self.decode_threads):
            return decode_step(self.model, tokens, position, self.cache).float()

    def close(self) -> None:
        """Give back the thread count the caller had."""
        if self.tuner is not None:
            self.tuner.close()

    def reorder(self, index: Tensor) -> None:
        """Keep rows ``index`` (beam search)."""
        self.buf = self.buf.index_select(0, index)
        self.cache.reorder(index)
        if self.prefix_mask is not None:
            self.prefix_mask = self.prefix_mask.index_select(0, index)


@contextmanager
def _intra_op_threads(count: int | None) -> Iterator[None]:
    """Run the body with ``count`` torch intra-op threads (None: leave the setting)."""
    if count is None:
        yield
        return
    previous = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def _check_primer(primer: Sequence[int] | Tensor) -> list[int]:
    if isinstance(primer, Tensor) and primer.dim() != 1:
        raise ValueError(f"primer must be one sequence of token ids, got shape "
                         f"{tuple(primer.shape)}")
    ids = primer.tolist() if isinstance(primer, Tensor) else [int(t) for t in primer]
    if not ids:
        raise ValueError("primer is empty: give at least one token")
    bad = [t for t in ids if not 0 <= t < VOCAB_SIZE or t == PAD]
    if bad:
        raise ValueError(f"primer holds {len(bad)} ids that are not events "
                         f"(outside 0..{VOCAB_SIZE - 1} or PAD), e.g. {bad[0]}")
    return ids


def _primer_window(primer: list[int], m: int, max_seq_len: int) -> list[int]:
    """The first window: see the module docstring, point 1."""
    if len(primer) > m:
        return primer[-max_seq_len:]
    latents = min(len(primer), max_seq_len - m)
    return [PAD] * (m - len(primer) + latents) + primer


def _row_generators(seed: int, count: int, device: torch.device) -> list[torch.Generator]:
    """Independent generators, row i's depending only on (seed, i)."""
    children = np.random.SeedSequence(seed).spawn(count)
    return [torch.Generator(device=device).manual_seed(
        int(child.generate_state(1, dtype=np.uint64)[0] >> np.uint64(1)))
        for child in children]


# ---------------------------------------------------------------------------------------
# stopping


def _shift_steps_table(device: torch.device) -> Tensor:
    """10 ms steps each token id adds: k for TIME_SHIFT of k steps, 0 otherwise."""
    table = torch.zeros(VOCAB_SIZE, dtype=torch.long, device=device)
    table[TIME_SHIFT:TIME_SHIFT + MAX_SHIFT_STEPS] = torch.arange(1, MAX_SHIFT_STEPS + 1)
    return table


@dataclass(frozen=True)
class _Limits:
    max_new_tokens: int
    max_seconds: float | None
    stop_on_end: bool
    stop: Callable[[], bool] | None = None

    def reason(self, token: int, steps: int, count: int) -> str | None:
        """Why a sample that just emitted ``token`` stops (None: it goes on). ``steps`` is
        its music in 10 ms steps and ``count`` its number of new tokens."""
        if self.stop_on_end and token == END:
            return STOP_END
        if self.max_seconds is not None and steps >= self.max_seconds * STEPS_PER_SECOND:
            return STOP_SECONDS
        if count >= self.max_new_tokens:
            return STOP_MAX_TOKENS
        return None


class _Sounding:
    """The notes sounding in each sample and when each started (10 ms steps), kept as
    `midi_processor.decode_tokens` pairs them, for `SamplingConfig.release`; and how long
    each pitch class has sounded, the older the less (`KEY_MEMORY_S`), for
    `SamplingConfig.tonality`."""

    def __init__(self, primer: list[int], rows: int) -> None:
        self.now: list[int] = [0]
        self.started: list[dict[int, int]] = [{}]
        self.classes: list[list[int]] = [[0] * 12]  # sounding notes per pitch class
        self.heard: list[list[float]] = [[0.0] * 12]  # seconds, fading, per pitch class
        for token in primer:
            self.add(0, token)
        self.now *= rows
        self.started += [dict(self.started[0]) for _ in range(rows - 1)]
        self.classes += [list(self.classes[0]) for _ in range(rows - 1)]
        self.heard += [list(self.heard[0]) for _ in range(rows - 1)]

    def add(self, row: int, token: int) -> None:
        """Follow ``token`` in sample ``row``."""
        if token < NOTE_OFF:  # a NOTE_ON on a sounding pitch ends it and starts it anew
            if token not in self.started[row]:
                self.classes[row][token % 12] += 1
            self.started[row][token] = self.now[row]
        elif token < TIME_SHIFT:
            if self.started[row].pop(token - NOTE_OFF, None) is not None:
                self.classes[row][(token - NOTE_OFF) % 12] -= 1
        elif token < TIME_SHIFT + MAX_SHIFT_STEPS:
            steps = token - TIME_SHIFT + 1
            self.now[row] += steps
            # each sounding note adds the shift's seconds to its pitch class, faded as
            # they lie back in time: exactly the integral of exp(-age / KEY_MEMORY_S)
            keep = math.exp(-steps / (KEY_MEMORY_S * STEPS_PER_SECOND))
            gain = (1.0 - keep) * KEY_MEMORY_S
            self.heard[row] = [seconds * keep + count * gain
                               for seconds, count in zip(self.heard[row], self.classes[row],
                                                         strict=True)]

    def biased(self, logits: Tensor, release: float, tonality: float) -> Tensor:
        """``logits`` with ``release`` per second past `RELEASE_AFTER_S` added to the
        NOTE_OFF of every note held that long, and the NOTE_ONs tilted by ``tonality``
        towards the pitch classes heard (the same tensor when neither applies)."""
        after = RELEASE_AFTER_S * STEPS_PER_SECOND
        rows, cols, add = [], [], []
        for row, started in enumerate(self.started if release else ()):
            for pitch, start in started.items():
                if self.now[row] - start > after:
                    rows.append(row)
                    cols.append(NOTE_OFF + pitch)
                    add.append(release * (self.now[row] - start - after) / STEPS_PER_SECOND)
        tilt = tonality > 0.0 and any(map(any, self.heard))
        if not add and not tilt:
            return logits
        bias = np.zeros(logits.shape, dtype=np.float32)  # built on the host, sent once
        bias[rows, cols] = add
        if tilt:  # in float64 on the host: a few hundred numbers, cheaper than torch ops
            notes = logits[:, NOTE_ON:NOTE_OFF].float().cpu().numpy().astype(np.float64)
            heard = np.array(self.heard)
            share = heard / np.maximum(heard.sum(axis=1, keepdims=True), 1e-300)
            pull = tonality * np.log(share + KEY_FLOOR)[:, _PITCH_CLASS]
            # the NOTE_ONs keep their total chance: only which pitch is struck changes (a
            # row with no possible NOTE_ON keeps none)
            lse = np.logaddexp.reduce  # log(sum(exp)), exact however large the pull
            with np.errstate(invalid="ignore"):  # -inf - -inf: NaN, made 0
                keep = (lse(notes, axis=1, keepdims=True)
                        - lse(notes + pull, axis=1, keepdims=True))
            bias[:, NOTE_ON:NOTE_OFF] += pull + np.nan_to_num(keep, nan=0.0)
        return logits.float() + torch.from_numpy(bias).to(logits.device, non_blocking=True)


# ---------------------------------------------------------------------------------------
# decoding loops


def _sample(
    window: _Window,
    sampling: SamplingConfig,
    generators: list[torch.Generator],
    seed: int,
    limits: _Limits,
    on_step: Callable[[StepInfo], object] | None,
    progress: Callable[[int], object] | None,
    primer: list[int],
) -> GenerationResult:
    batch = window.buf.shape[0]
    shift = _shift_steps_table(window.buf.device).tolist()
    sounding = _Sounding(primer, batch) if sampling.release or sampling.tonality else None
    outputs: list[list[int]] = [[] for _ in range(batch)]
    steps = [0] * batch
    reasons: list[str | None] = [None] * batch
    finished = torch.zeros(batch, dtype=torch.bool, device=window.buf.device)

    logits = window.encode()
    for step in range(limits.max_new_tokens):
        biased = logits if sounding is None else sounding.biased(logits, sampling.release,
                                                                   sampling.tonality)
        tokens = sample_next(biased, sampling, generators).masked_fill(finished, PAD)
        ended = False
        for row, token in enumerate(tokens.tolist()):
            if reasons[row] is None:
                outputs[row].append(token)
                if sounding is not None:
                    sounding.add(row, token)
                steps[row] += shift[token]
                reasons[row] = limits.reason(token, steps[row], len(outputs[row]))
                ended = ended or reasons[row] is not None
        if on_step is not None:
            on_step(StepInfo(step, window.tokens(), window.prefix_mask, logits, tokens, None,
                             window.reencoded, max(steps) / STEPS_PER_SECOND,
                             window.prefix_len))
        if progress is not None:
            progress(1)
        if limits.stop is not None and limits.stop():
            reasons = [r or STOP_ASKED for r in reasons]
        if all(r is not None for r in reasons):
            break
        if ended:  # a host-to-device copy only on the steps where a row ends
            finished = torch.tensor([r is not None for r in reasons], device=finished.device)
        logits = window.append(tokens)

    return GenerationResult(
        tokens=outputs,
        stop_reasons=[r or STOP_MAX_TOKENS for r in reasons],
        seconds=[s / STEPS_PER_SECOND for s in steps],
        seed=seed,
        scores=None,
        full_forwards=window.full_forwards,
    )


def _beam_search(
    window: _Window,
    num_beams: int,
    length_penalty: float,
    limits: _Limits,
    on_step: Callable[[StepInfo], object] | None,
    progress: Callable[[int], object] | None,
) -> GenerationResult:
    """Keep the ``num_beams`` best live sequences by sum of log-probabilities.

    Each step ranks every continuation of every live beam. A candidate among the
    ``num_beams`` best that ends its sequence (END, seconds, or the token limit) joins the
    finished list; the best other candidates become the live beams. With no length
    penalty the search stops early once a finished sequence beats every live beam, since
    extending a sequence never raises its score.
    """
    device = window.buf.device
    shift = _shift_steps_table(device).tolist()
    scores = [0.0]
    steps = [0]
    finished: list[tuple[float, list[int], str, int]] = []

    logits = window.encode()
    for step in range(limits.max_new_tokens):
        logp = F.log_softmax(logits.index_fill(1, _pad_index(device), -math.inf), dim=-1)
        candidates = torch.tensor(scores, device=device)[:, None] + logp
        top = candidates.flatten().topk(min(2 * num_beams, candidates.numel()))
        parents, tokens, live_scores, live_steps = [], [], [], []
        for rank, (score, flat) in enumerate(zip(top.values.tolist(), top.indices.tolist(),
                                                 strict=True)):
            if score == -math.inf or len(parents) == num_beams:
                break
            parent, token = divmod(flat, VOCAB_SIZE)
            music = steps[parent] + shift[token]
            reason = limits.reason(token, music, step + 1)
            if reason is None:
                parents.append(parent)
                tokens.append(token)
                live_scores.append(score)
                live_steps.append(music)
            elif rank < num_beams:
                finished.append((score, window.generated(parent) + [token], reason, music))

        index = torch.tensor(parents, dtype=torch.long, device=device)
        if on_step is not None:
            music = max(live_steps + [f[3] for f in finished] + [0]) / STEPS_PER_SECOND
            on_step(StepInfo(step, window.tokens(), window.prefix_mask, logits,
                             torch.tensor(tokens, dtype=torch.long, device=device), index,
                             window.reencoded, music, window.prefix_len))
        if progress is not None:
            progress(1)
        if parents and limits.stop is not None and limits.stop():
            finished += [(score, window.generated(parent) + [token], STOP_ASKED, music)
                         for score, parent, token, music in zip(
                             live_scores, parents, tokens, live_steps, strict=True)]
            break
        if not parents:
            break
        if length_penalty == 0.0 and finished and (
                max(f[0] for f in finished) >= max(live_scores)):
            break
        window.reorder(index)
        scores, steps = live_scores, live_steps
        logits = window.append(torch.tensor(tokens, dtype=torch.long, device=device))

    best = max(finished, key=lambda f: f[0] / len(f[1]) ** length_penalty)
    return GenerationResult(
        tokens=[best[1]],
        stop_reasons=[best[2]],
        seconds=[best[3] / STEPS_PER_SECOND],
        seed=None,
        scores=[best[0]],
        full_forwards=window.full_forwards,
    )
