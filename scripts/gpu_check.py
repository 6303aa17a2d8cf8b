"""Our quant-state handling through bitsandbytes' CUDA kernels (needs a GPU, not vLLM).

On a GPU vLLM serves our 4-bit layers with bitsandbytes' own kernels
(`bnb.matmul_4bit`, `bnb.matmul`), but with quant states our loader built: parsed from
the checkpoint on the CPU, double quant flattened to float32 absmax, cut for
tensor-parallel ranks (at a smaller blocksize where a cut falls inside blocks), merged
across fused shards, then moved to the GPU. CI has no GPU, so this script checks that
path where one is lent:

1. checkpoints written the way transformers + bitsandbytes write them, quantized on the
   GPU (nf4/fp4, double quant on/off, blocksizes 64/128);
2. our `parse_4bit_state` / `parse_8bit_state` read them from real safetensors files;
3. our `slice_4bit_rows` / `slice_4bit_cols` / `merge_4bit` cut and merge them as the
   loader does, on the CPU, and the states move to the GPU;
4. bitsandbytes' CUDA dequantization of each cut must equal, bit for bit, the same rows /
   columns of its dequantization of the uncut weight as saved;
5. `bnb.matmul_4bit` (at 1, 3, 8, 33 and 200 tokens: its fused kernel and its
   dequantize + matmul fallback; the fused kernel is also forced at 8 and 33) and
   `bnb.matmul` (int8, with and without outlier threshold) must match a float64 product
   with those reference weights, within the activation dtype's rounding.

Prints one line per case and a JSON summary; exits 1 on any failure.
Usage: python scripts/gpu_check.py [--device cuda] [--out FILE]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
import warnings
from pathlib import Path

import bitsandbytes as bnb
import torch
from bitsandbytes import functional as bnbf
from bitsandbytes.functional import QuantState
from safetensors.torch import save_file

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

from bnb_files import packed_4bit_tensors, packed_8bit_tensors  # noqa: E402
from vllm_bnb_mm import quant_state as qs  # noqa: E402
from vllm_bnb_mm.checkpoint import FileReader, scan_checkpoint  # noqa: E402

TOKENS = (1, 3, 8, 33, 200)
# Error bound (see relative_error) of a product computed in the activation dtype against
# float64: a few units of that dtype's rounding. A wrong block scale or a shifted byte
# costs O(0.1-1).
TOLERANCE = {torch.float16: 2e-3, torch.bfloat16: 1.6e-2}


def write_checkpoint(path: Path, weights: dict[str, tuple[torch.Tensor, dict]], device: str):
    """Quantize each weight on `device` as transformers + bitsandbytes do (tests/bnb_files)
    and save it; returns the float64 weights bitsandbytes dequantizes them to."""
    tensors, reference = {}, {}
    for name, (weight, how) in weights.items():
        w = weight.to(device)
        if how["kind"] == "8bit":
            tensors |= packed_8bit_tensors(name, w)
            cb, scb = tensors[f"{name}.weight"], tensors[f"{name}.SCB"]
            reference[name] = cb.double() * scb.double().unsqueeze(1) / 127
            continue
        tensors |= packed_4bit_tensors(
            name, w, how["quant_type"], how["double_quant"], how["blocksize"]
        )
        # bitsandbytes' own reading and dequantization of what is saved, blocks running
        # over the flattened weight (its CUDA kernel does so at any shape; its CPU one
        # needs 1-D).
        prefix = f"{name}.weight."
        state = QuantState.from_dict(
            {k.removeprefix(prefix): v for k, v in tensors.items() if k.startswith(prefix)},
            device=w.device,
        )
        state.shape = torch.Size([w.numel()])
        packed = tensors[f"{name}.weight"]
        reference[name] = bnbf.dequantize_4bit(packed, state).double().reshape(w.shape)
    save_file({k: v.contiguous().cpu() for k, v in tensors.items()}, str(path))
    return reference


def load_4bit(layout, reader: FileReader, name: str):
    q = layout.quantized[f"{name}.weight"]
    state = qs.parse_4bit_state(q, layout.tensors, reader)
    return reader.tensor(layout.tensors[q.weight]).reshape(-1), state


def to_device(packed: torch.Tensor, state, device: str):
    state.to(device)
    return packed.contiguous().to(device), state


def relative_error(out: torch.Tensor, x: torch.Tensor, weight: torch.Tensor) -> float:
    """max |out - x @ weight.T|, in units of the largest sum of |x_k * w_k| of one output:
    the scale rounding works on (a plain relative error blows up on outputs that cancel)."""
    x = x.double()
    scale = (x.abs() @ weight.abs().t()).max().clamp_min(1e-30)
    return float((out.double() - x @ weight.t()).abs().max() / scale)


def forced_fused(x, packed, state):
    """bitsandbytes' fused CUDA 4-bit GEMM whatever its size heuristic says."""
    from bitsandbytes.backends.cuda import ops as cuda_ops

    return cuda_ops._gemm_4bit_kernel_impl(
        x, packed.view(-1, 1), state.shape, state.absmax, state.blocksize, state.quant_type
    )


