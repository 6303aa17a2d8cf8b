"""vLLM linear layers with the BnB method, loaded from real bitsandbytes files.

Every layer kind (qkv, merged gate/up, column, row, replicated) and quant type is
checked against bitsandbytes computing each checkpoint shard on its own, as
transformers' Linear4bit / Linear8bitLt do; then the same layers are built as two
tensor-parallel ranks and their outputs reassembled must equal the unsharded output.
"""

from __future__ import annotations

import os

import bitsandbytes as bnb
import pytest
import torch
import vllm.model_executor.layers.linear as vllm_linear
from bitsandbytes import functional as bnbf
from vllm.config import VllmConfig, set_current_vllm_config
from vllm.model_executor.layers.linear import (
    ColumnParallelLinear,
    MergedColumnParallelLinear,
    QKVParallelLinear,
    ReplicatedLinear,
    RowParallelLinear,
)

from bnb_files import packed_4bit_tensors, packed_8bit_tensors, write
from vllm_bnb_mm import cpu, linear
from vllm_bnb_mm.checkpoint import FileReader, scan_checkpoint
from vllm_bnb_mm.config import BnbConfig
from vllm_bnb_mm.loader import checkpoint_weights, parse_quant_states
from vllm_bnb_mm.registry import PACKED

HIDDEN, HEAD, HEADS, KV_HEADS, INTER = 128, 32, 4, 2, 256

QUANTS = {
    "nf4-dq": dict(kind="4bit", quant_type="nf4", double_quant=True),
    "fp4": dict(kind="4bit", quant_type="fp4", double_quant=False),
    "int8": dict(kind="8bit"),
}

# layer kind -> (constructor, [(checkpoint name, shard id, out, in)])
LAYERS = {
    "qkv": (
        lambda cfg: QKVParallelLinear(HIDDEN, HEAD, HEADS, KV_HEADS, bias=False,
                                      quant_config=cfg, prefix="l.qkv_proj"),
        [("q", "q", HEADS * HEAD, HIDDEN), ("k", "k", KV_HEADS * HEAD, HIDDEN),
         ("v", "v", KV_HEADS * HEAD, HIDDEN)],
    ),
    "gate_up": (
        lambda cfg: MergedColumnParallelLinear(HIDDEN, [INTER, INTER], bias=False,
                                               quant_config=cfg, prefix="l.gate_up_proj"),
        [("gate", 0, INTER, HIDDEN), ("up", 1, INTER, HIDDEN)],
    ),
    "column": (
        lambda cfg: ColumnParallelLinear(HIDDEN, INTER, bias=False, quant_config=cfg,
                                         prefix="l.col"),
        [("col", None, INTER, HIDDEN)],
    ),
    "row": (
        lambda cfg: RowParallelLinear(INTER, HIDDEN, bias=False, quant_config=cfg,
                                      prefix="l.down_proj"),
        [("down", None, HIDDEN, INTER)],
    ),
    "replicated": (
        lambda cfg: ReplicatedLinear(HIDDEN, HIDDEN, bias=False, quant_config=cfg,
                                     prefix="l.rep"),
        [("rep", None, HIDDEN, HIDDEN)],
    ),
}


@pytest.fixture(scope="module", autouse=True)
def single_process_group():
    from vllm.distributed import (
        ensure_model_parallel_initialized,
        init_distributed_environment,
    )

    port = 29600 + os.getpid() % 1000
    with set_current_vllm_config(VllmConfig()):
        init_distributed_environment(
            world_size=1, rank=0, local_rank=0,
            distributed_init_method=f"tcp://127.0.0.1:{port}", backend="gloo",
        )
        ensure_model_parallel_initialized(1, 1)
        yield


def _checkpoint(tmp_path, quant, shards):
    g = torch.Generator().manual_seed(7)
    weights = {name: torch.randn(o, i, generator=g) * 0.05 for name, _, o, i in shards}
    tensors = {}
    for name, w in weights.items():
        if quant["kind"] == "4bit":
            tensors |= packed_4bit_tensors(name, w, quant["quant_type"], quant["double_quant"])
        else:
            tensors |= packed_8bit_tensors(name, w)
    return write(tmp_path / "ckpt.safetensors", tensors), tensors


