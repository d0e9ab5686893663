"""ThreadTuner: the thread count follows measured step times (fed here, not timed); and
bench/threads.py, the figures the README shows, runs through (its figures not judged)."""

from __future__ import annotations

import gc
import re
import sys
from pathlib import Path

import pytest
import torch
import zygote

from perceiver_music.threads import ThreadTuner


@pytest.fixture(autouse=True)
def alone():
    """Each test's tuners are the only ones in the process (open ones share the cores)."""
    gc.collect()
    yield
    gc.collect()


def feed(tuner: ThreadTuner, cost: dict[int, float], steps: int) -> list[int]:
    """Run ``steps`` steps whose duration is ``cost[threads]``; the thread counts used."""
    used = []
    for _ in range(steps):
        count = tuner.threads()
        used.append(count)
        tuner._record(count, cost[count])
    return used


def test_the_faster_count_wins_and_the_slower_is_dropped_at_once():
    tuner = ThreadTuner((1, 2), trial=3, period=50)
    used = feed(tuner, {1: 1.0, 2: 0.5}, 8)  # quiet: every core is faster
    assert used == [1, 1, 1, 1, 2, 2, 2, 2] and tuner.choice == 2 and not tuner.exploring
    tuner.close()
    tuner = ThreadTuner((1, 2), trial=3, period=50)
    used = feed(tuner, {1: 1.0, 2: 10.0}, 6)  # busy: two threads 10x slower
    assert used == [1, 1, 1, 1, 2, 1] and tuner.choice == 1  # one slow step, then dropped


def test_load_that_arrives_is_noticed_and_the_choice_changes():
    tuner = ThreadTuner((1, 2), trial=3, period=1000)
    feed(tuner, {1: 1.0, 2: 0.5}, 8)
    assert tuner.choice == 2
    feed(tuner, {1: 1.0, 2: 0.5}, 100)
    assert not tuner.exploring  # steady: no trial before the period ends
    used = feed(tuner, {1: 1.0, 2: 4.0}, 12)  # a busy process starts
    assert tuner.choice == 1 and used[-1] == 1
    assert used.count(2) <= 4  # three slow steps to notice, one to confirm


def test_trials_grow_rarer_while_the_choice_holds():
    tuner = ThreadTuner((1, 2), trial=3, period=10)
    feed(tuner, {1: 1.0, 2: 0.5}, 8)
    periods = []
    for _ in range(6):
        feed(tuner, {1: 1.0, 2: 0.5}, tuner.period + 8)
        periods.append(tuner.period)
    assert periods == [40, 80, 160, 160, 160, 160]


def test_close_restores_the_thread_count():
    before = torch.get_num_threads()
    tuner = ThreadTuner((1, 2))
    with tuner.step():
        pass
    tuner.close()
    assert torch.get_num_threads() == before


def test_loops_running_at_once_share_the_cores():
    """torch's thread count is one per process: two open tuners (two generations in the
    app's threads) both run with their share of the cores and stop exploring."""
    from perceiver_music.threads import cpu_cores

    first = ThreadTuner((1, 2))
    second = ThreadTuner((1, 2))
    try:
        share = max(1, cpu_cores() // 2)
        assert first.threads() == second.threads() == share
        plan = list(first.plan)
        feed(first, {1: 1.0, 2: 0.5}, 5)
        assert first.plan == plan  # nothing explored or recorded meanwhile
    finally:
        second.close()
    assert first.threads() == 1  # alone again: its own trial resumes
    first.close()


def test_the_thread_bench_runs_its_app_processes_and_prints_its_matrix():
    """A short run of ``python -m bench.threads``: two generations at once in app.py's
    generation processes (the Workers API it drives), the three alone-and-paired lines and
    the load matrix's rows."""
    root = Path(__file__).resolve().parent.parent
    r = zygote.run([sys.executable, "-m", "bench.threads", "--loads", "0", "--rounds", "1",
                    "--decode_tokens", "20", "--train_steps", "1", "--loop_adds", "1000000"],
                   cwd=root, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert re.search(r"two at once in two processes .*: \d+ and \d+", r.stdout), r.stdout
    assert re.search(r"batched in one decode .*: \d+ on 1 thread\(s\), \d+ on \d+ thread",
                     r.stdout), r.stdout
    assert len(re.findall(r"\d+ alone, \d+ two at once \(\d+%\)", r.stdout)) == 3, r.stdout
    for what in ("decode", "train"):
        assert re.search(rf"^\s+0 {what}(\s+\d+){{3}}$", r.stdout, re.M), r.stdout
