"""Run prompts through `vllm.LLM` in a fresh process and print the results as JSON.

Tests call this in a subprocess so every engine starts and dies cleanly:
    python tests/run_llm.py SPEC_JSON  ->  stdout last line: {"results": [...]}
SPEC: {"model": path, "llm_kwargs": {...}, "prompts": [[token ids]...], "max_tokens": n,
       "loras": optional, one per prompt: null (the base) or a LoRA adapter directory}
"""

from __future__ import annotations

import json
import sys


def main() -> None:
    spec = json.loads(sys.argv[1])
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    llm = LLM(model=spec["model"], **spec["llm_kwargs"])
    params = SamplingParams(
        max_tokens=spec.get("max_tokens", 8), temperature=0.0, logprobs=10, prompt_logprobs=1,
        ignore_eos=True,
    )
    outputs = llm.generate(
        [TokensPrompt(prompt_token_ids=p) for p in spec["prompts"]], params,
        lora_request=_lora_requests(spec.get("loras")),
    )
    results = []
    for prompt, out in zip(spec["prompts"], outputs, strict=True):
        plp = [
            None if d is None else d[token].logprob
            for token, d in zip(prompt, out.prompt_logprobs, strict=True)
        ]
        completion = out.outputs[0]
        first = completion.logprobs[0]
        results.append({
            "prompt_logprobs": plp[1:],
            "next_top_logprobs": sorted(
                ([t, lp.logprob] for t, lp in first.items()), key=lambda x: -x[1]
            ),
            "greedy_token_ids": list(completion.token_ids),
        })
    print(json.dumps({"results": results}))


def _lora_requests(paths: list[str | None] | None):
    """One LoRARequest per adapter directory (ids by first appearance), None for the base."""
    if paths is None:
        return None
    from vllm.lora.request import LoRARequest

    ids = {p: i + 1 for i, p in enumerate(dict.fromkeys(p for p in paths if p is not None))}
    return [None if p is None else LoRARequest(f"lora{ids[p]}", ids[p], p) for p in paths]


if __name__ == "__main__":
    main()
