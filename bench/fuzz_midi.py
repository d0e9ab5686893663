"""Fuzz encode_midi with mutated MIDI files: only MidiError, no hang, bounded memory.

    python bench/fuzz_midi.py [FOLDER] [--count 3000] [--seed 0] [--timeout 10]

Mutates real files (default: tests/data plus ../shared/data/piano-midi-de) in the ways
broken and hostile files differ from good ones: truncation, byte flips, huge delta times
(0x0FFFFFFF, 32-bit overflow), absurd headers and chunk lengths, extreme tempos, spliced
and random bytes, delta times of 5-12 varint bytes, and floods of up to 2 million notes
(16 MB) of zero length, of one tick, or started on one tick. Each file goes through
``encode_midi`` (and the tokens through ``decode_midi``) in a worker process whose
address space is capped at its size after start-up plus 1 GiB, so an unbounded
allocation fails instead of swapping. A file that takes longer than --timeout seconds
counts as a hang (the worker is replaced); one whose encode_midi takes over --slow
seconds (default 2) counts as slow.

Prints the outcomes (tokens, MidiError, any other exception by type), hangs, slow files,
and the largest per-file peak memory (resident set growth, measured by resetting the
kernel's high-water mark before each file). Exit status 1 if anything but MidiError was
raised, a file hung or was slow, or a file's peak passed 1 GiB. ``mutations`` is also
used by the test suite.
"""

from __future__ import annotations

import argparse
import multiprocessing
import random
import resource
import struct
import sys
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from midi_processor import MidiError, decode_midi, encode_midi, midi_files  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_FOLDERS = [ROOT / "tests" / "data", ROOT.parent / "shared" / "data" / "piano-midi-de"]
MEMORY_LIMIT = 2**30  # per file, above the worker's size after start-up


def _chunks(data: bytes) -> list[tuple[int, int]]:
    """(start, length) of every chunk after the header, as far as the bytes say."""
    out, pos = [], 8 + int.from_bytes(data[4:8], "big")
    while pos + 8 <= len(data):
        length = int.from_bytes(data[pos + 4:pos + 8], "big")
        out.append((pos, length))
        pos += 8 + length
    return out


def _huge_deltas(data: bytes, rng: random.Random) -> bytes:
    """Before some tracks' End-of-Track, k events 0x0FFFFFFF ticks apart (an empty text
    event, or a control change) and then a note: with k = 8 the note lies past 2**31
    ticks, where symusic's 32-bit ticks wrap, with k = 16 past 2**32."""
    out = bytearray(data)
    for start, length in reversed(_chunks(data)):
        body = bytes(out[start + 8:start + 8 + length])
        if not body.endswith(b"\xff\x2f\x00") or len(body) < 4 or body[-4] >= 0x80:
            continue
        event = rng.choice([b"\xff\x01\x00", b"\xb0\x07\x40", b"\xf0\x01\xf7"])
        filler = (b"\x8f\xff\xff\x7f" + event) * rng.choice([1, 7, 8, 9, 16, 17, 40])
        note = bytes([0, 0x90, rng.randrange(128), 64, 0x60, 0x80, 60, 0])
        body = body[:-4] + filler + note + body[-4:]
        out[start + 4:start + 8 + length] = len(body).to_bytes(4, "big") + body
    return bytes(out)


