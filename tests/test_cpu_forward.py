"""The CPU 4-bit forward's paths: bitsandbytes' fused kernel for a few tokens, our AMX
kernel (AMX CPUs) or AVX512-BF16 kernel (the others) from 16, dequantize + bf16 GEMM for
many (vllm_bnb_mm/cpu.py, cpu_kernels.c).

The C routines move bytes and compute bitsandbytes' own dequantization; they are checked
bit for bit against bitsandbytes, and our kernels against a float64 product of that
dequantized weight. Then real engines run a long and a short prompt (GEMM and our kernel
for the prefills of a bf16 engine, fused kernel for the decode) against the HF reference
of the same checkpoint; on AMX CPUs a second engine with oneDNN capped below AMX runs the
AVX512-BF16 kernel. A float32 engine keeps the fused kernel (tests/test_linear_layers.py).
"""

from __future__ import annotations

import json
import logging

import bitsandbytes as bnb
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


def _our_kernel(name: str):
    """cpu.gemm_4bit_amx or cpu.gemm_4bit_avx512, or a skip where this CPU cannot run it."""
    if not bnbf.has_avx512bf16() or cpu.kernels() is None:
        pytest.skip("bitsandbytes' AVX512-BF16 CPU kernel layout (and our C routines) not "
                    "available")
    if name == "amx" and not cpu.amx_usable():
        pytest.skip("no AMX on this CPU (or our AMX kernel was not built)")
    return {"amx": cpu.gemm_4bit_amx, "avx512": cpu.gemm_4bit_avx512}[name]


def _codes_times_scales(packed: torch.Tensor, state, shape) -> torch.Tensor:
    """float64 W = bf16(code[q]) * scale, bitsandbytes' fused kernel's weight values (the
    scales are the bf16 block scales the kernel layout keeps)."""
    n, k = shape
    q = torch.stack([packed >> 4, packed & 0xF], dim=1).reshape(-1).long()  # high nibble first
    codes = state.code.to(torch.bfloat16).double()[q]
    scales = state.absmax.to(torch.bfloat16).double().repeat_interleave(state.blocksize)
    return (codes * scales[: n * k]).reshape(n, k)


@pytest.mark.parametrize("kernel_name", ["amx", "avx512"])
@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("shape,blocksize", [((64, 128), 64), ((96, 256), 32),
                                             ((256, 1024), 256), ((160, 4096), 128)])
@pytest.mark.parametrize("m", [1, 3, 6, 16, 17, 32, 33, 40, 70])
def test_our_kernels_are_the_product_with_bitsandbytes_dequantized_weight(
    kernel_name, quant_type, shape, blocksize, m
):
    """Every output is x @ W^T summed in float32 and rounded once to bf16: within half a bf16
    step of the float64 product, plus the float32 sum's rounding. W is what bitsandbytes'
    fused kernel multiplies, bf16(code[q]) * scale (the scale applied to float32 block
    sums), except in the AMX kernel beyond 32 rows, which multiplies bitsandbytes' bf16
    dequantization, bf16(code[q] * scale), as the GEMM path does. The same bits whatever
    the number of threads. 1 and 3 rows: the AVX512-BF16 kernel's one pass over several
    blocks of W at once (64 and 96 rows of W leave a partial group); 6: one pass, one
    block; 17 and more: passes of up to 8 rows, the last one shorter (17: 6 + 6 + 5); 70
    rows: more than one chunk of rows in the AMX kernel, and a partial last one."""
    gemm = _our_kernel(kernel_name)
    n, k = shape
    g = torch.Generator().manual_seed(n + k + m)
    w = torch.randn(n, k, generator=g) * 0.05
    packed, state = qs.quantize_4bit(w, quant_type, blocksize, torch.bfloat16)
    kernel, kstate = qs.repack_for_cpu_kernel(packed, state)
    if kernel_name == "avx512" or m <= 32:
        weight = _codes_times_scales(packed, state, shape)
    else:
        bf16_scales = qs._with(state, state.absmax.to(torch.bfloat16).float(), (n, k))
        weight = qs.dequantize_4bit(packed, bf16_scales, torch.bfloat16).reshape(n, k).double()
    x = torch.randn(m, k, generator=g).to(torch.bfloat16)
    exact = x.double() @ weight.t()
    threads = torch.get_num_threads()
    outs = []
    try:
        for t in (1, 2):
            torch.set_num_threads(t)
            outs.append(gemm(x, kernel, kstate.absmax, kstate.code, n, k, blocksize))
    finally:
        torch.set_num_threads(threads)
    got = outs[0].double()
    sum_error = (x.double().abs() @ weight.abs().t()) * k * 2.0**-24
    assert torch.all((got - exact).abs() <= exact.abs() * 2.0**-8 + sum_error)
    assert torch.equal(outs[0], outs[1])


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("shape,blocksize", [((64, 128), 64), ((96, 256), 32),
                                             ((256, 1024), 256), ((6144, 1536), 64)])
