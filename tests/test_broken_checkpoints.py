"""Broken checkpoints fail before serving, with a message naming the tensor, the file,
what is wrong and, where there is one, the fix.

The corpus is scripts/make_broken_checkpoints.py. Whatever the files alone decide is
checked on the loader's own pre-model steps (file listing, header scan and grouping,
config-vs-tensors check, quant-state parsing) without an engine. The one case only the
built model can decide (a packed weight for a module the model lacks) and one config
case (to see the message come out of a real engine) run through `vllm.LLM`.
"""

from __future__ import annotations

import json
import math
import os
import pickle
import struct
from pathlib import Path

import pytest
import torch
from bitsandbytes import functional as bnbf
from bitsandbytes.functional import QuantState
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from torch import nn
from vllm.model_executor.models.utils import StageMissingLayer

from engines import EngineFailed, run_llm
from make_broken_checkpoints import CASES, MODULE, STATE_JSON, UNKNOWN_MODULE, WEIGHT, make
from vllm_bnb_mm import loader
from vllm_bnb_mm.checkpoint import (
    CheckpointError,
    CheckpointLayout,
    FileReader,
    QuantizedWeight,
    TensorInfo,
    read_safetensors_header,
    scan_checkpoint,
)
from vllm_bnb_mm.config import BnbConfig
from vllm_bnb_mm.loader import (
    BnbModelLoader,
    check_packed_tensors_loaded,
    checkpoint_weights,
    parse_quant_states,
    safetensors_files,
)
from vllm_bnb_mm.quant_state import VALID_BLOCKSIZES, _read_state_json, parse_4bit_state
from vllm_bnb_mm.registry import PACKED

RESAVE = "Re-save the checkpoint"
REDOWNLOAD = "Re-download"

# case -> (tensor the message names, what is wrong, the hint). The file is checked too.
EXPECTED_ERRORS = {
    "truncated": ("tensor '", "truncated", REDOWNLOAD),
    "header-size-mismatch": (WEIGHT, "data span is 2048 bytes", REDOWNLOAD),
    "missing-absmax": (WEIGHT + ".absmax", "missing quant-state", RESAVE),
    "missing-quant-map": (WEIGHT + ".quant_map", "missing quant-state", RESAVE),
    "missing-state-json": (WEIGHT + ".quant_state.bitsandbytes__nf4", "missing", RESAVE),
    "malformed-json": (STATE_JSON, "not valid JSON", RESAVE),
    "oversized-json": (STATE_JSON, "more than the 65536 allowed", RESAVE),
    "unknown-quant-type": (WEIGHT + ".quant_state.bitsandbytes__nf3", "'nf3'", RESAVE),
    "json-quant-type-mismatch": (STATE_JSON, "says quant_type 'nf3'", RESAVE),
    "blocksize-mismatch": (WEIGHT, "blocksize 128, which needs 32", RESAVE),
    "blocksize-invalid": (WEIGHT, "blocksize 100", RESAVE),
    "packed-size-mismatch": (WEIGHT, "shape [64, 128] needs 4096", RESAVE),
    "int8-missing-scb": (MODULE + ".SCB", "missing its row scales", RESAVE),
    "fp16-absmax-overflow": (WEIGHT + ".absmax", "non-finite", "keep absmax float32"),
    "bf16-cast-packed": (WEIGHT, "holds 4096 bytes as torch.bfloat16[2048, 1]", RESAVE),
    "config-no-load-in": (".weight'", "neither load_in_4bit nor load_in_8bit",
                          '"load_in_4bit": true'),
    "config-contradicts": (".weight'", "says 8bit", "fix load_in_4bit/load_in_8bit"),
    "pickle-only": ("pytorch_model.bin", "refused", "VLLM_BNB_ALLOW_PICKLE=1"),
}


@pytest.fixture(scope="session")
def broken(tiny, tmp_path_factory):
    """case -> checkpoint dir, made on first use from this session's tiny checkpoints."""
    root = tmp_path_factory.mktemp("broken")
    sources = {"4bit": tiny["llama-nf4-dq"], "8bit": tiny["llama-int8"]}
    made: dict[str, Path] = {}

    def get(case: str) -> Path:
        if case not in made:
            made[case] = make(case, root / case, sources)
        return made[case]

    return get