class Checker:
    def __init__(self, device: str) -> None:
        self.device = device
        self.rows: list[dict] = []

    def record(self, case: str, check: str, value: float, bound: float) -> None:
        ok = value <= bound
        self.rows.append({"case": case, "check": check, "value": value, "bound": bound, "ok": ok})
        print(f"{'ok  ' if ok else 'FAIL'} {case:58s} {check:28s} {value:.3g} (<= {bound:.3g})")

    def check_4bit(self, case: str, packed, state, ref: torch.Tensor) -> None:
        """`ref`: the float64 [rows, cols] weights this cut must compute with."""
        packed, state = to_device(packed, state, self.device)
        ref = ref.to(self.device)
        with qs.bitsandbytes_float32_default():
            deq = qs.dequantize_4bit(packed, state, torch.float32).reshape(ref.shape)
        self.record(case, "dequantize == reference", float((deq.double() - ref).abs().max()), 0.0)
        if self.device == "cpu" and ref.shape[1] % state.blocksize:
            return  # bitsandbytes' CPU kernels mis-index such rows; our layer dequantizes
        g = torch.Generator(device="cpu").manual_seed(len(self.rows))
        for dtype in (torch.float16, torch.bfloat16):
            tol = TOLERANCE[dtype]
            for m in TOKENS:
                x = torch.randn(m, ref.shape[1], generator=g).to(self.device, dtype)
                out = bnb.matmul_4bit(x, packed.reshape(-1, 1).t(), quant_state=state)
                err = relative_error(out, x, ref)
                self.record(case, f"matmul_4bit {str(dtype)[6:]} M={m}", err, tol)
                # bitsandbytes calls its fused kernel only where rows are whole blocks.
                if self.device == "cuda" and m in (8, 33) and not ref.shape[1] % state.blocksize:
                    err = relative_error(forced_fused(x, packed, state), x, ref)
                    self.record(case, f"fused kernel {str(dtype)[6:]} M={m}", err, tol)

    def check_8bit(self, case: str, cb: torch.Tensor, scb: torch.Tensor, ref: torch.Tensor):
        ref = ref.to(self.device)
        g = torch.Generator(device="cpu").manual_seed(len(self.rows))
        for threshold in (0.0, 6.0):
            state = bnb.MatmulLtState()
            state.CB, state.SCB = cb.contiguous().to(self.device), scb.to(self.device)
            state.threshold, state.has_fp16_weights, state.is_training = threshold, False, False
            state.use_pool = threshold > 0
            for m in (1, 33):
                x = torch.randn(m, ref.shape[1], generator=g).to(self.device, torch.float16)
                if threshold:
                    x[:, :3] *= 20  # outlier columns take the threshold path
                out = bnb.matmul(x, state.CB, state=state)
                # int8 activations: each row rounded to 1/127 of its absmax.
                err = relative_error(out, x, ref)
                self.record(case, f"matmul int8 t={threshold} M={m}", err, 1.6e-2)


def four_bit_cases(checker: Checker, tmp: Path) -> None:
    g = torch.Generator().manual_seed(0)
    for quant_type in ("nf4", "fp4"):
        for double_quant in (True, False):
            for blocksize in (64, 128):
                how = {"kind": "4bit", "quant_type": quant_type, "double_quant": double_quant,
                       "blocksize": blocksize}
                weights = {
                    "big": (torch.randn(384, 512, generator=g), how),
                    "odd": (torch.randn(64, 96, generator=g), how),
                    "q": (torch.randn(256, 512, generator=g), how),
                    "k": (torch.randn(128, 512, generator=g), {**how, "blocksize": 64}),
                    "v": (torch.randn(128, 512, generator=g), how),
                    "a": (torch.randn(1, 104, generator=g), how),
                    "b": (torch.randn(7, 104, generator=g), how),
                }
                tag = f"{quant_type} dq={int(double_quant)} bs={blocksize}"
                path = tmp / f"{quant_type}-{double_quant}-{blocksize}.safetensors"
                refs = write_checkpoint(path, weights, checker.device)
                reader = FileReader()
                layout = scan_checkpoint([str(path)])
                run_4bit_cuts(checker, tag, layout, reader, refs)


