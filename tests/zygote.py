"""Run the project's scripts for the tests without paying Python's start-up each time.

``python train.py ...`` spends about 7.6 CPU-seconds on the 2-core CI machine importing
torch, numpy, pretty_midi, accelerate and (when it makes its optimizer) torch._dynamo,
and the suite runs scripts over two hundred times. So each test
worker keeps one *zygote*: a process that imports those libraries once (nothing of this
project) and forks a child for every script run. The child becomes ``python SCRIPT ARGS``
as closely as Python allows: the caller's working folder, environment and argv, its own
``__main__`` module and ``sys.path[0]``, stdin/stdout/stderr on files, a fresh numpy seed,
and the interpreter's normal shutdown (atexit, thread joins, flushes) decides the status.

``run`` is a drop-in for ``subprocess.run``, and ``start`` starts a script to signal or
watch while it runs (the part of ``subprocess.Popen`` the tests use). They use a real
process whenever the zygote could differ from one: a ``preexec_fn`` other than a `Setup`
(a umask, a file size limit, no root privileges: applied in the child either way), a
variable that is read while torch or Python starts (``PYTHON*``, ``OMP_*``, ``MKL_*``,
``TORCH_*``...) set differently from the zygote's, ``python -c``, a run already in
progress on this worker (threads), or ``TESTS_ZYGOTE=0`` in the environment (to check
that the suite passes both ways).
"""

from __future__ import annotations

import atexit
import contextlib
import ctypes
import gc
import importlib
import importlib.machinery
import json
import os
import resource
import runpy
import select
import signal
import subprocess
import sys
import tempfile
import threading
import time
import types
from pathlib import Path

import numpy as np

# torch._dynamo: a torch optimizer imports it when it is made, 2 of the 2.7 CPU-seconds a
# tiny train.py run took in the zygote without it
PRELOAD = ("torch", "torch._dynamo", "numpy", "pretty_midi", "mido", "safetensors.torch",
           "tqdm", "accelerate")
STARTUP_VARIABLES = ("PYTHON", "OMP_", "MKL_", "KMP_", "OPENBLAS_", "GOMP_", "TORCH",
                     "PYTORCH", "CUDA", "LD_", "MALLOC", "TQDM_", "LC_", "LANG", "HF_")
_lock = threading.Lock()
_zygote: dict = {}


def _environment(kw: dict) -> dict:
    """The environment ``subprocess.run(..., **kw)`` gives its child."""
    return os.environ if kw.get("env") is None else kw["env"]


def _startup_env(env: dict) -> dict:
    """The variables in ``env`` that take effect only while Python or torch starts."""
    return {k: v for k, v in env.items()
            if k.startswith(STARTUP_VARIABLES) and not _set_by_torch(k, v)}


def _umask(mask: int) -> None:
    os.umask(mask)


def _file_size_limit(limit: int) -> None:
    """No file beyond ``limit`` bytes: writes then fail with EFBIG, as on a full disk
    (Python ignores the SIGXFSZ that comes with it). In the zygote's child it applies to
    the files that catch its output too (pipes, for a real process): keep the output of a
    script run with it below the limit."""
    resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))


class _CapHeader(ctypes.Structure):
    _fields_ = [("version", ctypes.c_uint32), ("pid", ctypes.c_int)]


class _CapData(ctypes.Structure):
    _fields_ = [("effective", ctypes.c_uint32), ("permitted", ctypes.c_uint32),
                ("inheritable", ctypes.c_uint32)]


def _without_root_privileges() -> None:
    """Obey file permissions even as root (CI runs as root): drop the capabilities that
    bypass them (CAP_DAC_OVERRIDE, CAP_DAC_READ_SEARCH, CAP_FOWNER) from this process
    (a fork runs on without exec), and from its bounding and inheritable sets (of which
    an exec makes root's permitted set)."""
    if os.geteuid() != 0:
        return
    libc = ctypes.CDLL(None, use_errno=True)
    caps = (1, 2, 3)
    for cap in caps:
        if libc.prctl(24, cap, 0, 0, 0) != 0:  # PR_CAPBSET_DROP
            raise OSError(ctypes.get_errno(), "prctl(PR_CAPBSET_DROP) failed")
    header, data = _CapHeader(0x20080522, 0), (_CapData * 2)()  # _LINUX_CAPABILITY_VERSION_3
    if libc.capget(ctypes.byref(header), data) != 0:
        raise OSError(ctypes.get_errno(), "capget failed")
    keep = ~sum(1 << cap for cap in caps) & 0xFFFFFFFF
    data[0].effective &= keep
    data[0].permitted &= keep
    data[0].inheritable &= keep  # which an exec would add to the permitted set
    if libc.capset(ctypes.byref(header), data) != 0:
        raise OSError(ctypes.get_errno(), "capset failed")


