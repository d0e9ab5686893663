"""Generation engine: exactness against the library at every step, sampling, stopping."""

from __future__ import annotations

import copy
import math

import pytest
import torch

from midi_processor.vocab import END, NOTE_OFF, PAD, TIME_SHIFT, VELOCITY, VOCAB_SIZE
from perceiver_music.config import preset
from perceiver_music.engine import (
    KEY_FLOOR,
    KEY_MEMORY_S,
    STOP_END,
    STOP_MAX_TOKENS,
    STOP_SECONDS,
    SamplingConfig,
    StepInfo,
    _Sounding,
    filter_logits,
    generate,
)
from perceiver_music.model import build_model

TOL = 1e-4


def tiny_model(seed: int = 0, **overrides: object) -> torch.nn.Module:
    torch.manual_seed(seed)
    return build_model(preset("tiny", **overrides)).eval()


def primer_of(length: int, seed: int = 0) -> list[int]:
    return torch.randint(0, PAD, (length,), generator=torch.Generator().manual_seed(seed)).tolist()


def without_pad(logits: torch.Tensor) -> torch.Tensor:
    """Logits as the engine samples from them: PAD is never drawn."""
    return logits.index_fill(-1, torch.tensor([PAD]), -math.inf)


def biased(model: torch.nn.Module, bias: torch.Tensor) -> torch.nn.Module:
    """The model with a bias on its output layer, to make chosen tokens likely."""
    layer = torch.nn.Linear(model.to_logits.in_features, VOCAB_SIZE, bias=True)
    with torch.no_grad():
        layer.weight.copy_(model.to_logits.weight)
        layer.bias.copy_(bias)
    model.to_logits = layer
    return model


# ---------------------------------------------------------------------------------------
# exactness


@pytest.mark.parametrize(
    "overrides, primer_len, stride, prefix_len, shared_min",
    [
        ({}, 10, None, None, None),  # primer shorter than the latents: PAD prefix
        ({}, 100, None, None, None),  # primer longer than the context: its last tokens
        ({"cross_attn_seq_len": 40}, 30, 7, None, None),  # n <= primer <= m: partial PAD
        ({"cross_attn_seq_len": 40}, 50, 24, None, None),  # stride = n: windows of m + 1
        ({}, 30, None, 12, None),  # a prefix length chosen at generation: 12 + 52 latents
        ({}, 100, 5, 56, None),  # ... 56 + 8 latents, past several re-encodes
        # the samples' shared primer positions read once (any run length counts here)
        ({}, 10, None, None, 1),
        ({"cross_attn_seq_len": 40}, 30, 7, None, 1),
        ({}, 100, 5, 56, 1),
    ],
)
def test_every_step_matches_library_on_reported_window(overrides, primer_len, stride,
                                                       prefix_len, shared_min, monkeypatch):
    """The logits equal the library's forward on the reported window, split at the prefix
    length in use (the model's, or one chosen at generation: the library then runs with
    that cross_attn_seq_len, which changes no weight)."""
    import perceiver_music.model as model_module

    shared_calls = [0]
    if shared_min is not None:
        monkeypatch.setattr(model_module, "SHARED_MIN", shared_min)
        real_shared = model_module._shared_prefix_attention

        def counted(*args: object) -> torch.Tensor:
            shared_calls[0] += 1
            return real_shared(*args)

        monkeypatch.setattr(model_module, "_shared_prefix_attention", counted)
    trained = tiny_model(1, **overrides)
    model = copy.copy(trained)  # the reference: the library's forward with that split
    if prefix_len is not None:
        model.cross_attn_seq_len = prefix_len
    m, max_seq_len = model.cross_attn_seq_len, model.max_seq_len
    n = max_seq_len - m
    step_stride = stride or n // 2
    primer = primer_of(primer_len)
    new_tokens = 3 * max_seq_len + 20
    samples = 3
    history = [list(primer) for _ in range(samples)]
    steps: list[StepInfo] = []
    worst = [0.0]

    def check(info: StepInfo) -> None:
        window, mask = info.window, info.prefix_mask
        with torch.no_grad():
            expected = model(window, prefix_mask=mask)[:, -1]
        worst[0] = max(worst[0], (expected - info.logits).abs().max().item())
        real = (
            window != PAD
            if mask is None
            else torch.cat((mask, torch.ones_like(window[:, m:], dtype=torch.bool)), dim=1)
        )
        for row in range(samples):
            tokens_so_far = history[row]
            count = int(real[row].sum())
            # the window's real tokens are the last ones of the sequence so far
            assert window[row][real[row]].tolist() == tokens_so_far[-count:]
            assert count >= min(len(tokens_so_far), max_seq_len - step_stride)
            assert not (window[row, m:] == PAD).any()  # latents hold real tokens only
            history[row].append(int(info.tokens[row]))
        steps.append(info)

    result = generate(
        trained,
        primer,
        max_new_tokens=new_tokens,
        num_samples=samples,
        stride=stride,
        seed=5,
        stop_on_end=False,
        cross_attn_seq_len=prefix_len,
        on_step=check,
    )
    assert worst[0] <= TOL
    assert {s.cross_attn_seq_len for s in steps} == {m}
    assert len(steps) == new_tokens
    assert result.tokens == [h[primer_len:] for h in history]
    assert result.stop_reasons == [STOP_MAX_TOKENS] * samples
    # windows: first one placed by the primer rule, then grow by one, then re-encode
    first = steps[0].window.shape[1]
    assert first == (min(primer_len, max_seq_len) if primer_len > m else m + min(primer_len, n))
    lengths = [s.window.shape[1] for s in steps]
    for before, after, info in zip(lengths, lengths[1:], steps[1:], strict=False):
        if info.reencoded:
            assert before == max_seq_len and after == max_seq_len + 1 - step_stride
        else:
            assert after == before + 1
    assert result.full_forwards == sum(s.reencoded for s in steps) > 3
    assert (shared_calls[0] > 0) == (shared_min is not None)


