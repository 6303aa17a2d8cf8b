"""vLLM linear layers with the BnB method, loaded from real bitsandbytes files.

Every layer kind (qkv, merged gate/up, column, row, replicated) and quant type is
checked against bitsandbytes computing each checkpoint shard on its own, as
transformers' Linear4bit / Linear8bitLt do; then the same layers are built as two
tensor-parallel ranks and their outputs reassembled must equal the unsharded output.
"""

from __future__ import annotations

import copy
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
from vllm_bnb_mm import cpu
from vllm_bnb_mm import quant_state as qs
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


def _build_and_load(make, shards, path, quant, tp=(0, 1), monkeypatch=None, finalize=True):
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
    if finalize:
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


# ------------------------------------------------------------ cuts inside quant blocks

# Layers whose two-rank cuts fall inside 64-element blocks: (constructor, shards, the
# layout each rank ends up with). "packed": re-expressed with 32-element blocks, still
# 4-bit; "dequantized": no blocksize fits the cut, the rank computes in the compute dtype.
CUT_LAYERS = {
    # o_proj of 2 heads x 32: each rank takes 32 of every 64-element block (CPU kernel)
    "row-32": (
        lambda cfg: RowParallelLinear(64, 128, bias=False, quant_config=cfg, prefix="l.o_proj"),
        [("o", None, 128, 64)], "packed",
    ),
    # down_proj of 192: 96 columns a rank
    "row-96": (
        lambda cfg: RowParallelLinear(192, 64, bias=False, quant_config=cfg, prefix="l.down"),
        [("down", None, 64, 192)], "packed",
    ),
    # 2 heads x 80: the cut at column 80 is a multiple of 16 only
    "row-80": (
        lambda cfg: RowParallelLinear(160, 96, bias=False, quant_config=cfg, prefix="l.o80"),
        [("o80", None, 96, 160)], "dequantized",
    ),
    # q/k/v of 2 heads x 80 over a 90-wide input: a rank's q rows start at element
    # 80 x 90 = 7200 (32 x 225); rows of 90 are not whole blocks, so on the CPU the rank
    # then computes dequantized (see _finalize_4bit)
    "qkv-80": (
        lambda cfg: QKVParallelLinear(90, 80, 2, 2, bias=False, quant_config=cfg,
                                      prefix="l.qkv80"),
        [("q", "q", 160, 90), ("k", "k", 160, 90), ("v", "v", 160, 90)], "cpu-dequantized",
    ),
    # gate/up of 2 x 162 over 96: a rank's 81 rows start at element 81 x 96 (32 x 243);
    # the unsharded layer's rows of 96 are not whole 64-blocks, which bitsandbytes' CPU
    # kernel mis-indexes (dequantized on the CPU, see _finalize_4bit)
    "gate_up-81": (
        lambda cfg: MergedColumnParallelLinear(96, [162, 162], bias=False, quant_config=cfg,
                                               prefix="l.gate_up81"),
        [("gate", 0, 162, 96), ("up", 1, 162, 96)], "packed",
    ),
    # 80 rows over 90: the rank-1 rows start at element 3600 = 16 x 225
    "column-40": (
        lambda cfg: ColumnParallelLinear(90, 80, bias=False, quant_config=cfg, prefix="l.c40"),
        [("c40", None, 80, 90)], "dequantized",
    ),
}

CUT_QUANTS = {**{k: QUANTS[k] for k in ("nf4-dq", "fp4")}, "in-flight": dict(kind="plain")}


def _cut_checkpoint(tmp_path, quant, shards):
    """Checkpoint tensors and, per shard, the dense weight bitsandbytes computes with
    (blocks over the flattened weight): the packed one dequantized, or for in flight
    the plain one quantized as transformers does (nf4, blocksize 64) and dequantized."""
    g = torch.Generator().manual_seed(11)
    tensors, dense = {}, {}
    for name, _, rows, cols in shards:
        w = torch.randn(rows, cols, generator=g) * 0.05
        if quant["kind"] == "plain":
            tensors[f"{name}.weight"] = w.bfloat16()
            packed, state = bnbf.quantize_4bit(w.bfloat16(), quant_type="nf4")
        else:
            shard = packed_4bit_tensors(name, w, quant["quant_type"], quant["double_quant"])
            tensors |= shard
            packed, state = shard[f"{name}.weight"], bnbf.QuantState.from_dict(
                {k.removeprefix(f"{name}.weight."): v for k, v in shard.items()
                 if k.startswith(f"{name}.weight.")}, device=torch.device("cpu"),
            )
        flat = copy.copy(state)  # blocks over the flattened weight (see qs.dequantize_4bit)
        flat.shape, flat.dtype = torch.Size([rows * cols]), torch.float32
        dense[name] = bnbf.dequantize_4bit(packed.reshape(-1, 1), flat).reshape(rows, cols)
    return write(tmp_path / "ckpt.safetensors", tensors), dense


