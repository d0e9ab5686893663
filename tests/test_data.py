"""Augmentation and the training-data pipeline: packing, windows, restricted unpickling."""

from __future__ import annotations

import os
import pickle

import numpy as np
import pytest
import torch
from conftest import make_pm
from hypothesis import example, given, settings
from hypothesis import strategies as st

from midi_processor import END, PAD, VOCAB_SIZE, decode_midi, encode_midi
from midi_processor.augment import stretch_time, transpose
from perceiver_music.data import (
    DataError,
    TokenSplit,
    WindowSampler,
    WindowSpec,
    load_split,
    load_token_file,
    validation_windows,
)


def notes(tokens):
    return sorted(
        (round(n.start * 100), round(n.end * 100), n.pitch, n.velocity)
        for n in decode_midi(tokens).instruments[0].notes
    )


@pytest.fixture
def real_tokens(real_files):
    return [np.array(encode_midi(f)) for f in real_files]


@pytest.fixture
def split_dir(tmp_path, real_tokens):
    d = tmp_path / "train"
    d.mkdir()
    for i, t in enumerate(real_tokens):
        with open(d / f"piece{i}.pickle", "wb") as f:
            pickle.dump(t.tolist(), f)
    return d


piece_st = st.lists(
    st.tuples(st.floats(0, 10), st.floats(0.01, 2), st.integers(0, 127), st.integers(1, 127)),
    min_size=1,
    max_size=30,
).map(lambda ns: make_pm([(s, s + d, p, v) for s, d, p, v in ns]))


@settings(max_examples=60, deadline=None)
@given(piece_st, st.integers(-12, 12), st.integers(0, 400), st.integers(1, 400))
def test_transpose_there_and_back_is_identity_on_notes_in_range(pm, k, a, length):
    tokens = np.array(encode_midi(pm))
    window = tokens[a : a + length]  # any slice, possibly mid-note
    back = transpose(transpose(window, k), -k)
    in_range = [n for n in notes(window) if 0 <= n[2] + k <= 127]
    assert notes(back) == in_range
    assert notes(transpose(window, k)) == [(s, e, p + k, v) for s, e, p, v in in_range]


@settings(max_examples=60, deadline=None)
@given(piece_st, st.floats(0.5, 2.0))
@example(make_pm([(6.875, 7.875, 0, 1), (6.890625, 7.390625, 1, 1)]), 0.90625)
def test_time_stretch_rescales_absolute_times_and_stays_decodable(pm, factor):
    tokens = np.array(encode_midi(pm))
    stretched = stretch_time(tokens, factor)
    assert stretched[-1] == END and ((stretched >= 0) & (stretched < VOCAB_SIZE)).all()
    before, after = notes(tokens), notes(stretched)
    assert len(after) <= len(before)  # notes squeezed onto one step may merge
    assert {n[2] for n in after} == {n[2] for n in before}
    if factor == 1.0 or len(after) == len(before):
        # Paired per pitch in time order: onsets squeezed onto one step may reorder notes
        # of different pitches (then ordered by their ends), never notes of one pitch.
        def key(n):
            return n[2], n[0]

        for (s0, _, p0, v0), (s1, _, p1, v1) in zip(sorted(before, key=key),
                                                    sorted(after, key=key), strict=True):
            assert (p0, v0) == (p1, v1) and s1 == int(np.floor(s0 * factor + 0.5))


def test_augmented_windows_decode(real_tokens):
    rng = np.random.default_rng(0)
    for t in real_tokens:
        for _ in range(20):
            a = int(rng.integers(len(t)))
            w = stretch_time(transpose(t[a : a + 300], int(rng.integers(-12, 13))), 1.07)
            decode_midi(w)
            assert ((w >= 0) & (w < VOCAB_SIZE)).all()


def test_load_split_packs_pieces_in_name_order(split_dir, real_tokens):
    split = load_split(split_dir)
    assert split.tokens.dtype == np.uint16
    assert split.names == [f"piece{i}.pickle" for i in range(len(real_tokens))]
    for i, t in enumerate(real_tokens):
        assert (split.piece(i) == t).all()


def test_pieces_from_the_original_scripts_get_an_end_token(tmp_path):
    d = tmp_path / "train"
    d.mkdir()
    with open(d / "old.pickle", "wb") as f:
        pickle.dump([356 + 16, 60, 300, 188], f)
    assert load_split(d).piece(0).tolist() == [372, 60, 300, 188, END]


