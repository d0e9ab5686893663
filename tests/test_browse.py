"""perceiver_music.browse without a browser: the Data tab's index (cached), table and
figure on a real prep.py output, composer and title from each kind of group, and the Runs
tab's summary of runs, evaluate.py reports included."""

from __future__ import annotations

import json
import os
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import zygote
from conftest import DATA

from perceiver_music.browse import (
    INDEX_NAME,
    BrowseError,
    DataIndex,
    _title,
    curves_figure,
    find_runs,
    index_data,
    run_summary,
)

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    src, out = tmp_path_factory.mktemp("midi"), tmp_path_factory.mktemp("data") / "data"
    for f in DATA.glob("*.mid"):
        shutil.copy(f, src / f.name)
    (src / "broken.mid").write_bytes(b"MThd but not MIDI")
    r = zygote.run([sys.executable, "prep.py", "--input", str(src), "--output", str(out),
                        "--val_share", "0.2", "--test_share", "0.2"], cwd=ROOT,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    return out


def whole_ticks(axis) -> bool:
    """Whether a figure's axis (a count or a step) is marked at whole numbers only: on a
    short run matplotlib's default put ticks at 1.25, 1.5..."""
    ticks = axis.get_ticklocs()
    return len(ticks) > 1 and all(float(t).is_integer() for t in ticks)


def test_the_index_is_read_once_then_kept(data):
    index = index_data(data)
    assert (data / INDEX_NAME).is_file()
    umask = os.umask(0)
    os.umask(umask)
    assert (data / INDEX_NAME).stat().st_mode & 0o777 == 0o666 & ~umask  # as the manifest
    assert index.pitch.sum() == sum(e["notes"] for e in index.entries if e["status"] == "ok")
    assert (index.kinds.sum(1) == [e["tokens"] - 1 if e["status"] == "ok" else 0
                                   for e in index.entries]).all()  # all but END
    rows, total = index.table()
    assert total == 6 and len(rows) == 6
    assert index.table("failed")[0][0][-1].startswith("failed: ")
    assert index.table("all", "SCN15")[1] == 1  # any case
    assert index.table("all", "", page=1, per_page=4)[0] == rows[4:]
    (data / "train").rename(data / "moved")  # the second time reads no token file
    try:
        assert index_data(data).pitch.tolist() == index.pitch.tolist()
    finally:
        (data / "moved").rename(data / "train")
    fig = index.figure()
    assert [ax.get_xlabel() for ax in fig.axes[:5]] == [
        "minutes", "notes per second", "MIDI pitch (60 = C4)", "velocity", "split"]
    assert whole_ticks(fig.axes[0].yaxis) and whole_ticks(fig.axes[1].yaxis)  # pieces
    entry, tokens = index.piece(rows[0][4]) if rows[0][-1] == "ok" else index.piece(rows[1][4])
    assert len(tokens) == entry["tokens"]
    with pytest.raises(BrowseError, match="failed in prep.py"):
        index.piece("broken.mid")
    with pytest.raises(BrowseError, match="no piece"):
        index.piece("../../etc/passwd")
    with pytest.raises(BrowseError, match="no manifest.jsonl"):
        index_data(data / "train")


@pytest.mark.parametrize(("entry", "expected"), [
    ({"path": "2004/x.midi", "group": "Frédéric Chopin / Ballade No. 1"},
     ("Frédéric Chopin", "Ballade No. 1")),
    ({"path": "asap/Bach/Fugue/bwv_848/Lee01M.mid", "group": "asap/folder:Bach/Fugue/bwv_848"},
     ("Bach", "Fugue bwv 848")),
    ({"path": "Bach/Fugue/bwv_848/Lee01M.mid", "group": "folder:Bach/Fugue/bwv_848"},
     ("Bach", "Fugue bwv 848")),
    ({"path": "piano-midi-de/Albeniz/alb_esp1.mid",
      "group": "piano-midi-de/title:Espana_Opus_165_Prelude"},
     ("Albeniz", "Espana Opus 165 Prelude")),
    ({"path": "Chopin/ballade_1.mid", "group": "Chopin"}, ("Chopin", "ballade 1")),
    # what prep.py records from a listing, also below a folder's name (several inputs)
    ({"path": "maestro/2009/y.midi", "group": "maestro/Franz Schubert / Franz Liszt / Ständchen",
      "composer": "Franz Schubert / Franz Liszt", "title": "Ständchen"},
     ("Franz Schubert / Franz Liszt", "Ständchen")),
])
def test_composer_and_title_from_each_kind_of_group(entry, expected):
    assert _title(entry) == expected


def test_search_ignores_case_and_accents():
    entries = [{"path": f"2018/{i}.midi", "split": "train", "status": "ok", "group": "",
                "composer": composer, "title": title, "seconds": 60, "tokens": 9}
               for i, (composer, title) in enumerate([("Antonín Dvořák", "Humoresque"),
                                                      ("Frédéric Chopin", "Étude Op. 10"),
                                                      ("Witold Lutosławski", "Études")])]
    index = DataIndex(Path("."), entries, *(np.zeros((3, n)) for n in (128, 32, 4)))
    for query, composer in (("dvorak", "Antonín Dvořák"), ("DVOŘÁK", "Antonín Dvořák"),
                            ("frederic", "Frédéric Chopin"), ("op. 10", "Frédéric Chopin"),
                            ("lutoslawski", "Witold Lutosławski")):
        rows, total = index.table("all", query)
        assert total == 1 and rows[0][1] == composer, query


def test_runs_their_best_loss_and_evaluate_report(tmp_path):
    header = "step,train_loss,val_loss,lr,tokens_per_s,seconds\n"  # train.py's columns
    for name, rows in (("a", "10,4.0,,1e-3,900,6.0\n20,3.5,3.4,1e-3,900,12.0\n"),
                       ("b/c", "10,4.5,,1e-3,800,7.0\n20,,3.9,1e-3,,14.0\n")):
        (tmp_path / name).mkdir(parents=True)
        (tmp_path / name / "metrics.csv").write_text(header + rows)
    (tmp_path / "a" / "eval").mkdir()
    (tmp_path / "a" / "eval" / "report.json").write_text(json.dumps(
        {"split": "test", "loss": {"ckpt/a/best": {"nats_per_token": 3.25, "tokens": 10},
                                   "unigram (training-data frequencies)":
                                       {"nats_per_token": 5.0, "tokens": 10}}}))
    runs = find_runs(tmp_path)
    assert sorted(r.name for r in runs) == ["a", "c"]
    rows = {row[0]: row for row in (run_summary(r, tmp_path) for r in runs)}
    assert rows["a"][:5] == ["a", 20, "3.400 (step 20)", "3.500", "0.2"]
    assert rows["a"][6] == "test best: 3.250"
    assert rows["b/c"][2] == "3.900 (step 20)" and rows["b/c"][6] == ""
    fig = curves_figure(runs, tmp_path)
    assert fig.axes[0].get_xlabel() == "step" and len(fig.axes[0].lines) == 4
    (tmp_path / "short").mkdir()  # three steps
    (tmp_path / "short" / "metrics.csv").write_text(header + "1,5.0,,1e-3,900,1.0\n"
                                                    "2,4.5,4.4,1e-3,900,2.0\n3,4.0,,1e-3,900,3.0\n")
    assert whole_ticks(curves_figure([tmp_path / "short"], tmp_path).axes[0].xaxis)
