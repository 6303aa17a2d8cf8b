"""Loading for MoE models: the loader's routing wrapper under every weight-loader call
form vLLM uses, with real bitsandbytes files."""

from __future__ import annotations

import torch
from bitsandbytes import functional as bnbf
from torch import nn
from vllm.config.load import LoadConfig

from bnb_files import packed_4bit_tensors, write
from vllm_bnb_mm.checkpoint import scan_checkpoint
from vllm_bnb_mm.loader import BnbModelLoader


def _w(rows=64, cols=128, seed=0):
    return torch.randn(rows, cols, generator=torch.Generator().manual_seed(seed)) * 0.1


class CallFormsModel(nn.Module):
    """One plain parameter per weight-loader call form found in vLLM 0.32:
    `default_weight_loader(param, w)`, linear layers' `(param, w, shard_id)`, and the
    MoE expert loader, called by keyword and answering `return_success`."""

    def __init__(self) -> None:
        super().__init__()
        for name in ("plain", "sharded", "expert"):
            self.register_parameter(name, nn.Parameter(torch.zeros(64, 128), requires_grad=False))
        self.sharded.weight_loader = self._sharded_loader
        self.expert.weight_loader = self._expert_loader
        self.successes: list[bool] = []

    @staticmethod
    def _sharded_loader(param, loaded_weight, loaded_shard_id=None):
        assert loaded_shard_id == 1
        param.data.copy_(loaded_weight)

    @staticmethod
    def _expert_loader(param, loaded_weight, weight_name, shard_id, expert_id,
                       return_success=False):
        assert (weight_name, shard_id, expert_id) == ("experts.w13_weight", "w1", 3)
        param.data.copy_(loaded_weight)
        return True if return_success else None

    def load_weights(self, weights):
        for name, tensor in weights:
            if name == "plain.weight":
                self.plain.weight_loader(self.plain, tensor)
            elif name == "sharded.weight":
                self.sharded.weight_loader(self.sharded, tensor, 1)
            else:
                self.successes.append(self.expert.weight_loader(
                    param=self.expert, loaded_weight=tensor, weight_name="experts.w13_weight",
                    shard_id="w1", expert_id=3, return_success=True,
                ))
        return {"plain", "sharded", "expert"}


def test_packed_tensors_are_routed_in_every_weight_loader_call_form(tmp_path):
    weights = {name: _w(seed=i) for i, name in enumerate(("plain", "sharded", "expert"))}
    tensors = {}
    for name, w in weights.items():
        tensors.update(packed_4bit_tensors(name, w))
    path = write(tmp_path / "m.safetensors", tensors)
    loader = BnbModelLoader(LoadConfig(load_format="bitsandbytes"))
    loader._layout = scan_checkpoint([path])
    model = CallFormsModel()
    loader.load_weights(model, None)
    for name, w in weights.items():
        _, state = bnbf.quantize_4bit(w, quant_type="nf4", compress_statistics=True)
        expected = bnbf.dequantize_4bit(tensors[f"{name}.weight"], state)
        torch.testing.assert_close(getattr(model, name).data, expected, rtol=0, atol=1e-6)
    assert model.successes == [True]  # the wrapped loader's answer comes back