def test_shared_reads_keep_a_bfloat16_model_in_bfloat16(monkeypatch):
    """A model cast to bfloat16 decodes several samples through the shared reads (whose
    softmax merge runs in float32) as it decodes one."""
    import perceiver_music.model as model_module

    monkeypatch.setattr(model_module, "SHARED_MIN", 1)
    model = tiny_model().to(torch.bfloat16)
    alone = generate(model, primer_of(40), max_new_tokens=30, seed=2, stop_on_end=False)
    batch = generate(model, primer_of(40), max_new_tokens=30, num_samples=2, seed=2,
                     stop_on_end=False)
    assert len(batch.tokens) == 2 and all(len(t) == 30 for t in batch.tokens)
    assert batch.tokens[0][:5] == alone.tokens[0][:5]


def test_shared_positions_are_the_rows_common_run():
    """`DecodeCache.set_shared` counts the leading positions where every row holds the
    same token (and prefix mask), and skips a shared run of PAD alone."""
    from perceiver_music.model import DecodeCache, forward

    model = tiny_model()
    m = model.cross_attn_seq_len
    tokens = torch.tensor([primer_of(model.max_seq_len)] * 3)
    tokens[1, 40] = (tokens[0, 40] + 1) % PAD
    mask = torch.ones(3, m, dtype=torch.bool)
    cache = DecodeCache(model, 3)
    with torch.no_grad():
        forward(model, tokens[:, :50], mask, cache=cache)
        assert cache.shared == (0, 0)  # runs shorter than SHARED_MIN are read per row
        import perceiver_music.model as model_module

        model_module.SHARED_MIN, saved = 1, model_module.SHARED_MIN
        try:
            forward(model, tokens[:, :50], mask, cache=cache)
            assert cache.shared == (40, 40 - m)
            tokens[:, :20] = PAD
            mask[:, :20] = False
            tokens[2, 20] = (tokens[0, 20] + 1) % PAD
            forward(model, tokens[:, :50], mask, cache=cache)
            assert cache.shared == (0, 0)  # the shared run is PAD alone
            single = DecodeCache(model, 1)
            forward(model, tokens[:1, :50], mask[:1], cache=single)
            assert single.shared == (0, 0)  # one row: nothing to share
        finally:
            model_module.SHARED_MIN = saved


def test_first_window_placement():
    model = tiny_model(cross_attn_seq_len=40)  # m = 40, n = 24
    seen = []

    def record(info: StepInfo) -> None:
        seen.append((info.window[0].tolist(), info.prefix_mask))

    for primer_len in (5, 30, 41, 64, 90):
        seen.clear()
        primer = primer_of(primer_len)
        generate(model, primer, max_new_tokens=1, on_step=record)
        window, mask = seen[0]
        real = [t for t in window if t != PAD]
        assert real == primer[-len(real) :]
        if primer_len <= 40:
            assert len(window) == 40 + min(primer_len, 24)
            assert window[-min(primer_len, 24) :] == primer[-min(primer_len, 24) :]
            assert mask is not None and mask[0].tolist() == [t != PAD for t in window[:40]]
        else:
            assert window == primer[-64:] and mask is None


# ---------------------------------------------------------------------------------------
# sampling


def run_steps(model, sampling, steps=40, **kwargs) -> list[StepInfo]:
    infos: list[StepInfo] = []

    def keep(info: StepInfo) -> None:
        infos.append(
            StepInfo(
                info.step,
                info.window.clone(),
                info.prefix_mask,
                info.logits.clone(),
                info.tokens.clone(),
                None,
                info.reencoded,
                info.seconds,
                info.cross_attn_seq_len,
            )
        )

    generate(
        model,
        primer_of(20),
        max_new_tokens=steps,
        sampling=sampling,
        stop_on_end=False,
        on_step=keep,
        **kwargs,
    )
    return infos


def test_greedy_is_argmax_without_pad():
    model = biased(tiny_model(), torch.zeros(VOCAB_SIZE).index_fill(0, torch.tensor([PAD]), 20.0))
    for info in run_steps(model, SamplingConfig(greedy=True), num_samples=2):
        assert (info.logits.argmax(-1) == PAD).all()  # the model prefers PAD,
        assert torch.equal(info.tokens, without_pad(info.logits).argmax(-1))  # never emitted


def test_top_k_stays_within_the_k_best():
    k = 3
    for info in run_steps(
        tiny_model(), SamplingConfig(top_k=k, temperature=2.0), num_samples=3, seed=1
    ):
        best = without_pad(info.logits).topk(k, dim=-1).indices
        assert (best == info.tokens[:, None]).any(dim=-1).all()


