"""Tiny-checkpoint families: one module per model family (tokenizer/processor, config, base
checkpoint, media cases, reference encoding, module groups, variants and their layout checks),
behind the interface in ``common.Family``. ``FAMILIES`` lists them for the builder."""

from __future__ import annotations

from .common import Family
from .gemma4 import GEMMA4
from .llama import LLAMA

FAMILIES: dict[str, Family] = {f.name: f for f in (LLAMA, GEMMA4)}
