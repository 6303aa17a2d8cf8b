"""MoE models through `vllm.LLM(load_format="bitsandbytes")` equal the HF reference of the
same weights (float32, so differences are the quantized math alone), and their experts
hold about a quarter of their bf16 size.

Every checkpoint layout users have (scripts/tiny_moe.py): transformers 5 (experts bf16,
quantized while loading), transformers 4.x / unsloth (one packed tensor per expert and
projection, packed router), a bf16 checkpoint quantized in flight, and experts kept
unquantized on request. For quantized experts the reference is HF with each expert
weight replaced by bitsandbytes' dequantization of the same quantization. The Gemma 4
MoE image request runs through the OpenAI server in test_gemma4_openai.py.
"""

from __future__ import annotations

import pytest

from engines import run_llm_report
from parity import assert_matches, load_reference

# Same bitsandbytes kernels for attention on both sides, float32 experts: summation order.
TOL_4BIT = 0.02
# LLM.int8 attention runs activations through fp16 in run-to-run varying order (0.051
# measured on the dense int8 model).
TOL_8BIT = 0.1
# 4 bits per weight + one float32 block scale per 64 weights = 0.28 of bf16.
QUARTER = (0.24, 0.3)
EIGHTH_OVER = (0.5, 0.55)  # 8 bits per weight + one float32 row scale

CASES = {
    # variant: (extra LLM kwargs, tolerance, expected expert bytes / bf16 bytes)
    "qwen3-moe-nf4": ({}, TOL_4BIT, QUARTER),
    "qwen3-moe-nf4-experts": ({}, TOL_4BIT, QUARTER),
    "qwen3-moe-int8-experts": ({}, TOL_8BIT, EIGHTH_OVER),
    "qwen3-moe-in-flight": ({"quantization": "bitsandbytes"}, TOL_4BIT, QUARTER),
    # float32 experts in vLLM's own CPU MoE kernel (measured 0.016 against HF)
    "qwen3-moe-nf4-keep": ({}, 0.03, (2.0, 2.01)),
    "gemma4-moe-nf4-experts": ({}, TOL_4BIT, QUARTER),
    "gemma4-moe-in-flight": ({"quantization": "bitsandbytes"}, TOL_4BIT, QUARTER),
}
TWO_WORKERS = {"VLLM_CPU_OMP_THREADS_BIND": "0|1"}


def _text_cases(ref: dict) -> list[dict]:
    return [c for c in ref["cases"] if c["kind"] == "text"]


def _run(ckpt, ref, **kwargs) -> dict:
    expected = ref["references"]["float32"]
    prompts = [expected[c["name"]]["prompt_token_ids"] for c in _text_cases(ref)]
    return run_llm_report(
        str(ckpt), prompts, load_format="bitsandbytes", dtype="float32", expert_memory=True,
        **kwargs,
    )


@pytest.mark.parametrize("variant", list(CASES))
def test_moe_matches_hf_reference_and_experts_are_packed(tiny, variant):
    llm_kwargs, tol, (low, high) = CASES[variant]
    ckpt = tiny[variant]
    ref = load_reference(ckpt)
    report = _run(ckpt, ref, **llm_kwargs)
    expected = ref["references"]["float32"]
    for case, result in zip(_text_cases(ref), report["results"], strict=True):
        assert_matches(result, expected[case["name"]], tol, f"{variant}/{case['name']}")
    (memory,) = report["expert_memory"]
    ratio = memory["held_bytes"] / memory["bf16_bytes"]
    assert low <= ratio <= high, f"{variant}: experts hold {ratio:.3f} of their bf16 size"


def test_experts_quantized_while_loading_differ_from_bf16_experts(tiny):
    """The same transformers 5 files, experts quantized (default) or kept: the two HF
    references differ by far more than the tolerance, so the parity above can tell."""
    quantized = load_reference(tiny["qwen3-moe-nf4"])["references"]["float32"]
    kept = load_reference(tiny["qwen3-moe-nf4-keep"])["references"]["float32"]
    gaps = [
        abs(a - b)
        for name in quantized
        for a, b in zip(quantized[name]["prompt_logprobs"], kept[name]["prompt_logprobs"],
                        strict=True)
    ]
    assert max(gaps) > 5 * TOL_4BIT, max(gaps)


def test_tensor_parallel_2_shards_packed_experts(tiny):
    """Each rank loads its half of every expert's intermediate dimension (gate/up rows,
    down columns) from the per-expert packed tensors, quant blocks cut exactly."""
    variant = "qwen3-moe-nf4-experts"
    ckpt = tiny[variant]
    ref = load_reference(ckpt)
    report = _run(ckpt, ref, tensor_parallel_size=2, env=TWO_WORKERS)
    expected = ref["references"]["float32"]
    for case, result in zip(_text_cases(ref), report["results"], strict=True):
        # bitsandbytes' CPU kernel and the partial sums before the all-reduce round in
        # bf16 (see test_parallel.py): looser than TP=1.
        assert_matches(result, expected[case["name"]], 0.05, f"{variant}/TP2/{case['name']}")
    for memory in report["expert_memory"]:
        assert QUARTER[0] <= memory["held_bytes"] / memory["bf16_bytes"] <= QUARTER[1]
