"""generate.py through its CLI with a tiny checkpoint made here."""

from __future__ import annotations

import json
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pretty_midi
import pytest
import torch
import zygote
from conftest import free_port
from PIL import Image

from perceiver_music.checkpoint import save_checkpoint
from perceiver_music.config import preset
from perceiver_music.model import build_model

ROOT = Path(__file__).resolve().parent.parent
PRIMER = ROOT / "tests" / "data" / "scn15_4.mid"


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    cfg = preset("tiny")
    d = tmp_path_factory.mktemp("ckpt") / "tiny"
    save_checkpoint(d, build_model(cfg), cfg, {"step": 0})
    return d


def gen(ckpt: Path, out: Path, *extra: str) -> subprocess.CompletedProcess:
    cmd = [
        sys.executable,
        "generate.py",
        "--ckpt",
        str(ckpt),
        "--primer",
        str(PRIMER),
        "--out_dir",
        str(out),
        "--new_tokens",
        "40",
        "--seconds",
        "0",
        "--seed",
        "7",
        "--no-audio",  # test_audio_and_piano_roll_are_written_and_real renders audio
        *extra,
    ]
    return zygote.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)


def report(folder: Path) -> dict:
    return json.loads((folder / "generation.json").read_text())


def test_outputs_exist_and_parse(ckpt, tmp_path):
    r = gen(ckpt, tmp_path, "--name", "run", "--prime_seconds", "4")
    assert "primer: first 4 s of scn15_4.mid" in r.stderr
    assert r.returncode == 0, r.stderr
    run = tmp_path / "run"
    files = {p.name for p in run.iterdir()}
    assert files == {
        "primer.mid",
        "continuation.mid",
        "full.mid",
        "pianoroll.png",
        "generation.json",
    }
    primer = pretty_midi.PrettyMIDI(str(run / "primer.mid")).instruments[0].notes
    full = pretty_midi.PrettyMIDI(str(run / "full.mid")).instruments[0].notes
    assert primer and len(full) >= len(primer) and max(n.start for n in primer) < 4.0
    pretty_midi.PrettyMIDI(str(run / "continuation.mid"))
    width, height = Image.open(run / "pianoroll.png").size
    assert width > 100 and height > 30
    rep = report(run)
    assert {
        "settings",
        "checkpoint",
        "model",
        "seed",
        "timings",
        "samples",
        "primer_tokens",
    } <= rep.keys()
    assert rep["seed"] == 7 and rep["samples"][0]["tokens"] == 40
    assert rep["timings"]["tokens_per_s"] > 0
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_same_seed_same_tokens_and_samples_differ(ckpt, tmp_path):
    assert gen(ckpt, tmp_path, "--name", "a").returncode == 0
    assert gen(ckpt, tmp_path, "--name", "b").returncode == 0
    a, b = report(tmp_path / "a"), report(tmp_path / "b")
    assert a["samples"][0]["token_ids"] == b["samples"][0]["token_ids"]
    r = gen(ckpt, tmp_path, "--name", "three", "--num_samples", "3")
    assert r.returncode == 0, r.stderr
    three = [s["token_ids"] for s in report(tmp_path / "three")["samples"]]
    assert len({tuple(t) for t in three}) == 3
    each = " + ".join(str(len(t)) for t in three)  # the total, and each sample's share
    assert f"{sum(map(len, three))} tokens ({each}), " in r.stdout
    assert (tmp_path / "three" / "full_3.mid").exists()


def test_primer_cuts(ckpt, tmp_path):
    r = gen(ckpt, tmp_path, "--name", "n", "--num_prime", "50", "--prime_seconds", "5")
    assert r.returncode == 0 and report(tmp_path / "n")["primer_tokens"] == 50
    assert "; --num_prime takes the place of --prime_seconds 5" in r.stderr
    assert (
        gen(ckpt, tmp_path, "--name", "e", "--num_prime", "50", "--prime_from_end").returncode == 0
    )
    rep = report(tmp_path / "e")
    assert rep["primer_tokens"] >= 50  # plus the notes and VELOCITY in force at the cut
    assert gen(ckpt, tmp_path, "--name", "s", "--primer", "").returncode == 0
    assert report(tmp_path / "s")["primer_tokens"] == 1


