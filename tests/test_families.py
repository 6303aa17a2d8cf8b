"""Every multimodal family users quantize with bitsandbytes, in real engines, against the
HF transformers reference of the same checkpoint.

One engine per checkpoint, shared by all of its cases (two text prompts, a red and a blue
image). Parity runs through `vllm.LLM.chat` in float32 (vLLM renders the chat template and
runs its multimodal processor, as the server does), so differences are the quantized math
alone; one OpenAI server per family shows the same through the API in bf16. The cells of
README's support matrix name the test and variant that prove them.
"""

from __future__ import annotations

import functools
from pathlib import Path

import pytest
import torch
from openai import OpenAI

from chat_requests import ask
from engines import openai_server, run_llm_chat
from parity import (
    check_all_cases,
    check_red_and_blue,
    conversations,
    float32_chat_answers,
    load_reference,
)

# float32 engines against HF float32: bitsandbytes' CPU 4-bit kernel rounds activations to
# bf16 internally on both sides, in different summation orders (as in test_llama_parity).
# Image placeholder positions carry the rounding of every vision-tower layer.
TOL_4BIT, SOFT_TOL_4BIT = 0.1, 0.3
# LLM.int8 quantizes every activation row to int8 on both sides: float32 summation-order
# noise upstream flips int8 roundings. Text-only prompts match exactly; behind an 8-bit
# CLIP tower (llava-int8) measured up to 0.144 on text and 0.157 on image positions.
TOL_8BIT, SOFT_TOL_8BIT = 0.2, 0.3
# bf16 server against HF bf16 (as test_gemma4_openai).
TOL_BF16, SOFT_TOL_BF16 = 0.25, 0.6

# Checkpoints proven through vllm.LLM in float32, and what each one adds to the matrix.
LLM_VARIANTS = [
    "llava-vision-bf16",  # fp4, CLIP tower really bf16
    "llava-int8",  # LLM.int8, default skip list (tower 8-bit, its last layer unbuilt)
    "llava-legacy-nf4-dq",  # transformers 4.x key layout, default skip list
    "llava_next-nf4-dq",  # anyres tiles + image_newline, default skip list
    "gemma3-skip-unanchored",  # fp4, tower 4-bit under a skip list that matches nothing
    "gemma3-vision-bf16",  # LLM.int8, SigLIP tower really bf16
    "qwen2_5_vl-fp4",  # ['visual', 'lm_head']: tower and merger fp4
    "qwen2_5_vl-int8",  # ['model.visual', 'lm_head']: tower and merger bf16
    "mistral3-fp4",  # default skip list: Pixtral tower and merging_layer fp4
    "mistral3-int8",  # tower and projector really bf16
    "qwen3_vl-fp4",  # ['visual', 'lm_head']: tower and (deepstack) mergers fp4
    "qwen3_vl-int8",  # ['model.visual', 'lm_head']: tower and mergers bf16
]
# One OpenAI server per family (image+text and text requests through the API).
SERVER_VARIANTS = [
    "llava-skip-projector",  # nf4+dq; recipe skip list matches nothing: lm_head 4-bit too
    "gemma3-nf4-dq",  # nf4+dq, default skip list (tied lm_head)
    "qwen2_5_vl-nf4-dq",  # nf4+dq; ['visual'] matches nothing: tower and lm_head 4-bit
    "mistral3-skip-unanchored",  # nf4+dq; unanchored skips: merging_layer and lm_head 4-bit
    "qwen3_vl-nf4-dq",  # nf4+dq; ['visual'] matches nothing: tower and lm_head 4-bit
]
# bf16 checkpoints quantized in flight (`--quantization bitsandbytes`, nf4).
IN_FLIGHT_VARIANTS = [
    "llava-bf16", "gemma3-bf16", "qwen2_5_vl-bf16", "mistral3-bf16", "qwen3_vl-bf16", "gemma4-bf16",
]


def _tolerances(ref: dict) -> tuple[float, float]:
    config = ref["bnb_config"] or {}
    if config.get("load_in_8bit"):
        return TOL_8BIT, SOFT_TOL_8BIT
    return TOL_4BIT, SOFT_TOL_4BIT


# ------------------------------------------------------------------ pre-quantized, vllm.LLM


@pytest.fixture(scope="module", params=LLM_VARIANTS)
def llm_run(request, tiny):
    ckpt = tiny[request.param]
    return ckpt, load_reference(ckpt), float32_chat_answers(ckpt)


def test_prequantized_family_matches_hf(llm_run):
    ckpt, ref, got = llm_run
    check_all_cases(got, ref["references"]["float32"], ckpt, ref, *_tolerances(ref))


def test_prequantized_family_tells_red_from_blue(llm_run):
    ckpt, ref, got = llm_run
    check_red_and_blue(got, ref["references"]["float32"], ref, _tolerances(ref)[0])


# ------------------------------------------------------------------ in flight, vllm.LLM


