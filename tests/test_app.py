"""app.py as a user meets it: the app runs on a free local port with the bundled demo model and
a real headless Chromium (the system package, driven by Playwright) uploads a primer,
generates, listens, downloads, extends, and tries bad files and a full queue.

Without Chromium or Playwright these tests are skipped, unless REQUIRE_BROWSER=1 (CI sets
it) makes that a failure. APP_SCREENSHOT_DIR=folder saves the README's pictures there:
app.png (after the first take), app-data.png and app-runs.png (the other two tabs).
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import re
import shutil
import subprocess
import sys
import time
import urllib.request
import wave
from pathlib import Path

import numpy as np
import pretty_midi
import pytest
import zygote

from perceiver_music.api import RELEASE, TONALITY
from tests.conftest import DATA, free_port

ROOT = Path(__file__).resolve().parent.parent
BROWSER = shutil.which("chromium") or shutil.which("chromium-browser")
WAIT_MS = 120_000  # the longest any step may take on a slow 2-core machine


def _need(condition: bool, why: str) -> None:
    if not condition:
        if os.environ.get("REQUIRE_BROWSER") == "1":
            pytest.fail(f"REQUIRE_BROWSER=1 but {why}")
        pytest.skip(why)


@pytest.fixture(scope="module")
def app_out(tmp_path_factory) -> Path:
    """The app's output folder (alone in a folder of its own, to see what lands beside)."""
    return tmp_path_factory.mktemp("app") / "out"


@pytest.fixture(scope="module")
def browse_dirs(tmp_path_factory) -> tuple[Path, Path]:
    """What the Data and Runs tabs show: prep.py's output for the bundled pieces and a
    file that is not MIDI, and a folder holding one short training run on it."""
    src, data = tmp_path_factory.mktemp("midi"), tmp_path_factory.mktemp("browse") / "data"
    for f in DATA.glob("*.mid"):
        shutil.copy(f, src / f.name)
    (src / "broken.mid").write_bytes(b"MThd but not MIDI")
    runs = data.parent / "runs"
    for cmd in (["prep.py", "--input", src, "--output", data, "--val_share", "0.2",
                 "--test_share", "0.2"],
                ["train.py", "--data_dir", data, "--out_dir", runs / "tiny-run", "--preset",
                 "tiny", "--max_steps", "20", "--eval_interval", "10", "--log_interval", "5",
                 "--no-tensorboard"]):
        r = zygote.run([sys.executable, *map(str, cmd)], cwd=ROOT, capture_output=True,
                       text=True, timeout=300)
        assert r.returncode == 0, r.stderr
    return data, runs


@pytest.fixture(scope="module")
def app_url(app_out, browse_dirs):
    """The app on a free port: uploads up to 50 KB, one generation at a time, one waiting;
    the Data and Runs tabs on `browse_dirs`."""
    out = app_out
    port = free_port()
    cmd = [sys.executable, "app.py", "--port", str(port), "--out_dir", str(out), "--cpu",
           "--max_upload_mb", "0.05", "--queue_size", "1", "--max_seconds", "60",
           "--data_dir", str(browse_dirs[0]), "--runs_dir", str(browse_dirs[1])]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "GRADIO_ANALYTICS_ENABLED": "False"}
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while True:
        try:
            with urllib.request.urlopen(url, timeout=5) as r:
                if r.status == 200:
                    break
        except OSError:
            pass
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            pytest.fail(f"app.py did not start: {proc.communicate()[0][-3000:]}")
        time.sleep(0.5)
    yield url
    proc.terminate()  # SIGTERM stops the app as Ctrl-C does, leaving nothing behind
    log = proc.communicate(timeout=30)[0]
    assert "Traceback" not in log and "leaked" not in log, log[-3000:]
    assert "stopped after" in log and proc.returncode == 0, log[-3000:]
    assert not (ROOT / "app.pyi").exists()  # Gradio writes one beside a component class


@pytest.fixture(scope="module")
def browser():
    _need(BROWSER is not None, "no chromium on PATH (apt-get install chromium)")
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        _need(False, "playwright is not installed (pip install -r requirements-dev.txt)")
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=BROWSER, args=[
            "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--no-first-run",
            "--disable-background-networking", "--disable-component-update", "--disable-sync"])
        yield b
        b.close()


_CONTEXTS: list = []  # the users of the running test, closed after it (`close_users`)


