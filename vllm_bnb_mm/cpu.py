"""The CPU 4-bit forward: which path runs for how many tokens, the C routines it builds for
them (cpu_kernels.c), and the CPU facts it depends on."""

from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import os
import subprocess
from pathlib import Path

import bitsandbytes as bnb
import torch
from bitsandbytes.functional import QuantState, has_avx512bf16

# vLLM configures the "vllm" logger tree; this module stays importable without vLLM.
logger = logging.getLogger(f"vllm.{__name__}")

_amx_requested = False


def request_amx_tile_state() -> None:
    """Ask Linux for the AMX tile state in this process (idempotent, harmless elsewhere).

    Linux grants AMX registers only to a process that requests them (arch_prctl
    ARCH_REQ_XCOMP_PERM); otherwise the first AMX instruction is a SIGILL. oneDNN asks on
    its first bf16 matmul, but when every linear runs in bitsandbytes' 4-bit kernel, vLLM's
    AMX attention kernel is the first AMX user and nobody has asked: the engine dies on its
    first forward. Called by every process that holds BnB layers on the CPU, at load.
    """
    global _amx_requested
    if _amx_requested:
        return
    _amx_requested = True
    if torch.cpu._is_amx_tile_supported():
        torch.cpu._init_amx()


# ------------------------------------------------------------- which path for M tokens

# The CPU 4-bit forward has four paths, chosen by the tokens in the step (M):
# - "fused": bitsandbytes' fused 4-bit kernel (what transformers runs on these CPUs). It
#   decodes the whole weight again for every 4 rows of activations, so its cost grows
#   linearly with M (~0.25 ms per row for 6144 x 1536, one thread). Left for float32 and
#   float16 models (it returns their dtype) and for what our kernels cannot take.
# - "amx": our AMX kernel (cpu_kernels.c, gemm_4bit_amx) decodes the weight once per step
#   into AMX tiles. Up to 32 rows it computes what the fused kernel computes (bf16 code
#   values, block scales on float32 sums: the same bits but for the order of the sums), in
#   0.56-0.83x the fused kernel's time at M = 1 and 0.12-0.15x at M = 16 (four shapes);
#   beyond, it rounds each weight to bf16 as the GEMM path does, faster than a bf16 GEMM
#   up to M ~ 256.
# - "avx512": the same decode feeding AVX512-BF16 dot products (gemm_4bit_avx512), for
#   CPUs without AMX: the fused kernel's arithmetic (bit-identical in our tests), each
#   weight decoded into registers once per 8 rows of x. On a Zen 4 (one thread, four
#   shapes): 0.52-0.68x the fused kernel's time at every M from 1 to 70.
# - "gemm": dequantize into a scratch buffer, then oneDNN's bf16 GEMM.
# Measured with scripts/cpu_crossover.py (one thread, min over repetitions, four shapes;
# results/bench/crossover-decode.json for the kernels as they are, crossover.json for the
# many-row runs before; notes/performance.md); the crossovers depend on the ISA
# and, for the AMX kernel's many-row path, on K:
# - AMX: against oneDNN's GEMM the AMX kernel wins up to M = 2048 where K <= 2048 (it
#   decodes 4-8 blocks of 32 weight rows at once and reads x once per group: 0.53-0.94x
#   the GEMM's time at 256-2048), and up to ~512 for larger K (one or two blocks per
#   group; 1536 x 6144: 1.27x the GEMM's time at 512).
# - Without AMX our AVX512-BF16 kernel beats dequantize + oneDNN's AVX512-BF16 GEMM up to
#   M = 2048 on a Zen 4 (0.88-0.90x its time at 128, 0.95-0.99x at 1024, 0.99-1.00x at
#   2048, four shapes).
GEMM_MIN_TOKENS = 512
AVX512_GEMM_MIN_TOKENS = 2048
AMX_SMALL_K = 2048
AMX_GEMM_MIN_TOKENS_SMALL_K = 2048


@functools.cache
def amx_usable() -> bool:
    """AMX in this CPU, not capped off by ONEDNN_MAX_CPU_ISA (e.g. AVX512_CORE_BF16, as
    scripts/cpu_crossover.py does to stand for CPUs without AMX), and our AMX kernel built."""
    cap = os.environ.get("ONEDNN_MAX_CPU_ISA", os.environ.get("DNNL_MAX_CPU_ISA", "ALL"))
    uncapped = cap.upper() in ("ALL", "DEFAULT") or "AMX" in cap.upper()
    lib = kernels()
    return (torch.cpu._is_amx_tile_supported() and uncapped and lib is not None
            and hasattr(lib, "gemm_4bit_amx"))


def forward_path(tokens: int, k: int) -> str:
    """"fused", "amx", "avx512" or "gemm" for a bf16 step of `tokens` rows into a weight
    with `k` inputs (see above)."""
    if kernels() is None:
        return "fused"
    if not amx_usable():
        return "avx512" if tokens < AVX512_GEMM_MIN_TOKENS else "gemm"
    limit = AMX_GEMM_MIN_TOKENS_SMALL_K if k <= AMX_SMALL_K else GEMM_MIN_TOKENS
    return "amx" if tokens < limit else "gemm"


