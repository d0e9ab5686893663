"""The app's Data tab on a big folder: index 10,000 pieces once, then open them again.

Builds a prep.py output folder of N pieces (default 10,000) from an existing one (each
piece linked several times under other names), then times `index_data` the first time
(every token file read), the second (the counts kept in .browse-index.npz), a page of
the table, a search and the figure. Figures only.

    python -m bench.browse [--data data] [--pieces 10000]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # for python bench/NAME.py too

from perceiver_music.browse import index_data  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", default="data", help="a prep.py output folder to copy from")
    parser.add_argument("--pieces", type=int, default=10_000)
    args = parser.parse_args()
    source = Path(args.data).resolve()
    entries = [json.loads(line) for line in (source / "manifest.jsonl").read_text()
               .splitlines()]
    ok = [e for e in entries if e["status"] == "ok"]
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        lines = []
        for k in range(args.pieces):
            e = dict(ok[k % len(ok)])
            copy = k // len(ok)
            e["path"], e["group"] = f"copy{copy}/{e['path']}", f"copy{copy}/{e['group']}"
            name = f"{e['split']}/copy{copy}__{Path(e['output']).name}"
            (folder / e["split"]).mkdir(exist_ok=True)
            os.symlink(source / e["output"], folder / name)
            e["output"] = name
            lines.append(json.dumps(e))
        (folder / "manifest.jsonl").write_text("\n".join(lines) + "\n")
        tokens = sum(e["tokens"] for e in map(json.loads, lines))
        for label in ("first open (reads every token file)", "second open (cached counts)"):
            start = time.perf_counter()
            index = index_data(folder)
            print(f"{label}: {time.perf_counter() - start:.2f} s")
        for label, call in (("a page of 50 rows", lambda: index.table("all", "", 3)),
                            ("a search", lambda: index.table("all", "chopin", 0)),
                            ("the figure", index.figure)):
            start = time.perf_counter()
            call()
            print(f"{label}: {time.perf_counter() - start:.2f} s")
        print(f"{args.pieces:,} pieces, {tokens:,} tokens")


if __name__ == "__main__":
    main()
