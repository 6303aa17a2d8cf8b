"""Run our unit tests against a vLLM release's Python code, without its CUDA stack.

    .venv/bin/python scripts/check_vllm_release.py 0.33.0 [--dir DIR] [-- PYTEST ARGS]

1. Downloads the ``vllm==VERSION`` wheel (no dependencies) and reads the torch and
   torchvision it pins.
2. Installs into a target directory (default ``.cache/vllm-release/VERSION``): that wheel
   with ``--no-deps``, the pinned torch + torchvision (with their own dependencies), and
   every other requirement of that vLLM which this environment does not satisfy.
3. Runs ``pytest tests`` with that directory first on ``PYTHONPATH``,
   ``VLLM_TARGET_DEVICE=cpu`` (vLLM's CPU platform; the CUDA wheel's compiled ops never
   load) and ``VLLM_BNB_MM_NO_ENGINES=1`` (every test that would start an engine skips:
   there are no CPU kernels in a CUDA wheel). Everything else runs: the checkpoint,
   quant-state, config, linear-layer, loader, sharding, registration and inspect tests,
   including the model classes built on the meta device.

Exit status: pytest's. The last line says which vLLM and torch were imported.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import zipfile
from importlib import metadata
from pathlib import Path

from packaging.requirements import Requirement

ROOT = Path(__file__).resolve().parent.parent
UV = [sys.executable, "-m", "uv", "pip"]
# Installed with the torch pins or not needed by unit tests (audio/video decoding).
SKIP = {"torch", "torchvision", "torchaudio", "torchcodec"}
# The CUDA stack: GPU kernels and their compilers, never imported on the CPU platform.
CUDA_STACK = re.compile(
    r"^(nvidia-|flashinfer|tilelang|apache-tvm-ffi|nvtx|pynvvideocodec|quack-kernels|"
    r"tokenspeed|humming-kernels|fastsafetensors|instanttensor|cupy|triton|deep-gemm|"
    r"xformers)", re.IGNORECASE,
)


def log(msg: str) -> None:
    print(f"[check-vllm] {msg}", flush=True)


def download_wheel(version: str, into: Path) -> Path:
    found = sorted(into.glob(f"vllm-{version}-*.whl"))
    if not found:
        subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps",
                        "--only-binary", ":all:", "-d", str(into), f"vllm=={version}"],
                       check=True)
        found = sorted(into.glob(f"vllm-{version}-*.whl"))
    return found[0]


def requirements(wheel: Path) -> list[Requirement]:
    with zipfile.ZipFile(wheel) as z:
        name = next(n for n in z.namelist() if n.endswith(".dist-info/METADATA"))
        text = z.read(name).decode()
    reqs = [Requirement(line.split(":", 1)[1].strip())
            for line in text.splitlines() if line.startswith("Requires-Dist:")]
    return [r for r in reqs if r.marker is None or r.marker.evaluate({"extra": ""})]


def pinned(reqs: list[Requirement], name: str) -> str:
    req = next(r for r in reqs if r.name == name)
    match = re.fullmatch(r"==([\w.+]+)", str(req.specifier))
    if not match:
        raise SystemExit(f"vLLM does not pin {name} exactly ({req}); pass a torch yourself")
    return f"{name}=={match.group(1)}"


def unsatisfied(reqs: list[Requirement]) -> list[str]:
    """Requirements this environment does not meet (they go into the target dir)."""
    missing = []
    for req in reqs:
        if req.name in SKIP or CUDA_STACK.match(req.name):
            continue
        try:
            installed = metadata.version(req.name)
        except metadata.PackageNotFoundError:
            missing.append(str(req))
            continue
        if installed not in req.specifier:
            missing.append(str(req))
    return missing


def install(target: Path, wheel: Path, reqs: list[Requirement]) -> None:
    stamp = target / ".complete"
    if stamp.exists() and stamp.read_text() == wheel.name:
        log(f"reusing {target}")
        return
    env = {**os.environ, "VLLM_TARGET_DEVICE": "cpu"}
    torch_pins = [pinned(reqs, "torch"), pinned(reqs, "torchvision")]
    extra = unsatisfied(reqs)
    log(f"installing {wheel.name} (no deps), {' '.join(torch_pins)}"
        + (f" and {len(extra)} unmet requirement(s): {' '.join(extra)}" if extra else ""))
    subprocess.run([*UV, "install", "-q", "--target", str(target), "--no-deps", str(wheel)],
                   check=True, env=env)
    subprocess.run([*UV, "install", "-q", "--target", str(target), *torch_pins, *extra],
                   check=True, env=env)
    stamp.write_text(wheel.name)


def run_tests(target: Path, pytest_args: list[str]) -> int:
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(target), str(ROOT)]),
        "VLLM_TARGET_DEVICE": "cpu",
        "VLLM_BNB_MM_NO_ENGINES": "1",
        "HF_HUB_OFFLINE": "1",
    }
    probe = ("import vllm, torch, vllm_bnb_mm; print('vllm', vllm.__version__, 'from', "
             "vllm.__file__, '| torch', torch.__version__)")
    subprocess.run([sys.executable, "-c", probe], env=env, check=True)
    # test_release builds its own vLLM 0.32 venv: nothing there depends on the release.
    args = pytest_args or ["-q", "-rs", "-p", "no:cacheprovider", "tests",
                           "--ignore=tests/test_release.py"]
    result = subprocess.run([sys.executable, "-m", "pytest", *args], env=env, cwd=ROOT)
    subprocess.run([sys.executable, "-c", probe], env=env)
    return result.returncode


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("version", help="a vLLM release on PyPI, e.g. 0.33.0")
    parser.add_argument("--dir", type=Path, help="target dir (default .cache/vllm-release/V)")
    parser.add_argument("pytest_args", nargs=argparse.REMAINDER,
                        help="after --: pytest arguments (default: -q -rs tests)")
    args = parser.parse_args(argv)
    target = args.dir or ROOT / ".cache" / "vllm-release" / args.version
    target.mkdir(parents=True, exist_ok=True)
    wheels = target.parent / "wheels"
    wheels.mkdir(exist_ok=True)
    wheel = download_wheel(args.version, wheels)
    install(target, wheel, requirements(wheel))
    return run_tests(target, [a for a in args.pytest_args if a != "--"])


if __name__ == "__main__":
    sys.exit(main())
