"""The bench scripts start as the README shows them, by path or as modules, from any folder."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import zygote

BENCH = Path(__file__).resolve().parent.parent / "bench"


@pytest.mark.parametrize("script", sorted(p.name for p in BENCH.glob("*.py")))
def test_a_bench_script_runs_by_its_path_from_another_folder(script, tmp_path):
    """``python bench/NAME.py --help`` from another folder finds the project's packages
    (eight of them failed with ModuleNotFoundError, as only ``python -m bench.NAME`` from
    the project's folder worked)."""
    r = zygote.run([sys.executable, str(BENCH / script), "--help"], cwd=tmp_path,
                   capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and r.stdout.startswith("usage: "), r.stderr[-1000:]
