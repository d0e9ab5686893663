"""A web app to continue piano music by ear: choose a primer, generate, listen, extend, save.

    python app.py                              # the bundled demo model, http://127.0.0.1:7860
    python app.py --ckpt ckpt/run/best --port 8000 --concurrency 2

Every constant below is a command-line option (``--help`` lists them). The page offers
the bundled primer, an uploaded MIDI file or no primer, how many seconds of it to use,
every setting of generate.py (length, temperature, top-k, top-p, min-p, greedy, beam
search, samples, seed, prefix length, int8 weights on a CPU, release of long-held notes,
tonality)
and creativity (a bias towards notes over rests). While it generates, a progress bar
counts tokens and seconds of music; the take then plays in the page with its piano roll,
and its MIDI and WAV files can be downloaded. "Extend" continues the selected take; the
session's takes are listed and can be played again. Generations wait in a bounded queue,
so one user's request never blocks another's page. Each of the CONCURRENCY generations
that run at once decodes in a process of its own (`Workers`): threads of one process
would share its interpreter lock.
"""

import contextlib
import importlib.abc
import importlib.machinery
import json
import math
import multiprocessing
import multiprocessing.forkserver
import os
import queue
import secrets
import shutil
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from perceiver_music.cli import bundled, check_writable, fail, parse_constants, run_script

CKPT = "ckpt/demo"  # checkpoint folder (config.json + model.safetensors) or .pth file
PRIMER = "samples/primers/mz_570_3_opening.mid"  # the bundled primer offered on the page
HOST = "127.0.0.1"  # address to listen on (0.0.0.0: every network interface)
PORT = 7860  # port to listen on
OUT_DIR = "output/app"  # where each session's takes are written
CONCURRENCY = 1  # generations that run at once, each in a process with the model
QUEUE_SIZE = 16  # generations that may wait; more are refused with a message
MAX_UPLOAD_MB = 5.0  # largest primer file accepted (a long piano piece is about 0.1 MB)
MAX_SECONDS = 120.0  # longest continuation a request may ask for
RENDERER = "midirenderer"  # audio: midirenderer (pip) or fluidsynth (the system program)
SOUNDFONT = ""  # .sf2 SoundFont for the audio ('': the small General MIDI one of pretty_midi)
CPU = False  # run on the CPU even if an accelerator is present
DTYPE = "auto"  # auto (bfloat16 on GPUs with it, else float32), float32 or bfloat16
STREAM_SECONDS = 1.0  # a take plays while it is generated, in chunks of this much music
LEAD_IN = 10.0  # it starts this many seconds before the new music (the primer's end)
DATA_DIR = "data"  # prep.py output folder shown in the Data tab
RUNS_DIR = "ckpt"  # training runs in this folder (or below) are shown in the Runs tab

