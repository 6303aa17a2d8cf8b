"""The `bitsandbytes` model loader: one pass over the files, routing by target capability.

Every checkpoint tensor goes to the parameter the model's own `load_weights` picks:
- packed -> BnB parameter: bytes kept packed, quant state bound per shard;
- packed -> plain parameter (lm_head, embeddings, anything vLLM builds unquantized):
  dequantized with bitsandbytes to the parameter's dtype, then loaded normally;
- plain -> BnB parameter: quantized in flight by the BnB weight loader.
"""

from __future__ import annotations

import contextlib
import ctypes
import gc
import glob
import hashlib
import json
import os
import sys
from collections.abc import Iterator
from typing import NoReturn

import torch
from torch import nn
from vllm.config import ModelConfig, VllmConfig
from vllm.logger import init_logger
from vllm.model_executor.model_loader.base_loader import BaseModelLoader
from vllm.model_executor.model_loader.utils import get_model_architecture
from vllm.model_executor.model_loader.weight_utils import default_weight_loader

from . import quant_state as qs
from .checkpoint import (
    CheckpointError,
    CheckpointLayout,
    DeclaredQuantization,
    FileReader,
    check_quantization_matches,
    iter_files_in_order,
    narrowed_absmax,
    packed_bytes,
    scan_checkpoint,
)
from .config import BnbConfig, ModuleKind
from .registry import PACKED, PackedTensor

logger = init_logger(f"vllm.{__name__}")


class BnbModelLoader(BaseModelLoader):
    def download_model(self, model_config: ModelConfig) -> None:
        self._weight_files(model_config)

    def load_model(
        self, vllm_config: VllmConfig, model_config: ModelConfig, prefix: str = ""
    ) -> nn.Module:
        files = self._weight_files(model_config)
        self._layout = scan_checkpoint(files)
        quant_config = vllm_config.quant_config
        self._check_quantization_matches(quant_config, self._layout, files)
        if isinstance(quant_config, BnbConfig) and quant_config.pre_quantized:
            model_cls, _ = get_model_architecture(model_config)
            kinds = vllm_module_kinds(self._layout, getattr(model_cls, "hf_to_vllm_mapper", None))
            quant_config.set_module_kinds(kinds)
            warn_skip_list_disagreements(quant_config, kinds)
        with frozen_gc_heap():
            return super().load_model(vllm_config, model_config, prefix)

    def load_weights(self, model: nn.Module, model_config: ModelConfig) -> None:
        layout = getattr(self, "_layout", None)
        if layout is None:  # called directly, e.g. for a weight reload
            layout = self._layout = scan_checkpoint(self._weight_files(model_config))
        reader = FileReader()
        states = parse_quant_states(layout, reader)
        adjust = getattr(model, "adjust_bnb_quant_state_dict", None)
        if adjust is not None:
            states = adjust(states)
        PACKED.reset()
        prefault_parameters(model)
        restore = route_weight_loaders(model)
        try:
            loaded = model.load_weights(checkpoint_weights(layout, states, reader))
        except CheckpointError:
            raise
        except (ValueError, KeyError, AssertionError, IndexError, TypeError, RuntimeError) as e:
            if isinstance(e, torch.OutOfMemoryError):
                raise
            raise_with_last_tensor(e, layout, model)
        finally:
            restore()
        check_all_params_loaded(model, loaded)
        left_out = check_packed_tensors_loaded(layout, model)
        log_load_summary(layout, model, left_out)
        PACKED.reset()

    # ------------------------------------------------------------ files

    def _weight_files(self, model_config: ModelConfig) -> list[str]:
        folder = model_config.model
        if not os.path.isdir(folder):
            from vllm.model_executor.model_loader.weight_utils import (
                download_weights_from_hf,
            )

            folder = download_weights_from_hf(
                model_config.model,
                self.load_config.download_dir,
                ["*.safetensors", "*.json"] + (["*.bin", "*.pt"] if pickle_allowed() else []),
                model_config.revision,
                ignore_patterns=self.load_config.ignore_patterns,
            )
        return safetensors_files(folder)

    @staticmethod
    def _check_quantization_matches(quant_config, layout: CheckpointLayout, files) -> None:
        declared = None
        if isinstance(quant_config, BnbConfig):
            declared = DeclaredQuantization(
                quant_config.pre_quantized, quant_config.kind, quant_config.declared_kind
            )
        check_quantization_matches(layout, files, declared)


