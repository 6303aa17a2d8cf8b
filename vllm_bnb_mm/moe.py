"""The BnB MoE method: routed experts held packed (4-bit nf4/fp4 or 8-bit), one quant
state per expert and projection, in vLLM's fused layout (w13 = gate then up, w2 = down).

Loading: every expert projection arrives on its own through vLLM's expert loader, as a
packed tensor (per-expert checkpoints, transformers 4.x / unsloth) or a plain one
(transformers 5 keeps experts as 3-D bf16 parameters; vLLM unbinds them per expert),
which is then quantized while loading. Packed bytes are copied as they are, never
dequantized; the expert's quant state is kept beside them. Tensor parallelism cuts the
intermediate dimension like vLLM does for unquantized experts (gate/up rows, down
columns), exactly where quant blocks align, else by requantizing that one slice.

Forward, after vLLM's router has picked `topk_ids` / `topk_weights`:
- CPU (and other non-CUDA devices): a loop over the experts that tokens route to; each
  runs bitsandbytes' AVX512-BF16 4-bit kernel on weights repacked for it once at load
  (bf16 activations), or dequantizes that expert with bitsandbytes (other dtypes, 8-bit).
- CUDA / ROCm: graph-capture safe, no host sync. 4-bit: when tokens x top-k is below the
  number of experts, the chosen experts are gathered and dequantized by bitsandbytes in
  one call, else all experts are; then vLLM's Triton `fused_experts`. 8-bit: the int8
  weights and their row scales go to `fused_experts` as int8 W8A16 directly.
"""

from __future__ import annotations

import platform
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from bitsandbytes import functional as bnbf
from bitsandbytes.functional import QuantState
from vllm.logger import init_logger
from vllm.model_executor.layers.fused_moe.activation import (
    ApplyMoEActivationConfig,
    MoEActivation,
    apply_moe_activation,
)
from vllm.model_executor.layers.fused_moe.config import FusedMoEConfig, FusedMoEQuantConfig
from vllm.model_executor.layers.fused_moe.fused_moe_method_base import FusedMoEMethodBase
from vllm.platforms import current_platform

from . import cpu
from . import quant_state as qs
from .config import BnbConfig
from .cpu import request_amx_tile_state
from .registry import PACKED, PackedTensor

logger = init_logger(f"vllm.{__name__}")

W13_SHARDS = ("w1", "w3")  # gate, up: rows [0, I) and [I, 2I) of w13


@dataclass(frozen=True)
class ExpertShape:
    """Rank-local sizes of one layer's experts."""

    num_experts: int  # local experts
    hidden: int
    intermediate: int  # per TP rank
    gated: bool

    @property
    def w13_rows(self) -> int:
        return 2 * self.intermediate if self.gated else self.intermediate

    def shards(self, proj: str) -> tuple[str, ...]:
        if proj == "w2":
            return ("w2",)
        return W13_SHARDS if self.gated else ("w1",)

    def matrix(self, proj: str) -> tuple[int, int]:
        """(out, in) of one expert's stacked projection."""
        return (self.w13_rows, self.hidden) if proj == "w13" else (self.hidden, self.intermediate)


