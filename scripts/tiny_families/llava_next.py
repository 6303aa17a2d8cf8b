"""LLaVA-NeXT (``LlavaNextForConditionalGeneration``): LLaVA with "anyres" tiling (the image is
cut into CLIP-sized crops on the best-fitting grid, plus a downscaled base image) and a learned
``image_newline`` parameter closing each row of crop features. Same CLIP tower (read at layer
-2, so vLLM leaves its last layer unbuilt), projector and text model as LLaVA 1.5; saved in
the transformers 4.52+ layout, ``image_newline`` as ``model.image_newline``."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from torch import nn
from transformers import (
    LlavaNextConfig,
    LlavaNextForConditionalGeneration,
    LlavaNextImageProcessor,
    LlavaNextProcessor,
)

from .common import NF4_DQ, Base, Family, Variant, rewrite_checkpoint_keys
from .llava import (
    CHAT_TEMPLATE,
    IMAGE_SIZE,
    IMAGE_TOKEN,
    NEW_LAYOUT,
    PATCH_SIZE,
    scales,
    text_config,
    tokenizer,
    vision_config,
)

# The 64x48 test image fits the 64x64 grid best: four 32x32 crops plus the base image.
GRID_PINPOINTS = [[IMAGE_SIZE, 2 * IMAGE_SIZE], [2 * IMAGE_SIZE, IMAGE_SIZE],
                  [2 * IMAGE_SIZE, 2 * IMAGE_SIZE]]
LAYOUT = (*NEW_LAYOUT, ("image_newline", "model.image_newline"))


def _check_newline_and_last_layer(header: dict, packed: dict, config: dict) -> None:
    if header.get("model.image_newline", {}).get("dtype") != "BF16":
        raise AssertionError("model.image_newline should be stored as a bf16 parameter")
    if "model.vision_tower.vision_model.encoder.layers.1.mlp.fc1" not in packed:
        raise AssertionError("the last tower layer (unbuilt by vLLM) should be stored 4-bit")


class LlavaNext(Family):
    name = "llava_next"
    group_prefixes = (
        ("model.vision_tower.", "vision_tower"),
        ("model.multi_modal_projector.", "projector"),
    )
    bases = {"llava_next": Base("llava_next", scales(3101))}
    variants = [
        Variant(
            "llava_next-nf4-dq",
            "llava_next",
            NF4_DQ,
            ("vision_tower", "projector", "text"),
            "default BnB: anyres tiling, image_newline, CLIP tower (unbuilt last layer too) 4-bit",
            _check_newline_and_last_layer,
        ),
    ]

    def new_model(self, base: Base) -> tuple[nn.Module, Any, list[int]]:
        tok = tokenizer()
        config = LlavaNextConfig(
            vision_config=vision_config(),
            text_config=text_config(tok),
            image_token_id=tok.convert_tokens_to_ids(IMAGE_TOKEN),
            image_grid_pinpoints=GRID_PINPOINTS,
            vision_feature_layer=-2,
            vision_feature_select_strategy="default",
            tie_word_embeddings=False,
        )
        processor = LlavaNextProcessor(
            image_processor=LlavaNextImageProcessor(
                size={"shortest_edge": IMAGE_SIZE},
                crop_size={"height": IMAGE_SIZE, "width": IMAGE_SIZE},
                image_grid_pinpoints=GRID_PINPOINTS,
            ),
            tokenizer=tok,
            patch_size=PATCH_SIZE,
            vision_feature_select_strategy="default",
            chat_template=CHAT_TEMPLATE,
            num_additional_image_tokens=1,
        )
        return LlavaNextForConditionalGeneration(config), processor, [tok.eos_token_id]

    def after_save(self, base: Base, out: Path, model: nn.Module) -> None:
        rewrite_checkpoint_keys(out, LAYOUT, model)


LLAVA_NEXT = LlavaNext()