def pre_model_load(ckpt: Path) -> dict:
    """BnbModelLoader's steps before the model is built, then the quant-state parse."""
    files = safetensors_files(str(ckpt))
    layout = scan_checkpoint(files)
    qconfig = json.loads((ckpt / "config.json").read_text())["quantization_config"]
    BnbModelLoader._check_quantization_matches(BnbConfig.from_config(qconfig), layout, files)
    return parse_quant_states(layout, FileReader())


def test_every_case_has_an_expectation():
    decided = set(EXPECTED_ERRORS) | {c for c, spec in CASES.items() if spec.loads}
    engine = {c for c, spec in CASES.items() if spec.needs_model}
    assert decided | engine == set(CASES) and not decided & engine


@pytest.mark.parametrize("case", sorted(EXPECTED_ERRORS))
def test_broken_checkpoint_fails_before_the_model_with_a_clear_message(broken, case):
    ckpt = broken(case)
    with pytest.raises(CheckpointError) as err:
        pre_model_load(ckpt)
    message = str(err.value)
    tensor, what, hint = EXPECTED_ERRORS[case]
    weights = "pytorch_model.bin" if case == "pickle-only" else "model.safetensors"
    assert str(ckpt / weights) in message, message
    assert tensor in message and what in message and hint in message, message


def test_pre_model_steps_accept_the_good_sources(tiny):
    for name in ("llama-nf4-dq", "llama-int8"):
        assert pre_model_load(tiny[name])


# ------------------------------------------------------------ narrowed absmax


def test_fp16_absmax_loads_upcast_exactly_with_a_warning(broken, tiny, monkeypatch):
    """Documented behaviour: float16/bfloat16 absmax loads (the upcast to float32 is
    exact, so the weights are exactly what the stored statistics say) with a warning;
    one that overflowed to inf is refused (see fp16-absmax-overflow)."""
    warnings = []
    monkeypatch.setattr(loader.logger, "warning", lambda *a: warnings.append(a[0] % a[1:]))
    states = pre_model_load(broken("fp16-absmax"))
    assert len(warnings) == 1 and "float16" in warnings[0] and ".absmax" in warnings[0]
    original = pre_model_load(tiny["llama-nf4-dq"])
    assert states.keys() == original.keys()
    for name, state in states.items():
        assert state.absmax.dtype == torch.float32
        torch.testing.assert_close(state.absmax, original[name].absmax.half().float())
        torch.testing.assert_close(state.absmax, original[name].absmax, rtol=2**-10, atol=0)


def test_packed_bytes_stored_as_bf16_load_as_the_same_bytes(broken, tiny):
    """bnb_4bit_quant_storage=bfloat16 relabels the packed bytes: they load as exactly
    the uint8 checkpoint's bytes and quant state."""
    ckpt = broken("bf16-quant-storage")
    states = pre_model_load(ckpt)
    original = pre_model_load(tiny["llama-nf4-dq"])
    for name, state in states.items():
        assert torch.equal(state.absmax, original[name].absmax), name
    got = _yielded(ckpt, states)
    expected = _yielded(tiny["llama-nf4-dq"], original)
    assert got.keys() == expected.keys()
    for name, tensor in got.items():
        assert tensor.dtype == expected[name].dtype and torch.equal(tensor, expected[name]), name


def _yielded(ckpt: Path, states: dict) -> dict[str, torch.Tensor]:
    layout = scan_checkpoint(safetensors_files(str(ckpt)))
    PACKED.reset()
    try:
        return {n: t.clone() for n, t in checkpoint_weights(layout, states, FileReader())}
    finally:
        PACKED.reset()


# ------------------------------------------------------------ pickles


def _state_dict(ckpt: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(ckpt / "model.safetensors"))