@pytest.fixture(autouse=True)
def close_users():
    """Close the test's browser pages after it: a Gradio page left open keeps running its
    scripts, and a dozen of them took a core's share from the later tests."""
    yield
    while _CONTEXTS:
        with contextlib.suppress(Exception):  # a page that crashed: close the others anyway
            _CONTEXTS.pop().close()


def open_page(browser, url: str):
    """A new user: its own browser context (cookies, session) and a loaded page."""
    context = browser.new_context(viewport={"width": 1280, "height": 1000})
    _CONTEXTS.append(context)
    page = context.new_page()
    page.set_default_timeout(WAIT_MS)
    page.goto(url)
    page.locator("#generate").wait_for()
    # the player's clock line, which Gradio mounts after the buttons on a busy machine
    page.locator("#live-clock").wait_for(state="attached")
    return page


def decoded_width(page, selector: str) -> int:
    """The natural width of the picture at `selector` once the browser has decoded it (a
    picture that never loads fails the wait): a real image, not just an <img> element."""
    page.wait_for_function(
        "s => { const i = document.querySelector(s);"
        " return i !== null && i.complete && i.naturalWidth > 0 }", arg=selector)
    return page.locator(selector).evaluate("i => i.naturalWidth")


def set_number(page, elem_id: str, value: float) -> None:
    box = page.locator(f"#{elem_id} input[type=number]")
    box.fill(str(value))
    box.press("Enter")


def upload(page, path: Path) -> None:
    """Choose "upload a MIDI file" and put ``path`` in the file box (clearing an old one).

    The box appears when the radio's change event comes back from the server; a file
    set while Gradio is still mounting it can be dropped, so the file is set again when
    its name has not shown up within a few seconds."""
    page.get_by_label("upload a MIDI file").check()
    page.locator("#upload").wait_for(state="visible")
    clear = page.locator("#upload button[aria-label=Clear]")
    if clear.count():
        clear.click()
    name = page.locator("#upload").get_by_text(path.name)
    for attempt in range(3):
        if attempt and clear.count():  # it took the file after all, or another: clear it
            if name.count():
                return
            clear.click()
        page.locator("#upload input[type=file]").set_input_files(str(path))
        try:
            name.wait_for(timeout=10_000 if attempt < 2 else WAIT_MS)
            return
        except Exception:  # playwright's TimeoutError: try once more
            if attempt == 2:
                raise


def wait_status(page, pattern: str) -> str:
    """Wait until the status line matches ``pattern`` (a regular expression); return it."""
    page.locator("#status").filter(has_text=re.compile(pattern)).wait_for()
    return page.locator("#status").inner_text()


def download(page, name: str) -> bytes:
    """Click the download link of ``name`` as a user would and return the file's bytes."""
    with page.expect_download() as info:
        page.locator(f"#downloads a[download='{name}']").click()
    return Path(info.value.path()).read_bytes()


def notes_of(midi: bytes) -> list[tuple[int, float]]:
    pm = pretty_midi.PrettyMIDI(io.BytesIO(midi))
    return sorted((n.pitch, round(n.start, 2)) for i in pm.instruments for n in i.notes)


