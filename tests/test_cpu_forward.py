"""The CPU 4-bit forward's two paths: bitsandbytes' fused kernel for few tokens, and
dequantize + bf16 GEMM for many (vllm_bnb_mm/cpu.py, cpu_kernels.c).

The C routines move bytes and compute bitsandbytes' own dequantization; they are checked
bit for bit against bitsandbytes. Then one real engine runs a long prompt (GEMM path for
the prefill of a bf16 engine, fused kernel for the decode) against the HF reference of the
same checkpoint. A float32 engine keeps the fused kernel (tests/test_linear_layers.py).
"""

from __future__ import annotations

import logging

import pytest
import torch
from bitsandbytes import functional as bnbf

from engines import run_llm
from parity import assert_matches
from vllm_bnb_mm import cpu
from vllm_bnb_mm import quant_state as qs

needs_cpu_kernels = pytest.mark.skipif(
    not bnbf.has_avx512bf16() or cpu.kernels() is None,
    reason="bitsandbytes' AVX512-BF16 CPU kernel layout (and our C routines) not available",
)


@needs_cpu_kernels
@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("shape,blocksize", [((64, 128), 64), ((96, 256), 32),
                                             ((256, 1024), 256), ((160, 4096), 128)])
def test_dequantize_t_equals_bitsandbytes_dequantize_4bit(quant_type, shape, blocksize):
    """bf16(code[q] * scale) for every weight, as bitsandbytes' CPU dequantize_4bit computes
    it given the same (bf16) block scales the fused kernel uses; any block of rows."""
    n, k = shape
    w = torch.randn(n, k, generator=torch.Generator().manual_seed(n + k)) * 0.05
    packed, state = qs.quantize_4bit(w, quant_type, blocksize, torch.bfloat16)
    kernel, kstate = qs.repack_for_cpu_kernel(packed, state)
    bf16_scales = qs._with(state, state.absmax.to(torch.bfloat16).float(), (n, k))
    expected = qs.dequantize_4bit(packed, bf16_scales, torch.bfloat16).reshape(n, k)
    for rows in [(0, n), (32, n - 32), (n - 32, n)]:
        out = torch.full((k, rows[1] - rows[0]), float("nan"), dtype=torch.bfloat16)
        cpu.dequantize_t(kernel, kstate.absmax, kstate.code, out, n, k, blocksize, rows)
        assert torch.equal(out.t(), expected[rows[0] : rows[1]]), rows


def test_a_compiler_failure_falls_back_with_a_warning(tmp_path, monkeypatch):
    if not bnbf.has_avx512bf16():
        pytest.skip("the C routines are only built for bitsandbytes' AVX512-BF16 kernel")
    monkeypatch.setenv("CC", str(tmp_path / "no-such-cc"))
    monkeypatch.setenv("VLLM_CACHE_ROOT", str(tmp_path / "cache"))
    records: list[logging.LogRecord] = []
    handler = logging.Handler()
    handler.emit = records.append
    cpu.logger.addHandler(handler)
    try:
        assert cpu.kernels.__wrapped__() is None
    finally:
        cpu.logger.removeHandler(handler)
    assert [r.levelno for r in records] == [logging.WARNING]
    assert "fused kernel at every batch size" in records[0].getMessage()
    assert not list((tmp_path / "cache").rglob("*.so"))


@pytest.mark.parametrize("cap,amx_expected", [
    (None, True), ("AVX512_CORE_BF16", False), ("AVX512_CORE_AMX", True), ("ALL", True),
])
def test_crossover_follows_the_isa_onednn_may_use(monkeypatch, cap, amx_expected):
    if cap is None:
        monkeypatch.delenv("ONEDNN_MAX_CPU_ISA", raising=False)
    else:
        monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", cap)
    monkeypatch.delenv("DNNL_MAX_CPU_ISA", raising=False)
    cpu.gemm_min_tokens.cache_clear()
    try:
        has_amx = torch.cpu._is_amx_tile_supported()
        expected = (cpu.GEMM_MIN_TOKENS_AMX if amx_expected and has_amx
                    else cpu.GEMM_MIN_TOKENS_AVX512)
        assert cpu.gemm_min_tokens() == expected
    finally:
        cpu.gemm_min_tokens.cache_clear()


LONG_PROMPT_TOKENS = 300


def _long_prompt(ckpt) -> list[int]:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(ckpt)
    text = ("Once upon a time there was a small cat who lived in a green house near the "
            "river, and every morning it walked to the market to look at the fish. ")
    ids = tok(text * 20, add_special_tokens=True)["input_ids"][:LONG_PROMPT_TOKENS]
    assert len(ids) == LONG_PROMPT_TOKENS
    return ids


def _hf_reference(ckpt, ids: list[int]) -> dict:
    """HF in bf16 with bitsandbytes' fused CPU kernel at every length (what transformers
    runs on this CPU)."""
    from tiny_reference import load_reference_model, reference_for_case

    inputs = {"input_ids": torch.tensor([ids])}
    model, _ = load_reference_model(ckpt, "LlamaForCausalLM", torch.bfloat16, inputs)
    return reference_for_case(model, inputs, torch.bfloat16)


# bf16 engine vs HF's bf16 run: the GEMM path rounds where the fused kernel does not
# (measured 0.056 on an AMX Xeon); a wrong scale, shard or layout is off by 1 and more.
TOL_BF16_LONG_PROMPT = 0.15


@pytest.mark.engine
@needs_cpu_kernels
def test_long_prompt_through_both_cpu_paths_matches_hf(tiny):
    """The 300-token prefill of a bf16 engine runs every 4-bit layer through dequantize +
    GEMM (prompt logprobs, first-token top-5); the decode steps run the fused kernel
    (greedy tokens). Held to HF's bf16 run on this CPU (the fused kernel everywhere)."""
    assert LONG_PROMPT_TOKENS >= max(cpu.GEMM_MIN_TOKENS_AMX, cpu.GEMM_MIN_TOKENS_AVX512)
    ckpt = tiny["llama-nf4-dq"]
    ids = _long_prompt(ckpt)
    expected = _hf_reference(ckpt, ids)
    (got,) = run_llm(str(ckpt), [ids], load_format="bitsandbytes", dtype="bfloat16")
    errors = [abs(a - b) for a, b in zip(got["prompt_logprobs"], expected["prompt_logprobs"],
                                         strict=True)]
    print(f"max prompt-logprob error {max(errors):.4f}")
    assert_matches(got, expected, TOL_BF16_LONG_PROMPT, "llama-nf4-dq/long prompt")
