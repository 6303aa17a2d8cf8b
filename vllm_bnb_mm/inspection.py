"""What is in a BnB checkpoint, before a GPU is spent on it (`vllm-bnb-mm inspect`).

Reads the safetensors headers and the quant-state tensors only (the packed weights are
never read), through the loader's own parsers, so a checkpoint the loader would refuse
fails here with the same message. No vLLM import: what needs the architecture (which
layers vLLM builds plain, which it cuts for tensor parallelism, which modules it lacks)
comes from `ArchitectureFacts` when vLLM is importable, or from stated assumptions.
"""

from __future__ import annotations

import json
import math
import os
import re
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Literal

import torch

from . import quant_state as qs
from .checkpoint import (
    IN_FLIGHT_BLOCKSIZE,
    MOE_EXPERTS_KEY,
    CheckpointLayout,
    FileReader,
    QuantizedWeight,
    TensorInfo,
    check_quantization_matches,
    declared_quantization,
    narrowed_absmax,
    scan_checkpoint,
)

Severity = Literal["error", "warning", "note"]
Cut = Literal["rows", "cols", "none"]

# Leaf names of attention projections (what vLLM stacks into qkv_proj).
Q, K, V = "q_proj", "k_proj", "v_proj"
# Module-name components of encoders that feed the language model.
TOWER_COMPONENTS = ("vision_tower", "audio_tower", "vision_model", "visual", "vision_encoder",
                    "audio_encoder", "image_encoder", "audio_model")
# Without vLLM: leaf names of layers that take a split input under tensor parallelism.
ROW_PARALLEL_LEAVES = ("o_proj", "down_proj", "out_proj", "fc2", "w2", "wo")
DEFAULT_TP_SIZES = (2, 4, 8)
_FLOAT_SIZES = {"bfloat16": 2, "float16": 2, "float32": 4}


@dataclass
class ModuleInfo:
    """One module with a `.weight`: how it is stored and what it costs."""

    name: str
    kind: str  # "nf4" | "fp4" | "int8" | "plain"
    shape: list[int]  # logical [out, in] (4-bit: from the quant-state JSON)
    storage: str  # dtype of the stored weight
    double_quant: bool | None = None
    blocksize: int | None = None
    disk_bytes: int = 0  # the weight and its quant-state tensors
    loaded_bytes: int = 0  # what it takes once loaded (see Report.memory_assumptions)
    # "packed" | "dequantized" (vLLM builds the layer plain) | "plain" | "absent" (no
    # module takes it) | "ignored" (the model's name mapper drops it)
    built: str = "plain"


@dataclass
class Problem:
    code: str
    severity: Severity
    message: str
    fix: str
    examples: list[str] = field(default_factory=list)


@dataclass
class ArchitectureFacts:
    """What vLLM's model class says about the checkpoint's packed modules."""

    architecture: str
    built: dict[str, str]  # packed checkpoint module -> ModuleInfo.built
    cuts: dict[str, Cut]  # checkpoint module -> the TP cut its vLLM layer applies
    kv_heads: dict[str, int]  # k/v checkpoint module -> KV heads (replicated past TP=heads)


@dataclass
class Report:
    checkpoint: str
    files: list[str]
    architecture: str | None
    quantization_config: dict | None
    dtype: str
    modules: list[ModuleInfo]
    disk_bytes_by_kind: dict[str, int]
    loaded_bytes_by_kind: dict[str, int]
    loaded_bytes_total: int
    memory_assumptions: list[str]
    problems: list[Problem]
    tp_exact: dict[int, bool]
    architecture_checked: bool

    def to_json(self) -> dict:
        return asdict(self)

    @property
    def has_errors(self) -> bool:
        return any(p.severity == "error" for p in self.problems)


# ------------------------------------------------------------------------- files