def test_upload_generate_listen_download_extend(app_url, browser, tmp_path):
    page = open_page(browser, app_url)
    upload(page, DATA / "scn15_4.mid")
    set_number(page, "prime-seconds", 10)
    set_number(page, "seconds", 8)
    page.locator("#generate").click()
    line = wait_status(page, r"s of new music")
    assert "first 10 s of scn15_4.mid" in line, line

    # The audio plays in the page: the player has loaded the WAV and shows its length.
    page.locator("#audio audio[src]").wait_for(state="attached")
    shown = page.locator("#audio #duration").filter(has_text=re.compile(r"^0:(0[1-9]|[1-5]\d)$"))
    minutes, seconds = shown.inner_text().split(":")
    player_seconds = 60 * int(minutes) + int(seconds)
    # The piano roll is a real, decoded picture.
    width = decoded_width(page, "#roll img")
    assert width >= 1000, width
    if os.environ.get("APP_SCREENSHOT_DIR"):
        page.screenshot(path=Path(os.environ["APP_SCREENSHOT_DIR"]) / "app.png",
                        full_page=True)

    names = page.locator("#downloads a[download]").evaluate_all(
        "links => links.map(a => a.getAttribute('download'))")
    assert sorted(names) == ["audio.wav", "continuation.mid", "full.mid"], names
    full = download(page, "full.mid")
    first_notes = notes_of(full)
    end = pretty_midi.PrettyMIDI(io.BytesIO(full)).get_end_time()
    assert len(first_notes) > 20 and 10 < end < 25, (len(first_notes), end)
    with wave.open(io.BytesIO(download(page, "audio.wav"))) as w:
        pcm = np.frombuffer(w.readframes(w.getnframes()), np.int16)
        wav_seconds = w.getnframes() / w.getframerate()
    assert end - 0.5 < wav_seconds < end + 4, (wav_seconds, end)  # plus the release tail
    assert abs(player_seconds - wav_seconds) <= 1, (player_seconds, wav_seconds)
    assert np.sqrt(np.mean(pcm.astype(np.float64) ** 2)) > 300  # audible, not silence

    # Extend: take 2 continues take 1, which it holds unchanged at its start.
    page.locator("#extend").click()
    assert "take 1 extended by" in wait_status(page, r"extended by")
    assert page.locator("#takes input").input_value().startswith("take 2")
    longer = download(page, "full.mid")
    assert pretty_midi.PrettyMIDI(io.BytesIO(longer)).get_end_time() > end + 1
    kept = [n for n in notes_of(longer) if n[1] < end - 1]
    assert kept == [n for n in first_notes if n[1] < end - 1]

    # The history: choosing take 1 again brings back its files.
    page.locator("#takes input").click()
    page.get_by_role("option", name=re.compile(r"^take 1")).click()
    wait_status(page, r"take 1: ")
    assert page.locator("#live-clock").inner_text() == ""  # the live roll no longer
    assert page.evaluate("window.pmLive.position()") == 0  # plays take 2
    assert notes_of(download(page, "full.mid")) == first_notes
    # The downloads are read-only: no button offers to remove a file.
    removers = page.locator('#downloads button[aria-label="Remove this file"]')
    assert all(not removers.nth(i).is_visible() for i in range(removers.count()))

    # A failed request leaves nothing of the earlier take on screen as if it were its own.
    bad = tmp_path / "bad.mid"
    bad.write_bytes(b"not MIDI at all")
    upload(page, bad)
    page.locator("#generate").click()
    wait_status(page, r"Could not generate")
    assert page.locator("#audio audio[src]").count() == 0
    assert page.locator("#roll img").count() == 0
    assert page.locator("#downloads a[download]").count() == 0


NO_FILE = r"Could not generate: choose a MIDI file to upload first"
BAD_UPLOADS = [  # content, name, the page's message, the status line after it
    (b"this is not MIDI", "notes.mid", r"notes\.mid: not a MIDI file", r"notes\.mid: not a MIDI"),
    (b"MThd" + bytes(60_000), "huge.mid", r"exceed the maximum allowed size", NO_FILE),
    (b"", "empty.mid", r"empty\.mid: empty file", r"empty\.mid: empty file"),
    (b"hello", "notes.txt", r"Invalid file type", NO_FILE),
]  # in an order where each status line differs from the one before it


def test_bad_uploads_get_a_message(app_url, browser, tmp_path):
    """Each bad upload, one after another in one page, gets a message (the browser refuses
    a file too big or of the wrong type before it is sent, and the app says no file was
    chosen); the page then still works."""
    page = open_page(browser, app_url)
    page.get_by_label("upload a MIDI file").check()
    page.locator("#upload").wait_for(state="visible")
    clear = page.locator("#upload button[aria-label=Clear]")
    for content, name, message, status in BAD_UPLOADS:
        bad = tmp_path / name
        bad.write_bytes(content)
        if status == NO_FILE:  # the browser refuses it: no name ever shows
            if clear.count():  # the file of the case before
                clear.click()
                clear.wait_for(state="detached")
            page.locator("#upload input[type=file]").set_input_files(str(bad))
        else:  # sent: wait until the box holds it (a click before then finds no file)
            upload(page, bad)
        page.locator("#generate").click()
        page.locator("body").filter(has_text=re.compile(message)).wait_for()
        # the click's own answer: until it comes, Gradio ignores further clicks of the button
        assert "Could not generate" in wait_status(page, status), name
        assert str(tmp_path) not in page.locator("#status").inner_text()
    page.locator("#seconds input[type=number]").fill("2")  # the page still works
    page.get_by_label("bundled primer").check()
    page.locator("#generate").click()
    wait_status(page, r"s of new music")


