"""Torch code shared by the scripts (design.md: Model, Generation engine, Checkpoints).

- ``api``: the Python API, ``PerceiverMusic.from_pretrained(...).generate(...)``, also
  importable from here (``from perceiver_music import PerceiverMusic, DEMO_PRIMER``), with
  the errors it raises besides ValueError (``CheckpointError``, ``MidiError``).
- ``config``: ModelConfig and the named presets.
- ``model``: builds ``perceiver_ar_pytorch.PerceiverAR`` (its state dict is the checkpoint
  format) and runs it fast: an SDPA forward equal to the library's, one-token cached steps.
- ``engine``: exact KV-cached generation, sampling and beam search.
- ``data``: token splits, training and validation windows.
- ``checkpoint``: portable checkpoint folders and safe loading; ``safe_pickle``: the
  restricted reader of torch files.
- ``render``: piano-roll figures and audio (no torch).
- ``cli``: script constants as command-line options (imports no torch).

Importing this package imports nothing (the API is loaded on first use), so torch-free
scripts such as prep.py start fast.
"""

__all__ = ["DEMO_CHECKPOINT", "DEMO_PRIMER", "CheckpointError", "Chunk", "Generation",
           "MidiError", "PerceiverMusic"]


def __getattr__(name: str):
    """The API's names (``PerceiverMusic``, ``Generation``, ``Chunk``, the bundled demo
    checkpoint and primer paths, the errors), imported from ``api`` on first use."""
    if name in __all__:
        from . import api

        return getattr(api, name)
    raise AttributeError(f"module 'perceiver_music' has no attribute {name!r}")


def __dir__() -> list[str]:
    """The module's names and the API's, for ``dir()`` and tab completion."""
    return sorted({*globals(), *__all__})
