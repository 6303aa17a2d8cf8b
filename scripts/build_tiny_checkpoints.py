"""Build tiny, hermetic HF checkpoints (bf16 and bitsandbytes pre-quantized) plus HF references.

Usage::

    .venv/bin/python scripts/build_tiny_checkpoints.py [--out DIR] [--force] [NAME ...]

Each variant becomes ``DIR/NAME/``: a checkpoint directory exactly as a user would produce it
(random tiny model saved in bf16 by transformers; BnB variants are that bf16 checkpoint loaded
with ``from_pretrained(..., quantization_config=BitsAndBytesConfig(...))`` and saved again),
with tokenizer/processor/chat-template files so ``vllm serve DIR/NAME`` works, and a
``reference.json`` holding HF transformers outputs of the saved checkpoint (see
``tiny_reference.py``). Offline, CPU-only, seeded; a variant whose ``reference.json`` carries
the current ``BUILDER_VERSION`` is not rebuilt.

reference.json (top level)::

    builder_version, variant, description, family ("llama"|"gemma4"), architecture, base,
    bnb_config            BitsAndBytesConfig kwargs used to quantize (null for bf16)
    saved_quantization_config   config.json's quantization_config as transformers wrote it
    layout                {quantized_groups, packed_modules {module: nf4|fp4|int8},
                           bf16_linear_modules, lm_head ("tied"|"bf16"|"nf4"...),
                           num_packed_modules} - checked against the safetensors header
    processor             {processor_class, image_processor_class, image_processor_backend}
    eos_token_ids, reference_notes (HF-side patches, e.g. the lm_head workaround),
    sampling              {greedy_steps, top_logprobs, greedy_ignores_eos, ...}
    versions, metrics     {red_blue_top5_max_gap_bf16, fp32_bf16_top5_max_gap}
    cases                 [{name, kind ("text"|"image"|"audio"), messages (OpenAI chat format,
                           media inlined as data), media_file?, audio_sample_rate?}]
    references            {"float32"|"bfloat16": {case name: {prompt_token_ids,
                           prompt_logprobs (positions 1..n-1), next_top_logprobs [[id, lp]]
                           (top 10), greedy_token_ids, greedy_logprobs,
                           greedy_top2_margins}}}
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import json
import math
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

# Must precede the transformers import: huggingface_hub reads it at import time.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import bitsandbytes
import torch
import transformers
from tokenizers import Tokenizer, models, normalizers, trainers
from torch import nn
from transformers import (
    BitsAndBytesConfig,
    Gemma4Config,
    Gemma4ForConditionalGeneration,
    Gemma4Processor,
    GemmaTokenizer,
    LlamaConfig,
    LlamaForCausalLM,
    LlamaTokenizer,
    Qwen3MoeForCausalLM,
)
from transformers.models.gemma4.feature_extraction_gemma4 import Gemma4AudioFeatureExtractor
from transformers.models.gemma4.image_processing_gemma4 import Gemma4ImageProcessor
from transformers.models.gemma4.video_processing_gemma4 import Gemma4VideoProcessor

sys.path.insert(0, str(Path(__file__).resolve().parent))
import tiny_moe
import tiny_reference as ref

# Bump whenever the recipe (configs, weights, tokenizer, cases, JSON schema) changes.
BUILDER_VERSION = "tiny-ckpt-2026.1"
REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_OUT = REPO_ROOT / ".cache" / "tiny"
VOCAB_SIZE = 512

# --------------------------------------------------------------------------------------------
# Variants (names are a fixed API used by the tests)
# --------------------------------------------------------------------------------------------

NF4_DQ = {
    "load_in_4bit": True,
    "bnb_4bit_quant_type": "nf4",
    "bnb_4bit_use_double_quant": True,
    "bnb_4bit_compute_dtype": "bfloat16",
}
FP4 = {
    "load_in_4bit": True,
    "bnb_4bit_quant_type": "fp4",
    "bnb_4bit_use_double_quant": False,
    "bnb_4bit_compute_dtype": "bfloat16",
}
INT8 = {"load_in_8bit": True}

GEMMA4_DEFAULT_GROUPS = ("vision_tower", "embed_vision", "text", "ple")


@dataclass(frozen=True)
class Variant:
    name: str
    base: str  # key into BASES: which bf16 model this variant starts from
    bnb: dict[str, Any] | None = None  # BitsAndBytesConfig kwargs; None = unquantized bf16
    quantized_groups: tuple[str, ...] = ()  # intent, see tiny_reference.module_group
    description: str = ""
    moe: str | None = None  # MoE experts recipe, see tiny_moe.RECIPES

    @property
    def quant_format(self) -> str | None:
        if self.bnb is None:
            return None
        if self.bnb.get("load_in_8bit"):
            return "int8"
        return self.bnb["bnb_4bit_quant_type"]


VARIANTS: dict[str, Variant] = {
    v.name: v
    for v in [
        Variant("llama-bf16", "llama", description="unquantized"),
        Variant("llama-nf4-dq", "llama", NF4_DQ, ("text",), "nf4 + double quant"),
        Variant("llama-fp4", "llama", FP4, ("text",), "fp4, no double quant"),
        Variant("llama-int8", "llama", INT8, ("text",), "LLM.int8"),
        # Hidden 128 / 4 heads / 2 KV heads: tensor-parallel tests at TP=2.
        Variant("llama-wide-nf4-dq", "llama-wide", NF4_DQ, ("text",), "nf4 + dq, TP-sized"),
        Variant("llama-wide-fp4", "llama-wide", FP4, ("text",), "fp4, TP-sized"),
        Variant("llama-wide-int8", "llama-wide", INT8, ("text",), "LLM.int8, TP-sized"),
        Variant("gemma4-bf16", "gemma4", description="unquantized"),
        Variant(
            "gemma4-nf4-dq",
            "gemma4",
            NF4_DQ,
            GEMMA4_DEFAULT_GROUPS,
            "default BnB: vision tower, embed_vision, text and PLE projections 4-bit",
        ),
        Variant("gemma4-fp4", "gemma4", FP4, GEMMA4_DEFAULT_GROUPS, "fp4, no double quant"),
        Variant("gemma4-int8", "gemma4", INT8, GEMMA4_DEFAULT_GROUPS, "LLM.int8"),
        Variant(
            "gemma4-skip-unanchored",
            "gemma4",
            {**NF4_DQ, "llm_int8_skip_modules": ["vision_tower"]},
            GEMMA4_DEFAULT_GROUPS,
            "config claims a vision_tower skip that matches nothing in transformers 5; "
            "vision tensors are 4-bit; tied embeddings",
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
        ),
        Variant(
            "gemma4-keqv-nf4",
            "gemma4-keqv",
            NF4_DQ,
            ("vision_tower", "embed_vision", "text"),
            "attention_k_eq_v (26B/31B-like): full-attention layer has no v_proj; no PLE",
        ),
        Variant(
            "gemma4-audio-nf4",
            "gemma4-audio",
            NF4_DQ,
            (*GEMMA4_DEFAULT_GROUPS, "audio_tower", "embed_audio"),
            "E2B-like with audio tower; audio tower and embed_audio 4-bit",
        ),
        # Mixture of experts (scripts/tiny_moe.py): references per experts recipe.
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
        Variant("gemma4-moe-in-flight", "gemma4-moe", description="bf16 with "
                "enable_moe_block; served with --quantization bitsandbytes", moe="in_flight"),
        Variant("gemma4-moe-nf4", "gemma4-moe", NF4_DQ, GEMMA4_DEFAULT_GROUPS, "transformers "
                "5 layout: 3-D bf16 experts (quantized while loading), 4-bit router",
                moe="t5"),
        Variant("gemma4-moe-nf4-experts", "gemma4-moe", NF4_DQ, GEMMA4_DEFAULT_GROUPS,
                "per-expert layout: one packed nf4+dq tensor per expert and projection",
                moe="per_expert"),
    ]
}

# --------------------------------------------------------------------------------------------
# Tokenizers
# --------------------------------------------------------------------------------------------

# Small English corpus for the local BPE; covers the reference prompts.
CORPUS = """\
Hello, how are you today? I am fine, thank you. What color is this? It is red. It is blue.
Tell me a short story about a red fox. The quick brown fox jumps over the lazy dog.
Once upon a time there was a small cat who lived in a green house near the river.
The sky is blue and the sun is bright. The apple is red, the leaf is green, the sea is deep.
What is this sound? It sounds like a bell, a bird, a song, a drum or a voice.
She said that the weather would be warm and sunny for the rest of the week.
Please answer the question in one short sentence. Thank you for your help.
Numbers: one two three four five six seven eight nine ten 0 1 2 3 4 5 6 7 8 9.
A model reads tokens, looks at images, listens to audio and writes text.
The children played in the park while their parents talked about the news.
We went to the market to buy bread, milk, cheese, eggs and fresh fruit.
Where is the nearest station? Turn left at the corner and walk for five minutes.
"""

GEMMA4_BASE_SPECIALS = ["<pad>", "<eos>", "<bos>", "<unk>", "<mask>"]
# Named Gemma 4 control tokens (as in the released tokenizer_config.json); Gemma4Processor reads
# image/boi/eoi/audio/boa/eoa, the chat template uses sot/eot.
GEMMA4_NAMED_TOKENS = {
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
LLAMA_SPECIALS = ["<unk>", "<s>", "</s>"]

# Loops over message content so vLLM detects the "openai" content format and inserts <|image|>
# / <|audio|> where the parts are.
GEMMA4_CHAT_TEMPLATE = (
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
LLAMA_CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{%- for message in messages -%}"
    "{{ '<|' + message['role'] + '|>\\n' + message['content'] + eos_token + '\\n' }}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<|assistant|>\\n' }}{%- endif -%}"
)


def train_bpe(reserved: list[str]) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """Vocab of exactly VOCAB_SIZE: reserved tokens, 256 byte-fallback tokens, learned BPE.

    Both Gemma and Llama tokenizers map spaces to "▁" without splitting, so train the same way.
    Unused ids are filled with ``<unusedN>`` (as real Gemma vocabularies do) so every id the
    model can emit decodes.
    """
    byte_tokens = [f"<0x{i:02X}>" for i in range(256)]
    prefix = reserved + byte_tokens
    bpe = Tokenizer(models.BPE(unk_token=reserved[0], byte_fallback=True))
    bpe.normalizer = normalizers.Replace(" ", "▁")
    trainer = trainers.BpeTrainer(vocab_size=VOCAB_SIZE - len(prefix), show_progress=False)
    bpe.train_from_iterator(CORPUS.splitlines(), trainer)
    vocab = {tok: i for i, tok in enumerate(prefix)}
    for tok, _ in sorted(bpe.get_vocab().items(), key=lambda kv: kv[1]):
        vocab.setdefault(tok, len(vocab))
    while len(vocab) < VOCAB_SIZE:
        vocab[f"<unused{len(vocab)}>"] = len(vocab)
    merges = [tuple(m) for m in json.loads(bpe.to_str())["model"]["merges"]]
    return vocab, merges


def gemma4_tokenizer() -> GemmaTokenizer:
    vocab, merges = train_bpe(
        GEMMA4_BASE_SPECIALS + list(GEMMA4_NAMED_TOKENS.values()) + [VIDEO_TOKEN]
    )
    return GemmaTokenizer(
        vocab=vocab,
        merges=merges,
        add_bos_token=False,
        padding_side="left",
        extra_special_tokens=dict(GEMMA4_NAMED_TOKENS),
        chat_template=GEMMA4_CHAT_TEMPLATE,
    )


def gemma4_processor(tokenizer: GemmaTokenizer, max_soft_tokens: int) -> Gemma4Processor:
    return Gemma4Processor(
        feature_extractor=Gemma4AudioFeatureExtractor(),
        image_processor=Gemma4ImageProcessor(max_soft_tokens=max_soft_tokens),
        tokenizer=tokenizer,
        video_processor=Gemma4VideoProcessor(),
        chat_template=GEMMA4_CHAT_TEMPLATE,
        image_seq_length=max_soft_tokens,
    )


def llama_tokenizer() -> LlamaTokenizer:
    vocab, merges = train_bpe(list(LLAMA_SPECIALS))
    return LlamaTokenizer(vocab=vocab, merges=merges, chat_template=LLAMA_CHAT_TEMPLATE)


# --------------------------------------------------------------------------------------------
# Model configs
# --------------------------------------------------------------------------------------------

VISION_SOFT_TOKENS = 70  # vLLM: vision_config.default_output_length == processor max_soft_tokens


def llama_config(tokenizer: LlamaTokenizer, wide: bool = False) -> LlamaConfig:
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
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )


def _gemma4_text(**overrides: Any) -> dict[str, Any]:
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


def _gemma4_vision() -> dict[str, Any]:
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


def _gemma4_audio() -> dict[str, Any]:
    # Real E2B/E4B subsampling channels (128, 32): the projection input is
    # (128 mel bins / 4) * 32 = 1024, a multiple of 64 as the BnB CPU 4-bit kernel needs.
    return {
        "hidden_size": 64,
        "num_hidden_layers": 1,
        "num_attention_heads": 2,
        "subsampling_conv_channels": [128, 32],
        "output_proj_dims": 128,
    }


def gemma4_config(
    tokenizer: GemmaTokenizer,
    *,
    tied: bool = True,
    k_eq_v: bool = False,
    audio: bool = False,
    moe: bool = False,
) -> Gemma4Config:
    text_overrides: dict[str, Any] = {
        "tie_word_embeddings": tied,
        "pad_token_id": tokenizer.pad_token_id,
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id,
    }
    if k_eq_v:
        text_overrides |= {
            "attention_k_eq_v": True,
            "num_global_key_value_heads": 2,
            "hidden_size_per_layer_input": 0,
        }
    if moe:
        text_overrides |= tiny_moe.gemma4_moe_text_overrides()
    ids = tokenizer.convert_tokens_to_ids
    return Gemma4Config(
        text_config=_gemma4_text(**text_overrides),
        vision_config=_gemma4_vision(),
        audio_config=_gemma4_audio() if audio else None,
        tie_word_embeddings=tied,
        image_token_id=ids(GEMMA4_NAMED_TOKENS["image_token"]),
        boi_token_id=ids(GEMMA4_NAMED_TOKENS["boi_token"]),
        eoi_token_id=ids(GEMMA4_NAMED_TOKENS["eoi_token"]),
        video_token_id=ids(VIDEO_TOKEN),
        audio_token_id=ids(GEMMA4_NAMED_TOKENS["audio_token"]),
        boa_token_id=ids(GEMMA4_NAMED_TOKENS["boa_token"]),
        eoa_token_index=ids(GEMMA4_NAMED_TOKENS["eoa_token"]),
    )


# --------------------------------------------------------------------------------------------
# Weights
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class InitScales:
    """Seeded redraw of every parameter.

    HF's N(0, 0.02) init makes a tiny model echo its last token (the tied embedding dominates
    the residual stream). Here residual branches are made larger than the token embedding, so
    outputs depend on the whole prompt and on the image, while logits stay moderate enough that
    bf16 and fp32 logprobs agree to ~0.1.
    """

    seed: int
    embed_std: float  # token-embedding tables (Gemma multiplies them by sqrt(dim))
    linear_gain: float = 1.0  # Linear/conv std = gain / sqrt(fan_in)
    norm_jitter: float = 0.1  # norm scale = gain * (1 + jitter * N(0, 1))
    # Norm module (full name or last name component) -> gain: post-branch norms set how much
    # each branch adds to the residual, the final norm sets the logit scale.
    norm_gains: tuple[tuple[str, float], ...] = ()
    position_std: float = 0.5  # vision patch position table
    clip_bound: float = 8.0  # finite clip values for clipped (audio) linears


def redraw_weights(model: nn.Module, scales: InitScales) -> None:
    gen = torch.Generator().manual_seed(scales.seed)
    modules = dict(model.named_modules())
    with torch.no_grad():
        for name, param in model.named_parameters():
            owner_name, leaf = name.rsplit(".", 1)
            noise = torch.randn(param.shape, generator=gen)
            param.copy_(_redrawn(owner_name, leaf, param, modules[owner_name], noise, scales))
        _set_clip_bounds(model, scales.clip_bound)


def _redrawn(
    owner_name: str,
    leaf: str,
    param: torch.Tensor,
    owner: nn.Module,
    noise: torch.Tensor,
    scales: InitScales,
) -> torch.Tensor:
    if leaf == "position_embedding_table":
        return scales.position_std * noise
    if leaf == "per_dim_scale":
        return 0.1 * noise
    if leaf == "bias":
        return 0.02 * noise
    if isinstance(owner, nn.Embedding):
        return scales.embed_std * noise
    if param.ndim == 1:  # norm scales
        gains = dict(scales.norm_gains)
        gain = gains.get(owner_name, gains.get(owner_name.rsplit(".", 1)[-1], 1.0))
        return gain * (1.0 + scales.norm_jitter * noise)
    fan_in = math.prod(param.shape[1:])
    return scales.linear_gain / math.sqrt(fan_in) * noise


def _set_clip_bounds(model: nn.Module, bound: float) -> None:
    # HF initializes Gemma 4 clipped linears to +-inf; real checkpoints carry finite bounds,
    # which a loader has to keep next to the packed weight.
    for module in model.modules():
        if hasattr(module, "input_min") and hasattr(module, "output_max"):
            module.input_min.fill_(-bound)
            module.input_max.fill_(bound)
            module.output_min.fill_(-bound)
            module.output_max.fill_(bound)


# --------------------------------------------------------------------------------------------
# Base (bf16) checkpoints
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Base:
    family: str  # "llama" | "gemma4"
    scales: InitScales
    tied: bool = True
    k_eq_v: bool = False
    audio: bool = False
    wide: bool = False  # llama: sizes whose TP=2 cuts align with 64-element quant blocks
    moe: bool = False  # gemma4: enable_moe_block (qwen3_moe is MoE anyway)


GEMMA4_NORM_GAINS = (
    # Gemma 4 attention uses scaling 1.0 after q/k RMSNorm: unit q/k norms give logits with std
    # sqrt(head_dim) ~ 6, a near-argmax attention that amplifies bf16 rounding.
    ("q_norm", 0.5),
    ("k_norm", 0.5),
    ("post_attention_layernorm", 3.0),
    ("post_feedforward_layernorm", 3.0),
    ("post_per_layer_input_norm", 2.0),
    ("model.language_model.norm", 3.0),
)


def _gemma4_scales(seed: int) -> InitScales:
    return InitScales(seed=seed, embed_std=0.125, norm_gains=GEMMA4_NORM_GAINS)


BASES: dict[str, Base] = {
    "llama": Base(
        "llama",
        InitScales(seed=1001, embed_std=1.0, norm_gains=(("model.norm", 2.0),)),
        tied=False,
    ),
    "llama-wide": Base(
        "llama",
        InitScales(seed=1002, embed_std=1.0, norm_gains=(("model.norm", 2.0),)),
        tied=False,
        wide=True,
    ),
    "gemma4": Base("gemma4", _gemma4_scales(2001)),
    "gemma4-untied": Base("gemma4", _gemma4_scales(2002), tied=False),
    "gemma4-keqv": Base("gemma4", _gemma4_scales(2003), k_eq_v=True),
    "gemma4-audio": Base("gemma4", _gemma4_scales(2004), audio=True),
    "gemma4-moe": Base("gemma4", _gemma4_scales(2005), moe=True),
    "qwen3-moe": Base(
        "qwen3_moe",
        InitScales(seed=1101, embed_std=1.0, norm_gains=(("model.norm", 2.0),)),
        tied=False,
        moe=True,
    ),
}


def save_base(base: Base, out: Path) -> None:
    """A bf16 checkpoint directory with tokenizer/processor files, as a user would save one."""
    torch.manual_seed(base.scales.seed)
    if base.family == "llama":
        tokenizer = llama_tokenizer()
        model = LlamaForCausalLM(llama_config(tokenizer, base.wide))
        saver: Any = tokenizer
        eos = [tokenizer.eos_token_id]
    elif base.family == "qwen3_moe":
        tokenizer = llama_tokenizer()
        model = Qwen3MoeForCausalLM(tiny_moe.qwen3_moe_config(tokenizer))
        saver = tokenizer
        eos = [tokenizer.eos_token_id]
    else:
        tokenizer = gemma4_tokenizer()
        config = gemma4_config(
            tokenizer, tied=base.tied, k_eq_v=base.k_eq_v, audio=base.audio, moe=base.moe
        )
        model = Gemma4ForConditionalGeneration(config)
        saver = gemma4_processor(tokenizer, VISION_SOFT_TOKENS)
        eos = [tokenizer.eos_token_id, tokenizer.convert_tokens_to_ids("<turn|>")]
    redraw_weights(model, base.scales)
    if base.moe:
        tiny_moe.redraw_experts(model, base.scales.seed)
    model.generation_config.eos_token_id = eos
    model.to(torch.bfloat16).save_pretrained(out)
    saver.save_pretrained(out)


# --------------------------------------------------------------------------------------------
# Variant build
# --------------------------------------------------------------------------------------------


def bnb_config(kwargs: dict[str, Any]) -> BitsAndBytesConfig:
    kwargs = dict(kwargs)
    if "bnb_4bit_compute_dtype" in kwargs:
        kwargs["bnb_4bit_compute_dtype"] = getattr(torch, kwargs["bnb_4bit_compute_dtype"])
    return BitsAndBytesConfig(**kwargs)


def _architecture(ckpt_dir: Path) -> str:
    return json.loads((ckpt_dir / "config.json").read_text())["architectures"][0]


def quantize(base_dir: Path, variant: Variant, out: Path) -> list[str]:
    """Load the bf16 checkpoint with a BnB config and save it. Returns its Linear modules."""
    cls = getattr(transformers, _architecture(base_dir))
    model = cls.from_pretrained(
        base_dir, quantization_config=bnb_config(variant.bnb or {}), dtype=torch.bfloat16
    )
    model.save_pretrained(out)
    linears = ref.linear_module_names(model)
    del model
    # Tokenizer, processor, chat template: everything that is not weights or model config.
    for file in base_dir.iterdir():
        if not (out / file.name).exists():
            shutil.copy2(file, out / file.name)
    return linears


def _plain_linear_modules(base_dir: Path) -> list[str]:
    cls = getattr(transformers, _architecture(base_dir))
    with torch.device("meta"):
        model = cls(transformers.AutoConfig.from_pretrained(base_dir))
    return ref.linear_module_names(model)


def check_layout(ckpt_dir: Path, variant: Variant, linears: list[str]) -> dict[str, Any]:
    """Compare what the safetensors header really holds with the variant's intent."""
    header = ref.checkpoint_header(ckpt_dir)
    config = json.loads((ckpt_dir / "config.json").read_text())
    tied = bool(config.get("tie_word_embeddings", False))
    packed = ref.packed_modules(header)
    fmt = variant.quant_format
    expected = ref.expected_packed(linears, variant.quantized_groups, fmt or "", tied)
    if packed != expected:
        extra = sorted(set(packed) - set(expected))
        missing = sorted(set(expected) - set(packed))
        raise AssertionError(
            f"{variant.name}: packed modules differ from intent; unexpected {extra}, "
            f"missing {missing}"
        )
    unpacked = [m for m in linears if m not in packed and f"{m}.weight" in header]
    for module in unpacked:
        ref.expect_dtype(header, f"{module}.weight", "BF16")
    if fmt in ("nf4", "fp4"):
        double_quant = bool(variant.bnb and variant.bnb.get("bnb_4bit_use_double_quant"))
        for module in packed:
            missing_keys = ref.four_bit_keys(module, double_quant, fmt) - set(header)
            if missing_keys:
                raise AssertionError(f"{variant.name}: missing {sorted(missing_keys)}")
    _variant_specific_checks(variant, header, packed, config)
    return {
        "quantized_groups": list(variant.quantized_groups),
        "packed_modules": packed,
        "bf16_linear_modules": unpacked,
        "lm_head": "tied" if tied else packed.get("lm_head", "bf16"),
        "num_packed_modules": len(packed),
    }


