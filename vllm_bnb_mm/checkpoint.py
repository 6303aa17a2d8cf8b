"""Reading BnB safetensors checkpoints: headers, module layout, quant states.

A transformers + bitsandbytes checkpoint stores, for every quantized Linear `P`:
- 4-bit: `P.weight` (packed bytes: uint8, or whatever `bnb_4bit_quant_storage` named,
  the same bytes in a wider dtype), `P.weight.absmax`, `P.weight.quant_map`, optional
  `P.weight.nested_absmax` / `P.weight.nested_quant_map` (double quant) and
  `P.weight.quant_state.bitsandbytes__nf4|fp4` (JSON bytes);
- 8-bit: `P.weight` (int8 [out, in]), `P.SCB` (fp32 row scales), `P.weight_format`.
Everything else is a plain tensor. The tensors, not the config's skip list, say what is
quantized, so the layout is read from the headers before the model is built.
"""

from __future__ import annotations

import json
import mmap
import os
import struct
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Literal

import torch

QuantKind = Literal["4bit", "8bit"]

FOURBIT_STATE_SUFFIXES = (
    "absmax",
    "quant_map",
    "nested_absmax",
    "nested_quant_map",
    "quant_state.bitsandbytes__nf4",
    "quant_state.bitsandbytes__fp4",
)
EIGHTBIT_STATE_SUFFIXES = ("SCB", "weight_format")
MAX_HEADER_BYTES = 100 * 1024 * 1024
MAX_QUANT_STATE_JSON_BYTES = 64 * 1024
QUANT_STATE_JSON_PREFIX = "quant_state.bitsandbytes__"
FOURBIT_QUANT_TYPES = ("nf4", "fp4")
RESAVE_HINT = "Re-save the checkpoint with transformers + bitsandbytes (save_pretrained)."
REDOWNLOAD_HINT = "Re-download or re-save the file."

_SAFETENSORS_DTYPES = {
    "BOOL": torch.bool,
    "U8": torch.uint8,
    "I8": torch.int8,
    "I16": torch.int16,
    "U16": torch.uint16,
    "I32": torch.int32,
    "U32": torch.uint32,
    "I64": torch.int64,
    "U64": torch.uint64,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "F32": torch.float32,
    "F64": torch.float64,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
}


class CheckpointError(ValueError):
    """A checkpoint that cannot be loaded; the message names the tensor and file."""


@dataclass(frozen=True)
class TensorInfo:
    name: str
    file: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    start: int  # byte offset of the data inside the file
    end: int


@dataclass
class QuantizedWeight:
    """One packed weight and the names of its quant-state tensors."""

    weight: str
    kind: QuantKind
    state_tensors: dict[str, str] = field(default_factory=dict)  # suffix -> full name


@dataclass
class CheckpointLayout:
    """What the checkpoint's own tensors say: every tensor, and which weights are packed."""

    tensors: dict[str, TensorInfo]
    quantized: dict[str, QuantizedWeight]  # weight name -> packed weight

    @property
    def state_tensor_names(self) -> set[str]:
        return {n for q in self.quantized.values() for n in q.state_tensors.values()}

    def module_kinds(self) -> dict[str, QuantKind | Literal["plain"]]:
        """`module -> 4bit | 8bit | plain` for every module with a `.weight` tensor."""
        kinds: dict[str, QuantKind | Literal["plain"]] = {}
        for name in self.tensors:
            if name.endswith(".weight"):
                kinds[name.removesuffix(".weight")] = "plain"
        for weight, q in self.quantized.items():
            kinds[weight.removesuffix(".weight")] = q.kind
        return kinds


def read_safetensors_header(path: str) -> dict[str, TensorInfo]:
    """Parse a safetensors header without reading tensor data."""
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        raw_len = f.read(8)
        if len(raw_len) != 8:
            raise CheckpointError(f"{path}: file is too short to be safetensors")
        (header_len,) = struct.unpack("<Q", raw_len)
        if header_len > MAX_HEADER_BYTES or 8 + header_len > size:
            raise CheckpointError(
                f"{path}: header length {header_len} exceeds the file size {size} "
                "(truncated or not a safetensors file)"
            )
        try:
            header = json.loads(f.read(header_len))
        except (ValueError, RecursionError) as e:  # bad UTF-8 and bad JSON alike
            raise CheckpointError(
                f"{path}: safetensors header is not valid JSON: {e}. {REDOWNLOAD_HINT}"
            ) from e
    if not isinstance(header, dict):
        raise CheckpointError(f"{path}: safetensors header is not a JSON object. {REDOWNLOAD_HINT}")
    data_start = 8 + header_len
    infos: dict[str, TensorInfo] = {}
    for name, meta in header.items():
        if name == "__metadata__":
            continue
        infos[name] = _tensor_info(path, name, meta, data_start, size)
    return infos


