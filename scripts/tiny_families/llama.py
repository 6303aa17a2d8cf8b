"""Llama (text only): the decoder every loader path is first checked on; "wide" sizes cut
evenly at TP=2 along 64-element quant blocks."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import transformers
from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM, LlamaTokenizer

from .common import FP4, INT8, NF4_DQ, VOCAB_SIZE, Base, Family, InitScales, Variant, train_bpe

SPECIALS = ["<unk>", "<s>", "</s>"]
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{%- for message in messages -%}"
    "{{ '<|' + message['role'] + '|>\\n' + message['content'] + eos_token + '\\n' }}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<|assistant|>\\n' }}{%- endif -%}"
)


def tokenizer() -> LlamaTokenizer:
    vocab, merges = train_bpe(list(SPECIALS))
    return LlamaTokenizer(vocab=vocab, merges=merges, chat_template=CHAT_TEMPLATE)


def config(tok: LlamaTokenizer, wide: bool = False, overrides: dict | None = None) -> LlamaConfig:
    sizes = {
        "hidden_size": 128 if wide else 64,
        "intermediate_size": 256 if wide else 128,
        "num_attention_heads": 4 if wide else 2,
        "num_key_value_heads": 2 if wide else 1,
    }
    return LlamaConfig(
        vocab_size=VOCAB_SIZE,
        num_hidden_layers=2,
        head_dim=32,
        max_position_embeddings=1024,
        tie_word_embeddings=False,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        **(sizes | (overrides or {})),
    )


def _scales(seed: int) -> InitScales:
    return InitScales(seed=seed, embed_std=1.0, norm_gains=(("model.norm", 2.0),))


class Llama(Family):
    name = "llama"
    media = ()
    bases = {
        "llama": Base("llama", _scales(1001)),
        # Hidden 128 / 4 heads / 2 KV heads: tensor-parallel tests at TP=2, cuts aligned with
        # 64-element quant blocks.
        "llama-wide": Base("llama", _scales(1002), {"wide": True}),
        # Every full layer meets bitsandbytes' CPU kernel constraints (in % 64, out % 32); at
        # TP=2 a rank's o_proj input is 32 columns and its down_proj input 96, both inside
        # 64-element blocks. Two KV heads, so k/v are cut too.
        "llama-tp-cut": Base("llama", _scales(1003), {
            "overrides": {"intermediate_size": 192, "num_key_value_heads": 2}}),
    }
    variants = [
        Variant("llama-bf16", "llama", description="unquantized"),
        Variant("llama-nf4-dq", "llama", NF4_DQ, ("text",), "nf4 + double quant"),
        Variant("llama-fp4", "llama", FP4, ("text",), "fp4, no double quant"),
        Variant("llama-int8", "llama", INT8, ("text",), "LLM.int8"),
        # bnb_4bit_quant_storage (FSDP-QLoRA): the same packed bytes labelled BF16 / F32.
        Variant(
            "llama-nf4-dq-bf16-storage", "llama", {**NF4_DQ, "bnb_4bit_quant_storage": "bfloat16"},
            ("text",), "nf4 + double quant, packed bytes stored as bfloat16",
        ),
        Variant(
            "llama-fp4-fp32-storage", "llama", {**FP4, "bnb_4bit_quant_storage": "float32"},
            ("text",), "fp4, packed bytes stored as float32",
        ),
        Variant("llama-wide-nf4-dq", "llama-wide", NF4_DQ, ("text",), "nf4 + dq, TP-sized"),
        Variant("llama-wide-int8", "llama-wide", INT8, ("text",), "LLM.int8, TP-sized"),
        # TP=2 cuts inside 64-element blocks: o_proj (2 heads x 32) and down_proj (192) are
        # cut at columns 32 and 96.
        Variant("llama-tp-cut-fp4", "llama-tp-cut", FP4, ("text",),
                "fp4, row-parallel TP=2 cuts inside quant blocks"),
    ]

    def new_model(self, base: Base) -> tuple[nn.Module, Any, list[int]]:
        tok = tokenizer()
        model = LlamaForCausalLM(
            config(tok, base.options.get("wide", False), base.options.get("overrides"))
        )
        return model, tok, [tok.eos_token_id]

    def load_processor(self, ckpt_dir: Path) -> Any:
        return transformers.AutoTokenizer.from_pretrained(ckpt_dir)

    def encode_case(
        self, processor: Any, case: dict[str, Any], ckpt_dir: Path
    ) -> dict[str, torch.Tensor]:
        text = processor.apply_chat_template(
            case["messages"], add_generation_prompt=True, tokenize=False
        )
        ids = processor(text, add_special_tokens=False)["input_ids"]
        return {"input_ids": torch.tensor([ids])}


LLAMA = Llama()
