"""Reading pickles without running their code: the project's only pickle reader.

A pickle names functions for the reader to call; ``pickle.load`` calls whatever it names,
so a checkpoint crafted with ``__reduce__`` runs any command on load. Every pickle this
project reads goes through `RestrictedUnpickler`, whose globals come from an allow-list:
tensor rebuilders (checked: shapes within their storage, no hooks), storage types, dtypes,
``torch.Size``, ``torch.device``, ordered dicts, and the numpy pieces of XLA tensors and
RNG states. Anything else is refused by name, before anything runs.

`read_torch_file` reads the files ``torch.save`` writes without calling ``torch.load``
(whose older formats read several records with the plain ``pickle.load``, and which hands a
zip holding ``constants.pkl`` to ``torch.jit.load``):

- zip format (PyTorch >= 1.6): ``data.pkl`` through the restricted unpickler, each storage
  from its stored (uncompressed) zip entry, sized as its record says before allocation;
- legacy format (``_use_new_zipfile_serialization=False``): all five records (magic
  number, protocol, sys_info, the object, the storage keys) through the restricted
  unpickler, then the raw storages, each sized against the bytes left in the file;
- refused with one line: TorchScript archives (loading runs their code), the tar format of
  PyTorch < 0.4, and anything else. safetensors is the safe format to convert them to.
"""

from __future__ import annotations

import codecs
import collections
import io
import math
import pickle
import struct
import sys
import zipfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

SAFE_FORMAT = "safetensors (config.json + model.safetensors, see cpu_convert.py)"
_LEGACY_MAGIC = 0x1950A86A20F9469CFC6C
_LEGACY_PROTOCOL = 1001
_MAX_PICKLE_BYTES = 256 * 2**20  # data.pkl of a huge optimizer state is a few MB


class UnsafePickleError(pickle.UnpicklingError):
    """A pickle asked for a global outside the allow-list, or misused an allowed one."""


class TorchFileError(Exception):
    """A file is not a torch file this module can read safely; the message says why."""


@dataclass(frozen=True)
class _StorageType:
    """What ``torch.FloatStorage`` and friends stand for in a pickle: a dtype."""

    dtype: torch.dtype


@dataclass(frozen=True)
class _Storage:
    """A storage read from a file: its raw bytes and the dtype its record names."""

    data: Tensor  # uint8, 1-D
    dtype: torch.dtype


def _rebuild_tensor(storage: Any, offset: Any, size: Any, stride: Any, requires_grad: Any = False,
                    hooks: Any = None, metadata: Any = None, dtype: torch.dtype | None = None
                    ) -> Tensor:
    """A tensor view of ``storage``; refuses shapes that reach outside it, and hooks or
    metadata (an attacker's callables would run later)."""
    if not isinstance(storage, _Storage):
        raise UnsafePickleError("tensor rebuilt from something that is not a stored storage")
    if hooks or metadata:
        raise UnsafePickleError("tensor with backward hooks or metadata")
    dims = (size, stride)
    if not all(isinstance(d, tuple | torch.Size) and all(type(v) is int and v >= 0 for v in d)
               for d in dims) or len(size) != len(stride) or type(offset) is not int or offset < 0:
        raise UnsafePickleError(f"tensor with impossible shape {size}, stride {stride}, "
                                f"offset {offset}")
    dtype = storage.dtype if dtype is None else dtype
    itemsize = torch.empty((), dtype=dtype).element_size()
    if storage.data.numel() % itemsize:
        raise UnsafePickleError(f"storage of {storage.data.numel()} bytes is not a whole "
                                f"number of {dtype} elements")
    flat = storage.data.view(dtype)
    extent = 0 if 0 in size else offset + 1 + sum((n - 1) * s for n, s in zip(size, stride,
                                                                                strict=True))
    if extent > flat.numel():
        raise UnsafePickleError(f"tensor of shape {tuple(size)} reaches past its storage of "
                                f"{flat.numel()} elements")
    out = torch.as_strided(flat, tuple(size), tuple(stride), offset)
    return out.requires_grad_(bool(requires_grad)) if out.is_floating_point() else out


