"""Intel CPUs with AMX: Linux grants the AMX tile state only to a process that asks.

With every linear in bitsandbytes' 4-bit kernel, vLLM's AMX attention kernel is the first
AMX user of the engine process; unless the plugin asked first, it dies with SIGILL on its
first forward (bf16 only: float32 attention does not use AMX).
"""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from engines import run_llm
from parity import assert_matches, load_reference

HAS_AMX = torch.cpu._is_amx_tile_supported()

# bf16 on both sides, summation order differs (measured up to 0.06 on this checkpoint).
TOL_BF16 = 0.15

_PERMISSION = """
import ctypes, sys
libc = ctypes.CDLL(None, use_errno=True)
def granted():
    mask = ctypes.c_uint64(0)
    assert libc.syscall(158, 0x1022, ctypes.byref(mask)) == 0  # ARCH_GET_XCOMP_PERM
    return bool(mask.value & (1 << 18))  # XFEATURE_XTILEDATA
before = granted()
{action}
print(before, granted())
"""


def _tile_permission(action: str) -> tuple[bool, bool]:
    out = subprocess.run(
        [sys.executable, "-c", _PERMISSION.format(action=action)],
        capture_output=True, text=True, check=True,
    ).stdout.split()
    return out[-2] == "True", out[-1] == "True"


@pytest.mark.skipif(not HAS_AMX, reason="this CPU has no AMX (amx_tile): nothing to request")
def test_request_amx_tile_state_grants_the_permission():
    # A fresh process has no AMX permission; the request (made by every BnB layer loaded
    # on the CPU, see BnbLinearMethod.process_weights_after_loading) grants it.
    assert _tile_permission("") == (False, False)
    load = (
        "from vllm_bnb_mm.cpu import request_amx_tile_state\n"
        "request_amx_tile_state(); request_amx_tile_state()"
    )
    assert _tile_permission(load) == (False, True)


def test_bf16_engine_on_an_all_4bit_checkpoint_answers_like_hf(tiny):
    """On an AMX machine this engine died with `Illegal instruction` before the fix.
    vLLM's default processes (the model runs in a worker process of its own), as users run it."""
    ckpt = tiny["llama-nf4-dq"]
    ref = load_reference(ckpt)
    expected = ref["references"]["bfloat16"]
    got = run_llm(
        str(ckpt), [expected[c["name"]]["prompt_token_ids"] for c in ref["cases"]],
        load_format="bitsandbytes", dtype="bfloat16", multiprocess=True,
    )
    for case, result in zip(ref["cases"], got, strict=True):
        assert_matches(result, expected[case["name"]], TOL_BF16, f"bf16/{case['name']}")

