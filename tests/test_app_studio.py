"""app.py without a browser: its options, its generation processes (two at once, one
dying) and its streamed takes (the same files as a take generated whole). Apart from
tests/test_app.py so that the two files can run on two workers."""

from __future__ import annotations

import itertools
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import zygote

from perceiver_music.api import RELEASE, TONALITY
from tests.conftest import DATA

ROOT = Path(__file__).resolve().parent.parent


def test_bad_options_get_one_line(tmp_path):
    """No browser needed: a wrong checkpoint, primer, output folder, port or audio option
    and impossible limits each end with one error line before anything is served (each of
    these used to be accepted, then fail every take or every sound)."""
    import socket

    busy = socket.socket()
    busy.bind(("127.0.0.1", 0))
    busy.listen()
    port = str(busy.getsockname()[1])
    empty = tmp_path / "empty.mid"
    empty.write_bytes(b"")
    cases = [(["--ckpt", str(tmp_path / "missing")], "does not exist"),
             (["--port", port], f"cannot serve on 127.0.0.1:{port}"),
             (["--port", "99999"], "--port must be from 1 to 65535, got 99999"),
             (["--port", "0"], "--port must be from 1 to 65535, got 0"),
             (["--queue_size", "0"], "--queue_size must be at least 1"),
             (["--max_seconds", "0"], "--max_seconds must be above 0 and at most 3600"),
             (["--stream_seconds", "0"], "--stream_seconds must be from 0.1 to 10"),
             (["--primer", str(tmp_path / "none.mid")], "none.mid: primer file not found"),
             (["--primer", str(empty)], "empty.mid: empty file (--primer)"),
             (["--out_dir", "/proc/no-takes-here"],
              "cannot write takes (--out_dir): /proc/no-takes-here"),
             (["--renderer", "foo"], "--renderer must be midirenderer or fluidsynth"),
             (["--soundfont", str(tmp_path / "no.sf2")], "no.sf2: soundfont not found"),
             (["--soundfont", str(empty)], "empty.mid: not a SoundFont")]
    with busy:
        for args, message in cases:
            out = [] if "--out_dir" in args else ["--out_dir", str(tmp_path / "takes")]
            r = zygote.run([sys.executable, "app.py", "--cpu", *out, *args], cwd=ROOT,
                           capture_output=True, text=True, timeout=120)
            lines = r.stderr.strip().splitlines()
            assert r.returncode == 1 and len(lines) == 1 and message in lines[0], r.stderr
            assert "serving" not in r.stdout


def studio_of(tmp_path: Path, *argv: str):
    """app.py's Studio (its generation processes and session logic) with these options."""
    import app

    args = app.parse_constants(app.__file__, vars(app), "", ["--cpu", "--out_dir",
                                                             str(tmp_path), *argv])
    args.ckpt, args.primer = app.bundled(args.ckpt), app.bundled(args.primer)
    return app, app.Studio(args)


SHORT = dict(prime_seconds=4, seconds=3, temperature=1.0, top_k=0, top_p=0, min_p=0,
             greedy=False, beams=1, num_samples=1, seed=3, prefix_len=0, creativity=0,
             release=RELEASE, tonality=TONALITY, stop_at_end=False, int8=False)