def test_stop_on_seconds_and_greedy_and_beams(ckpt, tmp_path):
    r = gen(ckpt, tmp_path, "--name", "g", "--greedy", "--new_tokens", "400", "--seconds", "2")
    assert r.returncode == 0, r.stderr
    s = report(tmp_path / "g")["samples"][0]
    assert s["stop_reason"] in ("seconds", "end", "max_tokens")
    assert s["seconds"] <= 3.0
    r = gen(ckpt, tmp_path, "--name", "beam", "--beams", "3", "--new_tokens", "10",
            "--seconds", "100")
    assert r.returncode == 0, r.stderr
    assert r.stdout.rstrip().endswith("beam search") and "seed None" not in r.stdout
    # the token cap, not the length in seconds, ended it: said, with what to change
    assert "note: --new_tokens 10 ended the music before --seconds 100" in r.stderr
    beam = report(tmp_path / "beam")  # the command's settings say what beam search did
    assert beam["settings"]["release"] == beam["generation"]["release"] == 0
    assert beam["settings"]["tonality"] == beam["generation"]["tonality"] == 0


def test_runs_under_accelerate_launch_with_two_processes(ckpt, tmp_path):
    launch = "--multi_gpu --num_processes 2 --num_machines 1 --mixed_precision no "
    launch += f"--dynamo_backend no --main_process_port {free_port()}"
    cmd = [sys.executable, "-m", "accelerate.commands.launch", *launch.split(), "generate.py",
           "--ckpt", str(ckpt), "--primer", str(PRIMER), "--out_dir", str(tmp_path),
           "--name", "acc", "--new_tokens", "20", "--seed", "7"]
    r = zygote.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert [p.name for p in tmp_path.iterdir()] == ["acc"]  # one run, by the main process
    assert report(tmp_path / "acc")["samples"][0]["tokens"] == 20


