"""The OpenAI server on a BnB Gemma 4 checkpoint under concurrent and hostile input.

One server (loopback only) for the module: a bounded burst of concurrent image+text
requests gives no failures and the same answers as the same requests sent one at a
time; malformed or non-image data gets a 4xx, after which the server is healthy and
still answers normal requests.
"""

from __future__ import annotations

import base64
import json
from concurrent.futures import ThreadPoolExecutor

import openai
import pytest
from openai import OpenAI

from engines import openai_server

BURST_REQUESTS = 50
BURST_CONCURRENCY = 8
IMAGE_CASES = ("image-red", "image-blue")


@pytest.fixture(scope="module")
def served(tiny):
    ckpt = tiny["gemma4-nf4-dq"]
    cases = {c["name"]: c for c in json.loads((ckpt / "reference.json").read_text())["cases"]}
    # float32: greedy answers must not depend on how requests are batched; in bf16 the
    # blue image's top-2 margins (down to 0.06) are within batch-order rounding noise.
    with openai_server(str(ckpt), dtype="float32") as server:
        client = OpenAI(
            base_url=server.base_url + "/v1", api_key="unused", max_retries=0, timeout=120
        )
        yield ckpt, cases, client, server


def answer(client: OpenAI, ckpt, messages: list[dict]) -> list[int]:
    """Greedy token ids of a short answer."""
    response = client.chat.completions.create(
        model=str(ckpt), messages=messages, max_tokens=4, temperature=0.0, logprobs=True,
        extra_body={"return_tokens_as_token_ids": True},
    )
    return [int(t.token.removeprefix("token_id:")) for t in response.choices[0].logprobs.content]


@pytest.fixture(scope="module")
def sequential(served) -> dict[str, list[int]]:
    """Each image request's answer, asked alone on the fresh server."""
    ckpt, cases, client, _ = served
    answers = {name: answer(client, ckpt, cases[name]["messages"]) for name in IMAGE_CASES}
    assert answers["image-red"] != answers["image-blue"]  # the image matters
    return answers


def test_concurrent_burst_matches_sequential_answers(served, sequential):
    ckpt, cases, client, _ = served
    names = [IMAGE_CASES[i % 2] for i in range(BURST_REQUESTS)]

    def one(name: str) -> tuple[str, list[int] | Exception]:
        try:
            return name, answer(client, ckpt, cases[name]["messages"])
        except Exception as e:  # counted, not raised: every failure is reported below
            return name, e

    with ThreadPoolExecutor(max_workers=BURST_CONCURRENCY) as pool:
        results = list(pool.map(one, names))
    failures = [(n, r) for n, r in results if isinstance(r, Exception)]
    assert not failures, failures[:5]
    wrong = [(n, r) for n, r in results if r != sequential[n]]
    assert not wrong, (sequential, wrong[:5])


def _image_message(url: str) -> list[dict]:
    return [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": url}},
        {"type": "text", "text": "What color is this?"},
    ]}]


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


SVG = b'<svg xmlns="http://www.w3.org/2000/svg" width="8" height="8"><rect fill="red"/></svg>'
HOSTILE_IMAGES = {
    "malformed-base64": "data:image/png;base64,!!not*base64@@",
    "truncated-base64": "data:image/png;base64,iVBORw0KGgoAAAANSUhEUgAAAEAAAAAwCAIA",
    "unsupported-type-x-foo": "data:image/x-foo;base64," + _b64(b"\x00\x01 not an image"),
    "unsupported-type-svg": "data:image/svg+xml;base64," + _b64(SVG),
    "text-labelled-png": "data:image/png;base64," + _b64(b"hello, I am not a picture"),
    "no-data-separator": "data:image/png;base64",
}


@pytest.mark.parametrize("kind", sorted(HOSTILE_IMAGES))
def test_bad_image_data_is_a_client_error_and_the_server_keeps_serving(
    served, sequential, kind
):
    ckpt, cases, client, server = served
    with pytest.raises(openai.APIStatusError) as err:
        answer(client, ckpt, _image_message(HOSTILE_IMAGES[kind]))
    assert 400 <= err.value.status_code < 500, (err.value.status_code, str(err.value))
    assert server.healthy(), server.log_tail()
    after = answer(client, ckpt, cases["image-blue"]["messages"])
    assert after == sequential["image-blue"]
