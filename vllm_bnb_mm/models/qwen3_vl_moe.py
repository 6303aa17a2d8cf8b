"""Qwen3-VL-MoE adapter.

The hub checkpoints store the fused experts as `experts.gate_up_proj` [E, hidden, 2 *
moe_intermediate] and `experts.down_proj` [E, moe_intermediate, hidden], and vLLM's
loader transposes them (`is_fused_checkpoint_transposed`). transformers 5 holds them the
other way round in memory and writes them so: a bitsandbytes checkpoint quantized with
transformers 5 (the experts stay bf16; measured with 5.19, also when the source was in the
hub layout) has [E, 2I, H] and [E, H, I], and vLLM then fails on a size mismatch. Tensors
whose shape shows that orientation are handed over transposed (a view); where the shape
cannot tell (2I == H, or I == H) nothing is changed.
"""

from __future__ import annotations

import functools
from collections.abc import Iterable, Iterator

import torch

MODEL_CLASSES = {
    "vllm.model_executor.models.qwen3_vl_moe": ["Qwen3VLMoeForConditionalGeneration"],
}


def adapt(cls: type) -> None:
    cls.load_weights = _with_hub_expert_layout(cls.load_weights)


def _with_hub_expert_layout(load_weights):
    @functools.wraps(load_weights)
    def wrapped(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        text = self.config.text_config
        return load_weights(
            self, in_hub_expert_layout(weights, text.hidden_size, text.moe_intermediate_size)
        )

    return wrapped


def in_hub_expert_layout(
    weights: Iterable[tuple[str, torch.Tensor]], hidden: int, intermediate: int
) -> Iterator[tuple[str, torch.Tensor]]:
    """`weights` with fused expert tensors in transformers 5's orientation transposed to
    the hub's ([E, H, 2I] and [E, I, H])."""
    memory_shapes = {
        "experts.gate_up_proj": (2 * intermediate, hidden),
        "experts.down_proj": (hidden, intermediate),
    }
    for name, tensor in weights:
        for suffix, shape in memory_shapes.items():
            if (
                name.endswith(suffix) and tensor.dim() == 3
                and tuple(tensor.shape[1:]) == shape and shape[0] != shape[1]
            ):
                tensor = tensor.transpose(1, 2)
        yield name, tensor
