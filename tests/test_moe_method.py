"""The BnB MoE method on the CPU, loaded through the real loader from real bitsandbytes
files, against experts computed from bitsandbytes' own dequantization of the same
quantization: per-expert packed checkpoints (nf4 + double quant, fp4, int8), in-flight
quantization of plain experts, tensor- and expert-parallel shards, the CUDA path's
expert gathering (its Triton call replaced by a reference), memory, and bad input."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from bitsandbytes import functional as bnbf
from torch import nn
from vllm.config.load import LoadConfig
from vllm.model_executor.layers.fused_moe.activation import MoEActivation

import vllm_bnb_mm.moe as moe
from bnb_files import packed_4bit_tensors, packed_8bit_tensors, write
from vllm_bnb_mm.checkpoint import CheckpointError, scan_checkpoint
from vllm_bnb_mm.config import BnbConfig
from vllm_bnb_mm.loader import BnbModelLoader

EXPERTS, HIDDEN, INTER, TOP_K, TOKENS = 6, 128, 128, 2, 9
PROJECTIONS = {"gate_proj": "w1", "up_proj": "w3", "down_proj": "w2"}


def _weights(seed=0) -> dict[str, torch.Tensor]:
    """Checkpoint name -> plain weight, HF's per-expert layout."""
    gen = torch.Generator().manual_seed(seed)
    out = {}
    for e in range(EXPERTS):
        for name in PROJECTIONS:
            shape = (HIDDEN, INTER) if name == "down_proj" else (INTER, HIDDEN)
            out[f"experts.{e}.{name}"] = torch.randn(shape, generator=gen) / HIDDEN**0.5
    return out


class FakeExperts(nn.Module):
    """What the method uses of vLLM's RoutedExperts, for one TP/EP rank."""

    def __init__(self, method, dtype, local_experts=EXPERTS, inter=INTER, expert_map=None):
        super().__init__()
        self.quant_method = method
        self.activation = MoEActivation.SILU
        self.apply_router_weight_on_input = False
        self.global_num_experts = EXPERTS
        self.expert_map = expert_map
        self.ckpt_gate_proj_name, self.ckpt_up_proj_name = "gate_proj", "up_proj"
        self.ckpt_down_proj_name = "down_proj"
        method.create_weights(self, local_experts, HIDDEN, inter, dtype)

    def _map_global_expert_id_to_local_expert_id(self, expert_id: int) -> int:
        return expert_id if self.expert_map is None else int(self.expert_map[expert_id])


class MoEModel(nn.Module):
    """Hands each checkpoint tensor to the experts' weight loader by keyword, as vLLM's
    RoutedExperts.load_weights does."""

    def __init__(self, experts: FakeExperts) -> None:
        super().__init__()
        self.experts = experts

    def load_weights(self, weights):
        for name, tensor in weights:
            _, expert, proj, _ = name.split(".")
            shard = PROJECTIONS[proj]
            param = self.experts.w2_weight if shard == "w2" else self.experts.w13_weight
            param.weight_loader(
                param=param, loaded_weight=tensor, weight_name=f"experts.{shard}",
                shard_id=shard, expert_id=int(expert), return_success=True,
            )
        return None


def _moe_config(dtype, tp_rank=0, tp_size=1):
    return SimpleNamespace(
        is_act_and_mul=True, has_bias=False, tp_shard_with_padding=False,
        tp_rank=tp_rank, tp_size=tp_size, in_dtype=dtype,
    )


