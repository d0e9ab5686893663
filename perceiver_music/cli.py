"""Script constants -> command-line options (nanoGPT style, with argparse's --help).

Each script keeps its settings as UPPER_CASE constants at the top, each with a trailing
comment. ``parse_constants`` turns every one into ``--lower_case`` with the constant as
default and the comment as help, so ``--help`` lists them all and users may edit either.
This module imports no torch, so scripts that need none start fast.
"""

from __future__ import annotations

import argparse
import re
import sys
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

    Types follow each default: bool gives ``--x/--no-x``, int, float and str their type, a
    None default takes a string. Unknown options exit with argparse's usual message.
    """
    parser = argparse.ArgumentParser(
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
            kind = str if default is None else type(default)
            parser.add_argument(opt, type=kind, default=default, help=comment, metavar=name)
    return parser.parse_args(sys.argv[1:] if argv is None else argv)


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


def fail(message: str, code: int = 1) -> None:
    """Print one clear line to stderr and exit: the scripts' way to refuse bad input."""
    print(f"error: {message}", file=sys.stderr)
    raise SystemExit(code)
