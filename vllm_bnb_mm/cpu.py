"""CPU platform facts the BnB forward depends on."""

from __future__ import annotations

import torch

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
