"""The facts `inspect` needs from vLLM's model class, from a model built on the meta
device (no weights, no memory): which packed weights land in a BnB layer, which in a
layer vLLM builds unquantized (dequantized at load), which have no module at all, and
how each layer is cut under tensor parallelism. Imports vLLM."""

from __future__ import annotations

import os
import tempfile

import torch
from vllm.config import set_current_vllm_config
from vllm.engine.arg_utils import EngineArgs
from vllm.model_executor.layers.linear import (
    ColumnParallelLinear,
    QKVParallelLinear,
    RowParallelLinear,
)
from vllm.model_executor.model_loader.utils import get_model_architecture, initialize_model

from . import register
from .checkpoint import CheckpointLayout
from .config import DEFAULT_PACKED_MODULES, BnbConfig
from .inspection import ArchitectureFacts, Cut
from .loader import vllm_module_kinds


def architecture_facts(folder: str, layout: CheckpointLayout) -> ArchitectureFacts | None:
    """None when the checkpoint is not configured for bitsandbytes (nothing to check)."""
    register()
    vllm_config = EngineArgs(
        model=folder, load_format="bitsandbytes", skip_tokenizer_init=True, enforce_eager=True,
    ).create_engine_config()
    quant_config = vllm_config.quant_config
    if not isinstance(quant_config, BnbConfig):
        return None
    model_cls, architecture = get_model_architecture(vllm_config.model_config)
    mapper = getattr(model_cls, "hf_to_vllm_mapper", None)
    quant_config.set_module_kinds(vllm_module_kinds(layout, mapper))
    with set_current_vllm_config(vllm_config):
        _init_single_process_groups()
        with torch.device("meta"):
            model = initialize_model(vllm_config=vllm_config)
    rename = mapper.get_rename_mapper() if mapper is not None else None
    fused = {**DEFAULT_PACKED_MODULES, **(getattr(model, "packed_modules_mapping", None) or {})}
    modules = dict(model.named_modules())
    facts = ArchitectureFacts(architecture, {}, {}, {})
    for weight in layout.quantized:
        module = weight.removesuffix(".weight")
        mapped = rename.map_name(weight) if rename is not None else weight
        if mapped is None:  # the model's mapper drops it on purpose
            facts.built[module] = "ignored"
            continue
        layer = _layer_for(mapped.removesuffix(".weight"), modules, fused)
        if layer is None:
            facts.built[module] = "absent"
            continue
        is_bnb = any(hasattr(p, "bnb_regions") for p in layer.parameters(recurse=False))
        facts.built[module] = "packed" if is_bnb else "dequantized"
        facts.cuts[module] = _cut(layer)
        if isinstance(layer, QKVParallelLinear) and module.rsplit(".", 1)[-1] != "q_proj":
            facts.kv_heads[module] = layer.total_num_kv_heads
    return facts


def _layer_for(name: str, modules: dict, fused: dict[str, list[str]]):
    """The vLLM module that loads checkpoint module `name`: itself, the fused layer it is
    stacked into (q_proj -> qkv_proj), or the nearest ancestor that holds parameters of
    its own (a fused-experts layer loads `experts.N.*`). None: no module takes it."""
    if name in modules:
        return modules[name]
    parent, _, leaf = name.rpartition(".")
    for target, parts in fused.items():
        candidate = f"{parent}.{target}" if parent else target
        if leaf in parts and candidate in modules:
            return modules[candidate]
    while parent:
        module = modules.get(parent)
        if module is not None:
            return module if any(True for _ in module.parameters(recurse=False)) else None
        parent = parent.rpartition(".")[0]
    return None


def _cut(layer) -> Cut:
    if isinstance(layer, RowParallelLinear):
        return "cols"
    if isinstance(layer, ColumnParallelLinear):
        return "rows"
    return "none"


def _init_single_process_groups() -> None:
    """vLLM layers ask the model-parallel groups for their sizes: a world of one."""
    from vllm.distributed import init_distributed_environment, initialize_model_parallel
    from vllm.distributed.parallel_state import model_parallel_is_initialized

    if model_parallel_is_initialized():
        return
    store = os.path.join(tempfile.mkdtemp(prefix="vllm-bnb-mm-inspect-"), "store")
    init_distributed_environment(
        world_size=1, rank=0, local_rank=0, distributed_init_method=f"file://{store}",
        backend="gloo",
    )
    initialize_model_parallel(1, 1)