SOURCES = ("bundled primer", "upload a MIDI file", "from scratch")
# The downloads are read-only: Gradio's file list would still offer to remove each file.
_CSS = """#downloads button[aria-label="Remove this file"] { display: none; }
.pm-hidden { display: none !important; }
#live-roll canvas { width: 100%; height: 260px; background: #fff; }"""
# The take's player: each chunk of audio the server sends (the #live JSON: the take's id,
# its chunks so far, its notes so far, whether it is done) is fetched, decoded and
# scheduled right after the one before in one Web Audio clock, so the chunks play without
# a gap while the rest is generated. Where the music comes slower than it plays (a slow or
# busy machine), it waits until what it holds lasts until the take's end at the pace the
# music has come so far (less a margin): the first sound comes later and the take plays
# through, rather than stopping every second. The canvas draws the notes up to what is
# playing. window.pmStats records the time from the click on Generate to the first sound,
# and every underrun (a chunk that came after its turn: the sound stopped for a moment).
_PLAYER_JS = """
<script>
window.pmLive = (() => {
  const MARGIN = 0.8;  // the music may come this much slower than it has so far
  let ctx = null, id = null, next = 0, offset = 0, queued = 0, sources = [], pending = [];
  let notes = [], primer = 0, chain = Promise.resolve(), drawing = false, halted = false;
  let playing = false, begun = null;  // begun: the chunk it (re)started at
  let cleared = null;  // the take `clear` took off the roll
  const colour = (p, v) => p ? `rgba(230,126,34,${0.35 + v / 200})`
                             : `rgba(41,128,185,${0.35 + v / 200})`;
  function reset(newId) {
    sources.forEach(s => { try { s.stop(); } catch (e) {} });
    sources = []; pending = []; id = newId; queued = 0; notes = [];
    chain = Promise.resolve(); halted = false; playing = false; begun = null;
    window.pmStats = {clicked: window.pmClicked || performance.now(), first: null,
                      underruns: 0, gaps: [], slowed: [], chunks: 0, until: 0};
  }
  function enough(chunk) {  // what is held plays on until the music that follows comes
    const held = pending.reduce((sum, p) => sum + p.buffer.duration, 0);
    const rest = Math.max(0, chunk.until - chunk.end);
    // a chunk without a pace (the primer alone) waits for one with it, or the take's end;
    // the rule adds a chunk more: each comes whole, a moment after its music
    return chunk.rate > 0 && held >= rest * (1 / (MARGIN * chunk.rate) - 1) + chunk.step + 0.5;
  }
  async function play(chunk) {
    const take = id;
    const data = await (await fetch(chunk.url)).arrayBuffer();
    const buffer = await ctx.decodeAudioData(data);
    if (halted || take !== id) return;  // Stop or a new take came while it was on its way
    pending.push({buffer, start: chunk.start});
    if (playing && next < ctx.currentTime + 0.005) {  // the sound ran out: an underrun
      playing = false; window.pmStats.underruns += 1;  // `next`: when the sound stopped
      // whether the music came slower since the start than the player allowed for
      window.pmStats.slowed.push(begun !== null && (chunk.end - begun.end)
        / Math.max(chunk.wall - begun.wall, 1e-3) < MARGIN * begun.rate);
    }
    if (playing) flush();
    else if (enough(chunk)) { begun = chunk; flush(); }
    else {
      const label = document.querySelector('#live-clock');
      if (label) label.textContent = 'buffering: this machine generates the music slower ' +
                                     'than it plays';
    }
  }
  function flush() {  // schedule every chunk held, after what is playing
    if (halted || !pending.length) return;
    const stats = window.pmStats, now = ctx.currentTime;
    if (!playing) {
      if (stats.first !== null) stats.gaps.push(now - next);
      next = now + 0.05;  // (re)start just ahead of the clock
      offset = next - pending[0].start;  // clock time of the take's 0 s
      if (stats.first === null) stats.first = performance.now() + 50;
      playing = true;
    }
    for (const {buffer} of pending) {
      const source = ctx.createBufferSource();
      source.buffer = buffer; source.connect(ctx.destination); source.start(next);
      sources.push(source); next += buffer.duration; stats.chunks += 1;
    }
    pending = []; stats.until = next - offset;
    if (!drawing) { drawing = true; requestAnimationFrame(draw); }
  }
  function position() {
    return ctx && window.pmStats && window.pmStats.first !== null
      ? Math.max(0, Math.min(ctx.currentTime - offset, window.pmStats.until)) : 0;
  }
  function clear() {  // another take chosen, or a request failed: nothing is playing
    cleared = id;  // a take still streaming stays off the roll (not replayed from its start)
    reset(null);
    const canvas = document.querySelector('#live-roll canvas');
    if (canvas) canvas.getContext('2d').clearRect(0, 0, canvas.width, canvas.height);
    const label = document.querySelector('#live-clock');
    if (label) label.textContent = '';
  }
  function draw() {
    const canvas = document.querySelector('#live-roll canvas');
    if (!canvas || id === null) { drawing = false; return; }
    const g = canvas.getContext('2d'), w = canvas.width, h = canvas.height;
    const t = position(), span = Math.max(10, t), left = 40, right = 30, bottom = 20;
    g.clearRect(0, 0, w, h);
    const shown = notes.filter(n => n[0] <= t);
    const pitches = shown.map(n => n[2]);
    const lo = Math.min(...pitches, 60) - 2, hi = Math.max(...pitches, 72) + 2;
    const x = s => left + (w - left - right) * s / span;  // room for the last label
    const y = p => (h - bottom) * (hi - p) / (hi - lo);
    for (const [s, e, p, v] of shown) {
      g.fillStyle = colour(s >= primer, v);
      g.fillRect(x(s), y(p + 0.5), Math.max(1, x(Math.min(e, t)) - x(s)),
                 (h - bottom) / (hi - lo));
    }
    g.fillStyle = '#333'; g.font = '12px sans-serif';
    for (let s = 0; s <= span; s += span > 60 ? 10 : 5) g.fillText(`${s} s`, x(s) - 8, h - 5);
    for (let p = Math.ceil(lo / 12) * 12; p <= hi; p += 12) {
      g.fillText(`C${p / 12 - 1}`, 2, y(p) + 4);
    }
    if (primer > 0) {
      g.strokeStyle = '#c0392b'; g.beginPath(); g.moveTo(x(primer), 0);
      g.lineTo(x(primer), h - bottom); g.stroke();
    }
    g.strokeStyle = '#000'; g.beginPath(); g.moveTo(x(t), 0);
    g.lineTo(x(t), h - bottom); g.stroke();
    const label = document.querySelector('#live-clock');
    const until = window.pmStats.until.toFixed(1);
    if (label) label.textContent = `playing ${t.toFixed(1)} s of ${until} s`;
    // ten frames a second are smooth enough, and leave the CPU to the generation
    if (ctx.currentTime < next + 0.5) setTimeout(draw, 100); else drawing = false;
  }
  return {
    update(v) {
      if (!v || !v.id) { if (id !== null) clear(); return; }
      if (v.id === cleared) return;
      if (!ctx) ctx = new AudioContext();
      ctx.resume();
      if (v.id !== id) reset(v.id);
      notes = v.notes || []; primer = v.primer || 0;
      for (const chunk of (v.chunks || []).slice(queued)) { chain = chain.then(() => play(chunk)); }
      queued = (v.chunks || []).length;
      if (v.done) chain = chain.then(flush);  // nothing more comes: play what is held
    },
    stop() {
      const heard = position();
      halted = true;
      sources.forEach(s => { try { s.stop(); } catch (e) {} });
      sources = []; if (window.pmStats) window.pmStats.until = heard;
      return heard;
    },
    clear,
    position,
    sent: () => queued,  // chunks the server has sent for this take
    held: () => pending.length,  // chunks held back until the take can play through
  };
})();
document.addEventListener('click', e => {
  if (!e.target.closest('#generate, #extend')) return;
  window.pmClicked = performance.now();
  // scrolled down to the sampling settings (or, on a narrow screen, the columns stacked):
  // bring the status line and the player into sight
  const status = document.querySelector('#status');
  const r = status ? status.getBoundingClientRect() : null;
  if (r && (r.top < 0 || r.bottom > window.innerHeight)) status.scrollIntoView();
}, true);
</script>
"""


@dataclass
class Take:
    """One generation of the session: where its files are and its tokens (to extend it)."""

    number: int
    label: str
    folder: Path
    tokens: list[int]  # primer + continuation
    seconds: float  # of music in all
    summary: str
    suffix: str = ""  # "_1" when the take holds several samples (the first is shown)


# Numeric settings of a request: (smallest, largest, whole numbers only). A client of the
# HTTP API may send anything, so each is checked here, naming the setting (the number
# boxes leave rounding to this check: Gradio's own would fail on NaN with a bare
# "cannot convert float NaN to integer").
LIMITS = {"prime_seconds": (0, 24 * 3600, False), "seconds": (0, 24 * 3600, False),
          "temperature": (0, 100, False), "top_k": (0, 100_000, True), "top_p": (0, 1, False),
          "min_p": (0, 1, False), "beams": (1, 16, True), "num_samples": (1, 16, True),
          "seed": (-1, 2**63 - 1, True), "prefix_len": (0, 1 << 20, True),
          "creativity": (-20, 20, False), "release": (0, 100, False),
          "tonality": (0, 100, False)}


def check_settings(settings: dict) -> dict:
    """``settings`` with every number checked against `LIMITS` (and whole numbers made
    int); raises ValueError naming the setting and its allowed range."""
    out = dict(settings)
    for name, (low, high, whole) in LIMITS.items():
        value = out.get(name)
        kind = "a whole number" if whole else "a number"
        if isinstance(value, bool) or not isinstance(value, int | float) or not (
                math.isfinite(value) and low <= value <= high) or (
                whole and value != int(value)):
            got = ("nothing" if value is None else f"{value:g}" if isinstance(value, float)
                   else str(value) if isinstance(value, int) else repr(value))
            bounds = f"{low} to {high:,}" if whole else f"{low:g} to {high:g}"
            raise ValueError(f"{name.replace('_', ' ')} must be {kind} from {bounds}, got {got}")
        out[name] = int(value) if whole else float(value)
    for name in ("greedy", "stop_at_end", "int8"):
        out[name] = bool(out.get(name))
    return out


@dataclass
class Progress:
    """How far a generation has come: what the page's progress bar shows."""

    step: int
    seconds: float


class Link:
    """What a job in a generation process reaches the server by: ``send`` a message
    (progress, a chunk of the stream), ``progress`` (a few times a second at most),
    ``stopped`` (the server asked it to stop: `Workers.stop`), ``played`` (how many
    seconds of the take the listener had heard then: what a stopped take keeps;
    infinite: all of it), and its thread count."""

    def __init__(self, conn, stop, threads: int | None) -> None:
        self.conn, self.stop, self.threads = conn, stop, threads
        self.shown = 0.0

    def send(self, kind: str, value: object) -> None:
        self.conn.send((kind, value))

    def progress(self, info) -> None:
        now = time.perf_counter()
        if now - self.shown > 0.1:
            self.shown = now
            self.send("progress", Progress(info.step, info.seconds))

    def stopped(self) -> bool:
        return self.stop.value >= 0

    def played(self) -> float:
        return self.stop.value


