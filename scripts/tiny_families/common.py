"""What every tiny-checkpoint family shares: variants, bases, weight redraw, tokenizer, the
family interface. Family specifics live in one module per family beside this one."""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import transformers
from PIL import Image
from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, trainers
from torch import nn

from tiny_reference import read_wav

VOCAB_SIZE = 512

# --------------------------------------------------------------------------------------------
# Quantization configs users write (BitsAndBytesConfig kwargs)
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

# (header, packed modules, config.json) -> raises AssertionError when the saved checkpoint is
# not what the variant claims to be.
LayoutCheck = Callable[[dict[str, Any], dict[str, str], dict[str, Any]], None]


@dataclass(frozen=True)
class Variant:
    name: str
    base: str  # key into the bases: which bf16 model this variant starts from
    bnb: dict[str, Any] | None = None  # BitsAndBytesConfig kwargs; None = unquantized bf16
    quantized_groups: tuple[str, ...] = ()  # intent, see Family.module_group
    description: str = ""
    check: LayoutCheck | None = None  # what only this variant must show on disk
    moe: str | None = None  # MoE experts recipe, see tiny_moe.RECIPES

    @property
    def quant_format(self) -> str | None:
        if self.bnb is None:
            return None
        if self.bnb.get("load_in_8bit"):
            return "int8"
        return self.bnb["bnb_4bit_quant_type"]



def check_skip(expected: list[str]) -> LayoutCheck:
    """A variant check: config.json keeps the skip list the user wrote, as written."""

    def check(header: dict, packed: dict, config: dict) -> None:
        skip = config["quantization_config"]["llm_int8_skip_modules"]
        if skip != expected:
            raise AssertionError(f"skip list {skip}, expected {expected}")

    return check


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
    # Parameter leaf name -> std, for parameters that are neither Linear, norm nor embedding
    # (position tables, learned scales).
    leaf_stds: tuple[tuple[str, float], ...] = ()


@dataclass(frozen=True)
class Base:
    """One bf16 model; its variants quantize it in different ways."""

    family: str  # Family.name
    scales: InitScales
    options: dict[str, Any] = field(default_factory=dict)  # family-specific shape switches


def redraw_weights(model: nn.Module, scales: InitScales) -> None:
    gen = torch.Generator().manual_seed(scales.seed)
    modules = dict(model.named_modules())
    with torch.no_grad():
        for name, param in model.named_parameters():
            owner_name, leaf = name.rsplit(".", 1) if "." in name else ("", name)
            noise = torch.randn(param.shape, generator=gen)
            param.copy_(_redrawn(owner_name, leaf, param, modules[owner_name], noise, scales))


def _redrawn(
    owner_name: str,
    leaf: str,
    param: torch.Tensor,
    owner: nn.Module,
    noise: torch.Tensor,
    scales: InitScales,
) -> torch.Tensor:
    leaf_stds = dict(scales.leaf_stds)
    if leaf in leaf_stds:
        return leaf_stds[leaf] * noise
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


# --------------------------------------------------------------------------------------------
# Tokenizer
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