def checkpoint_files(folder: str) -> list[str]:
    """The safetensors files the loader would read (the index's, when there is one)."""
    from .checkpoint import CheckpointError

    names = sorted(n for n in os.listdir(folder) if n.endswith(".safetensors"))
    index = os.path.join(folder, "model.safetensors.index.json")
    if os.path.exists(index):
        with open(index) as f:
            listed = set(json.load(f).get("weight_map", {}).values())
        names = [n for n in names if n in listed]
    if not names:
        pickles = sorted(
            os.path.join(folder, n) for n in os.listdir(folder) if n.endswith((".bin", ".pt"))
        )
        raise CheckpointError(
            f"{folder}: no *.safetensors weights found"
            + (f", only pickle file(s) {', '.join(pickles)}, which are refused (unpickling "
               "can run code; the loader takes trusted ones with VLLM_BNB_ALLOW_PICKLE=1): "
               "convert them to safetensors to inspect them" if pickles else "")
        )
    return [os.path.join(folder, n) for n in names]


def read_config(folder: str) -> dict:
    path = os.path.join(folder, "config.json")
    if not os.path.exists(path):
        return {}
    with open(path) as f:
        return json.load(f)


def model_dtype(config: dict, requested: str | None) -> str:
    """The dtype vLLM gives plain weights: --dtype, else the config's (bfloat16 for a
    float32 config, as vLLM's "auto" does), else bfloat16."""
    if requested:
        return requested
    for source in (config, config.get("text_config") or {}):
        dtype = source.get("dtype") or source.get("torch_dtype")
        if isinstance(dtype, str) and dtype.removeprefix("torch.") in _FLOAT_SIZES:
            dtype = dtype.removeprefix("torch.")
            return "bfloat16" if dtype == "float32" else dtype
    return "bfloat16"


# ------------------------------------------------------------------------- inspect


def inspect_checkpoint(
    folder: str,
    *,
    dtype: str | None = None,
    tp_sizes: tuple[int, ...] = DEFAULT_TP_SIZES,
    architecture: Callable[[str, CheckpointLayout], ArchitectureFacts | None] | None = None,
    full: bool = False,
) -> Report:
    """Everything `vllm-bnb-mm inspect` prints. Raises CheckpointError where the loader
    would refuse the files (the message names tensor and file). `architecture` (given
    where vLLM is importable) supplies the model-class facts once the files check out.
    `full` also reads every block scale and checks it as the loader does (reads about
    1/16 of the packed bytes; without it only the JSON and header entries are read)."""
    files = checkpoint_files(folder)
    config = read_config(folder)
    qconfig = config.get("quantization_config")
    layout = scan_checkpoint(files)
    check_quantization_matches(layout, files, declared_quantization(qconfig))
    dtype = model_dtype(config, dtype)
    modules = _module_infos(layout, FileReader(), full)
    facts = architecture(folder, layout) if architecture is not None else None
    _apply_build(modules, facts)
    experts_kind = experts_quantized_at_load(config)
    assumptions = _price(modules, layout, _FLOAT_SIZES[dtype], facts, full)
    problems = find_problems(layout, modules, qconfig, facts, experts_kind)
    tp_exact, tp_problem = tp_cut_report(modules, tp_sizes, config, facts)
    if tp_problem is not None:
        problems.append(tp_problem)
    loaded = _loaded_bytes_by_kind(modules, layout, _FLOAT_SIZES[dtype], experts_kind)
    return Report(
        checkpoint=os.path.abspath(folder),
        files=[os.path.basename(f) for f in files],
        architecture=(config.get("architectures") or [None])[0],
        quantization_config=qconfig,
        dtype=dtype,
        modules=modules,
        disk_bytes_by_kind=_disk_bytes_by_kind(layout),
        loaded_bytes_by_kind=loaded,
        loaded_bytes_total=sum(loaded.values()),
        memory_assumptions=assumptions,
        problems=problems,
        tp_exact=tp_exact,
        architecture_checked=facts is not None,
    )


