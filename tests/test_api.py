"""The installable package and its Python API: pip install -e, from_pretrained, generate,
save, and the README's example, run as written."""

from __future__ import annotations

import io
import json
import math
import os
import re
import subprocess
import sys
from fractions import Fraction
from pathlib import Path

import numpy as np
import pretty_midi
import pytest
import torch

from midi_processor import END, MidiError, encode_midi
from perceiver_music import Generation, PerceiverMusic
from perceiver_music.api import primer_tokens
from perceiver_music.checkpoint import CheckpointError, save_checkpoint
from perceiver_music.config import preset
from perceiver_music.model import build_model

ROOT = Path(__file__).resolve().parent.parent
PRIMER = ROOT / "tests" / "data" / "scn15_4.mid"


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> PerceiverMusic:
    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("ckpt") / "tiny"
    save_checkpoint(folder, build_model(preset("tiny")), preset("tiny"), {"step": 3})
    return PerceiverMusic.from_pretrained(folder, device="cpu")


def clean_env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}


def test_pip_install_editable_then_import_from_another_folder(tmp_path):
    venv, elsewhere = tmp_path / "venv", tmp_path / "elsewhere"
    elsewhere.mkdir()
    # A venv that sees this environment's packages (torch...) and its pip and setuptools:
    # a .pth file names this interpreter's site folders (--system-site-packages would give
    # the base Python's, without them, when the tests themselves run in a venv).
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True,
                   timeout=120)
    python = str(venv / "bin" / "python")
    site_dir = subprocess.run([python, "-c", "import sysconfig; print(sysconfig.get_path("
                               "'purelib'))"], capture_output=True, text=True, check=True)
    outer = [p for p in sys.path if p.endswith(("site-packages", "dist-packages"))]
    (Path(site_dir.stdout.strip()) / "outer.pth").write_text("\n".join(outer) + "\n")
    code = ("import perceiver_music, midi_processor, importlib.metadata as m; "
            "from perceiver_music import PerceiverMusic; "
            "print(perceiver_music.__file__); print(m.requires('perceiver-music'))")
    before = subprocess.run([python, "-c", code], cwd=elsewhere, capture_output=True,
                            text=True, env=clean_env())
    assert before.returncode != 0 and "No module named 'perceiver_music'" in before.stderr
    # The build backend comes from this environment (--no-build-isolation): no network.
    install = subprocess.run([python, "-m", "pip", "install", "-q", "--no-build-isolation",
                              "--no-deps", "-e", str(ROOT)], capture_output=True, text=True,
                             timeout=300, env=clean_env())
    assert install.returncode == 0, install.stderr
    after = subprocess.run([python, "-c", code], cwd=elsewhere, capture_output=True,
                           text=True, env=clean_env())
    assert after.returncode == 0, after.stderr
    location, requires = after.stdout.splitlines()
    assert location == str(ROOT / "perceiver_music" / "__init__.py")
    assert "torch" in requires and "perceiver-ar-pytorch==0.0.10" in requires


def test_the_package_lists_the_api_it_imports_on_first_use():
    import perceiver_music
    from perceiver_music import api

    names = {"PerceiverMusic", "Generation", "Chunk", "DEMO_CHECKPOINT", "DEMO_PRIMER",
             "CheckpointError", "MidiError"}  # the errors the README names
    assert names <= set(dir(perceiver_music)) and set(perceiver_music.__all__) == names
    assert all(getattr(perceiver_music, n) is getattr(api, n) for n in names)


def readme_example() -> str:
    """The README's Python API example: the first python block under "### Python API"."""
    text = (ROOT / "README.md").read_text()
    section = text[text.index("### Python API"):]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


def test_the_readme_api_example_runs(tmp_path):
    """From an empty folder (the bundled primer comes from the package)."""
    r = subprocess.run([sys.executable, "-c", readme_example()], cwd=tmp_path,
                       capture_output=True, text=True, timeout=600,
                       env={**clean_env(), "PYTHONPATH": str(ROOT)})
    assert r.returncode == 0, r.stderr
    take = tmp_path / "output" / "api-take"
    assert {p.name for p in take.iterdir()} >= {"primer.mid", "full_1.mid", "full_2.mid",
                                                "audio_1.wav", "pianoroll_2.png",
                                                "generation.json"}
    assert (tmp_path / "take.wav").stat().st_size > 100_000
    assert len(pretty_midi.PrettyMIDI(str(tmp_path / "take.mid")).instruments[0].notes) > 20
    assert (tmp_path / "ckpt" / "demo-copy" / "model.safetensors").is_file()


