"""Qwen3-VL, dense (``Qwen3VLForConditionalGeneration``): ViT with learned position
embeddings, a merger and "deepstack" mergers that feed features of early vision blocks into
early text layers; Qwen3 text model with q/k norms and interleaved M-RoPE. Every Linear is
quantized by default, deepstack mergers included. Saved in the hub layout (``model.visual.*``,
``model.language_model.*``, ``lm_head``); skip names behave as for Qwen2.5-VL."""

from __future__ import annotations

from typing import Any

from torch import nn
from transformers import Qwen3VLConfig, Qwen3VLForConditionalGeneration, Qwen3VLProcessor
from transformers.models.qwen2_vl.image_processing_qwen2_vl import Qwen2VLImageProcessor
from transformers.models.qwen3_vl.video_processing_qwen3_vl import Qwen3VLVideoProcessor

from .common import VOCAB_SIZE, Base, Family
from .qwen2_5_vl import ENDOFTEXT, NAMED_TOKENS, scales, skip_list_variants, tokenizer

PATCH_SIZE = 16
# 64x48 -> 160x96 pixels (multiples of 32) -> 10x6 patches -> 15 merged image tokens.
MIN_PIXELS, MAX_PIXELS = 128 * 128, 2 * 128 * 128


def config(tok: Any) -> Qwen3VLConfig:
    ids = tok.convert_tokens_to_ids
    text = {
        "vocab_size": VOCAB_SIZE,
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 2,
        "num_attention_heads": 2,
        "num_key_value_heads": 1,
        "head_dim": 32,
        "max_position_embeddings": 1024,
        "rope_parameters": {
            "rope_type": "default", "rope_theta": 5e6, "mrope_section": [6, 5, 5],
            "mrope_interleaved": True,
        },
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
        "patch_size": PATCH_SIZE,
        "spatial_merge_size": 2,
        "temporal_patch_size": 2,
        "num_position_embeddings": 64,  # an 8x8 grid, interpolated to the image's patches
        "deepstack_visual_indexes": [0],
    }
    return Qwen3VLConfig(
        text_config=text,
        vision_config=vision,
        image_token_id=ids(NAMED_TOKENS["image_token"]),
        video_token_id=ids(NAMED_TOKENS["video_token"]),
        vision_start_token_id=ids(NAMED_TOKENS["vision_start_token"]),
        vision_end_token_id=ids(NAMED_TOKENS["vision_end_token"]),
        tie_word_embeddings=False,
    )


class Qwen3VL(Family):
    name = "qwen3_vl"
    group_prefixes = (
        ("model.visual.merger.", "projector"),
        ("model.visual.deepstack_merger_list.", "projector"),
        ("model.visual.", "vision_tower"),
    )
    bases = {"qwen3_vl": Base("qwen3_vl", scales(7001))}
    variants = skip_list_variants("qwen3_vl", "mergers")

    def new_model(self, base: Base) -> tuple[nn.Module, Any, list[int]]:
        tok = tokenizer()
        model = Qwen3VLForConditionalGeneration(config(tok))
        processor = Qwen3VLProcessor(
            image_processor=Qwen2VLImageProcessor(
                min_pixels=MIN_PIXELS, max_pixels=MAX_PIXELS, patch_size=PATCH_SIZE
            ),
            tokenizer=tok,
            video_processor=Qwen3VLVideoProcessor(),
            chat_template=tok.chat_template,
        )
        eos = [tok.convert_tokens_to_ids(NAMED_TOKENS["im_end_token"]), tok.pad_token_id]
        return model, processor, eos


QWEN3_VL = Qwen3VL()