def _serve(conn, stop, ckpt: str, device: str | None, dtype: str,
           threads: int | None) -> None:
    """A generation process: load the model once, say "ready" (or why it cannot), then run
    each job ``(fn, job)`` sent on ``conn`` as ``fn(model, job, link)`` (a `Link` back to
    the server), then send ("done", result) or ("error", exc). It ends quietly when the
    server has gone (stopped while this process started or worked)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the server's to handle
    with contextlib.suppress(EOFError, OSError):  # the server's end of the pipe is closed
        _work(conn, stop, ckpt, device, dtype, threads)


def _work(conn, stop, ckpt: str, device: str | None, dtype: str,
          threads: int | None) -> None:
    """`_serve`'s work, which a closed pipe to the server ends."""
    import torch

    from perceiver_music.api import PerceiverMusic

    if threads:  # all of its work on its share: a wider team would wait on the other's
        torch.set_num_threads(threads)

    try:
        model = PerceiverMusic.from_pretrained(ckpt, device=device, dtype=dtype)
    except Exception as exc:  # noqa: BLE001 (the server reports it as one line)
        conn.send(("error", exc))
        return
    conn.send(("ready", (model.config, str(model.device))))
    while True:
        fn, job = conn.recv()
        try:
            conn.send(("done", fn(model, job, Link(conn, stop, threads))))
        except Exception as exc:  # noqa: BLE001 (ValueError and MidiError are the user's)
            conn.send(("error", exc))


def process_context():
    """Where generation processes come from. On Linux a fork server that has imported
    torch and the model code once: each process is a fork of it, so ``--concurrency 2``
    imports torch once, not twice, and a process that died is replaced in a fraction of
    a second instead of the 4 CPU-seconds of a fresh interpreter (torch's import). The
    server is started with no thread running and before torch has run anything, which
    makes its forks safe, unlike forks of this server process (Gradio's threads); it
    starts with Ctrl-C ignored (it ignores it anyway once it runs: the app's Ctrl-C would
    otherwise print a traceback from its import of torch). It starts in this file's
    folder: Python 3.11's fork server ignores the app's sys.path and imports from its
    working folder first, so started elsewhere it could preload another copy of the
    model code (an older clone there), which each process would then use (its forks
    still run in the app's working folder: multiprocessing moves them there).
    Elsewhere (macOS's frameworks, Windows): fresh interpreters."""
    if sys.platform != "linux":
        return multiprocessing.get_context("spawn")
    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload(["torch", "perceiver_music.api"])
    if threading.current_thread() is threading.main_thread():  # no other thread yet
        previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
        here = os.getcwd()
        try:
            os.chdir(Path(__file__).resolve().parent)
            multiprocessing.forkserver.ensure_running()
        finally:
            os.chdir(here)
            signal.signal(signal.SIGINT, previous)
    return ctx


