#!/usr/bin/env bash
# Optional: pre-installs what scripts/bench.py needs beyond the dev env (.venv from
# scripts/setup_env.sh). bench.py installs the incumbent and py-spy itself when missing.
#   - matplotlib, psutil: chart and RSS sampling (the `bench` extra)
#   - py-spy: --profile
#   - vllm-bnb-plugin (the incumbent) with --no-deps into .cache/bench/incumbent, a scratch
#     dir put on PYTHONPATH only for the incumbent's runs (its entry point is found there).
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
"$VENV/bin/python" -m pip install -q matplotlib psutil py-spy
"$VENV/bin/python" -m pip install -q --no-deps --upgrade --target .cache/bench/incumbent \
  "vllm-bnb-plugin==0.0.3"
"$VENV/bin/python" -c "import matplotlib, psutil; print('bench env ok')"