_SETUPS = {"umask": _umask, "file_size_limit": _file_size_limit,
           "without_root_privileges": _without_root_privileges}


class Setup:
    """A ``preexec_fn`` the zygote can apply too: one of `_SETUPS` with its arguments, run
    in the child before the script (after the fork in the zygote, before the exec in a
    real process)."""

    def __init__(self, name: str, *args: int) -> None:
        self.name, self.args = name, args

    def __call__(self) -> None:
        _SETUPS[self.name](*self.args)


def umask(mask: int) -> Setup:
    """The child's umask."""
    return Setup("umask", mask)


def file_size_limit(limit: int) -> Setup:
    """The child writes no file beyond ``limit`` bytes (`_file_size_limit`)."""
    return Setup("file_size_limit", limit)


without_root_privileges = Setup("without_root_privileges")


def _set_by_torch(name: str, value: str) -> bool:
    """Whether ``name=value`` is what torch sets in its own process when torch._dynamo is
    imported (a torch optimizer imports it): the inductor cache folder at its default. A
    child that inherits it starts as one without it; counted as a difference, it sent every
    later script of a worker that had made an optimizer to a real process."""
    if name != "TORCHINDUCTOR_CACHE_DIR":
        return False
    from torch._inductor.runtime.cache_dir_utils import default_cache_dir

    return value == os.path.abspath(default_cache_dir())


def _start() -> subprocess.Popen:
    """This worker's zygote, started on first use with the worker's environment."""
    proc = _zygote.get("proc")
    if proc is None or proc.poll() is not None:
        proc = subprocess.Popen([sys.executable, __file__], stdin=subprocess.PIPE,
                                stdout=subprocess.PIPE)
        _zygote.update(proc=proc, env=_startup_env(dict(os.environ)), pending=b"")
    return proc


def _read_line(proc: subprocess.Popen, timeout: float | None) -> dict | None:
    """The zygote's next reply, or None when ``timeout`` seconds pass first (read from the
    raw pipe: a buffered reader could hold the next reply where ``select`` cannot see it)."""
    fd, pending = proc.stdout.fileno(), _zygote["pending"]
    deadline = None if timeout is None else time.monotonic() + timeout
    while b"\n" not in pending:
        left = None if deadline is None else max(0.0, deadline - time.monotonic())
        if not select.select([fd], [], [], left)[0]:
            return None
        chunk = os.read(fd, 4096)
        if not chunk:
            raise RuntimeError("the test zygote died")
        pending += chunk
    line, _, rest = pending.partition(b"\n")
    _zygote["pending"] = rest
    return json.loads(line)


def _kill(pid: int | None) -> None:
    """Kill a child (unless it has ended meanwhile, or was never forked)."""
    if pid is not None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


def _reset(pid: int | None) -> None:
    """Kill the child ``pid`` and this worker's zygote, whose replies would be out of step
    after an interrupted call; the next call starts a new zygote."""
    _kill(pid)
    proc = _zygote["proc"]
    proc.kill()
    proc.wait()
    _zygote.clear()


def eligible(cmd, kw: dict) -> bool:
    """Whether ``subprocess.run(cmd, **kw)`` can run in the zygote unchanged."""
    if not isinstance(kw.get("preexec_fn"), (Setup, type(None))):
        return False
    if not (len(cmd) >= 2 and cmd[0] == sys.executable):
        return False
    if not (str(cmd[1]).endswith(".py") or (cmd[1] == "-m" and len(cmd) >= 3)):
        return False
    allowed = {"cwd", "capture_output", "text", "timeout", "check", "input", "env",
               "stdout", "stderr", "preexec_fn"}
    if set(kw) - allowed:
        return False
    capture = kw.get("capture_output") or (kw.get("stdout") == subprocess.PIPE
                                           and kw.get("stderr") in (subprocess.PIPE,
                                                                    subprocess.STDOUT))
    if not capture or not Path(kw.get("cwd") or ".").is_dir():
        return False
    _start()
    return _startup_env(_environment(kw)) == _zygote["env"]


def run(cmd, **kw) -> subprocess.CompletedProcess:
    """``subprocess.run(cmd, **kw)``, forked from the zygote when that cannot differ."""
    if (os.environ.get("TESTS_ZYGOTE") == "0" or not eligible(cmd, kw)
            or not _lock.acquire(blocking=False)):
        return subprocess.run(cmd, **kw)
    try:
        return forked(cmd, **kw)
    finally:
        _lock.release()


