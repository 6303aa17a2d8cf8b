"""The loader's routing and accounting on a small model, with real bitsandbytes files."""

from __future__ import annotations

import gc
import logging
import mmap
import weakref

import pytest
import torch
from bitsandbytes import functional as bnbf
from torch import nn
from vllm.config.load import LoadConfig

from bnb_files import packed_4bit_tensors, packed_8bit_tensors, write
from vllm_bnb_mm.checkpoint import CheckpointError, scan_checkpoint
from vllm_bnb_mm.loader import BnbModelLoader, frozen_gc_heap, prefault_parameters


class PlainModel(nn.Module):
    """Plain parameters only (like vLLM's lm_head / embeddings), loaded by name."""

    def __init__(self, names_shapes: dict[str, tuple[int, int]]) -> None:
        super().__init__()
        self.names = list(names_shapes)
        for name, shape in names_shapes.items():
            self.register_parameter(name, nn.Parameter(torch.zeros(shape), requires_grad=False))

    def load_weights(self, weights):
        loaded = set()
        params = dict(self.named_parameters())
        for name, tensor in weights:
            key = name.removesuffix(".weight")
            if key in params:
                params[key].weight_loader(params[key], tensor)
                loaded.add(key)
        return loaded


def _loader(path: str) -> BnbModelLoader:
    loader = BnbModelLoader(LoadConfig(load_format="bitsandbytes"))
    loader._layout = scan_checkpoint([path])
    return loader


def _w(rows=64, cols=128, seed=0):
    return torch.randn(rows, cols, generator=torch.Generator().manual_seed(seed)) * 0.1


def test_packed_weights_for_plain_parameters_are_dequantized(tmp_path):
    w4, w8 = _w(), _w(seed=1)
    tensors = {**packed_4bit_tensors("head", w4), **packed_8bit_tensors("embed", w8)}
    path = write(tmp_path / "m.safetensors", tensors)
    model = PlainModel({"head": (64, 128), "embed": (64, 128)})
    _loader(path).load_weights(model, None)
    _, state = bnbf.quantize_4bit(w4, quant_type="nf4", compress_statistics=True)
    expected4 = bnbf.dequantize_4bit(tensors["head.weight"], state)
    expected8 = bnbf.int8_vectorwise_dequant(tensors["embed.weight"], tensors["embed.SCB"])
    torch.testing.assert_close(model.head, expected4, rtol=0, atol=1e-6)
    torch.testing.assert_close(model.embed, expected8, rtol=0, atol=1e-6)
    assert not hasattr(model.head, "weight_loader")  # routing wrappers are removed


def test_adjust_hook_runs_after_grouping_and_before_binding(tmp_path):
    tensors = packed_4bit_tensors("head", _w())
    path = write(tmp_path / "m.safetensors", tensors)
    model = PlainModel({"head": (64, 128)})
    seen = {}

    def adjust(states):
        seen.update(states)
        state = states["head.weight"]
        state.absmax = state.absmax * 2  # visible in the loaded weight if applied
        return states

    model.adjust_bnb_quant_state_dict = adjust
    _loader(path).load_weights(model, None)
    assert list(seen) == ["head.weight"] and not seen["head.weight"].nested
    plain = PlainModel({"head": (64, 128)})
    _loader(path).load_weights(plain, None)
    torch.testing.assert_close(model.head, plain.head * 2, rtol=0, atol=1e-6)


def test_uninitialized_parameter_is_an_error(tmp_path):
    path = write(tmp_path / "m.safetensors", packed_4bit_tensors("head", _w()))
    model = PlainModel({"head": (64, 128), "missing": (4, 4)})
    with pytest.raises(CheckpointError, match="missing"):
        _loader(path).load_weights(model, None)


