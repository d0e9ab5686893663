"""Checkpoint directories: ``config.json`` + ``model.safetensors`` (design.md, Checkpoints).

``config.json`` holds the model config under ``"model"``, the vocabulary version, and any
extra entries the caller passes (training settings, step, validation loss).
``model.safetensors`` holds the library's state dict without the ``module.`` (DDP) or
``_orig_mod.`` (torch.compile) prefixes, so every checkpoint loads into a bare model.
safetensors stores only tensors, so loading runs no code from the file.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
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
_WRAPPER_PREFIXES = ("module.", "_orig_mod.")


class CheckpointError(Exception):
    """A checkpoint could not be read: the message names the path and the problem."""


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
        os.replace(tmp_weights, directory / WEIGHTS_NAME)
        os.replace(tmp_config, directory / CONFIG_NAME)
    finally:
        tmp_weights.unlink(missing_ok=True)
        tmp_config.unlink(missing_ok=True)
    return directory


def load_checkpoint(
    directory: str | os.PathLike[str],
    map_location: str | torch.device = "cpu",
) -> tuple[PerceiverAR, ModelConfig, dict[str, Any]]:
    """Read a checkpoint directory: (model in eval mode on ``map_location``, config, meta).

    ``meta`` holds config.json's entries other than the model config. Raises
    CheckpointError for a missing directory or file, bad JSON, an invalid config, an
    unreadable weights file, or weights that do not fit the config.
    """
    directory = Path(directory)
    if not directory.is_dir():
        raise CheckpointError(f"{directory}: not a checkpoint directory (it does not exist "
                              f"or is a file)")
    cfg, meta = _read_config(directory / CONFIG_NAME)
    state = _read_weights(directory / WEIGHTS_NAME)

    model = build_model(cfg)
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if missing or unexpected:
        raise CheckpointError(
            f"{directory / WEIGHTS_NAME}: weights do not match the config in {CONFIG_NAME}: "
            f"missing {_some(missing)}; unexpected {_some(unexpected)}")
    for key, reference in expected.items():
        if state[key].shape != reference.shape:
            raise CheckpointError(
                f"{directory / WEIGHTS_NAME}: tensor {key} has shape "
                f"{tuple(state[key].shape)} but the config in {CONFIG_NAME} needs "
                f"{tuple(reference.shape)}")
    model.load_state_dict(state)
    return model.to(map_location).eval(), cfg, meta


def strip_prefixes(state: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """The state dict with leading ``module.`` / ``_orig_mod.`` wrapper prefixes removed."""
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