def test_two_generations_decode_at_once_in_two_processes(tmp_path):
    """--concurrency 2: two requests decode at the same time, each in its own process
    (threads of one process would share its interpreter lock), and give the same take
    as one generation alone with the same seed."""
    import threading

    app, studio = studio_of(tmp_path, "--concurrency", "2")
    try:
        pids = {proc.pid for proc in studio.workers.procs}
        assert len(pids) == 2 and os.getpid() not in pids
        if sys.platform == "linux":  # forks of one server that imported torch before them
            parents = {Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1]
                       for pid in pids}
            assert len(parents) == 1 and str(os.getpid()) not in parents, parents
            assert "libtorch_cpu" in Path(f"/proc/{parents.pop()}/maps").read_text()
        events: list[tuple[int, str]] = []
        takes: dict[int, object] = {}

        def one(i: int) -> None:
            take, _ = studio.generate(SHORT, DATA / "scn15_4.mid", [],
                                      lambda info: events.append((i, "step")))
            events.append((i, "done"))
            takes[i] = take

        pair = [threading.Thread(target=one, args=(i,)) for i in range(2)]
        for t in pair:
            t.start()
        for t in pair:
            t.join()
        first_done = next(k for k, (_, what) in enumerate(events) if what == "done")
        assert {i for i, what in events[:first_done] if what == "step"} == {0, 1}  # overlap
        alone, _ = studio.generate(SHORT, DATA / "scn15_4.mid", [])
        assert takes[0].tokens == takes[1].tokens == alone.tokens
        # a generation process that dies during a take is named; one found dead is replaced
        started = threading.Event()

        def kill_when_started(info) -> None:
            if not started.is_set():
                started.set()
                for proc in studio.workers.procs:
                    proc.kill()

        with pytest.raises(RuntimeError, match="the generation process stopped"):
            studio.generate({**SHORT, "seconds": 60}, DATA / "scn15_4.mid", [],
                            kill_when_started)
        for proc in studio.workers.procs:
            proc.join()
        for _ in range(2):
            assert studio.generate(SHORT, DATA / "scn15_4.mid", [])[0].tokens == alone.tokens
    finally:
        studio.workers.close()