class Layer(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(128, 64, bias=False)


class LayerCountOverrideModel(nn.Module):
    """Loads like vLLM's CLIP/SigLIP/Pixtral towers built with `num_hidden_layers_override`
    (LLaVA's `vision_feature_layer: -2`): checkpoint layers at or past the built count are
    skipped by index; and like many vLLM models it also skips names it has no parameter
    for without raising, so only the loader's accounting can catch those."""

    def __init__(self, layers: list[nn.Module]) -> None:
        super().__init__()
        self.layers = nn.ModuleList(layers)

    def load_weights(self, weights):
        from vllm.model_executor.models.utils import PPMissingLayer

        params = dict(self.named_parameters())
        loaded = set()
        for name, tensor in weights:
            index = int(name.split(".")[1])
            if index >= len(self.layers) or isinstance(self.layers[index], PPMissingLayer):
                continue
            if name in params:
                params[name].weight_loader(params[name], tensor)
                loaded.add(name)
        return loaded


class _Capture(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(record.getMessage())


@pytest.fixture
def load_log():
    log = logging.getLogger("vllm.vllm_bnb_mm.loader")
    handler, level = _Capture(), log.level
    log.addHandler(handler)
    log.setLevel(logging.INFO)
    yield handler.lines
    log.removeHandler(handler)
    log.setLevel(level)


def test_packed_layer_past_the_built_count_is_accepted_and_listed(tmp_path, load_log):
    tensors = {
        **packed_4bit_tensors("layers.0.fc", _w()),
        **packed_4bit_tensors("layers.1.fc", _w(seed=1)),  # the layer vLLM does not build
    }
    path = write(tmp_path / "m.safetensors", tensors)
    model = LayerCountOverrideModel([Layer()])
    _loader(path).load_weights(model, None)
    _, state = bnbf.quantize_4bit(_w(), quant_type="nf4", compress_statistics=True)
    expected = bnbf.dequantize_4bit(tensors["layers.0.fc.weight"], state)
    torch.testing.assert_close(model.layers[0].fc.weight, expected, rtol=0, atol=1e-6)
    summary = [line for line in load_log if "left out" in line]
    assert len(summary) == 1 and "layers.1.fc.weight" in summary[0], load_log
    assert "built with 1 layer(s); layer 1 is unused" in summary[0] and "(1 packed)" in summary[0]


def test_packed_layer_of_another_pipeline_stage_is_accepted(tmp_path, load_log):
    from vllm.model_executor.models.utils import PPMissingLayer

    tensors = {
        **packed_4bit_tensors("layers.0.fc", _w()),
        **packed_4bit_tensors("layers.1.fc", _w(seed=1)),
    }
    path = write(tmp_path / "m.safetensors", tensors)
    _loader(path).load_weights(LayerCountOverrideModel([Layer(), PPMissingLayer()]), None)
    assert any("layers.1 belongs to another pipeline stage" in line for line in load_log)


def test_packed_tensor_with_a_name_the_model_does_not_know_is_an_error(tmp_path):
    tensors = {
        **packed_4bit_tensors("layers.0.fc", _w()),
        **packed_4bit_tensors("layers.0.extra", _w(seed=1)),  # no such module
    }
    path = write(tmp_path / "m.safetensors", tensors)
    expected = r"m\.safetensors: 1 packed .* \(e\.g\. 'layers\.0\.extra\.weight'\)"
    with pytest.raises(CheckpointError, match=expected):
        _loader(path).load_weights(LayerCountOverrideModel([Layer()]), None)


def _rss_kib(kind: str) -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(f"Rss{kind}:"))


def _rss_file_kib() -> int:
    return _rss_kib("File")


class RssWatchingModel(PlainModel):
    """Records the process's file-backed RSS after each tensor it loads."""

    def load_weights(self, weights):
        self.rss_file = []

        def watched():
            for name, tensor in weights:
                yield name, tensor
                self.rss_file.append(_rss_file_kib())

        return super().load_weights(watched())


def test_file_pages_already_copied_leave_the_process_during_the_load(tmp_path):
    # 8 plain tensors of 4 MiB: without giving copied pages back, the whole 32 MiB file
    # stays mapped into the process on top of the parameters until the file is done.
    shapes = {f"w{i}": (1024, 1024) for i in range(8)}
    tensors = {f"{n}.weight": torch.full(s, float(i)) for i, (n, s) in enumerate(shapes.items())}
    path = write(tmp_path / "m.safetensors", tensors)
    model = RssWatchingModel(shapes)
    before = _rss_file_kib()
    _loader(path).load_weights(model, None)
    growth_mib = (max(model.rss_file) - before) / 1024
    assert growth_mib < 12, f"file-backed RSS grew {growth_mib:.1f} MiB while loading 32 MiB"
    for i, name in enumerate(shapes):  # every byte still arrived
        assert torch.equal(getattr(model, name), torch.full(shapes[name], float(i)))


def _kernel_populates_on_advice() -> bool:
    probe = mmap.mmap(-1, mmap.PAGESIZE)
    try:
        probe.madvise(23)  # MADV_POPULATE_WRITE: Linux >= 5.14
        return True
    except (OSError, ValueError):
        return False
    finally:
        probe.close()


@pytest.mark.skipif(not _kernel_populates_on_advice(),
                    reason="this kernel has no MADV_POPULATE_WRITE: loading faults as before")
def test_parameter_memory_is_mapped_before_the_weights_are_copied_in():
    # 64 MiB: above glibc's largest mmap threshold, so fresh pages nobody touched yet.
    model = nn.Module()
    model.big = nn.Parameter(torch.empty(64 << 20, dtype=torch.uint8), requires_grad=False)
    model.tied = model.big
    model.lazy = nn.UninitializedParameter(requires_grad=False)  # no memory yet: skipped
    before = _rss_kib("Anon")
    prefault_parameters(model)
    growth_mib = (_rss_kib("Anon") - before) / 1024
    assert 63 <= growth_mib < 66, f"anonymous RSS grew {growth_mib:.1f} MiB for 64 MiB"


class _Cycle:
    def __init__(self) -> None:
        self.me = self


def test_gc_passes_while_loading_walk_only_what_loading_made_and_lose_nothing():
    gc.collect()
    before = _Cycle()  # garbage made before loading: left for a later collection
    old = weakref.ref(before)
    del before
    with frozen_gc_heap():
        assert gc.get_freeze_count() > 0
        during = _Cycle()  # loading's garbage: collected by vLLM's passes
        new = weakref.ref(during)
        del during
        gc.collect()
        assert new() is None and old() is not None
    assert gc.get_freeze_count() == 0
    gc.collect()
    assert old() is None


def test_a_heap_frozen_before_loading_stays_frozen():
    garbage = _Cycle()
    ref = weakref.ref(garbage)
    del garbage
    gc.freeze()  # as vLLM does after start-up, before a weight reload
    try:
        with frozen_gc_heap():
            pass
        gc.collect()
        assert ref() is not None  # still frozen: loading did not unfreeze vLLM's freeze
    finally:
        gc.unfreeze()
    gc.collect()
    assert ref() is None