def _hf_in_flight_references(ckpt: Path, ref: dict) -> dict:
    """HF transformers quantizing the bf16 checkpoint the way the plugin does in flight
    (nf4, blocksize 64, no double quant), run in float32 on the same cases. Linears that
    vLLM builds as plain layers (Mistral 3's merging_layer) cannot be quantized in flight
    there, so HF skips them too (with lm_head, which its default list skips)."""
    import transformers
    from transformers import BitsAndBytesConfig

    import tiny_reference
    from tiny_families import FAMILIES

    family = FAMILIES[ref["family"]]
    processor = family.load_processor(ckpt)
    skip = ["lm_head", *family.vllm_plain_linears] if family.vllm_plain_linears else None
    config = BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=False,
        bnb_4bit_compute_dtype=torch.float32, llm_int8_skip_modules=skip,
    )
    model = getattr(transformers, ref["architecture"]).from_pretrained(
        ckpt, quantization_config=config, dtype=torch.float32
    )
    tiny_reference.upcast_plain_tensors(model, torch.float32)
    return {
        case["name"]: tiny_reference.reference_for_case(
            model, family.encode_case(processor, case, ckpt), torch.float32
        )
        for case in ref["cases"]
    }


@functools.cache
def _in_flight_run(ckpt: Path) -> tuple[list[dict], dict]:
    ref = load_reference(ckpt)
    got = run_llm_chat(
        str(ckpt), conversations(ref), quantization="bitsandbytes",
        load_format="bitsandbytes", dtype="float32", limit_mm_per_prompt={"image": 1},
    )
    return got, _hf_in_flight_references(ckpt, ref)


@pytest.fixture(scope="module", params=IN_FLIGHT_VARIANTS)
def in_flight_run(request, tiny):
    ckpt = tiny[request.param]
    return ckpt, load_reference(ckpt), *_in_flight_run(ckpt)


def test_in_flight_family_matches_hf_in_flight(in_flight_run):
    ckpt, ref, got, expected = in_flight_run
    check_all_cases(got, expected, ckpt, ref, TOL_4BIT, SOFT_TOL_4BIT)
    # and it really was quantized: the unquantized model's logprobs differ
    plain = ref["references"]["float32"]
    gaps = [
        max(abs(a - b) for a, b in zip(r["prompt_logprobs"], plain[c["name"]]["prompt_logprobs"],
                                       strict=True))
        for c, r in zip(ref["cases"], got, strict=True)
    ]
    assert max(gaps) > 0.05, gaps


def test_in_flight_family_tells_red_from_blue(in_flight_run):
    ckpt, ref, got, expected = in_flight_run
    check_red_and_blue(got, expected, ref, TOL_4BIT)


# ------------------------------------------------------------------ OpenAI server


@pytest.fixture(scope="module", params=SERVER_VARIANTS)
def served(request, tiny):
    ckpt = tiny[request.param]
    with openai_server(str(ckpt)) as server:
        client = OpenAI(base_url=server.base_url + "/v1", api_key="unused", max_retries=0)
        yield ckpt, load_reference(ckpt), client


def test_served_family_matches_hf(served):
    ckpt, ref, client = served
    got = [ask(client, ckpt, case["messages"]) for case in ref["cases"]]
    expected = ref["references"]["bfloat16"]
    # The API's prompt logprobs, and so the token ids read from them, start at the second.
    check_all_cases(got, expected, ckpt, ref, TOL_BF16, SOFT_TOL_BF16, first_id=1)
    check_red_and_blue(got, expected, ref, TOL_BF16)


# ------------------------------------------------------------------ tensor parallel


# TP=2 per family (vLLM's default processes, two workers): the vision tower's, projector's
# and text model's packed weights are cut per rank (column, row, fused qkv/gate_up, cuts
# inside 64-element quant blocks where a tiny width is not a multiple of 128), replicated
# KV heads, and unbuilt tower layers left out on both ranks.
TP_VARIANTS = [
    "llava-wide-nf4-dq",  # CLIP tower + projector + Llama, every width split on a block edge
    "gemma3-nf4-dq",
    "qwen2_5_vl-nf4-dq",  # tower, merger and lm_head 4-bit
    "mistral3-skip-unanchored",  # Pixtral tower, merging_layer and lm_head 4-bit
    "qwen3_vl-nf4-dq",  # tower, deepstack mergers and lm_head 4-bit
    "gemma4-nf4-dq",  # vision tower, embed_vision, LM and per-layer embeddings 4-bit
]


@pytest.mark.parametrize("variant", TP_VARIANTS)
def test_tensor_parallel_2_multimodal_matches_hf(tiny, variant):
    ckpt = tiny[variant]
    ref = load_reference(ckpt)
    got = run_llm_chat(
        str(ckpt), conversations(ref), env={"VLLM_CPU_OMP_THREADS_BIND": "0|1"},
        load_format="bitsandbytes", dtype="float32", tensor_parallel_size=2,
        limit_mm_per_prompt={"image": 1},
    )
    expected = ref["references"]["float32"]
    check_all_cases(got, expected, ckpt, ref, TOL_4BIT, SOFT_TOL_4BIT)
    check_red_and_blue(got, expected, ref, TOL_4BIT)
