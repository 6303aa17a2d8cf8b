"""Tiny checkpoints, built once per machine by scripts/build_tiny_checkpoints.py."""

from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def tiny() -> dict[str, Path]:
    from build_tiny_checkpoints import build

    return build()
