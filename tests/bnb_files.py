"""Write small safetensors files the way transformers + bitsandbytes store BnB weights."""

from __future__ import annotations

from pathlib import Path

import torch
from bitsandbytes import functional as bnbf
from safetensors.torch import save_file


def packed_4bit_tensors(
    name: str, weight: torch.Tensor, quant_type: str = "nf4", double_quant: bool = True,
    blocksize: int = 64,
) -> dict[str, torch.Tensor]:
    packed, state = bnbf.quantize_4bit(
        weight, blocksize=blocksize, quant_type=quant_type, compress_statistics=double_quant
    )
    tensors = {f"{name}.weight": packed}
    for key, value in state.as_dict(packed=True).items():
        tensors[f"{name}.weight.{key}"] = value
    return tensors


def packed_8bit_tensors(name: str, weight: torch.Tensor) -> dict[str, torch.Tensor]:
    cb, scb, _ = bnbf.int8_vectorwise_quant(weight.to(torch.float16))
    return {
        f"{name}.weight": cb,
        f"{name}.SCB": scb.float(),
        f"{name}.weight_format": torch.tensor(0, dtype=torch.uint8),
    }


def write(path: Path, tensors: dict[str, torch.Tensor]) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path))
    return str(path)