def _tensor_info(path: str, name: str, meta: dict, data_start: int, size: int) -> TensorInfo:
    try:
        dtype_name = meta["dtype"]
        shape = tuple(int(d) for d in meta["shape"])
        begin, end = (int(o) for o in meta["data_offsets"])
    except (KeyError, TypeError, ValueError, OverflowError) as e:
        raise CheckpointError(
            f"{path}: tensor {name!r} has a malformed header entry {str(meta)[:200]}. "
            f"{REDOWNLOAD_HINT}"
        ) from e
    dtype = _SAFETENSORS_DTYPES.get(dtype_name) if isinstance(dtype_name, str) else None
    if dtype is None:
        raise CheckpointError(
            f"{path}: tensor {name!r} has unsupported dtype {dtype_name!r}; known: "
            f"{sorted(_SAFETENSORS_DTYPES)}"
        )
    if any(d < 0 for d in shape) or begin < 0:
        raise CheckpointError(
            f"{path}: tensor {name!r} has a negative shape or offset in its header entry "
            f"{str(meta)[:200]}. {REDOWNLOAD_HINT}"
        )
    numel = 1
    for d in shape:
        numel *= d
    expected = numel * dtype.itemsize
    if end - begin != expected:
        raise CheckpointError(
            f"{path}: tensor {name!r} header says {dtype_name}{list(shape)} "
            f"({expected} bytes) but its data span is {end - begin} bytes: the header is "
            f"corrupt. {REDOWNLOAD_HINT}"
        )
    if data_start + end > size:
        raise CheckpointError(
            f"{path}: tensor {name!r} ends at byte {data_start + end}, past the end of the "
            f"file ({size} bytes): the file is truncated. {REDOWNLOAD_HINT}"
        )
    return TensorInfo(name, path, dtype, shape, data_start + begin, data_start + end)


def scan_checkpoint(files: list[str]) -> CheckpointLayout:
    """Read every header once and group each packed weight with its quant-state tensors."""
    tensors: dict[str, TensorInfo] = {}
    for path in files:
        for name, info in read_safetensors_header(path).items():
            if name in tensors:
                raise CheckpointError(
                    f"tensor {name!r} appears in both {tensors[name].file} and {path}"
                )
            tensors[name] = info
    return CheckpointLayout(tensors, _group_quantized(tensors))


def _group_quantized(tensors: dict[str, TensorInfo]) -> dict[str, QuantizedWeight]:
    quantized: dict[str, QuantizedWeight] = {}
    for name in tensors:
        _check_quant_type_key(name, tensors[name].file)
        for suffix in FOURBIT_STATE_SUFFIXES:
            if name.endswith(".weight." + suffix):
                weight = name[: -len(suffix) - 1]
                q = quantized.setdefault(weight, QuantizedWeight(weight, "4bit"))
                q.state_tensors[suffix] = name
        for suffix in EIGHTBIT_STATE_SUFFIXES:
            if name.endswith("." + suffix) and not name.endswith(".weight." + suffix):
                weight = name[: -len(suffix) - 1] + ".weight"
                q = quantized.setdefault(weight, QuantizedWeight(weight, "8bit"))
                if q.kind != "8bit":
                    raise CheckpointError(
                        f"tensor {name!r} ({tensors[name].file}) is 8-bit state but "
                        f"{weight!r} also has 4-bit state"
                    )
                q.state_tensors[suffix] = name
    for weight, q in quantized.items():
        _check_group(weight, q, tensors)
    return quantized


def _check_quant_type_key(name: str, file: str) -> None:
    # A state JSON for an unknown type would otherwise not be grouped at all, and the
    # weight would be reported as "missing" its JSON when the JSON is right there.
    marker = ".weight." + QUANT_STATE_JSON_PREFIX
    if marker not in name:
        return
    quant_type = name.rsplit("__", 1)[1]
    if quant_type not in FOURBIT_QUANT_TYPES:
        raise CheckpointError(
            f"{file}: quant-state tensor {name!r} is for quant_type {quant_type!r}; "
            f"bitsandbytes 4-bit supports {FOURBIT_QUANT_TYPES}. The checkpoint was not "
            f"written by bitsandbytes or is corrupt. {RESAVE_HINT}"
        )