def _variant_specific_checks(
    variant: Variant, header: dict[str, Any], packed: dict[str, str], config: dict[str, Any]
) -> None:
    name = variant.name
    if name == "gemma4-untied-lm4bit":
        ref.expect_dtype(header, "lm_head.weight", "U8")
        if packed.get("lm_head") != "nf4":
            raise AssertionError("lm_head is not stored as packed nf4")
    if name == "gemma4-keqv-nf4":
        prefix = "model.language_model.layers.1.self_attn"  # the full-attention layer
        has_v = any(k.startswith(f"{prefix}.v_proj") for k in header)
        if f"{prefix}.k_proj" not in packed or has_v:
            raise AssertionError("k_eq_v layer must have a packed k_proj and no v_proj")
        if "model.language_model.layers.0.self_attn.v_proj" not in packed:
            raise AssertionError("sliding layer should keep its v_proj")
    if name == "gemma4-skip-unanchored":
        skip = config["quantization_config"]["llm_int8_skip_modules"]
        if skip != ["vision_tower"] or not any(m.startswith("model.vision_tower.") for m in packed):
            raise AssertionError("expected a claimed vision_tower skip with 4-bit vision tensors")
    if name == "gemma4-audio-nf4":
        clip_keys = [k for k in header if k.startswith("model.audio_tower.") and "input_max" in k]
        if not clip_keys or not any(m.startswith("model.audio_tower.") for m in packed):
            raise AssertionError("audio tower should be 4-bit with its clip buffers stored")


