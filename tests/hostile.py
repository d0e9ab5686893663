"""Hostile checkpoint files: every way a torch file can carry a pickle that runs code.

Each payload, if it ever ran, would create ``marker`` (a shell ``touch``). Tests assert that
the marker never appears, whatever loader reads the file.
"""

from __future__ import annotations

import io
import os
import pickle
import tarfile
import warnings
import zipfile
from collections import OrderedDict
from pathlib import Path

import numpy as np
import torch

LEGACY_MAGIC = 0x1950A86A20F9469CFC6C
LEGACY_PROTOCOL = 1001
SYS_INFO = {"protocol_version": 1001, "little_endian": True,
            "type_sizes": {"short": 2, "int": 4, "long": 4}}


class Payload:
    """Pickles as a call to ``os.system("touch MARKER")``."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


class Rebuild:
    """Pickles as a call to any callable with any arguments (to misuse allowed ones)."""

    def __init__(self, fn, *args) -> None:
        self.fn, self.args = fn, args

    def __reduce__(self):
        return (self.fn, self.args)


class _PersId:
    """Pickles as a persistent id (what torch.save writes for storages)."""

    def __init__(self, pid) -> None:
        self.pid = pid


class _PersPickler(pickle.Pickler):
    def persistent_id(self, obj):
        return obj.pid if isinstance(obj, _PersId) else None


def _p(obj) -> bytes:
    """Protocol-2 pickle of ``obj``, `_PersId` objects as persistent ids."""
    buf = io.BytesIO()
    _PersPickler(buf, protocol=2).dump(obj)
    return buf.getvalue()


def _zip(path: Path, records: dict[str, bytes]) -> Path:
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as z:
        for name, data in records.items():
            z.writestr(name, data)
    return path


def _legacy(path: Path, *records: bytes) -> Path:
    path.write_bytes(b"".join(records))
    return path


def hostile_files(folder: Path, marker: Path) -> dict[str, Path]:
    """One file per attack, named by what it tries; all use ``marker``."""
    folder.mkdir(parents=True, exist_ok=True)
    evil = Payload(marker)
    weights = {"state_dict": {"token_emb.weight": torch.zeros(2, 2)}}
    files: dict[str, Path] = {}

    # zip format (torch >= 1.6): the payload in data.pkl, as torch.save writes it
    torch.save({"state_dict": {"token_emb.weight": evil}}, folder / "zip.pt")
    files["zip data.pkl"] = folder / "zip.pt"
    # legacy format, the payload in each of its five records
    torch.save({"state_dict": evil}, folder / "legacy_object.pth",
               _use_new_zipfile_serialization=False)
    files["legacy object"] = folder / "legacy_object.pth"
    files["raw pickle (magic record)"] = _legacy(folder / "raw.ckpt", _p(evil))
    files["legacy protocol record"] = _legacy(folder / "proto.bin", _p(LEGACY_MAGIC), _p(evil))
    files["legacy sys_info record"] = _legacy(
        folder / "sysinfo.pt", _p(LEGACY_MAGIC), _p(LEGACY_PROTOCOL), _p(evil))
    files["legacy storage keys record"] = _legacy(
        folder / "keys.pt", _p(LEGACY_MAGIC), _p(LEGACY_PROTOCOL), _p(SYS_INFO),
        _p({"state_dict": {}}), _p(evil))
    # the tar format of PyTorch < 0.4
    tar_path = folder / "old.tar.pt"
    with tarfile.open(tar_path, "w", format=tarfile.PAX_FORMAT) as tar:
        for name in ("storages", "tensors", "pickle"):
            data = _p(evil)
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    files["tar format"] = tar_path
    # TorchScript: torch.load hands an archive holding constants.pkl to torch.jit.load
    files["torchscript constants.pkl"] = _zip(folder / "script.pt", {
        "archive/data.pkl": _p(weights), "archive/constants.pkl": _p(evil),
        "archive/version": b"3"})
    with warnings.catch_warnings():  # TorchScript is deprecated, and still loadable
        warnings.simplefilter("ignore", DeprecationWarning)
        torch.jit.save(torch.jit.script(torch.nn.Linear(2, 2)), folder / "jit.pt")
    files["real torchscript"] = folder / "jit.pt"
    # allowed names misused
    files["numpy huge array"] = _zip(folder / "numpy.pt", {"archive/data.pkl": _p(
        {"state_dict": {"w": Rebuild(np._core.multiarray._reconstruct, np.ndarray,
                                     (10**12,), b"b")}})})
    files["codecs other than latin-1"] = _zip(folder / "codecs.pt", {"archive/data.pkl": _p(
        Rebuild(__import__("_codecs").encode, "x", "rot13"))})
    storage = _PersId(("storage", torch.FloatStorage, "0", "cpu", 4))
    files["tensor with hooks"] = _zip(folder / "hooks.pt", {
        "archive/data.pkl": _p({"w": Rebuild(torch._utils._rebuild_tensor_v2, storage, 0,
                                             (4,), (1,), False, OrderedDict(a=torch.Size))}),
        "archive/data/0": b"\0" * 16})
    files["tensor past its storage"] = _zip(folder / "past.pt", {
        "archive/data.pkl": _p({"w": Rebuild(torch._utils._rebuild_tensor_v2, storage, 2,
                                             (4,), (1,), False, OrderedDict())}),
        "archive/data/0": b"\0" * 16})
    files["storage larger than the file"] = _zip(folder / "big.pt", {
        "archive/data.pkl": _p(Rebuild(torch._utils._rebuild_tensor_v2,
                                       _PersId(("storage", torch.FloatStorage, "0", "cpu",
                                                10**11)), 0, (10**11,), (1,), False,
                                       OrderedDict())),
        "archive/data/0": b"\0" * 16})
    files["persistent id outside a torch file"] = _zip(folder / "persid.pt", {
        "archive/data.pkl": _p(_PersId(("module", evil)))})
    return files
