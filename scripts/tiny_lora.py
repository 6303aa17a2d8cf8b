"""Tiny PEFT LoRA adapters for the tiny checkpoints, and their HF PEFT references.

Usage::

    .venv/bin/python scripts/tiny_lora.py [--force] [NAME ...]

Each adapter becomes ``.cache/tiny/lora/NAME/``: ``adapter_config.json`` and
``adapter_model.safetensors`` exactly as ``PeftModel.save_pretrained`` writes them for a
model with the base's shapes. PEFT initializes B to zero (the adapter would change
nothing), so A and B are redrawn, seeded, at a scale that moves the answer clearly.

References (``references/<base>-<dtype>.json``, computed on demand, cached): the
quantized base loaded with transformers as saved, the adapter attached with
``PeftModel.from_pretrained`` before the first forward, then the tiny builder's cases with
the adapter and with it disabled (which must repeat the checkpoint's stored reference).
``<base>`` is a tiny variant name; ``<variant>+in-flight-nf4`` is that (bf16) variant
quantized in flight by transformers (nf4, no double quant, blocksize 64), as
``--quantization bitsandbytes`` does in vLLM.

Broken adapters for the error tests (`BROKEN`) are good ones with their saved files
edited the way such adapters arise (made for a deeper model of the family, or naming
modules the model does not have).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import bitsandbytes as bnb
import torch
import transformers
from safetensors.torch import load_file, save_file

sys.path.insert(0, str(Path(__file__).resolve().parent))
import build_tiny_checkpoints as tiny
import tiny_reference as ref
from tiny_families import FAMILIES

# Bump whenever an adapter recipe or the reference computation changes; the tiny
# builder's version is part of it because references depend on the base's bytes.
LORA_VERSION = f"tiny-lora-2026.3/{tiny.BUILDER_VERSION}"
DEFAULT_OUT = tiny.DEFAULT_OUT / "lora"

ATTENTION_AND_MLP = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
IN_FLIGHT_SUFFIX = "+in-flight-nf4"
# Same model, same inputs, same kernels: the disabled-adapter run repeats the stored one.
BASE_UNCHANGED_TOL = 1e-3


def language_model_targets(leaves: tuple[str, ...]) -> str:
    """PEFT target regex for the language model's linears of a multimodal model
    (transformers 5 names it `model.language_model`), leaving vision/audio towers alone."""
    return rf".*\.language_model\..*\.({'|'.join(leaves)})"


@dataclass(frozen=True)
class Adapter:
    name: str
    base: str  # a tiny variant whose shapes (and family) the adapter is made for
    rank: int
    alpha: int
    targets: tuple[str, ...] | str  # PEFT target_modules: leaf names or a regex
    seed: int
    # std of B = delta_gain / (scaling * sqrt(rank)): the adapter's output is then about
    # delta_gain times the base projection's (A and the base weights both ~ 1/sqrt(fan_in)).
    delta_gain: float = 0.5
    description: str = ""

    @property
    def scaling(self) -> float:
        return self.alpha / self.rank


ADAPTERS: dict[str, Adapter] = {
    a.name: a
    for a in [
        Adapter("llama-a", "llama-bf16", 8, 16, ATTENTION_AND_MLP, 3001,
                description="rank 8 on q/k/v/o/gate/up/down"),
        Adapter("llama-b", "llama-bf16", 4, 8, ("q_proj", "v_proj", "down_proj"), 3002,
                description="rank 4 on q/v/down only (k and gate/up slices empty)"),
        Adapter("llama-wide-a", "llama-wide-nf4-dq", 8, 16, ATTENTION_AND_MLP, 3003,
                description="rank 8, TP-sized base"),
        Adapter("gemma4-a", "gemma4-bf16", 8, 16, language_model_targets(ATTENTION_AND_MLP),
                3005, description="rank 8 on the language model's q/k/v/o/gate/up/down"),
        Adapter("gemma4-b", "gemma4-bf16", 4, 8,
                language_model_targets(("q_proj", "v_proj", "down_proj")), 3006,
                description="rank 4 on the language model's q/v/down"),
        Adapter("gemma4-r16", "gemma4-bf16", 16, 32, language_model_targets(ATTENTION_AND_MLP),
                3007, description="rank 16: above --max-lora-rank 8"),
        Adapter("qwen2_5_vl-a", "qwen2_5_vl-bf16", 8, 16,
                language_model_targets(ATTENTION_AND_MLP), 3008,
                description="rank 8 on the language model's q/k/v/o/gate/up/down"),
        Adapter("qwen2_5_vl-b", "qwen2_5_vl-bf16", 4, 8,
                language_model_targets(("q_proj", "v_proj", "down_proj")), 3009,
                description="rank 4 on the language model's q/v/down"),
    ]
}


# ------------------------------------------------------------------------------ building


def build_base(variant: str) -> Path:
    """The tiny checkpoint `variant` (built by the tiny builder if not cached)."""
    return tiny.build([variant])[variant]


def _plain_model(base_dir: Path) -> torch.nn.Module:
    """The base architecture in float32 with random weights: PEFT only needs its module
    names and shapes (the adapter's A and B are redrawn anyway)."""
    config = transformers.AutoConfig.from_pretrained(base_dir)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    cls = getattr(transformers, config.architectures[0])
    return cls(config)


def _redraw_lora_weights(model: torch.nn.Module, adapter: Adapter) -> int:
    gen = torch.Generator().manual_seed(adapter.seed)
    b_std = adapter.delta_gain / (adapter.scaling * math.sqrt(adapter.rank))
    count = 0
    with torch.no_grad():
        for name, param in sorted(model.named_parameters()):
            if ".lora_A." in name:
                fan_in = param.shape[1]
                param.copy_(torch.randn(param.shape, generator=gen) / math.sqrt(fan_in))
                count += 1
            elif ".lora_B." in name:
                param.copy_(b_std * torch.randn(param.shape, generator=gen))
    return count


def build_adapter(adapter: Adapter, out: Path) -> None:
    from peft import LoraConfig, get_peft_model

    base_dir = build_base(adapter.base)
    targets = list(adapter.targets) if isinstance(adapter.targets, tuple) else adapter.targets
    config = LoraConfig(
        r=adapter.rank, lora_alpha=adapter.alpha, target_modules=targets, lora_dropout=0.0,
        bias="none",
    )
    torch.manual_seed(adapter.seed)
    model = get_peft_model(_plain_model(base_dir), config)
    if _redraw_lora_weights(model, adapter) == 0:
        raise AssertionError(f"{adapter.name}: PEFT created no LoRA layers for {targets}")
    model.save_pretrained(out)
    _set_base_name(out, str(base_dir))


def _set_base_name(adapter_dir: Path, base: str) -> None:
    path = adapter_dir / "adapter_config.json"
    config = json.loads(path.read_text())
    config["base_model_name_or_path"] = base
    path.write_text(json.dumps(config, indent=2) + "\n")


def _is_current(adapter_dir: Path) -> bool:
    try:
        return (adapter_dir / "version").read_text() == LORA_VERSION
    except OSError:
        return False


def build(names: list[str] | None = None, out: Path | None = None, *,
          force: bool = False) -> dict[str, Path]:
    """Build (or reuse cached) adapters; returns adapter name -> adapter directory."""
    names = list(ADAPTERS) if not names else list(dict.fromkeys(names))
    unknown = sorted(set(names) - set(ADAPTERS))
    if unknown:
        raise ValueError(f"unknown adapter(s) {unknown}; known: {sorted(ADAPTERS)}")
    out = Path(out) if out is not None else DEFAULT_OUT
    out.mkdir(parents=True, exist_ok=True)
    with tiny.build_lock(out):
        for name in names:
            final = out / name
            if not force and _is_current(final):
                continue
            staging = Path(tempfile.mkdtemp(prefix=f".{name}.tmp-", dir=out))
            try:
                build_adapter(ADAPTERS[name], staging)
                (staging / "version").write_text(LORA_VERSION)
                _publish(staging, final)
            finally:
                shutil.rmtree(staging, ignore_errors=True)
    return {name: out / name for name in names}


def _publish(staging: Path, final: Path) -> None:
    umask = os.umask(0)
    os.umask(umask)
    staging.chmod(0o777 & ~umask)
    if final.exists():
        shutil.rmtree(final)
    staging.rename(final)


# ------------------------------------------------------------------------------ references


def reference(adapter_name: str, base: str, dtype: str, out: Path | None = None) -> dict:
    """HF PEFT on the quantized base: {"adapter": {case: ref}, "base": {case: ref}}.

    `base` is a tiny variant (loaded as saved) or `<variant>+in-flight-nf4`. "base" holds
    the same cases without the adapter (the saved reference.json's for a stored variant;
    computed here for in-flight quantization). Cached beside the adapter."""
    adapter_dir = build([adapter_name], out)[adapter_name]
    path = adapter_dir / "references" / f"{base}-{dtype}.json"
    with tiny.build_lock(adapter_dir.parent):
        cached = _read_reference(path)
        if cached is not None:
            return cached
        data = _compute_reference(adapter_dir, base, dtype)
        path.parent.mkdir(exist_ok=True)
        tmp = path.with_suffix(f".tmp{os.getpid()}")
        tmp.write_text(json.dumps(data) + "\n")
        tmp.replace(path)
    return data


def _read_reference(path: Path) -> dict | None:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return data if data.get("version") == LORA_VERSION else None


def _compute_reference(adapter_dir: Path, base: str, dtype_name: str) -> dict[str, Any]:
    from peft import PeftModel

    in_flight = base.endswith(IN_FLIGHT_SUFFIX)
    variant = base.removesuffix(IN_FLIGHT_SUFFIX)
    ckpt = build_base(variant)
    stored = json.loads((ckpt / "reference.json").read_text())
    family, architecture, cases = stored["family"], stored["architecture"], stored["cases"]
    dtype = ref.DTYPES[dtype_name]
    family = FAMILIES[family]
    processor = family.load_processor(ckpt)
    encoded = {c["name"]: family.encode_case(processor, c, ckpt) for c in cases}
    with ref._quiet_bitsandbytes():
        if in_flight:
            model = _in_flight_model(ckpt, architecture, dtype)
        else:
            model = _saved_model(ckpt, architecture, dtype)
        # Before any forward: on the CPU, bitsandbytes repacks 4-bit weights for its
        # kernel on the first forward, and PEFT wrapping a repacked layer changes what
        # the base computes (measured: fp4 prompt logprobs off by 0.91, nf4 + DQ by 0.02).
        model = PeftModel.from_pretrained(model, adapter_dir).eval()
        _check_adapter_attached(model, adapter_dir)
        adapter_refs = _run_cases(model, encoded, dtype)
        with model.disable_adapter():
            base_refs = _run_cases(model, encoded, dtype)
    if not in_flight:
        _check_base_unchanged(base_refs, stored["references"][dtype_name], ckpt)
    return {
        "version": LORA_VERSION,
        "base": base,
        "dtype": dtype_name,
        "cases": cases,
        "adapter": adapter_refs,
        "base_references": base_refs,
    }


def _saved_model(ckpt: Path, architecture: str, dtype: torch.dtype) -> torch.nn.Module:
    """The checkpoint as saved, as tiny_reference loads it (plain tensors upcast to `dtype`,
    which transformers leaves bf16 for some families), without running it. A Linear4bit
    lm_head around a tied plain embedding (no quant state: bitsandbytes asserts in its
    forward) becomes the plain head tiny_reference falls back to; a really packed 4-bit
    lm_head stays, as it runs in tiny_reference (dequantizing it moves logprobs by 0.05)."""
    model = getattr(transformers, architecture).from_pretrained(ckpt, dtype=dtype).eval()
    ref._set_bnb_compute_dtype(model, dtype)
    ref.upcast_plain_tensors(model, dtype)
    head = model.get_output_embeddings()
    if isinstance(head, bnb.nn.Linear4bit) and getattr(head.weight, "quant_state", None) is None:
        model.set_output_embeddings(ref._plain_lm_head(head, dtype)[0])
    return model


def _check_base_unchanged(computed: dict, stored: dict, ckpt: Path) -> None:
    """With the adapter disabled, the PEFT model must answer as the checkpoint's stored
    reference: otherwise attaching the adapter changed the base."""
    for name, expected in stored.items():
        got = computed[name]["prompt_logprobs"]
        gap = max(abs(a - b) for a, b in zip(got, expected["prompt_logprobs"], strict=True))
        if gap > BASE_UNCHANGED_TOL:
            raise AssertionError(
                f"{ckpt.name}/{name}: with the adapter disabled, HF PEFT is {gap:.4f} from the "
                "stored base reference; attaching the adapter changed the base"
            )


def _in_flight_model(ckpt: Path, architecture: str, dtype: torch.dtype) -> torch.nn.Module:
    config = transformers.BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=False,
        bnb_4bit_compute_dtype=dtype,
    )
    cls = getattr(transformers, architecture)
    return cls.from_pretrained(ckpt, quantization_config=config, dtype=dtype).eval()