def _structured(data: bytes, rng: random.Random) -> bytes:
    """A valid file with odd contents, through mido: huge or zero delta times, notes never
    released or released twice, extreme velocities and tempos, program changes, the drum
    channel, pedal storms. These reach deep into the reader instead of failing its parse."""
    import io

    import mido

    try:
        mf = mido.MidiFile(file=io.BytesIO(data), clip=True)
    except Exception:  # a seed mido cannot read: mutate the bytes instead
        return _huge_deltas(data, rng)
    tracks = [t for t in mf.tracks if t]
    if not tracks:
        return _huge_deltas(data, rng)
    for _ in range(rng.randint(1, 12)):  # a few edits at random places
        track = rng.choice(tracks)
        i = rng.randrange(len(track))
        msg, edit = track[i], rng.randrange(8)
        if edit == 0:
            track[i] = msg.copy(time=rng.choice([0x0FFFFFFF, 0x00FFFFFF, 100_000, 0]))
        elif edit == 1 and msg.type in ("note_on", "note_off"):
            track[i] = msg.copy(channel=rng.choice([0, 1, 9, 15]))
        elif edit == 2 and msg.type == "note_off":
            track[i] = msg.copy(note=rng.randrange(128))  # one note never released
        elif edit == 3 and msg.type == "note_on":
            track[i] = msg.copy(velocity=rng.choice([0, 1, 127]))
        elif edit == 4:
            track.insert(i, mido.Message("program_change", program=rng.randrange(128),
                                         channel=getattr(msg, "channel", 0)))
        elif edit == 5:
            for _ in range(rng.choice([1, 50])):
                track.insert(i, mido.Message("control_change", control=64,
                                             value=rng.choice([0, 63, 64, 127])))
        elif edit == 6:
            track.insert(i, mido.MetaMessage("set_tempo", tempo=rng.choice([1, 100, 0xFFFFFF])))
        elif edit == 7 and msg.type == "note_on":  # the same note again, overlapping
            track.insert(i + 1, msg.copy(time=rng.choice([0, 1])))
    buf = io.BytesIO()
    try:
        mf.save(file=buf)
    except (ValueError, TypeError):  # what mido read from a mutated seed, it cannot write
        return _huge_deltas(data, rng)
    return buf.getvalue()


def _tempo(data: bytes, rng: random.Random) -> bytes:
    """Set every tempo event to an extreme value (1 us or 16.7 s per quarter note)."""
    out, value = bytearray(data), rng.choice([1, 0xFFFFFF, 0])
    at = out.find(b"\xff\x51\x03")
    while at >= 0:
        out[at + 3:at + 6] = value.to_bytes(3, "big")
        at = out.find(b"\xff\x51\x03", at + 6)
    return bytes(out)


def _header(data: bytes, rng: random.Random) -> bytes:
    out = bytearray(data)
    field = rng.choice(["format", "tracks", "division", "length", "chunk"])
    if field == "format":
        out[8:10] = rng.choice([2, 3, 0xFFFF]).to_bytes(2, "big")
    elif field == "tracks":
        out[10:12] = rng.choice([0, 1, 0xFFFF]).to_bytes(2, "big")
    elif field == "division":
        out[12:14] = rng.choice([0, 1, 0x7FFF, 0x8000, 0xE728, 0xFFFF]).to_bytes(2, "big")
    elif field == "length":
        out[4:8] = rng.choice([0, 5, 7, 1000, 0xFFFFFFFF]).to_bytes(4, "big")
    else:
        chunks = _chunks(data)
        if chunks:
            start, _ = rng.choice(chunks)
            out[start + 4:start + 8] = rng.choice([0, 1, 0x7FFFFFFF, 0xFFFFFFFF]).to_bytes(4, "big")
    return bytes(out)


def _in_track(data: bytes, events: bytes, at_start: bool = False) -> bytes:
    """``events`` (delta-timed event bytes) put into the first track whose end is intact:
    before its End-of-Track, or at its start."""
    for start, length in _chunks(data):
        body = data[start + 8:start + 8 + length]
        if data[start:start + 4] != b"MTrk" or not body.endswith(b"\xff\x2f\x00") or (
                len(body) < 4 or body[-4] >= 0x80):
            continue
        body = events + body if at_start else body[:-4] + events + body[-4:]
        return data[:start + 4] + len(body).to_bytes(4, "big") + body + data[start + 8 + length:]
    return data


