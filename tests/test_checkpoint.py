"""Quant-state grouping and parsing against real bitsandbytes output."""

import pytest
import torch
from bitsandbytes import functional as bnbf

from bnb_files import packed_4bit_tensors, packed_8bit_tensors, write
from vllm_bnb_mm import quant_state as qs
from vllm_bnb_mm.checkpoint import (
    CheckpointError,
    FileReader,
    find_unpaired_packed_weights,
    scan_checkpoint,
)
from vllm_bnb_mm.quant_state import parse_4bit_state, parse_8bit_state


def _weight(rows=64, cols=128, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(rows, cols, generator=g) * 0.1


def test_groups_each_weight_with_its_state_and_plain_stays_plain(tmp_path):
    tensors = {
        **packed_4bit_tensors("model.layers.0.q_proj", _weight()),
        **packed_8bit_tensors("model.layers.0.o_proj", _weight(seed=1)),
        "model.norm.weight": torch.ones(64),
        "lm_head.weight": _weight(seed=2).bfloat16(),
    }
    layout = scan_checkpoint([write(tmp_path / "m.safetensors", tensors)])
    assert set(layout.quantized) == {"model.layers.0.q_proj.weight", "model.layers.0.o_proj.weight"}
    assert layout.quantized["model.layers.0.q_proj.weight"].kind == "4bit"
    assert layout.quantized["model.layers.0.o_proj.weight"].kind == "8bit"
    kinds = layout.module_kinds()
    assert kinds["lm_head"] == "plain" and kinds["model.norm"] == "plain"
    assert kinds["model.layers.0.q_proj"] == "4bit"


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("double_quant", [True, False])
def test_parsed_4bit_state_dequantizes_like_bitsandbytes(tmp_path, quant_type, double_quant):
    w = _weight()
    tensors = packed_4bit_tensors("m.proj", w, quant_type, double_quant)
    layout = scan_checkpoint([write(tmp_path / "m.safetensors", tensors)])
    reader = FileReader()
    state = parse_4bit_state(layout.quantized["m.proj.weight"], layout.tensors, reader)
    packed = tensors["m.proj.weight"]
    _, original = bnbf.quantize_4bit(
        w, quant_type=quant_type, compress_statistics=double_quant
    )
    expected = bnbf.dequantize_4bit(packed, original)
    got = bnbf.dequantize_4bit(packed, state)
    assert not state.nested and state.absmax.dtype == torch.float32
    assert tuple(state.shape) == (64, 128) and state.quant_type == quant_type
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-6)


def test_nested_offset_is_not_rounded_under_bf16_default_dtype(tmp_path):
    w = _weight() + 0.3  # a large mean gives a large, non-bf16-representable offset
    tensors = packed_4bit_tensors("m.proj", w, "nf4", True)
    layout = scan_checkpoint([write(tmp_path / "m.safetensors", tensors)])
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        state = parse_4bit_state(layout.quantized["m.proj.weight"], layout.tensors, FileReader())
    finally:
        torch.set_default_dtype(previous)
    _, original = bnbf.quantize_4bit(w, quant_type="nf4", compress_statistics=True)
    reference = bnbf.dequantize_blockwise(original.absmax, original.state2) + original.offset
    torch.testing.assert_close(state.absmax, reference.float(), rtol=0, atol=1e-7)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -0.5])
def test_a_bad_block_scale_is_refused_naming_tensor_and_file(tmp_path, bad):
    """Block scales are max |w| per block: NaN, inf or negative means a corrupt (or
    overflowed) checkpoint, refused before anything is dequantized with it."""
    tensors = packed_4bit_tensors("m.proj", _weight(), "nf4", False)
    tensors["m.proj.weight.absmax"][5] = bad
    path = write(tmp_path / "m.safetensors", tensors)
    layout = scan_checkpoint([path])
    with pytest.raises(CheckpointError, match="non-finite or negative") as e:
        parse_4bit_state(layout.quantized["m.proj.weight"], layout.tensors, FileReader())
    assert "'m.proj.weight.absmax'" in str(e.value) and str(path) in str(e.value)
    assert "block 5" in str(e.value)


