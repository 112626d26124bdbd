"""Model families: one descriptor module per family (lsiq.archs.base explains the fields).

Adding a family is one module here that calls :func:`register` with its :class:`Family`, plus its
name in :data:`MODULES` (README, "Adding a model family"). A model_type with no family gets the
generic fallback (lsiq.archs.base._generic: every nn.Linear, no LET pairs, a warning).
"""

from __future__ import annotations

import importlib

from lsiq.archs.base import (
    BlockArch,
    Experts,
    Family,
    Pair,
    UnsupportedArchitecture,
    attention_implementation,
    block_linears,
    decoder_layer_class,
    family_for,
    register,
    standard_pairs,
    supported_model_types,
)

# one line per family module (each registers its model types when imported)
MODULES = ("llama", "qwen3", "gemma2", "gemma3", "phi3", "olmo2", "moe")

for _name in MODULES:
    importlib.import_module(f"lsiq.archs.{_name}")

__all__ = ["BlockArch", "Experts", "Family", "Pair", "UnsupportedArchitecture", "attention_implementation",
           "block_linears", "decoder_layer_class", "family_for", "register", "standard_pairs", "supported_model_types"]
