"""Compare vLLM outputs with the HF transformers reference of the same checkpoint."""

from __future__ import annotations

import json
from pathlib import Path

TOP_K_CHECKED = 5

# float32 engines on 4-bit checkpoints vs HF's float32 run. bitsandbytes' two CPU 4-bit
# paths round to bf16 in different places: HF's reference runs the fused kernel at every
# length, vLLM's prefill of >= 16 tokens dequantizes + bf16 GEMM (vllm_bnb_mm/cpu.py). On the
# tiny checkpoints each path is within 0.040 of float32 math and they are up to 0.047
# apart (measured; notes/performance.md). A wrong scale, shard or quant type is off by 1+.
TOL_4BIT_FLOAT32 = 0.06


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
