"""The bundled demo model: its checkpoint, its loss, and the Quickstart command."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import zygote

from midi_processor import encode_midi
from perceiver_music.checkpoint import load_checkpoint
from perceiver_music.config import preset
from perceiver_music.data import TokenSplit, validation_windows
from perceiver_music.model import window_losses

ROOT = Path(__file__).resolve().parent.parent
DEMO = ROOT / "ckpt" / "demo"
PRIMER = ROOT / "samples" / "primers" / "mz_570_3_opening.mid"
EXAMPLES = ROOT / "samples" / "examples"


def test_shipped_checkpoint_describes_itself():
    model, cfg, meta = load_checkpoint(DEMO)
    shape = ("dim", "depth", "heads", "dim_head", "max_seq_len", "cross_attn_seq_len")
    demo = preset("demo")
    assert all(getattr(cfg, k) == getattr(demo, k) for k in shape)
    assert meta["step"] > 0 and meta["val_loss"] > 0
    assert (DEMO / "model.safetensors").stat().st_size <= 25 * 2**20
    card = (DEMO / "README.md").read_text()
    assert "CC BY-SA 3.0 DE" in card and "Bernd Krueger" in card  # piano-midi.de
    assert "CC BY-NC-SA 4.0" in card  # ASAP: the weights carry its licence


def test_loss_on_the_bundled_primer_is_below_its_unigram_entropy():
    model, cfg, _ = load_checkpoint(DEMO)
    tokens = np.array(encode_midi(PRIMER))
    split = TokenSplit(tokens.astype(np.uint16), np.array([0, len(tokens)]), ["primer"])
    total, count = window_losses(
        model, *validation_windows(split, cfg.max_seq_len, cfg.cross_attn_seq_len)
    )
    loss = total / count
    p = np.bincount(tokens) / len(tokens)
    entropy = float(-(p[p > 0] * np.log(p[p > 0])).sum())
    assert loss < entropy - 0.5, (loss, entropy)


def test_quickstart_generate_runs_end_to_end(tmp_path):
    """The Quickstart's command, from another folder: MIDI, audio and a piano roll, and the
    same continuation as the bundled example with the same seed."""
    r = zygote.run([sys.executable, str(ROOT / "generate.py"), "--out_dir", str(tmp_path),
                        "--name", "quickstart", "--seed", "0"],
                       cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr
    run = tmp_path / "quickstart"
    report = json.loads((run / "generation.json").read_text())
    sample = report["samples"][0]
    assert sample["notes"] > 20
    assert sample["seconds"] >= 19.9 or sample["stop_reason"] == "end"
    assert {p.name for p in run.iterdir()} == {
        "primer.mid", "continuation.mid", "full.mid", "audio.wav", "pianoroll.png",
        "generation.json"}
    example = json.loads((EXAMPLES / "mozart_k570_seed0" / "generation.json").read_text())
    assert sample["token_ids"] == example["samples"][0]["token_ids"]
