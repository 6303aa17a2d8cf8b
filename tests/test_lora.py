"""QLoRA: PEFT LoRA adapters served with `vllm.LLM(enable_lora=True)` on BnB bases.

Each engine serves, in one `generate` call, every case three times: without an adapter,
with adapter A (rank 8, q/k/v/o/gate/up/down) and with adapter B (rank 4, q/v/down).
Expected values are HF PEFT on the same quantized base (the BnB checkpoint loaded with
transformers, the adapter attached with `PeftModel.from_pretrained`; for in-flight
quantization, transformers quantizing the bf16 checkpoint the same way), on the same
tokens, in float32. The adapters move prompt logprobs by 1.5-2.5, so an adapter that is
not applied, applied to the wrong request or with the wrong scale is far outside the
tolerances.
"""

from __future__ import annotations

import pytest

import tiny_lora
from engines import run_llm
from parity import assert_matches, load_reference

# Without an adapter: the base parity tolerances of test_llama_parity / test_parallel.
BASE_TOL = {"4bit": 0.02, "8bit": 0.1, "4bit-tp": 0.05}
# With an adapter: the same tolerances. The LoRA delta is summed in another order than
# PEFT's (einsum vs F.linear), which bitsandbytes' CPU 4-bit kernel (bf16 inside) can turn
# into a bf16 step now and then: measured up to 0.009 (4-bit), 0.022 (8-bit), 0.022 (TP=2).
LORA_TOL = dict(BASE_TOL)
# A reference adapter must move the answer far beyond any tolerance, or the parity
# could pass with the adapter ignored.
MIN_ADAPTER_EFFECT = 0.5

# vLLM CPU 0.32 LoRA workarounds (neither is about BnB; docs/troubleshooting.md):
# - its torch LoRA ops index a request without an adapter (slot -1) as the *last*
#   slot (vllm-project/vllm#48421): one slot more than the adapters keeps it empty;
# - with lm_head wrapped for LoRA, prompt_logprobs in a batch of several requests
#   crash the engine (add_lora_logits uses per-request indices for per-token logits):
#   restrict LoRA to the projections the adapters target.
LORA_ENGINE = {
    "enable_lora": True,
    "max_lora_rank": 8,
    "max_loras": 3,
    "lora_target_modules": list(tiny_lora.ATTENTION_AND_MLP),
}
TWO_WORKERS = {"VLLM_CPU_OMP_THREADS_BIND": "0|1"}


def max_deviation(got: dict, expected: dict) -> float:
    return max(
        abs(a - b)
        for a, b in zip(got["prompt_logprobs"], expected["prompt_logprobs"], strict=True)
    )


def serve_adapters(ckpt, base: str, adapters: list[str], env=None, **llm_kwargs) -> list:
    """Every case without an adapter and with each adapter, in one engine.

    Returns (label, result, expected) triples; expected is HF PEFT on `base` (the same
    quantized base the engine loads) or, without an adapter, HF on the base alone."""
    refs = {name: tiny_lora.reference(name, base, "float32") for name in adapters}
    dirs = tiny_lora.build(adapters)
    first = refs[adapters[0]]
    runs = []
    for case in first["cases"]:
        name = case["name"]
        runs.append((f"{name}/no adapter", None, first["base_references"][name]))
        for adapter in adapters:
            expected = refs[adapter]["adapter"][name]
            assert max_deviation(expected, first["base_references"][name]) > MIN_ADAPTER_EFFECT
            runs.append((f"{name}/{adapter}", str(dirs[adapter]), expected))
    got = run_llm(
        str(ckpt), [expected["prompt_token_ids"] for _, _, expected in runs],
        loras=[adapter for _, adapter, _ in runs], env=env, dtype="float32",
        load_format="bitsandbytes", **LORA_ENGINE, **llm_kwargs,
    )
    return [(label, result, expected) for (label, _, expected), result in zip(runs, got,
                                                                               strict=True)]


def check(results: list, base_tol: float, lora_tol: float, variant: str) -> None:
    for label, result, expected in results:  # the measured errors, for pytest -s
        print(f"{variant}/{label}: prompt logprobs within {max_deviation(result, expected):.4f}")
    for label, result, expected in results:
        tol = base_tol if label.endswith("/no adapter") else lora_tol
        assert_matches(result, expected, tol, f"{variant}/{label}")


def check_answers_differ(results: list) -> None:
    """Different requests in one engine get different answers: per case, every pair of
    (no adapter, A, B) results differs by far more than the tolerance."""
    by_case: dict[str, list] = {}
    for label, result, _ in results:
        by_case.setdefault(label.split("/")[0], []).append((label, result))
    for served in by_case.values():
        for i, (label_i, one) in enumerate(served):
            for label_j, other in served[i + 1:]:
                gap = max_deviation(one, other)
                assert gap > MIN_ADAPTER_EFFECT, f"{label_i} and {label_j} differ by {gap:.3f}"


@pytest.mark.parametrize(
    "variant,kind", [("llama-nf4-dq", "4bit"), ("llama-fp4", "4bit"), ("llama-int8", "8bit")]
)
def test_adapters_on_prequantized_base_match_hf_peft(tiny, variant, kind):
    # quantization="bitsandbytes" spelled out as unsloth's fast_inference does; the
    # checkpoint's quantization_config says the same.
    results = serve_adapters(
        tiny[variant], variant, ["llama-a", "llama-b"], quantization="bitsandbytes"
    )
    check(results, BASE_TOL[kind], LORA_TOL[kind], variant)
    check_answers_differ(results)


def test_adapter_on_base_quantized_in_flight_matches_hf_peft(tiny):
    # float32: the in-flight NF4 code table under bf16 is being fixed separately.
    results = serve_adapters(
        tiny["llama-bf16"], "llama-bf16" + tiny_lora.IN_FLIGHT_SUFFIX, ["llama-a", "llama-b"],
        quantization="bitsandbytes",
    )
    check(results, BASE_TOL["4bit"], LORA_TOL["4bit"], "llama-bf16 in flight")
    # ... and it was quantized: the plain bf16 model answers otherwise.
    plain = load_reference(tiny["llama-bf16"])["references"]["float32"]
    for label, result, _ in results:
        if label.endswith("/no adapter"):
            assert max_deviation(result, plain[label.split("/")[0]]) > 0.01, label


def test_adapter_with_tensor_parallel_2_matches_hf_peft(tiny):
    """Each rank holds its slice of the packed weights and of the LoRA matrices
    (column-parallel: B's rows; row-parallel: A's columns)."""
    variant = "llama-wide-nf4-dq"
    results = serve_adapters(
        tiny[variant], variant, ["llama-wide-a"], env=TWO_WORKERS, tensor_parallel_size=2
    )
    check(results, BASE_TOL["4bit-tp"], LORA_TOL["4bit-tp"], f"{variant} TP=2")
    check_answers_differ(results)