def test_pickle_opt_in_loads_with_weights_only(broken, tiny, monkeypatch, tmp_path):
    monkeypatch.setenv("VLLM_BNB_ALLOW_PICKLE", "1")
    monkeypatch.setenv("VLLM_CACHE_ROOT", str(tmp_path / "cache"))
    ckpt = broken("pickle-only")
    files = safetensors_files(str(ckpt))
    assert files == safetensors_files(str(ckpt))  # converted once, then reused
    assert all(f.startswith(str(tmp_path / "cache")) for f in files)
    states = pre_model_load(ckpt)
    original = pre_model_load(tiny["llama-nf4-dq"])
    assert states.keys() == original.keys()
    for name, state in states.items():
        torch.testing.assert_close(state.absmax, original[name].absmax, rtol=0, atol=0)
    converted = scan_checkpoint(files)
    reader, expected = FileReader(), _state_dict(tiny["llama-nf4-dq"])
    for name, info in converted.tensors.items():
        assert torch.equal(reader.tensor(info), expected[name]), name


class _Payload:
    """A pickle that would create a file when unpickled without weights_only."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.makedirs, (str(self.marker),))


def test_pickle_opt_in_still_refuses_code(tmp_path, monkeypatch):
    monkeypatch.setenv("VLLM_BNB_ALLOW_PICKLE", "1")
    monkeypatch.setenv("VLLM_CACHE_ROOT", str(tmp_path / "cache"))
    marker = tmp_path / "pwned"
    ckpt = tmp_path / "evil"
    ckpt.mkdir()
    with open(ckpt / "pytorch_model.bin", "wb") as f:
        pickle.dump({"w": _Payload(marker)}, f)
    with pytest.raises(CheckpointError, match="weights_only=True") as err:
        safetensors_files(str(ckpt))
    assert str(ckpt / "pytorch_model.bin") in str(err.value)
    assert not marker.exists()


# ------------------------------------------------------------ config fields


def test_both_load_in_flags_false_is_refused_with_a_hint():
    with pytest.raises(ValueError, match="set the one matching"):
        BnbConfig.from_config(
            {"quant_method": "bitsandbytes", "load_in_4bit": False, "load_in_8bit": False}
        )


def test_private_load_in_flags_count_as_declared():
    config = BnbConfig.from_config({"quant_method": "bitsandbytes", "_load_in_8bit": True})
    assert config.declared_kind == "8bit" and config.kind == "8bit"


# ------------------------------------------------------------ nothing dropped silently


class _Model(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Linear(2, 2)
        self.audio_tower = StageMissingLayer("audio_tower", nn.Linear(2, 2))


def test_packed_tensor_no_weight_loader_received_is_an_error():
    names = ["proj.weight", "extra.weight", "audio_tower.linear.weight"]
    file = "/ckpt/model.safetensors"
    tensors = {n: TensorInfo(n, file, torch.uint8, (8, 1), 0, 8) for n in names}
    layout = CheckpointLayout(tensors, {n: QuantizedWeight(n, "4bit") for n in names})
    data = {n: torch.zeros(8, dtype=torch.uint8) for n in names}
    PACKED.reset()
    try:
        for name in names:
            PACKED.note_yielded(name, data[name])
        PACKED.note_seen(data["proj.weight"])
        with pytest.raises(CheckpointError) as err:
            check_packed_tensors_loaded(layout, _Model())
        message = str(err.value)
        # the tower disabled on purpose (--limit-mm-per-prompt) is not an error
        assert "'extra.weight'" in message and "audio_tower" not in message
        assert "/ckpt/model.safetensors" in message and "1 packed" in message
        PACKED.note_seen(data["extra.weight"])
        check_packed_tensors_loaded(layout, _Model())
    finally:
        PACKED.reset()


# ------------------------------------------------------------ real engines


def _root_cause(error: EngineFailed) -> str:
    """The CheckpointError line the failed engine logged (the model's worker raises it)."""
    lines = [line for line in error.output.splitlines() if "CheckpointError: " in line]
    assert lines, str(error)[-3000:]
    return lines[-1]


def test_engine_refuses_a_packed_weight_for_a_module_the_model_lacks(broken):
    ckpt = broken("unknown-module")
    pre_model_load(ckpt)  # nothing before the model can tell
    with pytest.raises(EngineFailed) as err:
        run_llm(str(ckpt), [[1, 2, 3]], max_tokens=1, load_format="bitsandbytes",
                dtype="float32", timeout=300)
    message = _root_cause(err.value)
    assert f"{ckpt / 'model.safetensors'}" in message and UNKNOWN_MODULE in message
    assert "Is the checkpoint for this architecture" in message


def test_engine_refuses_a_config_that_contradicts_the_tensors(broken):
    ckpt = broken("config-contradicts")
    with pytest.raises(EngineFailed) as err:
        run_llm(str(ckpt), [[1, 2, 3]], max_tokens=1, load_format="bitsandbytes",
                dtype="float32", timeout=300)
    message = _root_cause(err.value)
    assert "config contradicts the tensors" in message and "fix load_in_4bit" in message
    assert f"{ckpt / 'model.safetensors'}" in message


# ------------------------------------------------------------ property-based parsing


class _MemoryReader(FileReader):
    """Hands out tensors from a dict: the parser only sees TensorInfo + tensor()."""

    def __init__(self, data: dict[str, torch.Tensor]) -> None:
        super().__init__()
        self.data = data

    def tensor(self, info: TensorInfo) -> torch.Tensor:
        return self.data[info.name]


def _quantized(data: dict[str, torch.Tensor], weight: str = "w.weight"):
    tensors = {
        n: TensorInfo(n, "mem.safetensors", t.dtype, tuple(t.shape), 0,
                      t.numel() * t.element_size())
        for n, t in data.items()
    }
    q = QuantizedWeight(weight, "4bit", {
        n.removeprefix(weight + "."): n for n in data if n != weight
    })
    return q, tensors, _MemoryReader(data)


def _json_tensor(raw: bytes) -> torch.Tensor:
    return torch.frombuffer(bytearray(raw), dtype=torch.uint8).clone() if raw else torch.zeros(
        0, dtype=torch.uint8)


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner,
                                                                  max_size=4),
    max_leaves=12,
)