def _top5_gap(references: dict[str, Any]) -> float | None:
    """Largest difference in first-token logprobs (union of top-5s) between red and blue."""
    refs = references["bfloat16"]
    if "image-red" not in refs:
        return None
    red = dict(map(tuple, refs["image-red"]["next_top_logprobs"]))
    blue = dict(map(tuple, refs["image-blue"]["next_top_logprobs"]))
    floor = min(min(red.values()), min(blue.values()))  # below every stored top-10 entry
    top5 = {t for t, _ in refs["image-red"]["next_top_logprobs"][:5]}
    top5 |= {t for t, _ in refs["image-blue"]["next_top_logprobs"][:5]}
    return max(abs(red.get(t, floor) - blue.get(t, floor)) for t in top5)


def _dtype_gap(references: dict[str, Any]) -> float:
    """Max |fp32 - bf16| over the first-token top-5 (fp32 ids) of every case."""
    gap = 0.0
    for case, r32 in references["float32"].items():
        r16 = dict(map(tuple, references["bfloat16"][case]["next_top_logprobs"]))
        for token, lp in r32["next_top_logprobs"][:5]:
            if token in r16:
                gap = max(gap, abs(lp - r16[token]))
    return gap


def build_variant(variant: Variant, base_dir: Path, staging: Path) -> dict[str, Any]:
    """Write the checkpoint into ``staging`` and return its reference.json content."""
    base = BASES[variant.base]
    if variant.bnb is None:
        shutil.copytree(base_dir, staging, dirs_exist_ok=True)
        linears = _plain_linear_modules(base_dir)
    else:
        linears = quantize(base_dir, variant, staging)
    layout = check_layout(staging, variant, linears)
    if variant.moe:
        layout["moe"] = tiny_moe.finish_files(staging, variant.moe, variant.bnb)
    gemma = base.family == "gemma4"
    if gemma:
        ref.write_images(staging)
    if base.audio:
        ref.write_audio(staging)
    cases = ref.build_cases(staging, images=gemma, audio=base.audio)
    architecture = _architecture(staging)
    load_model = (
        tiny_moe.reference_loader(variant.moe, base_dir, staging, variant.bnb)
        if variant.moe else None
    )
    references, notes, processor_info = ref.compute_references(
        staging, base.family, architecture, cases, load_model=load_model
    )
    config = json.loads((staging / "config.json").read_text())
    generation = json.loads((staging / "generation_config.json").read_text())
    eos = generation.get("eos_token_id")
    return {
        "builder_version": BUILDER_VERSION,
        "variant": variant.name,
        "description": variant.description,
        "family": base.family,
        "architecture": architecture,
        "base": variant.base,
        "bnb_config": variant.bnb,
        "saved_quantization_config": config.get("quantization_config"),
        "layout": layout,
        "processor": processor_info,
        "eos_token_ids": eos if isinstance(eos, list) else [eos],
        "reference_notes": notes,
        "sampling": {
            "greedy_steps": ref.GREEDY_STEPS,
            "top_logprobs": ref.TOP_LOGPROBS,
            "greedy_ignores_eos": True,
            "prompt_logprob_positions": "1..n-1",
        },
        "versions": {
            "transformers": transformers.__version__,
            "torch": torch.__version__,
            "bitsandbytes": bitsandbytes.__version__,
        },
        "metrics": {
            "red_blue_top5_max_gap_bf16": _top5_gap(references),
            "fp32_bf16_top5_max_gap": _dtype_gap(references),
        },
        "cases": cases,
        "references": references,
    }


