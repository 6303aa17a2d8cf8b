"""register() is idempotent, and vllm-bnb-mm deterministically wins over the incumbent
vllm-bnb-plugin when both are installed, in either registration order."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
INCUMBENT = ROOT / ".cache" / "incumbent"


@pytest.fixture(scope="module")
def incumbent_path() -> Path:
    if not (INCUMBENT / "vllm_bnb_plugin").is_dir():
        subprocess.run(
            [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target",
             str(INCUMBENT), "vllm-bnb-plugin==0.0.3"],
            check=True,
        )
    return INCUMBENT


def _run(code: str, pythonpath: Path | None = None) -> subprocess.CompletedProcess:
    env = {"PYTHONPATH": str(pythonpath)} if pythonpath else {}
    import os

    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True,
        env={**os.environ, **env}, timeout=300,
    )


WHO_WINS = """
from vllm.model_executor.layers.quantization import get_quantization_config
from vllm.model_executor.model_loader import get_model_loader
from vllm.config.load import LoadConfig
cfg = get_quantization_config("bitsandbytes")
loader = type(get_model_loader(LoadConfig(load_format="bitsandbytes")))
print("WINNER", cfg.__module__, loader.__module__)
"""


def test_vllm_loads_the_plugin_through_its_entry_point():
    result = _run("from vllm.plugins import load_general_plugins\nload_general_plugins()\n"
                  + WHO_WINS)
    assert "WINNER vllm_bnb_mm.config vllm_bnb_mm.loader" in result.stdout, result.stderr


def test_register_is_idempotent():
    result = _run("""
        import vllm_bnb_mm
        from vllm.model_executor.layers.quantization import QUANTIZATION_METHODS
        for _ in range(3):
            vllm_bnb_mm.register()
        print("COUNT", QUANTIZATION_METHODS.count("bitsandbytes"))
    """)
    assert "COUNT 1" in result.stdout, result.stderr
    assert "is tested with vLLM" not in result.stderr  # the installed vLLM is a tested one


def test_register_warns_once_on_an_untested_vllm():
    result = _run("""
        import vllm, vllm_bnb_mm
        vllm.__version__ = "0.31.2"
        for _ in range(3):
            vllm_bnb_mm.register()
    """)
    warnings = [line for line in result.stderr.splitlines() if "is tested with vLLM" in line]
    assert result.returncode == 0, result.stderr
    assert len(warnings) == 1 and "this is vLLM 0.31.2" in warnings[0], result.stderr


@pytest.mark.parametrize("version, tested", [
    ("0.31.2", False), ("0.32.0", True), ("0.33.0", True), ("0.33.1.dev4+g1234abc", True),
    ("0.34.0rc1", False), ("0.34.0", False), ("1.0.0", False), ("dev", False),
])
def test_tested_vllm_range(version, tested):
    from vllm_bnb_mm import is_tested_vllm

    assert is_tested_vllm(version) is tested


@pytest.mark.parametrize("order", ["incumbent_first", "ours_first"])
def test_ours_wins_over_the_incumbent_in_either_order(incumbent_path, order):
    calls = ["vllm_bnb_plugin.register()", "vllm_bnb_mm.register()"]
    if order == "ours_first":
        calls.reverse()
    result = _run(
        "import vllm_bnb_plugin, vllm_bnb_mm\n" + "\n".join(calls) + "\n" + WHO_WINS,
        pythonpath=incumbent_path,
    )
    assert "WINNER vllm_bnb_mm.config vllm_bnb_mm.loader" in result.stdout, result.stderr
    notices = [line for line in result.stderr.splitlines() if "vllm-bnb-plugin is also" in line]
    assert len(notices) == 1, result.stderr


def test_entry_point_discovery_with_both_installed(incumbent_path):
    result = _run("from vllm.plugins import load_general_plugins\nload_general_plugins()\n"
                  + WHO_WINS, pythonpath=incumbent_path)
    assert "WINNER vllm_bnb_mm.config vllm_bnb_mm.loader" in result.stdout, result.stderr
