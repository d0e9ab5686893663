"""The tests' zygote runs a script exactly as a new ``python`` process would."""

from __future__ import annotations

import signal
import subprocess
import sys
import time

import pytest
import zygote

SCRIPT = """\
import atexit, json, os, sys, threading, time
import numpy as np
atexit.register(lambda: print("atexit ran"))
threading.Thread(target=lambda: (time.sleep(0.2), print("thread joined"))).start()
print(json.dumps({"argv": sys.argv, "cwd": os.getcwd(), "file": __file__,
                  "name": __name__, "path0": sys.path[0], "env": os.environ.get("ZYGOTE_T"),
                  "stdin": sys.stdin.read(), "main": sys.modules["__main__"].__file__,
                  "globals": sorted(globals())}))
print("to stderr\\rprogress", file=sys.stderr)
class Noisy:
    def __del__(self):
        print("finalised")
noisy = Noisy()
log = open("unclosed.txt", "w")  # closed and flushed when Python clears __main__
log.write("data\n")
what = sys.argv[1]
if what == "raise":
    raise ValueError("boom")
if what == "interrupt":
    raise KeyboardInterrupt
sys.exit({"exit": 3, "message": "bye", "ok": None}[what])
"""


@pytest.mark.parametrize("what", ["ok", "exit", "message", "raise", "interrupt", "syntax"])
def test_a_script_sees_and_ends_as_in_a_new_process(tmp_path, monkeypatch, what):
    source = SCRIPT + ("print(')" if what == "syntax" else "")
    (tmp_path / "script.py").write_text(source)
    (tmp_path / "pkg").mkdir()
    (tmp_path / "pkg" / "__init__.py").write_text("")
    (tmp_path / "pkg" / "mod.py").write_text(source)
    monkeypatch.setenv("ZYGOTE_T", "set by the test")
    for cmd in (["script.py", what], ["-m", "pkg.mod", what]):
        args = [sys.executable, *cmd]
        kw = dict(cwd=tmp_path, capture_output=True, text=True, input="typed", timeout=60)
        assert zygote.eligible(args, kw)
        runs = []
        for run in (subprocess.run, zygote.forked):
            runs.append(run(args, **kw))
            written = tmp_path / "unclosed.txt"
            runs[-1].written = written.read_text() if written.exists() else None
            written.unlink(missing_ok=True)
        real, forked = runs
        assert forked.returncode == real.returncode, forked.stderr
        assert (forked.stdout, forked.stderr) == (real.stdout, real.stderr)
        assert forked.written == real.written


def test_a_timeout_kills_the_child_and_the_zygote_serves_on(tmp_path):
    (tmp_path / "slow.py").write_text("import time; time.sleep(60)")
    args = [sys.executable, "slow.py"]
    start = time.monotonic()
    with pytest.raises(subprocess.TimeoutExpired):
        zygote.forked(args, cwd=tmp_path, capture_output=True, timeout=1)
    assert time.monotonic() - start < 10
    (tmp_path / "quick.py").write_text("print('still here')")
    r = zygote.forked([sys.executable, "quick.py"], cwd=tmp_path, capture_output=True,
                      text=True)
    assert (r.returncode, r.stdout) == (0, "still here\n")


def test_what_could_differ_runs_in_a_real_process():
    kw = dict(capture_output=True, text=True)
    assert not zygote.eligible([sys.executable, "-c", "pass"], kw)
    assert not zygote.eligible([sys.executable, "x.py"], {**kw, "preexec_fn": print})
    assert not zygote.eligible([sys.executable, "x.py"], {**kw, "env": {"OMP_NUM_THREADS": "7"}})
    assert not zygote.eligible([sys.executable, "x.py"], {"text": True})  # output not captured


CHILD = """\
import os, signal, sys, time
mask = os.umask(0)
print("umask", oct(mask))
for name, size in (("big", 5000), ("locked/file", 1)):
    try:
        with open(name, "wb") as f:
            f.write(bytes(size))
        print(name, "written")
    except OSError as exc:
        print(name, os.strerror(exc.errno))
sys.stdout.flush()
if sys.argv[1:] == ["wait"]:
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(7))
    time.sleep(60)
"""


@pytest.mark.parametrize("setup", [zygote.umask(0o027), zygote.file_size_limit(1000),
                                   zygote.without_root_privileges, None])
def test_a_setup_and_a_started_script_act_as_in_a_real_process(tmp_path, monkeypatch, setup):
    """A `Setup` (the ``preexec_fn``s the tests use) has the same effect in a child of the
    zygote, whose script never execs, as before a real process's exec; `start` gives a
    script its output file and signals as ``subprocess.Popen`` does."""
    (tmp_path / "child.py").write_text(CHILD)
    (tmp_path / "locked").mkdir(mode=0o555)
    args, kw = [sys.executable, "child.py"], dict(cwd=tmp_path, capture_output=True, text=True)
    assert zygote.eligible(args, {**kw, "preexec_fn": setup})
    real = subprocess.run(args, **kw, preexec_fn=setup)
    (tmp_path / "big").unlink(missing_ok=True)
    assert zygote.forked(args, **kw, preexec_fn=setup).stdout == real.stdout != ""
    effect = {"umask": "umask 0o27", "file_size_limit": "big File too large",
              "without_root_privileges": "locked/file Permission denied"}
    if setup is not None:  # it took effect
        assert effect[setup.name] in real.stdout.splitlines(), real.stdout

    outputs = []
    for use_zygote in ("1", "0"):
        monkeypatch.setenv("TESTS_ZYGOTE", use_zygote)
        output = tmp_path / f"output-{use_zygote}.txt"
        child = zygote.start([*args, "wait"], cwd=tmp_path, stdout=output, setup=setup)
        assert (child._proc is None) == (use_zygote == "1")  # forked, or a real process
        while "locked" not in (output.read_text() if output.exists() else ""):
            with pytest.raises(subprocess.TimeoutExpired):
                child.wait(timeout=0.05)  # it waits for the signal
        child.send_signal(signal.SIGTERM)
        assert child.wait(timeout=60) == 7
        outputs.append(output.read_text())
        (tmp_path / "big").unlink(missing_ok=True)
    assert outputs == [real.stdout, real.stdout]


def test_a_child_nobody_waited_for_is_reaped(tmp_path):
    """A test that fails between `start` and its wait: `reap` (after every test) kills the
    script, and the worker's next run forks from the zygote again."""
    (tmp_path / "slow.py").write_text("import time; time.sleep(60)")
    child = zygote.start([sys.executable, "slow.py"], cwd=tmp_path)
    assert child._proc is None  # forked
    zygote.reap()
    assert child.returncode == -signal.SIGKILL
    (tmp_path / "quick.py").write_text("print('forked')")
    args, kw = [sys.executable, "quick.py"], dict(cwd=tmp_path, capture_output=True, text=True)
    assert zygote._lock.acquire(blocking=False)  # free: run() would fork
    zygote._lock.release()
    assert zygote.run(args, **kw).stdout == "forked\n"
