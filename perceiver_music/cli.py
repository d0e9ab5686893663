"""Script constants -> command-line options (nanoGPT style, with argparse's --help).

Each script keeps its settings as UPPER_CASE constants at the top, each with a trailing
comment. ``parse_constants`` turns every one into ``--lower_case`` with the constant as
default and the comment as help, so ``--help`` lists them all and users may edit either.
This module imports no torch, so scripts that need none start fast.
"""

from __future__ import annotations

import argparse
import errno
import math
import os
import re
import sys
import time
from collections.abc import Callable
from pathlib import Path

_CONSTANT = re.compile(r"^([A-Z][A-Z0-9_]*)\s*(?::[^=]+)?=\s*(.+?)\s*(?:#\s*(.*))?$")


def script_constants(script: str | Path) -> dict[str, str]:
    """Map each top-level UPPER_CASE assignment of ``script`` to its trailing comment."""
    out = {}
    for line in Path(script).read_text().splitlines():
        m = _CONSTANT.match(line)
        if m:
            out[m.group(1)] = (m.group(3) or "").strip()
    return out


def parse_constants(
    script: str | Path,
    namespace: dict,
    description: str | None = None,
    argv: list[str] | None = None,
) -> argparse.Namespace:
    """Parse ``argv`` (default: sys.argv[1:]) into options named after the script's
    constants found in ``namespace`` (the script's ``globals()``).

    Types follow each default: bool gives ``--x/--no-x``, int and str their type, float a
    finite number (nan and inf are refused here, so no script meets them), a None default
    takes a string. Unknown options and bad values exit with argparse's usual message.
    """
    parser = OneLineParser(
        prog=Path(script).name,
        description=description,
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    for name, comment in script_constants(script).items():
        if name not in namespace:
            continue
        default = namespace[name]
        opt = "--" + name.lower()
        if isinstance(default, bool):
            parser.add_argument(
                opt, default=default, help=comment, action=argparse.BooleanOptionalAction
            )
        elif isinstance(default, int | float | str) or default is None:
            kind = str if default is None else finite if isinstance(default, float) else type(
                default)
            parser.add_argument(opt, type=kind, default=default, help=comment, metavar=name)
    return parser.parse_args(sys.argv[1:] if argv is None else argv)


def given_options(argv: list[str] | None = None) -> set[str]:
    """The options on the command line (default: sys.argv[1:]) by their constant's name in
    lower case: "--min_lr 1e-5" and "--min_lr=1e-5" give "min_lr", "--no-resume" gives
    "resume". What a value is when it was not given is the script's choice."""
    names = set()
    for arg in sys.argv[1:] if argv is None else argv:
        if arg.startswith("--") and len(arg) > 2:
            name = arg[2:].split("=", 1)[0]
            names.add(name[3:] if name.startswith("no-") else name)
    return names


class OneLineParser(argparse.ArgumentParser):
    """argparse whose refusals (an unknown option, a bad value) are one ``error:`` line that
    points to ``--help``, like every other refusal of the scripts, not a usage block. An
    option is written in full: an abbreviation (``--max_min``) is refused, so that what
    was given is what `given_options` sees."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, allow_abbrev=False, **kwargs)

    def error(self, message: str) -> None:  # type: ignore[override]
        print(f"{self.prog}: error: {printable(message)} (--help lists the options)",
              file=sys.stderr)
        raise SystemExit(2)


def finite(text: str) -> float:
    """A float option's value: any finite number ("nan" and "inf" are refused)."""
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(text)
    return value


finite.__name__ = "finite number"  # argparse's message: "invalid finite number value: 'nan'"


def bundled(path: str) -> str:
    """``path`` as given, or inside the toolkit's folder when it is a relative path that
    exists only there (so the defaults, such as ckpt/demo, work from any folder)."""
    here = Path(__file__).resolve().parent.parent / path
    return str(here) if path and not Path(path).exists() and here.exists() else path


def cpu_only(requested: bool) -> bool:
    """Whether accelerate must be told ``cpu=True``: when asked, or when the machine has no
    accelerator (CUDA, MPS, or an installed torch_xla), so that ``accelerate launch`` of
    several processes also runs on a CPU-only machine. Imports torch when called."""
    import importlib.util

    import torch

    return requested or not (
        torch.cuda.is_available()
        or importlib.util.find_spec("torch_xla") is not None
        or torch.backends.mps.is_available()
    )


def launched_rank() -> int:
    """This process's rank under ``accelerate launch`` / torchrun (0 when run directly)."""
    try:
        return int(os.environ.get("RANK", "0"))
    except ValueError:
        return 0


def fail(message: str, code: int = 1, every_rank: bool = False) -> None:
    """Print one clear line to stderr and exit: the scripts' way to refuse bad input.

    Under a launcher only rank 0 prints, so that a problem every process meets (a bad
    setting, a missing file) is reported once, not once per process; ``every_rank`` is for
    problems one process may meet alone. The other ranks wait up to `FAIL_GRACE_S` before
    they exit: the launcher stops every process once one has failed, and a rank that got
    there first would stop rank 0 before it printed the line (seen on a busy 2-core VM).
    """
    if every_rank or launched_rank() == 0:
        print(f"error: {printable(message)}", file=sys.stderr)
    else:
        time.sleep(FAIL_GRACE_S)  # ended sooner by the launcher once rank 0 has exited
    raise SystemExit(code)


FAIL_GRACE_S = 10.0


def printable(text: str) -> str:
    """``text`` with undecodable file-name bytes (surrogate escapes) shown as U+FFFD and
    control characters other than line breaks escaped (``\\x1b``), so that printing a name
    from any file system never fails, and a name holding ESC cannot recolour the terminal."""
    text = text.encode("utf-8", "surrogateescape").decode("utf-8", "replace")
    return "".join(c if c.isprintable() or c == "\n" else repr(c)[1:-1] for c in text)


def os_error_message(err: OSError, path: str | os.PathLike | None = None) -> str:
    """One line for a failed file operation: the file (the error's own, else ``path``),
    the system's reason, and what to do for a full disk or a read-only place."""
    name = err.filename if err.filename is not None else path
    where = f"{name}: " if name is not None else ""
    reason = err.strerror or str(err)
    if err.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
        reason += " (free some space, or write elsewhere)"
    elif err.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        reason += " (choose a folder you can write to)"
    return f"{where}{reason}"


def check_writable(folder: Path, what: str) -> None:
    """Create ``folder`` if needed and fail at once, in one line, when this user cannot
    write in it (``what`` says what would have been lost), before any work is done."""
    import tempfile

    file = next((p for p in (folder, *folder.parents) if p.exists() and not p.is_dir()), None)
    if file is not None:  # else mkdir's "File exists" or "Not a directory"
        fail(f"cannot write {what}: {file} is a file, not a folder")
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as exc:  # named as the folder, not the probe's temporary name
        named = exc if exc.filename == str(folder) else OSError(exc.errno, exc.strerror,
                                                                str(folder))
        fail(f"cannot write {what}: {os_error_message(named)}")


def run_script(main: Callable[[], object], interrupted: str = "interrupted (Ctrl-C)") -> None:
    """Run a script's ``main`` so that whatever happens ends in one ``error:`` line, never
    a traceback: Ctrl-C exits with status 130 and the ``interrupted`` line (a
    KeyboardInterrupt raised with a status, as train.py's second stop signal, exits with
    that), a failed file operation (disk full, read-only folder...) and running out of
    memory with status 1. ``main`` removes its own temporary files on the way out (its
    ``finally`` blocks run before this reports)."""
    try:
        main()
    except KeyboardInterrupt as stop:
        print(file=sys.stderr)  # end the progress bar's line
        fail(interrupted, stop.args[0] if stop.args and type(stop.args[0]) is int else 130)
    except OSError as err:
        fail(os_error_message(err), every_rank=True)
    except MemoryError:
        fail("out of memory: try smaller settings (batch size, samples, lengths)",
             every_rank=True)
