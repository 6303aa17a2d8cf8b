"""MoE benchmark: bitsandbytes 4-bit experts vs bf16 experts on a mid-size Qwen3-MoE model.

Usage::

    .venv/bin/python scripts/bench_moe.py [--quick] [--tokens 32] [--only NAME ...]

1. Builds once (cached under ``.cache/bench/<model>/``) a random-weight Qwen3-MoE-shaped
   checkpoint in bf16 (~0.9 B parameters, 0.8 B of them in 8 x 64 experts; ``--quick``:
   ~60 M), its transformers 5 BnB version (``from_pretrained(..., BitsAndBytesConfig(nf4,
   double quant))`` + ``save_pretrained``: attention 4-bit, experts bf16) and the per-expert
   packed version transformers 4.x / unsloth wrote (scripts/tiny_moe.py).
2. Runs each contender in a fresh process, engine in-process, bf16, CPU:
   - ``bnb-t5``: ``load_format="bitsandbytes"`` on the transformers 5 files; the experts are
     quantized while loading (nf4, blocksize 64);
   - ``bnb-per-expert``: the per-expert packed files; experts are loaded packed;
   - ``bnb-bf16-experts``: the transformers 5 files with ``hf_overrides={"bnb_moe_experts":
     "unquantized"}``: attention 4-bit, experts bf16 in vLLM's own CPU MoE kernel;
   - ``native-bf16``: vLLM's default loader on the bf16 checkpoint.
   Measured: ``load_model`` wall time (model init + weights + post-processing, in the
   process that loads), the experts' resident bytes (``vllm_bnb_mm.moe.expert_memory``),
   greedy decode throughput (``ignore_eos``, fixed token-id prompts, after a warm-up) at
   batch 1 and 4, and the 1-minute load average before and after (the box may be shared).
3. Prints a markdown table and writes ``results/bench/moe-latest.{md,json}``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench import REPO, RESULTS, log, machine, ours_revision, prompts  # noqa: E402

CACHE = REPO / ".cache" / "bench"
BUILD_VERSION = "bench-moe-1"
BATCHES = (1, 4)
ENGINE_TIMEOUT_S = 1800


@dataclass(frozen=True)
class MoESpec:
    name: str
    vocab: int
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    experts: int
    top_k: int
    expert_intermediate: int


FULL = MoESpec("qwen3moe-mid", vocab=32768, hidden=1024, layers=8, heads=8, kv_heads=4,
               experts=64, top_k=8, expert_intermediate=512)
QUICK = MoESpec("qwen3moe-small", vocab=8192, hidden=512, layers=4, heads=4, kv_heads=2,
                experts=32, top_k=4, expert_intermediate=256)


@dataclass(frozen=True)
class Contender:
    name: str
    checkpoint: str  # key of build_checkpoints()
    bnb: bool
    hf_overrides: tuple[tuple[str, str], ...] = ()


CONTENDERS = [
    Contender("bnb-t5", "nf4-t5", bnb=True),
    Contender("bnb-per-expert", "nf4-per-expert", bnb=True),
    Contender("bnb-bf16-experts", "nf4-t5", bnb=True,
              hf_overrides=(("bnb_moe_experts", "unquantized"),)),
    Contender("native-bf16", "bf16", bnb=False),
]
BY_NAME = {c.name: c for c in CONTENDERS}


# ============================================================================================
# Checkpoints
# ============================================================================================


def build_checkpoints(spec: MoESpec) -> dict[str, Path]:
    root = CACHE / spec.name
    paths = {k: root / k for k in ("bf16", "nf4-t5", "nf4-per-expert")}
    stamp = root / "BUILD"
    if stamp.exists() and stamp.read_text() == BUILD_VERSION:
        return paths
    shutil.rmtree(root, ignore_errors=True)
    import torch
    from transformers import BitsAndBytesConfig, Qwen3MoeConfig, Qwen3MoeForCausalLM

    import tiny_moe
    from tiny_families.llama import tokenizer as llama_tokenizer

    log(f"building {spec.name} (bf16, transformers 5 nf4, per-expert nf4)")
    config = Qwen3MoeConfig(
        vocab_size=spec.vocab, hidden_size=spec.hidden, intermediate_size=4 * spec.hidden,
        moe_intermediate_size=spec.expert_intermediate, num_hidden_layers=spec.layers,
        num_attention_heads=spec.heads, num_key_value_heads=spec.kv_heads, head_dim=128,
        num_experts=spec.experts, num_experts_per_tok=spec.top_k, norm_topk_prob=True,
        max_position_embeddings=4096, tie_word_embeddings=False,
    )
    torch.manual_seed(0)
    model = Qwen3MoeForCausalLM(config).to(torch.bfloat16)
    tiny_moe.redraw_experts(model, seed=0)
    model.save_pretrained(paths["bf16"])
    del model
    llama_tokenizer().save_pretrained(paths["bf16"])  # vLLM wants a tokenizer; ids are fixed
    bnb = dict(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
               bnb_4bit_compute_dtype=torch.bfloat16)
    quantized = Qwen3MoeForCausalLM.from_pretrained(
        paths["bf16"], quantization_config=BitsAndBytesConfig(**bnb), dtype=torch.bfloat16
    )
    quantized.save_pretrained(paths["nf4-t5"])
    del quantized
    for file in paths["bf16"].iterdir():
        if not (paths["nf4-t5"] / file.name).exists():
            shutil.copy2(file, paths["nf4-t5"] / file.name)
    shutil.copytree(paths["nf4-t5"], paths["nf4-per-expert"])
    tiny_moe.finish_files(paths["nf4-per-expert"], "per_expert",
                          {**bnb, "bnb_4bit_compute_dtype": "bfloat16"})
    stamp.write_text(BUILD_VERSION)
    return paths


def _size_mb(folder: Path) -> float:
    return sum(f.stat().st_size for f in folder.glob("*.safetensors")) / 1e6


# ============================================================================================
# Worker (one contender, one process)
# ============================================================================================


def worker(args: argparse.Namespace) -> dict[str, Any]:
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"  # load in this process: timeable
    import vllm.v1.worker.cpu_model_runner as runner
    from vllm import LLM, SamplingParams

    from vllm_bnb_mm.moe import expert_memory

    c = BY_NAME[args.worker]
    timings: dict[str, float] = {}
    original = runner.CPUModelRunner.load_model

    def timed_load_model(self, *a, **kw):
        start = time.perf_counter()
        try:
            return original(self, *a, **kw)
        finally:
            timings["load_model_s"] = time.perf_counter() - start

    runner.CPUModelRunner.load_model = timed_load_model
    kwargs: dict[str, Any] = dict(
        model=args.ckpt, dtype="bfloat16", enforce_eager=True, max_model_len=512,
        max_num_seqs=4, seed=0, hf_overrides=dict(c.hf_overrides),
    )
    if c.bnb:
        kwargs["load_format"] = "bitsandbytes"
    out: dict[str, Any] = {"load_avg_before": os.getloadavg()[0]}
    start = time.perf_counter()
    llm = LLM(**kwargs)
    out["engine_init_s"] = time.perf_counter() - start
    out.update(timings)
    out["experts"] = llm.apply_model(expert_memory)[0]
    greedy = dict(temperature=0.0, ignore_eos=True, detokenize=False)
    llm.generate([{"prompt_token_ids": p} for p in prompts(4, args.vocab)],
                 SamplingParams(max_tokens=4, **greedy), use_tqdm=False)  # warm-up
    out["decode"] = {}
    for batch in BATCHES:
        requests = [{"prompt_token_ids": p} for p in prompts(batch, args.vocab)]
        start = time.perf_counter()
        results = llm.generate(requests, SamplingParams(max_tokens=args.tokens, **greedy),
                               use_tqdm=False)
        seconds = time.perf_counter() - start
        tokens = sum(len(r.outputs[0].token_ids) for r in results)
        out["decode"][str(batch)] = {"tokens": tokens, "seconds": seconds,
                                     "tok_s": tokens / seconds}
    out["load_avg_after"] = os.getloadavg()[0]
    return out


def run_contender(c: Contender, ckpt: Path, spec: MoESpec, tokens: int) -> dict[str, Any]:
    log_dir = CACHE / "logs"
    log_dir.mkdir(parents=True, exist_ok=True)
    logfile = log_dir / f"moe-{c.name}.log"
    env = dict(os.environ, PYTHONPATH=str(REPO), VLLM_CPU_KVCACHE_SPACE="2")
    if not c.bnb:
        env["VLLM_PLUGINS"] = ""  # vLLM alone
    cmd = [sys.executable, __file__, "--worker", c.name, "--ckpt", str(ckpt),
           "--vocab", str(spec.vocab), "--tokens", str(tokens)]
    with open(logfile, "w") as f:
        proc = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=f, text=True, env=env,
                              timeout=ENGINE_TIMEOUT_S)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    if proc.returncode != 0 or not lines:
        return {"ok": False, "error": f"exit {proc.returncode}, see {logfile}"}
    return {"ok": True, **json.loads(lines[-1])}


# ============================================================================================
# Report
# ============================================================================================


def render_md(report: dict[str, Any]) -> str:
    rows = [
        "| contender | load_model s | experts MiB (bf16 MiB) | decode b1 tok/s | "
        "decode b4 tok/s | load avg before/after |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for name, r in report["runs"].items():
        if not r.get("ok"):
            rows.append(f"| {name} | failed: {r.get('error')} | | | | |")
            continue
        experts = r["experts"]
        rows.append(
            f"| {name} | {r['load_model_s']:.1f} | {experts['held_bytes'] / 2**20:.0f} "
            f"({experts['bf16_bytes'] / 2**20:.0f}) | {r['decode']['1']['tok_s']:.2f} | "
            f"{r['decode']['4']['tok_s']:.2f} | {r['load_avg_before']:.1f} / "
            f"{r['load_avg_after']:.1f} |"
        )
    m = report["machine"]
    spec = report["model"]
    head = (
        f"MoE benchmark ({spec['name']}: {spec['layers']} layers x {spec['experts']} experts, "
        f"top-{spec['top_k']}, hidden {spec['hidden']}, expert intermediate "
        f"{spec['expert_intermediate']}; checkpoints {report['checkpoint_mb']} MB) on "
        f"{m['cpu']}, {m['affinity']} cores, ours at {report['ours']}, "
        f"{report['tokens']} tokens per sequence."
    )
    return head + "\n\n" + "\n".join(rows) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="~60 M-parameter model")
    parser.add_argument("--tokens", type=int, default=32, help="generated tokens per sequence")
    parser.add_argument("--only", nargs="*", choices=list(BY_NAME), help="contenders to run")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--ckpt", help=argparse.SUPPRESS)
    parser.add_argument("--vocab", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        print(json.dumps(worker(args)), flush=True)
        return 0
    spec = QUICK if args.quick else FULL
    ckpts = build_checkpoints(spec)
    report: dict[str, Any] = {
        "model": spec.__dict__, "tokens": args.tokens, "ours": ours_revision(),
        "machine": machine(), "checkpoint_mb": {k: round(_size_mb(p)) for k, p in ckpts.items()},
        "runs": {},
    }
    for c in CONTENDERS:
        if args.only and c.name not in args.only:
            continue
        log(f"{c.name} on {ckpts[c.checkpoint].name}")
        report["runs"][c.name] = run_contender(c, ckpts[c.checkpoint], spec, args.tokens)
        log(f"  {json.dumps(report['runs'][c.name])[:300]}")
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "moe-latest.json").write_text(json.dumps(report, indent=1) + "\n")
    md = render_md(report)
    (RESULTS / "moe-latest.md").write_text(md)
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
