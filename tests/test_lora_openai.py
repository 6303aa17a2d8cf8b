"""QLoRA adapters on multimodal BnB bases, through the real OpenAI-compatible server.

One server per family (Gemma 4, Qwen2.5-VL): `--enable-lora --lora-modules NAME=PATH`
gives one adapter at start-up; a second is loaded at run time with `POST /v1/load_lora_adapter`
(VLLM_ALLOW_RUNTIME_LORA_UPDATING=1). The adapters are on the language model only;
text and image+text requests with each adapter must equal HF PEFT on the same quantized
checkpoint, and the same requests without an adapter the checkpoint's own reference.
Adapters that do not fit are refused with a clear error while the server keeps serving.

Another family is one `FAMILIES` entry (its checkpoint and two adapters in
scripts/tiny_lora.py, made with `language_model_targets`).
"""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from dataclasses import dataclass

import pytest
from openai import OpenAI
from test_lora import LORA_ENGINE, MIN_ADAPTER_EFFECT, max_deviation

import tiny_lora
from chat_requests import ask
from engines import openai_server
from parity import assert_matches, load_reference, placeholder_ids

# Served in float32 against HF PEFT in float32: HF's own bf16 and float32 runs with these
# adapters differ by up to 0.3 (0.12 without an adapter), a bf16 tolerance that would
# hide an adapter applied slightly wrong. Measured in float32: text within 0.02; with an
# image, up to 0.06 on text positions and 0.085 on image placeholder positions, with or
# without an adapter (the vision tower's inputs pass through bitsandbytes' CPU kernel,
# bf16 inside). The adapters move prompt logprobs by 4.9 and more.
DTYPE = "float32"
LORA_TOL = 0.1
LORA_SOFT_TOL = 0.15  # positions whose target is an image placeholder token
STATIC, RUNTIME = "static-adapter", "runtime-adapter"


@dataclass(frozen=True)
class Family:
    variant: str  # BnB checkpoint (tiny builder)
    static: str  # adapter served with --lora-modules (tiny_lora)
    runtime: str  # adapter loaded with /v1/load_lora_adapter


FAMILIES = [
    Family("gemma4-nf4-dq", "gemma4-a", "gemma4-b"),
    # ['visual'] matches nothing in transformers 5: vision tower and lm_head 4-bit too.
    Family("qwen2_5_vl-nf4-dq", "qwen2_5_vl-a", "qwen2_5_vl-b"),
]


@dataclass
class Served:
    family: Family
    client: OpenAI
    base_url: str
    model: str  # the base model's name on the server


def server_args(static_path) -> list[str]:
    return [
        "--enable-lora", "--lora-modules", f"{STATIC}={static_path}",
        "--max-lora-rank", str(LORA_ENGINE["max_lora_rank"]),
        "--max-loras", str(LORA_ENGINE["max_loras"]),
        "--lora-target-modules", *LORA_ENGINE["lora_target_modules"],
    ]


@pytest.fixture(scope="module", params=FAMILIES, ids=lambda f: f.variant)
def served(request, tiny):
    family = request.param
    adapter = tiny_lora.build([family.static])[family.static]
    ckpt = tiny[family.variant]
    with openai_server(
        str(ckpt), *server_args(adapter), dtype=DTYPE,
        env={"VLLM_ALLOW_RUNTIME_LORA_UPDATING": "1"},
    ) as server:
        client = OpenAI(base_url=server.base_url + "/v1", api_key="unused", max_retries=0)
        yield Served(family, client, server.base_url, str(ckpt))


def post(base_url: str, path: str, body: dict) -> tuple[int, str]:
    request = urllib.request.Request(
        base_url + path, data=json.dumps(body).encode(),
        headers={"Content-Type": "application/json"},
    )
    try:
        with urllib.request.urlopen(request, timeout=300) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()


def load_adapter(served: Served, name: str, path) -> tuple[int, str]:
    return post(served.base_url, "/v1/load_lora_adapter",
                {"lora_name": name, "lora_path": str(path)})


