"""Tiny-checkpoint families: one module per model family (tokenizer/processor, config, base
checkpoint, media cases, reference encoding, module groups, variants and their layout checks),
behind the interface in ``common.Family``. ``FAMILIES`` lists them for the builder."""

from __future__ import annotations

from .common import Family
from .gemma3 import GEMMA3
from .gemma4 import GEMMA4
from .llama import LLAMA
from .llava import LLAVA
from .llava_next import LLAVA_NEXT
from .mistral3 import MISTRAL3
from .qwen2_5_vl import QWEN2_5_VL
from .qwen3_moe import QWEN3_MOE
from .qwen3_vl import QWEN3_VL

FAMILIES: dict[str, Family] = {
    f.name: f for f in (
        LLAMA, GEMMA4, LLAVA, LLAVA_NEXT, GEMMA3, QWEN2_5_VL, MISTRAL3, QWEN3_VL, QWEN3_MOE
    )
}