class Workers:
    """``count`` processes that each hold the model and run one generation at a time.

    Generations in threads of one process would share its interpreter lock: two at once
    decoded about 280 tokens/s each on the 2-core VM, against 330 each in two processes
    and 366 for one alone on one thread (bench/threads.py). On a CPU each process of
    several decodes on its share of the cores; one alone chooses by timing its steps."""

    def __init__(self, ckpt: str, device: str | None, dtype: str, count: int) -> None:
        threads = None if count == 1 else max(1, (os.cpu_count() or 1) // count)
        self.args = (ckpt, device, dtype, threads)
        self.conns: list = [None] * count
        self.procs: list = [None] * count
        self.stops: list = [None] * count
        self.running: dict[str, int] = {}  # job id -> the process running it
        for i in range(count):  # they load the model at the same time
            self._start(i)
        self.idle: queue.Queue[int] = queue.Queue()
        for i in range(count):
            kind, value = self._receive(i)
            if kind != "ready":
                self.close()
                raise value
            self.config, self.device = value
            self.idle.put(i)

    def _start(self, i: int) -> None:
        ctx = process_context()
        here, there = ctx.Pipe()
        # no lock: a process started as the app exited found its semaphore gone (a traceback)
        self.stops[i] = ctx.Value("d", -1.0, lock=False)
        self.procs[i] = ctx.Process(target=_serve, args=(there, self.stops[i], *self.args),
                                    daemon=True)
        try:
            self.procs[i].start()
        except (EOFError, OSError) as exc:  # the fork server died (a preload crashed it)
            raise RuntimeError(f"cannot start a generation process ({exc!r})") from None
        there.close()
        self.conns[i] = here

    def _receive(self, i: int) -> tuple[str, object]:
        try:
            return self.conns[i].recv()
        except (EOFError, OSError):
            code = self.procs[i].exitcode
            return "error", RuntimeError(f"the generation process stopped (exit code {code})")

    def run(self, fn: Callable, job: dict, job_id: str = "") -> Iterator[tuple[str, object]]:
        """``fn(model, job, link)`` in the first idle process: yields its messages
        (("progress", Progress), ("chunk", ...)), then ("done", its result), or raises its
        exception (a RuntimeError when the process dies during the job: killed, out of
        memory). A process found dead is replaced before it gets a job. ``job_id`` names
        the job for `stop`. Leaving the loop early stops the job and waits for its end."""
        i = self.idle.get()
        done = False
        try:
            self.stops[i].value = -1.0
            try:
                self.conns[i].send((fn, job))
            except OSError:  # it died since its last job: a new one
                self.procs[i].join()
                self._start(i)
                kind, value = self._receive(i)
                if kind != "ready":
                    raise value from None
                self.conns[i].send((fn, job))
            self.running[job_id] = i
            while not done:
                kind, value = self._receive(i)
                if kind == "error":
                    done = True
                    raise value
                done = kind == "done"
                yield kind, value
        finally:
            self.running.pop(job_id, None)
            if not done:  # the caller left: stop the job, and take its messages to the end
                self.stops[i].value = math.inf
                while self._receive(i)[0] not in ("done", "error"):
                    pass
            self.idle.put(i)

    def stop(self, job_id: str, played: float = math.inf) -> bool:
        """Ask the job ``job_id`` to end, keeping the first ``played`` seconds of its take
        (what the listener has heard); False when no such job runs."""
        i = self.running.get(job_id)
        if i is None:
            return False
        self.stops[i].value = max(0.0, played)
        return True

    def close(self) -> None:
        """Stop every process."""
        for proc in self.procs:
            proc.kill()
        for proc in self.procs:
            proc.join()


def _stream_audio(chunk, start: float, end: float, job: dict, live: Path, index: int,
                  gain: list[float]) -> dict | None:
    """Render ``start``..``end`` s of a streamed take into ``live``/chunk-``index``.wav, at
    the gain of the first chunk (a stream cannot know the whole take's loudness); returns
    what the page's player needs of it, or None when there is nothing to render."""
    from midi_processor import write_atomic
    from perceiver_music.render import AudioError, normalise, render_span, wav_bytes

    if end - start < 0.01:
        return None
    now = chunk.primer_seconds + chunk.seconds
    notes = [n if n.end < now or chunk.take is not None else
             type(n)(n.velocity, n.pitch, n.start, now + 30.0) for n in chunk.notes]
    try:
        samples, rate = render_span(notes, start, end, job["soundfont"], job["renderer"])
    except AudioError:
        return None  # the take's own render will say why
    if not gain:
        gain.append(min(normalise(samples)[1], 30.0))
    path = live / f"chunk-{index}.wav"
    write_atomic(path, wav_bytes(samples * 10 ** (gain[0] / 20), rate))
    return {"url": f"gradio_api/file={path.resolve()}", "start": round(start, 3),
            "end": round(end, 3)}


def make_take(model, job: dict, link: Link) -> dict:
    """In a generation process: generate the take, streaming it (each second of music
    rendered to a chunk of audio in ``job["live"]`` and sent with the notes so far; beam
    search, which picks its sequence only at the end, does not stream); if stopped, keep
    the music the listener had heard; write the take's files to ``job["folder"]``; return
    what the page shows of it."""
    import dataclasses

    from midi_processor import cut_tokens

    settings, live = job["generate"], Path(job["live"])
    if settings["num_beams"] > 1:
        take = model.generate(job["primer"], **settings, decode_threads=link.threads,
                              progress=link.progress, stop=link.stopped)
    else:
        live.mkdir(parents=True, exist_ok=True)
        heard, chunks, gain, start = None, 0, [], time.perf_counter()
        for chunk in model.stream(job["primer"], **settings, chunk_seconds=job["chunk_seconds"],
                                  decode_threads=link.threads, stop=link.stopped):
            link.send("progress", Progress(len(chunk.tokens), chunk.seconds))
            take = chunk.take
            if heard is None:  # the take plays from its primer's last lead_in seconds
                heard = max(0.0, chunk.primer_seconds - job["lead_in"])
            if link.stopped():  # the last chunk, with the take, follows
                continue
            # audio up to 0.1 s before the music so far: a synthesiser's block of samples
            # may already hold an event up to 50 ms later (render_span)
            end = (max([n.end for n in chunk.notes] + [0.0]) + 1.0 if take is not None
                   else chunk.primer_seconds + chunk.seconds - 0.1)
            audio = _stream_audio(chunk, heard, end, job, live, chunks, gain)
            if audio is not None:  # the pace so far and the end, for the player's buffer
                wall = time.perf_counter() - start
                until = end if take is not None else chunk.primer_seconds + settings["seconds"]
                audio.update(rate=round(chunk.seconds / wall, 3), wall=round(wall, 3),
                             until=round(until, 3), step=job["chunk_seconds"])
                heard, chunks = end, chunks + 1
            link.send("chunk", {"audio": audio, "seconds": chunk.seconds, "done": take is not None,
                                "primer_seconds": chunk.primer_seconds,
                                "notes": [(round(n.start, 3), round(n.end, 3), n.pitch,
                                           n.velocity) for n in chunk.notes]})
    if link.stopped() and math.isfinite(link.played()):
        keep = link.played() - take.primer_seconds  # the new music the listener heard
        cut = [cut_tokens(c, seconds=keep) if keep > 0 else [] for c in take.continuations]
        take = dataclasses.replace(take, continuations=cut, stop_reasons=["stopped"] * len(cut),
                                   seconds=[min(s, max(keep, 0.0)) for s in take.seconds])
    take.extra["primer_name"] = job["primer_name"]
    problems = take.save(job["folder"], soundfont=job["soundfont"], renderer=job["renderer"],
                         report={"app_settings": job["settings"]})
    return {"tokens": take.tokens(0), "seconds": take.seconds[0],
            "new_tokens": len(take.continuations[0]), "samples": len(take.continuations),
            "generate_s": take.generate_s, "seed": take.seed, "primer_note": take.primer_note,
            "primer_seconds": take.primer_seconds, "problems": problems,
            "stopped": take.stop_reasons[0] == "stopped",
            "token_limit": take.stop_reasons[0] == "max_tokens"}


class Studio:
    """The generation processes and the session logic, apart from the page (tested
    without a browser)."""

    def __init__(self, args) -> None:
        self.args = args
        self.out = Path(args.out_dir)
        self.workers = Workers(args.ckpt, "cpu" if args.cpu else None, args.dtype,
                               args.concurrency)
        self.config, self.device = self.workers.config, self.workers.device
        self.name = Path(args.ckpt).name

    def session_folder(self, history: list[Take]) -> Path:
        """Where this session's takes go: a folder named by the server (128 random bits)
        when the session's first take is made, then the same one. Nothing a client sends
        (Gradio's session hash included, which the client picks) becomes part of a path,
        and no session can name, list or guess another's folder."""
        if history:
            return history[0].folder.parent
        return self.out / secrets.token_hex(16)

    def generate(self, settings: dict, primer, history: list[Take], on_progress=None,
                 extend: Take | None = None) -> tuple[Take, str]:
        """`stream` to the end: the take and its line (``on_progress`` gets each
        `Progress`)."""
        for kind, value in self.stream(settings, primer, history, extend):
            if kind == "progress" and on_progress is not None:
                on_progress(value)
            elif kind == "take":
                return value
        raise RuntimeError("the generation ended without a take")

    def stream(self, settings: dict, primer, history: list[Take], extend: Take | None = None,
               job_id: str = "") -> Iterator[tuple[str, object]]:
        """Generate a take (or extend ``extend``) in a generation process: yields
        ("progress", `Progress`) and ("chunk", what the page's player needs of each chunk
        of audio as the take grows), then ("take", (the `Take`, a line for the page)) once
        its files are written. ``job_id`` lets `Workers.stop` end it early. Raises
        ValueError (bad settings), MidiError (bad primer) or RuntimeError (the generation
        process died)."""
        from midi_processor import MidiError

        s = check_settings(settings)
        if not 0 < s["seconds"] <= self.args.max_seconds:
            raise ValueError(f"length must be between 1 and {self.args.max_seconds:g} s")
        if s["temperature"] <= 0 and not s["greedy"]:
            raise ValueError("temperature must be positive (tick greedy for the likeliest "
                             "token every time)")
        if extend is not None:
            primer, prime_seconds = extend.tokens, 0
        else:
            prime_seconds = s["prime_seconds"]
            if isinstance(primer, Path):
                size = primer.stat().st_size
                if size > self.args.max_upload_mb * 2**20:
                    raise MidiError(f"{primer.name}: {size / 2**20:.1f} MB is larger than the "
                                    f"{self.args.max_upload_mb:g} MB this page accepts")
        number = len(history) + 1
        folder = self.session_folder(history) / f"take-{number}"
        for done in history:  # the chunks of takes that are done (their audio.wav holds
            shutil.rmtree(done.folder.parent / f".{done.folder.name}-stream",  # the same)
                          ignore_errors=True)
        job = {"primer": primer, "folder": folder, "settings": s,
               "live": folder.parent / f".{folder.name}-stream",
               "chunk_seconds": self.args.stream_seconds, "lead_in": self.args.lead_in,
               "soundfont": self.args.soundfont or None, "renderer": self.args.renderer,
               "primer_name": (f"take {extend.number}" if extend is not None
                               else s.get("primer_name", "from scratch")),
               "generate": dict(
                   seconds=s["seconds"], prime_seconds=prime_seconds,
                   num_samples=s["num_samples"], temperature=max(s["temperature"], 1e-6),
                   top_k=s["top_k"] or None, top_p=s["top_p"] or None,
                   min_p=s["min_p"] or None, greedy=s["greedy"], creativity=s["creativity"],
                   release=s["release"], tonality=s["tonality"],
                   num_beams=s["beams"], seed=None if s["seed"] < 0 else s["seed"],
                   stop_at_end=s["stop_at_end"], cross_attn_seq_len=s["prefix_len"] or None,
                   precision="int8" if s.get("int8") else "float32")}
        for kind, t in self.workers.run(make_take, job, job_id):
            if kind != "done":
                yield kind, t
        seed = "beam search" if s["beams"] > 1 else f"seed {t['seed']}"
        summary = (f"{t['seconds']:.1f} s of new music ({t['new_tokens']} tokens) in "
                   f"{t['generate_s']:.1f} s, {seed}")
        summary = (f"take {extend.number} extended by {summary}" if extend is not None
                   else f"{t['primer_note']}; {summary}")
        total = t["primer_seconds"] + t["seconds"]
        result = Take(number, f"take {number}: {total:.0f} s, {seed}", folder,
                      t["tokens"], total, summary, "_1" if t["samples"] > 1 else "")
        line = summary + (f" (no audio: {t['problems'][0]})" if t["problems"] else "")
        if t["samples"] > 1:
            line += f"; showing sample 1 of {t['samples']} (all in the download)"
        if t["stopped"]:
            line += "; stopped where you stopped listening"
        if t["token_limit"]:
            line += (f"; it reached its token limit before {s['seconds']:g} s of music (the "
                     "model wrote unusually many events a second)")
        yield "take", (result, line)

    @staticmethod
    def files(take: Take) -> tuple[str | None, str, list[str]]:
        """(audio, piano roll, downloads) of a take, as paths for the page."""
        sfx = take.suffix
        audio = take.folder / f"audio{sfx}.wav"
        downloads = sorted(str(p) for p in take.folder.iterdir()
                           if p.suffix in (".mid", ".wav") and p.name != "primer.mid")
        return (str(audio) if audio.exists() else None, str(take.folder / f"pianoroll{sfx}.png"),
                downloads)


class Browser:
    """The Data and Runs tabs' server side: the data folder indexed once (at the first
    look, by one request while others wait), pieces opened into files under the output
    folder, and the runs read afresh each time. What a client sends names a piece or a run
    only as a key into what the server found itself: never a path."""

    PER_PAGE = 50

    def __init__(self, args) -> None:
        import threading

        self.data, self.runs_root = Path(args.data_dir), Path(args.runs_dir)
        self.files = Path(args.out_dir) / "browse"
        self.soundfont, self.renderer = args.soundfont or None, args.renderer
        self.index = self.drawn = None
        self.lock = threading.Lock()

    def data_index(self, progress=None):
        """The data folder's `DataIndex` (BrowseError when there is none)."""
        from perceiver_music.browse import index_data

        with self.lock:
            if self.index is None:
                self.index = index_data(self.data, progress)
            return self.index

    def table(self, split: str, query: str, page: float | None) -> tuple[list, str, int]:
        """A page of pieces, a line saying which, and the page's number (``page`` brought
        into range: the page box shows the page the table shows)."""
        rows, total = self.data_index().table(split, query, 0, 10**9)  # every match
        last = max(0, math.ceil(total / self.PER_PAGE) - 1)
        wanted = int(page) if isinstance(page, int | float) and math.isfinite(page) else 1
        page = min(max(0, wanted - 1), last)
        rows = rows[page * self.PER_PAGE:(page + 1) * self.PER_PAGE]
        return rows, (f"{total} file(s) match; page {page + 1} of {last + 1} "
                      f"({self.PER_PAGE} a page). Choose a row to open the piece."), page + 1

    def open_piece(self, path: str) -> tuple[str, str, str, str]:
        """(a line about it, its piano roll PNG, a 20 s audio excerpt, its first 300
        tokens as text) of the piece recorded as ``path``, files made once."""
        from midi_processor import decode_midi
        from midi_processor.core import tokens_to_text
        from perceiver_music.render import AudioError, render_audio, save_pianoroll

        entry, tokens = self.data_index().piece(path)
        stem = self.files / entry["sha256"][:32]
        self.files.mkdir(parents=True, exist_ok=True)
        notes = [n for n in decode_midi(tokens).instruments[0].notes if n.start < 30]
        roll, wav = stem.with_suffix(".png"), stem.with_suffix(".wav")
        if not roll.exists():
            save_pianoroll(roll, notes, [], None, f"{entry['path']} (first 30 s)")
        name = ": ".join(part for part in (entry["composer"], entry["title"]) if part)
        line = (f"**{name}** ({entry['split']}): "
                f"{entry['seconds'] / 60:.1f} min, {entry['notes']:,} notes, "
                f"{entry['tokens']:,} tokens; group {entry['group']}")
        if not wav.exists():
            excerpt = decode_midi(tokens)
            excerpt.instruments[0].notes = [n for n in excerpt.instruments[0].notes
                                            if n.start < 20]
            try:
                render_audio(excerpt, wav, self.soundfont, self.renderer)
            except AudioError as exc:
                line += f" (no audio: {exc})"
        return (line, str(roll), str(wav) if wav.exists() else None,
                tokens_to_text(tokens, limit=300))

    def figure(self, encode):
        """The data's figure (`DataIndex.figure`), drawn and encoded by ``encode`` (the
        plot's ``postprocess``) once: Gradio would otherwise encode it again for every page
        that loads, 1.3 CPU-seconds of the server's on the ASAP + piano-midi.de data."""
        with self.lock:
            if self.drawn is None:
                self.drawn = encode(self.index.figure())
            return self.drawn

    def runs(self) -> list:
        from perceiver_music.browse import find_runs

        return find_runs(self.runs_root) if self.runs_root.is_dir() else []

    def runs_note(self, found: int) -> str:
        """What the Runs tab says when it lists no run: why, and what to do."""
        if found:
            return ""
        if not self.runs_root.is_dir():
            return (f"`{self.runs_root}` does not exist: start the app with `--runs_dir` "
                    "naming the folder your training runs are in.")
        return (f"No training run in `{self.runs_root}` yet: `train.py --out_dir` writes "
                "one (a folder with metrics.csv).")

    def run_table(self) -> tuple[list[list], list[str]]:
        """The runs table and the runs' names."""
        from perceiver_music.browse import run_summary

        runs = self.runs()
        rows = [run_summary(r, self.runs_root) for r in runs]
        return rows, [row[0] for row in rows]

    def curves(self, names: list[str]):
        """The loss curves of the runs named (names the server listed; others ignored)."""
        from perceiver_music.browse import curves_figure, run_name

        chosen = [r for r in self.runs() if run_name(r, self.runs_root) in (names or [])]
        return curves_figure(chosen, self.runs_root)


class _WithoutStubs(importlib.abc.MetaPathFinder):
    """Finds ``gradio.component_meta`` as Python would, and makes its stub writer a no-op
    once the module has run, before Gradio makes its first component class."""

    def find_spec(self, name: str, path, target=None):
        if name != "gradio.component_meta":
            return None
        sys.meta_path.remove(self)
        spec = importlib.machinery.PathFinder.find_spec(name, path)
        if spec is not None and spec.loader is not None:
            run = spec.loader.exec_module

            def exec_module(module) -> None:
                run(module)
                module.create_or_modify_pyi = lambda *args, **kwargs: None

            spec.loader.exec_module = exec_module
        return spec


def import_gradio():
    """``import gradio``, without the .pyi stubs Gradio 6 writes as it makes each component
    class: it parses the whole source file of every one of its ~80 classes to compare
    their stubs, 4 of the 8.6 CPU-seconds its import took at every start of the app (and
    a class of ours would get a stub file beside app.py). The app needs no stubs."""
    if "gradio" not in sys.modules:
        sys.meta_path.insert(0, _WithoutStubs())
    import gradio

    return gradio


def browse_tabs(browser: Browser, page, others: tuple = ()) -> None:
    """The Data tab (the data folder's pieces, figures, and one piece opened) and the Runs
    tab (training runs, their curves on one plot, refreshed every 10 s while it is shown;
    ``others``: the page's other tabs)."""
    gr = import_gradio()

    from perceiver_music.browse import COLUMNS, BrowseError

    with gr.Tab("Data", elem_id="data-tab") as data_tab:
        gr.Markdown(f"What prep.py made in `{browser.data}`: every file, its split and "
                    "piece; the figures; a piece opened (`--data_dir` chooses the folder).")
        with gr.Row():
            split = gr.Dropdown(["all", "train", "val", "test", "failed"], value="all",
                                label="split", elem_id="data-split", scale=1)
            query = gr.Textbox(label="search (composer, title, file)", elem_id="data-query",
                               scale=2)
            number = gr.Number(1, label="page", precision=0, elem_id="data-page", scale=1)
        counts = gr.Markdown(elem_id="data-counts")
        table = gr.Dataframe(headers=list(COLUMNS), interactive=False, elem_id="data-table",
                             wrap=True)
        with gr.Row():
            piece_line = gr.Markdown(elem_id="piece-line")
        with gr.Row():
            piece_roll = gr.Image(type="filepath", interactive=False, show_label=False,
                                  elem_id="piece-roll", scale=2)
            with gr.Column(scale=1):
                piece_audio = gr.Audio(label="the first 20 s", type="filepath",
                                       interactive=False, elem_id="piece-audio")
                piece_text = gr.Textbox(label="first tokens", lines=8, elem_id="piece-tokens")
        overview = gr.Plot(label="the data", elem_id="data-plot")

        def show(split_name, text, number):
            try:
                rows, line, shown = browser.table(split_name, text or "", number)
            except BrowseError as exc:
                return [], f"**No data to show:** {exc}", 1, None
            return rows, line, shown, browser.figure(overview.postprocess)

        def pick(rows, evt: gr.SelectData):
            try:
                path = rows.iloc[evt.index[0]]["file"]
                return browser.open_piece(str(path))
            except (BrowseError, IndexError, KeyError, TypeError) as exc:
                return f"**Cannot open it:** {exc}", None, None, ""

        for trigger in (split.change, query.submit, number.submit):
            trigger(lambda a, b, c: show(a, b, c)[:3], [split, query, number],
                    [table, counts, number], queue=False)
        table.select(pick, [table], [piece_line, piece_roll, piece_audio, piece_text],
                     queue=False)

    with gr.Tab("Runs", elem_id="runs-tab") as runs_tab:
        gr.Markdown(f"Training runs in `{browser.runs_root}` (`--runs_dir`): best validation "
                    "loss, evaluate.py's report when there is one, and the loss curves of the "
                    "runs you tick, refreshed every 10 s.")
        runs_table = gr.Dataframe(headers=["run", "steps", "best validation loss",
                                           "last training loss", "minutes", "updated",
                                           "evaluate.py loss"],
                                  interactive=False, elem_id="runs-table")
        runs_note = gr.Markdown(elem_id="runs-note")
        chosen = gr.CheckboxGroup([], label="plot these runs", elem_id="runs-chosen")
        curves = gr.Plot(label="loss curves", elem_id="runs-plot")

        def refresh(names):
            rows, all_names = browser.run_table()
            names = [n for n in (names or []) if n in all_names] or all_names[:3]
            return (rows, gr.update(choices=all_names, value=names), browser.curves(names),
                    browser.runs_note(len(rows)))

        timer = gr.Timer(10, active=False)  # ticks while the Runs tab is shown
        timer.tick(refresh, [chosen], [runs_table, chosen, curves, runs_note], queue=False,
                   show_progress="hidden")
        chosen.input(lambda names: browser.curves(names), [chosen], [curves], queue=False)
    # none of these waits in the queue of generations (or fills it)
    page.load(show, [split, query, number], [table, counts, number, overview], queue=False)
    runs_tab.select(lambda names: (*refresh(names), gr.Timer(active=True)), [chosen],
                    [runs_table, chosen, curves, runs_note, timer], queue=False)
    for other in (data_tab, *others):
        other.select(lambda: gr.Timer(active=False), None, timer, queue=False)


def build_page(studio: Studio, args):
    """The Gradio page, its events and queue."""
    gr = import_gradio()

    from midi_processor import MidiError
    from perceiver_music.api import RELEASE, TONALITY

    setting_names = ["prime_seconds", "seconds", "temperature", "top_k", "top_p", "min_p",
                     "greedy", "beams", "num_samples", "seed", "prefix_len", "creativity",
                     "release", "tonality", "stop_at_end", "int8"]
    cfg = studio.config
    on_cpu = studio.device == "cpu"

    def Slider(*args, **kwargs):  # noqa: N802 (stands for gr.Slider)
        """A gr.Slider whose value reaches the handler as it was sent, where
        `check_settings` names one out of range: Gradio's own bound check, met only by HTTP
        API clients, printed a traceback in the terminal for each such request. (Not a
        subclass: Gradio writes a .pyi file beside the module of each component class.)"""
        slider = gr.Slider(*args, **kwargs)
        slider.preprocess = lambda payload: payload
        return slider

    def File(**kwargs):  # noqa: N802 (stands for gr.File)
        """A gr.File whose own refusal of a request (another file type: met only by HTTP
        API clients, as the page refuses one before sending it) reaches the client as its
        message without a traceback in the terminal, as `Slider`'s values do."""
        upload = gr.File(**kwargs)
        check = upload.preprocess

        def preprocess(payload):
            try:
                return check(payload)
            except gr.Error as exc:
                exc.print_exception = False
                raise

        upload.preprocess = preprocess
        return upload

    with gr.Blocks(title="Perceiver AR piano continuations", analytics_enabled=False) as page:
        history = gr.State([])
        gr.Markdown(f"## Perceiver AR piano continuations\nModel **{studio.name}** "
                    f"({cfg.max_seq_len}-token context, {cfg.num_latents} latents). Choose "
                    "a primer, generate, listen; extend a take to continue it.")
        with gr.Tabs():
            with gr.Tab("Generate") as generate_tab, gr.Row():
                with gr.Column(scale=1):
                    source = gr.Radio(list(SOURCES), value=SOURCES[0], label="primer",
                                      elem_id="source")
                    upload = File(label="MIDI primer (.mid, .midi)", type="filepath",
                                  file_types=[".mid", ".midi"], visible=False,
                                  elem_id="upload")
                    prime_seconds = Slider(0, 120, value=20, step=1, elem_id="prime-seconds",
                                              label="seconds of the primer to use (0: all)")
                    seconds = Slider(1, args.max_seconds, value=20, step=1, elem_id="seconds",
                                        label="seconds of music to generate")
                    creativity = Slider(-3, 3, value=0, step=0.1, elem_id="creativity",
                                           label="creativity (more notes, fewer rests)")
                    # the buttons above the sampling settings, in sight with the status line
                    # and the player once a click has scrolled them into sight (_PLAYER_JS)
                    with gr.Row():
                        go = gr.Button("Generate", variant="primary", elem_id="generate")
                        more = gr.Button("Extend", elem_id="extend")
                        stop = gr.Button("Stop", elem_id="stop")
                    with gr.Accordion("sampling", open=False):
                        temperature = Slider(0.1, 2.0, value=1.0, step=0.05, label="temperature")
                        top_k = gr.Number(0, label="top-k (0: off)", step=1)
                        top_p = Slider(0, 1, value=0, step=0.01, label="top-p (0: off)")
                        min_p = Slider(0, 0.99, value=0, step=0.01, label="min-p (0: off)")
                        greedy = gr.Checkbox(False, label="greedy: the likeliest token every time")
                        beams = Slider(1, 8, value=1, step=1, label="beam search width (1: off)")
                        num_samples = Slider(1, 4, value=1, step=1, label="samples")
                        seed = gr.Number(-1, label="seed (-1: random)", step=1)
                        prefix_len = gr.Number(0, step=1,
                                               label=f"prefix length at generation (0: the "
                                                     f"model's {cfg.cross_attn_seq_len})")
                        release = Slider(0, 10, value=RELEASE, step=0.1, elem_id="release",
                                         label="release: ends notes held past 1 s (0: off)")
                        tonality = Slider(0, 3, value=TONALITY, step=0.05, elem_id="tonality",
                                          label="tonality: keeps to the key of the last "
                                                "seconds (0: off)")
                        stop_at_end = gr.Checkbox(True, label="stop when the model ends the piece")
                        int8 = gr.Checkbox(False, label="int8 weights: about 1.7x faster on a CPU, "
                                           "slightly different odds", visible=on_cpu)
                with gr.Column(scale=2):
                    status = gr.Markdown("Ready.", elem_id="status")
                    # the take as it is generated: heard at once, drawn as it plays (_PLAYER_JS)
                    gr.HTML('<canvas width="1200" height="260"></canvas><div id="live-clock">'
                            "</div>", elem_id="live-roll", label="now playing")
                    # as JSON text: a JSON component would redraw its tree of every note
                    # and chunk so far (hidden or not) at each update, most of a core
                    live = gr.Textbox("", elem_id="live", elem_classes=["pm-hidden"])
                    heard = gr.Number(0, elem_classes=["pm-hidden"])  # Stop sends where it was
                    job = gr.State("")
                    audio = gr.Audio(label="listen", type="filepath", interactive=False,
                                     elem_id="audio")
                    roll = gr.Image(label="piano roll", type="filepath", interactive=False,
                                    show_label=False, elem_id="roll")  # the figure has a title
                    downloads = gr.File(label="save: MIDI and WAV", file_count="multiple",
                                        interactive=False, elem_id="downloads")
                    chosen = gr.Dropdown([], label="this session's takes", elem_id="takes",
                                         interactive=True)
            browse_tabs(Browser(args), page, (generate_tab,))

        settings = [prime_seconds, seconds, temperature, top_k, top_p, min_p, greedy, beams,
                    num_samples, seed, prefix_len, creativity, release, tonality, stop_at_end,
                    int8]
        outputs = [status, audio, roll, downloads, history, chosen, live, job]

        def respond(values, source_name, upload_path, takes, selected, extend, request,
                    progress):
            """Generate or extend a take, streaming it to the page's player as it grows;
            errors become a line on the page."""
            s = dict(zip(setting_names, values, strict=True))
            job_id = secrets.token_hex(16)  # what Stop names (kept in the session's state)
            shown = [0.0]
            stream = {"id": job_id, "chunks": [], "notes": [], "primer": 0.0}
            keep = gr.update()
            # the previous take's player, roll and downloads go: what stayed would look
            # like the result of this request (earlier takes stay in the list of takes)
            yield ("Generating: the take plays as it grows.", None, None, None, takes, keep,
                   json.dumps(stream), job_id)
            base = next((t for t in takes if t.label == selected), takes[-1] if takes else None)
            try:
                primer = None
                if extend and base is None:
                    raise ValueError("nothing to extend yet: generate a take first")
                if not extend and source_name == SOURCES[1]:
                    if not upload_path:
                        raise ValueError("choose a MIDI file to upload first")
                    primer = Path(upload_path)
                elif not extend and source_name == SOURCES[0]:
                    if not args.primer:
                        raise ValueError("this app offers no bundled primer (--primer '')")
                    primer = Path(args.primer)
                if primer is not None:
                    s["primer_name"] = primer.name
                for kind, value in studio.stream(s, primer, takes, base if extend else None,
                                                 job_id):
                    if kind == "progress":
                        now = time.perf_counter()  # a few updates a second are enough
                        if now - shown[0] > 0.2:
                            shown[0] = now
                            progress(min(value.seconds / s["seconds"], 1.0),
                                     desc=f"{value.step + 1} tokens, {value.seconds:.1f} s "
                                          "of music")
                    elif kind == "chunk":
                        stream = {**stream, "notes": value["notes"],
                                  "primer": value["primer_seconds"], "done": value["done"],
                                  "chunks": stream["chunks"] + [value["audio"]] * bool(
                                      value["audio"])}
                        yield (keep, keep, keep, keep, keep, keep, json.dumps(stream), keep)
                    else:
                        take, line = value
            except (ValueError, MidiError, RuntimeError) as exc:  # RuntimeError: a died process
                problem = str(exc)  # name an upload as the user knows it, not Gradio's copy
                if source_name == SOURCES[1] and upload_path:
                    problem = problem.replace(str(upload_path), Path(upload_path).name)
                yield (f"**Could not generate:** {problem}", None, None, None, takes,
                       gr.update(value=None), "", "")
                return
            takes = [*takes, take]
            wav, png, files = studio.files(take)
            yield (line, wav, png, files, takes,
                   gr.update(choices=[t.label for t in takes], value=take.label), keep, "")

        def handler(extend: bool):
            """The event function of Generate (or of Extend): Gradio passes the inputs, the
            request (for the session) and a progress tracker, as the parameters say."""

            def handle(source_name, upload_path, takes, selected, prime_s, length, temp, k,
                       p, min_p_, greedy_, width, samples, seed_, prefix, bias, release_,
                       tonality_, stop, int8_, request: gr.Request,
                       progress=gr.Progress()):  # noqa: B008 (Gradio's way)
                values = [prime_s, length, temp, k, p, min_p_, greedy_, width, samples, seed_,
                          prefix, bias, release_, tonality_, stop, int8_]
                yield from respond(values, source_name, upload_path, takes, selected, extend,
                                   request, progress)

            return handle

        def show(takes, selected):
            take = next((t for t in takes if t.label == selected), None)
            if take is None:
                return gr.update(), gr.update(), gr.update(), gr.update()
            wav, png, files = studio.files(take)
            return f"{take.label}: {take.summary}", wav, png, files

        inputs = [source, upload, history, chosen, *settings]
        source.change(lambda s: gr.update(visible=s == SOURCES[1]), source, upload,
                      queue=False)
        # one progress bar, where the status line is (it says what is happening)
        go.click(handler(extend=False), inputs, outputs, show_progress_on=[status],
                 api_name="generate")
        more.click(handler(extend=True), inputs, outputs, show_progress_on=[status],
                   api_name="extend")
        chosen.input(show, [history, chosen], [status, audio, roll, downloads], queue=False)
        chosen.input(None, None, None, js="() => { window.pmLive.clear(); }")  # stale now
        live.change(None, [live], None,
                    js="(v) => { window.pmLive.update(v ? JSON.parse(v) : null); }")
        # Stop: the sound stops at once, and the take keeps what was heard (outside the
        # queue, which may be full of generations)
        def stop_take(job_id: str, seconds: float | None) -> None:
            studio.workers.stop(job_id, float(seconds or 0))  # False: nothing to stop

        stop.click(stop_take, [job, heard], None, queue=False,
                   js="(job_id) => [job_id, window.pmLive.stop()]")
    page.queue(default_concurrency_limit=args.concurrency, max_size=args.queue_size)
    return page


def _interrupt(signum: int, frame) -> None:
    """SIGTERM as Ctrl-C: the server shuts down and its generation processes are stopped
    (killed outright, the process left a semaphore behind, which Python warned about)."""
    raise KeyboardInterrupt


def _cannot_serve(host: str, port: int, exc: OSError) -> None:
    fail(f"cannot serve on {host}:{port} ({str(exc).split('. ')[0]}); "
         "choose another --port or --host")


def _check_port(host: str, port: int) -> None:
    """Fail at once when the address cannot be bound (in use, or not this machine's), as
    the server would after loading the model. SO_REUSEADDR as the server binds."""
    import socket

    try:
        family = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0][0]
        with socket.socket(family, socket.SOCK_STREAM) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            probe.bind((host, port))
    except OSError as exc:
        _cannot_serve(host, port, exc)