PROPERTY_SETTINGS = settings(
    max_examples=150, deadline=5000, suppress_health_check=[HealthCheck.too_slow]
)


@PROPERTY_SETTINGS
@given(raw=st.binary(max_size=512) | json_values.map(lambda v: json.dumps(v).encode()))
@example(raw=b"[" * 60_000)  # nesting deep enough for RecursionError
@example(raw=b'{"shape": [' + b"9" * 5000 + b"]}")  # int past Python's str() digit limit
@example(raw=b"\xff\xfe{}")
def test_state_json_reader_returns_a_dict_or_raises_checkpoint_error(raw):
    name = "w.weight.quant_state.bitsandbytes__nf4"
    _, tensors, reader = _quantized({name: _json_tensor(raw)})
    try:
        meta = _read_state_json(name, tensors, reader)
    except CheckpointError as e:
        assert "mem.safetensors" in str(e) and name in str(e)
        return
    assert isinstance(meta, dict) and {"quant_type", "blocksize", "dtype", "shape"} <= meta.keys()


def _or_arbitrary(draw, valid, arbitrary=json_values):
    """Mostly the consistent value, sometimes anything: near-misses find the gaps."""
    return draw(arbitrary) if draw(st.integers(0, 5)) == 0 else valid


def _off_by(draw, n: int) -> int:
    return max(0, n + draw(st.sampled_from([0, 0, 0, 0, -1, 1, 7])))