def _rebuild_tensor_v3(storage, offset, size, stride, requires_grad, hooks, dtype,
                       metadata=None) -> Tensor:
    if not isinstance(dtype, torch.dtype):
        raise UnsafePickleError("tensor whose dtype is not a dtype")
    return _rebuild_tensor(storage, offset, size, stride, requires_grad, hooks, metadata, dtype)


def _rebuild_parameter(data: Any, requires_grad: Any, hooks: Any) -> Tensor:
    if not isinstance(data, Tensor) or hooks:
        raise UnsafePickleError("parameter that is not a plain tensor")
    return torch.nn.Parameter(data, bool(requires_grad))


def _tensor_from_device_payload(data: Any, dtype: Any, device: Any, requires_grad: Any) -> Tensor:
    """Rebuild a tensor that was saved on another device (e.g. ``xla:0``) on the CPU."""
    if isinstance(data, np.ndarray) and data.dtype != object:
        data = torch.from_numpy(data.copy())
    if not isinstance(data, Tensor) or not isinstance(dtype, torch.dtype):
        raise UnsafePickleError("device tensor whose payload is not an array")
    return data.to(dtype).requires_grad_(bool(requires_grad) and dtype.is_floating_point)


def _numpy_reconstruct(subtype: Any, shape: Any, dtype: Any) -> np.ndarray:
    """numpy's array constructor for pickles, limited to empty plain arrays (the pickle's
    BUILD then fills them from bytes it holds, so size stays bounded by the file)."""
    if subtype is not np.ndarray or math.prod(shape if isinstance(shape, tuple) else (0,)) > 1:
        raise UnsafePickleError("numpy array reconstruction other than an empty ndarray")
    from numpy._core.multiarray import _reconstruct

    return _reconstruct(subtype, shape, dtype)


def _latin1_encode(text: Any, encoding: Any = "utf-8", errors: Any = "strict") -> bytes:
    """``_codecs.encode`` as protocol-2 pickles use it for bytes: latin-1 only."""
    if not isinstance(text, str) or encoding not in ("latin1", "latin-1") or errors != "strict":
        raise UnsafePickleError("_codecs.encode other than latin-1 text to bytes")
    return codecs.encode(text, "latin1")


def _checkpoint_globals() -> dict[tuple[str, str], Any]:
    """The allow-list for torch files: what state dicts, optimizer states, RNG states and
    XLA-saved tensors need, each bound to a checked implementation."""
    allowed: dict[tuple[str, str], Any] = {
        ("collections", "OrderedDict"): collections.OrderedDict,
        ("torch._utils", "_rebuild_tensor"): _rebuild_tensor,
        ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor,
        ("torch._utils", "_rebuild_tensor_v3"): _rebuild_tensor_v3,
        ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
        ("torch", "Size"): torch.Size,
        ("torch", "device"): torch.device,
        ("numpy", "ndarray"): np.ndarray,
        ("numpy", "dtype"): np.dtype,
        ("numpy.core.multiarray", "_reconstruct"): _numpy_reconstruct,
        ("numpy._core.multiarray", "_reconstruct"): _numpy_reconstruct,
        ("_codecs", "encode"): _latin1_encode,
        ("torch", "UntypedStorage"): _StorageType(torch.uint8),
    }
    for name in ("_rebuild_device_tensor_from_numpy", "_rebuild_xla_tensor",
                 "_rebuild_device_tensor_from_cpu_tensor"):
        allowed[("torch._utils", name)] = _tensor_from_device_payload
    for name, dtype in torch.storage._storage_type_to_dtype_map().items():
        if not dtype.is_complex and "Q" not in name:
            allowed[("torch", name)] = _StorageType(dtype)
    for name in dir(torch):
        if isinstance(getattr(torch, name, None), torch.dtype):
            allowed[("torch", name)] = getattr(torch, name)
    return allowed


