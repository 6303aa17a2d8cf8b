"""bitsandbytes `QuantState` handling: parse, validate, flatten, slice, merge.

All quantize/dequantize math is bitsandbytes'; this module only moves bytes and
block statistics around. 4-bit weights are kept as flat packed bytes in row-major
order of the logical [out, in] matrix, with one absmax per `blocksize` elements.
"""

from __future__ import annotations

import contextlib
import json
import math
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from bitsandbytes import functional as bnbf
from bitsandbytes.functional import QuantState

from . import cpu
from .checkpoint import (
    MAX_QUANT_STATE_JSON_BYTES,
    RESAVE_HINT,
    CheckpointError,
    FileReader,
    QuantizedWeight,
    TensorInfo,
)

VALID_BLOCKSIZES = (32, 64, 128, 256, 512, 1024, 2048, 4096)
_JSON_KEYS = {"quant_type", "blocksize", "dtype", "shape"}
# bitsandbytes' compute dtypes; the JSON's "dtype" is what the weight dequantizes to.
_COMPUTE_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}


@dataclass
class Int8State:
    """LLM.int8 weight statistics: one absmax per output row (`SCB`), weight is int8."""

    scb: torch.Tensor  # float32 [out]

    @property
    def rows(self) -> int:
        return self.scb.numel()


@dataclass(frozen=True)
class FourBitMeta:
    """What one packed 4-bit weight's quant-state JSON and header entries say, checked
    against each other; no block scale has been read."""

    quant_type: str
    shape: tuple[int, ...]
    blocksize: int
    dtype: torch.dtype  # what the weight dequantizes to
    nested_blocksize: int | None  # double quant only
    nested_offset: float | None


def read_4bit_meta(
    q: QuantizedWeight, tensors: dict[str, TensorInfo], reader: FileReader
) -> FourBitMeta:
    """Every check of one packed weight that needs no block scale: the JSON (read, a few
    hundred bytes), and each state tensor's dtype and size from its header entry."""
    info = tensors[q.weight]
    json_key = next(k for k in q.state_tensors if k.startswith("quant_state."))
    meta = _read_state_json(q.state_tensors[json_key], tensors, reader)
    quant_type = json_key.rsplit("__", 1)[1]
    if meta.get("quant_type") != quant_type:
        raise CheckpointError(
            f"{info.file}: {q.state_tensors[json_key]!r} says quant_type "
            f"{_short(meta.get('quant_type'))} but its key says {quant_type!r}. {RESAVE_HINT}"
        )
    shape, blocksize = _check_4bit_meta(q, meta, info, tensors)
    dtype = _torch_dtype(meta["dtype"], q, info)
    nested = "nested_absmax" in q.state_tensors
    absmax = _state_info(q, "absmax", tensors, uint8=nested)
    code = _state_info(q, "quant_map", tensors)
    if math.prod(code.shape) != 16:
        raise CheckpointError(
            f"{info.file}: {q.state_tensors['quant_map']!r} has {math.prod(code.shape)} "
            f"entries, a 4-bit quant_map has 16. {RESAVE_HINT}"
        )
    n_blocks = _ceil_div(math.prod(shape), blocksize)
    if math.prod(absmax.shape) != n_blocks:  # checked before any kernel reads it
        raise CheckpointError(
            f"{info.file}: {q.weight!r} has {math.prod(absmax.shape)} absmax values but its "
            f"quant-state JSON says shape {list(shape)} with blocksize {blocksize}, which "
            f"needs {n_blocks}: the JSON's blocksize or shape does not match the data. "
            f"{RESAVE_HINT}"
        )
    nested_blocksize, nested_offset = (
        _check_nested(q, meta, n_blocks, tensors) if nested else (None, None)
    )
    return FourBitMeta(quant_type, shape, blocksize, dtype, nested_blocksize, nested_offset)


