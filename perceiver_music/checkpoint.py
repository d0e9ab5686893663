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
length) comes from the caller. Their pickles are read only through
`perceiver_music.safe_pickle` (no code from a file ever runs; TorchScript and tar archives
are refused). Tensors saved on an XLA device (TPU) are rebuilt on the CPU, without
torch_xla. Every loader checks the config's bounds and the tensors' shapes, dtypes and
values before it allocates the model.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import stat
import tempfile
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from perceiver_ar_pytorch import PerceiverAR
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from midi_processor import default_permissions
from midi_processor.vocab import VOCAB_VERSION

from .config import MAX_PARAMETERS, ModelConfig
from .model import build_model, model_shapes
from .safe_pickle import TorchFileError, UnsafePickleError, read_torch_file

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
_WRAPPER_PREFIXES = ("module.", "_orig_mod.", "net.")
ORIGINAL_HEADS = 8  # the original scripts' defaults for what tensor shapes cannot tell
ORIGINAL_PREFIX = 1024
_MAX_CONFIG_BYTES = 1 << 20
_RUN_FOLDERS = {"best": "lowest validation loss", "last": "latest save"}


@contextmanager
def atomic_folder(dest: Path, replace: bool = False) -> Iterator[Path]:
    """A private temporary folder beside ``dest`` to fill; when the block ends normally
    it gets the usual permissions and becomes ``dest`` (replacing an existing one only if
    ``replace``), and on any error or exit it is removed, so ``dest`` is never partial.
    A ``dest`` that is a symbolic link keeps its link: the folder it points to is replaced.
    """
    dest = Path(dest)
    if dest.is_symlink():
        dest = dest.resolve()
    dest.parent.mkdir(parents=True, exist_ok=True)
    try:
        tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.", dir=dest.parent))
    except OSError as err:  # name the folder the user chose, not a temporary name in it
        raise OSError(err.errno, err.strerror, str(dest.parent)) from None
    old = dest.parent / f".{dest.name}.{os.getpid()}.old"
    try:
        yield tmp
        default_permissions(tmp)
        if replace and dest.exists():
            dest.rename(old)
        tmp.rename(dest)
    except OSError as err:
        raise named_as_final(err, tmp, dest) from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.rmtree(old, ignore_errors=True)


def named_as_final(err: OSError, temporary: Path, final: Path) -> OSError:
    """``err`` naming the file as it would be called once written: a failed write to
    ``temporary`` (a file, or a file inside a folder) is reported at ``final`` (or inside
    it), so that no message names a temporary file the user never sees."""
    if err.filename is None or not Path(err.filename).is_relative_to(temporary):
        return err
    return OSError(err.errno, err.strerror,
                   str(final / Path(err.filename).relative_to(temporary)))


class CheckpointError(Exception):
    """A checkpoint could not be read: the message names the path and the problem."""


def write_safetensors(tensors: Mapping[str, Tensor], path: Path,
                      metadata: dict[str, str] | None = None) -> None:
    """``safetensors.torch.save_file``, whose I/O failures (a full disk...) become the
    OSError they are, so that every script reports them as it reports any other."""
    try:
        save_file(dict(tensors), str(path), metadata=metadata)
    except SafetensorError as err:
        code = re.search(r"os error (\d+)", str(err))
        if code is None:
            raise
        raise OSError(int(code.group(1)), os.strerror(int(code.group(1))), str(path)) from None


def read_torch_checkpoint(path: Path) -> Any:
    """A ``torch.save`` file read with `read_torch_file` (no code from it runs), on the
    CPU; CheckpointError naming ``path`` for anything refused or unreadable."""
    try:
        return read_torch_file(path)
    except UnsafePickleError as err:
        raise CheckpointError(f"{path}: unsafe pickle, {err}") from None
    except TorchFileError as err:
        raise CheckpointError(f"{path}: not a readable checkpoint ({err})") from None
    except OSError as err:
        raise CheckpointError(f"{path}: cannot read ({err.strerror or err})") from None


