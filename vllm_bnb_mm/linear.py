"""The BnB linear method: packed weights per shard, each with its own quant state.

A layer's weight is one flat buffer in the rank-local [out, in] row order; every
loaded shard (q/k/v, gate/up, or the whole weight) fills a row range and records
its QuantState. After loading, shards whose blocks tile the rows are merged into a
single QuantState so each forward is one bitsandbytes matmul.
"""

from __future__ import annotations

import platform
from dataclasses import dataclass

import bitsandbytes as bnb
import torch
from bitsandbytes import functional as bnbf
from bitsandbytes.functional import QuantState
from vllm.logger import init_logger
from vllm.model_executor.layers.linear import (
    ColumnParallelLinear,
    LinearMethodBase,
    MergedColumnParallelLinear,
    QKVParallelLinear,
    RowParallelLinear,
)
from vllm.model_executor.utils import set_weight_attrs

from . import cpu
from . import quant_state as qs
from .config import BnbConfig
from .registry import PACKED

logger = init_logger(f"vllm.{__name__}")


@dataclass
class Region:
    """Rows [start, end) of the layer's rank-local weight and their quant state; or, for
    a tensor-parallel cut no bitsandbytes blocksize can express, those rows dequantized
    (`plain`, in the compute dtype; see quant_state's notes on TP cuts)."""

    start: int
    end: int
    state: QuantState | qs.Int8State | None
    plain: torch.Tensor | None = None