def test_8bit_state(tmp_path):
    tensors = packed_8bit_tensors("m.proj", _weight())
    layout = scan_checkpoint([write(tmp_path / "m.safetensors", tensors)])
    state = parse_8bit_state(layout.quantized["m.proj.weight"], layout.tensors, FileReader())
    torch.testing.assert_close(state.scb, tensors["m.proj.SCB"])


@pytest.mark.parametrize("dropped", ["absmax", "quant_map", "quant_state.bitsandbytes__nf4"])
def test_missing_quant_state_tensor_is_named(tmp_path, dropped):
    tensors = packed_4bit_tensors("m.proj", _weight())
    del tensors[f"m.proj.weight.{dropped}"]
    path = write(tmp_path / "broken.safetensors", tensors)
    with pytest.raises(CheckpointError) as err:
        scan_checkpoint([path])
    message = str(err.value)
    assert "m.proj.weight" in message and "broken.safetensors" in message
    assert dropped.split(".")[0] in message


def test_missing_scb_is_named(tmp_path):
    tensors = packed_8bit_tensors("m.proj", _weight())
    del tensors["m.proj.SCB"]
    path = write(tmp_path / "m.safetensors", tensors)
    with pytest.raises(CheckpointError, match=r"m\.proj\.SCB") as err:
        scan_checkpoint([path])
    assert "m.safetensors" in str(err.value) and "m.proj.weight" in str(err.value)


def test_packed_weight_without_any_state_is_named(tmp_path):
    tensors = packed_8bit_tensors("m.proj", _weight())
    del tensors["m.proj.SCB"], tensors["m.proj.weight_format"]
    layout = scan_checkpoint([write(tmp_path / "m.safetensors", tensors)])
    assert [i.name for i in find_unpaired_packed_weights(layout)] == ["m.proj.weight"]


def test_file_reader_reads_each_file_once(tmp_path, monkeypatch):
    tensors = packed_4bit_tensors("m.proj", _weight())
    path = write(tmp_path / "m.safetensors", tensors)
    layout = scan_checkpoint([path])
    reader = FileReader()
    opened = []
    real_open = open

    def counting_open(file, *args, **kwargs):
        if str(file) == path:
            opened.append(file)
        return real_open(file, *args, **kwargs)

    monkeypatch.setattr("builtins.open", counting_open)
    reader.buffer(path)
    for info in layout.tensors.values():
        reader.tensor(info)
    assert len(opened) == 1


# ------------------------------------------------------------ bnb_4bit_quant_storage


@pytest.mark.parametrize("double_quant", [True, False])
@pytest.mark.parametrize("storage", ["bfloat16", "float16", "float32"])
def test_quant_storage_checkpoints_load_the_weights_transformers_computes_with(
    tiny, tmp_path, storage, double_quant
):
    """transformers + bitsandbytes with bnb_4bit_quant_storage != uint8 (FSDP-QLoRA)
    store the packed bytes as that dtype: every weight we load dequantizes to exactly
    what the HF model itself dequantizes."""
    import bitsandbytes as bnb
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    from vllm_bnb_mm.loader import checkpoint_weights, parse_quant_states
    from vllm_bnb_mm.registry import PACKED

    config = BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=double_quant,
        bnb_4bit_compute_dtype=torch.bfloat16, bnb_4bit_quant_storage=getattr(torch, storage),
    )
    AutoModelForCausalLM.from_pretrained(
        tiny["llama-bf16"], quantization_config=config, dtype=torch.bfloat16
    ).save_pretrained(tmp_path)
    hf = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.bfloat16)
    expected = {
        f"{name}.weight": bnbf.dequantize_4bit(m.weight.data, m.weight.quant_state)
        for name, m in hf.named_modules() if isinstance(m, bnb.nn.Linear4bit)
    }
    layout = scan_checkpoint([str(tmp_path / "model.safetensors")])
    assert {layout.tensors[n].dtype for n in layout.quantized} == {getattr(torch, storage)}
    reader = FileReader()
    states = parse_quant_states(layout, reader)
    PACKED.reset()
    try:
        got = {
            name: qs.dequantize_4bit(tensor, states[name], expected[name].dtype)
            for name, tensor in checkpoint_weights(layout, states, reader) if name in states
        }
    finally:
        PACKED.reset()
    assert got.keys() == expected.keys() and len(got) == 14
    for name, weight in got.items():
        assert torch.equal(weight.reshape(expected[name].shape), expected[name]), name