def _module_infos(
    layout: CheckpointLayout, reader: FileReader, full: bool
) -> list[ModuleInfo]:
    infos = []
    state = layout.state_tensor_names
    for name, tensor in layout.tensors.items():
        if not name.endswith(".weight") or name in state:
            continue
        module = name.removesuffix(".weight")
        q = layout.quantized.get(name)
        if q is None:
            infos.append(ModuleInfo(module, "plain", list(tensor.shape),
                                    _dtype_name(tensor.dtype), disk_bytes=_nbytes(tensor)))
        elif q.kind == "4bit":
            infos.append(_four_bit_info(module, q, layout, reader, full))
        else:
            qs.parse_8bit_state(q, layout.tensors, reader)  # validates SCB
            infos.append(ModuleInfo(module, "int8", list(tensor.shape), "int8",
                                    disk_bytes=_group_bytes(q, layout), built="packed"))
    return sorted(infos, key=lambda m: _natural_key(m.name))


def _four_bit_info(
    module: str, q: QuantizedWeight, layout: CheckpointLayout, reader: FileReader, full: bool
) -> ModuleInfo:
    # The loader's own parsers: the JSON and sizes always, the block scales when `full`.
    state = qs.read_4bit_meta(q, layout.tensors, reader)
    if full:
        qs.parse_4bit_state(q, layout.tensors, reader)
    return ModuleInfo(
        module, state.quant_type, list(state.shape), "uint8",
        double_quant="nested_absmax" in q.state_tensors, blocksize=state.blocksize,
        disk_bytes=_group_bytes(q, layout), built="packed",
    )


def _apply_build(modules: list[ModuleInfo], facts: ArchitectureFacts | None) -> None:
    """Which packed modules stay packed: vLLM's answer, or the assumption that only the
    LM head is built plain (vLLM's LM head is an embedding-like layer, never BnB)."""
    for m in modules:
        if m.kind == "plain":
            continue
        if facts is not None:
            m.built = facts.built.get(m.name, "packed")
        elif _leaf(m.name) == "lm_head":
            m.built = "dequantized"