def run_4bit_cuts(checker: Checker, tag: str, layout, reader: FileReader, refs) -> None:
    ref = refs["big"].cpu()
    packed, state = load_4bit(layout, reader, "big")
    checker.check_4bit(f"{tag} whole 384x512", packed, state, ref)
    for rank in range(2):  # column-parallel TP=2: output rows
        a, b = 192 * rank, 192 * (rank + 1)
        packed, state = load_4bit(layout, reader, "big")
        cut = qs.slice_4bit_rows(packed, state, a, b)
        checker.check_4bit(f"{tag} rows {a}:{b} (bs {cut[1].blocksize})", *cut, ref[a:b])
    for a, b in ((0, 256), (256, 512), (0, 160), (160, 352)):  # row-parallel: input columns
        packed, state = load_4bit(layout, reader, "big")
        cut = qs.slice_4bit_cols(packed, state, a, b)
        checker.check_4bit(f"{tag} cols {a}:{b} (bs {cut[1].blocksize})", *cut, ref[:, a:b])
    # 96 columns: rows are not whole blocks of 64/128; a cut after row 1 needs blocksize 32.
    ref_odd = refs["odd"].cpu()
    packed, state = load_4bit(layout, reader, "odd")
    checker.check_4bit(f"{tag} odd 64x96 whole", packed, state, ref_odd)
    for a, b in ((0, 1), (1, 33), (33, 64)):
        packed, state = load_4bit(layout, reader, "odd")
        cut = qs.slice_4bit_rows(packed, state, a, b)
        if cut is None:
            checker.record(f"{tag} odd rows {a}:{b}", "no blocksize expresses cut", 0.0, 0.0)
            continue
        checker.check_4bit(f"{tag} odd rows {a}:{b} (bs {cut[1].blocksize})", *cut,
                           ref_odd[a:b])
    # Fused q/k/v shards (k at blocksize 64) merged into one state.
    parts = [load_4bit(layout, reader, n) for n in ("q", "k", "v")]
    states = [s for _, s in parts]
    assert qs.can_merge_4bit(states), tag
    merged = qs.merge_4bit(states, states[0].dtype)
    packed = torch.cat([p for p, _ in parts])
    ref_qkv = torch.cat([refs[n].cpu() for n in ("q", "k", "v")])
    checker.check_4bit(f"{tag} merged qkv (bs {merged.blocksize})", packed, merged, ref_qkv)
    # Shards that cannot merge (1x104 at blocksize 64: rows not whole blocks) stay parts
    # of one packed buffer; the second part starts 52 bytes in, as the layer slices it.
    parts = [load_4bit(layout, reader, n) for n in ("a", "b")]
    assert not qs.can_merge_4bit([s for _, s in parts]), tag
    flat = torch.cat([p for p, _ in parts]).to(checker.device)
    start = parts[0][0].numel()
    packed, state = to_device(flat[start:], parts[1][1], checker.device)
    checker.check_4bit(f"{tag} part at byte {start}", packed, state, refs["b"].cpu())


def eight_bit_cases(checker: Checker, tmp: Path) -> None:
    g = torch.Generator().manual_seed(1)
    path = tmp / "int8.safetensors"
    refs = write_checkpoint(path, {"w": (torch.randn(384, 512, generator=g), {"kind": "8bit"})},
                            checker.device)
    layout = scan_checkpoint([str(path)])
    reader = FileReader()
    q = layout.quantized["w.weight"]
    scb = qs.parse_8bit_state(q, layout.tensors, reader).scb
    cb = reader.tensor(layout.tensors["w.weight"])
    ref = refs["w"].cpu()
    checker.check_8bit("int8 whole", cb, scb, ref)
    checker.check_8bit("int8 rows 192:384", cb[192:], scb[192:], ref[192:])
    checker.check_8bit("int8 cols 256:512", cb[:, 256:], scb, ref[:, 256:])


def blocksize_cost(device: str) -> dict:
    """Decode-step cost of a cut re-expressed at blocksize 32 vs the weight's own 64."""
    if device != "cuda":
        return {}
    packed, state = bnbf.quantize_4bit(
        torch.randn(8192, 4096, device=device, dtype=torch.bfloat16), blocksize=64,
        quant_type="nf4",
    )
    state32 = qs.with_blocksize(state, 32)
    result = {}
    for m in (1, 8, 64):
        x = torch.randn(m, 4096, device=device, dtype=torch.bfloat16)
        for name, st in (("bs64", state), ("bs32", state32)):
            for _ in range(5):
                bnb.matmul_4bit(x, packed.t(), quant_state=st)
            torch.cuda.synchronize()
            t = time.perf_counter()
            for _ in range(200):
                bnb.matmul_4bit(x, packed.t(), quant_state=st)
            torch.cuda.synchronize()
            result[f"M={m} {name} us"] = (time.perf_counter() - t) / 200 * 1e6
    print("8192x4096 nf4 matmul_4bit, bf16:", json.dumps(result))
    return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--out", help="write the JSON summary here")
    args = parser.parse_args()
    warnings.simplefilter("ignore", UserWarning)  # bitsandbytes' fallback notices
    checker = Checker(args.device)
    with tempfile.TemporaryDirectory() as tmp:
        four_bit_cases(checker, Path(tmp))
        eight_bit_cases(checker, Path(tmp))
    failed = [r for r in checker.rows if not r["ok"]]
    summary = {
        "device": torch.cuda.get_device_name() if args.device == "cuda" else args.device,
        "torch": torch.__version__, "bitsandbytes": bnb.__version__,
        "checks": len(checker.rows), "failed": len(failed),
        "blocksize_cost": blocksize_cost(args.device), "rows": checker.rows,
    }
    print(f"{len(checker.rows)} checks, {len(failed)} failed")
    if args.out:
        Path(args.out).write_text(json.dumps(summary, indent=1))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