def _is_current(ckpt_dir: Path) -> bool:
    try:
        data = json.loads((ckpt_dir / "reference.json").read_text())
    except (OSError, ValueError):
        return False
    return data.get("builder_version") == BUILDER_VERSION


def _publish(staging: Path, final: Path) -> None:
    """Swap the finished staging dir into place; readers never see a half-written variant."""
    _make_readable(staging)
    if final.exists():
        trash = Path(tempfile.mkdtemp(prefix=f".{final.name}.old-", dir=final.parent))
        final.rename(trash / final.name)
        shutil.rmtree(trash)
    staging.rename(final)


def _make_readable(path: Path) -> None:
    # mkdtemp (and the safetensors writer) create owner-only entries; a checkpoint dir should
    # look like any other saved model, readable per the user's umask.
    umask = os.umask(0)
    os.umask(umask)
    path.chmod(0o777 & ~umask)
    for file in path.iterdir():
        file.chmod(0o666 & ~umask)


def build(
    names: list[str] | None = None, out: Path | None = None, *, force: bool = False
) -> dict[str, Path]:
    """Build (or reuse cached) variants; returns variant name -> checkpoint directory."""
    names = list(VARIANTS) if not names else list(dict.fromkeys(names))
    unknown = sorted(set(names) - set(VARIANTS))
    if unknown:
        raise ValueError(f"unknown variant(s) {unknown}; known: {sorted(VARIANTS)}")
    out = Path(out) if out is not None else DEFAULT_OUT
    out.mkdir(parents=True, exist_ok=True)
    with _build_lock(out):
        _remove_stale_staging(out)
        # Checked under the lock: another process (e.g. a parallel test worker) may have just
        # built what we need.
        todo = [n for n in names if force or not _is_current(out / n)]
        if todo:
            _build_all(todo, out)
    return {name: out / name for name in names}