def _build_and_load(make, shards, path, quant, tp=(0, 1), monkeypatch=None):
    if monkeypatch is not None:
        monkeypatch.setattr(vllm_linear, "get_tensor_model_parallel_rank", lambda: tp[0])
        monkeypatch.setattr(vllm_linear, "get_tensor_model_parallel_world_size", lambda: tp[1])
    config = BnbConfig(load_in_8bit=quant["kind"] == "8bit")
    with set_current_vllm_config(VllmConfig()):
        layer = make(config)
    layout = scan_checkpoint([path])
    reader = FileReader()
    PACKED.reset()
    shard_ids = {f"{name}.weight": sid for name, sid, _, _ in shards}
    for name, tensor in checkpoint_weights(layout, parse_quant_states(layout, reader), reader):
        if name in shard_ids:
            sid = shard_ids[name]
            if sid is None:
                layer.weight.weight_loader(layer.weight, tensor)
            else:
                layer.weight.weight_loader(layer.weight, tensor, sid)
    layer.quant_method.process_weights_after_loading(layer)
    return layer


def _bnb_reference(x, tensors, shards, quant):
    """Each checkpoint shard through bitsandbytes on its own, concatenated."""
    outs = []
    for name, _, _, _ in shards:
        packed = tensors[f"{name}.weight"]
        if quant["kind"] == "4bit":
            state = bnbf.QuantState.from_dict(
                {k.removeprefix(f"{name}.weight."): v for k, v in tensors.items()
                 if k.startswith(f"{name}.weight.")},
                device=torch.device("cpu"),
            )
            outs.append(bnb.matmul_4bit(x, packed.t(), quant_state=state))
        else:
            state = bnb.MatmulLtState()
            state.CB, state.SCB = packed, tensors[f"{name}.SCB"]
            state.threshold, state.has_fp16_weights, state.is_training = 6.0, False, False
            outs.append(bnb.matmul(x, packed, state=state).to(x.dtype))
    return torch.cat(outs, dim=-1)


def _forward(layer, x):
    out = layer(x)
    return out[0] if isinstance(out, tuple) else out


@pytest.mark.parametrize("quant_name", list(QUANTS))
@pytest.mark.parametrize("layer_kind", list(LAYERS))
def test_layer_matches_bitsandbytes_per_shard(tmp_path, layer_kind, quant_name):
    quant = QUANTS[quant_name]
    make, shards = LAYERS[layer_kind]
    path, tensors = _checkpoint(tmp_path, quant, shards)
    layer = _build_and_load(make, shards, path, quant)
    x = torch.randn(5, shards[0][3], generator=torch.Generator().manual_seed(1))
    x = x.to(torch.bfloat16)
    got = _forward(layer, x).float()
    expected = _bnb_reference(x, tensors, shards, quant).float()
    torch.testing.assert_close(got, expected, rtol=2e-2, atol=2e-2)