def test_generation_processes_use_the_apps_own_code_from_any_folder(tmp_path):
    """Started from a folder that holds another copy of the package (an older clone),
    the app's generation processes still import the code beside app.py (Python 3.11's
    fork server imports from its working folder first), and work in the user's folder."""
    stale = tmp_path / "perceiver_music"
    stale.mkdir()
    (stale / "__init__.py").write_text("")
    (stale / "api.py").write_text("raise ImportError('the stale copy was imported')\n")
    probe = tmp_path / "probe.py"
    probe.write_text(f"""import os, sys
sys.path.insert(0, {str(ROOT)!r})
import app

def where(queue):
    import perceiver_music.api
    queue.put((perceiver_music.api.__file__, os.getcwd()))

if __name__ == "__main__":
    ctx = app.process_context()
    queue = ctx.Queue()
    process = ctx.Process(target=where, args=(queue,))
    process.start()
    print(*queue.get(timeout=60))
    process.join()
""")
    # a real process: the app's own start-up, fork server included, as a user starts it
    r = subprocess.run([sys.executable, str(probe)], cwd=tmp_path, capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == [str(ROOT / "perceiver_music" / "api.py"), str(tmp_path)]


def test_a_streamed_take_is_the_take_generated_whole(tmp_path):
    """A take streams to the page as it grows (chunks of audio, the notes so far); its
    files are the same as the API's `generate` + `save` with the same settings write; the
    session's next take (extending it) plays from its last --lead_in seconds and removes
    its chunks."""
    from perceiver_music.api import PerceiverMusic

    app, studio = studio_of(tmp_path / "app")
    try:
        settings = {**SHORT, "seconds": 4, "greedy": True, "release": 6.0, "tonality": 1.5}
        messages = list(studio.stream(settings, DATA / "scn15_4.mid", []))
        take, line = messages[-1][1]
        streamed = take.folder.parent / ".take-1-stream"
        assert any(streamed.glob("chunk-*.wav"))
        studio.args.lead_in = 2.0  # extending the take plays its last 2 s, then the new
        extended = list(studio.stream({**SHORT, "seconds": 1}, None, [take], take))
        first = next(c for kind, c in extended if kind == "chunk" and c["audio"])
        assert first["audio"]["start"] == pytest.approx(first["primer_seconds"] - 2.0)
        assert first["primer_seconds"] == pytest.approx(take.seconds)
        # the session's next take keeps its own chunks and no earlier take's (their
        # audio.wav holds the same music)
        assert not streamed.exists() and (take.folder.parent / ".take-2-stream").is_dir()
    finally:
        studio.workers.close()
    chunks = [value for kind, value in messages if kind == "chunk"]
    assert messages[-1][0] == "take" and "s of new music" in line
    audio = [c["audio"] for c in chunks if c["audio"]]
    assert len(audio) >= 4 and audio[0]["start"] == 0  # the primer plays at once
    assert all(a["end"] == b["start"] for a, b in itertools.pairwise(audio))  # no gap
    assert chunks[-1]["seconds"] == pytest.approx(take.seconds - 4.0)  # after a 4 s primer
    assert chunks[-1]["seconds"] >= 4.0
    assert len(chunks[-1]["notes"]) > len(chunks[0]["notes"]) > 0
    whole = PerceiverMusic.from_pretrained(app.bundled("ckpt/demo"), device="cpu").generate(
        DATA / "scn15_4.mid", seconds=4, prime_seconds=4, greedy=True, seed=3,
        stop_at_end=False, release=6.0, tonality=1.5)
    whole.save(tmp_path / "whole")
    generation = json.loads((take.folder / "generation.json").read_text())["generation"]
    assert generation["release"] == 6.0  # every setting of the page reaches the take
    assert generation["tonality"] == 1.5
    for name in ("full.mid", "continuation.mid", "audio.wav"):
        assert (take.folder / name).read_bytes() == (tmp_path / "whole" / name).read_bytes()


def test_the_take_line_says_beam_search_and_a_token_limit(tmp_path):
    """A beam-search take has no seed to show, and a take that the token limit ended
    before its seconds says so (as generate.py's note does)."""
    import app

    done = {"tokens": [1, 2], "seconds": 0.5, "new_tokens": 300, "samples": 1,
            "generate_s": 1.0, "seed": None, "primer_note": "from scratch",
            "primer_seconds": 0.0, "problems": [], "stopped": False, "token_limit": True}

    class Done:
        def run(self, fn, job, job_id):
            yield "done", done

    studio = app.Studio.__new__(app.Studio)
    studio.args = app.parse_constants(app.__file__, vars(app), "", ["--out_dir",
                                                                     str(tmp_path)])
    studio.out, studio.workers = tmp_path, Done()
    take, line = studio.generate({**SHORT, "beams": 4, "seconds": 2}, None, [])
    assert take.label == "take 1: 0 s, beam search" and "seed" not in line, line
    assert "token limit before 2 s of music" in line, line
    done.update(seed=5, token_limit=False)
    take, line = studio.generate({**SHORT, "seconds": 2}, None, [])
    assert take.label == "take 1: 0 s, seed 5" and "token limit" not in line, line


def test_the_runs_tab_says_why_it_lists_no_run(tmp_path):
    """A missing --runs_dir, or one with no run in it, is explained in the Runs tab (as the
    Data tab explains a missing data folder); a folder with a run needs no note."""
    import app

    def note(runs_dir: Path) -> str:
        args = app.parse_constants(app.__file__, vars(app), "", [
            "--runs_dir", str(runs_dir), "--out_dir", str(tmp_path / "out")])
        browser = app.Browser(args)
        return browser.runs_note(len(browser.run_table()[0]))

    assert "does not exist" in note(tmp_path / "missing") and "--runs_dir" in note(
        tmp_path / "missing")
    (tmp_path / "runs" / "r1").mkdir(parents=True)
    assert note(tmp_path / "runs").startswith("No training run in")
    (tmp_path / "runs" / "r1" / "metrics.csv").write_text("step,train_loss\n1,5.0\n")
    assert note(tmp_path / "runs") == ""


def test_gradio_is_imported_without_its_stub_writer(tmp_path):
    """app.py imports Gradio without the .pyi stubs Gradio writes beside the source of each
    component class as it is made (half of its import's CPU time at each start of the app):
    a component class made after it gets no stub file beside its module."""
    (tmp_path / "probe.py").write_text(
        "import sys\nsys.path.insert(0, sys.argv[1])\nimport app\ngr = app.import_gradio()\n"
        "class Mine(gr.Textbox):\n    pass\n\nprint(Mine().label)\n")
    r = zygote.run([sys.executable, "probe.py", str(ROOT)], cwd=tmp_path, capture_output=True,
                   text=True, timeout=300)
    assert r.returncode == 0 and r.stdout == "None\n", r.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["probe.py"]
