"""Where the CPU 4-bit forward should switch between bitsandbytes' fused kernel, our
kernels and dequantize + bf16 GEMM: a one-thread micro-benchmark over the tokens in a step
(M).

Usage::

    .venv/bin/python scripts/cpu_crossover.py [--reps 15] [--json out.json] [--isa NAME]

Runs itself twice in fresh processes: oneDNN as it comes (AMX where the CPU has it), and
oneDNN capped with ONEDNN_MAX_CPU_ISA=AVX512_CORE_BF16 (the ISA of AVX512-BF16 CPUs
without AMX: Cooper Lake, Zen 4/5). Each child checks with ONEDNN_VERBOSE which matmul
implementation really ran. Per shape and M it times, as vLLM's CPU worker runs (one
thread), the minimum over repetitions of thread CPU time (robust to other jobs on a
shared box; min of wall time is printed beside it):

- fused: `bitsandbytes.matmul_4bit` on the repacked weight (its AVX512-BF16 kernel);
- amx: vllm_bnb_mm's AMX kernel (decode into AMX tiles once per call), where AMX is usable;
- avx512: vllm_bnb_mm's AVX512-BF16 kernel (the same decode, VDPBF16PS dot products), the
  one CPUs without AMX run;
- gemm: vllm_bnb_mm's dequantize-into-scratch + `torch.matmul` (oneDNN);
- bf16: vLLM's own bf16 linear (oneDNN matmul on a prepacked bf16 weight), for reference.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
SHAPES = [(6144, 1536), (1536, 6144), (2048, 1536), (4096, 4096)]
TOKENS = [1, 2, 4, 8, 12, 16, 20, 24, 32, 48, 64, 96, 128, 192, 256, 512, 1024, 2048]
ISAS = {"amx": None, "avx512_core_bf16": "AVX512_CORE_BF16"}


def _time(reps: int, fn, *args, **kwargs) -> tuple[float, float]:
    fn(*args, **kwargs)
    cpu, wall = [], []
    for _ in range(reps):
        t, w = time.thread_time(), time.perf_counter()
        fn(*args, **kwargs)
        cpu.append(time.thread_time() - t)
        wall.append(time.perf_counter() - w)
    return min(cpu) * 1e3, min(wall) * 1e3


def child(reps: int) -> dict:
    import bitsandbytes as bnb
    import torch

    sys.path.insert(0, str(REPO))
    from vllm_bnb_mm import cpu
    from vllm_bnb_mm import quant_state as qs

    torch.set_num_threads(1)
    cpu.request_amx_tile_state()
    if cpu.kernels() is None:
        raise SystemExit("cpu_kernels.c did not build: nothing to compare")
    try:
        from vllm import _custom_ops as ops

        def bf16_linear(w):
            handler = ops.create_onednn_mm(w.t(), 32)
            return lambda x: ops.onednn_mm(handler, x, None)
    except Exception:  # no vLLM CPU ops: torch's linear is the same oneDNN matmul
        def bf16_linear(w):
            return lambda x: torch.nn.functional.linear(x, w)

    rows = []
    for n, k in SHAPES:
        w = torch.randn(n, k) * 0.02
        packed, state = qs.quantize_4bit(w, "nf4", 64, torch.bfloat16)
        kernel, kstate = qs.repack_for_cpu_kernel(packed, state)
        dense = bf16_linear(qs.dequantize_4bit(packed, state, torch.bfloat16).reshape(n, k))
        for m in TOKENS:
            x = torch.randn(m, k, dtype=torch.bfloat16)
            fused = _time(reps, bnb.matmul_4bit, x, kernel, quant_state=kstate)
            gemm = _time(reps, cpu.dequantize_and_gemm, x, kernel, kstate)
            amx = (_time(reps, cpu.gemm_4bit_amx, x, kernel, kstate.absmax, kstate.code, n, k,
                         kstate.blocksize) if cpu.amx_usable() else None)
            avx512 = _time(reps, cpu.gemm_4bit_avx512, x, kernel, kstate.absmax, kstate.code,
                           n, k, kstate.blocksize)
            bf16 = _time(reps, dense, x)
            rows.append({"n": n, "k": k, "m": m, "fused_ms": fused, "amx_ms": amx,
                         "avx512_ms": avx512, "gemm_ms": gemm, "bf16_ms": bf16})
            amx_text = f"amx {amx[0]:7.2f}  " if amx else ""
            print(f"  {n}x{k} M={m:4d}  fused {fused[0]:7.2f}  {amx_text}"
                  f"avx512 {avx512[0]:7.2f}  gemm {gemm[0]:7.2f}  "
                  f"bf16 {bf16[0]:7.2f} ms (cpu; wall {fused[1]:.2f} {gemm[1]:.2f} "
                  f"{bf16[1]:.2f})", file=sys.stderr, flush=True)
    return {"rows": rows, "load": os.getloadavg()}


def matmul_isa(verbose_log: str) -> str:
    """The oneDNN matmul implementation(s) that ran, from ONEDNN_VERBOSE lines."""
    found = sorted(set(re.findall(r",matmul,([^,]+),", verbose_log)))
    return " ".join(found) or "none logged"


def _switch(mine: list[dict], slow: str, fast: str) -> int | None:
    """The smallest M from which path `fast` is at least as fast as `slow` at that M and
    at every larger M measured."""
    best = None
    for r in reversed(mine):
        if r[f"{fast}_ms"][0] > r[f"{slow}_ms"][0]:
            break
        best = r["m"]
    return best


def crossover(rows: list[dict]) -> dict[str, dict[str, int | None]]:
    """Per shape, where each path starts to beat the one before it."""
    out = {}
    for n, k in SHAPES:
        mine = sorted((r for r in rows if (r["n"], r["k"]) == (n, k)), key=lambda r: r["m"])
        pairs = [("fused", "gemm"), ("fused", "avx512"), ("avx512", "gemm")]
        if mine[0]["amx_ms"] is not None:
            pairs += [("fused", "amx"), ("amx", "gemm")]
        out[f"{n}x{k}"] = {f"{a}->{b}": _switch(mine, a, b) for a, b in pairs}
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--reps", type=int, default=15)
    p.add_argument("--json", type=Path)
    p.add_argument("--isa", choices=sorted(ISAS), action="append",
                   help="only this oneDNN ISA setting (repeatable; default: all)")
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        print(json.dumps(child(args.reps)))
        return 0
    report = {"date": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "reps": args.reps, "isas": {}}
    for name, cap in ISAS.items():
        if args.isa and name not in args.isa:
            continue
        env = dict(os.environ, ONEDNN_VERBOSE="1")
        if cap:
            env["ONEDNN_MAX_CPU_ISA"] = cap
        load = os.getloadavg()
        print(f"[{name}] ONEDNN_MAX_CPU_ISA={cap or '(unset)'}; load {load}", file=sys.stderr)
        proc = subprocess.run(
            [sys.executable, __file__, "--child", "--reps", str(args.reps)],
            env=env, capture_output=True, text=True, check=False,
        )
        sys.stderr.write("".join(ln + "\n" for ln in proc.stderr.splitlines()
                                 if ln.startswith("  ")))
        if proc.returncode:
            print(proc.stderr[-3000:], file=sys.stderr)
            return proc.returncode
        result = json.loads(proc.stdout.strip().splitlines()[-1])
        result["onednn_matmul"] = matmul_isa(proc.stdout)
        result["crossover_m"] = crossover(result["rows"])
        result["load_before"] = load
        report["isas"][name] = result
        print(f"[{name}] oneDNN matmul: {result['onednn_matmul']}; crossover M: "
              f"{result['crossover_m']}", file=sys.stderr)
    if args.json:
        args.json.write_text(json.dumps(report, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