def _check_group(weight: str, q: QuantizedWeight, tensors: dict[str, TensorInfo]) -> None:
    some_file = tensors[next(iter(q.state_tensors.values()))].file
    if weight not in tensors:
        raise CheckpointError(
            f"{some_file}: quant state {sorted(q.state_tensors.values())} found but the "
            f"packed weight {weight!r} itself is missing"
        )
    info = tensors[weight]
    if q.kind == "4bit":
        json_keys = [k for k in q.state_tensors if k.startswith("quant_state.")]
        required = {"absmax": "absmax", "quant_map": "quant_map"}
        missing = [f"{weight}.{v}" for k, v in required.items() if k not in q.state_tensors]
        if not json_keys:
            missing.append(f"{weight}.quant_state.bitsandbytes__nf4|fp4")
        if len(json_keys) > 1:
            raise CheckpointError(
                f"{info.file}: {weight!r} has both nf4 and fp4 quant-state JSON tensors. "
                f"{RESAVE_HINT}"
            )
        if ("nested_absmax" in q.state_tensors) != ("nested_quant_map" in q.state_tensors):
            missing.append(f"{weight}.nested_absmax / nested_quant_map (double quant pair)")
        if missing:
            raise CheckpointError(
                f"{info.file}: 4-bit weight {weight!r} is missing quant-state tensor(s): "
                + ", ".join(missing)
                + f". {RESAVE_HINT}"
            )
        # Any dtype is fine: bnb_4bit_quant_storage (bf16/fp16/fp32 in FSDP-QLoRA setups)
        # labels the same packed bytes with a wider dtype; the byte count is checked
        # against the quant state when it is parsed.
    else:
        if "SCB" not in q.state_tensors:
            raise CheckpointError(
                f"{info.file}: 8-bit weight {weight!r} is missing its row scales "
                f"{weight.removesuffix('.weight')}.SCB. {RESAVE_HINT}"
            )
        if info.dtype != torch.int8:
            raise CheckpointError(
                f"{info.file}: 8-bit weight {weight!r} is stored as {info.dtype}, expected "
                f"int8. {RESAVE_HINT}"
            )


def packed_bytes(tensor: torch.Tensor) -> torch.Tensor:
    """A packed 4-bit weight as the uint8 bytes bitsandbytes reads ([n, 1], whatever
    dtype `bnb_4bit_quant_storage` stored them as)."""
    if tensor.dtype == torch.uint8:
        return tensor
    return tensor.reshape(-1).view(torch.uint8).reshape(-1, 1)


def find_unpaired_packed_weights(layout: CheckpointLayout) -> list[TensorInfo]:
    """Integer `.weight` tensors that have no quant state: a quant state was dropped."""
    return [
        info
        for name, info in layout.tensors.items()
        if name.endswith(".weight")
        and info.dtype in (torch.uint8, torch.int8)
        and name not in layout.quantized
    ]


# What to do with MoE experts that the checkpoint stores unquantized (transformers 5 keeps
# experts as 3-D parameters, which bitsandbytes never quantizes): "quantize" them while
# loading (default), or keep them "unquantized". A top-level config key, so it can be set
# in config.json or with `--hf-overrides '{"bnb_moe_experts": "unquantized"}'`.
MOE_EXPERTS_KEY = "bnb_moe_experts"
MOE_EXPERTS_MODES = ("quantize", "unquantized")
# The blocksize of weights quantized while loading: bitsandbytes' default, which is also
# all transformers writes (its BitsAndBytesConfig has no blocksize).
IN_FLIGHT_BLOCKSIZE = 64


@dataclass(frozen=True)
class DeclaredQuantization:
    """What config.json's bitsandbytes quantization_config says, for the tensor checks."""

    pre_quantized: bool  # quant_method is "bitsandbytes": the weights are already packed
    kind: QuantKind  # what layers are built as
    declared_kind: QuantKind | None  # None: neither load_in_4bit nor load_in_8bit is set


def declared_quantization(quantization_config: dict | None) -> DeclaredQuantization | None:
    """config.json's quantization_config in the loader's terms; None when not bitsandbytes.
    transformers writes `load_in_4bit` and the private `_load_in_4bit` (likewise 8-bit)."""
    if not quantization_config or quantization_config.get("quant_method") != "bitsandbytes":
        return None

    def flag(name: str) -> bool:
        value = quantization_config.get(name)
        return bool(quantization_config.get("_" + name) if value is None else value)

    eight, four = flag("load_in_8bit"), flag("load_in_4bit")
    declared: QuantKind | None = "8bit" if eight else "4bit" if four else None
    return DeclaredQuantization(True, "8bit" if eight else "4bit", declared)


