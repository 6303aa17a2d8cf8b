"""Mistral 3 (``Mistral3ForConditionalGeneration``, Mistral Small 3.1/3.2): Pixtral tower with
2-D RoPE, a patch merger (``multi_modal_projector.patch_merger.merging_layer``, which
transformers quantizes and vLLM builds as a plain ``nn.Linear``), a two-layer projector and
an untied Mistral text model. Hub and transformers 5 saves use the 4.x key layout
(``language_model.model.*``, ``language_model.lm_head``, ``vision_tower.transformer.*``,
``multi_modal_projector.*``)."""

from __future__ import annotations

from typing import Any

from torch import nn
from transformers import (
    LlamaTokenizer,
    Mistral3Config,
    Mistral3ForConditionalGeneration,
    MistralConfig,
    PixtralImageProcessor,
    PixtralProcessor,
    PixtralVisionConfig,
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
    check_skip,
    train_bpe,
)

SPECIALS = ["<unk>", "<s>", "</s>", "[INST]", "[/INST]"]
IMAGE_TOKENS = {"image_token": "[IMG]", "image_break_token": "[IMG_BREAK]",
                "image_end_token": "[IMG_END]"}
PATCH_SIZE = 8
MERGE = 2  # 64x48 -> 4x3 merged patches of 16 px: 12 [IMG], 3 row ends
IMAGE_EDGE = 64

CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{%- for message in messages -%}"
    "{%- if message['role'] == 'user' -%}{{ '[INST]' }}"
    "{%- if message['content'] is string -%}{{ message['content'] }}"
    "{%- else -%}{%- for item in message['content'] -%}"
    "{%- if item['type'] == 'image' -%}{{ '[IMG]' }}"
    "{%- elif item['type'] == 'text' -%}{{ item['text'] }}"
    "{%- endif -%}{%- endfor -%}{%- endif -%}"
    "{{ '[/INST]' }}"
    "{%- else -%}{{ message['content'] + eos_token }}{%- endif -%}"
    "{%- endfor -%}"
)


def tokenizer() -> LlamaTokenizer:
    vocab, merges = train_bpe([*SPECIALS, *IMAGE_TOKENS.values()])
    return LlamaTokenizer(
        vocab=vocab,
        merges=merges,
        extra_special_tokens={"inst_token": "[INST]", "inst_end_token": "[/INST]",
                              **IMAGE_TOKENS},
        chat_template=CHAT_TEMPLATE,
    )


def config(tok: LlamaTokenizer) -> Mistral3Config:
    text = MistralConfig(
        vocab_size=VOCAB_SIZE,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=32,
        max_position_embeddings=1024,
        sliding_window=None,
        tie_word_embeddings=False,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
    )
    vision = PixtralVisionConfig(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=2,
        head_dim=32,
        image_size=IMAGE_EDGE,
        patch_size=PATCH_SIZE,
    )
    return Mistral3Config(
        vision_config=vision,
        text_config=text,
        image_token_index=tok.convert_tokens_to_ids(IMAGE_TOKENS["image_token"]),
        spatial_merge_size=MERGE,
        vision_feature_layer=-1,
        multimodal_projector_bias=False,
        tie_word_embeddings=False,
    )


def scales(seed: int) -> InitScales:
    return InitScales(seed=seed, embed_std=1.0, norm_gains=(("model.language_model.norm", 3.0),))


def _check_merging_layer_packed(header: dict, packed: dict, config: dict) -> None:
    if not any(m.endswith("patch_merger.merging_layer") for m in packed):
        raise AssertionError("the patch merger's merging_layer should be stored packed")


TOWER = ("vision_tower", "projector")


class Mistral3(Family):
    name = "mistral3"
    group_prefixes = (
        ("model.vision_tower.", "vision_tower"),
        ("model.multi_modal_projector.", "projector"),
    )
    vllm_plain_linears = ("model.multi_modal_projector.patch_merger.merging_layer",)
    bases = {"mistral3": Base("mistral3", scales(6001))}
    variants = [
        Variant("mistral3-bf16", "mistral3", description="unquantized (in-flight source)"),
        Variant(
            "mistral3-skip-unanchored",
            "mistral3",
            {**NF4_DQ, "llm_int8_skip_modules": ["vision_tower", "multi_modal_projector"]},
            (*TOWER, "text", "lm_head"),
            "nf4+dq; unanchored tower/projector skips match nothing and drop the defaults: "
            "tower, merging_layer and the untied lm_head 4-bit",
            _check_merging_layer_packed,
        ),
        Variant(
            "mistral3-fp4",
            "mistral3",
            FP4,
            (*TOWER, "text"),
            "fp4, default skip list (merging_layer 4-bit)",
            _check_merging_layer_packed,
        ),
        Variant(
            "mistral3-int8",
            "mistral3",
            {**INT8, "llm_int8_skip_modules": ["model.vision_tower", "model.multi_modal_projector",
                                               "lm_head"]},
            ("text",),
            "LLM.int8 text; tower and projector really bf16 (anchored skips)",
            check_skip(["model.vision_tower", "model.multi_modal_projector", "lm_head"]),
        ),
    ]

    def new_model(self, base: Base) -> tuple[nn.Module, Any, list[int]]:
        tok = tokenizer()
        model = Mistral3ForConditionalGeneration(config(tok))
        processor = PixtralProcessor(
            image_processor=PixtralImageProcessor(
                size={"longest_edge": IMAGE_EDGE},
                patch_size={"height": PATCH_SIZE, "width": PATCH_SIZE},
            ),
            tokenizer=tok,
            patch_size=PATCH_SIZE,
            spatial_merge_size=MERGE,
            chat_template=CHAT_TEMPLATE,
            **IMAGE_TOKENS,
        )
        return model, processor, [tok.eos_token_id]


MISTRAL3 = Mistral3()