def test_audio_and_piano_roll_are_written_and_real(ckpt, tmp_path):
    """The WAV plays the music (non-silent, as long as full.mid, normalised) and the
    piano roll is a labelled figure of a fixed size, whatever the length."""
    from perceiver_music.render import PEAK_CEILING_DB, read_wav

    r = gen(ckpt, tmp_path, "--name", "a", "--audio", "--new_tokens", "300",
            "--prime_seconds", "0")  # the whole primer: a 56 s piece
    assert r.returncode == 0, r.stderr
    run = tmp_path / "a"
    samples, rate = read_wav((run / "audio.wav").read_bytes())
    music = pretty_midi.PrettyMIDI(str(run / "full.mid")).get_end_time()
    assert rate == 48000 and samples.shape[1] == 2
    assert music > 50 and abs(len(samples) / rate - music) < 1.0
    peak = np.abs(samples).max()
    assert abs(20 * np.log10(peak) - PEAK_CEILING_DB) < 0.1  # normalised, not 0.19 of scale
    seconds = np.sqrt(np.mean(samples.reshape(-1, rate, 2) ** 2, axis=(1, 2))
                      if len(samples) % rate == 0 else
                      np.mean(samples[: len(samples) // rate * rate].reshape(-1, rate, 2) ** 2,
                              axis=(1, 2)))
    assert (seconds > 1e-3).mean() > 0.8  # sound in most seconds of the piece
    assert report(run)["samples"][0]["audio"]["renderer"] == "midirenderer"
    assert Image.open(run / "pianoroll.png").size == (1440, 576)


def test_piano_roll_figure_has_labelled_axes_and_a_legend():
    from perceiver_music.render import pianoroll_figure

    notes = [pretty_midi.Note(velocity=v, pitch=p, start=s, end=s + 0.5)
             for s, p, v in [(0, 60, 30), (1, 64, 120), (200, 67, 80), (300, 72, 60)]]
    fig = pianoroll_figure(notes[:2], notes[2:], 150.0, "a title")
    (ax,) = fig.axes
    assert ax.get_xlabel() == "time (s)" and ax.get_ylabel() == "pitch"
    assert [t.get_text() for t in ax.get_yticklabels()] == ["C4", "C5"]
    assert ax.get_xlim()[1] >= 300.5 and ax.get_title(loc="left") == "a title"
    legend = [t.get_text() for t in ax.get_legend().get_texts()]
    assert legend[:3] == ["primer (2 notes)", "continuation (2 notes)",
                          "continuation starts (150.0 s)"]
    assert [line.get_xdata()[0] for line in ax.get_lines()] == [150.0]  # the boundary
    faces = [c.get_facecolors() for c in ax.collections]
    assert len(faces) == 2 and faces[0][0][2] > faces[0][0][0]  # primer blue, ...
    assert faces[1][0][0] > faces[1][0][2]  # ... continuation orange
    assert faces[0][0].sum() > faces[0][1].sum()  # the louder note is darker
    assert tuple(fig.get_size_inches() * fig.dpi) == (1440, 576)


def test_without_a_renderer_the_midi_is_still_written(ckpt, tmp_path):
    r = gen(ckpt, tmp_path, "--name", "w", "--audio", "--renderer", "fluidsynth")
    if shutil.which("fluidsynth"):
        pytest.skip("FluidSynth is installed here")
    assert r.returncode == 0
    assert "warning: no audio.wav" in r.stderr and "fluidsynth" in r.stderr
    assert (tmp_path / "w" / "full.mid").exists() and not (tmp_path / "w" / "audio.wav").exists()


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--primer", "/nonexistent.mid"], "primer file not found"),
        (["--primer", "CORRUPT"], "not a MIDI file"),
        (["--ckpt", "/nonexistent"], "not a checkpoint directory"),
        (["--ckpt", "BADCKPT"], "config.json"),
        (["--new_tokens", "0"], "--new_tokens must be at least 1"),
        (["--seconds", "-1"], "--seconds must not be negative"),
        (["--temperature", "0"], "use --greedy"),
        (["--temperature", "-1"], "--temperature must be positive"),
        (["--primer", "FOLDER"], "is a folder: give one MIDI file"),
        (["--ckpt", "RUN"], "is a training run folder, not a checkpoint: use"),
        (["--soundfont", "/nonexistent.sf2"], "soundfont not found"),
        (["--soundfont", "CORRUPT"], "not a SoundFont (give a .sf2 file"),  # before decoding
        (["--renderer", "timidity"], "--renderer must be"),
        (["--top_p", "1.5"], "--top_p"),
        (["--beams", "2", "--num_samples", "2"], "beam search"),
        (["--beams", "3", "--top_p", "0.5", "--creativity", "1", "--release", "9",
          "--tonality", "2"],
         "beam search (--beams) takes no sampling setting: leave out --top_p --creativity "
         "--release --tonality"),
        (["--release", "-1"], "--release must not be negative"),
        (["--tonality", "-0.5"], "--tonality must not be negative"),
        (["--seed", "-5"], "--seed must be -1 (random) or a whole number >= 0, got -5"),
        (["--stride", "1000"], "--stride"),
        (["--seconds", "nan"], "--seconds: invalid finite number value: 'nan'"),
        (["--prime_seconds", "inf"], "--prime_seconds: invalid finite number value: 'inf'"),
        (["--greedy", "--temperature", "0"], "--greedy and --beams do not use it"),
        (["--name", "../x"], "--name must be a plain folder name"),
        (["--num_latents", "1024"], "--num_latents must be in [1, 63]"),
        (["--ckpt", "STATE"], "holds a training run's optimizer state, not a model: use"),
        (["--ckpt", "PARENT"], "holds checkpoints but is not one: use"),
    ],
)
def test_bad_input_gets_one_line_and_no_files(ckpt, tmp_path, args, message):
    corrupt = tmp_path / "corrupt.mid"
    corrupt.write_bytes(b"definitely not midi")
    bad = tmp_path / "badckpt"
    bad.mkdir()
    (bad / "config.json").write_text("{not json")
    run = tmp_path / "run"
    shutil.copytree(ckpt, run / "best")
    shutil.copytree(ckpt, run / "last")
    (run / "last" / "state").mkdir()
    (run / "last" / "state" / "optimizer.safetensors").write_bytes(b"")
    shutil.copytree(ckpt, tmp_path / "many" / "a")
    named = {"CORRUPT": str(corrupt), "BADCKPT": str(bad), "FOLDER": str(PRIMER.parent),
             "RUN": str(run), "STATE": str(run / "last" / "state"),
             "PARENT": str(tmp_path / "many")}
    args = [named.get(a, a) for a in args]
    out = tmp_path / "out"
    r = gen(ckpt, out, *args)
    assert r.returncode != 0
    assert message in r.stderr, r.stderr
    assert "Traceback" not in r.stderr and len(r.stderr.strip().splitlines()) == 1
    assert not out.exists() or not list(out.iterdir())


