"""Run prompts through `vllm.LLM` in a fresh process and print the results as JSON.

Tests call this in a subprocess so every engine starts and dies cleanly:
    python tests/run_llm.py SPEC_JSON  ->  stdout last line: {"results": [...]}
SPEC: {"model": path, "llm_kwargs": {...}, "prompts": [[token ids]...], "max_tokens": n,
       "bnb_layers_out": optional path: torch.save of every BnB layer as the engine holds it,
       "expert_memory": bool,
       "loras": optional, one per prompt: null (the base) or a LoRA adapter directory}
       -> also {"expert_memory": [per worker {held_bytes, bf16_bytes}]}
   or {..., "conversations": [[OpenAI chat messages]...]} (through LLM.chat)
"""

from __future__ import annotations

import json
import os
import sys
import traceback


def bnb_layer_contents(model) -> dict:
    """Runs inside the worker: each BnB layer's weight tensor as the engine holds it, and
    the quant state of each part (packed layout as used by the forward)."""
    layers = {}
    for name, module in model.named_modules():
        parts = getattr(module, "bnb_parts", None)
        if parts is None:
            continue
        layers[name] = {
            "weight": module.weight.data.clone(),
            "parts": [
                {
                    "start": start, "end": end, "absmax": state.absmax.clone(),
                    "shape": list(state.shape), "blocksize": state.blocksize,
                    "quant_type": state.quant_type,
                    "cpu_packed": bool(getattr(state, "packing_format_for_cpu", False)),
                }
                for start, end, state in parts
            ],
        }
    return layers


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
    if "conversations" in spec:
        outputs = llm.chat(spec["conversations"], params, add_generation_prompt=True)
        prompts = [list(out.prompt_token_ids) for out in outputs]
    else:
        prompts = spec["prompts"]
        outputs = llm.generate(
            [TokensPrompt(prompt_token_ids=p) for p in prompts], params,
            lora_request=_lora_requests(spec.get("loras")),
        )
    results = []
    for prompt, out in zip(prompts, outputs, strict=True):
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
            "prompt_token_ids": prompt,
        })
    if spec.get("bnb_layers_out"):
        import run_llm  # by module name, so the workers can unpickle the function
        import torch

        [layers] = llm.apply_model(run_llm.bnb_layer_contents)
        torch.save(layers, spec["bnb_layers_out"])
    report = {"results": results}
    if spec.get("expert_memory"):
        from vllm_bnb_mm.moe import expert_memory

        report["expert_memory"] = llm.apply_model(expert_memory)
    print(json.dumps(report))


def _lora_requests(paths: list[str | None] | None):
    """One LoRARequest per adapter directory (ids by first appearance), None for the base."""
    if paths is None:
        return None
    from vllm.lora.request import LoRARequest

    ids = {p: i + 1 for i, p in enumerate(dict.fromkeys(p for p in paths if p is not None))}
    return [None if p is None else LoRARequest(f"lora{ids[p]}", ids[p], p) for p in paths]


if __name__ == "__main__":
    try:
        main()
    except BaseException:
        # Exit now: a failed in-process engine otherwise lingers ~20 s in interpreter
        # teardown before the exit code reaches the test.
        traceback.print_exc()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(1)