def parse_4bit_state(
    q: QuantizedWeight, tensors: dict[str, TensorInfo], reader: FileReader
) -> QuantState:
    """Build a float32 QuantState for one packed weight, with nested absmax flattened."""
    meta = read_4bit_meta(q, tensors, reader)
    code = _state_values(q, "quant_map", tensors, reader)
    if meta.nested_blocksize is not None:
        absmax = _flatten_nested_absmax(q, meta, tensors, reader)
    else:
        absmax = _state_values(q, "absmax", tensors, reader)
    _check_finite_absmax(q, absmax, tensors)
    return QuantState(
        absmax=absmax.float().reshape(-1),
        shape=torch.Size(meta.shape),
        code=code.float(),
        blocksize=meta.blocksize,
        quant_type=meta.quant_type,
        dtype=meta.dtype,
    )


def _ceil_div(n: int, d: int) -> int:
    # Integer arithmetic: JSON ints are unbounded and float division overflows.
    return -(-n // d)


def _check_finite_absmax(
    q: QuantizedWeight, absmax: torch.Tensor, tensors: dict[str, TensorInfo]
) -> None:
    """Block scales must be finite and non-negative (they are max |w| per block).

    This is also the line drawn for narrowed absmax (fp16/bf16 where bitsandbytes writes
    fp32): upcasting is exact, so such a checkpoint loads with the values it stores
    (relative error <= 2^-11 for fp16, far below the 4-bit error), unless narrowing
    overflowed to inf, which no upcast can undo."""
    if absmax.numel() == 0:
        return
    low, high = torch.aminmax(absmax)  # one pass; NaN propagates and fails both tests
    if bool(low >= 0) and bool(high < math.inf):
        return
    bad = ~torch.isfinite(absmax) | (absmax < 0)
    stored = tensors[q.state_tensors["absmax"]]
    first = int(bad.reshape(-1).nonzero()[0, 0])
    hint = (
        "it was narrowed from bitsandbytes' float32 and overflowed: keep absmax float32"
        if stored.dtype in (torch.float16, torch.bfloat16)
        else "the data is corrupt"
    )
    raise CheckpointError(
        f"{stored.file}: {stored.name!r} ({stored.dtype}) has {int(bad.sum())} non-finite or "
        f"negative block scale(s) (block {first} = {float(absmax.reshape(-1)[first])}), so "
        f"{q.weight!r} cannot be dequantized; {hint}. {RESAVE_HINT}"
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
    scb = reader.tensor(scb_info).float().clone()
    bad = ~torch.isfinite(scb) | (scb < 0)
    if bool(bad.any()):
        raise CheckpointError(
            f"{scb_info.file}: {scb_info.name!r} has {int(bad.sum())} non-finite or negative "
            f"row scale(s), so {q.weight!r} cannot be dequantized. {RESAVE_HINT}"
        )
    return Int8State(scb=scb)


def _read_state_json(name: str, tensors: dict[str, TensorInfo], reader: FileReader) -> dict:
    info = tensors[name]
    if info.end - info.start > MAX_QUANT_STATE_JSON_BYTES:
        raise CheckpointError(
            f"{info.file}: quant-state JSON {name!r} is {info.end - info.start} bytes, "
            f"more than the {MAX_QUANT_STATE_JSON_BYTES} allowed (bitsandbytes writes a few "
            f"hundred): refusing to parse it. {RESAVE_HINT}"
        )
    if info.dtype != torch.uint8:
        raise CheckpointError(
            f"{info.file}: quant-state JSON {name!r} is stored as {info.dtype}, expected "
            f"uint8 bytes. {RESAVE_HINT}"
        )
    raw = bytes(reader.tensor(info).reshape(-1).numpy())
    try:
        meta = json.loads(raw.decode("utf-8"))
    except (ValueError, RecursionError) as e:  # bad UTF-8, bad JSON, absurd nesting
        raise CheckpointError(
            f"{info.file}: quant-state {name!r} is not valid JSON ({type(e).__name__}: "
            f"{str(e)[:200]}). {RESAVE_HINT}"
        ) from e
    if not isinstance(meta, dict):
        raise CheckpointError(
            f"{info.file}: quant-state {name!r} is not a JSON object. {RESAVE_HINT}"
        )
    missing = _JSON_KEYS - meta.keys()
    if missing:
        raise CheckpointError(
            f"{info.file}: quant-state {name!r} lacks field(s) {sorted(missing)}. {RESAVE_HINT}"
        )
    return meta


def _check_4bit_meta(
    q: QuantizedWeight, meta: dict, info: TensorInfo, tensors: dict[str, TensorInfo]
) -> tuple[tuple[int, ...], int]:
    blocksize = meta["blocksize"]
    if not _is_int(blocksize) or blocksize not in VALID_BLOCKSIZES:
        raise CheckpointError(
            f"{info.file}: {q.weight!r} has blocksize {_short(blocksize)} in its quant-state "
            f"JSON; bitsandbytes supports {VALID_BLOCKSIZES}. {RESAVE_HINT}"
        )
    shape = meta["shape"]
    if not (isinstance(shape, list) and shape and all(_is_int(d) and d > 0 for d in shape)):
        raise CheckpointError(
            f"{info.file}: {q.weight!r} has an invalid shape {_short(shape)} in its "
            f"quant-state JSON. {RESAVE_HINT}"
        )
    packed = math.prod(info.shape) * info.dtype.itemsize
    needed = _ceil_div(math.prod(shape), 2)
    if packed != needed:
        # bnb_4bit_quant_storage relabels the bytes; a cast of the values changes the count.
        stored = "" if info.dtype == torch.uint8 else f" as {info.dtype}{list(info.shape)}"
        raise CheckpointError(
            f"{info.file}: packed weight {q.weight!r} holds {packed} bytes{stored} but its "
            f"quant state shape {_short(shape)} needs {_short(needed)}: the JSON shape does "
            f"not match the data. {RESAVE_HINT}"
        )
    return tuple(shape), blocksize


def _short(value: object, limit: int = 80) -> str:
    # JSON values come from the file: quote them, but never paste 64 KiB into a message.
    try:
        text = repr(value)
    except ValueError:  # an int too long for str() (sys.get_int_max_str_digits)
        return "<a number too large to print>"
    return text if len(text) <= limit else text[:limit] + "…"


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _state_info(
    q: QuantizedWeight, suffix: str, tensors: dict[str, TensorInfo], uint8: bool = False
) -> TensorInfo:
    """A state tensor's header entry, its dtype checked: float, or uint8 for the
    double-quantized absmax."""
    info = tensors[q.state_tensors[suffix]]
    if uint8 and info.dtype != torch.uint8:
        raise CheckpointError(
            f"{info.file}: {info.name!r} is {info.dtype}; with double quant absmax is uint8"
        )
    if not uint8 and not info.dtype.is_floating_point:
        raise CheckpointError(f"{info.file}: {info.name!r} is {info.dtype}, expected float")
    return info


def _state_values(
    q: QuantizedWeight, suffix: str, tensors: dict[str, TensorInfo], reader: FileReader
) -> torch.Tensor:
    # Copies: these values stay in the QuantState for the model's life; views would keep
    # the file mapped and its pages in RSS (views are only for values read once, here).
    t = reader.tensor(tensors[q.state_tensors[suffix]])
    return t.clone() if t.dtype == torch.uint8 else t.to(torch.float32, copy=True)


def _check_nested(
    q: QuantizedWeight, meta: dict, n_absmax: int, tensors: dict[str, TensorInfo]
) -> tuple[int, float]:
    """Double quant: the JSON's nested fields and the nested tensors' sizes."""
    info = tensors[q.weight]
    blocksize, offset = meta.get("nested_blocksize"), meta.get("nested_offset")
    if not _is_int(blocksize) or blocksize not in VALID_BLOCKSIZES:
        raise CheckpointError(
            f"{info.file}: {q.weight!r} is double-quantized but its quant-state JSON has "
            f"nested_blocksize {_short(blocksize)}; expected one of {VALID_BLOCKSIZES}. "
            f"{RESAVE_HINT}"
        )
    if not isinstance(offset, (int, float)) or isinstance(offset, bool) or not math.isfinite(
        offset
    ):
        raise CheckpointError(
            f"{info.file}: {q.weight!r} is double-quantized but its quant-state JSON has "
            f"nested_offset {_short(offset)}; expected a finite number. {RESAVE_HINT}"
        )
    n_nested = math.prod(_state_info(q, "nested_absmax", tensors).shape)
    n_code = math.prod(_state_info(q, "nested_quant_map", tensors).shape)
    # bitsandbytes' kernel indexes these without bounds checks: sizes must agree first.
    needed = _ceil_div(n_absmax, blocksize)
    if n_nested != needed or n_code != 256:
        raise CheckpointError(
            f"{info.file}: {q.weight!r} has {n_nested} nested_absmax and "
            f"{n_code} nested_quant_map values; {n_absmax} absmax bytes "
            f"with nested_blocksize {blocksize} need {needed} and 256. {RESAVE_HINT}"
        )
    return blocksize, float(offset)


def _flatten_nested_absmax(
    q: QuantizedWeight, meta: FourBitMeta, tensors: dict[str, TensorInfo], reader: FileReader
) -> torch.Tensor:
    """Dequantize double-quant absmax to float32 once, at load, with bitsandbytes.

    Its inputs are read straight from the file's pages (no copies: only the result is
    kept). The offset is added as a Python float, i.e. in float32: under a bf16 default
    dtype a naive `torch.tensor(offset)` rounds it (0.328949 -> 0.328125) and skews every
    block.
    """
    def values(suffix: str) -> torch.Tensor:
        return reader.tensor(tensors[q.state_tensors[suffix]]).reshape(-1)

    state2 = QuantState(
        absmax=values("nested_absmax").float(), code=values("nested_quant_map").float(),
        blocksize=meta.nested_blocksize, dtype=torch.float32,
    )
    absmax = bnbf.dequantize_blockwise(values("absmax"), state2)
    return absmax.float().add_(meta.nested_offset)  # a Python float: added in float32


def _torch_dtype(name: object, q: QuantizedWeight, info: TensorInfo) -> torch.dtype:
    dtype = _COMPUTE_DTYPES.get(name.removeprefix("torch.")) if isinstance(name, str) else None
    if dtype is None:
        raise CheckpointError(
            f"{info.file}: {q.weight!r} has dtype {_short(name)} in its quant-state JSON; "
            f"expected one of {sorted(_COMPUTE_DTYPES)}. {RESAVE_HINT}"
        )
    return dtype


# ---------------------------------------------------------------- slicing and merging


# Tensor-parallel cuts. A rank must compute with exactly the weights HF computes with,
# i.e. exactly its slice of the dequantized full weight. When a cut falls on block
# boundaries that is the slice of the packed bytes and of the absmax. When it falls
# inside blocks, two exact schemes were weighed:
# (a) re-express the slice with a smaller bitsandbytes blocksize b whose blocks each lie
#     inside one original block, repeating that block's absmax: the dequantized values
#     are bit for bit the same, memory stays 4-bit (+4 bytes of absmax per b elements)
#     and the layer keeps bitsandbytes' 4-bit kernels (all accept b >= 32, the CPU fused
#     kernel included);
# (b) keep the rank's slice dequantized in the compute dtype (what bitsandbytes computes
#     with anyway) and run a dense matmul.
# Measured on a 2048 x 2080 rank slice (bf16, this CPU): (a) 2.7 MB, (b) 8.5 MB; forward
# times of the two within this machine's noise. So (a) wherever some b fits the cut
# (every TP=2 cut of a layer whose input is a multiple of 64, e.g. o_proj of 2 heads x
# 32), (b) only where none does (a cut at a multiple of 16 or less, e.g. SigLIP's
# 4304-wide MLP at TP=2, or an odd column).


def sub_blocksize(blocksize: int, offsets: list[int]) -> int | None:
    """The largest bitsandbytes blocksize b that divides `blocksize` and every offset:
    blocks of b elements starting at those offsets each lie inside one original block."""
    for b in sorted(VALID_BLOCKSIZES, reverse=True):
        if b <= blocksize and blocksize % b == 0 and all(o % b == 0 for o in offsets):
            return b
    return None


def slice_4bit_rows(
    packed: torch.Tensor, state: QuantState, start: int, end: int
) -> tuple[torch.Tensor, QuantState] | None:
    """Rows [start, end) of a packed [out, in] weight, exact; None where no bitsandbytes
    blocksize can express the cut (then the caller dequantizes the slice)."""
    rows, cols = state.shape
    if (start, end) == (0, rows):
        return packed.reshape(-1), state
    first, last = start * cols, end * cols
    b = sub_blocksize(state.blocksize, [first, last])
    if b is None:
        return None
    flat = packed.reshape(-1)[first // 2 : last // 2]
    origins = torch.arange(first, last, b)  # first element of each block of the slice
    return flat, _with(state, state.absmax[origins // state.blocksize], (end - start, cols), b)


def slice_4bit_cols(
    packed: torch.Tensor, state: QuantState, start: int, end: int
) -> tuple[torch.Tensor, QuantState] | None:
    """Columns [start, end) of a packed [out, in] weight, exact; None where no
    bitsandbytes blocksize can express the cut."""
    rows, cols = state.shape
    if (start, end) == (0, cols):
        return packed.reshape(-1), state
    width = end - start
    # Blocks of b must tile each row of the slice and start b-aligned in every row.
    b = sub_blocksize(state.blocksize, [cols, start, width])
    if b is None:
        return None
    flat = packed.reshape(rows, cols // 2)[:, start // 2 : end // 2].reshape(-1)
    origins = torch.arange(rows).unsqueeze(1) * cols + torch.arange(start, end, b)
    absmax = state.absmax[origins.reshape(-1) // state.blocksize]
    return flat, _with(state, absmax, (rows, width), b)


def _with(
    state: QuantState, absmax: torch.Tensor, shape: tuple[int, ...], blocksize: int | None = None
) -> QuantState:
    return QuantState(
        absmax=absmax.contiguous(), shape=torch.Size(shape), code=state.code,
        blocksize=blocksize or state.blocksize, quant_type=state.quant_type, dtype=state.dtype,
    )


def with_blocksize(state: QuantState, blocksize: int) -> QuantState:
    """The same weight in blocks of `blocksize` (a divisor of its own): each block's
    absmax repeated, so it dequantizes bit for bit as before."""
    if blocksize == state.blocksize:
        return state
    n_blocks = _ceil_div(math.prod(state.shape), blocksize)
    absmax = state.absmax.repeat_interleave(state.blocksize // blocksize)[:n_blocks]
    return _with(state, absmax, tuple(state.shape), blocksize)


@contextlib.contextmanager
def bitsandbytes_float32_default() -> Iterator[None]:
    """Run bitsandbytes under the float32 default dtype it is written for.

    bitsandbytes builds its 4-bit code tables with `torch.tensor(values)`, i.e. in the
    default dtype, and caches them per process. vLLM loads weights under the model
    dtype, so in a bf16 engine NF4's -0.6962 became -0.6953, the quantization bounds
    moved, and 0.5-1 % of the packed bytes differed from the bytes transformers +
    bitsandbytes write for the same weight (transformers quantizes under float32).
    Every quantize and dequantize of ours runs inside this, so the first (cached)
    table of the process is the float32 one as well."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float32)
    try:
        yield
    finally:
        torch.set_default_dtype(previous)


def dequantize_4bit(packed: torch.Tensor, state: QuantState, dtype: torch.dtype) -> torch.Tensor:
    """The weight, flat (reshape to `state.shape`). Blocks run over the flattened weight;
    bitsandbytes' CPU kernel (0.50.2) restarts them at every row when given a 2-D shape
    whose rows are not whole blocks (e.g. [64, 96] in blocks of 64), so it gets 1-D."""
    flat = _with(state, state.absmax, (math.prod(state.shape),))
    with bitsandbytes_float32_default():
        return bnbf.dequantize_4bit(packed.reshape(-1, 1), flat).to(dtype)


def dequantize_8bit(weight: torch.Tensor, state: Int8State, dtype: torch.dtype) -> torch.Tensor:
    with bitsandbytes_float32_default():
        return bnbf.int8_vectorwise_dequant(weight, state.scb).to(dtype)


def quantize_4bit(
    weight: torch.Tensor, quant_type: str, blocksize: int, dtype: torch.dtype
) -> tuple[torch.Tensor, QuantState]:
    """Quantize a plain weight in flight, with float32 absmax (no double quant: the
    statistics are flattened at load anyway): the bytes and absmax transformers +
    bitsandbytes produce for the same weight."""
    with bitsandbytes_float32_default():
        packed, state = bnbf.quantize_4bit(
            weight.contiguous(), blocksize=blocksize, quant_type=quant_type,
            compress_statistics=False,
        )
    state.dtype = dtype
    state.absmax = state.absmax.float()
    return packed.reshape(-1), state


def quantize_8bit(weight: torch.Tensor) -> tuple[torch.Tensor, Int8State]:
    """LLM.int8 row quantization as transformers' Int8Params does it (through float16)."""
    with bitsandbytes_float32_default():
        cb, scb, _ = bnbf.int8_vectorwise_quant(weight.to(torch.float16).contiguous())
    return cb, Int8State(scb=scb.float())


def can_merge_4bit(states: list[QuantState]) -> bool:
    """Row-stacked shards share one QuantState when their blocks tile the rows exactly
    (at the smallest of their blocksizes, to which the others are re-expressed)."""
    first = states[0]
    blocksize = min(s.blocksize for s in states)
    return all(
        s.quant_type == first.quant_type
        and s.shape[1] == first.shape[1]
        and (s.shape[0] * s.shape[1]) % blocksize == 0
        and torch.equal(s.code, first.code)
        for s in states
    )


def merge_4bit(states: list[QuantState], dtype: torch.dtype) -> QuantState:
    blocksize = min(s.blocksize for s in states)
    states = [with_blocksize(s, blocksize) for s in states]
    rows = sum(s.shape[0] for s in states)
    merged = _with(states[0], torch.cat([s.absmax for s in states]), (rows, states[0].shape[1]))
    merged.dtype = dtype
    return merged


def repack_for_cpu_kernel(
    packed: torch.Tensor, state: QuantState, block_n: int = 32, in_place: bool = False
) -> tuple[torch.Tensor, QuantState]:
    """The weight layout of bitsandbytes' AVX512-BF16 4-bit kernel, byte for byte what
    `bitsandbytes.functional._convert_weight_packed_for_cpu` produces (which unpacks every
    nibble to int32 first: 4x the memory traffic, the largest cost of loading). One pass of
    our C routine where it builds, else uint8 tensor ops. `state` must have flat float32
    absmax. `in_place`: the caller gives up `packed` (contiguous), which then holds the
    result: no second weight-sized buffer at load (where the C routine builds)."""
    n, k = state.shape
    if cpu.kernels() is not None and in_place and packed.is_contiguous():
        out = cpu.repack_inplace(packed.reshape(-1), n, k)
    elif cpu.kernels() is not None:
        out = cpu.repack(packed.reshape(-1), n, k)
    else:
        out = _repack_with_torch(packed, n, k, block_n)
    cpu_state = _with(state, state.absmax, (n, k))
    cpu_state.absmax = (
        state.absmax.reshape(n, k // state.blocksize).t().to(torch.bfloat16).contiguous()
    )
    cpu_state.code = state.code.float().contiguous()
    cpu_state.dtype = torch.bfloat16
    cpu_state.packing_format_for_cpu = True
    return out, cpu_state


def _repack_with_torch(packed: torch.Tensor, n: int, k: int, block_n: int) -> torch.Tensor:
    # Plain byte (row r, column pair p) holds W[r, 2p] high, W[r, 2p+1] low. In each block
    # of block_n rows, kernel byte 2j + c of pair p holds W[j, 2p + c] low and
    # W[j + block_n/2, 2p + c] high: combine the two half-blocks' bytes, then put the pairs
    # (c = 0, 1) of all j for one p next to each other (as int16, so the transposing copy
    # moves 2 bytes at a time).
    half = block_n // 2
    rows = packed.reshape(n // block_n, 2, half, k // 2)
    low, high = rows[:, 0], rows[:, 1]
    even = (high & 0xF0) | (low >> 4)
    odd = (high << 4) | (low & 0x0F)
    pairs = torch.stack((even, odd), dim=-1).view(torch.int16).squeeze(-1)
    out = torch.empty(n, k // 2, dtype=torch.uint8)
    out.view(torch.int16).view(n // block_n, k // 2, half).copy_(pairs.transpose(1, 2))
    return out


def slice_rows_cols(
    t: torch.Tensor, rows: tuple[int, int] | None, cols: tuple[int, int] | None
) -> torch.Tensor:
    """Rows [a, b) and columns [c, d) of a plain 2-D weight (None: all), as a view."""
    if rows is not None:
        t = t[rows[0] : rows[1]]
    if cols is not None:
        t = t[:, cols[0] : cols[1]]
    return t
