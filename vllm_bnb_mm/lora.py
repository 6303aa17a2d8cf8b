"""LoRA adapters on a BnB base: an adapter that does not fit the model is a clear error.

vLLM checks an adapter's rank and its module *leaf* names (`q_proj`, ...) but not where
the modules are or how big they are. It copies each LoRA matrix into the top-left
corner of a zero-padded slot, so an adapter made for another model loads without a word:
LoRA weights for modules the model does not have are never applied, and smaller
matrices are zero-padded into bigger layers (a Llama adapter on Gemma 4 changes the
answers without being Gemma 4's adapter). On a BnB base, loading an adapter runs this
check after vLLM's own: every adapter module must be a LoRA layer of the model, with
the input and output sizes of that layer.
"""

from __future__ import annotations

import functools
import json
import os
from dataclasses import dataclass

import torch
from vllm.logger import init_logger
from vllm.lora.utils import get_adapter_absolute_path, parse_fine_tuned_lora_name
from vllm.model_executor.layers.linear import LinearBase, QKVParallelLinear

logger = init_logger(f"vllm.{__name__}")

ADAPTER_FILES = ("adapter_model.safetensors", "adapter_model.bin", "adapter_model.pt")


class LoRAAdapterMismatch(ValueError):
    """The adapter was made for another model (shapes or module names differ)."""


@dataclass(frozen=True)
class LoRATarget:
    """What one adapter module must fit: the full (unsharded) sizes of a vLLM layer,
    or of one slice of a fused layer (q/k/v of qkv_proj, gate/up of gate_up_proj)."""

    layer: str
    input_size: int
    output_size: int


def register_lora_checks() -> None:
    """Wrap vLLM's worker-side adapter loading with `check_adapter_fits` (idempotent)."""
    from vllm.lora.worker_manager import WorkerLoRAManager

    if getattr(WorkerLoRAManager._load_adapter, "_bnb_mm_checked", False):
        return
    original = WorkerLoRAManager._load_adapter

    @functools.wraps(original)
    def _load_adapter(self, lora_request):
        lora = original(self, lora_request)
        manager = self._adapter_manager
        if has_bnb_layers(manager.model):
            path = get_adapter_absolute_path(lora_request.lora_path)
            check_adapter_fits(manager, lora, path)
        return lora

    _load_adapter._bnb_mm_checked = True
    WorkerLoRAManager._load_adapter = _load_adapter


def has_bnb_layers(model: torch.nn.Module) -> bool:
    return any(hasattr(m, "bnb_kind") for m in model.modules())


def check_adapter_fits(manager, lora, lora_path: str) -> None:
    """Raise LoRAAdapterMismatch naming the adapter file and tensor when an adapter module
    has no LoRA layer in the model or its matrices have the wrong size; warn about adapter
    modules the deployment leaves out on purpose (--lora-target-modules, towers)."""
    targets = lora_targets(manager)
    model = manager.model
    present = {name for name, _ in model.named_modules()}
    not_enabled = []
    for module, weights in lora.loras.items():
        if module in targets:
            target = targets[module]
            if target is not None:
                _check_sizes(lora_path, module, weights, target, manager)
            continue
        if _is_expert_weight(module, manager.modules):
            continue  # per-expert MoE LoRA: vLLM stacks and checks it
        if _exists_in_model(module, present, manager.packed_modules_mapping):
            not_enabled.append(module)
        elif not _on_another_pipeline_stage(module, model):
            raise LoRAAdapterMismatch(
                f"LoRA adapter {_adapter_file(lora_path)}: tensor "
                f"{_tensor_name(lora_path, module, manager)!r} is for module {module!r}, "
                f"which {type(model).__name__} does not have: the adapter was made for "
                f"another model{_made_for(lora_path)}"
            )
    if not_enabled:
        logger.warning(
            "LoRA adapter %s: %d module(s) are not LoRA-enabled in this deployment and are "
            "not applied (--lora-target-modules, or a vision/audio tower without "
            "--enable-tower-connector-lora), e.g. %s",
            _adapter_file(lora_path), len(not_enabled), not_enabled[0],
        )


