"""Gemma 4 (E2B-like with per-layer embeddings; k_eq_v 26B/31B-like; audio): the family the
plugin was first proven on."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from transformers import (
    Gemma4Config,
    Gemma4ForConditionalGeneration,
    Gemma4Processor,
    GemmaTokenizer,
)
from transformers.models.gemma4.feature_extraction_gemma4 import Gemma4AudioFeatureExtractor
from transformers.models.gemma4.image_processing_gemma4 import Gemma4ImageProcessor
from transformers.models.gemma4.video_processing_gemma4 import Gemma4VideoProcessor

import tiny_moe
from tiny_reference import expect_dtype

from .common import FP4, INT8, NF4_DQ, VOCAB_SIZE, Base, Family, InitScales, Variant, train_bpe

BASE_SPECIALS = ["<pad>", "<eos>", "<bos>", "<unk>", "<mask>"]
# Named Gemma 4 control tokens (as in the released tokenizer_config.json); Gemma4Processor reads
# image/boi/eoi/audio/boa/eoa, the chat template uses sot/eot.
NAMED_TOKENS = {
    "sot_token": "<|turn>",
    "eot_token": "<turn|>",
    "boi_token": "<|image>",
    "eoi_token": "<image|>",
    "image_token": "<|image|>",
    "boa_token": "<|audio>",
    "eoa_token": "<audio|>",
    "audio_token": "<|audio|>",
    "soc_token": "<|channel>",
    "eoc_token": "<channel|>",
    "think_token": "<|think|>",
    "escape_token": '<|"|>',
    "str_token": "<|tool_response>",
    "etr_token": "<tool_response|>",
    "stc_token": "<|tool_call>",
    "etc_token": "<tool_call|>",
    "std_token": "<|tool>",
    "etd_token": "<tool|>",
}
VIDEO_TOKEN = "<|video|>"  # added by Gemma4Processor itself

# Loops over message content so vLLM detects the "openai" content format and inserts <|image|>
# / <|audio|> where the parts are.
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{%- for message in messages -%}"
    "{%- set role = 'model' if message['role'] == 'assistant' else message['role'] -%}"
    "{{ '<|turn>' + role + '\\n' }}"
    "{%- if message['content'] is string -%}{{ message['content'] }}"
    "{%- else -%}{%- for item in message['content'] -%}"
    "{%- if item['type'] == 'text' -%}{{ item['text'] }}"
    "{%- elif item['type'] == 'image' -%}{{ '<|image|>' }}"
    "{%- elif item['type'] == 'audio' -%}{{ '<|audio|>' }}"
    "{%- elif item['type'] == 'video' -%}{{ '<|video|>' }}"
    "{%- endif -%}{%- endfor -%}{%- endif -%}"
    "{{ '<turn|>\\n' }}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<|turn>model\\n' }}{%- endif -%}"
)

VISION_SOFT_TOKENS = 70  # vLLM: vision_config.default_output_length == processor max_soft_tokens
CLIP_BOUND = 8.0  # finite clip values for clipped (audio) linears


def tokenizer() -> GemmaTokenizer:
    vocab, merges = train_bpe(BASE_SPECIALS + list(NAMED_TOKENS.values()) + [VIDEO_TOKEN])
    return GemmaTokenizer(
        vocab=vocab,
        merges=merges,
        add_bos_token=False,
        padding_side="left",
        extra_special_tokens=dict(NAMED_TOKENS),
        chat_template=CHAT_TEMPLATE,
    )


def processor(tok: GemmaTokenizer, max_soft_tokens: int) -> Gemma4Processor:
    return Gemma4Processor(
        feature_extractor=Gemma4AudioFeatureExtractor(),
        image_processor=Gemma4ImageProcessor(max_soft_tokens=max_soft_tokens),
        tokenizer=tok,
        video_processor=Gemma4VideoProcessor(),
        chat_template=CHAT_TEMPLATE,
        image_seq_length=max_soft_tokens,
    )


def _text(**overrides: Any) -> dict[str, Any]:
    text = {
        "vocab_size": VOCAB_SIZE,
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 2,
        "layer_types": ["sliding_attention", "full_attention"],  # last must be full
        "num_attention_heads": 2,
        "num_key_value_heads": 1,
        "head_dim": 32,
        "global_head_dim": 64,
        "sliding_window": 128,
        "final_logit_softcapping": 30.0,
        "hidden_size_per_layer_input": 64,  # multiple of 64: BnB CPU 4-bit kernel constraint
        "vocab_size_per_layer_input": VOCAB_SIZE,
        "max_position_embeddings": 1024,
        "use_bidirectional_attention": None,  # vLLM CPU ignores "vision"; HF would diverge
    }
    return text | overrides


def _vision() -> dict[str, Any]:
    return {
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 1,
        "num_attention_heads": 2,
        "num_key_value_heads": 2,
        "head_dim": 32,
        "patch_size": 16,
        "pooling_kernel_size": 3,
        "position_embedding_size": 512,
        "default_output_length": VISION_SOFT_TOKENS,  # read by vLLM only
    }


def _audio() -> dict[str, Any]:
    # Real E2B/E4B subsampling channels (128, 32): the projection input is
    # (128 mel bins / 4) * 32 = 1024, a multiple of 64 as the BnB CPU 4-bit kernel needs.
    return {
        "hidden_size": 64,
        "num_hidden_layers": 1,
        "num_attention_heads": 2,
        "subsampling_conv_channels": [128, 32],
        "output_proj_dims": 128,
    }


def config(
    tok: GemmaTokenizer, *, tied: bool = True, k_eq_v: bool = False, audio: bool = False,
    moe: bool = False,
) -> Gemma4Config:
    text_overrides: dict[str, Any] = {
        "tie_word_embeddings": tied,
        "pad_token_id": tok.pad_token_id,
        "bos_token_id": tok.bos_token_id,
        "eos_token_id": tok.eos_token_id,
    }
    if k_eq_v:
        text_overrides |= {
            "attention_k_eq_v": True,
            "num_global_key_value_heads": 2,
            "hidden_size_per_layer_input": 0,
        }
    if moe:
        text_overrides |= tiny_moe.gemma4_moe_text_overrides()
    ids = tok.convert_tokens_to_ids
    return Gemma4Config(
        text_config=_text(**text_overrides),
        vision_config=_vision(),
        audio_config=_audio() if audio else None,
        tie_word_embeddings=tied,
        image_token_id=ids(NAMED_TOKENS["image_token"]),
        boi_token_id=ids(NAMED_TOKENS["boi_token"]),
        eoi_token_id=ids(NAMED_TOKENS["eoi_token"]),
        video_token_id=ids(VIDEO_TOKEN),
        audio_token_id=ids(NAMED_TOKENS["audio_token"]),
        boa_token_id=ids(NAMED_TOKENS["boa_token"]),
        eoa_token_index=ids(NAMED_TOKENS["eoa_token"]),
    )


NORM_GAINS = (
    # Gemma 4 attention uses scaling 1.0 after q/k RMSNorm: unit q/k norms give logits with std
    # sqrt(head_dim) ~ 6, a near-argmax attention that amplifies bf16 rounding.
    ("q_norm", 0.5),
    ("k_norm", 0.5),
    ("post_attention_layernorm", 3.0),
    ("post_feedforward_layernorm", 3.0),
    ("post_per_layer_input_norm", 2.0),
    ("model.language_model.norm", 3.0),
)


def _scales(seed: int) -> InitScales:
    return InitScales(
        seed=seed,
        embed_std=0.125,
        norm_gains=NORM_GAINS,
        leaf_stds=(("position_embedding_table", 0.5), ("per_dim_scale", 0.1)),
    )


# --------------------------------------------------------------------------------------------
# What single variants must show on disk
# --------------------------------------------------------------------------------------------


def _check_untied_lm4bit(header: dict, packed: dict, config: dict) -> None:
    expect_dtype(header, "lm_head.weight", "U8")
    if packed.get("lm_head") != "nf4":
        raise AssertionError("lm_head is not stored as packed nf4")


def _check_k_eq_v(header: dict, packed: dict, config: dict) -> None:
    prefix = "model.language_model.layers.1.self_attn"  # the full-attention layer
    has_v = any(k.startswith(f"{prefix}.v_proj") for k in header)
    if f"{prefix}.k_proj" not in packed or has_v:
        raise AssertionError("k_eq_v layer must have a packed k_proj and no v_proj")
    if "model.language_model.layers.0.self_attn.v_proj" not in packed:
        raise AssertionError("sliding layer should keep its v_proj")


def _check_unanchored_skip(header: dict, packed: dict, config: dict) -> None:
    skip = config["quantization_config"]["llm_int8_skip_modules"]
    if skip != ["vision_tower"] or not any(m.startswith("model.vision_tower.") for m in packed):
        raise AssertionError("expected a claimed vision_tower skip with 4-bit vision tensors")


def _check_audio(header: dict, packed: dict, config: dict) -> None:
    clip_keys = [k for k in header if k.startswith("model.audio_tower.") and "input_max" in k]
    if not clip_keys or not any(m.startswith("model.audio_tower.") for m in packed):
        raise AssertionError("audio tower should be 4-bit with its clip buffers stored")


DEFAULT_GROUPS = ("vision_tower", "embed_vision", "text", "ple")


class Gemma4(Family):
    name = "gemma4"
    group_prefixes = tuple(
        (f"model.{g}.", g) for g in ("vision_tower", "embed_vision", "audio_tower", "embed_audio")
    )
    group_leaves = tuple(
        (leaf, "ple")
        for leaf in ("per_layer_model_projection", "per_layer_input_gate", "per_layer_projection")
    )
    bases = {
        "gemma4": Base("gemma4", _scales(2001)),
        "gemma4-untied": Base("gemma4", _scales(2002), {"tied": False}),
        "gemma4-keqv": Base("gemma4", _scales(2003), {"k_eq_v": True}),
        "gemma4-audio": Base("gemma4", _scales(2004), {"audio": True}),
        "gemma4-moe": Base("gemma4", _scales(2005), {"moe": True}),
    }
    variants = [
        Variant("gemma4-bf16", "gemma4", description="unquantized"),
        Variant(
            "gemma4-nf4-dq",
            "gemma4",
            NF4_DQ,
            DEFAULT_GROUPS,
            "default BnB: vision tower, embed_vision, text and PLE projections 4-bit",
        ),
        Variant("gemma4-fp4", "gemma4", FP4, DEFAULT_GROUPS, "fp4, no double quant"),
        Variant("gemma4-int8", "gemma4", INT8, DEFAULT_GROUPS, "LLM.int8"),
        Variant(
            "gemma4-skip-unanchored",
            "gemma4",
            {**NF4_DQ, "llm_int8_skip_modules": ["vision_tower"]},
            DEFAULT_GROUPS,
            "config claims a vision_tower skip that matches nothing in transformers 5; "
            "vision tensors are 4-bit; tied embeddings",
            _check_unanchored_skip,
        ),
        Variant(
            "gemma4-vision-bf16",
            "gemma4",
            {**NF4_DQ, "llm_int8_skip_modules": ["model.vision_tower", "lm_head"]},
            ("embed_vision", "text", "ple"),
            "vision tower really bf16",
        ),
        Variant(
            "gemma4-untied-lm4bit",
            "gemma4-untied",
            {**NF4_DQ, "llm_int8_skip_modules": ["model.vision_tower"]},
            ("embed_vision", "text", "ple", "lm_head"),
            "untied lm_head stored 4-bit (explicit skip list drops the default exclusions)",
            _check_untied_lm4bit,
        ),
        Variant(
            "gemma4-keqv-nf4",
            "gemma4-keqv",
            NF4_DQ,
            ("vision_tower", "embed_vision", "text"),
            "attention_k_eq_v (26B/31B-like): full-attention layer has no v_proj; no PLE",
            _check_k_eq_v,
        ),
        Variant(
            "gemma4-audio-nf4",
            "gemma4-audio",
            NF4_DQ,
            (*DEFAULT_GROUPS, "audio_tower", "embed_audio"),
            "E2B-like with audio tower; audio tower and embed_audio 4-bit",
            _check_audio,
        ),
        # enable_moe_block (26B-A4B-like); references per experts recipe (scripts/tiny_moe.py)
        Variant("gemma4-moe-in-flight", "gemma4-moe", description="bf16 with "
                "enable_moe_block; served with --quantization bitsandbytes", moe="in_flight"),
        Variant("gemma4-moe-nf4", "gemma4-moe", NF4_DQ, DEFAULT_GROUPS, "transformers "
                "5 layout: 3-D bf16 experts (quantized while loading), 4-bit router",
                moe="t5"),
        Variant("gemma4-moe-nf4-experts", "gemma4-moe", NF4_DQ, DEFAULT_GROUPS,
                "per-expert layout: one packed nf4+dq tensor per expert and projection",
                moe="per_expert"),
    ]

    def new_model(self, base: Base) -> tuple[nn.Module, Any, list[int]]:
        tok = tokenizer()
        model = Gemma4ForConditionalGeneration(
            config(
                tok,
                tied=base.options.get("tied", True),
                k_eq_v=base.options.get("k_eq_v", False),
                audio=base.options.get("audio", False),
                moe=base.options.get("moe", False),
            )
        )
        eos = [tok.eos_token_id, tok.convert_tokens_to_ids(NAMED_TOKENS["eot_token"])]
        return model, processor(tok, VISION_SOFT_TOKENS), eos

    def adjust_weights(self, model: nn.Module, base: Base) -> None:
        # HF initializes Gemma 4 clipped linears to +-inf; real checkpoints carry finite
        # bounds, which a loader has to keep next to the packed weight.
        with torch.no_grad():
            for module in model.modules():
                if hasattr(module, "input_min") and hasattr(module, "output_max"):
                    module.input_min.fill_(-CLIP_BOUND)
                    module.input_max.fill_(CLIP_BOUND)
                    module.output_min.fill_(-CLIP_BOUND)
                    module.output_max.fill_(CLIP_BOUND)
        if base.options.get("moe"):
            tiny_moe.redraw_experts(model, base.scales.seed)

    def media_kinds(self, base: Base) -> tuple[str, ...]:
        return ("image", "audio") if base.options.get("audio") else ("image",)


GEMMA4 = Gemma4()
