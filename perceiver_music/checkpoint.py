"""Checkpoints (design.md, Checkpoints): the portable folder, and every older kind.

The portable folder is ``config.json`` + ``model.safetensors``. ``config.json`` holds the
model config under ``"model"``, the vocabulary version, and any extra entries the caller
passes (training settings, step, validation loss). ``model.safetensors`` holds the
library's state dict without wrapper prefixes (``module.`` from DDP, ``_orig_mod.`` from
torch.compile, ``net.`` from the library's AutoregressiveWrapper), so every checkpoint
loads into a bare model; safetensors stores only tensors, so loading runs no code.

``load_checkpoint`` also reads accelerate ``save_state`` folders and the original scripts'
``.pth`` files (``{'state_dict': ...}``, with or without optimizer state). Their hyper-
parameters are inferred from the tensor shapes; what shapes cannot tell (heads, prefix
length) comes from the caller. Pickles are read only through ``RestrictedUnpickler``:
tensors, storages, dtypes and ordered dicts load, any other global is refused by name.
Tensors saved on an XLA device (TPU) are rebuilt on the CPU, without torch_xla.
"""

from __future__ import annotations

import codecs
import collections
import json
import os
import pickle
import re
import shutil
import tempfile
import types
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from perceiver_ar_pytorch import PerceiverAR
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from midi_processor.vocab import VOCAB_VERSION

from .config import ModelConfig
from .model import build_model

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
_WRAPPER_PREFIXES = ("module.", "_orig_mod.", "net.")
ORIGINAL_HEADS = 8  # the original scripts' defaults for what tensor shapes cannot tell
ORIGINAL_PREFIX = 1024