# ------------------------------------------------------------- C routines

_SOURCE = Path(__file__).with_name("cpu_kernels.c")
# -fopenmp: our kernels' threads come from libgomp.so.1, which torch has loaded already,
# so they are torch's own (torch.set_num_threads applies).
_FLAGS = ("-O3", "-shared", "-fPIC", "-fopenmp",
          "-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512bf16")
_P = ctypes.c_void_p
_I = ctypes.c_int64


@functools.cache
def kernels() -> ctypes.CDLL | None:
    """cpu_kernels.c, compiled on first use with the system C compiler ($CC, default cc)
    into vLLM's cache directory, keyed by source and flags. Only for CPUs that run
    bitsandbytes' AVX512-BF16 kernel. None when it cannot be built: the caller falls back
    to bitsandbytes alone (slower repack at load, fused kernel at every M)."""
    if not has_avx512bf16():
        return None
    compiler = os.environ.get("CC", "cc")
    source = _SOURCE.read_bytes()
    key = hashlib.sha256(source + " ".join((compiler, *_FLAGS)).encode()).hexdigest()[:16]
    root = Path(os.environ.get("VLLM_CACHE_ROOT", Path.home() / ".cache" / "vllm"))
    library = root / "vllm_bnb_mm" / f"cpu_kernels-{key}.so"
    if not library.exists():
        try:
            _compile(compiler, library)
        except (OSError, subprocess.SubprocessError) as e:
            detail = getattr(e, "stderr", None) or str(e)
            logger.warning(
                "vllm-bnb-mm: could not build %s with %r (%s); 4-bit layers on this CPU use "
                "bitsandbytes' fused kernel at every batch size (slower prefill) and a "
                "slower repack at load", _SOURCE.name, compiler, str(detail).strip()[-300:],
            )
            return None
    lib = ctypes.CDLL(str(library))
    lib.repack.argtypes = [_P, _P, _I, _I]
    lib.repack.restype = None
    lib.repack_inplace.argtypes = [_P, _P, _I, _I]
    lib.repack_inplace.restype = None
    lib.dequantize_t.argtypes = [_P, _P, _P, _P, _I, _I, _I, _I, _I]
    lib.dequantize_t.restype = None
    lib.gemm_4bit_avx512.argtypes = [_P, _P, _P, _P, _P, _I, _I, _I, _I]
    lib.gemm_4bit_avx512.restype = None
    if hasattr(lib, "gemm_4bit_amx"):  # compilers older than GCC 11 leave it out
        lib.gemm_4bit_amx.argtypes = [_P, _P, _P, _P, _P, _I, _I, _I, _I]
        lib.gemm_4bit_amx.restype = ctypes.c_int
    return lib


def _compile(compiler: str, library: Path) -> None:
    library.parent.mkdir(parents=True, exist_ok=True)
    tmp = library.with_suffix(f".{os.getpid()}.tmp")
    subprocess.run(
        [compiler, *_FLAGS, "-o", str(tmp), str(_SOURCE)],
        check=True, capture_output=True, text=True, timeout=120,
    )
    os.replace(tmp, library)  # atomic: concurrent workers see a whole library or none