def main() -> None:
    args = parse_constants(__file__, globals(), __doc__.split("\n\n")[0])
    args.ckpt, args.primer = bundled(args.ckpt), bundled(args.primer)
    if args.concurrency < 1 or args.queue_size < 1:
        fail("--concurrency and --queue_size must be at least 1")
    if not 0 < args.max_upload_mb <= 100:
        fail(f"--max_upload_mb must be above 0 and at most 100, got {args.max_upload_mb:g}")
    if not 0 < args.max_seconds <= 3600:
        fail(f"--max_seconds must be above 0 and at most 3600, got {args.max_seconds:g}")
    if not 0.1 <= args.stream_seconds <= 10:
        fail(f"--stream_seconds must be from 0.1 to 10, got {args.stream_seconds:g}")
    if args.lead_in < 0:
        fail(f"--lead_in must be 0 or more seconds, got {args.lead_in:g}")
    if not 1 <= args.port <= 65535:
        fail(f"--port must be from 1 to 65535, got {args.port}")
    if args.primer and not Path(args.primer).is_file():
        fail(f"{args.primer}: primer file not found (--primer; '' offers no bundled primer)")
    if args.primer:  # unreadable: said now, not at a user's first take
        from midi_processor import MidiError, encode_midi

        try:
            encode_midi(args.primer)
        except MidiError as exc:
            fail(f"{exc} (--primer)")
    from perceiver_music.render import audio_options_problem

    problem = audio_options_problem(args.renderer, args.soundfont)
    if problem:
        fail(problem)
    check_writable(Path(args.out_dir), "takes (--out_dir)")  # not at each take
    _check_port(args.host, args.port)  # before seconds of loading, not after
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    from perceiver_music.checkpoint import CheckpointError

    try:
        studio = Studio(args)
    except (CheckpointError, ValueError, RuntimeError) as exc:
        fail(str(exc))
    page = build_page(studio, args)
    try:
        page.launch(server_name=args.host, server_port=args.port, quiet=True, css=_CSS,
                    head=_PLAYER_JS,
                    max_file_size=int(args.max_upload_mb * 2**20),
                    allowed_paths=[str(args.out_dir)], footer_links=[], show_error=True,
                    prevent_thread_lock=True)
    except OSError as exc:
        _cannot_serve(args.host, args.port, exc)
    start = time.perf_counter()
    print(f"model {args.ckpt} loaded; serving http://{args.host}:{args.port} (Ctrl-C stops)")
    signal.signal(signal.SIGTERM, _interrupt)  # `kill` stops as cleanly as Ctrl-C
    page.block_thread()
    print(f"stopped after {time.perf_counter() - start:.0f} s")

if __name__ == "__main__":
    run_script(main, "stopped")
