"""The Gemma 4 adapter: vision features must reach the LM in the compute dtype.

vLLM's encoder-CUDA-graph path casts pooled vision features to the projection weight's
dtype, uint8 under BnB. Inside a real engine on the all-quantized checkpoint, the
adapted graph path must equal the eager path, while the unadapted one (the bug) does not.
"""

from __future__ import annotations

import json
import subprocess
import sys

from engines import HERE, engine_env


def test_encoder_graph_path_keeps_vision_features_in_compute_dtype(tiny):
    proc = subprocess.run(
        [sys.executable, str(HERE / "run_gemma4_encoder.py"), str(tiny["gemma4-nf4-dq"])],
        capture_output=True, text=True, timeout=900,
        # One process: the model runs beside this script (see engines._run_llm_spec).
        env=engine_env(
            VLLM_ALLOW_INSECURE_SERIALIZATION="1", PYTHONPATH=str(HERE),
            VLLM_ENABLE_V1_MULTIPROCESSING="0",
        ),
    )
    lines = [x for x in proc.stdout.splitlines() if x.startswith('{"encoder"')]
    assert lines, proc.stderr[-6000:]
    result = json.loads(lines[-1])["encoder"]
    assert result["weight_dtype"] == "torch.uint8"  # the projection really is packed
    assert result["adapted"] <= 0.02 * result["scale"], result
    assert result["unadapted"] > 0.2 * result["scale"], result
