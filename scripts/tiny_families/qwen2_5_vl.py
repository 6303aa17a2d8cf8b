"""Qwen2.5-VL (``Qwen2_5_VLForConditionalGeneration``): window-attention ViT with one fused
qkv Linear per block, a patch merger MLP, M-RoPE text model; every Linear is quantized by
default (tower and merger included).

transformers 5 saves the hub layout (``visual.*``, ``model.layers.*``, ``lm_head``) while its
modules are ``model.visual.*`` / ``model.language_model.*``: skip names are anchored on the
module names, so ``["visual", "lm_head"]`` keeps only lm_head and ``["model.visual",
"lm_head"]`` keeps the tower bf16.
"""

from __future__ import annotations

from typing import Any

from torch import nn
from transformers import (
    Qwen2_5_VLConfig,
    Qwen2_5_VLForConditionalGeneration,
    Qwen2_5_VLProcessor,
    Qwen2Tokenizer,
)
from transformers.models.qwen2_vl.image_processing_qwen2_vl import Qwen2VLImageProcessor
from transformers.models.qwen2_vl.video_processing_qwen2_vl import Qwen2VLVideoProcessor

from .common import (
    FP4,
    INT8,
    NF4_DQ,
    VOCAB_SIZE,
    Base,
    Family,
    InitScales,
    Variant,
    check_skip,
    train_byte_level_bpe,
)

NAMED_TOKENS = {
    "im_start_token": "<|im_start|>",
    "im_end_token": "<|im_end|>",
    "vision_start_token": "<|vision_start|>",
    "vision_end_token": "<|vision_end|>",
    "image_token": "<|image_pad|>",
    "video_token": "<|video_pad|>",
}
ENDOFTEXT = "<|endoftext|>"
# 64x48 -> 140x112 pixels (multiples of 28) -> 10x8 patches of 14 -> 20 merged image tokens.
MIN_PIXELS, MAX_PIXELS = 112 * 112, 2 * 112 * 112

CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{{ '<|im_start|>' + message['role'] + '\\n' }}"
    "{%- if message['content'] is string -%}{{ message['content'] }}"
    "{%- else -%}{%- for item in message['content'] -%}"
    "{%- if item['type'] == 'image' -%}{{ '<|vision_start|><|image_pad|><|vision_end|>' }}"
    "{%- elif item['type'] == 'text' -%}{{ item['text'] }}"
    "{%- endif -%}{%- endfor -%}{%- endif -%}"
    "{{ '<|im_end|>\\n' }}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<|im_start|>assistant\\n' }}{%- endif -%}"
)


def tokenizer() -> Qwen2Tokenizer:
    vocab, merges = train_byte_level_bpe([ENDOFTEXT, *NAMED_TOKENS.values()])
    return Qwen2Tokenizer(
        vocab=vocab,
        merges=merges,
        unk_token=None,
        eos_token=NAMED_TOKENS["im_end_token"],
        pad_token=ENDOFTEXT,
        extra_special_tokens=dict(NAMED_TOKENS),
        chat_template=CHAT_TEMPLATE,
    )


def config(tok: Qwen2Tokenizer) -> Qwen2_5_VLConfig:
    ids = tok.convert_tokens_to_ids
    text = {
        "vocab_size": VOCAB_SIZE,
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 2,
        "num_attention_heads": 2,
        "num_key_value_heads": 1,
        "max_position_embeddings": 1024,
        "rope_parameters": {"rope_type": "default", "rope_theta": 1e6, "mrope_section": [4, 6, 6]},
        "tie_word_embeddings": False,
        "bos_token_id": ids(ENDOFTEXT),
        "eos_token_id": ids(NAMED_TOKENS["im_end_token"]),
        "pad_token_id": ids(ENDOFTEXT),
    }
    vision = {
        "depth": 2,
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_heads": 2,
        "out_hidden_size": 64,
        "patch_size": 14,
        "spatial_merge_size": 2,
        "temporal_patch_size": 2,
        "window_size": 56,
        "fullatt_block_indexes": [1],
    }
    return Qwen2_5_VLConfig(
        text_config=text,
        vision_config=vision,
        image_token_id=ids(NAMED_TOKENS["image_token"]),
        video_token_id=ids(NAMED_TOKENS["video_token"]),
        vision_start_token_id=ids(NAMED_TOKENS["vision_start_token"]),
        vision_end_token_id=ids(NAMED_TOKENS["vision_end_token"]),
        tie_word_embeddings=False,
    )


def scales(seed: int) -> InitScales:
    return InitScales(seed=seed, embed_std=1.0, norm_gains=(("model.language_model.norm", 3.0),))


TOWER = ("vision_tower", "projector")


def skip_list_variants(base: str, mergers: str) -> list[Variant]:
    """The Qwen-VL checkpoints users make: the skip lists they write, in transformers 5
    (`visual` names nothing there; `model.visual` does)."""
    return [
        Variant(f"{base}-bf16", base, description="unquantized (in-flight source)"),
        Variant(
            f"{base}-nf4-dq",
            base,
            {**NF4_DQ, "llm_int8_skip_modules": ["visual"]},
            (*TOWER, "text", "lm_head"),
            f"unanchored ['visual'] skips nothing and drops the defaults: tower, {mergers} and "
            "the untied lm_head 4-bit",
            check_skip(["visual"]),
        ),
        Variant(
            f"{base}-fp4",
            base,
            {**FP4, "llm_int8_skip_modules": ["visual", "lm_head"]},
            (*TOWER, "text"),
            f"['visual', 'lm_head']: only lm_head matches; tower and {mergers} fp4",
            check_skip(["visual", "lm_head"]),
        ),
        Variant(
            f"{base}-int8",
            base,
            {**INT8, "llm_int8_skip_modules": ["model.visual", "lm_head"]},
            ("text",),
            f"['model.visual', 'lm_head']: tower and {mergers} really bf16, text LLM.int8",
            check_skip(["model.visual", "lm_head"]),
        ),
    ]


class Qwen2_5_VL(Family):
    name = "qwen2_5_vl"
    group_prefixes = (
        ("model.visual.merger.", "projector"),
        ("model.visual.", "vision_tower"),
    )
    bases = {"qwen2_5_vl": Base("qwen2_5_vl", scales(5001))}
    variants = skip_list_variants("qwen2_5_vl", "merger")

    def new_model(self, base: Base) -> tuple[nn.Module, Any, list[int]]:
        tok = tokenizer()
        model = Qwen2_5_VLForConditionalGeneration(config(tok))
        processor = Qwen2_5_VLProcessor(
            image_processor=Qwen2VLImageProcessor(min_pixels=MIN_PIXELS, max_pixels=MAX_PIXELS),
            tokenizer=tok,
            video_processor=Qwen2VLVideoProcessor(),
            chat_template=CHAT_TEMPLATE,
        )
        eos = [tok.convert_tokens_to_ids(NAMED_TOKENS["im_end_token"]), tok.pad_token_id]
        return model, processor, eos


QWEN2_5_VL = Qwen2_5_VL()
