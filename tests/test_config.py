"""Which vLLM layers are BnB: decided by the checkpoint's tensors, skip list as fallback."""

import pytest
from vllm.model_executor.models.gemma4_mm import Gemma4ForConditionalGeneration

from vllm_bnb_mm.checkpoint import CheckpointLayout, QuantizedWeight, TensorInfo
from vllm_bnb_mm.config import BnbConfig
from vllm_bnb_mm.loader import vllm_module_kinds


def _layout(packed: list[str], plain: list[str]) -> CheckpointLayout:
    import torch

    tensors = {
        n: TensorInfo(n, "f.safetensors", torch.uint8, (1,), 0, 1) for n in packed + plain
    }
    quantized = {n: QuantizedWeight(n, "4bit") for n in packed}
    return CheckpointLayout(tensors, quantized)


GEMMA_MAPPER = Gemma4ForConditionalGeneration.hf_to_vllm_mapper


def test_gemma4_names_are_translated_to_vllm_modules():
    layout = _layout(
        packed=["model.language_model.layers.0.self_attn.q_proj.weight",
                "model.vision_tower.encoder.layers.0.self_attn.q_proj.linear.weight",
                "lm_head.weight"],
        plain=["model.embed_vision.embedding_projection.weight"],
    )
    kinds = vllm_module_kinds(layout, GEMMA_MAPPER)
    assert kinds["language_model.model.layers.0.self_attn.q_proj"] == "4bit"
    assert kinds["vision_tower.encoder.layers.0.self_attn.q_proj.linear"] == "4bit"
    assert kinds["language_model.lm_head"] == "4bit"
    assert kinds["embed_vision.embedding_projection"] == "plain"


def _config(kinds=None, skip=None, pre_quantized=True):
    config = BnbConfig(llm_int8_skip_modules=skip, pre_quantized=pre_quantized)
    if kinds is not None:
        config.set_module_kinds(kinds)
    return config


def test_tensors_win_over_the_skip_list():
    # Config claims the tower is skipped; its tensors are packed: quantized.
    config = _config({"vision_tower.encoder.q_proj.linear": "4bit"}, skip=["vision_tower"])
    assert config.layer_kind("vision_tower.encoder.q_proj.linear") == "4bit"
    # Config skips nothing, tensors are bf16: plain, never re-quantized.
    config = _config({"vision_tower.encoder.q_proj.linear": "plain"}, skip=[])
    assert config.layer_kind("vision_tower.encoder.q_proj.linear") == "plain"


def test_fused_layer_follows_its_constituents():
    config = _config({
        "m.layers.0.self_attn.q_proj": "4bit",
        "m.layers.0.self_attn.k_proj": "4bit",  # k_eq_v layer: no v_proj tensor at all
        "m.layers.0.mlp.gate_proj": "plain",
        "m.layers.0.mlp.up_proj": "plain",
    })
    assert config.layer_kind("m.layers.0.self_attn.qkv_proj") == "4bit"
    assert config.layer_kind("m.layers.0.mlp.gate_up_proj") == "plain"


@pytest.mark.parametrize("skip", [["model.vision_tower"], ["vision_tower"]])
def test_skip_list_fallback_accepts_anchored_and_component_spelling(skip):
    config = _config({}, skip=skip)
    config.apply_vllm_mapper(GEMMA_MAPPER.get_rename_mapper())
    assert config.layer_kind("vision_tower.encoder.layers.0.mlp.up_proj.linear") == "plain"
    assert config.layer_kind("language_model.model.layers.0.mlp.gate_up_proj") == "4bit"


def test_pre_quantized_without_bnb_loader_is_a_clear_error():
    config = _config(None)
    with pytest.raises(ValueError, match="--load-format bitsandbytes"):
        config.layer_kind("model.layers.0.mlp.gate_up_proj")


def test_in_flight_quantizes_every_linear_not_skipped():
    config = BnbConfig(llm_int8_skip_modules=["lm_head"])
    assert config.layer_kind("model.layers.0.mlp.down_proj") == "4bit"
    assert config.layer_kind("lm_head") == "plain"


def test_from_config_reads_transformers_quantization_config():
    config = BnbConfig.from_config({
        "quant_method": "bitsandbytes", "load_in_4bit": True, "bnb_4bit_quant_type": "fp4",
        "llm_int8_skip_modules": None, "bnb_4bit_use_double_quant": False,
    })
    assert config.pre_quantized and config.kind == "4bit" and config.quant_type == "fp4"
    eight = BnbConfig.from_config({"quant_method": "bitsandbytes", "load_in_8bit": True})
    assert eight.kind == "8bit"
