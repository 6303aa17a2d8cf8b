"""Gemma 3 (``Gemma3ForConditionalGeneration``): SigLIP tower, avg-pooled soft tokens, a plain
``mm_input_projection_weight`` parameter as projector (never a Linear, so never quantized),
tied embeddings.

HF attends bidirectionally within an image when given ``token_type_ids``; vLLM does that
only in its FlashAttention backend (``is_mm_prefix_lm``), its CPU attention is causal. The
references here are computed causally (no ``token_type_ids``), like with like.
The hub checkpoints (and transformers 5 saves of them) use the 4.x key layout
(``language_model.model.*``, ``vision_tower.vision_model.*``, ``multi_modal_projector.*``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers import (
    Gemma3Config,
    Gemma3ForConditionalGeneration,
    Gemma3Processor,
    Gemma3TextConfig,
    GemmaTokenizer,
    SiglipVisionConfig,
)
from transformers.models.gemma3.image_processing_gemma3 import Gemma3ImageProcessor

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

BASE_SPECIALS = ["<pad>", "<eos>", "<bos>", "<unk>", "<mask>"]
NAMED_TOKENS = {
    "sot_token": "<start_of_turn>",
    "eot_token": "<end_of_turn>",
    "boi_token": "<start_of_image>",
    "eoi_token": "<end_of_image>",
    "image_token": "<image_soft_token>",
}
IMAGE_SIZE = 64
PATCH_SIZE = 8  # 8x8 patches, pooled 2x2 into 16 soft tokens
SOFT_TOKENS = 16

CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{%- for message in messages -%}"
    "{%- set role = 'model' if message['role'] == 'assistant' else message['role'] -%}"
    "{{ '<start_of_turn>' + role + '\\n' }}"
    "{%- if message['content'] is string -%}{{ message['content'] }}"
    "{%- else -%}{%- for item in message['content'] -%}"
    "{%- if item['type'] == 'image' -%}{{ '<start_of_image>' }}"
    "{%- elif item['type'] == 'text' -%}{{ item['text'] }}"
    "{%- endif -%}{%- endfor -%}{%- endif -%}"
    "{{ '<end_of_turn>\\n' }}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<start_of_turn>model\\n' }}{%- endif -%}"
)

HUB_LAYOUT = (
    ("language_model.model.", "language_model.model."),
    ("vision_tower.", "vision_tower.vision_model."),
    ("multi_modal_projector.", "multi_modal_projector."),
)


# Runs of newlines are single tokens in Gemma's vocabulary, and vLLM's Gemma 3 processor
# looks them up ("\n" .. "\n\n\n\n") to merge the ones around an image.
NEWLINES = ["\n", "\n\n", "\n\n\n", "\n\n\n\n"]
NEWLINE_MERGES = (("\n", "\n"), ("\n\n", "\n"), ("\n\n", "\n\n"))


def tokenizer() -> GemmaTokenizer:
    vocab, merges = train_bpe(
        BASE_SPECIALS + list(NAMED_TOKENS.values()) + NEWLINES, NEWLINE_MERGES
    )
    return GemmaTokenizer(
        vocab=vocab,
        merges=merges,
        add_bos_token=False,
        padding_side="left",
        extra_special_tokens=dict(NAMED_TOKENS),
        chat_template=CHAT_TEMPLATE,
    )


def config(tok: GemmaTokenizer) -> Gemma3Config:
    ids = tok.convert_tokens_to_ids
    text = Gemma3TextConfig(
        vocab_size=VOCAB_SIZE,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        layer_types=["sliding_attention", "full_attention"],
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=32,
        query_pre_attn_scalar=32,
        sliding_window=128,
        max_position_embeddings=1024,
        pad_token_id=tok.pad_token_id,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
    )
    vision = SiglipVisionConfig(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=2,
        image_size=IMAGE_SIZE,
        patch_size=PATCH_SIZE,
        vision_use_head=False,
    )
    return Gemma3Config(
        text_config=text,
        vision_config=vision,
        mm_tokens_per_image=SOFT_TOKENS,
        boi_token_index=ids(NAMED_TOKENS["boi_token"]),
        eoi_token_index=ids(NAMED_TOKENS["eoi_token"]),
        image_token_index=ids(NAMED_TOKENS["image_token"]),
        tie_word_embeddings=True,
    )


def scales(seed: int) -> InitScales:
    # Gemma RMSNorm scales by (1 + weight): gain 0 is a unit norm. Unit q/k norms keep the
    # attention logits moderate; the final norm sets the logit scale.
    return InitScales(
        seed=seed,
        embed_std=0.125,
        norm_gains=(("q_norm", 0.0), ("k_norm", 0.0), ("language_model.norm", 0.5)),
        norm_jitter=0.1,
    )


DEFAULT_GROUPS = ("vision_tower", "text")


def _check_tower_skip_matched_nothing(header: dict, packed: dict, config: dict) -> None:
    skip = config["quantization_config"]["llm_int8_skip_modules"]
    if skip != ["vision_tower"] or not any(m.startswith("vision_tower.") for m in packed):
        raise AssertionError("expected a claimed vision_tower skip with 4-bit tower tensors")


class Gemma3(Family):
    name = "gemma3"
    group_prefixes = (("model.vision_tower.", "vision_tower"),)
    bases = {"gemma3": Base("gemma3", scales(4001))}
    variants = [
        Variant("gemma3-bf16", "gemma3", description="unquantized (in-flight source)"),
        Variant(
            "gemma3-nf4-dq",
            "gemma3",
            NF4_DQ,
            DEFAULT_GROUPS,
            "default BnB: SigLIP tower and text 4-bit; projector is a plain parameter",
        ),
        Variant(
            "gemma3-skip-unanchored",
            "gemma3",
            {**FP4, "llm_int8_skip_modules": ["vision_tower"]},
            DEFAULT_GROUPS,
            "fp4; the unanchored vision_tower skip matches nothing: tower 4-bit",
            _check_tower_skip_matched_nothing,
        ),
        Variant(
            "gemma3-vision-bf16",
            "gemma3",
            {**INT8, "llm_int8_skip_modules": ["model.vision_tower", "lm_head"]},
            ("text",),
            "LLM.int8 text, tower really bf16 (anchored skip)",
        ),
    ]

    def new_model(self, base: Base) -> tuple[nn.Module, Any, list[int]]:
        tok = tokenizer()
        model = Gemma3ForConditionalGeneration(config(tok))
        processor = Gemma3Processor(
            image_processor=Gemma3ImageProcessor(
                size={"height": IMAGE_SIZE, "width": IMAGE_SIZE}, do_pan_and_scan=False
            ),
            tokenizer=tok,
            chat_template=CHAT_TEMPLATE,
            image_seq_length=SOFT_TOKENS,
        )
        eos = [tok.eos_token_id, tok.convert_tokens_to_ids(NAMED_TOKENS["eot_token"])]
        return model, processor, eos

    def after_save(self, base: Base, out: Path, model: nn.Module) -> None:
        rewrite_checkpoint_keys(out, HUB_LAYOUT, model)

    def encode_case(
        self, processor: Any, case: dict[str, Any], ckpt_dir: Path
    ) -> dict[str, torch.Tensor]:
        inputs = super().encode_case(processor, case, ckpt_dir)
        inputs.pop("token_type_ids", None)  # causal, as vLLM's CPU attention
        return inputs


GEMMA3 = Gemma3()
