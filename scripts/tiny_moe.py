"""Mixture-of-experts parts of the tiny-checkpoint builder: Qwen3-MoE and Gemma 4 (with
`enable_moe_block`) models, the per-expert packed layout, and HF references whose experts
are the dequantization of exactly the quantization vLLM serves.

Expert storage recipes (``Variant.moe`` in build_tiny_checkpoints.py):

- ``t5``: the checkpoint as transformers 5 + bitsandbytes save it: attention & co packed,
  experts bf16 (3-D ``experts.gate_up_proj`` / ``experts.down_proj`` in Gemma 4; per-expert
  ``mlp.experts.N.*_proj.weight`` in Qwen3-MoE). The plugin quantizes those experts while
  loading (nf4, blocksize 64, no double quant, one quantization per expert and
  projection); the reference is HF with each expert weight replaced by bitsandbytes'
  dequantization of that quantization.
- ``keep``: the same files with ``bnb_moe_experts: "unquantized"`` in config.json: served
  with bf16 experts; the reference is HF on the checkpoint as saved.
- ``per_expert``: what transformers 4.x / unsloth wrote for MoE models: one packed tensor
  per expert and projection (``...experts.N.gate_proj.weight`` + absmax, quant_map,
  nested_*, quant_state JSON; or int8 + SCB), and a packed router where the model's router
  is a Linear (Qwen3-MoE's ``mlp.gate``). The reference is HF with experts and router set
  to bitsandbytes' dequantization of the packed tensors in the files.
- ``in_flight``: the bf16 checkpoint, served with ``--quantization bitsandbytes``; the
  reference is HF quantizing it in flight (nf4, no double quant) with experts as in
  ``t5``.

Routers: vLLM builds them plain and the plugin never quantizes them. Where HF holds a
router as Linear4bit (Gemma 4's ``router.proj`` is an nn.Linear, quantized by
transformers), the reference computes it as a plain Linear: with the saved bf16 weight in
flight, with its dequantized weight when the checkpoint stores it packed (what the
loader puts into vLLM's plain router; HF's CPU 4-bit kernel would round the router's
input to bf16 and move near-tied expert choices).
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import transformers
from bitsandbytes import functional as bnbf
from bitsandbytes.functional import QuantState
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import BitsAndBytesConfig, Qwen3MoeConfig

import tiny_reference as ref

NUM_EXPERTS = 32  # >= 32: HF's CPU 4-bit kernel needs 32 outputs in Gemma 4's quantized router
TOP_K = 4
IN_FLIGHT = {"quant_type": "nf4", "blocksize": 64}  # the plugin's in-flight defaults
MOE_EXPERTS_KEY = "bnb_moe_experts"
RECIPES = ("t5", "keep", "per_expert", "in_flight")
_PROJECTIONS = ("gate_proj", "up_proj", "down_proj")


# --------------------------------------------------------------------------------------------
# Model configs and weights
# --------------------------------------------------------------------------------------------


def qwen3_moe_config(tokenizer: Any) -> Qwen3MoeConfig:
    """Hidden 128 / head_dim 64 / intermediate 128: TP=2 cuts fall on 64-element blocks."""
    return Qwen3MoeConfig(
        vocab_size=len(tokenizer),
        hidden_size=128,
        intermediate_size=256,
        moe_intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=2,
        head_dim=64,
        num_experts=NUM_EXPERTS,
        num_experts_per_tok=TOP_K,
        norm_topk_prob=True,
        decoder_sparse_step=1,
        max_position_embeddings=1024,
        tie_word_embeddings=False,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )


def gemma4_moe_text_overrides() -> dict[str, Any]:
    """Gemma 4's MoE block (26B-A4B-like) beside the dense MLP of the tiny text model."""
    return {
        "enable_moe_block": True,
        "num_experts": NUM_EXPERTS,
        "top_k_experts": TOP_K,
        "moe_intermediate_size": 64,
    }


# Gemma 4's router scales its normalized input by `scale` / sqrt(hidden): with the
# generic redraw (scale ~1) its logits have std 1/8 and 32 experts are all but tied, so
# any rounding difference picks other experts. Trained routers are decisive; std ~2 here.
GEMMA4_ROUTER_SCALE = 16.0