@contextlib.contextmanager
def frozen_gc_heap() -> Iterator[None]:
    """vLLM's `load_model` runs two full `gc.collect()` passes (after `load_weights` and
    after `process_weights_after_loading`) to free loading's transient tensors. Each walks
    every Python object of the process (vLLM, torch and transformers' modules: most of a
    small model's `load_model`), though only objects made while loading can be loading's
    garbage. Freezing the heap that exists before loading, as vLLM does itself around
    CUDA graph capture, makes those passes walk only the objects loading makes. Nothing
    is lost: unfreezing returns the rest to the oldest generation for later collections.
    Where something froze the heap already (vLLM does after start-up; a weight reload
    comes later), it is left as it is: unfreezing would undo that freeze too."""
    if gc.get_freeze_count():
        yield
        return
    gc.freeze()
    try:
        yield
    finally:
        gc.unfreeze()


_MADV_POPULATE_WRITE = 23  # Linux >= 5.14; older kernels answer EINVAL and fault as before
_PREFAULT_MIN_BYTES = 1 << 20


def prefault_parameters(model: nn.Module) -> None:
    """Map the memory of every CPU parameter in one `madvise(MADV_POPULATE_WRITE)` per
    storage, before the weights are copied in. The parameters are fresh `torch.empty`
    memory, and copying into it takes a page fault per 4 KiB page: on the virtual machines
    we measure on, 0.18 s of a 0.23 s copy of 459 MB, while populating the same pages in
    one call per tensor takes 0.15 s and the copy then 0.05 s. Loading writes every
    parameter (check_all_params_loaded), so this maps no page that would stay unmapped."""
    if sys.platform != "linux":
        return
    madvise = ctypes.CDLL(None, use_errno=True).madvise
    madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    page = os.sysconf("SC_PAGE_SIZE")
    seen: set[int] = set()
    for param in model.parameters():
        if param.device.type != "cpu" or isinstance(param, nn.UninitializedParameter):
            continue  # lazy parameters have no memory yet
        storage = param.untyped_storage()
        if storage.nbytes() < _PREFAULT_MIN_BYTES or storage.data_ptr() in seen:
            continue  # small, or tied to a parameter already done
        seen.add(storage.data_ptr())
        start = -(-storage.data_ptr() // page) * page
        end = (storage.data_ptr() + storage.nbytes()) // page * page
        madvise(start, end - start, _MADV_POPULATE_WRITE)


ALLOW_PICKLE_ENV = "VLLM_BNB_ALLOW_PICKLE"
# Pickles that sit beside weights in training output folders and are not weights.
_NOT_WEIGHTS = {"training_args.bin", "optimizer.pt", "scheduler.pt"}


def pickle_allowed() -> bool:
    return os.environ.get(ALLOW_PICKLE_ENV, "") == "1"


def safetensors_files(folder: str) -> list[str]:
    files = sorted(glob.glob(os.path.join(folder, "*.safetensors")))
    index = os.path.join(folder, "model.safetensors.index.json")
    if os.path.exists(index):
        with open(index) as f:
            listed = set(json.load(f).get("weight_map", {}).values())
        files = [p for p in files if os.path.basename(p) in listed]
    if files:
        return files
    pickles = pickle_files(folder)
    if not pickles:
        raise CheckpointError(f"{folder}: no *.safetensors weights found")
    if not pickle_allowed():
        raise CheckpointError(
            f"{folder}: no *.safetensors weights, only pickle checkpoint(s) "
            + ", ".join(pickles)
            + ". Unpickling can run arbitrary code, so they are refused: convert them to "
            f"safetensors, or, if you trust their source, set {ALLOW_PICKLE_ENV}=1 to load "
            "them with torch.load(weights_only=True)."
        )
    logger.warning(
        "%s=1: loading pickle checkpoint(s) %s with torch.load(weights_only=True)",
        ALLOW_PICKLE_ENV, ", ".join(pickles),
    )
    return [pickle_as_safetensors(p) for p in pickles]


def pickle_files(folder: str) -> list[str]:
    index = os.path.join(folder, "pytorch_model.bin.index.json")
    if os.path.exists(index):
        with open(index) as f:
            listed = set(json.load(f).get("weight_map", {}).values())
        return sorted(os.path.join(folder, name) for name in listed)
    found = glob.glob(os.path.join(folder, "*.bin")) + glob.glob(os.path.join(folder, "*.pt"))
    return sorted(p for p in found if os.path.basename(p) not in _NOT_WEIGHTS)


def pickle_as_safetensors(path: str) -> str:
    """A safetensors copy of a pickle checkpoint (opt-in only), cached by path, size and
    mtime: the header scan, quant-state grouping and byte-exact reads then work on one
    format. weights_only=True refuses any pickled object that is not plain tensor data."""
    from safetensors.torch import save_file
    from vllm import envs

    stat = os.stat(path)
    key = f"{os.path.abspath(path)}:{stat.st_size}:{stat.st_mtime_ns}"
    digest = hashlib.sha256(key.encode()).hexdigest()[:16]
    out_dir = os.path.join(envs.VLLM_CACHE_ROOT, "vllm_bnb_mm", "from_pickle", digest)
    out = os.path.join(out_dir, os.path.basename(path) + ".safetensors")
    if os.path.exists(out):
        return out
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # UnpicklingError for forbidden globals, zip/EOF errors, ...
        raise CheckpointError(
            f"{path}: torch.load(weights_only=True) failed ({type(e).__name__}: "
            f"{str(e)[:300]}); the file is corrupt or holds more than tensors"
        ) from e
    if not isinstance(state, dict) or not all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in state.items()
    ):
        raise CheckpointError(f"{path}: not a state dict of name -> tensor")
    os.makedirs(out_dir, exist_ok=True)
    tmp = f"{out}.tmp{os.getpid()}"
    save_file(_unshared(state), tmp)
    os.replace(tmp, out)  # atomic: a concurrent loader sees all of it or nothing
    return out


