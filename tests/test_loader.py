"""The loader's routing and accounting on a small model, with real bitsandbytes files."""

from __future__ import annotations

import pytest
import torch
from bitsandbytes import functional as bnbf
from torch import nn
from vllm.config.load import LoadConfig

from bnb_files import packed_4bit_tensors, packed_8bit_tensors, write
from vllm_bnb_mm.checkpoint import CheckpointError, scan_checkpoint
from vllm_bnb_mm.loader import BnbModelLoader


class PlainModel(nn.Module):
    """Plain parameters only (like vLLM's lm_head / embeddings), loaded by name."""

    def __init__(self, names_shapes: dict[str, tuple[int, int]]) -> None:
        super().__init__()
        self.names = list(names_shapes)
        for name, shape in names_shapes.items():
            self.register_parameter(name, nn.Parameter(torch.zeros(shape), requires_grad=False))

    def load_weights(self, weights):
        loaded = set()
        params = dict(self.named_parameters())
        for name, tensor in weights:
            key = name.removesuffix(".weight")
            if key in params:
                params[key].weight_loader(params[key], tensor)
                loaded.add(key)
        return loaded


def _loader(path: str) -> BnbModelLoader:
    loader = BnbModelLoader(LoadConfig(load_format="bitsandbytes"))
    loader._layout = scan_checkpoint([path])
    return loader


def _w(rows=64, cols=128, seed=0):
    return torch.randn(rows, cols, generator=torch.Generator().manual_seed(seed)) * 0.1


def test_packed_weights_for_plain_parameters_are_dequantized(tmp_path):
    w4, w8 = _w(), _w(seed=1)
    tensors = {**packed_4bit_tensors("head", w4), **packed_8bit_tensors("embed", w8)}
    path = write(tmp_path / "m.safetensors", tensors)
    model = PlainModel({"head": (64, 128), "embed": (64, 128)})
    _loader(path).load_weights(model, None)
    _, state = bnbf.quantize_4bit(w4, quant_type="nf4", compress_statistics=True)
    expected4 = bnbf.dequantize_4bit(tensors["head.weight"], state)
    expected8 = bnbf.int8_vectorwise_dequant(tensors["embed.weight"], tensors["embed.SCB"])
    torch.testing.assert_close(model.head, expected4, rtol=0, atol=1e-6)
    torch.testing.assert_close(model.embed, expected8, rtol=0, atol=1e-6)
    assert not hasattr(model.head, "weight_loader")  # routing wrappers are removed


def test_adjust_hook_runs_after_grouping_and_before_binding(tmp_path):
    tensors = packed_4bit_tensors("head", _w())
    path = write(tmp_path / "m.safetensors", tensors)
    model = PlainModel({"head": (64, 128)})
    seen = {}

    def adjust(states):
        seen.update(states)
        state = states["head.weight"]
        state.absmax = state.absmax * 2  # visible in the loaded weight if applied
        return states

    model.adjust_bnb_quant_state_dict = adjust
    _loader(path).load_weights(model, None)
    assert list(seen) == ["head.weight"] and not seen["head.weight"].nested
    plain = PlainModel({"head": (64, 128)})
    _loader(path).load_weights(plain, None)
    torch.testing.assert_close(model.head, plain.head * 2, rtol=0, atol=1e-6)


def test_uninitialized_parameter_is_an_error(tmp_path):
    path = write(tmp_path / "m.safetensors", packed_4bit_tensors("head", _w()))
    model = PlainModel({"head": (64, 128), "missing": (4, 4)})
    with pytest.raises(CheckpointError, match="missing"):
        _loader(path).load_weights(model, None)