@contextlib.contextmanager
def _build_lock(out: Path) -> Iterator[None]:
    with (out / ".build.lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def _remove_stale_staging(out: Path) -> None:
    # Hidden leftovers of a killed run; safe to delete because we hold the build lock.
    for pattern in (".*.tmp-*", ".bases-*", ".*.old-*"):
        for path in out.glob(pattern):
            shutil.rmtree(path, ignore_errors=True)


def _build_all(names: list[str], out: Path) -> None:
    with tempfile.TemporaryDirectory(prefix=".bases-", dir=out) as tmp:
        bases: dict[str, Path] = {}
        for name in names:
            variant = VARIANTS[name]
            if variant.base not in bases:
                bases[variant.base] = Path(tmp) / variant.base
                save_base(BASES[variant.base], bases[variant.base])
            staging = Path(tempfile.mkdtemp(prefix=f".{name}.tmp-", dir=out))
            try:
                data = build_variant(variant, bases[variant.base], staging)
                (staging / "reference.json").write_text(json.dumps(data, indent=1) + "\n")
                _publish(staging, out / name)
            finally:
                shutil.rmtree(staging, ignore_errors=True)


# --------------------------------------------------------------------------------------------
# CLI
# --------------------------------------------------------------------------------------------


def _dir_size(path: Path) -> int:
    return sum(f.stat().st_size for f in path.iterdir() if f.is_file())


def _format_top(entries: list[list[float]], k: int = 5) -> str:
    return " ".join(f"{int(t)}:{lp:.2f}" for t, lp in entries[:k])


def summarize(paths: dict[str, Path]) -> None:
    for name, path in paths.items():
        data = json.loads((path / "reference.json").read_text())
        refs = data["references"]["bfloat16"]
        metrics = data["metrics"]
        print(
            f"{name:24s} {_dir_size(path) / 1e6:6.2f} MB  "
            f"packed={data['layout']['num_packed_modules']:3d}  "
            f"lm_head={data['layout']['lm_head']:5s}  "
            f"fp32~bf16={metrics['fp32_bf16_top5_max_gap']:.3f}"
        )
        if "image-red" in refs:
            print(f"    red : {_format_top(refs['image-red']['next_top_logprobs'])}")
            print(f"    blue: {_format_top(refs['image-blue']['next_top_logprobs'])}")
            print(f"    red/blue max top-5 gap: {metrics['red_blue_top5_max_gap_bf16']:.2f}")
        for note in data["reference_notes"]:
            print(f"    note: {note}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("names", nargs="*", metavar="NAME", help=f"any of {', '.join(VARIANTS)}")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="output dir")
    parser.add_argument("--force", action="store_true", help="rebuild even if cached")
    args = parser.parse_args(argv)
    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    start = time.monotonic()
    paths = build(args.names or None, args.out, force=args.force)
    summarize(paths)
    print(f"done in {time.monotonic() - start:.1f} s -> {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