def repack(plain: torch.Tensor, n: int, k: int) -> torch.Tensor:
    """bitsandbytes' CPU kernel layout [n, k/2] of plain packed bytes (needs kernels())."""
    plain = plain.contiguous()
    out = torch.empty(n, k // 2, dtype=torch.uint8)
    kernels().repack(plain.data_ptr(), out.data_ptr(), n, k)
    return out


def repack_inplace(buf: torch.Tensor, n: int, k: int) -> torch.Tensor:
    """`repack` over the bytes of `buf` itself (contiguous uint8, n * k / 2 of them): no
    second weight-sized buffer. Returns `buf` viewed as [n, k/2]."""
    if not buf.is_contiguous() or buf.dtype != torch.uint8 or buf.numel() != n * k // 2:
        raise ValueError(f"repack_inplace needs {n * k // 2} contiguous bytes, got {buf.shape}")
    tmp = torch.empty(32 * (k // 2), dtype=torch.uint8)
    kernels().repack_inplace(buf.data_ptr(), tmp.data_ptr(), n, k)
    return buf.view(n, k // 2)


def dequantize_t(
    kernel: torch.Tensor, scales: torch.Tensor, code: torch.Tensor, out: torch.Tensor,
    n: int, k: int, blocksize: int, rows: tuple[int, int],
) -> None:
    """Rows [a, b) of the weight (multiples of 32), transposed, into bf16 `out` [k, b - a]."""
    kernels().dequantize_t(
        kernel.data_ptr(), scales.data_ptr(), code.data_ptr(), out.data_ptr(),
        n, k, blocksize, rows[0] // 32, rows[1] // 32,
    )


# ------------------------------------------------------------- the forward


def matmul_4bit(x: torch.Tensor, weight: torch.Tensor, state: QuantState) -> torch.Tensor:
    """x [M, K] @ W^T for a weight in bitsandbytes' CPU kernel layout, on the path that is
    fastest for M tokens. bf16 activations only leave the fused kernel: the other paths
    round their output to bf16, where the fused kernel (what transformers runs) keeps a
    float32 model's activations float32."""
    n, k = state.shape
    path = forward_path(x.shape[0], k) if x.dtype == torch.bfloat16 else "fused"
    if path in ("amx", "avx512") and kernel_fits(n, k, state.blocksize):
        gemm = gemm_4bit_amx if path == "amx" else gemm_4bit_avx512
        return gemm(x, weight, state.absmax, state.code, n, k, state.blocksize)
    if path == "gemm":
        return dequantize_and_gemm(x, weight, state)
    # bitsandbytes' CPU kernel (0.50.2) takes only the row stride of x and reads each row
    # as contiguous: a transposed view (Gemma 4's audio tower passes one) gives a wrong
    # product, so hand it a contiguous copy.
    return bnb.matmul_4bit(x.contiguous(), weight, quant_state=state)


# Largest bf16 block of a weight dequantized at once (elements): 8 MiB stays in the big
# shared caches between the dequantization and the GEMM that reads it, and bounds the
# memory the GEMM path adds, whatever the layer's size (a 4-bit lm_head of a 128 k vocab
# would be 1 GiB in bf16).
SCRATCH_ELEMENTS = 4 * 2**20
_scratch = torch.empty(0, dtype=torch.bfloat16)


def dequantize_and_gemm(x: torch.Tensor, weight: torch.Tensor, state: QuantState) -> torch.Tensor:
    """Many tokens: bitsandbytes' fused kernel decodes the whole weight once per 4 of them,
    so dequantize each block of rows once into a reused scratch buffer and let oneDNN's
    bf16 GEMM (AMX where present) do the arithmetic. One buffer per process: vLLM's CPU
    worker runs one forward at a time."""
    global _scratch
    n, k = state.shape
    step = max(32, SCRATCH_ELEMENTS // k // 32 * 32)
    if _scratch.numel() < k * min(step, n):
        _scratch = torch.empty(k * min(step, n), dtype=torch.bfloat16)
    xb = x.to(torch.bfloat16)
    outs = []
    for start in range(0, n, step):
        rows = (start, min(n, start + step))
        w_t = _scratch[: k * (rows[1] - rows[0])].view(k, rows[1] - rows[0])
        dequantize_t(weight, state.absmax, state.code, w_t, n, k, state.blocksize, rows)
        outs.append(torch.matmul(xb, w_t))
    out = outs[0] if len(outs) == 1 else torch.cat(outs, dim=-1)
    return out.to(x.dtype)


def kernel_fits(n: int, k: int, blocksize: int) -> bool:
    """Our kernels' shape limits: whole 32 x 32 pieces, one scale per piece."""
    return n % 32 == 0 and k % 32 == 0 and blocksize % 32 == 0


def gemm_4bit_amx(
    x: torch.Tensor, kernel: torch.Tensor, scales: torch.Tensor, code: torch.Tensor,
    n: int, k: int, blocksize: int,
) -> torch.Tensor:
    """x [M, k] (bf16) @ W^T from the kernel layout, as bf16 [M, n] (needs amx_usable())."""
    request_amx_tile_state()
    out, failed = _run_gemm(kernels().gemm_4bit_amx, x, kernel, scales, code, n, k, blocksize)
    if failed:
        raise MemoryError("gemm_4bit_amx: no work buffer (1-8 blocks of 64 x k bytes)")
    return out


def gemm_4bit_avx512(
    x: torch.Tensor, kernel: torch.Tensor, scales: torch.Tensor, code: torch.Tensor,
    n: int, k: int, blocksize: int,
) -> torch.Tensor:
    """x [M, k] (bf16) @ W^T from the kernel layout, as bf16 [M, n], with AVX512-BF16 dot
    products (needs kernels(); the same shape limits as the AMX kernel)."""
    return _run_gemm(kernels().gemm_4bit_avx512, x, kernel, scales, code, n, k, blocksize)[0]


def _run_gemm(fn, x, kernel, scales, code, n: int, k: int, blocksize: int):
    """Call one of our C GEMMs on a contiguous x into a fresh bf16 [M, n]; (out, its
    return value)."""
    x = x.contiguous()
    out = torch.empty(x.shape[0], n, dtype=torch.bfloat16)
    ret = fn(x.data_ptr(), kernel.data_ptr(), scales.data_ptr(), code.data_ptr(),
             out.data_ptr(), x.shape[0], n, k, blocksize)
    return out, ret
