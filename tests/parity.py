"""Compare vLLM outputs with the HF transformers reference of the same checkpoint."""

from __future__ import annotations

import functools
import json
from pathlib import Path

TOP_K_CHECKED = 5


def load_reference(ckpt: Path) -> dict:
    return json.loads((ckpt / "reference.json").read_text())


def assert_matches(
    got: dict, ref: dict, tol: float, label: str,
    soft_token_ids: frozenset[int] = frozenset(), soft_tol: float | None = None,
) -> None:
    """Prompt logprobs on the same tokens, the reference's top-5 next tokens, and greedy
    tokens up to the first near-tie (a top-2 margin under 2·tol can flip either way).

    Positions whose target is a multimodal placeholder (`soft_token_ids`) are held to
    `soft_tol`: their logprobs are of tokens the model never emits, and they carry
    the rounding of every soft embedding; the text after them is held to `tol`."""
    targets = ref["prompt_token_ids"][1:]
    pairs = list(zip(got["prompt_logprobs"], ref["prompt_logprobs"], targets, strict=True))
    for g, e, target in pairs:
        limit = soft_tol if target in soft_token_ids and soft_tol is not None else tol
        assert abs(g - e) <= limit, (
            f"{label}: prompt logprob of token {target} is {g:.4f}, HF {e:.4f} (tol {limit})"
        )
    ours = {int(t): lp for t, lp in got["next_top_logprobs"]}
    for token, lp in ref["next_top_logprobs"][:TOP_K_CHECKED]:
        assert int(token) in ours, f"{label}: HF top token {token} missing from vLLM top-10"
        assert abs(ours[int(token)] - lp) <= tol, (
            f"{label}: next-token {token} logprob {ours[int(token)]:.4f} vs HF {lp:.4f}"
        )
    for step, (a, b) in enumerate(
        zip(got["greedy_token_ids"], ref["greedy_token_ids"], strict=True)
    ):
        if ref["greedy_top2_margins"][step] < 2 * tol:
            break
        assert a == b, f"{label}: greedy token {step} is {a}, HF {b}"


def first_token_distribution(got: dict) -> dict[int, float]:
    return {int(t): lp for t, lp in got["next_top_logprobs"]}


def distance_to(ours: dict[int, float], reference: dict[int, float], k: int = 5) -> float:
    """Mean |logprob error| over the reference's top-k tokens; a token missing from our
    top list counts at our lowest listed logprob (an upper bound on its value)."""
    floor = min(ours.values())
    top = sorted(reference.items(), key=lambda kv: -kv[1])[:k]
    return sum(abs(ours.get(t, floor) - lp) for t, lp in top) / len(top)


def placeholder_ids(ckpt) -> frozenset[int]:
    """Multimodal placeholder token ids of a checkpoint (whatever its config calls them)."""
    config = json.loads((ckpt / "config.json").read_text())
    keys = ("image_token_id", "image_token_index", "audio_token_id")
    return frozenset(config[k] for k in keys if k in config)


def conversations(ref: dict) -> list[list[dict]]:
    return [case["messages"] for case in ref["cases"]]


def check_all_cases(
    got: list[dict], expected: dict, ckpt: Path, ref: dict, tol: float, soft_tol: float,
    first_id: int = 0,
) -> None:
    soft = placeholder_ids(ckpt)
    for case, result in zip(ref["cases"], got, strict=True):
        hf = expected[case["name"]]
        label = f"{ref['variant']}/{case['name']}"
        prompt = hf["prompt_token_ids"][first_id:]
        assert result["prompt_token_ids"] == prompt, f"{label}: vLLM built another prompt"
        assert_matches(result, hf, tol, label, soft_token_ids=soft, soft_tol=soft_tol)


def check_red_and_blue(got: list[dict], expected: dict, ref: dict, tol: float) -> None:
    """Each colour's first-token distribution is near its own reference and far from the
    other colour's (image features that do not reach the LM make both answer alike)."""
    names = [case["name"] for case in ref["cases"]]
    ours = {c: first_token_distribution(got[names.index(f"image-{c}")]) for c in ("red", "blue")}
    hf = {
        c: {int(t): lp for t, lp in expected[f"image-{c}"]["next_top_logprobs"]}
        for c in ("red", "blue")
    }
    assert distance_to(hf["red"], hf["blue"]) > 0.5, f"{ref['variant']}: reference colours alike"
    for colour, other in (("red", "blue"), ("blue", "red")):
        own, cross = distance_to(ours[colour], hf[colour]), distance_to(ours[colour], hf[other])
        assert own <= tol, f"{ref['variant']}: {colour} is {own:.3f} from its HF reference"
        assert cross > 2 * own and cross > 0.5, (
            f"{ref['variant']}: {colour} is as close to HF {other} ({cross:.3f}) as to its own"
        )


@functools.cache
def float32_chat_answers(ckpt: Path) -> list[dict]:
    """Every conversation of the checkpoint's HF reference through `vllm.LLM.chat` in
    float32. Cached per process: pytest may set a parametrized module fixture up again
    when tests of other parameters run in between (seen under xdist); the engine runs once."""
    from engines import run_llm_chat

    return run_llm_chat(
        str(ckpt), conversations(load_reference(ckpt)), load_format="bitsandbytes",
        dtype="float32", limit_mm_per_prompt={"image": 1},
    )