def _flood(data: bytes, rng: random.Random) -> tuple[str, bytes]:
    """Floods: 10^4 to 2 x 10^6 notes (up to 16 MB) of zero length on one tick, of one
    tick each, or all started on one tick; or a delta time of 5 to 12 varint bytes."""
    kind = rng.choice(["zero-length flood", "one-tick flood", "one-onset flood",
                       "long varint"])
    count = int(10 ** rng.uniform(4, 6.3))
    ch, keys = rng.randrange(16), [rng.randrange(128) for _ in range(rng.choice([1, 3, 88]))]
    on, off = 0x90 | ch, 0x80 | ch
    if kind == "zero-length flood":
        events = b"".join(bytes([0, on, keys[i % len(keys)], 64, 0, off, keys[i % len(keys)], 0])
                          for i in range(min(count, 1000)))
        events *= max(count // 1000, 1)
    elif kind == "one-tick flood":
        events = bytes([0, on, keys[0], 64, 1, off, keys[0], 0]) * count
    elif kind == "one-onset flood":
        events = (bytes([0, on, keys[0], 64]) * count + bytes([1, off, keys[0], 0])
                  + bytes([0, off, keys[0], 0]) * (count - 1))
    else:
        varint = b"\xff" * rng.randint(4, 11) + b"\x7f"
        return kind, _in_track(data, varint + bytes([on, keys[0], 64, 10, off, keys[0], 0]),
                               at_start=rng.random() < 0.5)
    return kind, _in_track(data, events)


def mutate(data: bytes, rng: random.Random) -> tuple[str, bytes]:
    """One mutation of ``data``, named."""
    kind = rng.choice(["truncate", "flip", "flip", "huge deltas", "header", "tempo", "splice",
                       "random", "random header", "varint", "status", "structured",
                       "structured", "structured", "structured", "flood"])
    out = bytearray(data)
    if kind == "flood":
        return _flood(data, rng)
    if kind == "truncate":
        out = out[:rng.randrange(len(out))]
    elif kind == "flip":
        for _ in range(rng.randint(1, 20)):
            out[rng.randrange(len(out))] = rng.randrange(256)
    elif kind == "huge deltas":
        out = bytearray(_huge_deltas(data, rng))
    elif kind == "structured":
        out = bytearray(_structured(data, rng))
    elif kind == "header":
        out = bytearray(_header(data, rng))
    elif kind == "tempo":
        out = bytearray(_tempo(data, rng))
    elif kind == "splice":
        a, b = sorted(rng.randrange(len(out)) for _ in range(2))
        out = out[:b] + out[a:]
    elif kind == "random":
        out = bytearray(rng.randbytes(rng.randint(0, 4096)))
    elif kind == "random header":  # a valid header, then garbage chunks
        out = bytearray(data[:14]) + b"MTrk" + struct.pack(">I", 2000) + rng.randbytes(2000)
    elif kind == "varint":  # a run of continuation bytes: a variable-length number without end
        at = rng.randrange(14, len(out)) if len(out) > 14 else 0
        out[at:at] = b"\xff" * rng.randint(4, 64)
    else:  # status bytes where data bytes belong, and the reverse
        for _ in range(rng.randint(1, 50)):
            at = rng.randrange(len(out))
            out[at] ^= 0x80
    return kind, bytes(out)


def mutations(seeds: list[bytes], count: int, seed: int = 0) -> Iterator[tuple[str, bytes]]:
    """``count`` mutated files from ``seeds`` (raw MIDI files), reproducible from ``seed``."""
    rng = random.Random(seed)
    for _ in range(count):
        kind, data = mutate(rng.choice(seeds), rng)
        if rng.random() < 0.2:  # some get a second mutation
            second, data = mutate(data or b"MThd", rng)
            kind = f"{kind} + {second}"
        yield kind, data


def outcome(data: bytes, seconds: list[float] | None = None) -> str:
    """What encode_midi does with ``data``: "tokens", "MidiError", or the exception type.
    The seconds encode_midi took are appended to ``seconds``."""
    start = time.perf_counter()
    try:
        tokens = encode_midi(data)
    except MidiError:
        return "MidiError"
    except Exception as exc:  # what the fuzzer is looking for
        return f"{type(exc).__name__}: {str(exc)[:120]}"
    finally:
        if seconds is not None:
            seconds.append(time.perf_counter() - start)
    decode_midi(tokens)
    return "tokens"


def _peak_kib() -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmHWM"))


def _worker(conn) -> None:
    """Cap this process's address space, then answer (outcome, peak growth) per file."""
    with open("/proc/self/status") as f:
        size = next(int(line.split()[1]) for line in f if line.startswith("VmSize")) * 1024
    resource.setrlimit(resource.RLIMIT_AS, (size + MEMORY_LIMIT, size + MEMORY_LIMIT))
    while True:
        data = conn.recv_bytes()
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # reset the peak resident set size
        base = _peak_kib()
        seconds: list[float] = []
        result = outcome(data, seconds)
        conn.send((result, (_peak_kib() - base) * 1024, seconds[0]))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("folders", nargs="*", type=Path, default=DEFAULT_FOLDERS)
    ap.add_argument("--count", type=int, default=3000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--timeout", type=float, default=10.0, help="seconds before a hang")
    ap.add_argument("--slow", type=float, default=2.0, help="seconds that make a file slow")
    args = ap.parse_args()
    seeds = [f.read_bytes() for folder in args.folders if folder.is_dir()
             for f in midi_files(folder)]
    if not seeds:
        sys.exit("no MIDI files to mutate")
    seeds.sort(key=len)  # structured mutations parse with mido: keep seeds of moderate size
    seeds = seeds[: max(5, len(seeds) * 3 // 4)]

    ctx = multiprocessing.get_context("spawn")
    results, kinds, hangs, peaks, slowest = Counter(), Counter(), [], [], (0.0, "")
    slow: list[str] = []
    proc, conn = None, None
    start = time.perf_counter()
    for i, (kind, data) in enumerate(mutations(seeds, args.count, args.seed)):
        if proc is None:
            conn, child = ctx.Pipe()
            proc = ctx.Process(target=_worker, args=(child,), daemon=True)
            proc.start()
        conn.send_bytes(data)
        if not conn.poll(args.timeout):
            hangs.append(f"#{i} ({kind})")
            proc.kill()
            proc.join()
            proc = None
            continue
        try:
            result, peak, took = conn.recv()
        except EOFError:  # the worker died (a crash, not an exception)
            results[f"worker died (exit {proc.exitcode})"] += 1
            proc.join()
            proc = None
            continue
        slowest = max(slowest, (took, f"#{i} ({kind}, {len(data) / 2**20:.1f} MiB)"))
        if took > args.slow:
            slow.append(f"#{i} ({kind}, {took:.1f} s)")
        results[result] += 1
        kinds[kind.split(" + ")[0]] += 1
        peaks.append(peak)
        if (i + 1) % 500 == 0:
            print(f"{i + 1} files...", file=sys.stderr)
    if proc is not None:
        proc.kill()

    print(f"{args.count} mutated files from {len(seeds)} seeds in "
          f"{time.perf_counter() - start:.1f} s (seed {args.seed})")
    print("mutations: " + ", ".join(f"{k} {n}" for k, n in sorted(kinds.items())))
    for result, n in results.most_common():
        print(f"  {n:6d}  {result}")
    others = sum(n for r, n in results.items() if r not in ("tokens", "MidiError"))
    peak = max(peaks, default=0)
    print(f"exceptions other than MidiError: {others}")
    print(f"hangs (> {args.timeout:g} s): {len(hangs)} {' '.join(hangs[:10])}")
    print(f"files over {args.slow:g} s: {len(slow)} {' '.join(slow[:10])}")
    print(f"peak memory growth per file: max {peak / 2**20:.1f} MiB "
          f"(limit {MEMORY_LIMIT / 2**20:.0f} MiB); slowest file {slowest[0]:.2f} s "
          f"{slowest[1]}")
    sys.exit(1 if others or hangs or slow or peak > MEMORY_LIMIT else 0)


if __name__ == "__main__":
    main()
