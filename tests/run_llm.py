"""Run prompts through `vllm.LLM` in a fresh process and print the results as JSON.

Tests call this in a subprocess so every engine starts and dies cleanly:
    python tests/run_llm.py SPEC_JSON  ->  stdout last line: {"results": [...]}
SPEC: {"model": path, "llm_kwargs": {...}, "prompts": [[token ids]...], "max_tokens": n,
       "expert_memory": bool}  -> also {"expert_memory": [per worker {held_bytes, bf16_bytes}]}
"""

from __future__ import annotations

import json
import os
import sys


def main() -> None:
    spec = json.loads(sys.argv[1])
    if spec.get("expert_memory"):
        # apply_model pickles the function (by reference) to the engine's workers.
        os.environ["VLLM_ALLOW_INSECURE_SERIALIZATION"] = "1"
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    llm = LLM(model=spec["model"], **spec["llm_kwargs"])
    params = SamplingParams(
        max_tokens=spec.get("max_tokens", 8), temperature=0.0, logprobs=10, prompt_logprobs=1,
        ignore_eos=True,
    )
    outputs = llm.generate([TokensPrompt(prompt_token_ids=p) for p in spec["prompts"]], params)
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
    report = {"results": results}
    if spec.get("expert_memory"):
        from vllm_bnb_mm.moe import expert_memory

        report["expert_memory"] = llm.apply_model(expert_memory)
    print(json.dumps(report))


if __name__ == "__main__":
    main()