def test_unwritable_output_is_refused_before_generating(ckpt, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    out.chmod(0o555)
    cmd = [sys.executable, "generate.py", "--ckpt", str(ckpt), "--primer", str(PRIMER),
           "--out_dir", str(out), "--new_tokens", "100000", "--seconds", "0"]
    r = zygote.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300,
                   preexec_fn=zygote.without_root_privileges)
    out.chmod(0o755)
    assert r.returncode == 1 and "Traceback" not in r.stderr
    assert r.stderr.strip().splitlines() == [r.stderr.strip()]  # one line, no progress bar
    assert "cannot write the output" in r.stderr and "Permission denied" in r.stderr
    # the folder the user chose, not the name of a temporary file in it
    assert r.stderr.strip() == (f"error: cannot write the output: {out}: Permission denied "
                                "(choose a folder you can write to)")
    (tmp_path / "afile").write_text("")  # a file where the folder would be
    r = gen(ckpt, tmp_path / "afile" / "deeper")
    assert r.returncode == 1 and r.stderr.strip() == (
        f"error: cannot write the output: {tmp_path / 'afile'} is a file, not a folder")


def test_ctrl_c_exits_130_with_one_line_and_writes_nothing(ckpt, tmp_path):
    import contextlib
    import re
    import signal
    import time

    cmd = [sys.executable, "generate.py", "--ckpt", str(ckpt), "--primer", str(PRIMER),
           "--out_dir", str(tmp_path / "out"), "--new_tokens", "1000000", "--seconds", "0",
           "--no-stop_at_end"]
    errors = tmp_path / "stderr.txt"
    errors.write_bytes(b"")
    proc = zygote.start(cmd, cwd=ROOT, stderr=errors)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:  # the bar: it is generating (or it has ended: the
        if re.search(rb" [1-9]\d*/1000000 ", errors.read_bytes()):  # checks below say how)
            break
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=0.1)
            break
    proc.send_signal(signal.SIGINT)
    proc.wait(timeout=60)
    err = errors.read_text()
    assert proc.returncode == 130 and "Traceback" not in err
    assert err.strip().splitlines()[-1] == "error: interrupted: nothing was written"
    assert not list((tmp_path / "out").iterdir())