def redraw_experts(model: nn.Module, seed: int) -> None:
    """Fused 3-D expert weights [experts, out, in]: std 1/sqrt(in) per expert (the
    generic redraw would take out*in as the fan-in and make experts vanish); Gemma 4
    router logits spread like a trained router's."""
    gen = torch.Generator().manual_seed(seed + 7)
    with torch.no_grad():
        for module in model.modules():
            for name in ("gate_up_proj", "down_proj"):
                param = getattr(module, name, None)
                if isinstance(param, nn.Parameter) and param.ndim == 3:
                    noise = torch.randn(param.shape, generator=gen)
                    param.copy_(noise / math.sqrt(param.shape[-1]))
            if hasattr(module, "per_expert_scale") and hasattr(module, "proj"):
                module.scale.mul_(GEMMA4_ROUTER_SCALE)


# --------------------------------------------------------------------------------------------
# Files
# --------------------------------------------------------------------------------------------


def finish_files(ckpt_dir: Path, recipe: str, bnb: dict[str, Any] | None) -> dict[str, Any]:
    """Turn the saved checkpoint into the recipe's layout; returns a layout summary."""
    if recipe not in RECIPES:
        raise ValueError(f"unknown MoE recipe {recipe!r}; known: {RECIPES}")
    if recipe == "keep":
        config_path = ckpt_dir / "config.json"
        config = json.loads(config_path.read_text())
        config[MOE_EXPERTS_KEY] = "unquantized"
        config_path.write_text(json.dumps(config, indent=2))
    if recipe == "per_expert":
        if bnb is None:
            raise ValueError("the per_expert recipe needs a BitsAndBytesConfig")
        packed = _pack_experts(ckpt_dir, bnb)
        _check_no_plain_experts(ckpt_dir)
        return {"recipe": recipe, "packed_linear_tensors": packed}
    return {"recipe": recipe}


def _pack_experts(ckpt_dir: Path, bnb: dict[str, Any]) -> int:
    """Rewrite every expert (and a plain Linear-shaped router) as transformers 4.x wrote
    a quantized nn.Linear: one packed tensor per expert and projection, with its own
    quant state. Returns how many packed tensors were written."""
    files = sorted(ckpt_dir.glob("*.safetensors"))
    if len(files) != 1:
        raise AssertionError(f"{ckpt_dir}: expected one safetensors file, found {len(files)}")
    tensors = load_file(str(files[0]))
    out: dict[str, torch.Tensor] = {}
    count = 0
    for name, tensor in tensors.items():
        linears = _linear_weights(name, tensor)
        for module, weight in linears:
            out.update(_packed_linear(module, weight, bnb))
        count += len(linears)
        if not linears:
            out[name] = tensor
    out = {k: v.contiguous() for k, v in out.items()}
    save_file(out, str(files[0]), metadata={"format": "pt"})
    return count


def _linear_weights(name: str, tensor: torch.Tensor) -> list[tuple[str, torch.Tensor]]:
    """(module name, [out, in] weight) for each Linear-like weight this tensor holds:
    per-expert Qwen3 weights, Gemma 4's fused 3-D experts split per expert, the Qwen3
    router (``mlp.gate``, a Linear in transformers 4.x)."""
    if tensor.dtype != torch.bfloat16:
        return []
    if ".experts." in name and name.endswith("_proj.weight"):
        return [(name.removesuffix(".weight"), tensor)]
    if name.endswith(".experts.gate_up_proj"):
        prefix, inter = name.removesuffix(".gate_up_proj"), tensor.shape[1] // 2
        return [
            (f"{prefix}.{e}.{proj}", tensor[e, part * inter : (part + 1) * inter])
            for e in range(tensor.shape[0])
            for part, proj in enumerate(("gate_proj", "up_proj"))
        ]
    if name.endswith(".experts.down_proj"):
        prefix = name.removesuffix(".down_proj")
        return [(f"{prefix}.{e}.down_proj", tensor[e]) for e in range(tensor.shape[0])]
    if name.endswith(".mlp.gate.weight"):
        return [(name.removesuffix(".weight"), tensor)]
    return []