@pytest.mark.parametrize("kernel_name,m", [("amx", 1), ("amx", 4), ("amx", 16), ("amx", 17),
                                           ("amx", 32), ("avx512", 1), ("avx512", 4),
                                           ("avx512", 8), ("avx512", 16), ("avx512", 70)])
def test_our_kernels_compute_what_bitsandbytes_fused_kernel_does(
    kernel_name, quant_type, shape, blocksize, m
):
    """Decode steps replace bitsandbytes' fused kernel (what transformers runs on this CPU)
    by ours: the outputs are its outputs. Only the order of the float32 sums differs, so an
    output may differ by one bf16 step where its sum falls near a rounding boundary, plus
    the float32 sums' rounding where terms cancel (measured over three seeds: at most one
    output in 960 for the AMX kernel, none for the AVX512-BF16 one)."""
    gemm = _our_kernel(kernel_name)
    n, k = shape
    g = torch.Generator().manual_seed(n + k + m + 1)
    packed, state = qs.quantize_4bit(torch.randn(n, k, generator=g) * 0.02, quant_type,
                                     blocksize, torch.bfloat16)
    kernel, kstate = qs.repack_for_cpu_kernel(packed, state)
    x = torch.randn(m, k, generator=g).to(torch.bfloat16)
    theirs = bnb.matmul_4bit(x, kernel, quant_state=kstate)
    ours = gemm(x, kernel, kstate.absmax, kstate.code, n, k, blocksize)
    differ = ours != theirs
    assert differ.float().mean().item() <= 2e-3
    weight = _codes_times_scales(packed, state, shape)
    sum_error = (x.double().abs() @ weight.abs().t()) * k * 2.0**-24
    bound = theirs.double().abs() * 2.0**-7 + 2 * sum_error
    assert torch.all((ours.double() - theirs.double()).abs() <= bound)


@needs_cpu_kernels
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("m", [3, 13, 40])
def test_a_transposed_activation_view_gives_the_same_product(dtype, m):
    """Gemma 4's audio tower hands a 4-bit linear a transposed view (row stride 1).
    bitsandbytes' CPU kernel (0.50.2) reads rows as contiguous whatever the strides, so
    without a contiguous copy the fused path (float32 activations at every M; bf16 below
    16 tokens without AMX) computes with the wrong elements."""
    n, k = 64, 128
    g = torch.Generator().manual_seed(m)
    packed, state = qs.quantize_4bit(torch.randn(n, k, generator=g) * 0.05, "nf4", 64, dtype)
    kernel, kstate = qs.repack_for_cpu_kernel(packed, state)
    x = torch.randn(k, m, generator=g).to(dtype).t()
    assert x.stride() == (1, m)
    got = cpu.matmul_4bit(x, kernel, kstate)
    assert torch.equal(got, cpu.matmul_4bit(x.contiguous(), kernel, kstate))
    # and that is the product: bitsandbytes' own dequantized weight in float64, within the
    # bf16 rounding of the inputs' products and of the output
    weight = qs.dequantize_4bit(packed, state, torch.float32).reshape(n, k).double()
    exact = x.double() @ weight.t()
    bound = (x.double().abs() @ weight.abs().t()) * 2.0**-7 + exact.abs() * 2.0**-8
    assert torch.all((got.double() - exact).abs() <= bound)


@pytest.mark.parametrize("cap,amx_expected", [
    (None, True), ("AVX512_CORE_BF16", False), ("AVX512_CORE_AMX", True), ("ALL", True),
])
def test_paths_follow_the_isa_onednn_may_use(monkeypatch, cap, amx_expected):
    """Our AMX kernel with AMX (not capped off), our AVX512-BF16 kernel without, from one
    token (with few rows both compute what the fused kernel does); oneDNN's GEMM from 2048
    without AMX, with AMX from 512, or from 2048 where K <= 2048 (the crossovers measured
    by scripts/cpu_crossover.py, notes/performance.md)."""
    if cap is None:
        monkeypatch.delenv("ONEDNN_MAX_CPU_ISA", raising=False)
    else:
        monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", cap)
    monkeypatch.delenv("DNNL_MAX_CPU_ISA", raising=False)
    cpu.amx_usable.cache_clear()
    try:
        tokens = (1, 15, 16, 127, 255, 256, 511, 512, 2047, 2048)
        small_k = [cpu.forward_path(m, 1536) for m in tokens]
        large_k = [cpu.forward_path(m, 6144) for m in tokens]
        if cpu.kernels() is None:
            assert small_k == large_k == ["fused"] * len(tokens)
            return
        amx = amx_expected and torch.cpu._is_amx_tile_supported()
        assert cpu.amx_usable() == amx
        if amx:
            assert large_k == ["amx"] * 7 + ["gemm"] * 3
            assert small_k == ["amx"] * 9 + ["gemm"]
        else:
            assert large_k == ["avx512"] * 9 + ["gemm"]
            assert small_k == large_k
    finally:
        cpu.amx_usable.cache_clear()


