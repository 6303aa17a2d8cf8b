"""Qwen3-MoE (text only): the MoE decoder whose experts transformers 5 saves as 3-D bf16
parameters and transformers 4.x / unsloth as one tensor per expert (scripts/tiny_moe.py
writes both layouts and their references)."""

from __future__ import annotations

from typing import Any

from torch import nn
from transformers import Qwen3MoeForCausalLM

import tiny_moe

from .common import INT8, NF4_DQ, Base, InitScales, Variant
from .llama import Llama, tokenizer


class Qwen3Moe(Llama):
    """A text family: the Llama tokenizer, prompts and reference encoding."""

    name = "qwen3_moe"
    media = ()
    bases = {
        "qwen3-moe": Base(
            "qwen3_moe", InitScales(seed=1101, embed_std=1.0, norm_gains=(("model.norm", 2.0),))
        ),
    }
    variants = [
        Variant("qwen3-moe-in-flight", "qwen3-moe", description="bf16; served with "
                "--quantization bitsandbytes", moe="in_flight"),
        Variant("qwen3-moe-nf4", "qwen3-moe", NF4_DQ, ("text",), "transformers 5 layout: "
                "attention nf4, experts bf16 (quantized while loading)", moe="t5"),
        Variant("qwen3-moe-nf4-keep", "qwen3-moe", NF4_DQ, ("text",), "transformers 5 "
                "layout with bnb_moe_experts=unquantized", moe="keep"),
        Variant("qwen3-moe-nf4-experts", "qwen3-moe", NF4_DQ, ("text",), "transformers 4.x "
                "layout: one packed nf4+dq tensor per expert and projection, packed router",
                moe="per_expert"),
        Variant("qwen3-moe-int8-experts", "qwen3-moe", INT8, ("text",), "transformers 4.x "
                "layout, LLM.int8: int8 + SCB per expert and projection, int8 router",
                moe="per_expert"),
    ]

    def new_model(self, base: Base) -> tuple[nn.Module, Any, list[int]]:
        tok = tokenizer()
        return Qwen3MoeForCausalLM(tiny_moe.qwen3_moe_config(tok)), tok, [tok.eos_token_id]

    def adjust_weights(self, model: nn.Module, base: Base) -> None:
        tiny_moe.redraw_experts(model, base.scales.seed)


QWEN3_MOE = Qwen3Moe()