def _packed_linear(
    module: str, weight: torch.Tensor, bnb: dict[str, Any]
) -> dict[str, torch.Tensor]:
    """What bitsandbytes' Linear4bit / Linear8bitLt put in a state dict."""
    weight = weight.contiguous()
    if bnb.get("load_in_8bit"):
        cb, scb, _ = bnbf.int8_vectorwise_quant(weight.to(torch.float16))
        return {
            f"{module}.weight": cb,
            f"{module}.SCB": scb.float(),
            f"{module}.weight_format": torch.tensor(0, dtype=torch.uint8),
        }
    packed, state = bnbf.quantize_4bit(
        weight, blocksize=64, quant_type=bnb["bnb_4bit_quant_type"],
        compress_statistics=bool(bnb.get("bnb_4bit_use_double_quant")),
    )
    out = {f"{module}.weight": packed}
    for key, value in state.as_dict(packed=True).items():
        out[f"{module}.weight.{key}"] = value
    return out


# --------------------------------------------------------------------------------------------
# References
# --------------------------------------------------------------------------------------------


def reference_loader(
    recipe: str, base_dir: Path, ckpt_dir: Path, bnb: dict[str, Any] | None
) -> Callable[..., tuple[nn.Module, list[str]]] | None:
    """A `load_model(ckpt_dir, architecture, dtype, probe)` for tiny_reference, or None
    for the plain HF reference of the checkpoint as saved (``keep``)."""
    if recipe == "keep":
        return None

    def load(_ckpt, architecture: str, dtype: torch.dtype, probe) -> tuple[nn.Module, list[str]]:
        model = _quantized_like_saved(base_dir, architecture, dtype, recipe, bnb)
        notes = [
            _patch_experts(model, recipe, ckpt_dir, bnb),
            _plain_routers(model, recipe, base_dir if recipe == "in_flight" else ckpt_dir, dtype),
        ]
        if recipe == "per_expert":
            notes.append(_dequantize_packed_routers(model, ckpt_dir))
        if ref._probe(model, probe) is not None:
            raise RuntimeError(f"HF inference fails for the patched {ckpt_dir.name}")
        return model, [n for n in notes if n]

    return load


def _quantized_like_saved(base_dir, architecture, dtype, recipe, bnb) -> nn.Module:
    """HF quantizing the bf16 base in flight: the same packed bytes the saved BnB
    checkpoint holds (bitsandbytes' quantization is deterministic)."""
    if recipe == "in_flight":
        config = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type=IN_FLIGHT["quant_type"],
            bnb_4bit_use_double_quant=False, bnb_4bit_compute_dtype=dtype,
        )
    else:
        kwargs = dict(bnb or {})
        if "bnb_4bit_compute_dtype" in kwargs:
            kwargs["bnb_4bit_compute_dtype"] = dtype
        config = BitsAndBytesConfig(**kwargs)
    cls = getattr(transformers, architecture)
    model = cls.from_pretrained(base_dir, quantization_config=config, dtype=dtype).eval()
    ref._set_bnb_compute_dtype(model, dtype)
    return model


