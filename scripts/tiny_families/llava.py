"""LLaVA 1.5-style (``LlavaForConditionalGeneration``): CLIP tower read at layer -2 (vLLM builds
the tower without its last layer), two-layer MLP projector, untied Llama text model.

Key layouts users have: transformers 4.52+ (``model.language_model.*``,
``model.vision_tower.vision_model.*``, ``model.multi_modal_projector.*``, ``lm_head``) and the
older 4.x one (``language_model.model.*``, ``language_model.lm_head``,
``vision_tower.vision_model.*``, ``multi_modal_projector.*``). transformers 5 keeps whichever
layout it loaded when it saves, so quantizing a checkpoint of either layout gives that layout.
A model built from a config and saved by transformers 5.19 gets neither (CLIP keys lose
``vision_model.``), so bases are rewritten to a hub layout before anything is quantized.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from torch import nn
from transformers import (
    CLIPImageProcessor,
    CLIPVisionConfig,
    LlamaConfig,
    LlamaTokenizer,
    LlavaConfig,
    LlavaForConditionalGeneration,
    LlavaProcessor,
)

from .common import (
    FP4,
    INT8,
    NF4_DQ,
    VOCAB_SIZE,
    Base,
    Family,
    InitScales,
    Variant,
    rewrite_checkpoint_keys,
    train_bpe,
)

SPECIALS = ["<unk>", "<s>", "</s>", "<pad>"]
IMAGE_TOKEN = "<image>"
IMAGE_SIZE = 32  # CLIP input; the 64x48 test images are resized and center-cropped to it
PATCH_SIZE = 8  # 16 patches + CLS; the "default" feature strategy drops CLS: 16 image tokens

# LLaVA 1.5's "USER: <image>\n... ASSISTANT:" prompt, looping over content parts so vLLM
# detects the "openai" content format and places <image> where the image part is.
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{%- for message in messages -%}"
    "{{ 'USER: ' if message['role'] == 'user' else 'ASSISTANT: ' }}"
    "{%- if message['content'] is string -%}{{ message['content'] }}"
    "{%- else -%}{%- for item in message['content'] -%}"
    "{%- if item['type'] == 'image' -%}{{ '<image>\\n' }}"
    "{%- elif item['type'] == 'text' -%}{{ item['text'] }}"
    "{%- endif -%}{%- endfor -%}{%- endif -%}"
    "{{ eos_token if message['role'] == 'assistant' else ' ' }}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ 'ASSISTANT:' }}{%- endif -%}"
)

# Hub layouts, as (prefix written by a fresh transformers 5.19 save, prefix in the layout).
NEW_LAYOUT = (
    ("language_model.model.", "model.language_model."),
    ("language_model.lm_head.", "lm_head."),
    ("vision_tower.", "model.vision_tower.vision_model."),
    ("multi_modal_projector.", "model.multi_modal_projector."),
)
LEGACY_LAYOUT = (
    ("language_model.model.", "language_model.model."),
    ("language_model.lm_head.", "language_model.lm_head."),
    ("vision_tower.", "vision_tower.vision_model."),
    ("multi_modal_projector.", "multi_modal_projector."),
)


def tokenizer() -> LlamaTokenizer:
    vocab, merges = train_bpe([*SPECIALS, IMAGE_TOKEN])
    return LlamaTokenizer(
        vocab=vocab,
        merges=merges,
        pad_token="<pad>",
        extra_special_tokens={"image_token": IMAGE_TOKEN},
        chat_template=CHAT_TEMPLATE,
    )


def image_processor() -> CLIPImageProcessor:
    return CLIPImageProcessor(
        size={"shortest_edge": IMAGE_SIZE}, crop_size={"height": IMAGE_SIZE, "width": IMAGE_SIZE}
    )


def vision_config(wide: bool = False) -> CLIPVisionConfig:
    return CLIPVisionConfig(
        hidden_size=128 if wide else 64,
        intermediate_size=256 if wide else 128,
        num_hidden_layers=2,
        num_attention_heads=4 if wide else 2,
        image_size=IMAGE_SIZE,
        patch_size=PATCH_SIZE,
        projection_dim=64,
    )


def text_config(tok: LlamaTokenizer, wide: bool = False) -> LlamaConfig:
    return LlamaConfig(
        vocab_size=VOCAB_SIZE,
        hidden_size=128 if wide else 64,
        intermediate_size=256 if wide else 128,
        num_hidden_layers=2,
        num_attention_heads=4 if wide else 2,
        num_key_value_heads=2 if wide else 1,
        head_dim=32,
        max_position_embeddings=1024,
        tie_word_embeddings=False,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    )


def config(tok: LlamaTokenizer, wide: bool = False) -> LlavaConfig:
    return LlavaConfig(
        vision_config=vision_config(wide),
        text_config=text_config(tok, wide),
        image_token_id=tok.convert_tokens_to_ids(IMAGE_TOKEN),
        vision_feature_layer=-2,  # LLaVA 1.5: vLLM builds the tower without its last layer
        vision_feature_select_strategy="default",
        image_seq_length=(IMAGE_SIZE // PATCH_SIZE) ** 2,
        tie_word_embeddings=False,
    )


def scales(seed: int) -> InitScales:
    return InitScales(
        seed=seed, embed_std=1.0, norm_gains=(("model.language_model.norm", 3.0),)
    )


def _check_projector_skip_matched_nothing(header: dict, packed: dict, config: dict) -> None:
    skip = config["quantization_config"]["llm_int8_skip_modules"]
    if skip != ["multi_modal_projector"] or "lm_head" not in packed:
        raise AssertionError("expected the recipe's projector skip with a 4-bit lm_head")
    if not any("multi_modal_projector" in m for m in packed):
        raise AssertionError("the projector skip should match nothing: projector is 4-bit")


def _check_legacy_layout(header: dict, packed: dict, config: dict) -> None:
    tops = {key.split(".")[0] for key in header}
    if tops != {"language_model", "vision_tower", "multi_modal_projector"}:
        raise AssertionError(f"legacy layout expected, top-level names are {sorted(tops)}")
    if "vision_tower.vision_model.encoder.layers.1.mlp.fc1" not in packed:
        raise AssertionError("the last tower layer (unbuilt by vLLM) should be stored 4-bit")


DEFAULT_GROUPS = ("vision_tower", "projector", "text")


class Llava(Family):
    name = "llava"
    group_prefixes = (
        ("model.vision_tower.", "vision_tower"),
        ("model.multi_modal_projector.", "projector"),
    )
    bases = {
        "llava": Base("llava", scales(3001)),
        "llava-legacy": Base("llava", scales(3001), {"layout": "legacy"}),
        # Hidden 128 / 4 heads in tower and text: every TP=2 cut falls on a 64-element
        # quant-block boundary.
        "llava-wide": Base("llava", scales(3002), {"wide": True}),
    }
    variants = [
        Variant("llava-bf16", "llava", description="unquantized (in-flight source)"),
        Variant("llava-int8", "llava", INT8, DEFAULT_GROUPS, "LLM.int8, default skip list"),
        Variant(
            "llava-skip-projector",
            "llava",
            {**NF4_DQ, "llm_int8_skip_modules": ["multi_modal_projector"]},
            (*DEFAULT_GROUPS, "lm_head"),
            "LLaVA recipe's projector skip: matches nothing in transformers 5 and replaces the "
            "defaults, so the projector and the untied lm_head are 4-bit too",
            _check_projector_skip_matched_nothing,
        ),
        Variant(
            "llava-vision-bf16",
            "llava",
            {**FP4, "llm_int8_skip_modules": ["model.vision_tower", "lm_head"]},
            ("projector", "text"),
            "tower really bf16 (anchored skip), fp4 elsewhere",
        ),
        Variant(
            "llava-legacy-nf4-dq",
            "llava-legacy",
            NF4_DQ,
            DEFAULT_GROUPS,
            "transformers 4.x key layout (language_model.model.*, vision_tower.vision_model.*)",
            _check_legacy_layout,
        ),
        Variant("llava-wide-nf4-dq", "llava-wide", NF4_DQ, DEFAULT_GROUPS, "nf4 + dq, TP-sized"),
    ]

    def new_model(self, base: Base) -> tuple[nn.Module, Any, list[int]]:
        tok = tokenizer()
        model = LlavaForConditionalGeneration(config(tok, base.options.get("wide", False)))
        processor = LlavaProcessor(
            image_processor=image_processor(),
            tokenizer=tok,
            patch_size=PATCH_SIZE,
            vision_feature_select_strategy="default",
            chat_template=CHAT_TEMPLATE,
            num_additional_image_tokens=1,  # CLIP's CLS
        )
        return model, processor, [tok.eos_token_id]

    def after_save(self, base: Base, out: Path, model: nn.Module) -> None:
        layout = LEGACY_LAYOUT if base.options.get("layout") == "legacy" else NEW_LAYOUT
        rewrite_checkpoint_keys(out, layout, model)


LLAVA = Llava()