def test_progress_and_a_bounded_queue(app_url, browser):
    """While one user generates, the page shows its progress; a second user's page loads
    and waits in the queue (then decodes with int8 weights); a third, beyond the bound, is
    told the app is busy."""
    from playwright.sync_api import expect

    first, second, third = (open_page(browser, app_url) for _ in range(3))
    for page, seconds in ((first, 30), (second, 3), (third, 3)):
        set_number(page, "seconds", seconds)
    first.get_by_text("sampling").click()  # 30 s in all: the model may not end it sooner
    first.get_by_label("stop when the model ends the piece").uncheck()
    first.locator("#generate").click()
    # scrolled down to the sampling settings, the click brings the status line, the player
    # and the buttons (Stop) into sight
    first.wait_for_function("""() => [...document.querySelectorAll('#status, #live-roll, #stop')]
        .every(e => { const r = e.getBoundingClientRect();
                      return r.top >= 0 && r.bottom <= window.innerHeight; })""")
    progress = re.compile(r"\d+ tokens, [\d.]+ s of music")
    # shown once, in the status (not also over the audio and the roll); between a chunk and
    # the next progress report Gradio shows its own timer there for a moment
    expect(first.locator("#status")).to_contain_text(progress, timeout=WAIT_MS)
    expect(first.get_by_text(progress)).to_have_count(1, timeout=WAIT_MS)
    second.get_by_text("sampling").click()  # the second user decodes with int8 weights
    second.get_by_label("int8 weights").check()
    second.locator("#generate").click()
    second.locator("#status").filter(has_text=re.compile(r"queue: 1/1")).wait_for()
    third.locator("#generate").click()
    third.get_by_text("This application is currently busy").first.wait_for()
    wait_status(first, r"s of new music")
    stream = stream_stats(first)  # the 30 s take played while it was generated
    print(f"30 s take: first sound {stream['first'] - stream['clicked']:.0f} ms after the "
          f"click, {stream['chunks']} chunks, {stream['underruns']} underruns")
    # no gap in the sound, unless the music came slower than the player allowed for when
    # it started (a machine busier than when the take began)
    assert all(stream["slowed"]), (stream["gaps"], stream["slowed"])
    assert stream["until"] >= 30 and stream["first"] > stream["clicked"]
    if os.environ.get("APP_STREAM_STATS"):
        Path(os.environ["APP_STREAM_STATS"]).write_text(json.dumps(stream))
    wait_status(second, r"s of new music")
    refused = third.locator("#status").inner_text()  # marked as an error, no take
    assert "Ready." in refused and "new music" not in refused, refused


def test_data_and_runs_tabs(app_url, browser, browse_dirs):
    """The Data tab lists what prep.py made (the failed file with its reason), filters
    and pages it, draws the data, and opens a piece (piano roll, audio, tokens); the Runs
    tab lists the run with its best validation loss and curves, and follows it as it
    grows."""
    page = open_page(browser, app_url)
    page.get_by_role("tab", name="Data").click()
    assert "6 file(s) match" in page.locator("#data-counts").filter(
        has_text="match").inner_text()
    page.locator("#data-plot img, #data-plot canvas").first.wait_for()
    page.locator("#data-split input").click()
    page.get_by_role("option", name="failed").click()
    page.locator("#data-counts").filter(has_text="1 file(s) match").wait_for()
    assert "broken.mid" in page.locator("#data-table").inner_text()
    assert "failed: truncated MIDI header" in page.locator("#data-table").inner_text()
    page.locator("#data-split input").click()
    page.get_by_role("option", name="all").click()
    box = page.locator("#data-query textarea, #data-query input").first
    box.fill("scn15")
    box.press("Enter")
    page.locator("#data-counts").filter(has_text="1 file(s) match").wait_for()
    number = page.locator("#data-page input")  # a page past the last: the last, shown
    number.fill("5")
    number.press("Enter")
    page.wait_for_function("document.querySelector('#data-page input').value === '1'")
    assert "page 1 of 1" in page.locator("#data-counts").inner_text()
    page.locator("#data-table [data-testid=cell-0-4]").click()
    line = page.locator("#piece-line").filter(has_text="tokens").inner_text()
    assert "scn15" in line and "notes" in line and not line.startswith(":"), line
    width = decoded_width(page, "#piece-roll img")
    assert width >= 1000, width
    page.locator("#piece-audio audio[src]").wait_for(state="attached")
    assert "NOTE_ON" in page.locator("#piece-tokens textarea").input_value()
    if os.environ.get("APP_SCREENSHOT_DIR"):
        page.screenshot(path=Path(os.environ["APP_SCREENSHOT_DIR"]) / "app-data.png",
                        full_page=True)

    page.get_by_role("tab", name="Runs").click()
    table = page.locator("#runs-table")
    table.filter(has_text="tiny-run").wait_for()
    page.locator("#runs-plot img, #runs-plot canvas").first.wait_for()
    metrics = browse_dirs[1] / "tiny-run" / "metrics.csv"
    with open(metrics, "a") as f:  # the run goes on: a new, better validation
        f.write("30,1.5,1.25,1e-4,1000,99.0\n")
    table.filter(has_text="1.250 (step 30)").wait_for(timeout=30_000)  # refreshed
    if os.environ.get("APP_SCREENSHOT_DIR"):
        page.screenshot(path=Path(os.environ["APP_SCREENSHOT_DIR"]) / "app-runs.png",
                        full_page=True)