def default_permissions(path: Path) -> None:
    """Give a file or folder made through a private temporary name the permissions a plain
    ``open``/``mkdir`` would have given it under the current umask."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(path, (0o777 if Path(path).is_dir() else 0o666) & ~umask)


@contextmanager
def atomic_folder(dest: Path, replace: bool = False) -> Iterator[Path]:
    """A private temporary folder beside ``dest`` to fill; when the block ends normally
    it gets the usual permissions and becomes ``dest`` (replacing an existing one only if
    ``replace``), and on any error or exit it is removed, so ``dest`` is never partial."""
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.", dir=dest.parent))
    try:
        yield tmp
        default_permissions(tmp)
        if replace and dest.exists():
            shutil.rmtree(dest)
        tmp.rename(dest)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


class CheckpointError(Exception):
    """A checkpoint could not be read: the message names the path and the problem."""


def _tensor_from_device_payload(data, dtype, device, requires_grad):
    """Rebuild a tensor that was saved on another device (e.g. ``xla:0``) on the CPU."""
    t = data if isinstance(data, Tensor) else torch.from_numpy(data.copy())
    return t.to(dtype).requires_grad_(requires_grad)


def _allowed_globals() -> dict[tuple[str, str], Any]:
    allowed: dict[tuple[str, str], Any] = {("collections", "OrderedDict"): collections.OrderedDict}
    for name in ("_rebuild_tensor", "_rebuild_tensor_v2", "_rebuild_tensor_v3",
                 "_rebuild_parameter", "_rebuild_parameter_with_state"):
        allowed[("torch._utils", name)] = getattr(torch._utils, name)
    for name in ("_rebuild_device_tensor_from_numpy", "_rebuild_xla_tensor",
                 "_rebuild_device_tensor_from_cpu_tensor"):
        allowed[("torch._utils", name)] = _tensor_from_device_payload
    allowed[("torch", "Size")] = torch.Size
    allowed[("torch", "device")] = torch.device
    for name in dir(torch):
        if isinstance(getattr(torch, name, None), torch.dtype):
            allowed[("torch", name)] = getattr(torch, name)
    # numpy arrays appear only as the payload of device tensors (XLA saves).
    import numpy

    try:
        from numpy._core.multiarray import _reconstruct
    except ImportError:  # numpy < 2
        from numpy.core.multiarray import _reconstruct
    for mod in ("numpy.core.multiarray", "numpy._core.multiarray"):
        allowed[(mod, "_reconstruct")] = _reconstruct
    allowed[("numpy", "ndarray")] = numpy.ndarray
    allowed[("numpy", "dtype")] = numpy.dtype
    allowed[("_codecs", "encode")] = codecs.encode  # how protocol 2 pickles array bytes
    return allowed


class UnsafePickleError(pickle.UnpicklingError):
    """A pickle asked for a global outside the allow-list."""


class RestrictedUnpickler(pickle.Unpickler):
    """The project's only way to read a pickle: globals come from an allow-list.

    ``allow`` maps (module, name) to the object to use; the default allows what a torch
    checkpoint needs (storages are resolved by torch itself). Pass ``allow={}`` to refuse
    every global, as token files need none. Anything else raises UnpicklingError naming it.
    """

    def __init__(self, file, *, allow: Mapping[tuple[str, str], Any] | None = None, **kwargs):
        super().__init__(file, **kwargs)
        self.allow = _allowed_globals() if allow is None else allow

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in self.allow:
            return self.allow[(module, name)]
        if module.startswith("numpy.dtypes") and name.endswith("DType"):
            import numpy

            return getattr(numpy.dtypes, name)
        raise UnsafePickleError(f"refuses global {module}.{name} (not a tensor, storage, "
                                "dtype or ordered dict)")


# torch.load takes a pickle *module*; this one has the restricted Unpickler.
_restricted_pickle = types.SimpleNamespace(
    Unpickler=RestrictedUnpickler, load=pickle.load, loads=pickle.loads,
    UnpicklingError=pickle.UnpicklingError, __name__="restricted_pickle")


def safe_torch_load(path: Path) -> Any:
    """``torch.load`` of ``path`` through RestrictedUnpickler, everything on the CPU."""
    try:
        return torch.load(path, map_location="cpu", pickle_module=_restricted_pickle,
                          weights_only=False)
    except UnsafePickleError as err:
        raise CheckpointError(f"{path}: unsafe pickle, {err}") from None
    except Exception as err:  # truncated zip, not a torch file, ...
        msg = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise CheckpointError(f"{path}: not a readable checkpoint ({msg})") from None


def save_checkpoint(
    directory: str | os.PathLike[str],
    model: nn.Module,
    cfg: ModelConfig,
    extra: Mapping[str, Any] | None = None,
) -> Path:
    """Write ``model`` (bare, DDP- or compile-wrapped) and ``cfg`` to ``directory``.

    ``extra`` entries (JSON-serialisable) go to the top level of config.json. Each file is
    written under a temporary name and renamed into place, so an interrupted save never
    leaves a truncated file under the real name. Returns the directory.
    """
    directory = Path(directory)
    extra = dict(extra or {})
    clash = sorted({"model", "vocab_version"} & set(extra))
    if clash:
        raise ValueError(f"extra must not set reserved keys: {', '.join(clash)}")
    config_text = json.dumps({"model": cfg.to_dict(), "vocab_version": cfg.vocab_version,
                              **extra}, indent=2) + "\n"
    state = {key: tensor.detach().to("cpu").contiguous()
             for key, tensor in strip_prefixes(model.state_dict()).items()}

    directory.mkdir(parents=True, exist_ok=True)
    tmp_weights = directory / f".{WEIGHTS_NAME}.{os.getpid()}.tmp"
    tmp_config = directory / f".{CONFIG_NAME}.{os.getpid()}.tmp"
    try:
        save_file(state, str(tmp_weights), metadata={"vocab_version": cfg.vocab_version})
        tmp_config.write_text(config_text, encoding="utf-8")
        for tmp in (tmp_weights, tmp_config, directory):
            default_permissions(tmp)
        os.replace(tmp_weights, directory / WEIGHTS_NAME)
        os.replace(tmp_config, directory / CONFIG_NAME)
    finally:
        tmp_weights.unlink(missing_ok=True)
        tmp_config.unlink(missing_ok=True)
    return directory


def load_checkpoint(
    path: str | os.PathLike[str],
    map_location: str | torch.device = "cpu",
    *,
    heads: int | None = None,
    prefix: int | None = None,
) -> tuple[PerceiverAR, ModelConfig, dict[str, Any]]:
    """Read any checkpoint: (model in eval mode on ``map_location``, config, meta).

    ``path`` is a portable folder (config.json + model.safetensors), an accelerate
    ``save_state`` folder (its config comes from a config.json beside it, as in a run's
    ``last/state``, or is inferred), or a ``.pth`` / ``.pt`` / ``.bin`` / ``.safetensors``
    file of the original scripts (inferred). When inferring, ``heads`` and ``prefix``
    (default: the original scripts' 8 and 1024) supply what shapes cannot tell. ``meta``
    holds config.json's other entries, or ``{"source": ..., "inferred": True}``. Raises
    CheckpointError naming the path and the problem for anything unreadable or unsafe.
    """
    path = Path(path)
    state_markers = ("optimizer.bin", "random_states_0.pkl", "pytorch_model.bin")
    if path.is_dir() and not (path / CONFIG_NAME).is_file() and any(
        (path / m).is_file() for m in state_markers
    ):
        state = _read_state_folder(path)
        if (path.parent / CONFIG_NAME).is_file():
            cfg, meta = _read_config(path.parent / CONFIG_NAME)
        else:
            cfg = infer_config(state, path, heads=heads, prefix=prefix)
            meta = {"source": "accelerate state folder", "inferred": True}
    elif path.is_dir():
        cfg, meta = _read_config(path / CONFIG_NAME)
        state = _read_weights(path / WEIGHTS_NAME)
        path = path / WEIGHTS_NAME
    elif path.is_file():
        if path.suffix == ".safetensors":
            state = _read_weights(path)
        else:
            state = _state_dict_of(safe_torch_load(path), path)
        cfg = infer_config(state, path, heads=heads, prefix=prefix)
        meta = {"source": f"{path.suffix} file", "inferred": True}
    else:
        raise CheckpointError(f"{path}: not a checkpoint directory or file (it does not "
                              "exist)")
    model = build_model(cfg)
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if missing or unexpected:
        raise CheckpointError(
            f"{path}: weights do not match the model config: "
            f"missing {_some(missing)}; unexpected {_some(unexpected)}")
    for key, reference in expected.items():
        if state[key].shape != reference.shape:
            raise CheckpointError(
                f"{path}: tensor {key} has shape {tuple(state[key].shape)} but the model "
                f"config needs {tuple(reference.shape)}")
    model.load_state_dict({k: v.float() if v.is_floating_point() else v
                           for k, v in state.items()})
    return model.to(map_location).eval(), cfg, meta


def infer_config(
    state: Mapping[str, Tensor], path: Path, *, heads: int | None = None,
    prefix: int | None = None,
) -> ModelConfig:
    """A ModelConfig from a bare state dict's shapes, plus ``heads`` and ``prefix``.

    Shapes give the vocabulary, dim, context, depth, the attention width (heads x
    dim_head) and the feed-forward multiplier; a mismatch with the given heads or prefix
    is reported with what the shapes say.
    """
    heads = ORIGINAL_HEADS if heads is None else heads
    try:
        num_tokens, dim = state["token_emb.weight"].shape
        max_seq_len = state["pos_emb.weight"].shape[0]
        inner = state["layers.0.0.to_qkv.weight"].shape[0] // 3
        hidden = state["layers.0.1.1.weight"].shape[0]
    except KeyError as err:
        raise CheckpointError(f"{path}: not a PerceiverAR state dict (no {err.args[0]}; "
                              f"keys start {_some(sorted(state), 3)})") from None
    depth = len({k.split(".")[1] for k in state if re.match(r"layers\.\d+\.", k)})
    perceive = len({k.split(".")[1] for k in state if re.match(r"perceive_layers\.\d+\.", k)})
    if inner % heads:
        raise CheckpointError(f"{path}: attention width {inner} is not divisible by "
                              f"--heads {heads}")
    if prefix is None:
        prefix = ORIGINAL_PREFIX if max_seq_len > ORIGINAL_PREFIX else max_seq_len // 2
    if not 0 < prefix < max_seq_len:
        raise CheckpointError(f"{path}: --prefix {prefix} must be between 1 and the "
                              f"context {max_seq_len} (exclusive)")
    try:
        return ModelConfig(dim=dim, depth=depth, max_seq_len=max_seq_len,
                           cross_attn_seq_len=prefix, num_tokens=num_tokens, heads=heads,
                           dim_head=inner // heads, ff_mult=hidden / dim,
                           perceive_depth=max(perceive, 1))
    except ValueError as err:
        raise CheckpointError(f"{path}: shapes give an unusable model config: {err}") from None


def _state_dict_of(obj: Any, path: Path) -> dict[str, Tensor]:
    """The model tensors of a loaded pickle: ``{'state_dict': ...}``, ``{'model': ...}``
    (optimizer state alongside is ignored) or a bare state dict."""
    for key in ("state_dict", "model", "model_state_dict"):
        if isinstance(obj, Mapping) and isinstance(obj.get(key), Mapping):
            obj = obj[key]
            break
    if not isinstance(obj, Mapping) or not obj or not all(
        isinstance(v, Tensor) for v in obj.values()
    ):
        raise CheckpointError(f"{path}: holds no state dict of tensors (expected "
                              "{'state_dict': {name: tensor}} or {name: tensor})")
    return strip_prefixes(obj)


def _read_state_folder(path: Path) -> dict[str, Tensor]:
    """Model weights of an accelerate ``save_state`` folder (safetensors or torch)."""
    if (path / WEIGHTS_NAME).is_file():
        return _read_weights(path / WEIGHTS_NAME)
    if (path / "pytorch_model.bin").is_file():
        return _state_dict_of(safe_torch_load(path / "pytorch_model.bin"), path)
    raise CheckpointError(f"{path}: accelerate state folder without model weights "
                          f"({WEIGHTS_NAME} or pytorch_model.bin)")


def strip_prefixes(state: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """The state dict with leading wrapper prefixes (``module.``, ``_orig_mod.``, ``net.``)
    removed."""
    stripped = {}
    for key, tensor in state.items():
        while key.startswith(_WRAPPER_PREFIXES):
            key = key.split(".", 1)[1]
        stripped[key] = tensor
    return stripped


def _read_config(path: Path) -> tuple[ModelConfig, dict[str, Any]]:
    if not path.is_file():
        raise CheckpointError(f"{path}: missing (a checkpoint needs {CONFIG_NAME} and "
                              f"{WEIGHTS_NAME})")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise CheckpointError(f"{path}: not valid JSON: {err}") from err
    if not isinstance(data, dict) or not isinstance(data.get("model"), dict):
        raise CheckpointError(f"{path}: expected an object with a \"model\" object")
    meta = {key: value for key, value in data.items() if key != "model"}
    version = meta.get("vocab_version", VOCAB_VERSION)
    if version != data["model"].get("vocab_version", version):
        raise CheckpointError(f"{path}: vocab_version {version!r} disagrees with the model "
                              f"config's {data['model']['vocab_version']!r}")
    try:
        cfg = ModelConfig.from_dict({"vocab_version": version, **data["model"]})
    except (TypeError, ValueError) as err:
        raise CheckpointError(f"{path}: invalid model config: {err}") from err
    return cfg, meta


def _read_weights(path: Path) -> dict[str, Tensor]:
    if not path.is_file():
        raise CheckpointError(f"{path}: missing (a checkpoint needs {CONFIG_NAME} and "
                              f"{WEIGHTS_NAME})")
    try:
        return strip_prefixes(load_file(str(path), device="cpu"))
    except (SafetensorError, OSError, ValueError) as err:
        raise CheckpointError(f"{path}: cannot read safetensors weights: {err}") from err


def _some(keys: list[str], limit: int = 5) -> str:
    if not keys:
        return "none"
    more = f" and {len(keys) - limit} more" if len(keys) > limit else ""
    return ", ".join(keys[:limit]) + more