def _run_cases(model, encoded: dict, dtype: torch.dtype) -> dict[str, Any]:
    return {name: ref.reference_for_case(model, inputs, dtype) for name, inputs in encoded.items()}


def _check_adapter_attached(model, adapter_dir: Path) -> None:
    """Every tensor in the adapter file must have landed in a LoRA layer of the model:
    a reference computed without (part of) the adapter would make any parity pointless."""
    saved = load_file(adapter_dir / "adapter_model.safetensors")
    layers = {n for n, _ in model.named_parameters() if ".lora_" in n}
    if len(layers) != len(saved):
        raise AssertionError(
            f"{adapter_dir.name}: {len(saved)} adapter tensors but {len(layers)} LoRA "
            "parameters on the HF model"
        )


# ------------------------------------------------------------------------------ broken ones


def _deeper(config: dict, tensors: dict) -> tuple[dict, dict]:
    """The same family, a deeper model (an E4B adapter on E2B): layer 1 becomes layer 5."""
    return config, {k.replace(".layers.1.", ".layers.5."): v for k, v in tensors.items()}


def _fused_names(config: dict, tensors: dict) -> tuple[dict, dict]:
    """Modules the model does not have (Falcon/GPT-NeoX names for attention)."""
    renames = {"q_proj": "query_key_value", "o_proj": "dense"}
    config = dict(config, target_modules=["query_key_value", "dense", "k_proj", "v_proj",
                                          "gate_proj", "up_proj", "down_proj"])
    out = {}
    for key, value in tensors.items():
        for old, new in renames.items():
            key = key.replace(f".{old}.", f".{new}.")
        out[key] = value
    return config, out