def check_cases(served: Served, model: str, expected: dict, cases: list, label: str) -> dict:
    ckpt = tiny_lora.build_base(served.family.variant)
    results = {}
    for case in cases:
        if case["kind"] not in ("text", "image"):
            continue
        got = ask(served.client, model, case["messages"])
        want = expected[case["name"]]
        assert got["prompt_token_ids"] == want["prompt_token_ids"][1:]
        print(f"{label}/{case['name']}: prompt logprobs within {max_deviation(got, want):.4f}")
        assert_matches(
            got, want, LORA_TOL, f"{label}/{case['name']}",
            soft_token_ids=placeholder_ids(ckpt), soft_tol=LORA_SOFT_TOL,
        )
        results[case["name"]] = got
    return results


def check_adapter(served: Served, model: str, adapter: str) -> dict:
    ref = tiny_lora.reference(adapter, served.family.variant, DTYPE)
    for name, expected in ref["adapter"].items():
        effect = max_deviation(expected, ref["base_references"][name])
        assert effect > MIN_ADAPTER_EFFECT, f"{adapter} hardly changes {name}"
    return check_cases(served, model, ref["adapter"], ref["cases"], f"{model}={adapter}")


def test_static_adapter_matches_hf_peft(served):
    """--lora-modules: text and image+text requests with the adapter."""
    check_adapter(served, STATIC, served.family.static)


def test_runtime_loaded_adapter_matches_hf_peft(served):
    path = tiny_lora.build([served.family.runtime])[served.family.runtime]
    status, body = load_adapter(served, RUNTIME, path)
    assert status == 200, body
    runtime = check_adapter(served, RUNTIME, served.family.runtime)
    static = check_adapter(served, STATIC, served.family.static)
    for name in runtime:  # two adapters, one server: different answers
        assert max_deviation(runtime[name], static[name]) > MIN_ADAPTER_EFFECT, name


def test_base_without_adapter_matches_reference(served):
    """The base model on the same server, between adapter requests."""
    ref = load_reference(tiny_lora.build_base(served.family.variant))
    check_cases(served, served.model, ref["references"][DTYPE], ref["cases"], "base")


# Adapters that do not fit a Gemma 4 base: (tiny_lora adapter or BROKEN name, what the
# error must say). vLLM itself refuses the first two; the plugin the last two, which
# vLLM loads without a word (LoRA weights zero-padded into bigger layers, or never
# applied).
REFUSED = [
    ("gemma4-r16", "LoRA rank 16 is greater than max_lora_rank 8"),
    ("gemma4-unknown-targets", "query_key_value"),
    ("llama-a", "features but layer language_model.model.layers.1."),
    ("gemma4-deeper", "is for module 'language_model.model.layers.5."),
]


# On the Gemma 4 server only (the same server instance as its other tests).
@pytest.mark.parametrize("served", FAMILIES[:1], indirect=True, ids=lambda f: f.variant)
@pytest.mark.parametrize("adapter,message", REFUSED, ids=[r[0] for r in REFUSED])
def test_adapter_that_does_not_fit_is_refused_clearly(served, adapter, message):
    assert served.family.variant.startswith("gemma4")
    path = (
        tiny_lora.build_broken(adapter) if adapter in tiny_lora.BROKEN
        else tiny_lora.build([adapter])[adapter]
    )
    status, body = load_adapter(served, f"bad-{adapter}", path)
    assert status >= 400, f"{adapter} was accepted: {body}"
    assert message in body, body
    if adapter not in ("gemma4-r16", "gemma4-unknown-targets"):
        # vLLM's server masks file paths in error messages; the tensor is named in full.
        assert "lora_A.weight' " in body and "another model" in body, body
    # The server still serves, and the refused adapter is not listed as a model.
    assert f"bad-{adapter}" not in {m.id for m in served.client.models.list().data}
    text = [c for c in load_reference(tiny_lora.build_base(served.family.variant))["cases"]
            if c["kind"] == "text"][:1]
    ref = tiny_lora.reference(served.family.static, served.family.variant, DTYPE)
    check_cases(served, STATIC, ref["adapter"], text, f"{STATIC} after refusing {adapter}")
