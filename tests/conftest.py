"""Shared fixtures: the bundled real MIDI files and small pieces built in code."""

from __future__ import annotations

import os
import signal
import socket
import sys
from pathlib import Path

# OpenMP's threads wait for the next parallel region by spinning a while first: with two
# test workers on two cores, a test's idle second thread burned CPU the other worker
# needed (a fifth of test_shapes.py's CPU time, at the same wall time). Set before torch
# loads OpenMP here and in every script the suite starts; it changes no result.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import pretty_midi  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
import zygote  # noqa: E402

DATA = Path(__file__).resolve().parent / "data"

REAL_FILES = sorted(DATA.glob("*.mid"))

# A suite started in the background by a shell without job control (`(pytest &)`, some CI
# runners) inherits an ignored SIGINT, and so would every script it starts: Python leaves
# an ignored SIGINT ignored, so the Ctrl-C tests would fail on the harness, not on the
# product. A handler, unlike an ignored signal, is not inherited across exec.
if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)

# Some machines (this project's CI VM among them) set PYTHONDONTWRITEBYTECODE=1: then each
# of the suite's hundreds of script runs compiled the project's modules anew, about 0.1
# CPU-seconds each time. The suite lets Python keep their bytecode (in __pycache__ folders,
# which git ignores), as it does on a developer's machine.
os.environ.pop("PYTHONDONTWRITEBYTECODE", None)
sys.dont_write_bytecode = False


def make_pm(notes, pedal=(), instruments=1, resolution=480) -> pretty_midi.PrettyMIDI:
    """A PrettyMIDI with ``notes`` [(start, end, pitch, velocity)] spread round-robin over
    ``instruments`` pianos and sustain ``pedal`` [(time, value)] on the first."""
    pm = pretty_midi.PrettyMIDI(resolution=resolution)
    insts = [pretty_midi.Instrument(program=0) for _ in range(instruments)]
    for i, (s, e, p, v) in enumerate(notes):
        insts[i % instruments].notes.append(pretty_midi.Note(velocity=v, pitch=p, start=s, end=e))
    insts[0].control_changes = [pretty_midi.ControlChange(64, v, t) for t, v in pedal]
    pm.instruments.extend(insts)
    return pm


@pytest.fixture
def real_files() -> list[Path]:
    assert len(REAL_FILES) == 5, "tests/data should hold the five bundled MIDI files"
    return REAL_FILES


@pytest.fixture(autouse=True)
def no_child_left():
    """A test that failed between `zygote.start` and its wait leaves no script running."""
    yield
    zygote.reap()


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny models gain nothing from threads, and on the 2-core CI VM waking a second
    OpenMP thread for each small matrix product costs up to ~15 ms (10x slower tests)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def free_port() -> int:
    """A TCP port nothing listens on now, for ``accelerate launch --main_process_port``."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# The files that take longest (CPU-seconds on the 2-core VM, each alone: 205, 129, 80),
# run first: pytest-xdist hands whole files to its workers in collection order (its own
# reordering, by number of tests, is off in pyproject.toml), and the app's seven tests
# started last had left one core idle for about a minute at the end.
FIRST = ("test_app.py", "test_train.py", "test_generate.py")


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Mark the tests that drive headless Chromium (the slowest ones): ``-m "not
    browser"`` leaves them out. Put the files of `FIRST` first, in that order."""
    for item in items:
        if "browser" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.browser)
    rank = {name: i for i, name in enumerate(FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(FIRST)))  # stable