def _unshared(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    # safetensors refuses tensors that share storage (tied weights, views).
    seen: set[int] = set()
    out = {}
    for name, tensor in state.items():
        tensor = tensor.detach().contiguous()
        ptr = tensor.untyped_storage().data_ptr()
        out[name] = tensor.clone() if ptr in seen else tensor
        seen.add(ptr)
    return out


# ------------------------------------------------------------ layout


def vllm_module_kinds(layout: CheckpointLayout, mapper) -> dict[str, ModuleKind]:
    """Checkpoint module kinds under the names vLLM builds the modules with."""
    rename = mapper.get_rename_mapper() if mapper is not None else None
    kinds: dict[str, ModuleKind] = {}
    for module, kind in layout.module_kinds().items():
        name = rename.map_name(module + ".weight") if rename is not None else module + ".weight"
        if name is not None:
            kinds[name.removesuffix(".weight")] = kind
    return kinds


def warn_skip_list_disagreements(config: BnbConfig, kinds: dict[str, ModuleKind]) -> None:
    claimed_plain = sorted(m for m, k in kinds.items() if k != "plain" and config.is_skipped(m))
    if claimed_plain:
        logger.warning(
            "quantization_config skips %s but the checkpoint stores %d of its module(s) "
            "packed (e.g. %s); following the tensors. (transformers 5 matches skip names "
            "as anchored prefixes, so an unanchored name skips nothing.)",
            config.skip_modules, len(claimed_plain), claimed_plain[0],
        )


# ------------------------------------------------------------ quant states


def parse_quant_states(layout: CheckpointLayout, reader: FileReader) -> dict:
    """checkpoint weight name -> QuantState (4-bit) or Int8State (8-bit)."""
    states = {}
    for name, q in layout.quantized.items():
        if q.kind == "4bit":
            states[name] = qs.parse_4bit_state(q, layout.tensors, reader)
        else:
            states[name] = qs.parse_8bit_state(q, layout.tensors, reader)
    warn_narrowed_absmax(layout)
    return states


def warn_narrowed_absmax(layout: CheckpointLayout) -> None:
    """bitsandbytes writes absmax in float32; a float16/bfloat16 one was cast after
    quantizing. It loads (the upcast is exact, overflow is refused by the parser), but
    the block scales lost precision, so say so instead of staying silent."""
    narrowed = narrowed_absmax(layout)
    if narrowed:
        logger.warning(
            "BnB: %d absmax tensor(s) are stored as %s instead of bitsandbytes' float32 "
            "(e.g. %s in %s); loading them upcast, exactly as stored. Outputs can differ "
            "slightly from the original float32 checkpoint.",
            len(narrowed), layout.tensors[narrowed[0]].dtype, narrowed[0],
            layout.tensors[narrowed[0]].file,
        )


def checkpoint_weights(
    layout: CheckpointLayout, states: dict, reader: FileReader
) -> Iterator[tuple[str, torch.Tensor]]:
    """Each file read once; packed weights registered with their quant state."""
    skip = layout.state_tensor_names
    for path, infos in iter_files_in_order(layout):
        reader.buffer(path)
        for info in infos:
            if info.name in skip:
                continue
            tensor = reader.tensor(info)
            if info.name in layout.quantized:
                state = states.get(info.name)
                if state is None:
                    raise CheckpointError(
                        f"{path}: no quant state for packed weight {info.name!r} "
                        "(dropped by adjust_bnb_quant_state_dict?)"
                    )
                kind = layout.quantized[info.name].kind
                if kind == "4bit":
                    tensor = packed_bytes(tensor)
                PACKED.add(PackedTensor(info.name, path, kind, state, tensor))
            PACKED.note_yielded(info.name, tensor)
            yield info.name, tensor
            reader.done_before(path, info.end)
        reader.release(path)


# ------------------------------------------------------------ routing


def is_bnb_param(param: torch.Tensor) -> bool:
    return hasattr(param, "bnb_regions")


def route_weight_loaders(model: nn.Module):
    """Wrap every parameter's weight loader: packed bytes bound for a plain parameter
    are dequantized first. Returns a function that restores the original loaders."""
    originals = []
    seen: set[int] = set()
    for _, param in model.named_parameters(remove_duplicate=False):
        if id(param) in seen:
            continue
        seen.add(id(param))
        # An instance attribute (set_weight_attrs) or a class property (vLLM's
        # BasevLLMParameter, whose getter raises once deleted); not dir(param), which
        # builds and sorts every name of a tensor (3.6 % of load_model in a profile).
        had = "weight_loader" in vars(param) or hasattr(type(param), "weight_loader")
        original = getattr(param, "weight_loader", None)
        param.weight_loader = _routing_loader(param, original or default_weight_loader)
        originals.append((param, had, original))

    def restore() -> None:
        for param, had, original in originals:
            if had:
                param.weight_loader = original
            else:
                del param.weight_loader

    return restore


def _routing_loader(param: torch.Tensor, original):
    def weight_loader(*args, **kwargs):
        p, loaded_weight, rest = _param_and_tensor(args, kwargs)
        PACKED.note_seen(loaded_weight)
        if not is_bnb_param(p):
            packed = PACKED.lookup(loaded_weight)
            if packed is not None:
                loaded_weight = dequantize_for_plain(packed, p)
        return original(p, loaded_weight, *rest, **kwargs)

    return weight_loader


def _param_and_tensor(args: tuple, kwargs: dict) -> tuple[torch.Tensor, torch.Tensor, list]:
    """Every vLLM weight loader takes (param, loaded_weight, ...), called positionally
    by linear layers and by keyword by the MoE expert loader (`param=`, `loaded_weight=`,
    `weight_name=`, `shard_id=`, `expert_id=`, `return_success=`). Takes the first two
    out of either form (removing them from `kwargs`); the rest passes through as given."""
    positional = list(args)
    for position, name in enumerate(("param", "loaded_weight")):
        if name in kwargs:
            positional.insert(position, kwargs.pop(name))
    if len(positional) < 2:
        raise TypeError(
            f"weight loader called without a parameter and a tensor (args {len(args)}, "
            f"keywords {sorted(kwargs)})"
        )
    return positional[0], positional[1], positional[2:]


def dequantize_for_plain(packed: PackedTensor, param: torch.Tensor) -> torch.Tensor:
    dtype = param.dtype if param.dtype.is_floating_point else torch.float32
    if packed.kind == "4bit":
        plain = qs.dequantize_4bit(packed.data, packed.state, dtype)
        plain = plain.reshape(packed.state.shape)
    else:
        plain = qs.dequantize_8bit(packed.data, packed.state, dtype)
    PACKED.note_dequantized(packed.name, plain.numel() * plain.element_size() - packed.data.numel())
    return plain


# ------------------------------------------------------------ accounting


def check_all_params_loaded(model: nn.Module, loaded: set[str] | None) -> None:
    if loaded is None:
        return
    missing = sorted({n for n, _ in model.named_parameters()} - set(loaded))
    if missing:
        raise CheckpointError(
            f"{len(missing)} model parameter(s) were not initialized from the checkpoint: "
            + ", ".join(missing[:10])
            + (" …" if len(missing) > 10 else "")
        )


def raise_with_last_tensor(
    error: Exception, layout: CheckpointLayout, model: nn.Module
) -> NoReturn:
    """Re-raise a model's own load_weights error naming the checkpoint tensor and file
    it was reading: "no module named 'layers.0.mlp.extra_proj'" alone names neither."""
    last = next(reversed(PACKED.record.yielded), None)
    where = (
        f"{layout.tensors[last].file}: while loading checkpoint tensor {last!r}"
        if last is not None
        else "before the first checkpoint tensor"
    )
    raise CheckpointError(
        f"{where}, {type(model).__name__}.load_weights failed: {type(error).__name__}: "
        f"{error}. Is the checkpoint for this architecture and config.json?"
    ) from error


def check_packed_tensors_loaded(layout: CheckpointLayout, model: nn.Module) -> dict[str, str]:
    """Every packed tensor must reach a weight loader unless the model deliberately left
    its module out; quantized weights are never dropped silently. Returns checkpoint
    name -> reason for every tensor (packed or plain) the model left out on purpose."""
    record = PACKED.record
    unseen = sorted(n for n, ptr in record.yielded.items() if ptr not in record.seen)
    reasons = {name: omission_reason(model, name) for name in unseen}
    unknown = [n for n in unseen if n in layout.quantized and reasons[n] is None]
    if unknown:
        raise CheckpointError(
            f"{layout.tensors[unknown[0]].file}: {len(unknown)} packed bitsandbytes "
            f"weight(s) reached no weight loader of {type(model).__name__} (e.g. "
            + ", ".join(repr(n) for n in unknown[:5])
            + "): the model has no module for them, so they would be dropped silently. "
            "Is the checkpoint for this architecture and config.json?"
        )
    return {name: reason for name, reason in reasons.items() if reason is not None}


def omission_reason(model: nn.Module, name: str) -> str | None:
    """Why `model` deliberately builds nothing for checkpoint tensor `name`, or None when
    the name is unknown to it.

    Follows the name down the module tree the way vLLM's loaders route it, applying each
    module's `hf_to_vllm_mapper` to the name relative to that module, and recognises the
    three ways vLLM models leave weights out on purpose:
    - a placeholder module (`StageMissingLayer` for a tower disabled by
      --limit-mm-per-prompt, `PPMissingLayer` for another pipeline stage);
    - a layer list built shorter than the checkpoint's (a layer-count override, e.g. a
      vision tower built only up to the feature layer it uses): index >= its length;
    - a weight mapper that maps the name to None (weights the model declares unused).
    Anything else (a module the model does not have, or a built module whose loader
    never saw the tensor) is unknown.
    """
    from vllm.model_executor.models.utils import PPMissingLayer, StageMissingLayer, WeightsMapper

    module, rest, path = model, name, []
    while True:
        where = ".".join(path) or type(model).__name__
        if isinstance(module, PPMissingLayer):
            return f"{where} belongs to another pipeline stage"
        if isinstance(module, StageMissingLayer):
            return f"{where} is not built (its {module.stage_name!r} stage is unused)"
        mapper = getattr(module, "hf_to_vllm_mapper", None)
        if isinstance(mapper, WeightsMapper):
            mapped = mapper.map_name(rest)
            if mapped is None:
                return f"{type(module).__name__}'s weight mapper drops it"
            rest = mapped
        head, _, rest = rest.partition(".")
        child = module._modules.get(head)
        if child is None:
            if isinstance(module, nn.ModuleList) and head.isdigit() and int(head) >= len(module):
                return f"{where} is built with {len(module)} layer(s); layer {head} is unused"
            return None
        if not rest:
            return None
        module = child
        path.append(head)


def log_load_summary(layout: CheckpointLayout, model: nn.Module, left_out: dict[str, str]) -> None:
    record = PACKED.record
    if record.dequantized:
        extra = sum(record.dequantized.values())
        logger.info(
            "BnB: dequantized %d packed weight(s) into plain parameters (%s), +%.1f MiB",
            len(record.dequantized), ", ".join(sorted(record.dequantized)), extra / 2**20,
        )
    if record.quantized_in_flight:
        logger.info(
            "BnB: quantized %d layer(s) in flight from plain tensors: %s",
            len(record.quantized_in_flight), ", ".join(sorted(record.quantized_in_flight)),
        )
    by_reason: dict[str, list[str]] = {}
    for name, reason in left_out.items():
        by_reason.setdefault(reason, []).append(name)
    for reason, names in sorted(by_reason.items()):
        packed = sum(n in layout.quantized for n in names)
        logger.info(
            "BnB: %d checkpoint tensor(s) (%d packed) left out by %s: %s: %s",
            len(names), packed, type(model).__name__, reason,
            ", ".join(names[:10]) + (" …" if len(names) > 10 else ""),
        )
    unused = sorted(
        n for n, ptr in record.yielded.items() if ptr not in record.seen and n not in left_out
    )
    if unused:
        logger.info(
            "BnB: %d plain checkpoint tensor(s) not loaded by %s.load_weights (unused): %s",
            len(unused), type(model).__name__, ", ".join(unused[:20]),
        )