def train_bpe(
    reserved: list[str], first_merges: tuple[tuple[str, str], ...] = ()
) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """Vocab of exactly VOCAB_SIZE: reserved tokens, 256 byte-fallback tokens, learned BPE.

    Both Gemma and Llama tokenizers map spaces to "▁" without splitting, so train the same way.
    Unused ids are filled with ``<unusedN>`` (as real Gemma vocabularies do) so every id the
    model can emit decodes. ``first_merges`` rank before the learned ones (their results
    must be reserved tokens).
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
    return vocab, [*first_merges, *merges]


def train_byte_level_bpe(reserved: list[str]) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """Vocab of exactly VOCAB_SIZE for GPT-2-style byte-level tokenizers (Qwen): reserved
    tokens, the 256-character byte alphabet, learned merges, ``<unusedN>`` fill."""
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE - len(reserved),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    bpe.train_from_iterator(CORPUS.splitlines(), trainer)
    vocab = {tok: i for i, tok in enumerate(reserved)}
    for tok, _ in sorted(bpe.get_vocab().items(), key=lambda kv: kv[1]):
        vocab.setdefault(tok, len(vocab))
    while len(vocab) < VOCAB_SIZE:
        vocab[f"<unused{len(vocab)}>"] = len(vocab)
    merges = [tuple(m) for m in json.loads(bpe.to_str())["model"]["merges"]]
    return vocab, merges


# --------------------------------------------------------------------------------------------
# The family interface
# --------------------------------------------------------------------------------------------


def hf_messages(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """OpenAI parts -> HF chat-template parts, the same mapping vLLM applies."""
    out = []
    for msg in messages:
        content = msg["content"]
        if isinstance(content, str):
            content = [{"type": "text", "text": content}]
        parts = []
        for part in content:
            kind = part["type"]
            if kind == "text":
                parts.append({"type": "text", "text": part["text"]})
            elif kind == "image_url":
                parts.append({"type": "image"})
            elif kind == "input_audio":
                parts.append({"type": "audio"})
            else:
                raise ValueError(f"unsupported content part {kind!r}")
        out.append({"role": msg["role"], "content": parts})
    return out


class Family:
    """Everything the builder and the HF reference need to know about one model family.

    Subclasses set ``name``, ``bases``, ``variants`` and ``group_prefixes`` and implement
    ``new_model``; the other methods have multimodal defaults (an ``AutoProcessor`` saved
    beside the weights, image cases, chat template rendered by the processor).
    """

    name: str
    bases: dict[str, Base]
    variants: list[Variant]
    # (checkpoint module-name prefix, group), first match wins; everything else is "text".
    group_prefixes: tuple[tuple[str, str], ...] = ()
    # Leaf module names that form a group of their own wherever they sit.
    group_leaves: tuple[tuple[str, str], ...] = ()
    media: tuple[str, ...] = ("image",)  # media kinds of the reference cases
    # Linear modules (transformers' names) that vLLM builds as plain layers: stored packed
    # they are dequantized; quantized in flight they stay unquantized, so an in-flight HF
    # reference has to skip them too.
    vllm_plain_linears: tuple[str, ...] = ()

    # ---------------------------------------------------------------- base checkpoint

    def new_model(self, base: Base) -> tuple[nn.Module, Any, list[int]]:
        """A freshly initialized model, the tokenizer/processor to save beside it and the
        generation EOS ids."""
        raise NotImplementedError

    def adjust_weights(self, model: nn.Module, base: Base) -> None:
        """Family-specific touches after the generic redraw."""

    def after_save(self, base: Base, out: Path, model: nn.Module) -> None:
        """Rewrite the saved files where a fresh save differs from what users have."""

    def save_base(self, base: Base, out: Path) -> None:
        """A bf16 checkpoint directory with tokenizer/processor files, as a user saves one."""
        torch.manual_seed(base.scales.seed)
        model, saver, eos = self.new_model(base)
        redraw_weights(model, base.scales)
        self.adjust_weights(model, base)
        model.generation_config.eos_token_id = eos
        model.to(torch.bfloat16).save_pretrained(out)
        saver.save_pretrained(out)
        self.after_save(base, out, model)

    def media_kinds(self, base: Base) -> tuple[str, ...]:
        return self.media

    # ---------------------------------------------------------------- layout intent

    def module_group(self, name: str) -> str:
        """Coarse component of a Linear module, used to state which parts a variant
        quantizes."""
        if name == "lm_head":
            return "lm_head"
        for prefix, group in self.group_prefixes:
            if name.startswith(prefix):
                return group
        leaves = dict(self.group_leaves)
        return leaves.get(name.rsplit(".", 1)[-1], "text")

    # ---------------------------------------------------------------- reference inputs

    def load_processor(self, ckpt_dir: Path) -> Any:
        """Loaded the way vLLM 0.32 loads it: ``AutoProcessor.from_pretrained(path)`` with no
        ``backend`` kwarg, so image processors are transformers' default (torchvision when
        installed; the PIL backend differs by up to 1/255 per pixel after resizing)."""
        return transformers.AutoProcessor.from_pretrained(ckpt_dir)

    def render_prompt(self, processor: Any, case: dict[str, Any]) -> str:
        return processor.apply_chat_template(
            hf_messages(case["messages"]), add_generation_prompt=True, tokenize=False
        )

    def encode_case(
        self, processor: Any, case: dict[str, Any], ckpt_dir: Path
    ) -> dict[str, torch.Tensor]:
        """Model inputs for one case; chat template rendered, no extra BOS (vLLM adds none:
        templates write BOS themselves, and the processor would prepend a second one)."""
        media: dict[str, Any] = {}
        if case["kind"] == "image":
            # vLLM decodes the data URL with PIL and converts to RGB before the processor.
            media["images"] = [Image.open(ckpt_dir / case["media_file"]).convert("RGB")]
        elif case["kind"] == "audio":
            media["audio"] = [read_wav(ckpt_dir / case["media_file"])]
        text = self.render_prompt(processor, case)
        return dict(processor(text=text, add_special_tokens=False, return_tensors="pt", **media))


def rewrite_checkpoint_keys(
    out: Path, prefixes: tuple[tuple[str, str], ...], model: nn.Module
) -> None:
    """Rename every tensor of a saved checkpoint by its prefix (first match; every key must
    match one), then reload it with transformers and check that it holds ``model``'s tensors."""
    from safetensors.torch import load_file, save_file

    def renamed(key: str) -> str:
        for old, new in prefixes:
            if key.startswith(old):
                return new + key.removeprefix(old)
        raise KeyError(f"{key}: no layout prefix matches")

    index = out / "model.safetensors.index.json"
    if index.exists():
        data = json.loads(index.read_text())
        data["weight_map"] = {renamed(k): v for k, v in data["weight_map"].items()}
        index.write_text(json.dumps(data, indent=2))
    for file in sorted(out.glob("*.safetensors")):
        tensors = {renamed(k): v for k, v in load_file(file).items()}
        save_file(tensors, file, metadata={"format": "pt"})
    reloaded = type(model).from_pretrained(out, dtype=torch.bfloat16).state_dict()
    expected = model.state_dict()
    differ = [k for k in expected if not torch.equal(reloaded[k], expected[k])]
    if differ or reloaded.keys() != expected.keys():
        raise AssertionError(f"{out}: rewritten checkpoint reloads differently: {differ[:5]}")