def _experts_modules(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """transformers 5 experts modules: fused 3-D `gate_up_proj` [E, 2I, H] and `down_proj`
    [E, H, I]. Their names are the checkpoint's module names (per-expert files append
    `.N.gate_proj` etc.)."""
    return [
        (name, m) for name, m in model.named_modules()
        if isinstance(getattr(m, "gate_up_proj", None), nn.Parameter)
        and m.gate_up_proj.ndim == 3
    ]


def _patch_experts(model: nn.Module, recipe: str, ckpt_dir: Path, bnb) -> str:
    packed = _file_tensors(ckpt_dir) if recipe == "per_expert" else None
    eight_bit = bool(bnb and bnb.get("load_in_8bit")) and recipe != "in_flight"
    with torch.no_grad():
        for name, experts in _experts_modules(model):
            inter = experts.gate_up_proj.shape[1] // 2
            for e in range(experts.gate_up_proj.shape[0]):
                views = {
                    "gate_proj": experts.gate_up_proj[e, :inter],
                    "up_proj": experts.gate_up_proj[e, inter:],
                    "down_proj": experts.down_proj[e],
                }
                for proj, view in views.items():
                    if packed is not None:
                        value = _dequantize_from_file(packed, f"{name}.{e}.{proj}")
                    else:  # the bf16 checkpoint value (float32 models hold it exactly)
                        value = _quantized_in_flight(view.to(torch.bfloat16), eight_bit)
                    view.copy_(value.to(view.dtype))
    if packed is not None:
        return "expert weights: bitsandbytes' dequantization of the packed per-expert tensors"
    how = "int8" if eight_bit else "nf4, blocksize 64, no double quant"
    return f"expert weights: bitsandbytes' dequantization of their in-flight {how} quantization"


def _quantized_in_flight(weight: torch.Tensor, eight_bit: bool) -> torch.Tensor:
    """What the plugin holds for a plain bf16 expert weight, dequantized to float32."""
    if eight_bit:
        cb, scb, _ = bnbf.int8_vectorwise_quant(weight.to(torch.float16).contiguous())
        return bnbf.int8_vectorwise_dequant(cb, scb)
    packed, state = bnbf.quantize_4bit(
        weight.contiguous(), blocksize=IN_FLIGHT["blocksize"],
        quant_type=IN_FLIGHT["quant_type"], compress_statistics=False,
    )
    state.dtype = torch.float32
    return bnbf.dequantize_4bit(packed, state)


def _file_tensors(ckpt_dir: Path) -> dict[str, torch.Tensor]:
    tensors: dict[str, torch.Tensor] = {}
    for file in sorted(ckpt_dir.glob("*.safetensors")):
        tensors.update(load_file(str(file)))
    return tensors


def _dequantize_from_file(
    tensors: dict[str, torch.Tensor], module: str, float32: bool = True
) -> torch.Tensor:
    """bitsandbytes' own reading of one packed Linear weight: in float32 (experts, which
    the plugin dequantizes in the compute dtype), or, like a Linear4bit's forward does,
    in the dtype its quant state was saved with (weights the loader hands to plain
    parameters)."""
    weight = tensors[f"{module}.weight"]
    if f"{module}.SCB" in tensors:
        return bnbf.int8_vectorwise_dequant(weight, tensors[f"{module}.SCB"])
    prefix = f"{module}.weight."
    state_dict = {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}
    state = QuantState.from_dict(state_dict, device=torch.device("cpu"))
    if float32:
        state.dtype = torch.float32
    return bnbf.dequantize_4bit(weight, state)


def _plain_routers(model: nn.Module, recipe: str, files: Path, dtype: torch.dtype) -> str:
    """vLLM builds routers plain. A router HF quantizes like any nn.Linear (Gemma 4's
    `router.proj`) becomes what the plugin holds, read from `files`: in flight the bf16
    weight (routers are never quantized in flight); pre-quantized its dequantized weight
    (the loader dequantizes packed tensors bound for plain parameters as Linear4bit's own
    forward does: to the dtype the quant state was saved with)."""
    import bitsandbytes as bnb

    tensors = _file_tensors(files)
    count = 0
    for name, module in list(model.named_modules()):
        proj = getattr(module, "proj", None)
        if not (name.endswith(".router") and isinstance(proj, bnb.nn.Linear4bit)):
            continue
        if recipe == "in_flight":
            weight = tensors[f"{name}.proj.weight"]
        else:
            weight = _dequantize_from_file(tensors, f"{name}.proj", float32=False)
        linear = nn.Linear(proj.in_features, proj.out_features, bias=False)
        linear.weight = nn.Parameter(weight.to(dtype), requires_grad=False)
        module.proj = linear
        count += 1
    if not count:
        return ""
    how = "saved bf16 weight" if recipe == "in_flight" else "dequantized weight"
    return f"{count} 4-bit router(s) replaced by a plain Linear with the {how}"


def _dequantize_packed_routers(model: nn.Module, ckpt_dir: Path) -> str:
    """A router stored packed in the files (transformers 4.x quantized Qwen3's `mlp.gate`
    Linear) computes with its dequantized weight, which is what the plugin loads."""
    tensors = _file_tensors(ckpt_dir)
    patched = 0
    with torch.no_grad():
        for name, module in model.named_modules():
            stored = tensors.get(f"{name}.weight")
            if name.endswith(".mlp.gate") and stored is not None and not stored.is_floating_point():
                value = _dequantize_from_file(tensors, name, float32=False)
                module.weight.copy_(value.to(module.weight.dtype))
                patched += 1
    return f"{patched} packed router(s): bitsandbytes' dequantization" if patched else ""


def _check_no_plain_experts(ckpt_dir: Path) -> None:
    header = ref.checkpoint_header(ckpt_dir)
    plain = [k for k, v in header.items() if ".experts." in k and v["dtype"] == "BF16"]
    if plain:
        raise AssertionError(f"{ckpt_dir.name}: experts left unpacked, e.g. {plain[0]}")
