"""Per-family adapters: small patches that make a vLLM model class BnB-safe.

Each adapter module exposes `MODEL_CLASSES` (import path -> class names) and
`adapt(cls)`. Adapters are applied lazily, when vLLM first resolves a model class,
so registering the plugin imports no model code.
"""

from __future__ import annotations

import importlib

from . import gemma4, qwen3_vl_moe

ADAPTERS = (gemma4, qwen3_vl_moe)


def register_adapters() -> None:
    for adapter in ADAPTERS:
        for module_name, class_names in adapter.MODEL_CLASSES.items():
            module = importlib.import_module(module_name)
            for class_name in class_names:
                cls = getattr(module, class_name, None)
                if cls is not None and not getattr(cls, "_bnb_mm_adapted", False):
                    adapter.adapt(cls)
                    cls._bnb_mm_adapted = True