def test_outputs_follow_the_umask(ckpt, tmp_path):

    cmd = [sys.executable, "generate.py", "--ckpt", str(ckpt), "--primer", str(PRIMER),
           "--out_dir", str(tmp_path), "--name", "u", "--new_tokens", "10"]
    r = zygote.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300,
                   preexec_fn=zygote.umask(0o027))
    assert r.returncode == 0, r.stderr
    for f in (tmp_path / "u").rglob("*"):
        assert f.stat().st_mode & 0o777 == (0o750 if f.is_dir() else 0o640), f
    assert (tmp_path / "u").stat().st_mode & 0o777 == 0o750


def test_generation_json_replays_the_take_from_the_primer_file(ckpt, tmp_path):
    """`generation` in generation.json holds the API's arguments for the primer file as
    given (its cut: --prime_seconds, --num_prime, --prime_from_end), not for the cut
    tokens generate.py passed on, so ``model.generate(primer, **generation)`` replays."""
    from perceiver_music.api import PerceiverMusic

    model = PerceiverMusic.from_pretrained(ckpt, device="cpu")
    for extra in (["--prime_seconds", "3"], ["--num_prime", "30", "--prime_from_end"]):
        name = f"r{len(extra)}"
        assert gen(ckpt, tmp_path, "--name", name, *extra).returncode == 0
        done = report(tmp_path / name)
        replay = model.generate(str(PRIMER), **done["generation"])
        assert replay.primer_seconds == pytest.approx(done["primer_seconds"]), extra
        assert replay.continuations[0] == done["samples"][0]["token_ids"], extra


def test_prefix_length_and_creativity_at_generation(ckpt, tmp_path):
    r = gen(ckpt, tmp_path, "--name", "n", "--num_latents", "48", "--creativity", "2",
            "--release", "2.5", "--tonality", "1.25")
    assert r.returncode == 0, r.stderr
    settings = report(tmp_path / "n")["generation"]
    assert settings["cross_attn_seq_len"] == 16 and settings["creativity"] == 2.0
    assert settings["release"] == 2.5 and settings["tonality"] == 1.25
    r = gen(ckpt, tmp_path, "--name", "m", "--cross_attn_seq_len", "64")
    assert r.returncode == 1 and "--cross_attn_seq_len must be in [1, 63]" in r.stderr
    assert not (tmp_path / "m").exists()


def test_int8_decoding_option(ckpt, tmp_path):
    r = gen(ckpt, tmp_path, "--name", "q", "--int8")
    assert r.returncode == 0, r.stderr
    assert report(tmp_path / "q")["settings"]["int8"] is True
    assert (tmp_path / "q" / "continuation.mid").stat().st_size > 0


def test_the_bar_counts_seconds_of_music_when_a_length_in_seconds_is_set(ckpt, tmp_path):
    """A take stopped at 2 s of music shows a bar of 2 s that ends full, not a bar of
    --new_tokens tokens that ends a fraction of the way (with an ETA to match)."""
    r = gen(ckpt, tmp_path, "--name", "s", "--seconds", "2", "--new_tokens", "5000",
            "--no-stop_at_end")
    assert r.returncode == 0, r.stderr
    frames = r.stderr.replace("\r", "\n").splitlines()
    bars = [f for f in frames if "s of music [" in f]
    assert bars and all("/2 s of music" in f for f in bars), frames[-5:]
    assert "100%" in bars[-1] and "/5000" not in r.stderr
    tokens = gen(ckpt, tmp_path, "--name", "t")  # no length in seconds: tokens, as before
    assert "40/40" in tokens.stderr