def check_quantization_matches(
    layout: CheckpointLayout, files: list[str], declared: DeclaredQuantization | None
) -> None:
    """The tensors against the config: every packed weight has its state, and the config
    says bitsandbytes, of the kind the tensors are. `declared` is None when the model is
    not configured for bitsandbytes."""
    unpaired = find_unpaired_packed_weights(layout)
    if unpaired:
        info = unpaired[0]
        raise CheckpointError(
            f"{info.file}: {info.name!r} is {info.dtype} (looks packed) but has no "
            "bitsandbytes quant state (absmax/quant_map/quant_state JSON or SCB); "
            f"{len(unpaired)} such tensor(s)"
        )
    if layout.quantized and declared is None:
        first = next(iter(layout.quantized.values()))
        raise CheckpointError(
            f"{layout.tensors[first.weight].file}: {first.weight!r} is a packed "
            "bitsandbytes weight but the model is not configured for bitsandbytes: "
            "add `--quantization bitsandbytes` or a quantization_config"
        )
    if declared is None or not declared.pre_quantized:
        return
    kinds = {q.kind for q in layout.quantized.values()}
    if kinds and declared.declared_kind is None:
        first = next(iter(layout.quantized.values()))
        flag = "load_in_8bit" if first.kind == "8bit" else "load_in_4bit"
        raise CheckpointError(
            f"{layout.tensors[first.weight].file}: quantization_config in config.json "
            f"sets neither load_in_4bit nor load_in_8bit to true, and {first.weight!r} "
            f"is {first.kind}: add \"{flag}\": true to quantization_config"
        )
    if kinds and declared.kind not in kinds:
        first = next(iter(layout.quantized.values()))
        raise CheckpointError(
            f"{layout.tensors[first.weight].file}: quantization_config says "
            f"{declared.kind} but {first.weight!r} is {first.kind}: the config "
            "contradicts the tensors; fix load_in_4bit/load_in_8bit in config.json"
        )
    if not layout.quantized:
        raise CheckpointError(
            f"{files[0]}: quantization_config says bitsandbytes but no tensor in "
            f"{len(files)} file(s) is packed"
        )


def narrowed_absmax(layout: CheckpointLayout) -> list[str]:
    """absmax tensors stored as float16/bfloat16: bitsandbytes writes float32, so these
    were cast after quantizing (they load upcast, exactly as stored, less precise)."""
    return [
        q.state_tensors["absmax"] for q in layout.quantized.values()
        if q.kind == "4bit" and "nested_absmax" not in q.state_tensors
        and layout.tensors[q.state_tensors["absmax"]].dtype in (torch.float16, torch.bfloat16)
    ]


class FileReader:
    """Maps each safetensors file once and hands out zero-copy views of it.

    Tensors handed to the model are read-only-in-spirit views of a private
    (copy-on-write) mapping: the bytes are read from the page cache exactly once, by the
    copy into the parameter that keeps them, and never duplicated in anonymous memory.
    """

    def __init__(self) -> None:
        self._buffers: dict[str, torch.Tensor] = {}
        self._maps: dict[str, mmap.mmap] = {}
        self._done: dict[str, int] = {}  # path -> bytes [0, n) already given back

    def buffer(self, path: str) -> torch.Tensor:
        buf = self._buffers.get(path)
        if buf is None:
            with open(path, "rb") as f:
                mapped = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # torch warns about buffer protocol quirks
                buf = torch.frombuffer(mapped, dtype=torch.uint8)
            self._maps[path] = mapped
            self._buffers[path] = buf
        return buf

    def tensor(self, info: TensorInfo) -> torch.Tensor:
        """A zero-copy view of one tensor (mapping its file on first use: lazy, so the
        small quant-state tensors cost a page fault each, not a file open)."""
        raw = self.buffer(info.file)[info.start : info.end]
        if info.dtype.itemsize > 1 and info.start % info.dtype.itemsize:
            raw = raw.clone()  # unaligned data cannot be viewed as a wider dtype
        return raw.view(info.dtype).reshape(info.shape)

    def done_before(self, path: str, end: int) -> None:
        """The caller has copied everything it needs from the file's bytes [0, end): unmap
        those pages from this process (MADV_DONTNEED), so RSS holds the parameters plus
        the part of the file being copied, not the whole file on top of them. The data
        stays in the page cache, and views into that range that are still alive (e.g. a
        float32 absmax) read the same bytes again from the file: this is a private
        mapping nobody writes to, so dropping a page loses nothing."""
        mapped = self._maps.get(path)
        start = self._done.get(path, 0)
        stop = end // mmap.PAGESIZE * mmap.PAGESIZE
        if mapped is None or stop <= start:
            return
        mapped.madvise(mmap.MADV_DONTNEED, start, stop - start)
        self._done[path] = stop

    def release(self, path: str) -> None:
        # Views handed out may still be referenced by the model (e.g. tensors it kept);
        # dropping our references lets the mapping close when the last view dies.
        self._buffers.pop(path, None)
        self._maps.pop(path, None)
        self._done.pop(path, None)


def iter_files_in_order(layout: CheckpointLayout) -> Iterator[tuple[str, list[TensorInfo]]]:
    """Tensors grouped by file, in file order, each file's tensors by offset."""
    by_file: dict[str, list[TensorInfo]] = {}
    for info in layout.tensors.values():
        by_file.setdefault(info.file, []).append(info)
    for path in sorted(by_file):
        yield path, sorted(by_file[path], key=lambda i: i.start)
