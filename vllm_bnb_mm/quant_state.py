"""bitsandbytes `QuantState` handling: parse, validate, flatten, slice, merge.

All quantize/dequantize math is bitsandbytes'; this module only moves bytes and
block statistics around. 4-bit weights are kept as flat packed bytes in row-major
order of the logical [out, in] matrix, with one absmax per `blocksize` elements.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass

import torch
from bitsandbytes import functional as bnbf
from bitsandbytes.functional import QuantState

from .checkpoint import (
    MAX_QUANT_STATE_JSON_BYTES,
    CheckpointError,
    FileReader,
    QuantizedWeight,
    TensorInfo,
)

VALID_BLOCKSIZES = (32, 64, 128, 256, 512, 1024, 2048, 4096)
_JSON_KEYS = {"quant_type", "blocksize", "dtype", "shape"}


@dataclass
class Int8State:
    """LLM.int8 weight statistics: one absmax per output row (`SCB`), weight is int8."""

    scb: torch.Tensor  # float32 [out]

    @property
    def rows(self) -> int:
        return self.scb.numel()


def parse_4bit_state(
    q: QuantizedWeight, tensors: dict[str, TensorInfo], reader: FileReader
) -> QuantState:
    """Build a float32 QuantState for one packed weight, with nested absmax flattened."""
    info = tensors[q.weight]
    json_key = next(k for k in q.state_tensors if k.startswith("quant_state."))
    meta = _read_state_json(q.state_tensors[json_key], tensors, reader)
    quant_type = json_key.rsplit("__", 1)[1]
    if meta.get("quant_type") != quant_type:
        raise CheckpointError(
            f"{info.file}: {q.state_tensors[json_key]!r} says quant_type "
            f"{meta.get('quant_type')!r} but its key says {quant_type!r}"
        )
    shape, blocksize = _check_4bit_meta(q, meta, info, tensors)
    absmax = _float_state(q, "absmax", tensors, reader)
    code = _float_state(q, "quant_map", tensors, reader)
    if code.numel() != 16:
        raise CheckpointError(
            f"{info.file}: {q.state_tensors['quant_map']!r} has {code.numel()} entries, "
            "a 4-bit quant_map has 16"
        )
    if "nested_absmax" in q.state_tensors:
        absmax = _flatten_nested_absmax(q, meta, absmax, tensors, reader)
    n_blocks = math.ceil(math.prod(shape) / blocksize)
    if absmax.numel() != n_blocks:
        raise CheckpointError(
            f"{info.file}: {q.weight!r} has {absmax.numel()} absmax values but shape "
            f"{list(shape)} with blocksize {blocksize} needs {n_blocks}"
        )
    return QuantState(
        absmax=absmax.float().reshape(-1),
        shape=torch.Size(shape),
        code=code.float(),
        blocksize=blocksize,
        quant_type=quant_type,
        dtype=_torch_dtype(meta.get("dtype", "bfloat16"), q, info),
    )


def parse_8bit_state(
    q: QuantizedWeight, tensors: dict[str, TensorInfo], reader: FileReader
) -> Int8State:
    info = tensors[q.weight]
    scb_info = tensors[q.state_tensors["SCB"]]
    if len(info.shape) != 2:
        raise CheckpointError(
            f"{info.file}: 8-bit weight {q.weight!r} has shape {list(info.shape)}, expected 2-D"
        )
    if scb_info.shape != (info.shape[0],) or not scb_info.dtype.is_floating_point:
        raise CheckpointError(
            f"{scb_info.file}: {scb_info.name!r} is {scb_info.dtype}{list(scb_info.shape)}, "
            f"expected float [{info.shape[0]}] (one scale per row of {q.weight!r})"
        )
    return Int8State(scb=reader.tensor(scb_info).float().clone())


def _read_state_json(name: str, tensors: dict[str, TensorInfo], reader: FileReader) -> dict:
    info = tensors[name]
    if info.end - info.start > MAX_QUANT_STATE_JSON_BYTES:
        raise CheckpointError(
            f"{info.file}: quant-state JSON {name!r} is {info.end - info.start} bytes, "
            f"more than the {MAX_QUANT_STATE_JSON_BYTES} allowed"
        )
    raw = bytes(reader.tensor(info).reshape(-1).view(torch.uint8).numpy())
    try:
        meta = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{info.file}: quant-state {name!r} is not valid JSON: {e}") from e
    if not isinstance(meta, dict):
        raise CheckpointError(f"{info.file}: quant-state {name!r} is not a JSON object")
    missing = _JSON_KEYS - meta.keys()
    if missing:
        raise CheckpointError(
            f"{info.file}: quant-state {name!r} lacks field(s) {sorted(missing)}"
        )
    return meta


def _check_4bit_meta(
    q: QuantizedWeight, meta: dict, info: TensorInfo, tensors: dict[str, TensorInfo]
) -> tuple[tuple[int, ...], int]:
    blocksize = meta["blocksize"]
    if not isinstance(blocksize, int) or blocksize not in VALID_BLOCKSIZES:
        raise CheckpointError(
            f"{info.file}: {q.weight!r} has blocksize {blocksize!r}; bitsandbytes supports "
            f"{VALID_BLOCKSIZES}"
        )
    shape = meta["shape"]
    if not (isinstance(shape, list) and shape and all(isinstance(d, int) and d > 0 for d in shape)):
        raise CheckpointError(f"{info.file}: {q.weight!r} has an invalid shape {shape!r}")
    packed = math.prod(info.shape)
    if packed != math.ceil(math.prod(shape) / 2):
        raise CheckpointError(
            f"{info.file}: packed weight {q.weight!r} holds {packed} bytes but its quant "
            f"state shape {shape} needs {math.ceil(math.prod(shape) / 2)}"
        )
    return tuple(shape), blocksize


def _float_state(
    q: QuantizedWeight, suffix: str, tensors: dict[str, TensorInfo], reader: FileReader
) -> torch.Tensor:
    info = tensors[q.state_tensors[suffix]]
    t = reader.tensor(info)
    if suffix == "absmax" and "nested_absmax" in q.state_tensors:
        if t.dtype != torch.uint8:
            raise CheckpointError(
                f"{info.file}: {info.name!r} is {t.dtype}; with double quant absmax is uint8"
            )
        return t.clone()
    if not t.dtype.is_floating_point:
        raise CheckpointError(f"{info.file}: {info.name!r} is {t.dtype}, expected float")
    return t.float().clone()


def _flatten_nested_absmax(
    q: QuantizedWeight,
    meta: dict,
    absmax_u8: torch.Tensor,
    tensors: dict[str, TensorInfo],
    reader: FileReader,
) -> torch.Tensor:
    """Dequantize double-quant absmax to float32 once, at load, with bitsandbytes.

    The offset is read as float32: under a bf16 default dtype a naive
    `torch.tensor(offset)` rounds it (0.328949 -> 0.328125) and skews every block.
    """
    info = tensors[q.weight]
    for key in ("nested_blocksize", "nested_offset"):
        if key not in meta:
            raise CheckpointError(
                f"{info.file}: {q.weight!r} is double-quantized but its quant-state JSON "
                f"lacks {key!r}"
            )
    nested_absmax = _float_state(q, "nested_absmax", tensors, reader)
    nested_code = _float_state(q, "nested_quant_map", tensors, reader)
    state2 = QuantState(
        absmax=nested_absmax, code=nested_code, blocksize=int(meta["nested_blocksize"]),
        dtype=torch.float32,
    )
    absmax = bnbf.dequantize_blockwise(absmax_u8, state2)
    return absmax.float() + torch.tensor(float(meta["nested_offset"]), dtype=torch.float32)


def _torch_dtype(name: str, q: QuantizedWeight, info: TensorInfo) -> torch.dtype:
    dtype = getattr(torch, str(name), None)
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise CheckpointError(f"{info.file}: {q.weight!r} has an invalid dtype {name!r}")
    return dtype


# ---------------------------------------------------------------- slicing and merging


def slice_4bit_rows(
    packed: torch.Tensor, state: QuantState, start: int, end: int
) -> tuple[torch.Tensor, QuantState] | None:
    """Rows [start, end) of a packed [out, in] weight, exact when blocks align; else None."""
    rows, cols = state.shape
    if (start, end) == (0, rows):
        return packed.reshape(-1), state
    first, last = start * cols, end * cols
    if first % state.blocksize or last % state.blocksize or first % 2 or last % 2:
        return None
    flat = packed.reshape(-1)[first // 2 : last // 2]
    absmax = state.absmax[first // state.blocksize : last // state.blocksize]
    return flat, _with(state, absmax, (end - start, cols))


def slice_4bit_cols(
    packed: torch.Tensor, state: QuantState, start: int, end: int
) -> tuple[torch.Tensor, QuantState] | None:
    """Columns [start, end) of a packed [out, in] weight, exact when blocks align."""
    rows, cols = state.shape
    if (start, end) == (0, cols):
        return packed.reshape(-1), state
    bs = state.blocksize
    if cols % bs or start % bs or end % bs:
        return None
    flat = packed.reshape(rows, cols // 2)[:, start // 2 : end // 2].reshape(-1)
    absmax = state.absmax.reshape(rows, cols // bs)[:, start // bs : end // bs].reshape(-1)
    return flat, _with(state, absmax, (rows, end - start))


def _with(state: QuantState, absmax: torch.Tensor, shape: tuple[int, int]) -> QuantState:
    return QuantState(
        absmax=absmax.contiguous(), shape=torch.Size(shape), code=state.code,
        blocksize=state.blocksize, quant_type=state.quant_type, dtype=state.dtype,
    )


def dequantize_4bit(packed: torch.Tensor, state: QuantState, dtype: torch.dtype) -> torch.Tensor:
    return bnbf.dequantize_4bit(packed.reshape(-1, 1), state).to(dtype)


def dequantize_8bit(weight: torch.Tensor, state: Int8State, dtype: torch.dtype) -> torch.Tensor:
    return bnbf.int8_vectorwise_dequant(weight, state.scb).to(dtype)


def quantize_4bit(
    weight: torch.Tensor, quant_type: str, blocksize: int, dtype: torch.dtype
) -> tuple[torch.Tensor, QuantState]:
    """Quantize a plain weight in flight, with float32 absmax (no double quant: the
    statistics are flattened at load anyway)."""
    packed, state = bnbf.quantize_4bit(
        weight.contiguous(), blocksize=blocksize, quant_type=quant_type,
        compress_statistics=False,
    )
    state.dtype = dtype
    state.absmax = state.absmax.float()
    return packed.reshape(-1), state


def quantize_8bit(weight: torch.Tensor) -> tuple[torch.Tensor, Int8State]:
    cb, scb, _ = bnbf.int8_vectorwise_quant(weight.to(torch.float16).contiguous())
    return cb, Int8State(scb=scb.float())


def can_merge_4bit(states: list[QuantState]) -> bool:
    """Row-stacked shards share one QuantState when their blocks tile the rows exactly."""
    first = states[0]
    return all(
        s.quant_type == first.quant_type
        and s.blocksize == first.blocksize
        and s.shape[1] == first.shape[1]
        and (s.shape[0] * s.shape[1]) % s.blocksize == 0
        and torch.equal(s.code, first.code)
        for s in states
    )


def merge_4bit(states: list[QuantState], dtype: torch.dtype) -> QuantState:
    rows = sum(s.shape[0] for s in states)
    merged = _with(states[0], torch.cat([s.absmax for s in states]), (rows, states[0].shape[1]))
    merged.dtype = dtype
    return merged
