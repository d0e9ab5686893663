"""The app page's own cost: CPU that the browser spends on a streamed take.

The browser shares the machine with the generation: on a 2-core laptop every CPU-second the
page spends (redrawing, decoding audio chunks) is one the model could have used. This
starts app.py (``--cpu``), opens its page in headless Chromium (Playwright, as the tests
do), and generates takes of ``--seconds`` of music, quiet and beside busy background
processes (each a pure-Python loop on one core). For each take it prints the wall time of
the generation, the CPU-seconds of the app's processes (the model) and of the browser
over that time, and the browser's share of the two. Every take is the same music (seed 1,
not stopped early when the model ends the piece). Figures only; needs
``pip install -r requirements-dev.txt`` and Chromium.

    python -m bench.app_page [--seconds 20] [--loads 0,1] [--rounds 2]
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import re
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # for python bench/app_page.py too
_HZ = os.sysconf("SC_CLK_TCK")


def tree_cpu(root_pid: int) -> float:
    """CPU-seconds of ``root_pid`` and its live descendants, plus the children they have
    reaped (a page's renderer that ended is counted by the browser that waited for it)."""
    parent, cpu = {}, {}
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:  # ended meanwhile
            continue
        parent[int(pid)] = int(fields[1])
        cpu[int(pid)] = sum(map(int, fields[11:15])) / _HZ  # utime stime cutime cstime
    tree, todo = set(), [root_pid]
    while todo:
        pid = todo.pop()
        tree.add(pid)
        todo += [p for p, q in parent.items() if q == pid and p not in tree]
    return sum(cpu.get(p, 0.0) for p in tree)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=20.0, help="music per take")
    parser.add_argument("--loads", default="0,1", help="busy background processes")
    parser.add_argument("--rounds", type=int, default=2, help="takes per load")
    parser.add_argument("--browser", default="chromium", help="the Chromium program")
    args = parser.parse_args()
    from playwright.sync_api import sync_playwright

    from bench.threads import _busy  # the busy process of the README's load matrix

    port, out = free_port(), Path(os.environ.get("TMPDIR", "/tmp")) / f"app-page-{os.getpid()}"
    app = subprocess.Popen([sys.executable, "app.py", "--port", str(port), "--cpu",
                            "--out_dir", str(out)], cwd=ROOT, stdout=subprocess.DEVNULL,
                           stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    try:
        for _ in range(240):
            try:
                urllib.request.urlopen(url, timeout=5).close()
                break
            except OSError:
                time.sleep(0.5)
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=_which(args.browser),
                                        args=["--no-sandbox", "--disable-gpu",
                                              "--disable-dev-shm-usage"])
            page = browser.new_page(viewport={"width": 1280, "height": 1000})
            page.set_default_timeout(600_000)
            page.goto(url)
            page.locator("#generate").wait_for()
            box = page.locator("#seconds input[type=number]")
            box.fill(f"{args.seconds:g}")
            box.press("Enter")
            page.get_by_text("sampling").click()  # every take the same, and whole
            page.get_by_label("seed (-1: random)").fill("1")
            page.get_by_label("stop when the model ends the piece").uncheck()
            browser_pid = _browser_pid(args.browser)
            print(f"{os.cpu_count()} cores; a {args.seconds:g} s take streamed to the page")
            print(f"{'load':>4} {'wall s':>7} {'app CPU-s':>10} {'browser CPU-s':>14} "
                  f"{'browser share':>14}")
            for load in map(int, args.loads.split(",")):
                ctx = multiprocessing.get_context("spawn")
                busy = [ctx.Process(target=_busy, daemon=True) for _ in range(load)]
                for b in busy:
                    b.start()
                try:
                    for _ in range(args.rounds):
                        a0, b0, t0 = tree_cpu(app.pid), tree_cpu(browser_pid), time.time()
                        page.locator("#generate").click()
                        status = page.locator("#status")  # first this take's line, then its end
                        status.filter(has_text="Generating").wait_for()
                        status.filter(has_text=re.compile("s of new music|Could not")).wait_for()
                        a1, b1, t1 = tree_cpu(app.pid), tree_cpu(browser_pid), time.time()
                        share = (b1 - b0) / max(a1 - a0 + b1 - b0, 1e-9)
                        print(f"{load:>4} {t1 - t0:>7.1f} {a1 - a0:>10.1f} {b1 - b0:>14.1f} "
                              f"{share:>13.0%}", flush=True)
                        time.sleep(args.seconds)  # let it play out before the next take
                finally:
                    for b in busy:
                        b.kill()
            browser.close()
    finally:
        app.terminate()
        app.wait(timeout=60)


def _which(program: str) -> str:
    """The path of ``program`` (a name on PATH or a path)."""
    import shutil

    found = shutil.which(program)
    if found is None:
        raise SystemExit(f"error: {program} not found (apt-get install chromium)")
    return found


def _browser_pid(program: str) -> int:
    """The Chromium that Playwright started: the newest process of ``program`` without a
    ``--type=`` (its renderers, GPU and utility processes have one)."""
    name = Path(_which(program)).resolve().name
    newest = (-1, 0)
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                argv = f.read().split(b"\0")
            with open(f"/proc/{pid}/stat") as f:
                start = int(f.read().rsplit(")", 1)[1].split()[19])
        except OSError:
            continue
        ours = Path(argv[0].decode(errors="replace")).name == name and not any(
            a.startswith(b"--type=") for a in argv)
        if ours and start > newest[0]:
            newest = (start, int(pid))
    if not newest[1]:
        raise SystemExit("error: the browser's process was not found")
    return newest[1]


if __name__ == "__main__":
    main()