def forked(cmd, **kw) -> subprocess.CompletedProcess:
    """``subprocess.run(cmd, **kw)`` forked from the zygote, for an ``eligible`` call."""
    assert eligible(cmd, kw), cmd
    cmd = list(map(str, cmd))
    proc = _start()
    text = kw.get("text", False)
    merged = kw.get("stderr") == subprocess.STDOUT
    with tempfile.TemporaryDirectory(prefix="zygote-") as tmp:
        files = {name: str(Path(tmp) / name) for name in ("stdin", "stdout", "stderr")}
        data = kw.get("input")
        if data is not None:
            Path(files["stdin"]).write_bytes(data.encode() if isinstance(data, str) else data)
        request = {"argv": cmd[1:], "cwd": str(kw.get("cwd") or os.getcwd()),
                   "env": dict(_environment(kw)), "merged": merged,
                   "stdin": files["stdin"] if data is not None else os.devnull,
                   "stdout": files["stdout"], "stderr": files["stderr"],
                   "setup": _setup(kw)}
        pid = None
        try:
            proc.stdin.write(json.dumps(request).encode() + b"\n")
            proc.stdin.flush()
            pid = _read_line(proc, None)["pid"]
            reply = _read_line(proc, kw.get("timeout"))
            timed_out = reply is None
            if timed_out:
                _kill(pid)
                reply = _read_line(proc, None)
        except BaseException:  # Ctrl-C, a test timeout...: the replies would be out of
            _reset(pid)  # step
            raise

        def read(name: str) -> str | bytes | None:
            if name == "stderr" and merged:
                return None
            out = Path(files[name]).read_bytes()
            if not text or timed_out:  # TimeoutExpired holds bytes, as subprocess's does
                return out
            return out.decode().replace("\r\n", "\n").replace("\r", "\n")  # universal newlines

        out, err = read("stdout"), read("stderr")
    if timed_out:
        raise subprocess.TimeoutExpired(cmd, kw["timeout"], out, err)
    result = subprocess.CompletedProcess(cmd, reply["status"], out, err)
    if kw.get("check"):
        result.check_returncode()
    return result


def _setup(kw: dict) -> list:
    """The `Setup` of a call, as the zygote's request names it."""
    setup = kw.get("preexec_fn")
    return [] if setup is None else [[setup.name, list(setup.args)]]


class Child:
    """A script `start` started: the part of ``subprocess.Popen`` the tests use. Its
    output goes to the files (or terminal) given to `start`."""

    def __init__(self, pid: int, proc: subprocess.Popen | None) -> None:
        self.pid, self.returncode, self._proc = pid, None, proc
        _started.append(self)

    def send_signal(self, sig: int) -> None:
        if self.returncode is None:
            with contextlib.suppress(ProcessLookupError):  # ended, not yet waited for
                os.kill(self.pid, sig)

    def wait(self, timeout: float | None = None) -> int:
        """The exit status (negative: the signal that ended it); raises
        subprocess.TimeoutExpired after ``timeout`` seconds and leaves it running."""
        if self.returncode is not None:
            return self.returncode
        if self._proc is not None:  # a real process
            self.returncode = self._proc.wait(timeout)
        else:
            try:
                reply = _read_line(_zygote["proc"], timeout)
            except BaseException:  # the zygote died, Ctrl-C...: the replies are out of step
                _reset(self.pid)
                _lock.release()
                raise
            if reply is None:
                raise subprocess.TimeoutExpired(str(self.pid), timeout)
            self.returncode = reply["status"]
            _lock.release()
        _started.remove(self)
        return self.returncode


_started: list[Child] = []  # children of `start` not waited for yet


def reap() -> None:
    """Kill and wait for every child of `start` that nobody waited for (its test failed
    midway): it would hold this worker's zygote, and a core, for the rest of the suite."""
    for child in list(_started):
        child.send_signal(signal.SIGKILL)
        child.wait(timeout=60)


def start(cmd, cwd: Path, stdout: str = os.devnull, stderr: str | None = None,
          stdin: str = os.devnull, setup: Setup | None = None) -> Child:
    """Start ``python SCRIPT ARGS`` (``cmd``) in ``cwd``, its input from the file ``stdin``
    and its output written to the files ``stdout`` and ``stderr`` (None: with stdout),
    each a path (a terminal's too), after ``setup``; forked from the zygote as `run` would
    (the same environment as this process), or a real process. `Child.wait` for its end."""
    cmd = list(map(str, cmd))
    kw = {"cwd": cwd, "capture_output": True, "preexec_fn": setup}
    if (os.environ.get("TESTS_ZYGOTE") == "0" or not eligible(cmd, kw)
            or not _lock.acquire(blocking=False)):
        with contextlib.ExitStack() as files:
            out = files.enter_context(open(stdout, "wb"))
            err = out if stderr is None else files.enter_context(open(stderr, "wb"))
            given = files.enter_context(open(stdin, "rb"))
            proc = subprocess.Popen(cmd, cwd=cwd, stdin=given, stdout=out, stderr=err,
                                    preexec_fn=setup)
        return Child(proc.pid, proc)
    proc = _start()
    request = {"argv": cmd[1:], "cwd": str(cwd), "env": dict(os.environ),
               "merged": stderr is None, "stdin": str(stdin), "stdout": str(stdout),
               "stderr": str(stderr), "setup": _setup(kw)}
    try:
        proc.stdin.write(json.dumps(request).encode() + b"\n")
        proc.stdin.flush()
        return Child(_read_line(proc, None)["pid"], None)
    except BaseException:
        _reset(None)
        _lock.release()
        raise


