"""Decode throughput with a QLoRA adapter vs without, on the benchmark checkpoint.

Usage::

    .venv/bin/python scripts/bench_lora.py [--quick] [--tokens 64] [--rank 16]

Uses scripts/bench.py's nf4 + double-quant Gemma 4-shaped checkpoint (built there,
cached) and a PEFT LoRA adapter for its language model (rank ``--rank`` on
q/k/v/o/gate/up/down, nonzero B, cached beside the checkpoint). Two engines, each in its
own subprocess, ``LLM(load_format="bitsandbytes", dtype="bfloat16", enforce_eager=True)``:

- ``no-lora``: the engine without ``enable_lora`` (what bench.py's "ours" measures);
- ``lora``: ``enable_lora=True``; the same prompts without an adapter, then with it.

Greedy decode (``ignore_eos``, fixed token-id prompts) at batch 1 and 4, after a warm-up.
The machine's load average is recorded next to each measurement (shared machines make
throughput noisy). Writes ``results/bench/lora.{json,md}``.

On vLLM CPU 0.32 the torch LoRA ops give a request without an adapter the last LoRA
slot's weights (vllm-project/vllm#48421), so the ``lora`` engine has one slot more than
adapters (max_loras=2), which keeps the "without adapter" numbers honest.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench

RESULT_DIR = bench.RESULTS
ADAPTER_VERSION = "bench-lora-1"
TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def build_adapter(bf16_dir: Path, rank: int) -> Path:
    """A PEFT adapter on the language model of the bench checkpoint (cached)."""
    out = bf16_dir.parent / f"lora-r{rank}"
    stamp = out / "version"
    if stamp.exists() and stamp.read_text() == ADAPTER_VERSION:
        return out
    import torch
    import transformers
    from peft import LoraConfig, get_peft_model

    config = transformers.AutoConfig.from_pretrained(bf16_dir)
    torch.set_default_dtype(torch.bfloat16)
    model = getattr(transformers, config.architectures[0])(config)
    targets = rf".*\.language_model\..*\.({'|'.join(TARGETS)})"
    peft_model = get_peft_model(model, LoraConfig(r=rank, lora_alpha=2 * rank,
                                                  target_modules=targets))
    gen = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if ".lora_A." in name or ".lora_B." in name:
                fan_in = param.shape[1]
                noise = torch.randn(param.shape, generator=gen) / math.sqrt(fan_in)
                param.copy_(noise * (0.1 if ".lora_B." in name else 1.0))
    peft_model.save_pretrained(out)
    stamp.write_text(ADAPTER_VERSION)
    return out


def load_average() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


def worker(args: argparse.Namespace) -> dict[str, Any]:
    from vllm import LLM, SamplingParams
    from vllm.lora.request import LoRARequest

    kwargs: dict[str, Any] = dict(
        model=args.ckpt, dtype="bfloat16", enforce_eager=True, max_model_len=512,
        max_num_seqs=4, seed=0, quantization="bitsandbytes", load_format="bitsandbytes",
        limit_mm_per_prompt={"image": 1, "audio": 0, "video": 0},
    )
    if args.adapter:
        kwargs.update(enable_lora=True, max_lora_rank=args.rank, max_loras=2)
    llm = LLM(**kwargs)
    runs = {"without adapter": None}
    if args.adapter:
        runs["with adapter"] = LoRARequest("bench", 1, args.adapter)
    out: dict[str, Any] = {}
    for label, lora in runs.items():
        warm = SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True, detokenize=False)
        llm.generate([{"prompt_token_ids": p} for p in bench.prompts(4, args.vocab)], warm,
                     lora_request=lora, use_tqdm=False)
        for b in bench.BATCHES:
            params = SamplingParams(max_tokens=args.tokens, temperature=0.0, ignore_eos=True,
                                    detokenize=False)
            batch = [{"prompt_token_ids": p} for p in bench.prompts(b, args.vocab)]
            load_before = load_average()
            t = time.perf_counter()
            res = llm.generate(batch, params, lora_request=lora, use_tqdm=False)
            seconds = time.perf_counter() - t
            n = sum(len(r.outputs[0].token_ids) for r in res)
            out[f"{label} b{b}"] = {
                "tok_s": n / seconds, "tokens": n, "seconds": seconds,
                "load_before": load_before, "load_after": load_average(),
                "first_ids": list(res[0].outputs[0].token_ids[:8]),
            }
            bench.log(f"  {label} batch {b}: {n / seconds:.2f} tok/s (load {load_before})")
    return out


def run_engine(ckpt: Path, vocab: int, tokens: int, rank: int, adapter: Path | None) -> dict:
    result = bench.CACHE / f"lora-{'on' if adapter else 'off'}.json"
    cmd = [sys.executable, __file__, "_worker", "--ckpt", str(ckpt), "--vocab", str(vocab),
           "--tokens", str(tokens), "--rank", str(rank), "--result", str(result)]
    if adapter:
        cmd += ["--adapter", str(adapter)]
    env = dict(
        os.environ, VLLM_PLUGINS="bitsandbytes_mm", VLLM_CPU_KVCACHE_SPACE="2",
        HF_HUB_OFFLINE="1", VLLM_CACHE_ROOT=str(bench.CACHE / "vllm-cache"),
        TORCHINDUCTOR_CACHE_DIR=str(bench.CACHE / "inductor-cache"),
    )
    subprocess.run(cmd, check=True, env=env, timeout=bench.ENGINE_TIMEOUT_S)
    return json.loads(result.read_text())


def render(report: dict[str, Any]) -> str:
    lines = [
        "# Decode throughput with a QLoRA adapter",
        "",
        f"{report['checkpoint']} (nf4 + double quant), adapter rank {report['rank']} on the "
        f"language model's q/k/v/o/gate/up/down; {report['tokens']} new tokens per sequence; "
        f"revision {report['revision']}; {report['machine']['cpu']}, "
        f"{report['machine']['affinity']} cores.",
        "",
        "| engine | request | batch | tok/s | load average before (1/5/15 min) |",
        "|---|---|---:|---:|---|",
    ]
    for engine, runs in report["engines"].items():
        for key, r in runs.items():
            label, batch = key.rsplit(" b", 1)
            load = "/".join(str(x) for x in r["load_before"])
            lines.append(f"| {engine} | {label} | {batch} | {r['tok_s']:.2f} | {load} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="small model (~60 M params)")
    p.add_argument("--tokens", type=int, default=64)
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--out", type=Path, default=RESULT_DIR)
    args = p.parse_args(argv)
    spec = bench.QUICK if args.quick else bench.FULL
    bench.setup_bytecode_cache()
    bench.build_checkpoints(spec)
    root = bench.CACHE / spec.name
    adapter = build_adapter(root / "bf16", args.rank)
    engines = {
        "no-lora": run_engine(root / "nf4", spec.vocab, args.tokens, args.rank, None),
        "lora": run_engine(root / "nf4", spec.vocab, args.tokens, args.rank, adapter),
    }
    report = {
        "checkpoint": spec.name, "rank": args.rank, "tokens": args.tokens,
        "revision": bench.ours_revision(), "machine": bench.machine(), "engines": engines,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "lora.json").write_text(json.dumps(report, indent=1) + "\n")
    (args.out / "lora.md").write_text(render(report))
    print(render(report))
    return 0


def _worker_main(argv: list[str]) -> int:
    p = argparse.ArgumentParser()
    for flag in ("--ckpt", "--result"):
        p.add_argument(flag, required=True)
    p.add_argument("--vocab", type=int, required=True)
    p.add_argument("--tokens", type=int, required=True)
    p.add_argument("--rank", type=int, required=True)
    p.add_argument("--adapter")
    args = p.parse_args(argv)
    Path(args.result).write_text(json.dumps(worker(args)))
    return 0


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "_worker":
        sys.exit(_worker_main(sys.argv[2:]))
    sys.exit(main())
