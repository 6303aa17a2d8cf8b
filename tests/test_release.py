"""The release: the wheel and sdist build and pass `twine check`; the built wheel installs
into a fresh venv beside vLLM with the very script the GPU image runs
(docker/install_plugin.sh) and registers; both Dockerfiles pass hadolint and use the pins
we test."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import bitsandbytes
import pytest

import vllm_bnb_mm

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent


def _run(cmd: list[str], timeout: float = 900, **kwargs) -> subprocess.CompletedProcess:
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, **kwargs)
    assert result.returncode == 0, f"{cmd}\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    return result


@pytest.fixture(scope="module")
def dist(tmp_path_factory) -> Path:
    """`python -m build` on a copy of the checkout (the build writes egg-info beside it)."""
    src = tmp_path_factory.mktemp("src")
    for name in ("pyproject.toml", "README.md", "CHANGELOG.md"):
        shutil.copy2(ROOT / name, src / name)
    shutil.copytree(ROOT / "vllm_bnb_mm", src / "vllm_bnb_mm",
                    ignore=shutil.ignore_patterns("__pycache__"))
    out = tmp_path_factory.mktemp("dist")
    _run([sys.executable, "-m", "build", "--outdir", str(out), str(src)])
    return out


def test_wheel_and_sdist_build_and_pass_twine_check(dist):
    version = vllm_bnb_mm.__version__
    built = sorted(p.name for p in dist.iterdir())
    assert built == [f"vllm_bnb_mm-{version}-py3-none-any.whl", f"vllm_bnb_mm-{version}.tar.gz"]
    result = _run([str(BIN / "twine"), "check", "--strict", *map(str, dist.iterdir())])
    assert result.stdout.count("PASSED") == 2, result.stdout


def test_changelog_has_the_release():
    text = (ROOT / "CHANGELOG.md").read_text()
    assert re.search(rf"^## {re.escape(vllm_bnb_mm.__version__)}\b", text, re.M), text[:500]


def test_built_wheel_installs_beside_vllm_and_registers(dist, tmp_path):
    """A fresh venv with vLLM's stack (setup_env.sh's pins, without this checkout), then
    the GPU image's install script on the built wheel, run from outside the checkout so
    nothing can come from the editable install."""
    venv = tmp_path / "venv"
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    _run(["bash", str(ROOT / "scripts" / "setup_env.sh")], cwd=ROOT,
         env={**env, "VENV": str(venv), "STACK_ONLY": "1"})
    wheel = next(dist.glob("*.whl"))
    result = _run(["bash", str(ROOT / "docker" / "install_plugin.sh"), str(wheel)],
                  cwd=tmp_path, env={**env, "PYTHON": str(venv / "bin" / "python")})
    assert f"vllm-bnb-mm {vllm_bnb_mm.__version__} installed" in result.stdout, result.stdout
    assert "loads vllm-bnb-mm: BnbConfig BnbModelLoader" in result.stdout, result.stdout
    where = _run([str(venv / "bin" / "python"), "-c",
                  "import vllm_bnb_mm; print(vllm_bnb_mm.__file__)"], cwd=tmp_path, env=env)
    assert where.stdout.startswith(str(venv)), where.stdout
    version = _run([str(venv / "bin" / "vllm-bnb-mm"), "--version"], cwd=tmp_path, env=env)
    assert version.stdout.strip() == f"vllm-bnb-mm {vllm_bnb_mm.__version__}"


def test_dockerfiles_pass_hadolint():
    _run([str(BIN / "hadolint"), str(ROOT / "docker" / "Dockerfile"),
          str(ROOT / "docker" / "Dockerfile.cpu")])


def test_gpu_image_is_a_tested_vllm_with_our_install_script():
    from vllm_bnb_mm import is_tested_vllm

    text = (ROOT / "docker" / "Dockerfile").read_text()
    bases = re.findall(r"^FROM\s+(\S+)", text, re.M)
    final = bases[-1]
    match = re.fullmatch(r"vllm/vllm-openai:v(\d+\.\d+\.\d+)", final)
    assert match and is_tested_vllm(match.group(1)), final
    assert re.search(r"^RUN .*bash /tmp/install_plugin\.sh /tmp/dist/vllm_bnb_mm-\*\.whl", text,
                     re.M)
    assert not re.search(r"^(ENTRYPOINT|CMD)\b", text, re.M)  # vLLM's own entrypoint
    script = (ROOT / "docker" / "install_plugin.sh").read_text()
    assert f"BITSANDBYTES_VERSION={bitsandbytes.__version__}" in script  # the one we test


def test_cpu_image_is_the_test_stack_serving_the_demo_model():
    text = (ROOT / "docker" / "Dockerfile.cpu").read_text()
    base = re.search(r"^FROM\s+python:(\d+\.\d+)-", text, re.M)
    assert base and base.group(1) == f"{sys.version_info.major}.{sys.version_info.minor}"
    assert "RUN bash scripts/setup_env.sh" in text
    assert "build_tiny_checkpoints.py gemma4-nf4-dq" in text
    assert '"--model", ".cache/tiny/gemma4-nf4-dq", "--load-format", "bitsandbytes"' in text