def test_malicious_or_malformed_pickles_are_refused(tmp_path):
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    bad = tmp_path / "evil.pickle"
    bad.write_bytes(pickle.dumps(Evil()))
    with pytest.raises(DataError, match="refuses global"):
        load_token_file(bad)
    assert not marker.exists()
    arr = tmp_path / "array.pickle"
    arr.write_bytes(pickle.dumps({"tokens": [1, 2]}))
    with pytest.raises(DataError, match="list of ints"):
        load_token_file(arr)
    ids = tmp_path / "ids.pickle"
    for huge in (999, -1, 2**70):  # 2**70 overflowed numpy's int64 with a traceback
        ids.write_bytes(pickle.dumps([1, 2, huge]))
        with pytest.raises(DataError, match="outside"):
            load_token_file(ids)
    link = tmp_path / "moved.pickle"  # a link to a piece that has moved is named as such
    link.symlink_to(tmp_path / "elsewhere" / "piece.pickle")
    with pytest.raises(DataError, match=r"moved\.pickle: a link to .*piece\.pickle, which does "
                       "not exist"):
        load_token_file(link)
    with pytest.raises(DataError, match="no such data folder"):
        load_split(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="no .pickle"):
        load_split(tmp_path / "empty")


def test_training_windows_have_real_latents_and_pad_only_in_the_prefix(split_dir):
    spec = WindowSpec(context=64, prefix=40, prefix_fill_share=0.5, transpose=6, stretch=0.1)
    sampler = WindowSampler(load_split(split_dir), spec, seed=1)
    x, mask = sampler.sample(256)
    assert x.shape == (256, 65) and mask.shape == (256, 40)
    assert not (x[:, 40:] == PAD).any()
    assert torch.equal(mask, x[:, :40] != PAD)
    real_prefix = mask.sum(1)
    assert (real_prefix == 40).any() and (real_prefix < 40).float().mean() > 0.3


def test_window_starts_are_uniform_over_token_positions(split_dir):
    split = load_split(split_dir)
    spec = WindowSpec(context=64, prefix=40, prefix_fill_share=0.0)
    sampler = WindowSampler(split, spec, seed=2)
    draws = [sampler.draw() for _ in range(20000)]
    starts = np.maximum(split.lengths - spec.latents, 0)  # valid starts per piece
    got = np.bincount([i for i, _ in draws], minlength=len(starts))
    assert np.allclose(got / got.sum(), starts / starts.sum(), atol=0.02)
    small = int(np.argmin(split.lengths))
    s = [start for i, start in draws if i == small]
    assert min(s) == -40 and max(s) == split.lengths[small] - 65  # PAD prefix .. ends on END


def test_sampler_state_restores_the_data_position(split_dir):
    sampler = WindowSampler(load_split(split_dir), WindowSpec(64, 40, 0.5, 3, 0.05), seed=3)
    sampler.sample(5)
    state = sampler.state
    a = sampler.sample(7)
    sampler.state = state
    b = sampler.sample(7)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


def test_validation_windows_are_fixed_and_tile_every_piece(split_dir):
    split = load_split(split_dir)
    x1, m1 = validation_windows(split, 64, 40)
    x2, _ = validation_windows(split, 64, 40)
    assert torch.equal(x1, x2)
    assert torch.equal(m1, x1[:, :40] != PAD)
    # every token but each piece's first is a target exactly once: the latents' targets
    # of all windows, PAD (past a piece's end) left out, are the pieces' tokens in order
    targets = x1[:, -24:]
    counted = targets[targets != PAD].tolist()
    expected = [t for i in range(len(split.names)) for t in split.piece(i)[1:].tolist()]
    assert counted == expected
    # PAD only trails: a latent input is PAD only after the piece ended
    latent_inputs = x1[:, 40:-1]
    for row in latent_inputs:
        pads = (row == PAD).nonzero()
        assert not len(pads) or bool((row[int(pads[0]):] == PAD).all())
    sub, _ = validation_windows(split, 64, 40, max_windows=10)
    assert sub.shape[0] == 10


def test_padding_past_a_pieces_end_changes_no_real_targets_logits():
    """The last validation window of a piece reaches past its end (PAD there): attention is
    causal, so the real targets' logits equal those of the window cut at the piece's end."""
    from perceiver_music.config import preset
    from perceiver_music.model import build_model, forward

    torch.manual_seed(0)
    model = build_model(preset("tiny")).eval()
    piece = np.random.default_rng(0).integers(0, PAD, 50)
    split = TokenSplit(tokens=piece.astype(np.uint16), offsets=np.array([0, 50]),
                       names=["p"])
    x, mask = validation_windows(split, 64, 32)
    last = x[-1:]
    real = int((last[0, 32:] != PAD).sum())  # latent inputs inside the piece
    assert 0 < real < 32
    with torch.no_grad():
        padded = forward(model, last[:, :-1], mask[-1:])[:, :real]
        cut = forward(model, last[:, : 32 + real], mask[-1:])
    torch.testing.assert_close(padded, cut, atol=1e-5, rtol=1e-5)