def test_top_p_keeps_the_smallest_set_reaching_p():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    kept = lambda p: torch.isfinite(filter_logits(logits, SamplingConfig(top_p=p)))[0].tolist()  # noqa: E731
    assert kept(0.5) == [True, False, False, False]
    assert kept(0.79) == [True, True, False, False]
    assert kept(0.81) == [True, True, True, False]
    assert kept(1.0) == [True] * 4

    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(50, VOCAB_SIZE, generator=gen) * 3
    for p in (0.1, 0.5, 0.9):
        filtered = filter_logits(logits, SamplingConfig(top_p=p))
        probs = logits.softmax(-1)
        for row in range(50):
            keep = torch.isfinite(filtered[row])
            assert probs[row][keep].sum() >= p - 1e-6
            smallest = probs[row][keep].min()
            assert probs[row][keep].sum() - smallest < p  # no smaller set reaches p
            assert probs[row][~keep].max() <= smallest  # it is the most likely tokens

    for info in run_steps(tiny_model(), SamplingConfig(top_p=0.2), seed=2):
        keep = torch.isfinite(filter_logits(without_pad(info.logits), SamplingConfig(top_p=0.2)))
        assert keep.gather(1, info.tokens[:, None]).all()


def test_min_p_keeps_tokens_near_the_best():
    gen = torch.Generator().manual_seed(1)
    logits = torch.randn(20, VOCAB_SIZE, generator=gen) * 3
    filtered = filter_logits(logits, SamplingConfig(min_p=0.2))
    probs = logits.softmax(-1)
    expected = probs >= 0.2 * probs.max(-1, keepdim=True).values
    assert torch.equal(torch.isfinite(filtered), expected)
    for info in run_steps(tiny_model(), SamplingConfig(min_p=0.5, temperature=3.0), seed=3):
        p = (without_pad(info.logits) / 3.0).softmax(-1)
        chosen = p.gather(1, info.tokens[:, None])[:, 0]
        assert (chosen >= 0.5 * p.max(-1).values).all()


def test_temperature_and_composition():
    gen = torch.Generator().manual_seed(2)
    logits = torch.randn(4, VOCAB_SIZE, generator=gen)
    hot = filter_logits(logits, SamplingConfig(temperature=2.0))
    assert torch.allclose(hot.softmax(-1), (logits / 2.0).softmax(-1))
    both = filter_logits(logits, SamplingConfig(top_k=50, top_p=0.5, min_p=0.1))
    alone = [
        filter_logits(logits, SamplingConfig(top_k=50)),
        filter_logits(logits, SamplingConfig(min_p=0.1)),
    ]
    for other in alone:
        assert not (torch.isfinite(both) & ~torch.isfinite(other)).any()
    # a very low temperature samples the most likely token
    model = tiny_model()
    cold = run_steps(model, SamplingConfig(temperature=1e-4), seed=4)
    greedy = run_steps(model, SamplingConfig(greedy=True))
    assert [i.tokens.tolist() for i in cold] == [i.tokens.tolist() for i in greedy]


def test_sampling_config_validation():
    for bad in (
        {"temperature": 0.0},
        {"top_k": 0},
        {"top_p": 0.0},
        {"top_p": 1.5},
        {"min_p": -0.1},
        {"release": -0.5},
        {"release": math.inf},
        {"tonality": -1.0},
        {"tonality": math.nan},
    ):
        with pytest.raises(ValueError):
            SamplingConfig(**bad)


# ---------------------------------------------------------------------------------------
# seeds and batches


def test_seed_repeats_and_differs():
    model = tiny_model()
    def run(seed):
        return generate(
            model,
            primer_of(20),
            max_new_tokens=30,
            num_samples=2,
            seed=seed,
            stop_on_end=False,
        )
    first, again, other = run(11), run(11), run(12)
    assert first.tokens == again.tokens and first.seed == 11
    assert first.tokens != other.tokens
    assert first.tokens[0] != first.tokens[1]  # samples of a batch differ
    unseeded = run(None)
    assert isinstance(unseeded.seed, int) and run(unseeded.seed).tokens == unseeded.tokens


def test_batch_rows_equal_the_same_run_alone():
    model = tiny_model()
    primer = primer_of(25)
    batch = generate(model, primer, max_new_tokens=80, num_samples=3, seed=9, stop_on_end=False)
    alone = generate(model, primer, max_new_tokens=80, num_samples=1, seed=9, stop_on_end=False)
    assert batch.tokens[0] == alone.tokens[0]  # row 0's generator is the same alone
    greedy = SamplingConfig(greedy=True)
    rows = generate(
        model, primer, max_new_tokens=80, num_samples=3, sampling=greedy, stop_on_end=False
    )
    single = generate(model, primer, max_new_tokens=80, sampling=greedy, stop_on_end=False)
    assert rows.tokens == single.tokens * 3


# ---------------------------------------------------------------------------------------
# stopping