def stream_stats(page) -> dict:
    """The page's player figures (PLAYER_JS) once the take is done and every chunk it was
    sent is scheduled: after that no underrun can happen."""
    page.wait_for_function("() => window.pmStats && window.pmStats.first !== null && "
                           "window.pmStats.chunks === window.pmLive.sent()")
    return page.evaluate("() => window.pmStats")


def silent_wav_url(seconds: float = 1.0, rate: int = 8000) -> str:
    """A data: URL of ``seconds`` of silence as 16-bit mono WAV (the player fetches it)."""
    import base64

    from perceiver_music.render import wav_bytes

    wav = wav_bytes(np.zeros((int(seconds * rate), 1)), rate)
    return "data:audio/wav;base64," + base64.b64encode(wav).decode()


def test_the_player_waits_until_a_slow_take_can_play_through(app_url, browser):
    """Music that comes at half the speed it plays is held until what is held lasts to the
    take's end at that pace (less the player's 20 % margin), plus a chunk and half a second:
    the take then plays through; a take that is done plays what is held at once."""
    page = open_page(browser, app_url)
    url = silent_wav_url()

    def send(take: str, count: int, rate: float, until: float, done: bool = False) -> dict:
        chunks = [{"url": url, "start": i, "end": i + 1, "rate": rate, "wall": (i + 1) / rate,
                   "until": until, "step": 1} for i in range(count)]
        page.evaluate("v => window.pmLive.update(v)",
                      {"id": take, "chunks": chunks, "notes": [], "primer": 0, "done": done})
        page.wait_for_function("n => window.pmStats.chunks + window.pmLive.held() === n",
                               arg=count)
        return page.evaluate("() => window.pmStats")

    # rate 0.5, margin 0.8: k chunks held are enough once k >= 1.5 (10 - k) + 1.5, k = 7
    stats = send("slow", 6, 0.5, 10)
    assert stats["first"] is None and stats["chunks"] == 0
    assert "buffering" in page.locator("#live-clock").inner_text()
    stats = send("slow", 7, 0.5, 10)
    assert stats["first"] is not None and stats["chunks"] == 7
    stats = send("slow", 8, 0.5, 10)  # the next comes while the held ones play
    assert stats["chunks"] == 8 and stats["underruns"] == 0
    assert stats["until"] == pytest.approx(8, abs=0.01)
    stats = send("crawl", 2, 0.1, 30)
    assert stats["first"] is None
    stats = send("crawl", 2, 0.1, 30, done=True)
    assert stats["first"] is not None and stats["chunks"] == 2


def test_stop_keeps_what_was_heard(app_url, browser, app_out):
    """Stop while a take plays: the sound stops at once and the take keeps the music
    heard up to then (its files say so), not what was generated beyond it."""
    page = open_page(browser, app_url)
    set_number(page, "prime-seconds", 4)
    set_number(page, "seconds", 60)
    page.get_by_text("sampling").click()
    page.get_by_label("stop when the model ends the piece").uncheck()
    page.locator("#generate").click()
    # 4 s of primer + new (on a busy machine the player first waits until it can play on)
    page.wait_for_function("() => window.pmLive.position() > 6", timeout=3 * WAIT_MS)
    page.locator("#stop").click()
    line = wait_status(page, r"stopped where you stopped listening")
    heard = page.evaluate("() => window.pmStats.until")
    new = float(re.search(r"([\d.]+) s of new music", line).group(1))
    assert 6 <= heard < 40 and abs(new - (heard - 4)) < 0.5, (heard, line)
    take = max(app_out.glob("*/take-*"), key=lambda p: p.stat().st_mtime)
    report = json.loads((take / "generation.json").read_text())
    assert report["samples"][0]["stop_reason"] == "stopped"
    notes = pretty_midi.PrettyMIDI(str(take / "continuation.mid")).instruments[0].notes
    # nothing after what was heard (the line rounds seconds to a tenth)
    assert notes and max(n.start for n in notes) <= new + 0.05
    assert "Generating" not in page.locator("#status").inner_text()