def save_checkpoint(
    directory: str | os.PathLike[str],
    model: nn.Module,
    cfg: ModelConfig,
    extra: Mapping[str, Any] | None = None,
) -> Path:
    """Write ``model`` (bare, DDP- or compile-wrapped) and ``cfg`` to ``directory``.

    ``extra`` entries (JSON-serialisable) go to the top level of config.json. Both files are
    written under temporary names and renamed into place only once both are complete, so
    an interrupted or failed save leaves the previous pair (or no folder) behind, never a
    truncated file. Returns the directory.
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

    created = not directory.exists()
    directory.mkdir(parents=True, exist_ok=True)
    tmp_weights = directory / f".{WEIGHTS_NAME}.{os.getpid()}.tmp"
    tmp_config = directory / f".{CONFIG_NAME}.{os.getpid()}.tmp"
    try:
        write_safetensors(state, tmp_weights, metadata={"vocab_version": cfg.vocab_version})
        tmp_config.write_text(config_text, encoding="utf-8")
        for tmp in (tmp_weights, tmp_config):
            default_permissions(tmp)
        os.replace(tmp_weights, directory / WEIGHTS_NAME)
        os.replace(tmp_config, directory / CONFIG_NAME)
    except BaseException as err:
        if created:  # a failed first save leaves no empty folder behind
            shutil.rmtree(directory, ignore_errors=True)
        if isinstance(err, OSError):  # name the real file, not its temporary
            named = named_as_final(named_as_final(err, tmp_weights, directory / WEIGHTS_NAME),
                                   tmp_config, directory / CONFIG_NAME)
            if named is not err:
                raise named from None
        raise
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
    max_parameters: int = MAX_PARAMETERS,
) -> tuple[PerceiverAR, ModelConfig, dict[str, Any]]:
    """Read any checkpoint: (model in eval mode on ``map_location``, config, meta).

    ``path`` is a portable folder (config.json + model.safetensors; its model.safetensors
    named alone reads the folder), an accelerate
    ``save_state`` folder (its config comes from a config.json beside it, as in a run's
    ``last/state``, or is inferred), or a ``.pth`` / ``.pt`` / ``.bin`` / ``.safetensors``
    file of the original scripts (inferred). When inferring, ``heads`` and ``prefix``
    (default: the original scripts' 8 and 1024) supply what shapes cannot tell. ``meta``
    holds config.json's other entries, or ``{"source": ..., "inferred": True, "assumed":
    [...]}`` (which of heads and prefix were not given).

    A checkpoint is untrusted input: no pickle is read but through the restricted
    unpickler, and nothing is allocated before the config passed its bounds, the parameter
    count ``max_parameters`` and every tensor its shape, dtype and finiteness checks. Raises
    CheckpointError naming the path and the problem for anything unreadable or unsafe.
    """
    path = Path(path)
    if path.name == WEIGHTS_NAME and (path.parent / CONFIG_NAME).is_file():
        path = path.parent  # a checkpoint's weights file: its folder says what they are
    state_markers = ("optimizer.bin", "random_states_0.pkl", "pytorch_model.bin")
    if path.is_dir() and not (path / CONFIG_NAME).is_file() and any(
        (path / m).is_file() for m in state_markers
    ):
        state = _read_state_folder(path)
        if (path.parent / CONFIG_NAME).is_file():
            cfg, meta = _read_config(path.parent / CONFIG_NAME)
        else:
            cfg = infer_config(state, path, heads=heads, prefix=prefix)
            meta = {"source": "accelerate state folder", "inferred": True,
                    "assumed": _assumed(heads, prefix)}
    elif path.is_dir():
        if not (path / CONFIG_NAME).is_file():
            _no_config_hint(path)
        cfg, meta = _read_config(path / CONFIG_NAME)
        state = _read_weights(path / WEIGHTS_NAME)
        path = path / WEIGHTS_NAME
    elif path.is_file():
        if path.suffix == ".safetensors":
            state = _read_weights(path)
        else:
            state = _state_dict_of(read_torch_checkpoint(path), path)
        cfg = infer_config(state, path, heads=heads, prefix=prefix)
        meta = {"source": f"{path.suffix} file", "inferred": True,
                "assumed": _assumed(heads, prefix)}
    else:
        raise CheckpointError(f"{path}: not a checkpoint directory or file ({_what_is(path)})")
    stated = {"heads": (heads, cfg.heads), "prefix": (prefix, cfg.cross_attn_seq_len)}
    differ = [f"{name} {have}" for name, (given, have) in stated.items()
              if given is not None and given != have]
    if differ:  # only a config.json can disagree: it says what the model is (not ignored)
        raise CheckpointError(f"{path}: its config.json says {' and '.join(differ)}; --heads "
                              "and --prefix are for checkpoints without one (leave them out)")
    _check_weights(state, cfg, path, max_parameters)
    model = build_model(cfg, initialise=False)  # every tensor is filled from the file
    model.load_state_dict({k: v.float() for k, v in state.items()})
    return model.to(map_location).eval(), cfg, meta


def _check_weights(state: Mapping[str, Tensor], cfg: ModelConfig, path: Path,
                   max_parameters: int) -> None:
    """Refuse weights that do not fit ``cfg``, before the model is allocated: the config's
    shapes come from a model on the meta device (no memory), the parameter budget bounds
    what a config.json can make us allocate, and every tensor must be floating point and
    finite (an integer tensor would be silently cast, a NaN poisons every output)."""
    expected = model_shapes(cfg)
    count = sum(shape.numel() for shape in expected.values())
    if count > max_parameters:
        raise CheckpointError(f"{path}: the model config describes {count:,} parameters, over "
                              f"the budget of {max_parameters:,}")
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if missing or unexpected:
        raise CheckpointError(
            f"{path}: weights do not match the model config: "
            f"missing {_some(missing)}; unexpected {_some(unexpected)}")
    for key, shape in expected.items():
        tensor = state[key]
        if tensor.shape != shape:
            raise CheckpointError(
                f"{path}: tensor {key} has shape {tuple(tensor.shape)} but the model "
                f"config needs {tuple(shape)}")
        if not tensor.is_floating_point():
            raise CheckpointError(f"{path}: tensor {key} has dtype {tensor.dtype}; weights "
                                  "must be floating point")
        if not bool(torch.isfinite(tensor).all()):
            raise CheckpointError(f"{path}: tensor {key} holds NaN or infinite values")


def infer_config(
    state: Mapping[str, Tensor], path: Path, *, heads: int | None = None,
    prefix: int | None = None,
) -> ModelConfig:
    """A ModelConfig from a bare state dict's shapes, plus ``heads`` and ``prefix``.

    Shapes give the vocabulary, dim, context, depth, the attention width (heads x
    dim_head) and the feed-forward multiplier; a mismatch with the given heads or prefix
    is reported with what the shapes say.
    """
    for name, value in (("heads", heads), ("prefix", prefix)):
        if value is not None and (type(value) is not int or value < 1):
            raise CheckpointError(f"{path}: --{name} must be a whole number of at least 1, "
                                  f"got {value!r}")
    assumed_heads = heads is None
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
    if inner % heads and not assumed_heads:
        raise CheckpointError(f"{path}: attention width {inner} is not divisible by "
                              f"--heads {heads}")
    if inner % heads:
        fits = [str(d) for d in range(1, inner // 32 + 1) if inner % d == 0]
        raise CheckpointError(f"{path}: attention width {inner} is not divisible by the "
                              f"{heads} heads assumed without a config: " + (
                                  f"give --heads (one of {', '.join(fits)}: heads of 32 "
                                  "dimensions or more)" if fits else
                                  "no head count of 32 dimensions or more fits it"))
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


def config_origin(meta: Mapping[str, Any], heads: int | None = None,
                  prefix: int | None = None) -> str:
    """Where a loaded checkpoint's config came from, for the scripts' report line: its
    config.json, or the tensor shapes plus the heads and prefix the user gave or, when not
    given, assumed (shapes cannot tell them, so a wrong guess must not look inferred)."""
    if not meta.get("inferred"):
        return "from its config"
    # not given now, nor when it was converted (its meta says which were assumed then)
    assumed = [n for n in _assumed(heads, prefix) if n in meta.get("assumed", (n,))]
    if not assumed:
        return "shapes, with the given heads and prefix"
    return (f"shapes; {' and '.join(assumed)} assumed (see --heads and --prefix): give "
            + " and ".join(f"--{name}" for name in assumed) + " if the model used others")


def _assumed(heads: int | None, prefix: int | None) -> list[str]:
    """Which of heads and prefix an inferred config assumed (the user gave the others)."""
    return [name for name, given in (("heads", heads), ("prefix", prefix)) if given is None]


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
        return _state_dict_of(read_torch_checkpoint(path / "pytorch_model.bin"), path)
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


def _no_config_hint(path: Path) -> None:
    """Raise a CheckpointError that points to the checkpoint the user probably meant, for a
    folder with no config.json: a training run folder names its ``best/`` and ``last/``, a
    run's optimizer state (``last/state``) its checkpoint ``last/``, a folder of
    checkpoints (``ckpt/``) the ones inside. Returns when it has no better hint."""
    runs = [path / name for name in ("best", "last") if (path / name / CONFIG_NAME).is_file()]
    if runs:
        raise CheckpointError(f"{path} is a training run folder, not a checkpoint: use "
                              + " or ".join(f"{r} ({_RUN_FOLDERS[r.name]})" for r in runs))
    if (path / f"{OPTIMIZER_NAME}.safetensors").is_file() and (path.parent / CONFIG_NAME).is_file():
        raise CheckpointError(f"{path} holds a training run's optimizer state, not a model: "
                              f"use {path.parent}")
    try:
        inside = sorted(p for p in path.iterdir() if (p / CONFIG_NAME).is_file())
    except OSError:
        return
    if inside:
        more = f" (and {len(inside) - 3} more)" if len(inside) > 3 else ""
        raise CheckpointError(f"{path} holds checkpoints but is not one: use "
                              + " or ".join(str(p) for p in inside[:3]) + more)


def _missing(path: Path) -> CheckpointError:
    """The error for a checkpoint file that is not a regular file."""
    what = _what_is(path)
    what = "missing" if what == "it does not exist" else f"not a regular file ({what})"
    return CheckpointError(f"{path}: {what}; a checkpoint needs {CONFIG_NAME} and "
                           f"{WEIGHTS_NAME}")


def _what_is(path: Path) -> str:
    """What is at ``path`` when it is neither a directory nor a regular file: a named pipe
    or a device would block or never end if read, so it is named, not read."""
    try:
        mode = path.stat().st_mode
    except FileNotFoundError:
        return "it does not exist"
    except OSError as err:
        return f"cannot look at it: {err.strerror or err}"
    kinds = [(stat.S_ISFIFO, "a named pipe (FIFO)"), (stat.S_ISCHR, "a character device"),
             (stat.S_ISBLK, "a block device"), (stat.S_ISSOCK, "a socket"),
             (stat.S_ISDIR, "a directory")]
    return next((f"it is {name}" for test, name in kinds if test(mode)), "not a regular file")


def _read_config(path: Path) -> tuple[ModelConfig, dict[str, Any]]:
    if not path.is_file():
        raise _missing(path)
    try:
        if path.stat().st_size > _MAX_CONFIG_BYTES:
            raise CheckpointError(f"{path}: {path.stat().st_size:,} bytes is too large for "
                                  "a config")
        data = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, RecursionError) as err:  # bad JSON or UTF-8, absurd nesting
        raise CheckpointError(f"{path}: not valid JSON: {_first_line(err)}") from None
    except OSError as err:
        raise CheckpointError(f"{path}: cannot read ({err.strerror or err})") from None
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
        raise CheckpointError(f"{path}: invalid model config: {_first_line(err)}") from None
    return cfg, meta


def _read_weights(path: Path, strip: bool = True) -> dict[str, Tensor]:
    if not path.is_file():
        raise _missing(path)
    try:
        tensors = load_file(str(path), device="cpu")
    except (SafetensorError, OSError, ValueError) as err:
        raise CheckpointError(f"{path}: cannot read safetensors: {_first_line(err)}") from None
    return strip_prefixes(tensors) if strip else tensors


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0][:200] if text else type(err).__name__


def _some(keys: list[str], limit: int = 5) -> str:
    if not keys:
        return "none"
    more = f" and {len(keys) - limit} more" if len(keys) > limit else ""
    return ", ".join(keys[:limit]) + more


# ---------------------------------------------------------------------------------------
# training state: what --resume needs besides the weights, in formats that hold no code


OPTIMIZER_NAME = "optimizer"  # optimizer.safetensors + optimizer.json


def save_train_state(folder: str | os.PathLike[str], optimizer: torch.optim.Optimizer,
                     rank: int, data_state: Any, *, scaler: Any = None,
                     shared: bool = True) -> None:
    """Write what a resumed run needs besides the weights into ``folder``, without pickle.

    ``shared`` (the main process): the optimizer state (tensors in
    ``optimizer.safetensors``, the rest in ``optimizer.json``) and the fp16 grad scaler's
    state (``scaler.json``). Every process: ``process_<rank>.safetensors`` (torch's CPU and
    accelerator RNG states) and ``process_<rank>.json`` (Python's and numpy's RNG states and
    ``data_state``, the JSON-serialisable data position).
    """
    import random

    import numpy as np

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    if shared:
        tensors, layout = {}, {"param_groups": None, "state": {}}
        full = optimizer.state_dict()
        layout["param_groups"] = full["param_groups"]
        for index, entry in full["state"].items():
            for key, value in entry.items():
                if isinstance(value, Tensor):
                    tensors[f"{index}.{key}"] = value.detach().to("cpu").contiguous()
                else:
                    layout["state"].setdefault(str(index), {})[key] = value
        write_safetensors(tensors, folder / f"{OPTIMIZER_NAME}.safetensors")
        (folder / f"{OPTIMIZER_NAME}.json").write_text(json.dumps(layout) + "\n")
        if scaler is not None:
            (folder / "scaler.json").write_text(json.dumps(scaler.state_dict()) + "\n")
    rng = {"torch_cpu": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        rng.update({f"cuda_{i}": s for i, s in enumerate(torch.cuda.get_rng_state_all())})
    name, keys, pos, has_gauss, gauss = np.random.get_state()
    info = {"data": data_state, "python_random": random.getstate(),
            "numpy_random": [name, keys.tolist(), pos, has_gauss, gauss]}
    xm = _xla_model()
    if xm is not None:
        info["xla_rng"] = int(xm.get_rng_state())
    write_safetensors(rng, folder / f"process_{rank}.safetensors")
    (folder / f"process_{rank}.json").write_text(json.dumps(info) + "\n")


def load_train_state(folder: str | os.PathLike[str], optimizer: torch.optim.Optimizer,
                     rank: int, *, scaler: Any = None) -> Any:
    """Restore what `save_train_state` wrote (or an accelerate ``save_state`` folder of an
    earlier version, read through the restricted unpickler) into ``optimizer``,
    ``scaler`` and the RNGs of this process; returns the data position. Raises
    CheckpointError naming the file for anything missing, unreadable or inconsistent,
    RNG states included: a resumed run that silently drew other random numbers would not
    be the run it continues."""
    folder = Path(folder)
    if (folder / f"{OPTIMIZER_NAME}.safetensors").is_file():
        return _load_own_state(folder, optimizer, rank, scaler)
    if (folder / "optimizer.bin").is_file():
        return _load_accelerate_state(folder, optimizer, rank, scaler)
    raise CheckpointError(f"{folder}: no training state ({OPTIMIZER_NAME}.safetensors)")


def _check_optimizer_state(optimizer: torch.optim.Optimizer, path: Path) -> None:
    """Every per-parameter tensor of a loaded optimizer state (AdamW's moments) must have
    its parameter's shape and own its elements: torch's ``load_state_dict`` checks neither,
    and the first step would fail deep inside the optimizer."""
    index = 0
    for group in optimizer.param_groups:
        for param in group["params"]:
            for key, value in optimizer.state.get(param, {}).items():
                if not isinstance(value, Tensor) or value.dim() == 0:
                    continue
                where = f"{path}: {key} of parameter {index}"
                if value.shape != param.shape:
                    raise CheckpointError(f"{where} has shape {tuple(value.shape)}, the "
                                          f"model's parameter {tuple(param.shape)}")
                if 0 in value.stride() and value.numel() > 1:
                    raise CheckpointError(f"{where} repeats one element (a zero-stride view), "
                                          "which an optimizer cannot update")
            index += 1


def _load_own_state(folder: Path, optimizer: torch.optim.Optimizer, rank: int,
                    scaler: Any) -> Any:
    layout = _read_json(folder / f"{OPTIMIZER_NAME}.json")
    tensors = _read_weights(folder / f"{OPTIMIZER_NAME}.safetensors", strip=False)
    state: dict[int, dict[str, Any]] = {}
    try:
        for name, tensor in tensors.items():
            index, key = name.split(".", 1)
            state.setdefault(int(index), {})[key] = tensor
        for index, entry in layout["state"].items():
            state.setdefault(int(index), {}).update(entry)
        _restore(folder / f"{OPTIMIZER_NAME}.json", optimizer.load_state_dict,
                 {"state": state, "param_groups": layout["param_groups"]})
    except (KeyError, TypeError, ValueError, AttributeError) as err:
        raise CheckpointError(f"{folder / OPTIMIZER_NAME}.*: not an optimizer state "
                              f"({_first_line(err)})") from None
    _check_optimizer_state(optimizer, folder / f"{OPTIMIZER_NAME}.safetensors")
    if scaler is not None:
        _restore(folder / "scaler.json", scaler.load_state_dict,
                 _read_json(folder / "scaler.json"))
    info = _read_json(folder / f"process_{rank}.json")
    rng = _read_weights(folder / f"process_{rank}.safetensors", strip=False)
    try:
        numpy_state = info["numpy_random"]
        _set_rng(folder / f"process_{rank}.*", {
            "python": (info["python_random"][0], tuple(info["python_random"][1]),
                       info["python_random"][2]),
            "numpy": (numpy_state[0], numpy_state[1], *numpy_state[2:]),
            "torch": rng["torch_cpu"],
            "cuda": [rng[k] for k in sorted(rng) if k.startswith("cuda_")],
            "xla": info.get("xla_rng")})
        return info["data"]
    except (KeyError, TypeError, IndexError) as err:
        raise CheckpointError(f"{folder / f'process_{rank}'}.*: incomplete process state "
                              f"({_first_line(err)})") from None


def _load_accelerate_state(folder: Path, optimizer: torch.optim.Optimizer, rank: int,
                           scaler: Any) -> Any:
    """An accelerate ``save_state`` folder (this toolkit before it wrote its own format)."""
    _restore(folder / "optimizer.bin", optimizer.load_state_dict,
             read_torch_checkpoint(folder / "optimizer.bin"))
    _check_optimizer_state(optimizer, folder / "optimizer.bin")
    if scaler is not None and (folder / "scaler.pt").is_file():
        _restore(folder / "scaler.pt", scaler.load_state_dict,
                 read_torch_checkpoint(folder / "scaler.pt"))
    path = folder / f"random_states_{rank}.pkl"
    if not path.is_file():
        raise CheckpointError(f"{path}: missing (was the run launched with a different number "
                              "of processes?)")
    states = read_torch_checkpoint(path)
    try:
        _set_rng(path, {"python": states["random_state"], "numpy": states["numpy_random_seed"],
                        "torch": states["torch_manual_seed"],
                        "cuda": states.get("torch_cuda_manual_seed", []),
                        "xla": states.get("xm_seed")})
    except (KeyError, TypeError, AttributeError) as err:
        raise CheckpointError(f"{path}: incomplete RNG state ({_first_line(err)})") from None
    return _read_json(folder / f"data_{rank}.json")


def _set_rng(path: Path, states: dict[str, Any]) -> None:
    """Set Python's, numpy's, torch's (and the accelerator's) RNGs; CheckpointError if any
    state is malformed."""
    import random

    import numpy as np

    try:
        random.setstate(states["python"])
        name, keys, *rest = states["numpy"]
        np.random.set_state((name, np.asarray(keys, dtype=np.uint32), *rest))
        torch.set_rng_state(states["torch"])
        if states["cuda"] and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(states["cuda"])
        xm = _xla_model()
        if xm is not None and states["xla"] is not None:
            xm.set_rng_state(int(states["xla"]))
    except (TypeError, ValueError, RuntimeError, OverflowError, IndexError) as err:
        raise CheckpointError(f"{path}: corrupt RNG state ({_first_line(err)})") from None


def _restore(path: Path, load: Any, state: Any) -> None:
    try:
        load(state)
    except (KeyError, TypeError, ValueError, RuntimeError, AttributeError, IndexError) as err:
        raise CheckpointError(f"{path}: does not fit this run ({_first_line(err)})") from None


def _read_json(path: Path) -> Any:
    try:
        if path.stat().st_size > 64 * _MAX_CONFIG_BYTES:
            raise CheckpointError(f"{path}: implausibly large")
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise CheckpointError(f"{path}: missing (was the run launched with a different "
                              "number of processes?)") from None
    except (ValueError, RecursionError) as err:
        raise CheckpointError(f"{path}: not valid JSON ({_first_line(err)})") from None
    except OSError as err:
        raise CheckpointError(f"{path}: cannot read ({err.strerror or err})") from None


def _xla_model() -> Any:
    """torch_xla's xla_model module when torch_xla is in use (never imported here)."""
    import sys

    return sys.modules.get("torch_xla.core.xla_model")