def _load(tmp_path, tensors, kind, dtype, tp_rank=0, tp_size=1, expert_map=None,
          local_experts=EXPERTS, config=None):
    path = write(tmp_path / f"experts-{tp_rank}.safetensors", tensors)
    config = config or BnbConfig(load_in_8bit=kind == "8bit")
    method = moe.BnbMoEMethod(config, kind, _moe_config(dtype, tp_rank, tp_size), "l.experts")
    layer = FakeExperts(method, dtype, local_experts, INTER // tp_size, expert_map)
    loader = BnbModelLoader(LoadConfig(load_format="bitsandbytes"))
    loader._layout = scan_checkpoint([path])
    loader.load_weights(MoEModel(layer), None)
    method.process_weights_after_loading(layer)
    return layer


def _routing(dtype, seed=1):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(TOKENS, HIDDEN, generator=gen).to(dtype)
    ids = torch.stack([torch.randperm(EXPERTS, generator=gen)[:TOP_K] for _ in range(TOKENS)])
    weights = torch.rand(TOKENS, TOP_K, generator=gen).softmax(-1)
    return x, weights, ids.int()


def _reference(x, weights, ids, dequantized: dict[str, torch.Tensor]) -> torch.Tensor:
    """Float64 experts from the dequantized weights, summed over each token's top-k."""
    out = torch.zeros(x.shape, dtype=torch.float64)
    xd = x.double()
    for t in range(x.shape[0]):
        for k in range(ids.shape[1]):
            e = int(ids[t, k])
            w = {p: dequantized[f"experts.{e}.{p}"].double() for p in PROJECTIONS}
            h = F.silu(xd[t] @ w["gate_proj"].T) * (xd[t] @ w["up_proj"].T)
            out[t] += weights[t, k].double() * (h @ w["down_proj"].T)
    return out


def _dequantized_4bit(weights, tensors, quant_type, double_quant):
    out = {}
    for name, w in weights.items():
        _, state = bnbf.quantize_4bit(
            w, quant_type=quant_type, compress_statistics=double_quant
        )
        out[name] = bnbf.dequantize_4bit(tensors[f"{name}.weight"], state)
    return out


def _in_flight_4bit(weights):
    out = {}
    for name, w in weights.items():
        packed, state = bnbf.quantize_4bit(
            w.contiguous(), blocksize=64, quant_type="nf4", compress_statistics=False
        )
        state.dtype = torch.float32  # dequantize to float32, not to the bf16 input's dtype
        out[name] = bnbf.dequantize_4bit(packed, state)
    return out


def _dequantized_8bit(weights):
    out = {}
    for name, w in weights.items():
        cb, scb, _ = bnbf.int8_vectorwise_quant(w.to(torch.float16))
        out[name] = bnbf.int8_vectorwise_dequant(cb, scb)
    return out


def _bf16(weights):
    # transformers 5 checkpoints store unquantized experts in bf16
    return {name: w.to(torch.bfloat16) for name, w in weights.items()}


def _packed_4bit(weights, quant_type, double_quant):
    tensors = {}
    for name, w in weights.items():
        tensors.update(packed_4bit_tensors(name, w, quant_type, double_quant))
    return tensors


def _packed_8bit(weights):
    tensors = {}
    for name, w in weights.items():
        tensors.update(packed_8bit_tensors(name, w))
    return tensors


# bf16 runs bitsandbytes' AVX512-BF16 kernel (bf16 products); float32 dequantizes.
TOLERANCE = {torch.float32: 1e-4, torch.bfloat16: 3e-2}
CASES = {
    "nf4-dq": ("4bit", lambda w: _packed_4bit(w, "nf4", True),
               lambda w, t: _dequantized_4bit(w, t, "nf4", True)),
    "fp4": ("4bit", lambda w: _packed_4bit(w, "fp4", False),
            lambda w, t: _dequantized_4bit(w, t, "fp4", False)),
    "nf4-in-flight": ("4bit", lambda w: {f"{n}.weight": v for n, v in _bf16(w).items()},
                      lambda w, t: _in_flight_4bit(_bf16(w))),
    "int8": ("8bit", _packed_8bit, lambda w, t: _dequantized_8bit(w)),
    "int8-in-flight": ("8bit", lambda w: {f"{n}.weight": v for n, v in w.items()},
                       lambda w, t: _dequantized_8bit(w)),
}


def _max_error(got: torch.Tensor, expected: torch.Tensor) -> float:
    return float((got.double() - expected).abs().max() / expected.abs().max())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("case", list(CASES))
def test_routed_experts_equal_dequantized_reference(tmp_path, case, dtype):
    kind, make_tensors, dequantize = CASES[case]
    weights = _weights()
    tensors = make_tensors(weights)
    layer = _load(tmp_path, tensors, kind, dtype)
    x, topk_weights, ids = _routing(dtype)
    got = moe._forward_routed_loop(layer, x, topk_weights, ids)
    expected = _reference(x, topk_weights, ids, dequantize(weights, tensors))
    assert got.dtype == dtype
    assert _max_error(got, expected) < TOLERANCE[dtype]
    # and the experts really are the quantized ones: plain weights are measurably off
    assert _max_error(got, _reference(x, topk_weights, ids, weights)) > TOLERANCE[torch.float32]


def test_cpu_kernel_is_used_for_bf16_and_dequantize_for_float32(tmp_path):
    tensors = _packed_4bit(_weights(), "nf4", True)
    bf16 = _load(tmp_path, tensors, "4bit", torch.bfloat16)
    fp32 = _load(tmp_path, tensors, "4bit", torch.float32)
    if bnbf.has_avx512bf16():
        assert bf16.bnb_w13_state.packing_format_for_cpu
        assert bf16.w13_weight.shape == (EXPERTS, 2 * INTER, HIDDEN // 2)
    assert not getattr(fp32.bnb_w13_state, "packing_format_for_cpu", False)


def test_packed_experts_keep_a_quarter_of_bf16_memory(tmp_path):
    layer = _load(tmp_path, _packed_4bit(_weights(), "nf4", True), "4bit", torch.bfloat16)
    held = sum(t.numel() * t.element_size() for t in [*layer.parameters(), *layer.buffers()])
    bf16 = EXPERTS * 3 * INTER * HIDDEN * 2
    # 4 bits per weight plus one block scale per 64 weights
    assert 0.24 < held / bf16 < 0.3, held / bf16


@pytest.mark.parametrize("case", ["nf4-dq", "nf4-in-flight", "int8"])
def test_tensor_parallel_shards_sum_to_the_whole(tmp_path, case):
    kind, make_tensors, _ = CASES[case]
    tensors = make_tensors(_weights())
    dtype = torch.float32
    x, topk_weights, ids = _routing(dtype)
    whole = moe._forward_routed_loop(_load(tmp_path, tensors, kind, dtype), x, topk_weights, ids)
    parts = [
        moe._forward_routed_loop(
            _load(tmp_path, tensors, kind, dtype, tp_rank=r, tp_size=2), x, topk_weights, ids
        )
        for r in range(2)
    ]
    torch.testing.assert_close(parts[0] + parts[1], whole, rtol=1e-5, atol=1e-5)


def test_expert_parallel_ranks_hold_their_experts_only(tmp_path):
    tensors = _packed_4bit(_weights(), "nf4", True)
    dtype = torch.float32
    x, topk_weights, ids = _routing(dtype)
    whole = moe._forward_routed_loop(_load(tmp_path, tensors, "4bit", dtype), x, topk_weights, ids)
    half = EXPERTS // 2
    parts = []
    for r in range(2):
        expert_map = torch.full((EXPERTS,), -1, dtype=torch.int32)
        expert_map[r * half : (r + 1) * half] = torch.arange(half, dtype=torch.int32)
        layer = _load(tmp_path, tensors, "4bit", dtype, expert_map=expert_map,
                      local_experts=half)
        parts.append(moe._forward_routed_loop(layer, x, topk_weights, ids))
    torch.testing.assert_close(parts[0] + parts[1], whole, rtol=1e-5, atol=1e-5)


def _triton_stand_in(x, w1, w2, topk_weights, topk_ids, activation, apply_router_weight_on_input,
                     global_num_experts, expert_map=None, quant_config=None):
    """vLLM's fused_experts semantics in plain torch (no Triton on this CPU)."""
    assert quant_config is None and not apply_router_weight_on_input
    ids = topk_ids.long() if expert_map is None else expert_map[topk_ids.long()].long()
    out = torch.zeros(x.shape, dtype=torch.float64)
    for t in range(x.shape[0]):
        for k in range(ids.shape[1]):
            e = int(ids[t, k])
            if e < 0:
                continue
            gate, up = (x[t].double() @ w1[e].double().T).chunk(2)
            out[t] += topk_weights[t, k].double() * ((F.silu(gate) * up) @ w2[e].double().T)
    return out.to(x.dtype)


@pytest.mark.parametrize("tokens", [2, TOKENS], ids=["gathered-experts", "all-experts"])
def test_cuda_path_gathers_and_dequantizes_the_routed_experts(tmp_path, monkeypatch, tokens):
    import vllm.model_executor.layers.fused_moe as fused_moe

    monkeypatch.setattr(fused_moe, "fused_experts", _triton_stand_in, raising=False)
    layer = _load(tmp_path, _packed_4bit(_weights(), "nf4", True), "4bit", torch.float32)
    x, topk_weights, ids = _routing(torch.float32)
    x, topk_weights, ids = x[:tokens], topk_weights[:tokens], ids[:tokens]
    assert (ids.numel() < EXPERTS) == (tokens == 2)  # the two branches
    got = moe._forward_fused(layer, x, topk_weights, ids)
    expected = moe._forward_routed_loop(layer, x, topk_weights, ids)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_missing_expert_projection_is_an_error(tmp_path):
    tensors = _packed_4bit(_weights(), "nf4", True)
    tensors = {k: v for k, v in tensors.items() if not k.startswith("experts.3.up_proj.")}
    with pytest.raises(ValueError, match=r"expert 3 up_proj \(w3\)"):
        _load(tmp_path, tensors, "4bit", torch.float32)


def test_wrong_shape_names_tensor_and_file(tmp_path):
    weights = _weights()
    weights["experts.2.down_proj"] = weights["experts.2.down_proj"][:, :64]
    with pytest.raises(CheckpointError, match=r"experts\.2\.down_proj\.weight.*needs \[128, 128\]"):
        _load(tmp_path, _packed_4bit(weights, "nf4", True), "4bit", torch.float32)


def test_packed_4bit_expert_in_an_8bit_layer_is_an_error(tmp_path):
    tensors = _packed_4bit(_weights(), "nf4", True)
    with pytest.raises(CheckpointError, match="is 4bit but expert 0"):
        _load(tmp_path, tensors, "8bit", torch.float32)
