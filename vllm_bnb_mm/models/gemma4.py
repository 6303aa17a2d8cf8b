"""Gemma 4 adapter.

vLLM's Gemma 4 encoder-CUDA-graph path casts the pooled vision features to
`embed_vision.embedding_projection.weight.dtype` before projecting them. Under BnB
that weight is packed uint8, so the cast destroys the image features (a red and a
blue image then give the same answer). The projection must see the compute dtype.
"""

from __future__ import annotations

import functools
from types import SimpleNamespace

import torch

MODEL_CLASSES = {
    "vllm.model_executor.models.gemma4_mm": ["Gemma4ForConditionalGeneration"],
}


def adapt(cls: type) -> None:
    cls.encoder_cudagraph_forward = _with_float_projection_dtype(cls.encoder_cudagraph_forward)


class _EmbedderWithComputeDtype:
    """Stands in for `embed_vision` during one call: forwards calls and attributes to
    the real embedder but reports the compute dtype as the projection's weight dtype."""

    def __init__(self, embedder: torch.nn.Module, dtype: torch.dtype) -> None:
        self._embedder = embedder
        self.embedding_projection = SimpleNamespace(weight=SimpleNamespace(dtype=dtype))

    def __call__(self, *args, **kwargs):
        return self._embedder(*args, **kwargs)

    def __getattr__(self, name: str):
        return getattr(self._embedder, name)


def _with_float_projection_dtype(forward):
    @functools.wraps(forward)
    def encoder_cudagraph_forward(self, *args, **kwargs):
        embedder = self.embed_vision
        weight_dtype = embedder.embedding_projection.weight.dtype
        if weight_dtype.is_floating_point:
            return forward(self, *args, **kwargs)
        # Shadow the submodule in the instance dict for this call only.
        self.__dict__["embed_vision"] = _EmbedderWithComputeDtype(embedder, self.model_dtype)
        try:
            return forward(self, *args, **kwargs)
        finally:
            del self.__dict__["embed_vision"]

    return encoder_cudagraph_forward
