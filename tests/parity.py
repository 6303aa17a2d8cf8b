"""Compare vLLM outputs with the HF transformers reference of the same checkpoint."""

from __future__ import annotations

import json
from pathlib import Path

TOP_K_CHECKED = 5


def load_reference(ckpt: Path) -> dict:
    return json.loads((ckpt / "reference.json").read_text())


def max_prompt_logprob_error(got: list, expected: list) -> float:
    assert len(got) == len(expected), (len(got), len(expected))
    return max(abs(g - e) for g, e in zip(got, expected, strict=True) if g is not None)


def assert_matches(got: dict, ref: dict, tol: float, label: str) -> None:
    """Prompt logprobs on the same tokens, the reference's top-5 next tokens, and greedy
    tokens up to the first near-tie (a top-2 margin under 2·tol can flip either way)."""
    err = max_prompt_logprob_error(got["prompt_logprobs"], ref["prompt_logprobs"])
    assert err <= tol, f"{label}: prompt logprob error {err:.4f} > {tol}"
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