def test_stop_on_end_per_sample():
    bias = torch.zeros(VOCAB_SIZE)
    bias[END] = 5.5  # END is likely but not certain: samples end at different steps
    model = biased(tiny_model(), bias)
    tokens_seen = []
    result = generate(
        model,
        primer_of(10),
        max_new_tokens=60,
        num_samples=6,
        seed=3,
        on_step=lambda info: tokens_seen.append(info.tokens.tolist()),
    )
    lengths = [len(t) for t in result.tokens]
    assert len(set(lengths)) > 1
    for row, tokens in enumerate(result.tokens):
        if result.stop_reasons[row] == STOP_END:
            assert tokens[-1] == END and END not in tokens[:-1]
            # a finished sample is padded while the others go on
            assert all(step[row] == PAD for step in tokens_seen[len(tokens) :])
        else:
            assert END not in tokens and len(tokens) == 60
    assert STOP_END in result.stop_reasons
    assert len(tokens_seen) == max(lengths)


def test_end_is_an_ordinary_token_without_stop_on_end():
    bias = torch.zeros(VOCAB_SIZE)
    bias[END] = 8.0
    model = biased(tiny_model(), bias)
    result = generate(model, primer_of(10), max_new_tokens=12, stop_on_end=False, seed=0)
    assert len(result.tokens[0]) == 12 and result.tokens[0].count(END) > 1
    assert result.stop_reasons == [STOP_MAX_TOKENS]


def test_stop_on_seconds_counts_time_shifts():
    bias = torch.zeros(VOCAB_SIZE)
    bias[TIME_SHIFT + 99] = 4.0  # 1 s shifts likely
    bias[TIME_SHIFT + 49] = 4.0  # 0.5 s shifts likely
    model = biased(tiny_model(), bias)
    result = generate(
        model,
        primer_of(10),
        max_new_tokens=200,
        num_samples=4,
        max_seconds=3.2,
        seed=1,
        stop_on_end=False,
    )
    for tokens, seconds, reason in zip(
        result.tokens, result.seconds, result.stop_reasons, strict=True
    ):
        steps = [t - TIME_SHIFT + 1 for t in tokens if TIME_SHIFT <= t < TIME_SHIFT + 100]
        assert seconds == pytest.approx(sum(steps) / 100)
        assert reason == STOP_SECONDS
        assert seconds >= 3.2 and seconds - steps[-1] / 100 < 3.2  # stopped at the crossing
        assert TIME_SHIFT <= tokens[-1] < TIME_SHIFT + 100


def test_stop_on_token_count_and_progress():
    calls = []
    result = generate(
        tiny_model(),
        primer_of(10),
        max_new_tokens=7,
        num_samples=2,
        stop_on_end=False,
        progress=calls.append,
    )
    assert [len(t) for t in result.tokens] == [7, 7] and calls == [1] * 7


def test_step_info_reports_the_music_generated_so_far():
    for kwargs in ({"num_samples": 3, "seed": 5}, {"num_beams": 3}):
        infos: list[StepInfo] = []
        result = generate(tiny_model(), primer_of(10), max_new_tokens=30, stop_on_end=False,
                          on_step=infos.append, **kwargs)
        assert infos[-1].seconds >= max(result.seconds) > 0


def test_argument_errors_and_state_restored():
    model = tiny_model().train()
    threads = torch.get_num_threads()
    for kwargs, message in [
        ({"primer": []}, "empty"),
        ({"primer": [1, PAD, 2]}, "PAD"),
        ({"primer": [VOCAB_SIZE]}, "not events"),
        ({"stride": 0}, "stride"),
        ({"stride": 33}, "stride"),
        ({"max_new_tokens": 0}, "max_new_tokens"),
        ({"num_beams": 2, "sampling": SamplingConfig()}, "beam search"),
        ({"num_beams": 2, "num_samples": 2}, "beam search"),
    ]:
        args = {"primer": [1, 2, 3], "max_new_tokens": 3, **kwargs}
        with pytest.raises(ValueError, match=message):
            generate(model, **args)
    generate(model, [1, 2, 3], max_new_tokens=3, num_samples=2, decode_threads=1)
    assert model.training and torch.get_num_threads() == threads


# ---------------------------------------------------------------------------------------
# beam search


def sequence_log_prob(model, primer: list[int], tokens: list[int]) -> float:
    """Sum of log-probabilities of ``tokens`` after a primer shorter than the latents (PAD
    excluded), by the library's forward on the growing window PAD * m + primer + tokens."""
    m = model.cross_attn_seq_len
    total = 0.0
    for i, token in enumerate(tokens):
        window = torch.tensor([[PAD] * m + primer + tokens[:i]])
        with torch.no_grad():
            logits = model(window, prefix_mask=window[:, :m] != PAD)[0, -1]
        logits[PAD] = -math.inf
        total += logits.log_softmax(-1)[token].item()
    return total