def api_call(url: str, session: str, upload: tuple[str, bytes] | None = None,
             **settings) -> str:
    """The app's HTTP API as any client can call it (raw JSON, NaN included), with a
    session id of its choosing and the bundled primer or an ``upload`` (name, bytes);
    returns the status line, or "error: " and the message of a request Gradio refused."""
    import json

    values = dict(prime_s=4, length=1, temp=1.0, k=0, p=0, min_p_=0, greedy_=False, width=1,
                  samples=1, seed_=1, prefix=0, bias=0, release_=RELEASE,
                  tonality_=TONALITY, stop=True, int8_=False)
    values.update(settings)
    source, primer = "bundled primer", None
    if upload:
        name, content = upload
        form = (b"--pm\r\nContent-Disposition: form-data; name=\"files\"; filename=\""
                + name.encode() + b"\"\r\n\r\n" + content + b"\r\n--pm--\r\n")
        sent = urllib.request.Request(f"{url}/gradio_api/upload", form,
                                      {"Content-Type": "multipart/form-data; boundary=pm"})
        with urllib.request.urlopen(sent, timeout=60) as r:
            path = json.loads(r.read())[0]
        source = "upload a MIDI file"
        primer = {"path": path, "orig_name": name, "meta": {"_type": "gradio.FileData"}}
    body = json.dumps({"data": [source, primer, None, None, *values.values()],
                       "session_hash": session}).encode()
    request = urllib.request.Request(f"{url}/gradio_api/call/generate", body,
                                     {"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=60) as r:
        event = json.loads(r.read())["event_id"]
    with urllib.request.urlopen(f"{url}/gradio_api/call/generate/{event}", timeout=300) as r:
        lines = r.read().decode().splitlines()
    data = [json.loads(line[6:]) for line in lines if line.startswith("data: ")]
    if "event: error" in lines:
        return f"error: {data[-1]['error']}"
    assert "event: complete" in lines, lines
    return data[-1][0]


def test_no_client_input_becomes_a_path(app_url, app_out, tmp_path):
    """Gradio's session hash is the client's to choose: traversal and absolute values
    still write each session's takes to a folder the server names, inside the output
    folder, and NaN or huge numbers are refused naming the setting; so is a file of
    another type, sent past the page (which refuses it itself), without a traceback in
    the app's terminal (the fixture's end reads its log)."""
    line = api_call(app_url, "x", upload=("notes.txt", b"hello"))
    assert line.startswith("error: Invalid file type"), line
    assert "s of new music" in api_call(app_url, "x", upload=(
        "scn15_4.mid", (DATA / "scn15_4.mid").read_bytes()))  # the same way, a MIDI file
    outside = tmp_path / "absolute"
    hostile = ["../../escaped", "..", str(outside), "/" + str(outside), "a/../../../b", "."]
    for session in hostile:
        assert "s of new music" in api_call(app_url, session)
    assert not outside.exists() and not (tmp_path / "b").exists()
    assert sorted(p.name for p in app_out.parent.iterdir()) == ["out"]
    folders = [p for p in app_out.iterdir() if p.name != "browse"]  # the Data tab's files
    assert all(re.fullmatch(r"[0-9a-f]{32}", p.name) and p.is_dir() for p in folders)
    assert len(folders) >= len(hostile)  # one per session: none shares another's folder
    for settings, message in [({"length": float("nan")}, "seconds must be a number"),
                              ({"seed_": 2**70}, "seed must be a whole number"),
                              ({"samples": 2.5}, "num samples must be a whole number"),
                              ({"k": float("inf")}, "top k must be"),
                              # beyond a slider's bounds: no traceback in the app's terminal
                              # (the fixture's end checks its log)
                              ({"length": 1e9}, "seconds must be a number from 0 to 86400"),
                              ({"p": -1.0}, "top p must be a number from 0 to 1"),
                              ({"tonality_": -0.5}, "tonality must be a number from 0 to 100")]:
        line = api_call(app_url, "x", **settings)
        assert line.startswith("**Could not generate:**") and message in line, line