# name -> (adapter it is derived from, edit of (adapter_config, tensors))
BROKEN = {
    "gemma4-deeper": ("gemma4-a", _deeper),
    "gemma4-unknown-targets": ("gemma4-a", _fused_names),
}


def build_broken(name: str, out: Path | None = None) -> Path:
    """A copy of a good adapter with the edit BROKEN[name], cached beside it."""
    source, edit = BROKEN[name]
    src = build([source], out)[source]
    dst = src.parent / name
    with tiny.build_lock(src.parent):
        if _is_current(dst):
            return dst
        staging = Path(tempfile.mkdtemp(prefix=f".{name}.tmp-", dir=src.parent))
        try:
            config = json.loads((src / "adapter_config.json").read_text())
            tensors = load_file(src / "adapter_model.safetensors")
            config, tensors = edit(config, tensors)
            (staging / "adapter_config.json").write_text(json.dumps(config, indent=2) + "\n")
            save_file(tensors, staging / "adapter_model.safetensors")
            (staging / "version").write_text(LORA_VERSION)
            _publish(staging, dst)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    return dst


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("names", nargs="*", metavar="NAME", help=f"any of {', '.join(ADAPTERS)}")
    parser.add_argument("--force", action="store_true", help="rebuild even if cached")
    args = parser.parse_args(argv)
    transformers.utils.logging.set_verbosity_error()
    for name, path in build(args.names or None, force=args.force).items():
        tensors = load_file(path / "adapter_model.safetensors")
        print(f"{name:16s} {len(tensors):3d} tensors  {ADAPTERS[name].description}  -> {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
