"""evaluate.py through its CLI on tiny checkpoints and real pieces, and its figures."""

from __future__ import annotations

import json
import math
import pickle
import sys
from pathlib import Path

import numpy as np
import pretty_midi
import pytest
import torch
import zygote

from midi_processor import encode_midi
from perceiver_music.checkpoint import save_checkpoint
from perceiver_music.config import preset
from perceiver_music.evaluation import (
    STATISTICS,
    difference_errors,
    music_statistics,
    statistics_figure,
    training_curves_figure,
)
from perceiver_music.model import build_model

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def setup(tmp_path_factory) -> Path:
    """Two tiny checkpoints, a data folder (two test pieces), a short train.py run."""
    root = tmp_path_factory.mktemp("eval")
    for seed in (0, 1):
        torch.manual_seed(seed)
        save_checkpoint(root / f"tiny{seed}", build_model(preset("tiny")), preset("tiny"))
    files = sorted((ROOT / "tests" / "data").glob("*.mid"))
    for split, chosen in (("train", files[:3]), ("val", files[3:4]), ("test", files[3:])):
        (root / "data" / split).mkdir(parents=True)
        for f in chosen:
            (root / "data" / split / f"{f.stem}.pickle").write_bytes(
                pickle.dumps(encode_midi(f)))
    r = zygote.run([sys.executable, "train.py", "--preset", "tiny", "--data_dir",
                        str(root / "data"), "--out_dir", str(root / "run"), "--max_steps", "20",
                        "--log_interval", "5", "--eval_interval", "10", "--eval_windows", "8",
                        "--no-tensorboard"], cwd=ROOT, capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, r.stderr
    return root


def test_report_with_two_checkpoints_and_training_curves(setup):
    out = setup / "report"
    r = zygote.run([sys.executable, "evaluate.py", "--ckpts",
                        f"{setup / 'tiny0'},{setup / 'tiny1'}", "--data_dir",
                        str(setup / "data"), "--runs", str(setup / "run"), "--num_primers", "3",
                        "--prime_seconds", "4", "--seconds", "3", "--out", str(out)],
                       cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr
    report = json.loads((out / "report.json").read_text())
    losses = report["loss"]
    assert set(losses) == {"unigram (training-data frequencies)", str(setup / "tiny0"),
                           str(setup / "tiny1")}
    assert all(math.isfinite(v["nats_per_token"]) and v["tokens"] > 0 for v in losses.values())
    # untrained models are near uniform over 390 tokens: log(390) = 5.97
    assert abs(losses[str(setup / "tiny0")]["nats_per_token"] - math.log(390)) < 1.0
    groups = report["statistics"]
    assert list(groups) == ["primers", "real continuations", str(setup / "tiny0"),
                            str(setup / "tiny1")]
    for name, stats in groups.items():
        assert set(stats) == set(STATISTICS)
        assert stats["notes_per_s"]["n"] == 3 and stats["notes_per_s"]["mean"] > 0, name
    assert groups["primers"]["pitch_class_correlation"]["n"] == 0  # no primer of a primer
    assert len(report["continuations"][str(setup / "tiny1")]) == 3
    delta = report["difference_from_real"][str(setup / "tiny0")]["notes_per_s"]
    assert delta == pytest.approx(groups[str(setup / "tiny0")]["notes_per_s"]["mean"]
                                  - groups["real continuations"]["notes_per_s"]["mean"])
    errors = report["difference_standard_error"][str(setup / "tiny0")]
    assert set(errors) == set(STATISTICS) and errors["notes_per_s"] > 0
    assert "vs real)" in (out / "report.html").read_text()
    assert "notes on the most frequent pitch:" in r.stdout
    assert f"+- {errors['notes_per_s']:.2g})" in r.stdout
    page = (out / "report.html").read_text()
    assert 'src="statistics.png"' in page and 'src="training_curves.png"' in page
    assert (out / "statistics.png").stat().st_size > 10_000
    assert (out / "training_curves.png").stat().st_size > 10_000
    assert "replacing" not in r.stdout
    # a second report in the same folder says it replaces the first, and leaves none of
    # the first one's plots that it does not draw itself
    r = zygote.run([sys.executable, "evaluate.py", "--ckpts", "", "--runs", str(setup / "run"),
                    "--out", str(out)], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr
    assert "replacing the earlier report there" in r.stdout
    assert (out / "training_curves.png").exists() and not (out / "statistics.png").exists()


def test_difference_errors_pair_the_takes_by_primer():
    """The standard error is of the paired differences: a model that is real + 1 on every
    take has error 0 however much the takes vary; NaN pairs are left out."""
    real = [dict.fromkeys(STATISTICS, v) for v in (0.0, 10.0, 20.0, math.nan)]
    shifted = [{k: v + 1 for k, v in row.items()} for row in real]
    noisy = [dict.fromkeys(STATISTICS, v) for v in (1.0, 9.0, 22.0, 5.0)]
    errors = difference_errors({"primers": real, "real continuations": real,
                                "shifted": shifted, "noisy": noisy})
    assert set(errors) == {"shifted", "noisy"}
    assert errors["shifted"]["notes_per_s"] == 0.0
    d = [1.0, -1.0, 2.0]  # the NaN pair is left out
    assert errors["noisy"]["velocity"] == pytest.approx(
        float(np.std(d, ddof=1)) / math.sqrt(3))
    one = difference_errors({"real continuations": real[:1], "m": noisy[:1]})
    assert math.isnan(one["m"]["velocity"])


def test_evaluate_samples_as_generate_does_by_default():
    """The report measures what a user hears: evaluate.py's sampling defaults are
    generate.py's, which are the Python API's."""
    import inspect

    import evaluate
    import generate
    from perceiver_music.api import PerceiverMusic

    api = inspect.signature(PerceiverMusic.generate).parameters
    assert evaluate.TEMPERATURE == generate.TEMPERATURE == api["temperature"].default
    assert evaluate.TOP_P == generate.TOP_P and api["top_p"].default in (None, generate.TOP_P)
    assert evaluate.RELEASE == generate.RELEASE == api["release"].default
    assert evaluate.TONALITY == generate.TONALITY == api["tonality"].default
    assert not generate.TOP_K and api["top_k"].default is None
    assert not generate.MIN_P and api["min_p"].default is None


def test_bad_settings_are_one_line(setup, tmp_path):
    for args, message in [(["--runs", str(tmp_path)], "no metrics.csv"),
                          (["--ckpts", str(tmp_path / "none")], "does not exist"),
                          (["--data_dir", str(tmp_path)], "no such data folder"),
                          (["--seconds", "0"], "--seconds must be positive"),
                          (["--top_p", "2"], "--top_p must be in [0, 1]"),
                          (["--temperature", "0"], "--temperature must be positive"),
                          (["--release", "-1"], "--release must not be negative"),
                          (["--tonality", "-1"], "--tonality must not be negative")]:
        r = zygote.run([sys.executable, "evaluate.py", "--data_dir", str(setup / "data"),
                            "--out", str(tmp_path / "out"), *args], cwd=ROOT,
                           capture_output=True, text=True, timeout=300)
        assert r.returncode == 1 and message in r.stderr, r.stderr
        assert len(r.stderr.strip().splitlines()) == 1


def test_a_note_never_released_counts_as_held_to_the_end():
    """A generated note struck and held to the end of the take is a drone: evaluate.py
    measures it to the take's end, as the take's MIDI file holds it, cut at the stretch's
    end as real notes sounding on past it are; notes of the primer or past the stretch
    are left out."""
    from evaluate import continuation_notes
    from midi_processor.vocab import NOTE_OFF, NOTE_ON, VELOCITY, time_shift_id
    from perceiver_music.evaluation import music_statistics

    second = time_shift_id(100)
    tokens = [VELOCITY + 20, NOTE_ON + 50, second, NOTE_OFF + 50,  # the primer: 1 s
              NOTE_ON + 60, *[second] * 2, NOTE_ON + 64, second, NOTE_OFF + 64,
              *[second] * 7, NOTE_ON + 67, second]  # 60 never released; 67 past the 8 s
    notes = continuation_notes(tokens, 1.0, 8.0)
    assert [(n.pitch, n.start, n.end) for n in notes] == [(60, 0.0, 8.0), (64, 2.0, 3.0)]
    assert music_statistics(notes, 8.0)["held_over_4s"] == 0.5


def test_statistics_and_figures():
    def note(start, end, pitch, velocity=64):
        return pretty_midi.Note(velocity, pitch, start, end)

    held = [note(0, 5, 60), note(0, 1, 64), note(1, 2, 67, 100), note(2, 3, 72, 100)]
    stats = music_statistics(held, 5.0, reference=[note(0, 1, 60), note(0, 1, 67)])
    assert stats["notes_per_s"] == pytest.approx(0.8)
    assert stats["polyphony"] == pytest.approx(8 / 5)  # 8 note-seconds over 5 s
    assert stats["pitch_range"] == 12 and stats["velocity"] == pytest.approx(82)
    assert stats["held_over_4s"] == pytest.approx(0.25)
    assert stats["pitch_class_correlation"] > 0.5  # both are C and G heavy
    assert music_statistics([], 5.0)["notes_per_s"] == 0
    assert stats["top_pitch_share"] == 0.25 and math.isnan(stats["density_vs_primer"])
    assert stats["repeated_4grams"] == 0.0  # 4 notes: one pattern, none before it
    primer = [note(0, 1, 60), note(1, 2, 62)]  # 2 notes in 4 s: 0.5 notes/s
    drone = [note(t, t + 0.5, 60) for t in range(8)]  # one pitch, 8 notes in 4 s
    loop = [note(t / 2, t / 2 + 0.4, p) for t, p in enumerate([60, 62, 64, 65] * 3)]
    stats = music_statistics(drone, 4.0, primer, 4.0)
    assert stats["density_vs_primer"] == pytest.approx(4.0)
    assert stats["top_pitch_share"] == 1.0 and stats["repeated_4grams"] == pytest.approx(4 / 5)
    # 12 notes, 9 patterns: the first 4 are new, the other 5 repeat one of them
    assert music_statistics(loop, 6.0)["repeated_4grams"] == pytest.approx(5 / 9)

    fig = statistics_figure({"a": [stats, stats], "b": [stats]})
    assert [ax.get_title() for ax in fig.axes] == [label for label, _ in STATISTICS.values()]
    assert [t.get_text() for t in fig.axes[0].get_xticklabels()] == ["a", "b"]
    assert fig.axes[0].get_ylabel() == "notes/s"


def test_training_curves_figure(setup, tmp_path):
    fig = training_curves_figure({"run": setup / "run" / "metrics.csv"})
    loss, lr = fig.axes
    assert loss.get_xlabel() == "optimizer step" and loss.get_ylabel() == "loss (nats/token)"
    labels = [t.get_text() for t in loss.get_legend().get_texts()]
    assert labels == ["run: training", "run: validation"]
    assert len(loss.lines[1].get_xdata()) == 2  # validation at steps 10 and 20
    assert lr.get_ylabel() == "learning rate"
    short = tmp_path / "metrics.csv"  # three steps: ticks at whole steps only
    short.write_text("step,train_loss,val_loss,lr,tokens_per_s,seconds\n1,5.0,,1e-3,9,1\n"
                     "2,4.5,4.4,1e-3,9,2\n3,4.0,,1e-3,9,3\n")
    for ax in training_curves_figure({"run": short}).axes:
        ticks = ax.xaxis.get_ticklocs()
        assert len(ticks) > 1 and all(float(t).is_integer() for t in ticks), ticks


def test_one_primer_reports_no_error_bar_and_strict_json(setup, tmp_path):
    """One primer gives no standard error: the lines say none (not "+- nan") and
    report.json holds null there, so strict JSON readers take it (the README's
    fine-tuning recipe evaluates one primer)."""
    out = tmp_path / "report"
    r = zygote.run([sys.executable, "evaluate.py", "--ckpts", str(setup / "tiny0"),
                        "--data_dir", str(setup / "data"), "--num_primers", "1",
                        "--prime_seconds", "4", "--seconds", "2", "--out", str(out)],
                       cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr
    assert "+- nan" not in r.stdout and "held over 4 s" in r.stdout.lower(), r.stdout

    def refuse(constant: str) -> None:
        raise AssertionError(f"report.json holds {constant}")

    report = json.loads((out / "report.json").read_text(), parse_constant=refuse)
    errors = report["difference_standard_error"][str(setup / "tiny0")]
    assert set(errors.values()) == {None}


def test_a_test_folder_alone_and_primers_drawn_across_the_split(setup, tmp_path):
    """A data folder with only test/ is evaluated (without the unigram baseline, which
    needs train/), and the primers are drawn across the split by seed, piece by piece:
    with as many primers as pieces, every piece once, however many performances of one
    piece prep.py's manifest lists (a file it does not list is a piece of its own)."""
    import shutil

    import evaluate
    from perceiver_music.data import load_split

    data = tmp_path / "data"
    shutil.copytree(setup / "data" / "test", data / "test")
    pieces = sorted(p.stem for p in (data / "test").glob("*.pickle"))
    assert len(pieces) == 2
    for k in (2, 3):  # two more performances of the first piece
        shutil.copy(data / "test" / f"{pieces[0]}.pickle", data / "test" / f"take{k}.pickle")
    lines = [json.dumps({"path": f"first/{name}.mid", "output": f"test/{name}.pickle",
                         "group": "folder:first", "status": "ok"})
             for name in (pieces[0], "take2", "take3")]
    (data / "manifest.jsonl").write_text("\n".join([*lines, "not a manifest line"]) + "\n")
    split = load_split(data / "test")
    of = evaluate.piece_of_each(data, "test", split.names)
    assert sorted(of) == sorted(["folder:first"] * 3 + [f"{pieces[1]}.pickle"])
    for seed in range(12):  # by file, 2 in 3 first draws would be the first piece's
        drawn = evaluate.primer_windows(split, of, 2, 4, 2, seed)
        assert len({of[split.names.index(name)] for name, *_ in drawn}) == 2, seed
    assert evaluate.piece_of_each(tmp_path, "test", split.names) == split.names  # none
    out = tmp_path / "report"
    r = zygote.run([sys.executable, "evaluate.py", "--ckpts", str(setup / "tiny0"),
                        "--data_dir", str(data), "--num_primers", "2", "--prime_seconds",
                        "4", "--seconds", "2", "--out", str(out)],
                       cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr
    report = json.loads((out / "report.json").read_text())
    assert set(report["loss"]) == {str(setup / "tiny0")}
    drawn = [take["piece"] for take in report["continuations"][str(setup / "tiny0")]]
    assert len(drawn) == 2 and {Path(p).stem for p in drawn} & {pieces[0], "take2",
                                                                  "take3"}
    assert f"{pieces[1]}.pickle" in drawn