class RestrictedUnpickler(pickle.Unpickler):
    """The project's only way to read a pickle: globals come from an allow-list.

    ``allow`` maps (module, name) to the object to use instead; the default allows what
    torch files need (see `read_torch_file`). ``allow={}`` refuses every global, as token
    lists and the records around a legacy torch file need none. Anything else raises
    UnsafePickleError naming it, before it runs.
    """

    def __init__(self, file: Any, *, allow: Mapping[tuple[str, str], Any] | None = None,
                 **kwargs: Any) -> None:
        super().__init__(file, **kwargs)
        self.allow = _checkpoint_globals() if allow is None else allow

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in self.allow:
            return self.allow[(module, name)]
        if module == "numpy.dtypes" and name.endswith("DType") and self.allow:
            return getattr(np.dtypes, name)
        raise UnsafePickleError(f"refuses global {module}.{name} (not a tensor, storage, "
                                "dtype or ordered dict)")


def read_torch_file(path: str | Path) -> Any:
    """What ``torch.save`` wrote to ``path``, read without running code from it.

    Tensors come back on the CPU. Raises UnsafePickleError for a global or a tensor outside
    the allow-list, TorchFileError for any other unreadable or refused file, both with a
    message naming the problem (not the path: callers add it).
    """
    path = Path(path)
    with open(path, "rb") as f:
        head = f.read(512)
    if head.startswith(b"PK\x03\x04"):
        return _read_zip(path)
    if len(head) >= 262 and head[257:262] == b"ustar":
        raise TorchFileError("tar checkpoint of PyTorch < 0.4: this format cannot be read "
                             f"safely; convert it where you trust it to {SAFE_FORMAT}")
    if head[:1] == b"\x80":
        return _read_legacy(path)
    raise TorchFileError("not a PyTorch file (neither the zip nor the legacy format)")


def _read_zip(path: Path) -> Any:
    try:
        archive = zipfile.ZipFile(path)
    except (zipfile.BadZipFile, OSError, ValueError) as err:
        raise TorchFileError(f"damaged zip archive ({err})") from None
    with archive:
        names = {info.filename: info for info in archive.infolist()}
        if any(n.endswith("constants.pkl") or "/code/" in n for n in names):
            raise TorchFileError("TorchScript archive: loading it would run its code, so it is "
                                 f"refused; save the model's state_dict as {SAFE_FORMAT}")
        pickles = [n for n in names if n.endswith("/data.pkl") and n.count("/") == 1]
        if len(pickles) != 1:
            raise TorchFileError("zip archive without exactly one <name>/data.pkl record: "
                                 "not a torch.save file")
        prefix = pickles[0][: -len("data.pkl")]
        if prefix + "byteorder" in names and archive.read(prefix + "byteorder") != b"little":
            raise TorchFileError("big-endian torch file: not supported")
        file_size = path.stat().st_size

        def stored(name: str, expected: int | None = None) -> bytes:
            info = names.get(name)
            if info is None:
                raise TorchFileError(f"record {name} is missing")
            if info.compress_type != zipfile.ZIP_STORED or info.file_size > file_size or (
                    expected is not None and info.file_size != expected):
                raise TorchFileError(f"record {name} is compressed or not the size its "
                                     "tensor needs")
            return archive.read(name)

        storages: dict[str, _Storage] = {}

        def persistent_load(pid: Any) -> _Storage:
            if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage"
                    and isinstance(pid[1], _StorageType) and isinstance(pid[2], str)
                    and type(pid[4]) is int and pid[4] >= 0):
                raise UnsafePickleError(f"refuses persistent id {str(pid)[:80]}")
            _, kind, key, _, numel = pid
            if key not in storages:
                nbytes = numel * torch.empty((), dtype=kind.dtype).element_size()
                raw = bytearray(stored(f"{prefix}data/{key}", nbytes))
                data = torch.frombuffer(raw, dtype=torch.uint8) if raw else torch.empty(
                    0, dtype=torch.uint8)
                storages[key] = _Storage(data, kind.dtype)
            return storages[key]

        unpickler = RestrictedUnpickler(io.BytesIO(_limited(stored(pickles[0]))))
        unpickler.persistent_load = persistent_load
        return _load(unpickler)