def test_every_kind_of_primer(tiny, tmp_path, monkeypatch):
    tokens = encode_midi(PRIMER)
    raw = PRIMER.read_bytes()
    kinds = {"path": str(PRIMER), "bytes": raw, "bytearray": bytearray(raw),
             "memoryview": memoryview(raw), "BytesIO": io.BytesIO(raw),
             "PrettyMIDI": pretty_midi.PrettyMIDI(str(PRIMER)), "tokens": tokens,
             "array": np.array(tokens)}
    first = None
    for name, primer in kinds.items():
        take = tiny.generate(primer, seconds=None, max_new_tokens=5, prime_seconds=4,
                             seed=1)
        assert isinstance(take, Generation), name
        assert 0 < take.primer_seconds <= 4 and take.primer[-1] != END, name
        assert len(take.continuations[0]) == 5
        first = first or take.primer
        assert take.primer == first, name  # MIDI bytes in any container are MIDI
    for bad in (60, {"a": 1}, [60.7], ["60"]):
        with pytest.raises(ValueError, match="a primer is a MIDI file's path"):
            tiny.generate(bad)
    with open(PRIMER) as text, pytest.raises(ValueError, match="opened in binary mode"):
        tiny.generate(text)  # not a UnicodeDecodeError, nor its bytes taken for a path
    with pytest.raises(ValueError, match=r"num_beams 3\) takes no sampling setting: leave "
                                         r"out temperature, creativity, release \(or set "
                                         r"it to 0 or 3: beam search applies none\), "
                                         r"tonality \(or set it to 0 or 0.5: beam"):
        tiny.generate(raw, num_beams=3, temperature=0.5, creativity=1.0, release=9.0,
                      tonality=2.0)
    exact = tiny.generate(raw, release=Fraction(7, 2), max_new_tokens=2, seconds=None)
    assert type(exact.settings["release"]) is float and exact.settings["release"] == 3.5
    beam = tiny.generate(raw, num_beams=2, max_new_tokens=3, seconds=None)
    assert beam.settings["release"] == beam.settings["tonality"] == 0.0  # beam search
    # applies neither, and says so
    assert tiny.generate(raw, **beam.settings).continuations == beam.continuations  # replays
    for wrong in ({"num_samples": 2.0}, {"num_samples": None}, {"top_k": 2.5}, {"seed": -1},
                  {"max_new_tokens": 2.5}, {"decode_threads": 0}, {"seconds": "5"},
                  {"seconds": math.inf}, {"temperature": "hot"}, {"temperature": None},
                  {"top_p": "0.9"}, {"min_p": "x"}, {"creativity": "lots"},
                  {"prime_seconds": None}, {"greedy": "yes"}, {"prime_from_end": "no"},
                  {"stop_at_end": 1}, {"release": "lots"}, {"release": -1.0},
                  {"release": 10**400}, {"tonality": "strong"}, {"tonality": -0.5},
                  {"tonality": math.nan}):
        with pytest.raises(ValueError, match=f"{next(iter(wrong))} must be"):
            tiny.generate(raw, **wrong)  # named, not a TypeError from inside torch
    with pytest.raises(ValueError, match="chunk_seconds must be a number"):
        next(tiny.stream(raw, chunk_seconds="1"))
    for device, message in (("tpu", "device must be a device name"), (5, "got int 5"),
                            ("cuda:7", "device cuda:7: this machine has")):
        with pytest.raises(ValueError, match=message):  # not torch's AssertionError
            PerceiverMusic.from_pretrained(tiny.source, device=device)
    for cut in ({"prime_seconds": -1}, {"prime_seconds": float("nan")},
                {"prime_tokens": -10}):
        with pytest.raises(ValueError, match=f"{next(iter(cut))} must be"):
            tiny.generate(raw, **cut)
    late = pretty_midi.PrettyMIDI()  # a recording that starts with a long rest
    late.instruments.append(pretty_midi.Instrument(0))
    late.instruments[0].notes.append(pretty_midi.Note(80, 60, 30.0, 30.5))
    assert "it holds no notes, only silence" in primer_tokens(late, seconds=20)[1]
    assert "no notes" not in primer_tokens(late, seconds=0)[1]
    scratch = tiny.generate(None, max_new_tokens=5, seconds=None, seed=1)
    assert "from scratch" in scratch.primer_note and len(scratch.primer) == 1
    with pytest.raises(MidiError, match=r"is a folder: give one MIDI file \(e.g. .*\.mid\)"):
        tiny.generate(str(PRIMER.parent))
    with pytest.raises(MidiError, match="is a folder: give one MIDI file, and it holds none"):
        tiny.generate(tmp_path)
    def unreadable(folder):
        raise PermissionError(13, "Permission denied", str(folder))

    with monkeypatch.context() as patch, pytest.raises(MidiError, match="file$"):
        patch.setattr(Path, "iterdir", unreadable)  # one line, not the listing's error
        tiny.generate(tmp_path)
    with pytest.raises(MidiError, match="the primer path is empty"):
        tiny.generate("")  # not "." taken for the working folder
    with pytest.raises(ValueError, match="not an event id"):
        tiny.generate([1, 2, 10_000])
    with pytest.raises(ValueError, match="seconds must be positive"):
        tiny.generate(str(PRIMER), seconds=0)


