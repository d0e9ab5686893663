"""Torch code shared by the scripts (design.md: Model, Generation engine, Checkpoints).

- ``config``: ModelConfig and the named presets.
- ``model``: builds ``perceiver_ar_pytorch.PerceiverAR`` (its state dict is the checkpoint
  format) and runs it fast: an SDPA forward equal to the library's, one-token cached steps.
- ``engine``: exact KV-cached generation, sampling and beam search.
- ``data``: token splits, training and validation windows.
- ``checkpoint``: portable checkpoint folders and safe loading.
- ``cli``: script constants as command-line options (imports no torch).

Import from the modules, e.g. ``from perceiver_music.engine import generate``; this file
imports nothing, so torch-free scripts such as prep.py start fast.
"""
