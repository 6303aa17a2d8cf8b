"""Loading for MoE models: the loader's routing wrapper under every weight-loader call
form vLLM uses (real bitsandbytes files), and which method each MoE layer gets: routers
plain, experts BnB by their tensors, the config, or the user's `bnb_moe_experts`."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from bitsandbytes import functional as bnbf
from torch import nn
from vllm.config.load import LoadConfig

from bnb_files import packed_4bit_tensors, write
from vllm_bnb_mm.checkpoint import scan_checkpoint
from vllm_bnb_mm.config import BnbConfig
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


def _bare(cls):
    """A layer object of `cls` for get_quant_method, which only asks its class."""
    return cls.__new__(cls)


def _experts_layer():
    from vllm.model_executor.layers.fused_moe import RoutedExperts

    layer = _bare(RoutedExperts)
    layer.__dict__["moe_config"] = SimpleNamespace(has_bias=False, tp_shard_with_padding=False)
    return layer


def test_routers_are_never_quantized_in_flight_and_other_linears_are():
    from vllm.model_executor.layers.fused_moe.router.gate_linear import GateLinear
    from vllm.model_executor.layers.linear import ReplicatedLinear, UnquantizedLinearMethod

    from vllm_bnb_mm.linear import BnbLinearMethod

    config = BnbConfig()  # --quantization bitsandbytes on a plain checkpoint
    router = config.get_quant_method(_bare(GateLinear), "model.layers.0.mlp.gate")
    assert isinstance(router, UnquantizedLinearMethod)
    dense = config.get_quant_method(_bare(ReplicatedLinear), "model.layers.0.mlp.shared")
    assert isinstance(dense, BnbLinearMethod)


def test_a_packed_router_gets_a_plain_parameter_to_be_dequantized_into():
    from vllm.model_executor.layers.fused_moe.router.gate_linear import GateLinear
    from vllm.model_executor.layers.linear import UnquantizedLinearMethod

    config = BnbConfig(pre_quantized=True)
    config.set_module_kinds({"model.layers.0.mlp.gate": "4bit"})
    method = config.get_quant_method(_bare(GateLinear), "model.layers.0.mlp.gate")
    assert isinstance(method, UnquantizedLinearMethod)


def test_experts_follow_their_tensors_then_the_config_then_the_user(monkeypatch):
    from vllm_bnb_mm.moe import BnbMoEMethod

    prefix = "model.layers.0.mlp.experts"
    config = BnbConfig(pre_quantized=True)  # 4-bit checkpoint
    config.set_module_kinds({f"{prefix}.3.up_proj": "8bit", f"{prefix}.3.down_proj": "8bit",
                             "model.layers.1.mlp.experts.0.up_proj": "plain"})
    method = config.get_quant_method(_experts_layer(), prefix)
    assert isinstance(method, BnbMoEMethod) and method.kind == "8bit"  # packed experts
    # transformers 5 layout: experts stored bf16 -> quantized with the config's kind
    method = config.get_quant_method(_experts_layer(), "model.layers.1.mlp.experts")
    assert isinstance(method, BnbMoEMethod) and method.kind == "4bit"
    # the user keeps them unquantized: vLLM's own method (get_quant_method returns None)
    hf_config = SimpleNamespace(bnb_moe_experts="unquantized")
    vllm_config = SimpleNamespace(model_config=SimpleNamespace(hf_config=hf_config))
    monkeypatch.setattr("vllm.config.get_current_vllm_config_or_none", lambda: vllm_config)
    assert config.get_quant_method(_experts_layer(), prefix) is None
    hf_config.bnb_moe_experts = "bf16"
    with pytest.raises(ValueError, match="bnb_moe_experts"):
        config.get_quant_method(_experts_layer(), prefix)