def test_generation_gives_midi_notes_audio_and_piano_roll(tiny, tmp_path):
    take = tiny.generate(str(PRIMER), seconds=3, seed=4, num_samples=2, top_p=0.9,
                         creativity=1.0, cross_attn_seq_len=16)
    assert take.settings["cross_attn_seq_len"] == 16 and take.settings["creativity"] == 1.0
    assert f"continued by {Path(tiny.source).name}, seed 4" in take._title(0)
    take.checkpoint = "ckpt/mine/best"  # a run's best/ is named with its run
    assert "continued by mine/best, seed 4, sample 1" in take._title(0)
    # the settings are generate's own arguments (nothing else), so a take can be replayed
    import inspect
    assert set(take.settings) == set(inspect.signature(tiny.generate).parameters) - {
        "primer", "progress", "stop"}
    replayed = tiny.generate(str(PRIMER), **take.settings)
    assert replayed.continuations == take.continuations
    assert take.settings["max_new_tokens"] is None  # as given: derived from seconds again,
    longer = tiny.generate(str(PRIMER), **{**take.settings, "seconds": 6})  # not capped
    assert max(longer.seconds) > max(take.seconds) + 1, (longer.seconds, take.seconds)
    # numpy numbers are numbers: the settings hold them as Python's, and save writes them
    numpy_take = tiny.generate(str(PRIMER), seconds=np.float32(1.0), seed=np.int64(3),
                               num_samples=np.int64(1), top_p=np.float64(0.9))
    numpy_take.save(tmp_path / "numpy")
    saved = json.loads((tmp_path / "numpy" / "generation.json").read_text())["generation"]
    assert saved["seed"] == 3 and saved["num_samples"] == 1 and saved["seconds"] == 1.0
    drawn = tiny.generate(str(PRIMER), max_new_tokens=8, seconds=None)  # a seed drawn
    assert drawn.settings["seed"] == drawn.seed is not None
    assert tiny.generate(str(PRIMER), **drawn.settings).continuations == drawn.continuations
    assert all(s >= 3 or r != "seconds" for s, r in zip(take.seconds, take.stop_reasons,
                                                        strict=True))
    notes = take.notes(1)
    assert all(n.start >= take.primer_seconds for n in notes)
    assert take.midi(0).instruments[0].notes[0].start < take.primer_seconds
    import matplotlib

    backend = matplotlib.get_backend()
    matplotlib.use("svg")  # a notebook's or a user's backend stays as it is
    try:
        assert take.pianoroll().axes[0].get_xlabel() == "time (s)"
        take.pianoroll(tmp_path / "roll.png")
        (tmp_path / "a folder").mkdir()  # a folder given for a file: named, nothing left
        with pytest.raises(IsADirectoryError, match="a folder.*'.*a folder'$"):
            take.pianoroll(tmp_path / "a folder")
        assert not list(tmp_path.glob(".a folder.*"))
        assert matplotlib.get_backend() == "svg"
        assert (tmp_path / "roll.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    finally:
        matplotlib.use(backend)
    info = take.audio(tmp_path / "a.wav")
    assert info.seconds > take.primer_seconds
    with pytest.raises(ValueError, match="audio is written as WAV: give a path ending in .wav"):
        take.audio(tmp_path / "a.mp3")  # not WAV bytes under an .mp3 name
    assert not (tmp_path / "a.mp3").exists()
    assert take.save(tmp_path / "take", audio=False) == []
    with pytest.raises(FileExistsError):
        take.save(tmp_path / "take")
    again = tiny.generate(str(PRIMER), seconds=3, seed=4, num_samples=2, top_p=0.9,
                          creativity=1.0, cross_attn_seq_len=16)
    assert again.continuations == take.continuations  # the seed repeats the run


def test_save_pretrained_round_trip_and_bad_paths(tiny, tmp_path):
    folder = tiny.save_pretrained(tmp_path / "copy")
    copy = PerceiverMusic.from_pretrained(folder, device="cpu")
    assert copy.config == tiny.config and copy.meta["step"] == 3
    weights = PerceiverMusic.from_pretrained(folder / "model.safetensors", device="cpu")
    assert weights.config == tiny.config and "inferred" not in weights.meta  # its folder's
    a = tiny.generate(str(PRIMER), seconds=None, max_new_tokens=20, greedy=True)
    b = copy.generate(str(PRIMER), seconds=None, max_new_tokens=20, greedy=True)
    assert a.continuations == b.continuations
    with pytest.raises(CheckpointError, match="does not exist"):
        PerceiverMusic.from_pretrained(tmp_path / "nowhere")


def test_bfloat16_weights_stay_close_to_float32_and_generate():
    """dtype="bfloat16" (the default on GPUs that support it) on the demo model: its
    next-token distributions over a real piece stay within a small KL divergence of
    float32's, and it generates; "auto" is float32 on a CPU; a wrong name is refused."""
    import math

    from perceiver_music.model import forward

    full = PerceiverMusic.from_pretrained(device="cpu")
    half = PerceiverMusic.from_pretrained(device="cpu", dtype="bfloat16")
    assert (full.dtype, half.dtype) == ("float32", "bfloat16")
    cfg = full.config
    tokens = torch.tensor([encode_midi(PRIMER)[: cfg.max_seq_len]])  # 785 real tokens
    with torch.no_grad():
        p32 = forward(full.model, tokens).float().log_softmax(-1)
        p16 = forward(half.model, tokens).float().log_softmax(-1)
    kl = (p32.exp() * (p32 - p16)).sum(-1)
    assert 0 < kl.mean().item() < 0.01, kl.mean().item()
    take = half.generate(PRIMER, seconds=None, max_new_tokens=20, seed=1, stop_at_end=False)
    assert len(take.continuations[0]) == 20 and take.extra["dtype"] == "bfloat16"
    assert math.isfinite(kl.max().item())
    with pytest.raises(ValueError, match="dtype must be one of"):
        PerceiverMusic.from_pretrained(device="cpu", dtype="float16")


def test_stream_yields_the_take_as_it_grows_and_ends_as_generate_does(tiny):
    """`stream`: the primer at once, then chunks whose tokens are the start of the final
    take's (notes so far included, a sounding one ending where the music is), and a last
    chunk holding exactly what `generate` returns with the same seed; leaving early or
    a ``stop`` ends the decoding, and the stopped take is still delivered."""
    settings = dict(seconds=6, prime_seconds=4, seed=5, stop_at_end=False, top_k=40)
    chunks = list(tiny.stream(str(PRIMER), chunk_seconds=1.5, **settings))
    alone = tiny.generate(str(PRIMER), **settings)
    first, last = chunks[0], chunks[-1]
    assert first.tokens == [] and first.seconds == 0 and 0 < first.primer_seconds <= 4
    assert max(n.end for n in first.notes) <= first.primer_seconds + 1e-9
    assert last.take is not None and last.take.continuations == alone.continuations
    assert last.take.settings == alone.settings and last.take.seed == alone.seed
    assert [c.take for c in chunks[:-1]] == [None] * (len(chunks) - 1)
    seconds = [c.seconds for c in chunks]
    assert seconds == sorted(seconds) and len(chunks) >= 4
    for chunk in chunks[1:-1]:
        assert chunk.tokens == alone.continuations[0][:len(chunk.tokens)]
        now = chunk.primer_seconds + chunk.seconds
        assert chunk.seconds >= 1.5 and max(n.end for n in chunk.notes) <= now + 1e-9
    # leaving the loop stops the decoding thread
    stream = tiny.stream(str(PRIMER), chunk_seconds=0.5, seconds=120, seed=5,
                         stop_at_end=False)
    next(stream)
    next(stream)
    stream.close()
    assert not [t for t in __import__("threading").enumerate()
                if t.name == "perceiver-music-stream"]
    # a stop: the take ends there, and comes
    asked = []
    stopped = [c for c in tiny.stream(str(PRIMER), chunk_seconds=0.5, seconds=120, seed=5,
                                      stop_at_end=False, stop=lambda: len(asked) > 3)
               if asked.append(1) is None]
    take = stopped[-1].take
    assert take.stop_reasons == ["stopped"] and take.seconds[0] < 120
    with pytest.raises(ValueError, match="beam search cannot stream"):
        next(tiny.stream(str(PRIMER), num_beams=2))
    with pytest.raises(TypeError, match="no progress argument"):
        next(tiny.stream(str(PRIMER), progress=print))
    # impossible settings raise before any chunk, as generate's do
    for bad, match in ((dict(temperature=-1), "temperature"), (dict(top_p=2), "top_p"),
                       (dict(stride=10**6), "stride"), (dict(seconds=-1), "seconds")):
        with pytest.raises(ValueError, match=match):
            next(tiny.stream(str(PRIMER), **bad))


def test_tf32_is_on_while_decoding_float32_on_cuda_and_put_back_after(tiny, monkeypatch):
    """What a CPU can show: a model that says it is on CUDA decodes float32 with TF32
    products ("high" precision), and torch's process-wide setting is the caller's after a
    take and after a failed one; on a CPU nothing is touched."""
    precision = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("medium")  # a caller's own choice
    try:
        seen = []
        tiny.generate(str(PRIMER), max_new_tokens=3, seconds=None,
                      progress=lambda _: seen.append(torch.get_float32_matmul_precision()))
        on_cuda = PerceiverMusic(tiny.model, tiny.config, tiny.meta)
        monkeypatch.setattr(PerceiverMusic, "device", property(lambda _: torch.device("cuda")))
        on_cuda.generate(str(PRIMER), max_new_tokens=3, seconds=None,
                         progress=lambda _: seen.append(torch.get_float32_matmul_precision()))
        assert seen == ["medium"] * 3 + ["high"] * 3
        assert torch.get_float32_matmul_precision() == "medium"
        with pytest.raises(RuntimeError, match="boom"):
            on_cuda.generate(str(PRIMER), max_new_tokens=3, seconds=None,
                             progress=lambda _: (_ for _ in ()).throw(RuntimeError("boom")))
        assert torch.get_float32_matmul_precision() == "medium"
        # overlapping decodings (streams run in threads): the last one out puts it back
        from perceiver_music.api import tf32_products

        with tf32_products(True):
            with tf32_products(True):
                assert torch.get_float32_matmul_precision() == "high"
            assert torch.get_float32_matmul_precision() == "high"
        assert torch.get_float32_matmul_precision() == "medium"
    finally:
        torch.set_float32_matmul_precision(precision)


def test_a_stop_ends_sampling_and_beam_search_with_the_music_so_far(tiny):
    steps = []
    for beams in (1, 3):
        take = tiny.generate(str(PRIMER), seconds=None, max_new_tokens=200, num_beams=beams,
                             stop_at_end=False, progress=steps.append,
                             stop=lambda: len(steps) >= 5)
        assert take.stop_reasons == ["stopped"] and 1 <= len(take.continuations[0]) <= 6
        steps.clear()


def test_a_span_renders_the_same_samples_as_the_whole_piece():
    """`render_span`, a stream's chunk: on the bundled primer every 2 s span equals the
    whole render's samples (within one 16-bit step), also with notes held far past it."""
    import io

    import numpy as np

    from midi_processor import decode_midi
    from perceiver_music.api import DEMO_PRIMER, notes_so_far
    from perceiver_music.render import _midirenderer, default_soundfont, render_span

    tokens = list(encode_midi(DEMO_PRIMER))
    buf = io.BytesIO()
    decode_midi(tokens).write(buf)
    whole, rate = _midirenderer(buf.getvalue(), default_soundfont())
    notes = notes_so_far(tokens)
    for start in np.arange(0.0, 10.0, 2.0):
        span, span_rate = render_span(notes, start, start + 2)
        assert span_rate == rate and len(span) == 2 * rate
        reference = whole[round(start * rate):round((start + 2) * rate)]
        assert np.abs(span - reference).max() <= 2 / 32768, start
    # a stream holds the notes still sounding 30 s past the music it has; the span renders
    # them only 1 s past its end, which changes none of its samples
    held = [type(n)(n.velocity, n.pitch, n.start, 36.0) if n.start < 6.0 < n.end else n
            for n in notes if n.start < 6.0]
    pm = decode_midi(tokens)
    pm.instruments[0].notes = held
    buf = io.BytesIO()
    pm.write(buf)
    long, _ = _midirenderer(buf.getvalue(), default_soundfont())
    span, _ = render_span(held, 4.0, 6.0)
    assert len(long) > 30 * rate and len(span) == 2 * rate
    assert np.abs(span - long[4 * rate:6 * rate]).max() <= 2 / 32768