def test_stream_prints_the_music_as_it_grows(ckpt, tmp_path):
    """--stream: JSON lines on stdout, a line a second of music, whose new tokens add up
    to the take that is written, each finished note once; then a line naming the folder.
    The same seed without --stream writes the same take."""
    r = gen(ckpt, tmp_path, "--name", "s", "--stream", "--seconds", "4", "--new_tokens",
            "400", "--no-stop_at_end", "--prime_seconds", "4")
    assert r.returncode == 0, r.stderr
    lines = [json.loads(line) for line in r.stdout.splitlines()]
    done = lines.pop()
    assert done["done"] and Path(done["folder"]) == tmp_path / "s"
    assert lines[0] == {"seconds": 0.0, "tokens": [], "notes": []} and len(lines) >= 4
    tokens = [t for line in lines for t in line["tokens"]]
    assert tokens == report(tmp_path / "s")["samples"][0]["token_ids"]
    assert done["tokens"] == len(tokens)
    notes = [tuple(n) for line in lines for n in line["notes"]]
    assert len(notes) == len(set(notes)) > 0 and all(n[0] >= 4 - 1e-6 for n in notes)
    whole = gen(ckpt, tmp_path, "--name", "w", "--seconds", "4", "--new_tokens", "400",
                "--no-stop_at_end", "--prime_seconds", "4")
    assert whole.returncode == 0 and "wrote" in whole.stdout
    assert report(tmp_path / "w")["samples"][0]["token_ids"] == tokens
    beams = gen(ckpt, tmp_path, "--stream", "--beams", "2")
    assert beams.returncode == 1 and "--stream needs sampling" in beams.stderr
    # a reader that has gone (`| true` exits long before the model loads): the lines stop,
    # said once, and the take is still written (a real pipe, so a real process)
    cmd = [sys.executable, "generate.py", "--ckpt", str(ckpt), "--primer", str(PRIMER),
           "--out_dir", str(tmp_path), "--name", "gone", "--stream", "--seconds", "4",
           "--new_tokens", "400", "--no-stop_at_end", "--prime_seconds", "4", "--no-audio",
           "--seed", "7"]
    r = subprocess.run(f"{shlex.join(cmd)} | true; exit ${{PIPESTATUS[0]}}", shell=True,
                       executable="bash", cwd=ROOT, capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0 and "Traceback" not in r.stderr and "error" not in r.stderr
    assert r.stderr.count("note: standard output was closed") == 1, r.stderr
    assert report(tmp_path / "gone")["samples"][0]["token_ids"] == tokens


def test_a_taken_automatic_name_gets_a_suffix_and_no_take_is_thrown_away(ckpt, tmp_path):
    """Two runs started in the same second: the automatic name (primer and time) of the
    second is taken, at the start or while it decodes; its take goes to NAME-2, never
    discarded. A name the user gave is still refused before any work."""
    import time

    import generate
    from perceiver_music.api import PerceiverMusic

    out = tmp_path / "out"
    now = time.time()
    taken = [out / f"{PRIMER.stem}-{time.strftime('%Y%m%d-%H%M%S', time.localtime(now + s))}"
             for s in range(-1, 180)]  # every name this run may pick
    for folder in taken:
        folder.mkdir(parents=True)
        (folder / "full.mid").write_bytes(b"the first run's")
    r = gen(ckpt, out)
    assert r.returncode == 0, r.stderr
    written = sorted(p for p in out.iterdir() if p.name.endswith("-2"))
    assert len(written) == 1 and (written[0] / "full.mid").read_bytes()[:4] == b"MThd"
    assert f"this take goes to {written[0]}" in r.stderr
    assert all((f / "full.mid").read_bytes() == b"the first run's" for f in taken)
    r = gen(ckpt, out, "--name", taken[0].name)
    assert r.returncode == 1 and "already exists: choose another --name" in r.stderr
    # taken while this run decoded: save_take moves on to the next free name
    take = PerceiverMusic.from_pretrained(ckpt, device="cpu").generate(
        str(PRIMER), max_new_tokens=5, seconds=None, seed=1)
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "full.mid").write_bytes(b"the first run's")
    final, problems = generate.save_take(take, busy, audio=False)
    assert final == tmp_path / "busy-2" and problems == []
    assert (final / "full.mid").exists()
    assert (busy / "full.mid").read_bytes() == b"the first run's"