def _reassemble_columns(outs, shards):
    """Per-rank outputs [s0_r, s1_r, …] back into [s0, s1, …] for stacked layers."""
    tp = len(outs)
    pieces, offset = [], 0
    sizes = [o // tp for _, _, o, _ in shards]
    per_rank = [[] for _ in shards]
    for out in outs:
        offset = 0
        for j, size in enumerate(sizes):
            per_rank[j].append(out[..., offset : offset + size])
            offset += size
    for parts in per_rank:
        pieces.append(torch.cat(parts, dim=-1))
    return torch.cat(pieces, dim=-1)


@pytest.mark.parametrize("quant_name", list(QUANTS))
@pytest.mark.parametrize("layer_kind", ["qkv", "gate_up", "column", "row", "replicated"])
def test_two_tensor_parallel_ranks_reassemble_the_unsharded_output(
    tmp_path, monkeypatch, layer_kind, quant_name
):
    quant = QUANTS[quant_name]
    make, shards = LAYERS[layer_kind]
    path, _ = _checkpoint(tmp_path, quant, shards)
    full = _build_and_load(make, shards, path, quant)
    ranks = [_build_and_load(make, shards, path, quant, (r, 2), monkeypatch) for r in (0, 1)]
    if layer_kind != "replicated":  # each rank really holds half of the weight
        assert all(r.weight.numel() * 2 == full.weight.numel() for r in ranks)
    x = torch.randn(3, shards[0][3], generator=torch.Generator().manual_seed(2))
    x = x.to(torch.bfloat16)
    expected = _forward(full, x).float()
    if layer_kind == "row":
        half = x.shape[-1] // 2
        got = sum(_forward(r, x[:, i * half : (i + 1) * half]).float() for i, r in enumerate(ranks))
    elif layer_kind == "replicated":
        got = _forward(ranks[1], x).float()
    else:
        got = _reassemble_columns([_forward(r, x).float() for r in ranks], shards)
    torch.testing.assert_close(got, expected, rtol=2e-2, atol=2e-2)


# ------------------------------------------------------- CPU 4-bit forward: fused vs GEMM

needs_cpu_kernels = pytest.mark.skipif(
    not bnbf.has_avx512bf16() or cpu.kernels() is None,
    reason="bitsandbytes' AVX512-BF16 CPU kernel layout (and our C routines) not available",
)


def _spy_gemm_path(monkeypatch) -> list[int]:
    calls: list[int] = []
    real = linear._dequantize_and_gemm

    def spy(x, weight, state):
        calls.append(x.shape[0])
        return real(x, weight, state)

    monkeypatch.setattr(linear, "_dequantize_and_gemm", spy)
    return calls


@needs_cpu_kernels
@pytest.mark.parametrize("quant_name", ["nf4-dq", "fp4"])
@pytest.mark.parametrize("layer_kind", ["qkv", "gate_up", "row"])
def test_cpu_forward_uses_fused_kernel_for_few_tokens_and_gemm_for_many(
    tmp_path, monkeypatch, layer_kind, quant_name
):
    quant = QUANTS[quant_name]
    make, shards = LAYERS[layer_kind]
    path, tensors = _checkpoint(tmp_path, quant, shards)
    layer = _build_and_load(make, shards, path, quant)
    assert layer.bnb_parts[0][2].packing_format_for_cpu
    gemm_calls = _spy_gemm_path(monkeypatch)
    threshold = cpu.gemm_min_tokens()
    g = torch.Generator().manual_seed(3)
    for m in (1, threshold - 1, threshold, 2 * threshold + 3):
        x = torch.randn(m, shards[0][3], generator=g).to(torch.bfloat16)
        got = _forward(layer, x).float()
        expected = _bnb_reference(x, tensors, shards, quant).float()
        torch.testing.assert_close(got, expected, rtol=2e-2, atol=2e-2)
    assert gemm_calls == [threshold, 2 * threshold + 3]


@needs_cpu_kernels
def test_gemm_path_dequantizes_in_bounded_blocks(tmp_path, monkeypatch):
    """A weight larger than the scratch buffer is dequantized block by block of rows; the
    buffer never grows past the bound, and the result is the same."""
    quant = QUANTS["nf4-dq"]
    make, shards = LAYERS["gate_up"]
    path, tensors = _checkpoint(tmp_path, quant, shards)
    layer = _build_and_load(make, shards, path, quant)
    monkeypatch.setattr(linear, "SCRATCH_ELEMENTS", 64 * HIDDEN)  # 8 blocks of 64 rows
    monkeypatch.setattr(linear, "_scratch", torch.empty(0, dtype=torch.bfloat16))
    x = torch.randn(40, HIDDEN, generator=torch.Generator().manual_seed(4)).to(torch.bfloat16)
    x = torch.cat([x] * (cpu.gemm_min_tokens() // 40 + 1))
    got = _forward(layer, x).float()
    torch.testing.assert_close(got, _bnb_reference(x, tensors, shards, quant).float(),
                               rtol=2e-2, atol=2e-2)
    assert linear._scratch.numel() == 64 * HIDDEN


@needs_cpu_kernels
def test_without_the_c_routines_every_batch_size_runs_the_fused_kernel(tmp_path, monkeypatch):
    quant = QUANTS["fp4"]
    make, shards = LAYERS["qkv"]
    path, tensors = _checkpoint(tmp_path, quant, shards)
    monkeypatch.setattr(cpu, "kernels", lambda: None)
    layer = _build_and_load(make, shards, path, quant)  # the uint8 tensor-op repack
    assert layer.bnb_parts[0][2].packing_format_for_cpu
    gemm_calls = _spy_gemm_path(monkeypatch)
    x = torch.randn(cpu.gemm_min_tokens() + 1, HIDDEN, generator=torch.Generator().manual_seed(5))
    x = x.to(torch.bfloat16)
    torch.testing.assert_close(_forward(layer, x).float(),
                               _bnb_reference(x, tensors, shards, quant).float(),
                               rtol=2e-2, atol=2e-2)
    assert gemm_calls == []
