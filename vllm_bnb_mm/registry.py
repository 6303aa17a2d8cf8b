"""Which checkpoint tensors handed to the model are packed, and what happened to them.

Models rename and restack weights inside their own `load_weights`, and may hand the
same bytes to several shards (`detach()` views for k_eq_v layers). Keying by the
tensor's data pointer follows the bytes through all of that, so each weight loader
can ask "is this packed, and with which quant state?" without knowing any names.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from bitsandbytes.functional import QuantState

from .quant_state import Int8State


@dataclass
class PackedTensor:
    name: str
    file: str
    kind: str  # "4bit" | "8bit"
    state: QuantState | Int8State
    data: torch.Tensor


@dataclass
class LoadRecord:
    yielded: dict[str, int] = field(default_factory=dict)  # checkpoint name -> data_ptr
    seen: set[int] = field(default_factory=set)  # data_ptr of tensors given to a loader
    dequantized: dict[str, int] = field(default_factory=dict)  # name -> extra bytes
    quantized_in_flight: set[str] = field(default_factory=set)  # layer prefixes


class PackedRegistry:
    def __init__(self) -> None:
        self._by_ptr: dict[int, PackedTensor] = {}
        self.record = LoadRecord()

    def reset(self) -> None:
        self._by_ptr.clear()
        self.record = LoadRecord()

    def add(self, entry: PackedTensor) -> None:
        self._by_ptr[entry.data.data_ptr()] = entry

    def lookup(self, tensor: torch.Tensor) -> PackedTensor | None:
        entry = self._by_ptr.get(tensor.data_ptr())
        if entry is None or entry.data.numel() != tensor.numel():
            return None
        return entry

    def note_yielded(self, name: str, tensor: torch.Tensor) -> None:
        self.record.yielded[name] = tensor.data_ptr()

    def note_seen(self, tensor: torch.Tensor) -> None:
        self.record.seen.add(tensor.data_ptr())

    def note_quantized_in_flight(self, prefix: str) -> None:
        self.record.quantized_in_flight.add(prefix)

    def note_dequantized(self, name: str, extra_bytes: int) -> None:
        self.record.dequantized[name] = extra_bytes


PACKED = PackedRegistry()