def _read_legacy(path: Path) -> Any:
    budget = path.stat().st_size  # storages can hold no more bytes than the file
    with open(path, "rb") as f:
        if _load_record(f) != _LEGACY_MAGIC:
            raise TorchFileError("a pickle, but not a torch file (no torch magic number)")
        if _load_record(f) != _LEGACY_PROTOCOL:
            raise TorchFileError("unknown legacy torch protocol version")
        _load_record(f)  # sys_info: a dict of sizes
        storages: dict[str, _Storage] = {}
        numels: dict[str, int] = {}

        def persistent_load(pid: Any) -> _Storage:
            nonlocal budget
            if not (isinstance(pid, tuple) and len(pid) == 6 and pid[0] == "storage"
                    and isinstance(pid[1], _StorageType) and isinstance(pid[2], str)
                    and type(pid[4]) is int and pid[4] >= 0):
                raise UnsafePickleError(f"refuses persistent id {str(pid)[:80]}")
            _, kind, key, _, numel, view = pid
            size = torch.empty((), dtype=kind.dtype).element_size()
            if key not in storages:  # filled from the data after the object record
                budget -= numel * size
                if budget < 0:
                    raise TorchFileError("storages larger than the file")
                storages[key] = _Storage(torch.zeros(numel * size, dtype=torch.uint8),
                                         kind.dtype)
                numels[key] = numel
            base = storages[key]
            if view is None:
                return base
            if not (isinstance(view, tuple) and len(view) == 3
                    and all(type(v) is int and v >= 0 for v in view[1:])
                    and (view[1] + view[2]) * size <= base.data.numel()):
                raise UnsafePickleError("refuses a malformed storage view")
            return _Storage(base.data[view[1] * size:(view[1] + view[2]) * size], base.dtype)

        unpickler = RestrictedUnpickler(f)
        unpickler.persistent_load = persistent_load
        result = _load(unpickler)
        keys = _load_record(f)
        if not isinstance(keys, list) or sorted(map(str, keys)) != sorted(storages):
            raise TorchFileError("legacy storage list does not match the tensors")
        for key in keys:  # each: int64 element count, then the bytes
            header, data = f.read(8), storages[key].data
            if len(header) != 8 or struct.unpack("<q", header)[0] != numels[key] or (
                    f.readinto(data.numpy()) != data.numel()):
                raise TorchFileError("legacy storage data is truncated or mis-sized")
        return result


def _limited(data: bytes) -> bytes:
    if len(data) > _MAX_PICKLE_BYTES:
        raise TorchFileError(f"pickle record of {len(data)} bytes is implausibly large")
    return data


def _load_record(f: Any) -> Any:
    """One record of a legacy file's framing: plain data that may name no global."""
    try:
        return RestrictedUnpickler(f, allow={}).load()
    except UnsafePickleError:
        raise
    except Exception as err:
        raise TorchFileError(f"damaged legacy torch file ({_first_line(err)})") from None


def _load(unpickler: RestrictedUnpickler) -> Any:
    """Run an unpickler, turning its failures into one-line errors."""
    try:
        return unpickler.load()
    except (UnsafePickleError, TorchFileError):
        raise
    except RecursionError:
        raise TorchFileError("pickle nested too deeply") from None
    except Exception as err:  # truncated data, wrong argument counts, ...
        raise TorchFileError(f"damaged pickle ({_first_line(err)})") from None


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0][:200] if text else type(err).__name__


if sys.byteorder != "little":  # storages are read as little-endian bytes
    raise ImportError("perceiver_music.safe_pickle needs a little-endian machine")