class BnbLinearMethod(LinearMethodBase):
    def __init__(self, config: BnbConfig, kind: str, prefix: str) -> None:
        self.config = config
        self.kind = kind
        self.prefix = prefix

    def create_weights(
        self,
        layer: torch.nn.Module,
        input_size_per_partition: int,
        output_partition_sizes: list[int],
        input_size: int,
        output_size: int,
        params_dtype: torch.dtype,
        **extra_weight_attrs,
    ) -> None:
        rows = sum(output_partition_sizes)
        if self.kind == "4bit":
            if (rows * input_size_per_partition) % 2 or input_size_per_partition % 2:
                raise ValueError(
                    f"4-bit BnB needs an even input size, got {input_size_per_partition}"
                )
            data = torch.empty(rows * input_size_per_partition // 2, dtype=torch.uint8)
        else:
            data = torch.empty(rows, input_size_per_partition, dtype=torch.int8)
        weight = torch.nn.Parameter(data, requires_grad=False)
        layer.register_parameter("weight", weight)
        extra = {k: v for k, v in extra_weight_attrs.items() if k != "weight_loader"}
        set_weight_attrs(weight, extra)
        weight.weight_loader = _make_weight_loader(layer, self.config, self.kind)
        weight.bnb_regions = []
        layer.bnb_kind = self.kind
        layer.bnb_prefix = self.prefix
        layer.bnb_in_features = input_size_per_partition
        layer.bnb_out_features = rows
        layer.bnb_compute_dtype = params_dtype
        ensure_registered(layer)

    def process_weights_after_loading(self, layer: torch.nn.Module) -> None:
        weight = layer.weight
        regions = sorted(weight.bnb_regions, key=lambda r: r.start)
        _check_coverage(layer, regions)
        if weight.device.type == "cpu":
            cpu.request_amx_tile_state()
        if self.kind == "8bit":
            _finalize_8bit(layer, regions, self.config)
        else:
            _finalize_4bit(layer, regions)
        del weight.bnb_regions

    def apply(
        self, layer: torch.nn.Module, x: torch.Tensor, bias: torch.Tensor | None = None
    ) -> torch.Tensor:
        if layer.bnb_kind == "dequantized":
            return torch.nn.functional.linear(x, layer.weight, bias)
        out = torch.ops.vllm.bnb_mm_linear(x, layer.weight, id(layer), layer.bnb_out_features)
        if bias is not None:
            out = out + bias
        return out


# ------------------------------------------------------------------- loading


def _make_weight_loader(layer: torch.nn.Module, config: BnbConfig, kind: str):
    def weight_loader(param, loaded_weight: torch.Tensor, loaded_shard_id=None) -> None:
        for rows, source_rows in _shard_rows(layer, loaded_shard_id):
            _load_region(layer, param, loaded_weight, rows, source_rows, config, kind)

    return weight_loader


def _shard_rows(layer, shard_id) -> list[tuple[tuple[int, int], tuple[int, int] | None]]:
    """(local rows to fill, rows to take from the loaded tensor or None for all), one
    pair per logical shard the loaded tensor holds."""
    tp_rank, tp_size = getattr(layer, "tp_rank", 0), getattr(layer, "tp_size", 1)
    split = tp_size > 1 and isinstance(layer, ColumnParallelLinear)
    if isinstance(layer, QKVParallelLinear) and (shard_id is not None or split):
        # shard_id None: q, k and v fused on disk (e.g. Phi-3's qkv_proj), in that order
        head, kv = layer.head_size, layer.total_num_kv_heads
        on_disk = {"q": 0, "k": layer.total_num_heads * head,
                   "v": (layer.total_num_heads + kv) * head}
        pairs = []
        for sid in ("q", "k", "v") if shard_id is None else (shard_id,):
            offset = layer._get_shard_offset_mapping(sid)
            size = layer._get_shard_size_mapping(sid)
            if offset is None or size is None:
                raise ValueError(f"unknown qkv shard id {sid!r} for {layer.bnb_prefix}")
            rank = tp_rank if sid == "q" else tp_rank // layer.num_kv_head_replicas
            base = on_disk[sid] if shard_id is None else 0
            src = (base + rank * size, base + (rank + 1) * size) if split else None
            pairs.append(((offset, offset + size), src))
        return pairs
    if isinstance(layer, MergedColumnParallelLinear) and (shard_id is not None or split):
        # a tuple or None: several shards fused on disk (e.g. Phi-3's gate_up_proj)
        if shard_id is None:
            ids = list(range(len(layer.output_sizes)))
        else:
            ids = list(shard_id) if isinstance(shard_id, tuple) else [shard_id]
        if not split:
            start = sum(layer.output_sizes[: ids[0]])
            size = sum(layer.output_sizes[ids[0] : ids[-1] + 1])
            return [((start, start + size), None)]
        pairs = []
        for i in ids:
            start = sum(layer.output_sizes[:i]) // tp_size
            size = layer.output_sizes[i] // tp_size
            base = sum(layer.output_sizes[ids[0] : i]) + tp_rank * size  # shard i on disk
            pairs.append(((start, start + size), (base, base + size)))
        return pairs
    rows = layer.bnb_out_features
    return [((0, rows), (tp_rank * rows, (tp_rank + 1) * rows) if split else None)]


def _input_cols(layer) -> tuple[int, int] | None:
    if isinstance(layer, RowParallelLinear) and getattr(layer, "tp_size", 1) > 1:
        width = layer.bnb_in_features
        return (layer.tp_rank * width, (layer.tp_rank + 1) * width)
    return None


def _load_region(layer, param, loaded, rows, src_rows, config: BnbConfig, kind: str) -> None:
    packed = PACKED.lookup(loaded)
    cols = _input_cols(layer)
    if packed is not None and packed.kind != kind:
        raise ValueError(
            f"{packed.name} ({packed.file}) is {packed.kind} but layer {layer.bnb_prefix} was "
            f"built {kind} from quantization_config: the config contradicts the tensors"
        )
    if kind == "4bit":
        data, state = _region_4bit(layer, loaded, packed, src_rows, cols, config)
        if state is None:
            _check_plain_rows(layer, packed, data, rows)
            param.bnb_regions.append(Region(rows[0], rows[1], None, plain=data))
            return
        first, last = rows[0] * layer.bnb_in_features // 2, rows[1] * layer.bnb_in_features // 2
        target = param.data[first:last]
    else:
        data, state = _region_8bit(layer, loaded, packed, src_rows, cols)
        target = param.data[rows[0] : rows[1]]
    if data.numel() != target.numel():
        what = f"{packed.name} ({packed.file})" if packed else "plain tensor"
        raise ValueError(
            f"{what}: {data.numel()} values for rows {rows} of {layer.bnb_prefix}, which "
            f"need {target.numel()} (shape mismatch between checkpoint and model)"
        )
    target.copy_(data.reshape(target.shape))
    param.bnb_regions.append(Region(rows[0], rows[1], state))


def _region_4bit(layer, loaded, packed, src_rows, cols, config: BnbConfig):
    """This rank's packed bytes and quant state, exactly the slice of the full weight
    HF computes with; or (data, None): the slice dequantized, where no blocksize fits."""
    if packed is None:
        PACKED.note_quantized_in_flight(layer.bnb_prefix)
        if _cut_keeps_blocks(loaded.shape[-1], config.blocksize, src_rows, cols):
            plain = qs.slice_rows_cols(loaded, src_rows, cols)
            return qs.quantize_4bit(
                plain, config.quant_type, config.blocksize, layer.bnb_compute_dtype
            )
        # transformers quantizes the whole weight: a cut through its blocks takes this
        # rank's part of them, as for a pre-quantized checkpoint.
        data, state = qs.quantize_4bit(
            loaded, config.quant_type, config.blocksize, layer.bnb_compute_dtype
        )
    else:
        data, state = loaded, packed.state
    full = (data, state)
    if src_rows is not None:
        cut = qs.slice_4bit_rows(data, state, *src_rows)
        if cut is None:
            return _dequantized_slice(layer, *full, src_rows, cols), None
        data, state = cut
    if cols is not None:
        cut = qs.slice_4bit_cols(data, state, *cols)
        if cut is None:
            return _dequantized_slice(layer, *full, src_rows, cols), None
        data, state = cut
    return data, state


def _cut_keeps_blocks(width: int, blocksize: int, src_rows, cols) -> bool:
    """Whether quantizing only this rank's slice gives the blocks of the whole weight."""
    edges = [] if src_rows is None else [src_rows[0] * width, src_rows[1] * width]
    if cols is not None:
        edges += [width, *cols]
    return all(e % blocksize == 0 for e in edges)


def _dequantized_slice(layer, data, state, src_rows, cols) -> torch.Tensor:
    """The rank's slice of the dequantized full weight, in the compute dtype."""
    full = qs.dequantize_4bit(data, state, layer.bnb_compute_dtype).reshape(state.shape)
    return qs.slice_rows_cols(full, src_rows, cols).contiguous()


def _check_plain_rows(layer, packed, data: torch.Tensor, rows) -> None:
    expected = (rows[1] - rows[0], layer.bnb_in_features)
    if tuple(data.shape) != expected:
        what = f"{packed.name} ({packed.file})" if packed else "plain tensor"
        raise ValueError(
            f"{what}: a {list(data.shape)} slice for rows {rows} of {layer.bnb_prefix}, "
            f"which need {list(expected)} (shape mismatch between checkpoint and model)"
        )


def _region_8bit(layer, loaded, packed, src_rows, cols):
    if packed is None:
        PACKED.note_quantized_in_flight(layer.bnb_prefix)
        return qs.quantize_8bit(qs.slice_rows_cols(loaded, src_rows, cols))
    data = qs.slice_rows_cols(loaded, src_rows, cols)
    scb = packed.state.scb
    if src_rows is not None:
        scb = scb[src_rows[0] : src_rows[1]]
    return data, qs.Int8State(scb=scb)


def _check_coverage(layer, regions: list[Region]) -> None:
    covered = 0
    for r in regions:
        if r.start != covered:
            break
        covered = r.end
    if covered != layer.bnb_out_features or len({r.start for r in regions}) != len(regions):
        spans = [(r.start, r.end) for r in regions]
        raise ValueError(
            f"BnB layer {layer.bnb_prefix}: loaded row ranges {spans} do not cover its "
            f"{layer.bnb_out_features} output rows exactly once: a shard or its quant "
            "state is missing from the checkpoint"
        )


# ------------------------------------------------------------------- finalizing


def _finalize_8bit(layer, regions: list[Region], config: BnbConfig) -> None:
    scb = torch.cat([r.state.scb for r in regions]).to(layer.weight.device)
    state = bnb.MatmulLtState()
    state.CB = layer.weight.data
    state.SCB = scb
    state.threshold = config.llm_int8_threshold
    state.has_fp16_weights = False
    state.is_training = False
    state.use_pool = config.llm_int8_threshold > 0.0
    layer.bnb_lt_state = state


def _finalize_4bit(layer, regions: list[Region]) -> None:
    if any(r.plain is not None for r in regions):
        _finalize_dequantized(layer, regions, "a tensor-parallel cut no bitsandbytes blocksize "
                              "can express")
        return
    if layer.weight.device.type == "cpu" and any(
        layer.bnb_in_features % r.state.blocksize for r in regions
    ):
        # bitsandbytes' CPU 4-bit kernels (0.50.2) index blocks per row: wrong weights
        # where rows are not whole blocks (e.g. 96 columns in blocks of 64).
        _finalize_dequantized(layer, regions, "rows that are not whole quant blocks, which "
                              "bitsandbytes' CPU kernels mis-index")
        return
    states = [r.state for r in regions]
    device = layer.weight.device
    if qs.can_merge_4bit(states):
        merged = qs.merge_4bit(states, layer.bnb_compute_dtype)
        merged.to(device)
        if _use_cpu_packed_kernel(layer, merged):
            data, merged = qs.repack_for_cpu_kernel(layer.weight.data, merged, in_place=True)
            layer.weight.data = data
        layer.bnb_parts = [(0, layer.weight.numel(), merged)]
        return
    parts = []
    for r, state in zip(regions, states, strict=True):
        state.to(device)
        per_row = layer.bnb_in_features // 2
        parts.append((r.start * per_row, r.end * per_row, state))
    layer.bnb_parts = parts


def _finalize_dequantized(layer, regions: list[Region], why: str) -> None:
    """The layer computes in the compute dtype on this rank, with exactly the values
    bitsandbytes dequantizes: its packed shards are dequantized too, one dense weight."""
    per_row = layer.bnb_in_features // 2
    packed = layer.weight.data
    rows = []
    for r in regions:
        plain = r.plain
        if plain is None:
            r.state.to(packed.device)
            plain = qs.dequantize_4bit(
                packed[r.start * per_row : r.end * per_row], r.state, layer.bnb_compute_dtype
            ).reshape(r.end - r.start, layer.bnb_in_features)
        rows.append(plain.to(packed.device))
    weight = torch.cat(rows)
    extra = weight.numel() * weight.element_size() - packed.numel()
    layer.weight.data = weight
    layer.bnb_kind = "dequantized"
    logger.info(
        "%s: kept dequantized in %s on this rank (%s), +%.2f MiB",
        layer.bnb_prefix, weight.dtype, why, extra / 2**20,
    )


def _use_cpu_packed_kernel(layer, state: QuantState) -> bool:
    """bitsandbytes' AVX512-BF16 4-bit kernel: what transformers' Linear4bit runs on
    such CPUs too, so it matches the HF reference and is much faster than dequantize."""
    n, k = state.shape
    return (
        layer.weight.device.type == "cpu"
        and platform.machine() in ("x86_64", "AMD64")
        and bnbf.has_avx512bf16()
        and n % 32 == 0
        and k % 2 == 0
        and k % state.blocksize == 0
    )


# ------------------------------------------------------------------- forward


_LAYERS: dict[int, torch.nn.Module] = {}


def register_layer(layer: torch.nn.Module) -> None:
    _LAYERS[id(layer)] = layer


def _bnb_mm_linear(
    x: torch.Tensor, weight: torch.Tensor, layer_id: int, out_features: int
) -> torch.Tensor:
    layer = _LAYERS[layer_id]
    shape = x.shape
    x2 = x.reshape(-1, shape[-1])
    if layer.bnb_kind == "8bit":
        out = bnb.matmul(x2, weight, state=layer.bnb_lt_state).to(x.dtype)
    elif len(layer.bnb_parts) == 1:
        out = _matmul_4bit(x2, weight, layer.bnb_parts[0][2])
    else:
        flat = weight.reshape(-1)
        out = torch.cat(
            [_matmul_4bit(x2, flat[a:b], st) for a, b, st in layer.bnb_parts], dim=-1
        )
    return out.reshape(*shape[:-1], out_features)


def _matmul_4bit(x: torch.Tensor, weight: torch.Tensor, state: QuantState) -> torch.Tensor:
    if getattr(state, "packing_format_for_cpu", False):
        return cpu.matmul_4bit(x, weight, state)
    return bnb.matmul_4bit(x, weight.reshape(-1, 1).t(), quant_state=state)


def _bnb_mm_linear_fake(
    x: torch.Tensor, weight: torch.Tensor, layer_id: int, out_features: int
) -> torch.Tensor:
    return x.new_empty(*x.shape[:-1], out_features)


def register_ops() -> None:
    """Register the forward as one opaque op so torch.compile does not trace into
    bitsandbytes (idempotent)."""
    if hasattr(torch.ops.vllm, "bnb_mm_linear"):
        return
    from vllm.utils.torch_utils import direct_register_custom_op

    direct_register_custom_op(
        op_name="bnb_mm_linear", op_func=_bnb_mm_linear, fake_impl=_bnb_mm_linear_fake
    )


def ensure_registered(layer: torch.nn.Module) -> None:
    register_ops()
    register_layer(layer)

