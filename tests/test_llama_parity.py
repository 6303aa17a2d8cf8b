"""`vllm.LLM(load_format="bitsandbytes")` on BnB Llama checkpoints equals the HF
transformers reference of the same checkpoint (float32, so differences are the
quantized math alone), and in-flight quantization of the bf16 checkpoint equals HF
quantizing it the same way."""

from __future__ import annotations

import pytest
import torch

from engines import run_llm
from parity import TOL_4BIT_FLOAT32, assert_matches, load_reference

TOL_4BIT = TOL_4BIT_FLOAT32
# bitsandbytes' CPU int8 matmul runs activations through fp16 on both sides, in orders
# that vary run to run (measured up to 0.051); a wrong scale or shard is off by > 1.
TOL_8BIT = 0.1


@pytest.mark.parametrize(
    "variant,tol",
    [("llama-nf4-dq", TOL_4BIT), ("llama-fp4", TOL_4BIT), ("llama-int8", TOL_8BIT)],
)
def test_prequantized_llama_matches_hf(tiny, variant, tol):
    ckpt = tiny[variant]
    ref = load_reference(ckpt)
    expected = ref["references"]["float32"]
    cases = ref["cases"]
    got = run_llm(
        str(ckpt), [expected[c["name"]]["prompt_token_ids"] for c in cases],
        load_format="bitsandbytes", dtype="float32",
    )
    for case, result in zip(cases, got, strict=True):
        assert_matches(result, expected[case["name"]], tol, f"{variant}/{case['name']}")


def _hf_in_flight_reference(ckpt, prompts):
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    config = BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=False,
        bnb_4bit_compute_dtype=torch.float32,
    )
    model = AutoModelForCausalLM.from_pretrained(
        ckpt, quantization_config=config, dtype=torch.float32
    )
    out = []
    with torch.no_grad():
        for ids in prompts:
            logprobs = model(torch.tensor([ids])).logits[0].float().log_softmax(-1)
            out.append([logprobs[i - 1, ids[i]].item() for i in range(1, len(ids))])
    return out


def test_in_flight_quantization_of_bf16_llama_matches_hf(tiny):
    ckpt = tiny["llama-bf16"]
    ref = load_reference(ckpt)
    prompts = [ref["references"]["float32"][c["name"]]["prompt_token_ids"] for c in ref["cases"]]
    got = run_llm(
        str(ckpt), prompts, quantization="bitsandbytes", load_format="bitsandbytes",
        dtype="float32",
    )
    expected = _hf_in_flight_reference(ckpt, prompts)
    unquantized = [ref["references"]["float32"][c["name"]]["prompt_logprobs"] for c in ref["cases"]]
    for result, hf, plain in zip(got, expected, unquantized, strict=True):
        errors = [abs(a - b) for a, b in zip(result["prompt_logprobs"], hf, strict=True)]
        assert max(errors) <= TOL_4BIT, errors
        # and it really was quantized: the bf16 model's logprobs differ
        assert max(abs(a - b) for a, b in zip(result["prompt_logprobs"], plain, strict=True)) > 0.01