def _become(request: dict) -> None:
    """In the forked child: turn into ``python ARGV`` and exit as it would."""
    os.chdir(request["cwd"])
    os.environ.clear()
    os.environ.update(request["env"])
    flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC
    for fd, (path, mode) in enumerate([(request["stdin"], os.O_RDONLY),
                                       (request["stdout"], flags), (request["stderr"], flags)]):
        if fd == 2 and request["merged"]:
            os.dup2(1, 2)
            continue
        opened = os.open(path, mode, 0o600)
        os.dup2(opened, fd)
        os.close(opened)
    try:
        for name, args in request["setup"]:
            _SETUPS[name](*args)
    except OSError as error:  # as subprocess reports a failed preexec_fn: before the script
        os.write(2, f"zygote: the child's setup failed: {error}\n".encode())
        os._exit(255)
    np.random.seed()  # a new process would draw its own seed
    try:
        _execute(request["argv"])
        status = 0
    except SystemExit as stop:
        status = _exit_status(stop.code)
    except BaseException as error:
        tb = error.__traceback__  # Python shows the script's frames, not the zygote's
        while tb is not None and tb.tb_frame.f_code.co_filename == __file__:
            tb = tb.tb_next
        sys.excepthook(type(error), error.with_traceback(tb), tb)
        status = -signal.SIGINT if isinstance(error, KeyboardInterrupt) else 1
    _shut_down(status)


def _execute(argv: list[str]) -> None:
    """Run ``argv`` as the command line ``python ARGV`` would, in a new ``__main__``."""
    main = types.ModuleType("__main__")
    main.__builtins__, main.__annotations__ = __builtins__, {}
    sys.modules["__main__"] = main  # not the zygote's: the script gets empty globals
    if argv[0] == "-m":
        sys.argv = ["-m", *argv[2:]]
        sys.path[0] = os.getcwd()
        runpy._run_module_as_main(argv[1])  # exactly what ``python -m`` calls
        return
    path = os.path.abspath(argv[0])
    sys.argv = argv
    sys.path[0] = os.path.dirname(path)
    main.__file__, main.__cached__ = path, None
    main.__loader__ = importlib.machinery.SourceFileLoader("__main__", path)
    with open(path, "rb") as f:
        code = compile(f.read(), path, "exec")
    exec(code, vars(main))


def _exit_status(code: object) -> int:
    """The status Python exits with after ``sys.exit(code)``."""
    if code is None:
        return 0
    if isinstance(code, int):
        return code & 0xFF
    print(code, file=sys.stderr)
    return 1


def _shut_down(status: int) -> None:
    """Python's shutdown as a script can observe it (wait for the threads, run the atexit
    callbacks, clear ``__main__`` so that its objects are finalised: files closed and
    flushed, ``__del__`` run; flush), then exit without tearing down torch's modules:
    that teardown would touch every page the child shares with the zygote (0.7 s each
    time). Not emulated: objects only the project's own modules hold are not finalised,
    and every child has the zygote's string-hash seed (set iteration order), so tests
    that compare two runs for determinism also pass with ``TESTS_ZYGOTE=0``."""
    threading._shutdown()
    atexit._run_exitfuncs()
    vars(sys.modules["__main__"]).clear()
    gc.collect()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            status = 120
    if status == -signal.SIGINT:  # an uncaught Ctrl-C: Python ends by the signal
        signal.signal(signal.SIGINT, signal.SIG_DFL)
        os.kill(os.getpid(), signal.SIGINT)
    os._exit(status)


def _serve() -> None:
    """The zygote: import the heavy libraries, then fork one child per request line."""
    for name in PRELOAD:
        importlib.import_module(name)
    gc.freeze()  # the children's collections skip (and so do not copy) the libraries' objects
    requests, replies = os.fdopen(os.dup(0), "rb"), os.dup(1)
    for line in requests:
        request = json.loads(line)
        pid = os.fork()
        if pid == 0:
            requests.close()
            os.close(replies)
            _become(request)
        os.write(replies, json.dumps({"pid": pid}).encode() + b"\n")
        _, status = os.waitpid(pid, 0)
        os.write(replies, json.dumps({"status": os.waitstatus_to_exitcode(status)}).encode()
                 + b"\n")


if __name__ == "__main__":
    _serve()