def _price(
    modules: list[ModuleInfo], layout: CheckpointLayout, itemsize: int,
    facts: ArchitectureFacts | None, full: bool,
) -> list[str]:
    """Bytes each module takes as loaded, on a GPU: 4-bit packed bytes + float32 absmax
    (double quant is flattened at load) + the 16-entry code; 8-bit int8 + float32 row
    scales; plain and dequantized weights in the model dtype."""
    keqv = {m.name for m in k_eq_v_modules(modules)}
    for m in modules:
        numel = math.prod(m.shape)
        if m.built in ("absent", "ignored"):
            m.loaded_bytes = 0
        elif m.built == "dequantized":
            m.loaded_bytes = numel * itemsize
        elif m.kind in ("nf4", "fp4"):
            copies = 2 if m.name in keqv else 1  # V is a copy of K inside qkv_proj
            m.loaded_bytes = copies * (-(-numel // 2) + 4 * -(-numel // m.blocksize) + 64)
        elif m.kind == "int8":
            m.loaded_bytes = numel + 4 * m.shape[0]
        else:
            m.loaded_bytes = _plain_loaded_bytes(layout.tensors[m.name + ".weight"], itemsize)
    notes = [
        "Sizes from the headers and quant-state JSON; block scales were "
        + ("read and checked (--full)." if full else "not read (--full checks them too)."),
        "GPU layout: 4-bit weights packed (2 per byte) with float32 block scales (double "
        "quant flattened at load); 8-bit int8 with float32 row scales; plain weights in the "
        "model dtype. On x86 CPUs the 4-bit block scales are kept in bfloat16 instead.",
        "Weights only: no KV cache, activations or CUDA graphs.",
    ]
    if facts is not None:
        notes.append(f"Which packed weights vLLM builds plain: from {facts.architecture} "
                     "as vLLM builds it.")
    else:
        notes.append("Without vLLM's model class: assumed every packed Linear stays packed except "
                     "the LM head (vLLM never builds its LM head quantized); a layer vLLM "
                     "builds unquantized would be dequantized and cost more.")
    if keqv:
        notes.append("k_eq_v layers: V's rows inside qkv_proj are a copy of K's packed bytes.")
    return notes


def _plain_loaded_bytes(tensor, itemsize: int) -> int:
    numel = math.prod(tensor.shape)
    return numel * itemsize if tensor.dtype.is_floating_point else _nbytes(tensor)


def _disk_bytes_by_kind(layout: CheckpointLayout) -> dict[str, int]:
    out = {"4bit weights": 0, "4bit quant state": 0, "8bit weights": 0, "8bit quant state": 0}
    kind_of = {}
    for q in layout.quantized.values():
        kind_of[q.weight] = f"{q.kind} weights"
        for name in q.state_tensors.values():
            kind_of[name] = f"{q.kind} quant state"
    for name, tensor in layout.tensors.items():
        key = kind_of.get(name) or f"plain {_dtype_name(tensor.dtype)}"
        out[key] = out.get(key, 0) + _nbytes(tensor)
    return {k: v for k, v in out.items() if v}


def _loaded_bytes_by_kind(
    modules: list[ModuleInfo], layout: CheckpointLayout, itemsize: int,
    experts_kind: str | None,
) -> dict[str, int]:
    out: dict[str, int] = {}
    experts = {t.name: t for t in unquantized_experts(layout)} if experts_kind else {}
    for m in modules:
        if m.name + ".weight" in experts:
            continue
        key = {"packed": f"{_bits(m)} packed", "dequantized": f"{_bits(m)} dequantized",
               "absent": "not loaded", "ignored": "not loaded"}.get(m.built, "plain")
        out[key] = out.get(key, 0) + m.loaded_bytes
    skip = {m.name + ".weight" for m in modules} | layout.state_tensor_names
    others = [t for n, t in layout.tensors.items() if n not in skip and n not in experts]
    out["plain"] = out.get("plain", 0) + sum(_plain_loaded_bytes(t, itemsize) for t in others)
    if experts:
        key = f"{experts_kind} quantized at load"
        out[key] = sum(_in_flight_bytes(t.shape, experts_kind) for t in experts.values())
    out.pop("not loaded", None)
    return {k: v for k, v in out.items() if v}


def _in_flight_bytes(shape: tuple[int, ...], kind: str) -> int:
    """A weight the loader quantizes, in the GPU layout the other sizes assume: 4-bit
    packed + a float32 scale per 64 values (the in-flight blocksize); int8 + a float32
    scale per row."""
    numel = math.prod(shape)
    if kind == "8bit":
        return numel + numel // shape[-1] * 4
    return numel // 2 + -(-numel // IN_FLIGHT_BLOCKSIZE) * 4


def _bits(m: ModuleInfo) -> str:
    return "8bit" if m.kind == "int8" else "4bit"


# ------------------------------------------------------------------------- problems


def find_problems(
    layout: CheckpointLayout, modules: list[ModuleInfo], qconfig: dict | None,
    facts: ArchitectureFacts | None, experts_kind: str | None = None,
) -> list[Problem]:
    packed = [m for m in modules if m.kind != "plain"]
    problems = [
        *_lm_head_problem(packed),
        *_skip_list_problems(modules, qconfig),
        *_tower_problem(packed),
        *_k_eq_v_problem(modules),
        *_moe_problem(layout, packed, experts_kind),
        *_narrowed_absmax_problem(layout),
        *_absent_module_problem(packed, facts),
    ]
    return problems


def _lm_head_problem(packed: list[ModuleInfo]) -> list[Problem]:
    heads = [m for m in packed if _leaf(m.name) == "lm_head"]
    if not heads:
        return []
    return [Problem(
        "lm_head-quantized", "warning",
        f"{heads[0].name} is stored {heads[0].kind}. vLLM builds the LM head unquantized, so "
        "it is dequantized at load (loads correctly, costs its full-precision size, and "
        "the logits carry the 4-bit error). Usually the transformers skip-list pitfall: an "
        "explicit llm_int8_skip_modules replaces transformers' default exclusions, which "
        "kept lm_head out.",
        "Re-quantize with lm_head in the skip list, e.g. llm_int8_skip_modules="
        "['model.vision_tower', 'lm_head'].",
        [m.name for m in heads],
    )]


def _skip_list_problems(modules: list[ModuleInfo], qconfig: dict | None) -> list[Problem]:
    """Skip entries that transformers 5 matched against nothing (it anchors them at the
    model root: 'vision_tower' skips nothing, 'model.vision_tower' does) while the modules
    they name unanchored were quantized: the skip the user meant did not happen."""
    problems = []
    for skip in (qconfig or {}).get("llm_int8_skip_modules") or []:
        if not isinstance(skip, str) or not skip:
            continue
        if any(m.name == skip or m.name.startswith(skip + ".") for m in modules):
            continue
        pattern = re.compile(rf"(^|\.){re.escape(skip)}(\.|$)")
        named = [m for m in modules if pattern.search(m.name)]
        packed = [m for m in named if m.kind != "plain"]
        if not packed:
            continue
        anchored = sorted({m.name[: pattern.search(m.name).end()].rstrip(".") for m in named})
        problems.append(Problem(
            "skip-list-matches-nothing", "warning",
            f"llm_int8_skip_modules entry {skip!r} matches no module as transformers 5 "
            f"matches skip names (anchored at the model root), so {len(packed)} module(s) "
            f"under it were quantized (e.g. {packed[0].name}). The plugin follows the "
            "tensors, so this loads; it is just not what the skip list says.",
            f"To keep them unquantized, re-quantize with {anchored[:3]} in "
            "llm_int8_skip_modules (and lm_head, which an explicit list no longer skips).",
            [m.name for m in packed[:5]],
        ))
    return problems


def _tower_problem(packed: list[ModuleInfo]) -> list[Problem]:
    towers = [m for m in packed if set(m.name.split(".")) & set(TOWER_COMPONENTS)]
    if not towers:
        return []
    kinds = sorted({m.kind for m in towers})
    return [Problem(
        "tower-quantized", "note",
        f"{len(towers)} encoder (vision/audio tower) module(s) are stored {'/'.join(kinds)} "
        f"(e.g. {towers[0].name}). They load and run quantized; image/audio features then "
        "carry the 4-bit error (transformers' default quantizes towers too).",
        "If image/audio quality matters more than memory, re-quantize with the tower in the "
        "skip list, anchored: e.g. 'model.vision_tower'.",
        [m.name for m in towers[:5]],
    )]


def k_eq_v_modules(modules: list[ModuleInfo]) -> list[ModuleInfo]:
    """Packed k_proj modules of attention blocks that have q_proj but no v_proj: the
    value projection is the key projection (Gemma 4's attention_k_eq_v)."""
    names = {m.name for m in modules}
    out = []
    for m in modules:
        parent, _, leaf = m.name.rpartition(".")
        if m.kind != "plain" and leaf == K and f"{parent}.{Q}" in names and \
                f"{parent}.{V}" not in names:
            out.append(m)
    return out


def _k_eq_v_problem(modules: list[ModuleInfo]) -> list[Problem]:
    keqv = k_eq_v_modules(modules)
    if not keqv:
        return []
    return [Problem(
        "k_eq_v", "note",
        f"{len(keqv)} attention layer(s) have a packed k_proj and no v_proj (k_eq_v: V "
        f"is K), e.g. {keqv[0].name}. vllm-bnb-mm hands K's packed bytes and quant state to "
        "V as well; loaders that look for v_proj's own quant state fail on these.",
        "Nothing to fix: load with --load-format bitsandbytes and vllm-bnb-mm.",
        [m.name for m in keqv[:5]],
    )]


def experts_quantized_at_load(config: dict) -> str | None:
    """"4bit" / "8bit": what the loader makes of MoE experts a BnB checkpoint stores
    unquantized (it quantizes them with the checkpoint's settings); None where they stay
    in the model dtype (`bnb_moe_experts: "unquantized"`, or no BnB quantization_config)."""
    declared = declared_quantization(config.get("quantization_config"))
    if declared is None or config.get(MOE_EXPERTS_KEY) == "unquantized":
        return None
    return declared.kind


def unquantized_experts(layout: CheckpointLayout) -> list[TensorInfo]:
    """MoE expert tensors stored in floating point: transformers 5 keeps experts as 3-D
    parameters (written back per expert by some models), and bitsandbytes only quantizes
    nn.Linear."""
    state = layout.state_tensor_names
    return [
        t for n, t in layout.tensors.items()
        if "experts" in n.split(".") and t.dtype.is_floating_point
        and n not in state and n not in layout.quantized
        and (len(t.shape) == 3 or n.endswith(".weight"))
    ]


def _moe_problem(
    layout: CheckpointLayout, packed: list[ModuleInfo], experts_kind: str | None
) -> list[Problem]:
    """Experts left in full precision beside packed layers: HF runs them in full precision,
    the loader quantizes them (unless told not to), so the two differ there."""
    experts = unquantized_experts(layout)
    if not experts or not packed:
        return []
    size = sum(_nbytes(t) for t in experts)
    total = sum(_nbytes(t) for t in layout.tensors.values())
    three_d = [t for t in experts if len(t.shape) == 3]
    how = ("3-D expert parameters (transformers 5 MoE layout), which bitsandbytes does not "
           "quantize" if three_d else "per-expert weights left unquantized")
    found = (f"{len(experts)} MoE expert tensor(s) are {experts[0].dtype} ({_gib(size)}, "
             f"{100 * size / max(total, 1):.0f}% of the checkpoint): {how}, beside "
             f"{len(packed)} packed layer(s).")
    if experts_kind is None:
        return [Problem(
            "moe-experts-unquantized", "warning",
            f"{found} With bnb_moe_experts: \"unquantized\" they load in the model dtype, as "
            "HF runs them: the memory saving you expected from 4-bit mostly did not happen.",
            "Drop bnb_moe_experts to let vllm-bnb-mm quantize them while loading, or "
            "quantize the experts per expert (transformers 4.x or unsloth pack every expert "
            "as its own Linear).",
            [t.name for t in experts[:5]],
        )]
    return [Problem(
        "moe-experts-unquantized", "warning",
        f"{found} vllm-bnb-mm quantizes them while loading ({experts_kind}, the "
        "checkpoint's settings; counted so under 'as loaded'), but HF runs this checkpoint "
        "with full-precision experts, so outputs differ from HF's by the experts' "
        "quantization error.",
        "To serve the experts as HF does (at their full-precision size), set "
        "bnb_moe_experts: \"unquantized\" in config.json or with --hf-overrides "
        "'{\"bnb_moe_experts\": \"unquantized\"}'; to have every runtime compute the same "
        "4-bit experts, quantize them per expert (transformers 4.x or unsloth pack every "
        "expert as its own Linear).",
        [t.name for t in experts[:5]],
    )]


def _narrowed_absmax_problem(layout: CheckpointLayout) -> list[Problem]:
    narrowed = narrowed_absmax(layout)
    if not narrowed:
        return []
    first = layout.tensors[narrowed[0]]
    return [Problem(
        "absmax-narrowed", "warning",
        f"{len(narrowed)} absmax tensor(s) are stored as {first.dtype} instead of "
        f"bitsandbytes' float32 (e.g. {first.name} in {first.file}); they load upcast, "
        "exactly as stored, so outputs differ slightly from the original checkpoint.",
        "Re-save from the original quantized model without casting the quant state.",
        narrowed[:5],
    )]


def _absent_module_problem(
    packed: list[ModuleInfo], facts: ArchitectureFacts | None
) -> list[Problem]:
    if facts is None:
        return [Problem(
            "architecture-not-checked", "note",
            "vLLM's model class was not built (--no-vllm, or vLLM is not importable), so "
            "packed weights were not checked against it: modules it lacks are not found, "
            "layers it builds unquantized and tensor-parallel cuts are assumed from names.",
            "Run inspect where vLLM is installed, without --no-vllm, for those checks.",
        )]
    absent = [m for m in packed if m.built == "absent"]
    if not absent:
        return []
    return [Problem(
        "module-not-in-architecture", "error",
        f"{len(absent)} packed weight(s) have no module in {facts.architecture} as vLLM "
        f"builds it (e.g. {absent[0].name}.weight); the loader refuses to drop quantized "
        "weights silently, so loading fails.",
        "Is the checkpoint for this architecture and config.json? Remove the extra "
        "tensors or fix config.json's architectures.",
        [m.name for m in absent[:5]],
    )]


# ------------------------------------------------------------------------- tensor parallel


def tp_cut_report(
    modules: list[ModuleInfo], tp_sizes: tuple[int, ...], config: dict,
    facts: ArchitectureFacts | None,
) -> tuple[dict[int, bool], Problem | None]:
    """For each TP size, whether every packed 4-bit weight's slice falls on quant-block
    boundaries (8-bit weights are cut per row/column, always exactly). A cut that misses
    is dequantized and requantized at load: slower, and that slice is quantized twice."""
    kv_heads = _config_kv_heads(config)
    inexact: dict[int, list[str]] = {}
    for tp in tp_sizes:
        bad = []
        for m in modules:
            if m.kind not in ("nf4", "fp4") or m.built != "packed":
                continue
            cut = facts.cuts.get(m.name, "none") if facts else _assumed_cut(m.name)
            heads = facts.kv_heads.get(m.name) if facts else (
                kv_heads if _leaf(m.name) in (K, V) else None)
            if not _cut_is_exact(m, cut, tp, heads):
                bad.append(m.name)
        inexact[tp] = bad
    exact = {tp: not bad for tp, bad in inexact.items()}
    failing = [tp for tp in tp_sizes if inexact[tp]]
    if not failing:
        return exact, None
    basis = ("vLLM's layer classes" if facts else
             f"assumed from layer names ({', '.join(ROW_PARALLEL_LEAVES)} split their input, "
             "other layers their output)")
    detail = "; ".join(f"TP={tp}: {len(inexact[tp])} (e.g. {inexact[tp][0]})" for tp in failing)
    ok = [tp for tp in tp_sizes if exact[tp]]
    return exact, Problem(
        "tp-cut-not-exact", "note",
        f"Tensor-parallel cuts that miss a quant block boundary ({basis}): {detail}. Those "
        "slices are dequantized and requantized at load (an INFO line names each): it "
        "works, loads slower, and adds a second rounding to those slices.",
        (f"Use TP={', '.join(map(str, ok))} (exact), or r" if ok else "R")
        + "e-quantize with a smaller bnb_4bit_blocksize (each cut must be a multiple of it).",
        inexact[failing[0]][:5],
    )


def _assumed_cut(module: str) -> Cut:
    return "cols" if _leaf(module) in ROW_PARALLEL_LEAVES else "rows"


def _config_kv_heads(config: dict) -> int | None:
    for source in (config.get("text_config") or {}, config):
        heads = source.get("num_key_value_heads")
        if isinstance(heads, int) and heads > 0:
            return heads
    return None


def _cut_is_exact(m: ModuleInfo, cut: Cut, tp: int, kv_heads: int | None) -> bool:
    """The loader's rule (quant_state.slice_4bit_rows/_cols): a slice is exact when it
    starts and ends on a block boundary (and a byte boundary)."""
    rows, cols = m.shape[0], math.prod(m.shape[1:])
    bs = m.blocksize
    if cut == "none":
        return True
    if cut == "cols":
        return cols % tp == 0 and cols % bs == 0 and (cols // tp) % bs == 0
    parts = min(tp, kv_heads) if kv_heads else tp  # KV heads are replicated past TP=heads
    if rows % parts:
        return False
    span = rows // parts * cols
    return span % bs == 0 and span % 2 == 0


# ------------------------------------------------------------------------- helpers


def _leaf(name: str) -> str:
    return name.rsplit(".", 1)[-1]


def _nbytes(tensor) -> int:
    return tensor.end - tensor.start


def _group_bytes(q: QuantizedWeight, layout: CheckpointLayout) -> int:
    names = [q.weight, *q.state_tensors.values()]
    return sum(_nbytes(layout.tensors[n]) for n in names)


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _natural_key(name: str) -> list:
    return [int(p) if p.isdigit() else p for p in re.split(r"(\d+)", name)]


def _gib(n: int) -> str:
    return f"{n / 2**30:.2f} GiB" if n >= 2**30 else f"{n / 2**20:.1f} MiB"