def _rank_rows(layer, shards, dense, rank, tp):
    """Each shard's rows of this rank, from the dense full weights: what the rank must
    compute with, bit for bit."""
    pieces = []
    for name, _, rows, cols in shards:
        w = dense[name]
        if isinstance(layer, RowParallelLinear):
            step = cols // tp
            pieces.append(w[:, rank * step : (rank + 1) * step])
        else:
            step = rows // tp
            pieces.append(w[rank * step : (rank + 1) * step])
    return torch.cat(pieces)


def _loaded_rows(layer) -> torch.Tensor:
    """The rank's weight as loaded (before the forward's own layout), dequantized."""
    in_features = layer.bnb_in_features
    out = []
    for r in sorted(layer.weight.bnb_regions, key=lambda r: r.start):
        if r.plain is not None:
            out.append(r.plain.float())
            continue
        data = layer.weight.data[r.start * in_features // 2 : r.end * in_features // 2]
        out.append(qs.dequantize_4bit(data, r.state, torch.float32).reshape(-1, in_features))
    return torch.cat(out)


@pytest.mark.parametrize("quant_name", list(CUT_QUANTS))
@pytest.mark.parametrize("layer_kind", list(CUT_LAYERS))
def test_cuts_inside_quant_blocks_give_each_rank_its_exact_slice(
    tmp_path, monkeypatch, layer_kind, quant_name
):
    quant = {**CUT_QUANTS[quant_name], "kind": "4bit"}
    make, shards, layout = CUT_LAYERS[layer_kind]
    path, dense = _cut_checkpoint(tmp_path, CUT_QUANTS[quant_name], shards)
    full = _build_and_load(make, shards, path, quant)
    x = torch.randn(3, shards[0][3], generator=torch.Generator().manual_seed(2))
    expected = _forward(full, x).float()
    outs = []
    for rank in (0, 1):
        layer = _build_and_load(make, shards, path, quant, (rank, 2), monkeypatch,
                                finalize=False)
        assert torch.equal(_loaded_rows(layer), _rank_rows(layer, shards, dense, rank, 2))
        layer.quant_method.process_weights_after_loading(layer)
        dequantized = layout == "dequantized" or (
            layout == "cpu-dequantized" and layer.weight.device.type == "cpu"
        )
        assert (layer.bnb_kind == "dequantized") == dequantized, layer.bnb_kind
        assert dequantized or layer.weight.dtype == torch.uint8
        if layer_kind == "row-32":  # the CPU fused kernel at blocksize 32 where it exists
            assert layer.bnb_parts[0][2].blocksize == 32
        xr = x[:, rank * x.shape[-1] // 2 : (rank + 1) * x.shape[-1] // 2]
        outs.append(_forward(layer, xr if isinstance(layer, RowParallelLinear) else x).float())
    if isinstance(full, RowParallelLinear):
        got = outs[0] + outs[1]
    else:
        got = _reassemble_columns(outs, shards)
    torch.testing.assert_close(got, expected, rtol=2e-2, atol=2e-2)


# ------------------------------------------------------------ fused on disk, with TP

# q/k/v (or gate/up) stored as one tensor (Phi-3's qkv_proj, gate_up_proj): each rank
# takes its rows of every logical shard out of the one packed tensor.
FUSED_ON_DISK = {
    "qkv": (LAYERS["qkv"][0], [("qkv", None, (HEADS + 2 * KV_HEADS) * HEAD, HIDDEN)],
            LAYERS["qkv"][1]),
    "gate_up": (LAYERS["gate_up"][0], [("gate_up", None, 2 * INTER, HIDDEN)],
                LAYERS["gate_up"][1]),
}


@pytest.mark.parametrize("quant_name", list(QUANTS))
@pytest.mark.parametrize("layer_kind", list(FUSED_ON_DISK))
def test_shards_fused_on_disk_split_across_two_ranks(tmp_path, monkeypatch, layer_kind,
                                                     quant_name):
    quant = QUANTS[quant_name]
    make, on_disk, logical = FUSED_ON_DISK[layer_kind]
    path, _ = _checkpoint(tmp_path, quant, on_disk)
    full = _build_and_load(make, on_disk, path, quant)
    ranks = [_build_and_load(make, on_disk, path, quant, (r, 2), monkeypatch) for r in (0, 1)]
    assert all(r.weight.numel() * 2 == full.weight.numel() for r in ranks)
    x = torch.randn(3, HIDDEN, generator=torch.Generator().manual_seed(2)).to(torch.bfloat16)
    got = _reassemble_columns([_forward(r, x).float() for r in ranks], logical)
    torch.testing.assert_close(got, _forward(full, x).float(), rtol=2e-2, atol=2e-2)

# ------------------------------------------ CPU 4-bit forward: fused, our kernels, GEMM

needs_cpu_kernels = pytest.mark.skipif(
    not bnbf.has_avx512bf16() or cpu.kernels() is None,
    reason="bitsandbytes' AVX512-BF16 CPU kernel layout (and our C routines) not available",
)


def _spy_paths(monkeypatch) -> dict[str, list[int]]:
    """Rows of every call that left the fused kernel, by path."""
    calls: dict[str, list[int]] = {"gemm": [], "amx": [], "avx512": []}

    def spy(path, real):
        def call(x, *args):
            calls[path].append(x.shape[0])
            return real(x, *args)
        return call

    monkeypatch.setattr(cpu, "dequantize_and_gemm", spy("gemm", cpu.dequantize_and_gemm))
    monkeypatch.setattr(cpu, "gemm_4bit_amx", spy("amx", cpu.gemm_4bit_amx))
    monkeypatch.setattr(cpu, "gemm_4bit_avx512", spy("avx512", cpu.gemm_4bit_avx512))
    return calls


NO_CALLS = {"gemm": [], "amx": [], "avx512": []}


def _path_boundaries() -> list[int]:
    """Row counts on both sides of every switch between paths."""
    edges = sorted({cpu.GEMM_MIN_TOKENS, cpu.AVX512_GEMM_MIN_TOKENS,
                    cpu.AMX_GEMM_MIN_TOKENS_SMALL_K})
    # 8 / 9: the AVX512-BF16 kernel's one pass of rows, then several; 16 / 17 / 32 / 33:
    # the AMX kernel's one and two tiles of rows (the fused kernel's arithmetic), then its
    # many-row path
    return sorted({1, 8, 9, 16, 17, 32, 33, *edges, *(e - 1 for e in edges),
                   edges[-1] * 2 + 3})


@pytest.fixture(params=[None, "AVX512_CORE_BF16"], ids=["isa-as-is", "isa-no-amx"])
def onednn_cap(request, monkeypatch):
    """The CPU as it is, and capped below AMX (oneDNN and our kernel choice, as on CPUs
    without AMX); the second is the first again where there is no AMX."""
    if request.param is None:
        monkeypatch.delenv("ONEDNN_MAX_CPU_ISA", raising=False)
    else:
        if not cpu.amx_usable():
            pytest.skip("no AMX here: the CPU as it is runs the AVX512-BF16 kernel already")
        monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", request.param)
    monkeypatch.delenv("DNNL_MAX_CPU_ISA", raising=False)
    cpu.amx_usable.cache_clear()
    yield request.param
    cpu.amx_usable.cache_clear()


@needs_cpu_kernels
@pytest.mark.parametrize("quant_name", ["nf4-dq", "fp4"])
@pytest.mark.parametrize("layer_kind", ["qkv", "gate_up", "row"])
def test_cpu_forward_takes_the_path_for_its_token_count(
    tmp_path, monkeypatch, layer_kind, quant_name, onednn_cap
):
    """Every row count runs the path cpu.forward_path names (fused / our AMX or AVX512-BF16
    kernel / GEMM, on each side of each switch) and matches bitsandbytes' own result for
    the checkpoint."""
    quant = QUANTS[quant_name]
    make, shards = LAYERS[layer_kind]
    path, tensors = _checkpoint(tmp_path, quant, shards)
    layer = _build_and_load(make, shards, path, quant)
    assert layer.bnb_parts[0][2].packing_format_for_cpu
    calls = _spy_paths(monkeypatch)
    g = torch.Generator().manual_seed(3)
    expected_calls: dict[str, list[int]] = {"gemm": [], "amx": [], "avx512": []}
    for m in _path_boundaries():
        x = torch.randn(m, shards[0][3], generator=g).to(torch.bfloat16)
        got = _forward(layer, x).float()
        expected = _bnb_reference(x, tensors, shards, quant).float()
        torch.testing.assert_close(got, expected, rtol=2e-2, atol=2e-2)
        taken = cpu.forward_path(m, shards[0][3])
        if taken != "fused":
            expected_calls[taken] += [m] * len(layer.bnb_parts)
    assert calls == expected_calls
    assert calls["gemm"] and calls["amx" if cpu.amx_usable() else "avx512"]


@needs_cpu_kernels
def test_float32_activations_keep_the_fused_kernel_at_every_batch_size(tmp_path, monkeypatch):
    """The GEMM path rounds its output to bf16; a float32 model keeps what transformers
    computes (the fused kernel's float32 output)."""
    quant = QUANTS["nf4-dq"]
    make, shards = LAYERS["row"]
    path, tensors = _checkpoint(tmp_path, quant, shards)
    layer = _build_and_load(make, shards, path, quant)
    calls = _spy_paths(monkeypatch)
    for m in _path_boundaries():
        x = torch.randn(m, shards[0][3], generator=torch.Generator().manual_seed(6))
        got = _forward(layer, x)
        assert got.dtype == torch.float32
    assert calls == NO_CALLS
    torch.testing.assert_close(got, _bnb_reference(x, tensors, shards, quant).float(),
                               rtol=2e-2, atol=2e-2)


@needs_cpu_kernels
def test_gemm_path_dequantizes_in_bounded_blocks(tmp_path, monkeypatch):
    """A weight larger than the scratch buffer is dequantized block by block of rows; the
    buffer never grows past the bound, and the result is the same."""
    quant = QUANTS["nf4-dq"]
    make, shards = LAYERS["gate_up"]
    path, tensors = _checkpoint(tmp_path, quant, shards)
    layer = _build_and_load(make, shards, path, quant)
    monkeypatch.setattr(cpu, "SCRATCH_ELEMENTS", 64 * HIDDEN)  # 8 blocks of 64 rows
    monkeypatch.setattr(cpu, "_scratch", torch.empty(0, dtype=torch.bfloat16))
    calls = _spy_paths(monkeypatch)
    m = cpu.AMX_GEMM_MIN_TOKENS_SMALL_K  # the GEMM path's for any K, with AMX or without
    x = torch.randn(m, HIDDEN, generator=torch.Generator().manual_seed(4)).to(torch.bfloat16)
    got = _forward(layer, x).float()
    torch.testing.assert_close(got, _bnb_reference(x, tensors, shards, quant).float(),
                               rtol=2e-2, atol=2e-2)
    assert calls["gemm"] == [m]
    assert cpu._scratch.numel() == 64 * HIDDEN


@needs_cpu_kernels
def test_without_the_c_routines_every_batch_size_runs_the_fused_kernel(tmp_path, monkeypatch):
    quant = QUANTS["fp4"]
    make, shards = LAYERS["qkv"]
    path, tensors = _checkpoint(tmp_path, quant, shards)
    monkeypatch.setattr(cpu, "kernels", lambda: None)
    layer = _build_and_load(make, shards, path, quant)  # the uint8 tensor-op repack
    assert layer.bnb_parts[0][2].packing_format_for_cpu
    calls = _spy_paths(monkeypatch)
    for m in (5, cpu.GEMM_MIN_TOKENS + 1):
        x = torch.randn(m, HIDDEN, generator=torch.Generator().manual_seed(5))
        x = x.to(torch.bfloat16)
        torch.testing.assert_close(_forward(layer, x).float(),
                                   _bnb_reference(x, tensors, shards, quant).float(),
                                   rtol=2e-2, atol=2e-2)
    assert calls == NO_CALLS