def lora_targets(manager) -> dict[str, LoRATarget | None]:
    """Adapter module name -> target, for every LoRA layer of the model; a fused
    layer's slices go under the names of the modules it fuses. None: a LoRA layer that
    is not a linear one (embeddings, MoE experts), whose sizes vLLM checks itself."""
    targets: dict[str, LoRATarget | None] = {}
    for name, module in manager.modules.items():
        base = getattr(module, "base_layer", None)
        if not isinstance(base, LinearBase):
            targets[name] = None
            continue
        parts = manager.packed_modules.get(name)
        sizes = _slice_output_sizes(base)
        if parts and len(parts) == len(sizes):
            for part, size in zip(parts, sizes, strict=True):
                targets[part] = LoRATarget(name, base.input_size, size)
        else:
            targets[name] = LoRATarget(name, base.input_size, base.output_size)
    return targets


def _slice_output_sizes(layer: LinearBase) -> list[int]:
    """Full (all ranks) output size of each fused slice."""
    if isinstance(layer, QKVParallelLinear):
        kv = layer.total_num_kv_heads
        return [
            layer.total_num_heads * layer.head_size, kv * layer.head_size,
            kv * layer.v_head_size,
        ]
    return list(getattr(layer, "output_sizes", [layer.output_size]))


def _check_sizes(lora_path: str, module: str, weights, target: LoRATarget, manager) -> None:
    a, b = weights.lora_a, weights.lora_b
    if a is None or b is None:
        return
    got_in, got_out = a.shape[-1], b.shape[0]
    if (got_in, got_out) == (target.input_size, target.output_size):
        return
    where = target.layer if target.layer == module else f"{target.layer} (slice {module})"
    raise LoRAAdapterMismatch(
        f"LoRA adapter {_adapter_file(lora_path)}: tensor "
        f"{_tensor_name(lora_path, module, manager)!r} maps {got_in} -> {got_out} features "
        f"but layer {where} of {type(manager.model).__name__} maps {target.input_size} -> "
        f"{target.output_size}: the adapter was made for another model{_made_for(lora_path)}"
    )


def _is_expert_weight(module: str, lora_modules: dict) -> bool:
    owner, sep, _ = module.rpartition(".experts.")
    return bool(sep) and f"{owner}.experts" in lora_modules


def _exists_in_model(module: str, present: set[str], packed_mapping: dict) -> bool:
    if module in present:
        return True
    parent, _, leaf = module.rpartition(".")
    return any(
        leaf in parts and f"{parent}.{fused}" in present for fused, parts in packed_mapping.items()
    )


def _on_another_pipeline_stage(module: str, model: torch.nn.Module) -> bool:
    from vllm.model_executor.models.utils import PPMissingLayer

    parts = module.split(".")
    for i in range(len(parts), 0, -1):
        try:
            owner = model.get_submodule(".".join(parts[:i]))
        except AttributeError:
            continue
        return isinstance(owner, PPMissingLayer)
    return False


def _adapter_file(lora_path: str) -> str:
    for name in ADAPTER_FILES:
        if os.path.isfile(os.path.join(lora_path, name)):
            return os.path.join(lora_path, name)
    return lora_path


def _tensor_name(lora_path: str, module: str, manager) -> str:
    """The adapter file's tensor for `module` (its lora_A), read from the header."""
    from safetensors import safe_open

    mapper = getattr(manager.model, "hf_to_vllm_mapper", None)
    mapper = mapper.get_rename_mapper() if mapper is not None else None
    try:
        with safe_open(_adapter_file(lora_path), framework="pt") as f:
            keys = list(f.keys())
    except OSError:
        return module
    for key in keys:
        try:
            name, is_a = parse_fine_tuned_lora_name(key, mapper)
        except ValueError:
            continue
        if name == module and is_a:
            return key
    return module


def _made_for(lora_path: str) -> str:
    try:
        with open(os.path.join(lora_path, "adapter_config.json")) as f:
            base = json.load(f).get("base_model_name_or_path")
    except (OSError, ValueError):
        return ""
    return f" (its adapter_config.json names base model {base!r})" if base else ""