@st.composite
def quant_states(draw):
    """4-bit state tensors + JSON for one packed weight: a consistent one (as
    bitsandbytes writes it), then each part perhaps corrupted."""
    rows, cols = draw(st.integers(1, 40)), draw(st.integers(1, 40))
    blocksize = draw(st.sampled_from(VALID_BLOCKSIZES[:4]))
    quant_type = draw(st.sampled_from(["nf4", "fp4"]))
    nested = draw(st.booleans())
    n_absmax = -(-rows * cols // blocksize)
    meta = {
        "quant_type": _or_arbitrary(draw, quant_type),
        "blocksize": _or_arbitrary(draw, blocksize, st.integers(-5, 5000) | json_values),
        "dtype": _or_arbitrary(draw, draw(st.sampled_from(["bfloat16", "float16", "float32"]))),
        "shape": _or_arbitrary(draw, [rows, cols], st.lists(st.integers(-2, 60), max_size=3)),
    }
    if nested:
        meta["nested_blocksize"] = _or_arbitrary(draw, 256)
        meta["nested_offset"] = _or_arbitrary(draw, 0.25, st.floats())
    for key in draw(st.lists(st.sampled_from(sorted(meta)), max_size=1)):
        del meta[key]
    if draw(st.booleans()):
        meta["extra"] = draw(json_values)
    if nested:
        absmax = torch.randint(0, 256, (_off_by(draw, n_absmax),), dtype=torch.uint8)
    else:
        scale = draw(st.sampled_from([1.0, 1.0, 1.0, 1e6, -1.0]))
        dtype = draw(st.sampled_from([torch.float32, torch.float16, torch.bfloat16, torch.int32]))
        absmax = (torch.rand(_off_by(draw, n_absmax)) * scale).to(dtype)
    data = {
        "w.weight": torch.randint(0, 256, (_off_by(draw, (rows * cols + 1) // 2), 1),
                                  dtype=torch.uint8),
        "w.weight.absmax": absmax,
        "w.weight.quant_map": torch.rand(_off_by(draw, 16)),
        f"w.weight.quant_state.bitsandbytes__{quant_type}": _json_tensor(
            json.dumps(meta).encode()
        ),
    }
    if nested:
        n_nested = -(-absmax.numel() // 256)
        data["w.weight.nested_absmax"] = torch.rand(_off_by(draw, n_nested))
        data["w.weight.nested_quant_map"] = torch.rand(_off_by(draw, 256))
    return data


# bitsandbytes' CPU kernels compile on the first call per shape class (seconds, 10+
# under load), so a per-example deadline here would time the compiler, not the parser.
@settings(PROPERTY_SETTINGS, deadline=None)
@given(data=quant_states())
def test_4bit_state_parser_returns_a_usable_state_or_raises_checkpoint_error(data):
    q, tensors, reader = _quantized(data)
    try:
        state = parse_4bit_state(q, tensors, reader)
    except CheckpointError as e:
        assert "mem.safetensors" in str(e) and "w.weight" in str(e)
        return
    assert isinstance(state, QuantState) and state.quant_type in ("nf4", "fp4")
    assert state.blocksize in VALID_BLOCKSIZES and state.absmax.dtype == torch.float32
    numel = math.prod(state.shape)
    assert data["w.weight"].numel() == (numel + 1) // 2
    assert state.absmax.numel() == -(-numel // state.blocksize) and state.code.numel() == 16
    assert bool(torch.isfinite(state.absmax).all()) and state.dtype.is_floating_point
    # bitsandbytes can use it: the kernel's reads are in bounds by the checks above
    packed = data["w.weight"].reshape(-1, 1)
    out = bnbf.dequantize_4bit(packed, state)
    # bitsandbytes reads a one-row packed tensor (a single byte here) as transposed
    transposed = packed.shape[0] == 1
    assert tuple(out.t().shape if transposed else out.shape) == tuple(state.shape)


header_entries = st.dictionaries(
    st.text(max_size=12),
    st.fixed_dictionaries({
        "dtype": st.sampled_from(["U8", "F32", "BF16", "X9"]) | json_values,
        "shape": st.lists(st.integers(-2, 9), max_size=3) | json_values,
        "data_offsets": st.lists(st.integers(-4, 64), min_size=2, max_size=2) | json_values,
    }) | json_values,
    max_size=4,
)


@PROPERTY_SETTINGS
@given(
    header=header_entries.map(lambda h: json.dumps(h).encode()) | st.binary(max_size=64),
    body=st.binary(max_size=64),
    declared_extra=st.sampled_from([0, 0, 0, 1, -1, 2**40, 2**63]),
)
@example(header=b'{"t": {"dtype": "U8", "shape": [Infinity], "data_offsets": [0, 1]}}',
         body=b"x", declared_extra=0)
def test_header_reader_returns_tensor_infos_or_raises_checkpoint_error(header, body,
                                                                      declared_extra):
    import tempfile

    length = max(0, min(len(header) + declared_extra, 2**64 - 1))
    with tempfile.NamedTemporaryFile(suffix=".safetensors") as f:
        f.write(struct.pack("<Q", length) + header + body)
        f.flush()
        try:
            infos = read_safetensors_header(f.name)
        except CheckpointError as e:
            assert f.name in str(e)
            return
        size = os.path.getsize(f.name)
    for info in infos.values():
        assert 8 + length <= info.start <= info.end <= size
        assert info.end - info.start == math.prod(info.shape) * info.dtype.itemsize