class BnbMoEMethod(FusedMoEMethodBase):
    def __init__(self, config: BnbConfig, kind: str, moe: FusedMoEConfig, prefix: str) -> None:
        super().__init__(moe)
        if moe.has_bias:
            raise NotImplementedError(
                f"{prefix}: bitsandbytes experts with biases (e.g. gpt-oss) are not "
                "supported; keep them unquantized with "
                "--hf-overrides '{\"bnb_moe_experts\": \"unquantized\"}'"
            )
        if moe.tp_shard_with_padding:
            raise NotImplementedError(f"{prefix}: padded TP sharding of BnB experts")
        self.config = config
        self.kind = kind
        self.prefix = prefix
        register_op()

    # ------------------------------------------------------------ weights

    def create_weights(
        self,
        layer: torch.nn.Module,
        num_experts: int,
        hidden_size: int,
        intermediate_size_per_partition: int,
        params_dtype: torch.dtype,
        **extra_weight_attrs,
    ) -> None:
        shape = ExpertShape(
            num_experts, hidden_size, intermediate_size_per_partition, self.moe.is_act_and_mul
        )
        for proj in ("w13", "w2"):
            rows, cols = shape.matrix(proj)
            if self.kind == "4bit":
                if (rows * cols) % 2:
                    raise ValueError(f"{self.prefix}: 4-bit experts need an even {proj} size")
                data = torch.empty(num_experts, rows * cols // 2, dtype=torch.uint8)
            else:
                data = torch.empty(num_experts, rows, cols, dtype=torch.int8)
            param = torch.nn.Parameter(data, requires_grad=False)
            layer.register_parameter(f"{proj}_weight", param)
            param.weight_loader = _expert_weight_loader(layer, self)
            # (local expert, shard id) -> quant state; also marks the parameter as BnB
            # for the loader's routing (packed bytes reach it untouched).
            param.bnb_regions = {}
        layer.bnb_shape = shape
        layer.bnb_compute_dtype = params_dtype
        _LAYERS[id(layer)] = layer

    def load_shard(
        self, layer, param, loaded: torch.Tensor, shard_id: str, expert_id: int
    ) -> bool:
        """One expert's gate (w1), up (w3) or down (w2) projection, packed or plain."""
        local = layer._map_global_expert_id_to_local_expert_id(expert_id)
        if local == -1:
            return False  # another rank's expert
        if shard_id not in ("w1", "w2", "w3"):
            raise ValueError(f"{self.prefix}: unknown expert shard id {shard_id!r}")
        shape: ExpertShape = layer.bnb_shape
        key = (local, shard_id)
        if key in param.bnb_regions:
            raise ValueError(
                f"{self.prefix}: expert {expert_id} {_projection_name(layer, shard_id)} "
                "loaded twice (two checkpoint tensors map to it)"
            )
        packed = PACKED.lookup(loaded)
        source = _ShardSource(self, layer, loaded, packed, shard_id, expert_id)
        data, state = source.quantized()
        rows = shape.intermediate if shard_id != "w2" else shape.hidden
        first = rows * (1 if shard_id == "w3" else 0)
        if self.kind == "4bit":
            cols = shape.hidden if shard_id != "w2" else shape.intermediate
            target = param.data[local, first * cols // 2 : (first + rows) * cols // 2]
        else:
            target = param.data[local, first : first + rows]
        target.copy_(data.reshape(target.shape))
        param.bnb_regions[key] = state
        if packed is None:
            PACKED.note_quantized_in_flight(self.prefix)
        return True

    def process_weights_after_loading(self, layer: torch.nn.Module) -> None:
        shape: ExpertShape = layer.bnb_shape
        device = layer.w13_weight.device
        for proj in ("w13", "w2"):
            param = getattr(layer, f"{proj}_weight")
            states = _expert_states(layer, self.prefix, param.bnb_regions, shape.shards(proj))
            del param.bnb_regions
            if self.kind == "4bit":
                _finalize_4bit(layer, proj, states, shape.matrix(proj), self)
            else:
                scb = torch.stack([torch.cat([s.scb for s in row]) for row in states])
                layer.register_buffer(f"{proj}_scb", scb.float().to(device), persistent=False)
        if device.type == "cpu":
            request_amx_tile_state()
        self.moe_quant_config = self.get_fused_moe_quant_config(layer)

    # ------------------------------------------------------------ forward

    def get_fused_moe_quant_config(self, layer: torch.nn.Module) -> FusedMoEQuantConfig:
        return FusedMoEQuantConfig.make(
            gemm1_alpha=getattr(layer, "swiglu_alpha", None),
            gemm1_beta=getattr(layer, "swiglu_beta", None),
            gemm1_clamp_limit=getattr(layer, "swiglu_limit", None),
        )

    def apply(
        self,
        layer: torch.nn.Module,
        x: torch.Tensor,
        topk_weights: torch.Tensor,
        topk_ids: torch.Tensor,
        shared_experts=None,
        shared_experts_input: torch.Tensor | None = None,
    ) -> torch.Tensor:
        # Shared experts, if any, were run by the MoE runner already (this method has
        # no modular kernel to overlap them with).
        return torch.ops.vllm.bnb_mm_moe(x, topk_weights, topk_ids, id(layer))

    def activate(self, layer, h: torch.Tensor) -> torch.Tensor:
        """The layer's activation on [tokens, w13 rows] -> [tokens, intermediate]."""
        activation = layer.activation
        if activation in _GATED:
            gate, up = h.chunk(2, dim=-1)
            return _GATED[activation](gate) * up
        if activation in _NOT_GATED:
            return _NOT_GATED[activation](h)
        out = h.new_empty(h.shape[0], h.shape[1] // 2 if activation.is_gated else h.shape[1])
        config = ApplyMoEActivationConfig.from_configs(self.moe, self.moe_quant_config)
        return apply_moe_activation(activation, out, h.contiguous(), activation_config=config)


_LAYERS: dict[int, torch.nn.Module] = {}  # id -> layer, for the opaque forward op

_GATED = {
    MoEActivation.SILU: F.silu,
    MoEActivation.GELU: F.gelu,
    MoEActivation.GELU_TANH: lambda t: F.gelu(t, approximate="tanh"),
}
_NOT_GATED = {
    MoEActivation.SILU_NO_MUL: F.silu,
    MoEActivation.GELU_NO_MUL: F.gelu,
    MoEActivation.GELU_TANH_NO_MUL: lambda t: F.gelu(t, approximate="tanh"),
}


def _projection_name(layer, shard_id: str) -> str:
    names = {
        "w1": layer.ckpt_gate_proj_name, "w3": layer.ckpt_up_proj_name,
        "w2": layer.ckpt_down_proj_name,
    }
    return f"{names[shard_id]} ({shard_id})"


# ------------------------------------------------------------------- loading


def _expert_weight_loader(layer: torch.nn.Module, method: BnbMoEMethod):
    # The signature of vLLM's RoutedExperts.weight_loader, which calls it by keyword.
    def weight_loader(
        param, loaded_weight: torch.Tensor, weight_name: str, shard_id: str, expert_id: int,
        return_success: bool = False,
    ) -> bool | None:
        loaded = method.load_shard(layer, param, loaded_weight, shard_id, expert_id)
        return loaded if return_success else None

    return weight_loader


class _ShardSource:
    """One checkpoint tensor for one expert projection, cut to this rank, quantized."""

    def __init__(self, method: BnbMoEMethod, layer, loaded, packed: PackedTensor | None,
                 shard_id: str, expert_id: int) -> None:
        self.method, self.layer, self.loaded, self.packed = method, layer, loaded, packed
        self.shard_id, self.expert_id = shard_id, expert_id
        shape: ExpertShape = layer.bnb_shape
        tp_rank, tp_size = method.moe.tp_rank, method.moe.tp_size
        full = shape.intermediate * tp_size
        local = (tp_rank * shape.intermediate, (tp_rank + 1) * shape.intermediate)
        cut = local if tp_size > 1 else None
        if shard_id == "w2":
            self.full_shape, self.rows, self.cols = (shape.hidden, full), None, cut
        else:
            self.full_shape, self.rows, self.cols = (full, shape.hidden), cut, None

    def what(self) -> str:
        name = _projection_name(self.layer, self.shard_id)
        return f"expert {self.expert_id} {name} of {self.method.prefix}"

    def quantized(self):
        packed, kind = self.packed, self.method.kind
        if packed is not None and packed.kind != kind:
            raise ValueError(
                f"{packed.name} ({packed.file}) is {packed.kind} but {self.what()} was built "
                f"{kind}: one layer's experts must share one bitsandbytes kind"
            )
        if packed is None:
            return self._quantize_plain()
        return self._cut_4bit() if kind == "4bit" else self._cut_8bit()

    def _check_shape(self, shape, what: str) -> None:
        if tuple(shape) != self.full_shape:
            raise ValueError(
                f"{what} has shape {list(shape)} but {self.what()} needs "
                f"{list(self.full_shape)}: the checkpoint and config.json disagree"
            )

    def _quantize_plain(self):
        loaded = self.loaded
        if not loaded.is_floating_point():
            raise ValueError(
                f"{self.what()}: got a {loaded.dtype} tensor without a bitsandbytes quant "
                "state (a packed tensor split by the model's loader?)"
            )
        self._check_shape(loaded.shape, "the plain checkpoint tensor")
        device = self.layer.w13_weight.device
        plain = qs.slice_rows_cols(loaded, self.rows, self.cols).to(device).contiguous()
        if self.method.kind == "8bit":
            return qs.quantize_8bit(plain)
        config = self.method.config
        return qs.quantize_4bit(
            plain, config.quant_type, config.blocksize, self.layer.bnb_compute_dtype
        )

    def _cut_4bit(self):
        packed = self.packed
        self._check_shape(packed.state.shape, f"{packed.name} ({packed.file})")
        data, state = packed.data, packed.state
        if self.rows is not None:
            cut = qs.slice_4bit_rows(data, state, *self.rows)
            return cut if cut is not None else self._requantize()
        if self.cols is not None:
            cut = qs.slice_4bit_cols(data, state, *self.cols)
            return cut if cut is not None else self._requantize()
        return data.reshape(-1), state

    def _requantize(self):
        """Quant blocks straddle the TP cut: dequantize this tensor, requantize the slice."""
        packed = self.packed
        logger.info(
            "%s: TP slice of %s does not align with %d-element quant blocks; dequantized "
            "and requantized that slice", self.what(), packed.name, packed.state.blocksize,
        )
        full = qs.dequantize_4bit(packed.data, packed.state, torch.float32)
        full = full.reshape(packed.state.shape)
        plain = qs.slice_rows_cols(full, self.rows, self.cols).contiguous()
        state = packed.state
        return qs.quantize_4bit(plain, state.quant_type, state.blocksize, state.dtype)

    def _cut_8bit(self):
        packed = self.packed
        self._check_shape(packed.data.shape, f"{packed.name} ({packed.file})")
        scb = packed.state.scb
        if self.rows is not None:
            scb = scb[self.rows[0] : self.rows[1]]
        return qs.slice_rows_cols(packed.data, self.rows, self.cols), qs.Int8State(scb=scb)


def _expert_states(layer, prefix: str, regions: dict, shards: tuple[str, ...]) -> list[list]:
    """[local expert][shard] -> state; every expert's every shard loaded exactly once."""
    count = layer.bnb_shape.num_experts
    missing = [(e, s) for e in range(count) for s in shards if (e, s) not in regions]
    if missing:
        e, s = missing[0]
        raise ValueError(
            f"BnB MoE layer {prefix}: {len(missing)} expert projection(s) never loaded, "
            f"e.g. local expert {e} {_projection_name(layer, s)}: the checkpoint lacks "
            "them or their quant state"
        )
    return [[regions[(e, s)] for s in shards] for e in range(count)]


# ------------------------------------------------------------------- finalizing


def _finalize_4bit(layer, proj: str, states: list[list[QuantState]], matrix, method) -> None:
    """Stack the experts' block scales into one [experts, blocks] table and decide the
    kernel: bitsandbytes' CPU one (weights repacked once) or dequantize-and-multiply."""
    flat = [s for row in states for s in row]
    first = flat[0]
    for s in flat:
        same = (
            s.quant_type == first.quant_type and s.blocksize == first.blocksize
            and torch.equal(s.code.cpu(), first.code.cpu())
        )
        if not same:
            raise ValueError(
                f"BnB MoE layer {method.prefix}: its experts mix 4-bit formats "
                f"({first.quant_type}/{first.blocksize} and {s.quant_type}/{s.blocksize})"
            )
        if (s.shape[0] * s.shape[1]) % s.blocksize:
            raise ValueError(
                f"BnB MoE layer {method.prefix}: an expert projection of {list(s.shape)} "
                f"does not fill whole {s.blocksize}-element quant blocks, so its experts "
                "cannot share one block table; keep them unquantized with "
                "--hf-overrides '{\"bnb_moe_experts\": \"unquantized\"}'"
            )
    weight = getattr(layer, f"{proj}_weight")
    device = weight.device
    absmax = torch.stack([torch.cat([s.absmax.float() for s in row]) for row in states])
    template = QuantState(
        absmax=None, shape=torch.Size(matrix), code=first.code.float().to(device),
        blocksize=first.blocksize, quant_type=first.quant_type, dtype=layer.bnb_compute_dtype,
    )
    if _use_cpu_kernel(device, matrix, first.blocksize, method.moe.in_dtype):
        data, absmax = _repack_experts(weight.data, absmax, template)
        weight.data = data
        template = _with_absmax(template, None)
        template.dtype = torch.bfloat16
        template.packing_format_for_cpu = True
    layer.register_buffer(f"{proj}_absmax", absmax.to(device), persistent=False)
    setattr(layer, f"bnb_{proj}_state", template)


def _use_cpu_kernel(device, matrix, blocksize: int, act_dtype: torch.dtype) -> bool:
    """bitsandbytes' AVX512-BF16 kernel computes in bf16 only: used for bf16 activations;
    float32 models dequantize instead, keeping float32 math."""
    n, k = matrix
    return (
        device.type == "cpu"
        and act_dtype == torch.bfloat16
        and platform.machine() in ("x86_64", "AMD64")
        and bnbf.has_avx512bf16()
        and n % 32 == 0 and k % 2 == 0 and k % blocksize == 0
    )


def _repack_experts(packed: torch.Tensor, absmax: torch.Tensor, template: QuantState):
    """Every expert's bytes in the CPU kernel layout: in the layer's own (contiguous)
    parameter where our C routine builds, so no second copy of all experts exists."""
    n, k = template.shape
    in_place = packed.is_contiguous() and cpu.kernels() is not None
    datas, scales = [], []
    for e in range(packed.shape[0]):
        state = _with_absmax(template, absmax[e])
        data, cpu_state = qs.repack_for_cpu_kernel(packed[e], state, in_place=in_place)
        datas.append(data)
        scales.append(cpu_state.absmax)
    data = packed.view(packed.shape[0], n, k // 2) if in_place else torch.stack(datas)
    return data, torch.stack(scales)


def _with_absmax(template: QuantState, absmax: torch.Tensor | None) -> QuantState:
    state = QuantState(
        absmax=absmax, shape=template.shape, code=template.code, blocksize=template.blocksize,
        quant_type=template.quant_type, dtype=template.dtype,
    )
    state.packing_format_for_cpu = getattr(template, "packing_format_for_cpu", False)
    return state


# ------------------------------------------------------------------- forward


def _bnb_mm_moe(
    x: torch.Tensor, topk_weights: torch.Tensor, topk_ids: torch.Tensor, layer_id: int
) -> torch.Tensor:
    layer = _LAYERS[layer_id]
    if x.device.type != "cpu" and current_platform.is_cuda_alike():
        return _forward_fused(layer, x, topk_weights, topk_ids)
    return _forward_routed_loop(layer, x, topk_weights, topk_ids)


def _bnb_mm_moe_fake(
    x: torch.Tensor, topk_weights: torch.Tensor, topk_ids: torch.Tensor, layer_id: int
) -> torch.Tensor:
    return torch.empty_like(x)


def register_op() -> None:
    """The forward as one opaque op: torch.compile must not trace into bitsandbytes or
    the data-dependent expert loop (idempotent)."""
    if hasattr(torch.ops.vllm, "bnb_mm_moe"):
        return
    from vllm.utils.torch_utils import direct_register_custom_op

    direct_register_custom_op(
        op_name="bnb_mm_moe", op_func=_bnb_mm_moe, fake_impl=_bnb_mm_moe_fake
    )


def _local_ids(layer, topk_ids: torch.Tensor) -> torch.Tensor:
    """Global expert ids -> this rank's expert slots (-1: another rank's expert)."""
    expert_map = layer.expert_map
    return topk_ids.long() if expert_map is None else expert_map[topk_ids.long()].long()


def _forward_routed_loop(layer, x, topk_weights, topk_ids) -> torch.Tensor:
    """Only the experts that tokens route to run, each on its own tokens (the order HF's
    eager experts loop uses: ascending expert id, accumulated with index_add)."""
    method: BnbMoEMethod = layer.quant_method
    top_k = topk_ids.shape[1]
    ids = _local_ids(layer, topk_ids).reshape(-1)
    weights = topk_weights.reshape(-1)
    out = torch.zeros_like(x)
    on_input = layer.apply_router_weight_on_input
    for expert in torch.unique(ids[ids >= 0]).tolist():
        pairs = (ids == expert).nonzero().squeeze(1)
        tokens = pairs // top_k
        w = weights[pairs].unsqueeze(1)
        h = x[tokens]
        if on_input:
            h = (h * w).to(x.dtype)
        h = _expert_matmul(layer, "w13", expert, h)
        h = _expert_matmul(layer, "w2", expert, method.activate(layer, h))
        if not on_input:
            h = h * w
        out.index_add_(0, tokens, h.to(out.dtype))
    return out


def _expert_matmul(layer, proj: str, expert: int, x: torch.Tensor) -> torch.Tensor:
    weight = getattr(layer, f"{proj}_weight")[expert]
    if layer.quant_method.kind == "8bit":
        scb = getattr(layer, f"{proj}_scb")[expert]
        return F.linear(x, qs.dequantize_8bit(weight, qs.Int8State(scb=scb), x.dtype))
    absmax = getattr(layer, f"{proj}_absmax")[expert]
    state = _with_absmax(getattr(layer, f"bnb_{proj}_state"), absmax)
    if state.packing_format_for_cpu:
        return cpu.matmul_4bit(x.to(torch.bfloat16), weight, state).to(x.dtype)
    return F.linear(x, qs.dequantize_4bit(weight, state, x.dtype).reshape(state.shape))


def _forward_fused(layer, x, topk_weights, topk_ids) -> torch.Tensor:
    """CUDA / ROCm: no host sync, so it can be captured in a CUDA graph."""
    from vllm.model_executor.layers.fused_moe import fused_experts
    from vllm.model_executor.layers.fused_moe.config import int8_w8a16_moe_quant_config

    common = dict(
        activation=layer.activation,
        apply_router_weight_on_input=layer.apply_router_weight_on_input,
    )
    if layer.quant_method.kind == "8bit":
        quant_config = int8_w8a16_moe_quant_config(
            w1_scale=layer.w13_scb / 127.0, w2_scale=layer.w2_scb / 127.0
        )
        return fused_experts(
            x, layer.w13_weight, layer.w2_weight, topk_weights, topk_ids,
            global_num_experts=layer.global_num_experts, expert_map=layer.expert_map,
            quant_config=quant_config, **common,
        )
    pairs = topk_ids.numel()
    if pairs < layer.bnb_shape.num_experts:
        # Fewer (token, expert) pairs than experts: dequantize one expert per pair and
        # let each pair be its own expert.
        ids = _local_ids(layer, topk_ids).reshape(-1)
        weights = topk_weights * (ids >= 0).reshape(topk_weights.shape)
        w13, w2 = (_dequantize_experts(layer, proj, ids.clamp(min=0), x.dtype)
                   for proj in ("w13", "w2"))
        own = torch.arange(pairs, device=x.device, dtype=topk_ids.dtype)
        return fused_experts(
            x, w13, w2, weights, own.reshape(topk_ids.shape), global_num_experts=pairs,
            **common,
        )
    w13, w2 = (_dequantize_experts(layer, proj, None, x.dtype) for proj in ("w13", "w2"))
    return fused_experts(
        x, w13, w2, topk_weights, topk_ids, global_num_experts=layer.global_num_experts,
        expert_map=layer.expert_map, **common,
    )


def _dequantize_experts(layer, proj: str, ids: torch.Tensor | None, dtype) -> torch.Tensor:
    """[n, out, in] weights of the experts `ids` (all when None), one bitsandbytes call:
    each expert fills whole quant blocks, so their packed bytes and block scales stack."""
    packed = getattr(layer, f"{proj}_weight")
    absmax = getattr(layer, f"{proj}_absmax")
    if ids is not None:
        packed, absmax = packed.index_select(0, ids), absmax.index_select(0, ids)
    template = getattr(layer, f"bnb_{proj}_state")
    rows, cols = template.shape
    state = _with_absmax(template, absmax.reshape(-1))
    state.shape = torch.Size((packed.shape[0] * rows, cols))
    state.dtype = dtype
    return bnbf.dequantize_4bit(packed.reshape(-1, 1), state).reshape(-1, rows, cols)


def expert_memory(model: torch.nn.Module) -> dict[str, int]:
    """Bytes the model's routed experts hold (weights and quant state, BnB or not), and
    what the same experts take in bf16: `LLM.apply_model(expert_memory)` reports it."""
    from vllm.model_executor.layers.fused_moe import RoutedExperts

    held = bf16 = 0
    for module in model.modules():
        if not isinstance(module, RoutedExperts):
            continue
        tensors = [*module.named_parameters(recurse=False), *module.named_buffers(recurse=False)]
        held += sum(t.numel() * t.element_size() for n, t in tensors if n.startswith(("w13", "w2")))
        cfg = module.moe_config
        inter = cfg.intermediate_size_per_partition
        rows = inter * (2 if cfg.is_act_and_mul else 1)
        bf16 += cfg.num_local_experts * (rows + inter) * cfg.hidden_dim * 2
    return {"held_bytes": held, "bf16_bytes": bf16}
