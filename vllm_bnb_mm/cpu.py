"""CPU platform facts the BnB forward depends on, and the C routines it builds for them."""

from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import os
import subprocess
from pathlib import Path

import torch

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


# ------------------------------------------------------------- fused kernel vs GEMM

# Tokens in a step (M) from which dequantize + bf16 GEMM beats bitsandbytes' fused 4-bit
# kernel. The fused kernel decodes the whole weight again for every 4 rows of activations,
# so its cost grows linearly with M (~0.25 ms per row for 6144 x 1536, one thread); the
# GEMM path pays one dequantization (~4x the fused kernel's cost at M = 1) and then
# oneDNN's GEMM. Both scale with the weight's size, so the crossover depends on the ISA
# oneDNN runs, not on the shape. Measured with scripts/cpu_crossover.py (one thread, min
# over repetitions, four shapes; results/bench/crossover.json, notes/performance.md):
# - AMX: the GEMM is nearly flat up to M ~ 64; the paths cross at M = 16-20.
# - AVX512-BF16 without AMX (oneDNN capped at AVX512_CORE_BF16): oneDNN's bf16 GEMM runs
#   at ~0.2 ms per row, about the fused kernel's rate, so the dequantization only pays
#   back from M ~ 256 (and wins by up to 25 % at 512).
GEMM_MIN_TOKENS_AMX = 16
GEMM_MIN_TOKENS_AVX512 = 256


@functools.cache
def gemm_min_tokens() -> int:
    """The crossover for this process: oneDNN uses AMX unless the CPU lacks it or
    ONEDNN_MAX_CPU_ISA caps it below (e.g. AVX512_CORE_BF16)."""
    cap = os.environ.get("ONEDNN_MAX_CPU_ISA", os.environ.get("DNNL_MAX_CPU_ISA", "ALL"))
    uncapped = cap.upper() in ("ALL", "DEFAULT") or "AMX" in cap.upper()
    amx = torch.cpu._is_amx_tile_supported() and uncapped
    return GEMM_MIN_TOKENS_AMX if amx else GEMM_MIN_TOKENS_AVX512


# ------------------------------------------------------------- C routines

_SOURCE = Path(__file__).with_name("cpu_kernels.c")
_FLAGS = ("-O3", "-shared", "-fPIC", "-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512bf16")
_P = ctypes.c_void_p
_I = ctypes.c_int64


@functools.cache
def kernels() -> ctypes.CDLL | None:
    """cpu_kernels.c, compiled on first use with the system C compiler ($CC, default cc)
    into vLLM's cache directory, keyed by source and flags. Only for CPUs that run
    bitsandbytes' AVX512-BF16 kernel. None when it cannot be built: the caller falls back
    to bitsandbytes alone (slower repack at load, fused kernel at every M)."""
    from bitsandbytes.functional import has_avx512bf16

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