LONG_PROMPT_TOKENS = 600
LONG_COPIES = 4
SHORT_PROMPT_TOKENS = 48


def _prompts(ckpt) -> list[list[int]]:
    """A long prompt and a short one with another start."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(ckpt)
    long = ("Once upon a time there was a small cat who lived in a green house near the "
            "river, and every morning it walked to the market to look at the fish. ")
    short = ("Far away in the mountains an old baker made bread for the whole village "
             "before the sun came up, singing quietly. ")
    ids = [tok(text * 40, add_special_tokens=True)["input_ids"][:n]
           for text, n in ((long, LONG_PROMPT_TOKENS), (short, SHORT_PROMPT_TOKENS))]
    assert [len(i) for i in ids] == [LONG_PROMPT_TOKENS, SHORT_PROMPT_TOKENS]
    assert ids[0][1] != ids[1][1]
    return ids


def _hf_reference(ckpt, ids: list[int]) -> dict:
    """HF in bf16 with bitsandbytes' fused CPU kernel at every length (what transformers
    runs on this CPU)."""
    from tiny_reference import load_reference_model, reference_for_case

    inputs = {"input_ids": torch.tensor([ids])}
    model, _ = load_reference_model(ckpt, "LlamaForCausalLM", torch.bfloat16, inputs)
    return reference_for_case(model, inputs, torch.bfloat16)


# bf16 engine vs HF's bf16 run: the GEMM path and the AMX kernel's many-row path round each
# weight to bf16 where the fused kernel does not (measured 0.056-0.060 on an AMX Xeon); a
# wrong scale, shard or layout is off by 1 and more.
TOL_BF16_PROMPT = 0.15


@pytest.mark.engine
@needs_cpu_kernels
@pytest.mark.parametrize("onednn_cap", [None, "AVX512_CORE_BF16"])
def test_long_and_short_prompts_through_every_cpu_path_match_hf(tiny, onednn_cap):
    """Four copies of a long prompt in one step (up to four sequences, no prefix cache), so
    that step has 2400 rows: every 4-bit layer runs dequantize + oneDNN's GEMM, with AMX or
    without. The short prompt waits for a free sequence and is prefilled alone: on AMX CPUs
    our AMX kernel's many-row path (more than 32 rows), with oneDNN capped below AMX (as on
    CPUs without it; the only run there) our AVX512-BF16 kernel in passes of 8 rows. The
    decode steps (1-4 rows) run our kernel of the CPU with the fused kernel's arithmetic.
    Prompt logprobs, first-token top-5 and greedy tokens, held to HF's bf16 run on this CPU
    (the fused kernel everywhere)."""
    if onednn_cap and not cpu.amx_usable():
        pytest.skip("no AMX here: the uncapped engine runs the AVX512-BF16 kernel already")
    ckpt = tiny["llama-nf4-dq"]
    config = json.loads((ckpt / "config.json").read_text())
    assert max(config["hidden_size"], config["intermediate_size"]) <= cpu.AMX_SMALL_K
    long_step = LONG_COPIES * LONG_PROMPT_TOKENS
    assert long_step >= max(cpu.AMX_GEMM_MIN_TOKENS_SMALL_K, cpu.AVX512_GEMM_MIN_TOKENS)
    assert 32 < SHORT_PROMPT_TOKENS < cpu.AVX512_GEMM_MIN_TOKENS
    long, short = _prompts(ckpt)
    env = {"ONEDNN_MAX_CPU_ISA": onednn_cap} if onednn_cap else None
    got = run_llm(str(ckpt), [long] * LONG_COPIES + [short], env=env,
                  load_format="bitsandbytes", dtype="bfloat16", max_num_seqs=LONG_COPIES,
                  max_model_len=1024, max_num_batched_tokens=long_step,
                  enable_prefix_caching=False)
    expected = {"long": _hf_reference(ckpt, long), "short": _hf_reference(ckpt, short)}
    for name, answer in zip(["long"] * LONG_COPIES + ["short"], got, strict=True):
        errors = [abs(a - b) for a, b in zip(answer["prompt_logprobs"],
                                             expected[name]["prompt_logprobs"], strict=True)]
        print(f"{name} prompt: max prompt-logprob error {max(errors):.4f}")
        assert_matches(answer, expected[name], TOL_BF16_PROMPT, f"llama-nf4-dq/{name} prompt")
