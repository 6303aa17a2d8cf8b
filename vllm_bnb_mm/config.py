"""The `bitsandbytes` quantization config: which layers are BnB, decided by the tensors."""

from __future__ import annotations

from bisect import bisect_left
from typing import Any, Literal

import torch
from vllm.model_executor.layers.linear import LinearBase, UnquantizedLinearMethod
from vllm.model_executor.layers.quantization import QuantizationConfig

from .checkpoint import IN_FLIGHT_BLOCKSIZE, MOE_EXPERTS_KEY, MOE_EXPERTS_MODES

ModuleKind = Literal["4bit", "8bit", "plain"]

# Fused vLLM modules and the checkpoint modules they stack, used when a model class
# declares no `packed_modules_mapping` of its own.
DEFAULT_PACKED_MODULES = {
    "qkv_proj": ["q_proj", "k_proj", "v_proj"],
    "gate_up_proj": ["gate_proj", "up_proj"],
}


class BnbConfig(QuantizationConfig):
    """bitsandbytes 4-bit (nf4/fp4) and 8-bit (LLM.int8) weights.

    Pre-quantized checkpoints: the loader reads the safetensors headers before the
    model is built and calls `set_module_kinds`; a layer is BnB exactly when its
    checkpoint tensors are packed. In-flight (`--quantization bitsandbytes` on a plain
    checkpoint): every linear layer not in the skip list is quantized while loading.
    """

    def __init__(
        self,
        load_in_8bit: bool = False,
        load_in_4bit: bool = True,
        bnb_4bit_quant_type: str = "nf4",
        bnb_4bit_blocksize: int = IN_FLIGHT_BLOCKSIZE,
        llm_int8_threshold: float = 6.0,
        llm_int8_skip_modules: list[str] | None = None,
        pre_quantized: bool = False,
    ) -> None:
        super().__init__()
        if bnb_4bit_quant_type not in ("nf4", "fp4"):
            raise ValueError(
                f"bnb_4bit_quant_type must be 'nf4' or 'fp4', got {bnb_4bit_quant_type!r}"
            )
        self.load_in_8bit = load_in_8bit
        self.load_in_4bit = load_in_4bit and not load_in_8bit
        self.quant_type = bnb_4bit_quant_type
        self.blocksize = bnb_4bit_blocksize
        self.llm_int8_threshold = llm_int8_threshold
        self.skip_modules = list(llm_int8_skip_modules or [])
        self.pre_quantized = pre_quantized
        # vLLM module name -> kind, from the checkpoint's tensors (set by the loader).
        self.module_kinds: dict[str, ModuleKind] | None = None
        # What config.json itself says (None: neither load_in_4bit nor load_in_8bit is
        # there); the loader holds it against the tensors before building the model.
        self.declared_kind: ModuleKind | None = self.kind

    def __repr__(self) -> str:
        bits = "8bit" if self.load_in_8bit else f"4bit-{self.quant_type}"
        return f"BnbConfig({bits}, pre_quantized={self.pre_quantized})"

    @classmethod
    def get_name(cls) -> str:
        return "bitsandbytes"

    @classmethod
    def get_supported_act_dtypes(cls) -> list[torch.dtype]:
        return [torch.float32, torch.float16, torch.bfloat16]

    @classmethod
    def get_min_capability(cls) -> int:
        return 70

    @staticmethod
    def get_config_filenames() -> list[str]:
        return []

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> BnbConfig:
        known = {
            "load_in_8bit", "load_in_4bit", "bnb_4bit_quant_type", "llm_int8_threshold",
            "llm_int8_skip_modules",
        }
        kwargs = {k: config[k] for k in known if config.get(k) is not None}
        for flag in ("load_in_4bit", "load_in_8bit"):
            # transformers writes both `load_in_4bit` and the private `_load_in_4bit`.
            if flag not in kwargs and config.get("_" + flag) is not None:
                kwargs[flag] = config["_" + flag]
        if not kwargs.get("load_in_8bit") and not kwargs.get("load_in_4bit", True):
            raise ValueError(
                "config.json quantization_config has quant_method 'bitsandbytes' but "
                "load_in_4bit and load_in_8bit are both false: set the one matching the "
                "checkpoint's tensors to true (4-bit: `.absmax`/`.quant_map` tensors; "
                "8-bit: `.SCB` tensors)"
            )
        pre_quantized = config.get("quant_method") == "bitsandbytes"
        result = cls(**kwargs, pre_quantized=pre_quantized)
        if pre_quantized and not (kwargs.get("load_in_4bit") or kwargs.get("load_in_8bit")):
            result.declared_kind = None  # defaulted, not declared: the loader reports it
        return result

    @property
    def kind(self) -> ModuleKind:
        return "8bit" if self.load_in_8bit else "4bit"

    def set_module_kinds(self, kinds: dict[str, ModuleKind]) -> None:
        self.module_kinds = kinds
        self._sorted_modules = sorted(kinds)

    def get_quant_method(self, layer: torch.nn.Module, prefix: str):
        from vllm.model_executor.layers.fused_moe import RoutedExperts
        from vllm.model_executor.layers.fused_moe.router.gate_linear import GateLinear

        if isinstance(layer, RoutedExperts):
            kind = self.experts_kind(prefix)
            if kind == "plain":
                return None  # vLLM's UnquantizedFusedMoEMethod
            from .moe import BnbMoEMethod

            return BnbMoEMethod(self, kind, layer.moe_config, prefix)
        if not isinstance(layer, LinearBase):
            return None
        if isinstance(layer, GateLinear):
            # vLLM builds MoE routers as GateLinear. Routers stay plain, as HF keeps
            # them when quantizing (transformers 5 routers are no nn.Linear; most vLLM
            # models give theirs no quant config at all): which experts run must not
            # move with quantization noise. A packed router in a checkpoint (transformers
            # 4.x quantized nn.Linear gates) is dequantized into it by the loader (logged).
            return UnquantizedLinearMethod()
        from .linear import BnbLinearMethod

        kind = self.layer_kind(prefix)
        if kind == "plain":
            return UnquantizedLinearMethod()
        return BnbLinearMethod(self, kind, prefix)

    def _check_load_format(self) -> None:
        if self.pre_quantized and self.module_kinds is None:
            raise ValueError(
                "This checkpoint is pre-quantized with bitsandbytes: load it with "
                "`--load-format bitsandbytes` (LLM(..., load_format='bitsandbytes'))"
            )

    def experts_kind(self, prefix: str) -> ModuleKind:
        """4bit / 8bit / plain for the routed experts (a vLLM FusedMoE layer) at `prefix`.

        Experts packed in the checkpoint (one packed tensor per expert and projection)
        keep their kind; unquantized experts are quantized while loading with this
        config's settings, unless the user keeps them (`bnb_moe_experts`) or the skip
        list names them."""
        self._check_load_format()
        if moe_experts_mode() == "unquantized":
            return "plain"
        packed = self._packed_kinds_under(prefix)
        if len(packed) > 1:
            raise ValueError(
                f"MoE layer {prefix}: the checkpoint stores its experts as {sorted(packed)} "
                "at once; one layer's experts must share one bitsandbytes kind"
            )
        if packed:
            return packed.pop()
        return "plain" if self.is_skipped(prefix) else self.kind

    def _packed_kinds_under(self, prefix: str) -> set[ModuleKind]:
        if self.module_kinds is None:
            return set()
        names, head = self._sorted_modules, prefix + "."
        kinds: set[ModuleKind] = set()
        for name in names[bisect_left(names, head):]:
            if not name.startswith(head):
                break
            if self.module_kinds[name] != "plain":
                kinds.add(self.module_kinds[name])
        return kinds

    def layer_kind(self, prefix: str) -> ModuleKind:
        """4bit / 8bit / plain for the vLLM layer at `prefix`."""
        self._check_load_format()
        if self.module_kinds is not None:
            kinds = [
                self.module_kinds[m] for m in self._checkpoint_modules(prefix)
                if m in self.module_kinds
            ]
            quantized = [k for k in kinds if k != "plain"]
            if quantized:
                # A fused layer is BnB when any constituent is packed; plain
                # constituents are quantized in flight (logged by the loader).
                return quantized[0]
            if kinds:
                return "plain"
        return "plain" if self.is_skipped(prefix) else self.kind

    def _checkpoint_modules(self, prefix: str) -> list[str]:
        parent, _, leaf = prefix.rpartition(".")
        mapping = {**DEFAULT_PACKED_MODULES, **(self.packed_modules_mapping or {})}
        parts = mapping.get(leaf)
        if not parts or parts == [leaf]:
            return [prefix]
        return [f"{parent}.{p}" if parent else p for p in parts]

    def is_skipped(self, prefix: str) -> bool:
        """The config's skip list, matched as transformers 5 does (anchored dotted
        prefixes) and as component names, since vLLM renames modules."""
        components = prefix.split(".")
        dotted = {".".join(components[: i + 1]) for i in range(len(components))}
        for skip in self.skip_modules:
            if skip in dotted or skip in components:
                return True
            if "." in skip and any(prefix.startswith(s) for s in self._renamed_skips(skip)):
                return True
        return False

    def _renamed_skips(self, skip: str) -> list[str]:
        # The mapper installed by vLLM (apply_vllm_mapper) turns HF names into vLLM
        # names; `model.vision_tower` becomes `vision_tower` for Gemma 4, say.
        mapper = getattr(self, "_vllm_mapper", None)
        if mapper is None:
            return []
        mapped = mapper.map_name(skip + ".weight")
        return [mapped.removesuffix(".weight")] if mapped else []

    def apply_vllm_mapper(self, hf_to_vllm_mapper) -> None:
        # Nested models call this again with their own mapper; the outermost one
        # names the modules the whole model is built with.
        if getattr(self, "_vllm_mapper", None) is None:
            self._vllm_mapper = hf_to_vllm_mapper


def moe_experts_mode() -> str:
    """`bnb_moe_experts` from the model's config (config.json or --hf-overrides)."""
    from vllm.config import get_current_vllm_config_or_none

    vllm_config = get_current_vllm_config_or_none()
    model_config = vllm_config.model_config if vllm_config is not None else None
    hf_config = model_config.hf_config if model_config is not None else None
    mode = getattr(hf_config, MOE_EXPERTS_KEY, None) or "quantize"
    if mode not in MOE_EXPERTS_MODES:
        raise ValueError(
            f"config key {MOE_EXPERTS_KEY!r} is {mode!r}; expected one of {MOE_EXPERTS_MODES} "
            f"(e.g. --hf-overrides '{{\"{MOE_EXPERTS_KEY}\": \"unquantized\"}}')"
        )
    return mode