@pytest.mark.parametrize("end_bias", [-20.0, 3.0])
def test_beam_search_finds_the_best_sequence_by_brute_force(end_bias):
    bias = torch.zeros(VOCAB_SIZE)
    bias[END] = end_bias  # -20: the best is two tokens; 3: [END] alone competes
    model = biased(tiny_model(2), bias)
    primer = primer_of(10)
    m = model.cross_attn_seq_len
    window = torch.tensor([[PAD] * m + primer])
    with torch.no_grad():
        first = model(window, prefix_mask=window[:, :m] != PAD)[0, -1]
        first[PAD] = -math.inf
        first = first.log_softmax(-1)
        firsts = torch.tensor([t for t in range(VOCAB_SIZE) if t not in (PAD, END)])
        windows = torch.cat((window.expand(len(firsts), -1), firsts[:, None]), dim=1)
        second = model(windows, prefix_mask=windows[:, :m] != PAD)[:, -1]
        second[:, PAD] = -math.inf
        second = first[firsts][:, None] + second.log_softmax(-1)
    best_pair = second.argmax().item()
    candidates = {
        (END,): first[END].item(),
        (firsts[best_pair // VOCAB_SIZE].item(), best_pair % VOCAB_SIZE): second.max().item(),
    }
    best = max(candidates, key=candidates.get)
    assert len(best) == (2 if end_bias < 0 else len(best))

    result = generate(model, primer, max_new_tokens=2, num_beams=VOCAB_SIZE)
    assert tuple(result.tokens[0]) == best
    assert result.scores[0] == pytest.approx(candidates[best], abs=1e-4)
    assert result.stop_reasons == [STOP_END if best == (END,) else STOP_MAX_TOKENS]


def test_beam_search_score_is_the_sequence_log_prob():
    model = tiny_model(3)
    primer = primer_of(12)
    result = generate(model, primer, max_new_tokens=20, num_beams=4, stop_on_end=False)
    tokens = result.tokens[0]
    assert len(tokens) == 20 and result.stop_reasons == [STOP_MAX_TOKENS]
    assert result.scores[0] == pytest.approx(sequence_log_prob(model, primer, tokens), abs=1e-3)


def test_beam_search_steps_match_library_across_reorders_and_reencodes():
    model = tiny_model(4)
    previous: list[StepInfo] = []
    worst = [0.0]

    def check(info: StepInfo) -> None:
        with torch.no_grad():
            expected = model(info.window, prefix_mask=info.prefix_mask)[:, -1]
        worst[0] = max(worst[0], (expected - info.logits).abs().max().item())
        if previous and not info.reencoded:
            before = previous[-1]
            assert torch.equal(info.window[:, :-1], before.window[before.parents])
            assert torch.equal(info.window[:, -1], before.tokens)
        previous.append(
            StepInfo(
                info.step,
                info.window.clone(),
                info.prefix_mask,
                info.logits,
                info.tokens.clone(),
                info.parents.clone(),
                info.reencoded,
                info.seconds,
                info.cross_attn_seq_len,
            )
        )

    result = generate(
        model,
        primer_of(12),
        max_new_tokens=60,
        num_beams=3,
        stop_on_end=False,
        stride=8,
        on_step=check,
    )
    assert worst[0] <= TOL
    assert len(result.tokens[0]) == 60 and result.full_forwards > 3


def test_creativity_makes_notes_likelier_than_rests():
    model = tiny_model(5)
    for info in run_steps(model, SamplingConfig(greedy=True, creativity=1.5), steps=20):
        biased_logits = without_pad(info.logits).clone()
        biased_logits[:, :128] += 1.5  # every NOTE_ON, nothing else
        assert torch.equal(info.tokens, biased_logits.argmax(-1))

    def note_share(creativity: float) -> float:
        steps = run_steps(model, SamplingConfig(creativity=creativity), steps=60, seed=9,
                          num_samples=4)
        tokens = torch.cat([i.tokens for i in steps])
        return float((tokens < 128).float().mean())

    low, none, high = note_share(-3.0), note_share(0.0), note_share(3.0)
    assert low < none < high and high > 0.5
    with pytest.raises(ValueError, match="creativity"):
        SamplingConfig(creativity=math.inf)


def test_release_ends_notes_held_past_a_second():
    """Each step, every note sounding for over 1 s (as decode_tokens pairs them: a
    re-struck note starts anew, a NOTE_OFF ends it) gets ``release`` per second past 1 s
    on its NOTE_OFF logit, and nothing else changes."""
    second = TIME_SHIFT + 99
    primer = [VELOCITY + 16, 60, 64, 72, second, second, NOTE_OFF + 64, 67, 72, TIME_SHIFT + 49]
    # 60: held 2.5 s; 64: ended; 67 and 72 (struck again): 0.5 s

    def expected_bias(tokens: list[int]) -> torch.Tensor:
        now, started = 0, {}
        for t in tokens:
            if t < NOTE_OFF:
                started[t] = now
            elif t < TIME_SHIFT:
                started.pop(t - NOTE_OFF, None)
            elif t < VELOCITY:
                now += t - TIME_SHIFT + 1
        bias = torch.zeros(VOCAB_SIZE)
        for pitch, start in started.items():
            bias[NOTE_OFF + pitch] = 0.7 * max(0, now - start - 100) / 100
        return bias

    assert expected_bias(primer).nonzero().flatten().tolist() == [NOTE_OFF + 60]
    # a model that would rest for ever, holding its notes: a drone
    model = biased(tiny_model(3), torch.zeros(VOCAB_SIZE).index_fill(
        0, torch.tensor([second]), 4.0))
    alone = generate(model, primer, max_new_tokens=40, sampling=SamplingConfig(greedy=True),
                     stop_on_end=False).tokens[0]
    assert alone == [second] * 40
    made: list[int] = []

    def check(info: StepInfo) -> None:
        want = int((without_pad(info.logits[0]) + expected_bias(primer + made)).argmax())
        assert int(info.tokens[0]) == want
        made.append(want)

    generate(model, primer, max_new_tokens=40, sampling=SamplingConfig(greedy=True,
             release=0.7), stop_on_end=False, on_step=check)
    ends = [t - NOTE_OFF for t in made if NOTE_OFF <= t < TIME_SHIFT]
    assert ends[0] == 60 and sorted(ends) == [60, 67, 72] and made.count(second) == 37
    first = generate(model, primer, max_new_tokens=1, sampling=SamplingConfig(
        greedy=True, release=50.0)).tokens[0]
    assert first == [NOTE_OFF + 60]  # 75 nats: the note held 2.5 s ends at once


def test_tonality_tilts_the_notes_towards_the_pitch_classes_heard():
    """Each step, every NOTE_ON gets ``tonality`` times the log of its pitch class's share
    of the music heard (how long each pitch class has sounded, a second KEY_MEMORY_S ago
    weighing 1/e; every share counted at least KEY_FLOOR); then the NOTE_ONs are shifted
    together back to their total chance: which pitch is struck changes, not how often."""
    second = TIME_SHIFT + 99
    primer = [VELOCITY + 16, NOTE_OFF + 61, 60, second, second, 67, 60, second,
              NOTE_OFF + 60, TIME_SHIFT + 49]  # C sounds 3 s (struck again at 2 s), ending
    # 0.5 s ago; G 1.5 s; the NOTE_OFF of a C# that never sounded changes nothing
    memory = KEY_MEMORY_S * 100  # in 10 ms steps

    def expected(raw: torch.Tensor, tokens: list[int], tonality: float) -> torch.Tensor:
        now, started, spans = 0, {}, []
        for t in tokens:
            if t < NOTE_OFF:
                started.setdefault(t, now)  # struck again: it sounds on
            elif t < TIME_SHIFT and t - NOTE_OFF in started:
                spans.append((t - NOTE_OFF, started.pop(t - NOTE_OFF), now))
            elif TIME_SHIFT <= t < VELOCITY:
                now += t - TIME_SHIFT + 1
        spans += [(pitch, start, now) for pitch, start in started.items()]
        heard = torch.zeros(12, dtype=torch.float64)
        for pitch, start, end in spans:
            heard[pitch % 12] += math.exp((end - now) / memory) - math.exp((start - now) / memory)
        tilt = tonality * torch.log(heard / heard.sum() + KEY_FLOOR)
        out = raw.double()
        notes = out[:NOTE_OFF] + tilt.repeat(11)[:NOTE_OFF]
        out[:NOTE_OFF] = notes + out[:NOTE_OFF].logsumexp(0) - notes.logsumexp(0)
        return out

    raw = torch.randn(2, VOCAB_SIZE, generator=torch.Generator().manual_seed(0))
    sounding = _Sounding(primer, 2)
    tilted = sounding.biased(raw, 0.0, 1.5)
    for row in range(2):
        assert torch.allclose(tilted[row].double(), expected(raw[row], primer, 1.5), atol=1e-5)
    sounding.add(1, 61)  # the samples part: each follows its own notes
    for row in range(2):
        sounding.add(row, second)
    apart = sounding.biased(raw, 0.0, 1.5)
    assert torch.allclose(apart[0].double(), expected(raw[0], primer + [second], 1.5),
                          atol=1e-5)
    assert torch.allclose(apart[1].double(), expected(raw[1], primer + [61, second], 1.5),
                          atol=1e-5)
    notes = slice(0, NOTE_OFF)  # the NOTE_ONs keep their total chance; nothing else moves
    assert torch.allclose(tilted[:, notes].logsumexp(-1), raw[:, notes].logsumexp(-1))
    assert torch.equal(tilted[:, NOTE_OFF:], raw[:, NOTE_OFF:])
    assert tilted[0, 72] - raw[0, 72] > tilted[0, 67] - raw[0, 67] > tilted[0, 61] - raw[0, 61]
    assert _Sounding(primer, 2).biased(raw, 0.0, 0.0) is raw  # off: the same logits
    assert _Sounding([VELOCITY + 16, second], 2).biased(raw, 0.0, 1.5) is raw  # nothing heard
    scratch = _Sounding([VELOCITY + 16], 2)  # from scratch: only sample 1 has played yet
    scratch.add(1, 60)
    scratch.add(1, second)
    one = scratch.biased(raw, 0.0, 1.5)
    assert torch.equal(one[0], raw[0])
    assert torch.allclose(one[1].double(), expected(raw[1], [60, second], 1.5), atol=1e-5)
    strong = _Sounding(primer, 2).biased(raw, 0.0, 1000.0)  # any strength stays exact
    assert torch.isfinite(strong).all()
    assert torch.allclose(strong[:, notes].logsumexp(-1), raw[:, notes].logsumexp(-1))
    assert strong[:, notes].argmax(-1).remainder(12).tolist() == [0, 0]  # the C's
    no_notes = raw.clone()
    no_notes[0, notes] = -math.inf  # a row that can strike no note keeps none, and no NaN
    cut = _Sounding(primer, 2).biased(no_notes, 0.0, 1.5)
    assert not cut.isnan().any() and (cut[0, notes] == -math.inf).all()

    # a model that strikes C# (61) again and again, through generate()
    model = biased(tiny_model(3), torch.zeros(VOCAB_SIZE).index_fill(
        0, torch.tensor([61]), 6.0).index_fill(0, torch.tensor([second]), 5.0))
    alone = generate(model, primer, max_new_tokens=10, sampling=SamplingConfig(greedy=True),
                     stop_on_end=False).tokens[0]
    assert alone[0] == 61
    made: list[int] = []

    def check(info: StepInfo) -> None:
        want = int(expected(without_pad(info.logits[0]), primer + made, 2.0).argmax())
        assert int(info.tokens[0]) == want
        made.append(want)

    generate(model, primer, max_new_tokens=30, sampling=SamplingConfig(greedy=True,
             tonality=2.0), stop_on_end=False, on_step=check)
    assert made[0] % 12 in (0, 7) and made != alone[:30]


def test_prefix_length_at_generation_is_checked():
    model = tiny_model()
    for bad in (0, 64, -1):
        with pytest.raises(ValueError, match="cross_attn_seq_len"):
            generate(model, [1, 2, 3], max_new_tokens=2, cross_attn_seq_len=bad)


# ---------------------------------------------------------------------------------------
# CPU weight layouts and int8 decoding


@pytest.mark.parametrize("onednn", [True, False])
def test_cpu_linear_layouts_equal_the_layer(onednn, monkeypatch):
    """Every CPU layout computes ``layer(x)`` (and GELU of it), for one row or several."""
    import perceiver_music.model as model_module

    monkeypatch.setattr(model_module, "_packed_layout_wins", lambda dtype, batch: onednn)
    if onednn and not model_module._onednn_works(torch.float32):
        pytest.skip("this torch build has no oneDNN")
    torch.manual_seed(0)
    layer = torch.nn.Linear(48, 40)
    with torch.no_grad():
        for packed_for, rows in ((1, 1), (3, 3), (1, 3)):  # beam search may change rows
            x = torch.randn(rows, 48)
            kernel = model_module.cpu_linear(layer, batch=packed_for)
            torch.testing.assert_close(kernel(x), layer(x), atol=1e-5, rtol=1e-5)
            kernel = model_module.cpu_linear(layer, batch=packed_for, gelu=True)
            torch.testing.assert_close(kernel(x), torch.nn.functional.gelu(layer(x)),
                                       atol=1e-5, rtol=1e-5)


def test_int8_weights_stay_close_to_float32():
    """int8 stores round(W / s) with one scale per output: a product's error is a small
    fraction of its size, and a decode step's distribution barely moves."""
    import perceiver_music.model as model_module

    torch.manual_seed(0)
    layer = torch.nn.Linear(64, 96, bias=False)
    kernel = model_module.cpu_linear(layer, batch=1, precision="int8")
    x = torch.randn(2, 64)
    with torch.no_grad():
        ref = layer(x)
        assert 0 < (kernel(x) - ref).abs().max() < 0.02 * ref.abs().max()

    model = tiny_model()
    tokens = torch.tensor(primer_of(model.max_seq_len))
    m = model.cross_attn_seq_len
    logits = {}
    with torch.no_grad():
        for precision in model_module.PRECISIONS:
            cache = model_module.DecodeCache(model, 1, precision=precision)
            model_module.forward(model, tokens[None, : m + 1], cache=cache)
            logits[precision] = torch.cat([
                model_module.decode_step(model, tokens[p : p + 1], p, cache)
                for p in range(m + 1, model.max_seq_len)])
    p32, p8 = logits["float32"].log_softmax(-1), logits["int8"].log_softmax(-1)
    kl = (p32.exp() * (p32 - p8)).sum(-1)
    assert 0 < kl.max() < 1e-3  # int8 differs, but little
    assert not torch.equal(logits["float32"], logits["int8"])


def test_int8_generation_and_its_limits():
    model = tiny_model()
    result = generate(model, primer_of(20), max_new_tokens=12, precision="int8", seed=3,
                      stop_on_end=False)
    assert len(result.tokens[0]) == 12
    with pytest.raises(ValueError, match="precision must be one of"):
        generate(model, primer_of(20), max_new_tokens=2, precision="bfloat16")
    with pytest.raises(ValueError, match="int8 decoding is a CPU mode"):
        from perceiver_music.model import DecodeCache

        DecodeCache(tiny_model().to("meta"), 1, precision="int8")


def test_rotation_matrix_equals_the_rotary_embedding():
    from perceiver_music.model import _rotary, _rotate, _rotation_matrix

    model = tiny_model()
    dim_head = model.perceive_layers[0][0].to_out.in_features // model.perceive_layers[0][0].heads
    t = torch.randn(2, 3, 1, dim_head)
    for position in (0, 5, 63):
        cos, sin = _rotary(model, torch.tensor([position]))
        torch.testing.assert_close(t @ _rotation_matrix(cos[0], sin[0], dim_head),
                                   _rotate(t, cos, sin), atol=1e-6, rtol=1e-6)


# ---------------------------------------------------------------------------------------
# static steps (CUDA graphs)

CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def static_run(model, tokens, prefix_mask, step):
    """Logits of ``step`` over every latent position after the first, from one cache."""
    from perceiver_music.model import DecodeCache, forward

    m = model.cross_attn_seq_len
    cache = DecodeCache(model, tokens.shape[0])
    forward(model, tokens[:, : m + 1], prefix_mask, cache=cache)
    return torch.stack([step(model, tokens[:, p], torch.tensor(p, device=tokens.device), cache)
                        for p in range(m + 1, model.max_seq_len)], dim=1)


def test_static_step_equals_the_library_forward():
    """A tensor position (fixed shapes, attention over the whole cache, masked) gives the
    library's logits, with a PAD prefix in one row, at every position of the window."""
    from perceiver_music.model import decode_step

    model = tiny_model()
    m = model.cross_attn_seq_len
    tokens = torch.tensor([primer_of(model.max_seq_len, seed) for seed in (1, 2)])
    prefix_mask = torch.ones(2, m, dtype=torch.bool)
    prefix_mask[0, :7] = False
    with torch.no_grad():
        reference = model(tokens, prefix_mask=prefix_mask)[:, 1:]
        logits = static_run(model, tokens, prefix_mask, decode_step)
    torch.testing.assert_close(logits, reference, atol=TOL, rtol=TOL)


def test_static_step_traces_as_one_graph():
    """torch.compile with fullgraph=True refuses graph breaks: the static step has no
    data-dependent shape and no host read of the position, which CUDA graph capture needs.
    (The eager backend traces without compiling kernels, so this runs anywhere.)"""
    from perceiver_music.model import decode_step

    torch._dynamo.reset()
    model = tiny_model()
    tokens = torch.tensor([primer_of(model.max_seq_len)])
    traced = torch.compile(decode_step, fullgraph=True, backend="eager", dynamic=False)
    with torch.no_grad():
        logits = static_run(model, tokens, None, traced)
        reference = model(tokens)[:, 1:]
    torch.testing.assert_close(logits, reference, atol=TOL, rtol=TOL)
    torch._dynamo.reset()


@CUDA
def test_cuda_graph_step_equals_eager_steps():
    from perceiver_music.model import CudaGraphStep, DecodeCache, decode_step, forward

    model = tiny_model().cuda()
    m = model.cross_attn_seq_len
    tokens = torch.tensor([primer_of(model.max_seq_len, seed) for seed in (1, 2)]).cuda()
    prefix_mask = torch.ones(2, m, dtype=torch.bool, device="cuda")
    prefix_mask[1, :9] = False
    with torch.no_grad():
        eager = DecodeCache(model, 2)
        graphed = DecodeCache(model, 2)
        step = CudaGraphStep(model, graphed, 2)
        forward(model, tokens[:, : m + 1], prefix_mask, cache=eager)
        forward(model, tokens[:, : m + 1], prefix_mask, cache=graphed)
        for p in range(m + 1, model.max_seq_len):
            torch.testing.assert_close(step(tokens[:, p], p),
                                       decode_step(model, tokens[:, p], p, eager),
                                       atol=TOL, rtol=TOL)


@CUDA
def test_generation_with_and_without_cuda_graphs_agrees():
    """Across re-encodes (stride 8) greedy decoding picks the same tokens either way."""
    model = tiny_model().cuda()
    runs = [generate(model, primer_of(50), max_new_tokens=80, sampling=SamplingConfig(
        greedy=True), stride=8, stop_on_end=False, cuda_graphs=graphs) for graphs in (True, False)]
    assert runs[0].tokens == runs[1].tokens
    assert runs[0].full_forwards == runs[1].full_forwards > 1


def test_graph_capture_is_on_the_caches_device_one_at_a_time(monkeypatch):
    """What a CPU can show of `CudaGraphStep`: the CUDA calls it makes (faked here, as no
    CUDA exists) happen inside the cache's device context, the capture on a stream of its
    own in thread-local mode while the process-wide capture lock is held, and a replay
    inside the device context too. The step it captures is the real static step."""
    from contextlib import contextmanager

    import perceiver_music.model as model_module
    from perceiver_music.model import CudaGraphStep, DecodeCache

    events: list[tuple] = []
    depth = [0]

    class Stream:
        def __init__(self, device=None) -> None:
            events.append(("stream", depth[0]))

        def wait_stream(self, other) -> None:
            pass

    @contextmanager
    def device(dev):
        events.append(("device", str(dev)))
        depth[0] += 1
        yield
        depth[0] -= 1

    @contextmanager
    def on_stream(stream):
        yield

    class Graph:
        def replay(self) -> None:
            events.append(("replay", depth[0]))

    @contextmanager
    def graph(g, stream=None, capture_error_mode="global"):
        events.append(("capture", depth[0], isinstance(stream, Stream), capture_error_mode,
                       model_module._CAPTURE_LOCK.locked()))
        yield

    for name, fake in {"Stream": Stream, "device": device, "stream": on_stream,
                       "current_stream": lambda dev=None: Stream(), "CUDAGraph": Graph,
                       "graph": graph}.items():
        monkeypatch.setattr(torch.cuda, name, fake)
    model = tiny_model()
    cache = DecodeCache(model, 1)
    step = CudaGraphStep(model, cache, 1)
    assert events[0] == ("device", "cpu")
    assert ("capture", 1, True, "thread_local", True) in events
    assert all(e[1] == 1 for e in events if e[0] == "stream")
    step(torch.tensor([5]), model.cross_attn_seq_len + 1)
    assert events[-2:] == [("device", "cpu"), ("replay", 1)]
    assert not model_module._CAPTURE_LOCK.locked()
