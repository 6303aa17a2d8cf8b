"""Time `vllm-bnb-mm inspect` on a multi-GB checkpoint.

    .venv/bin/python scripts/bench_inspect.py [--out DIR]

Builds once (cached in ``.cache/bench/inspect-llama8b``) a Llama-3-8B-shaped nf4 +
double-quant checkpoint, 5.7 GB in 4 shards: each layer's tensors are those
bitsandbytes writes (``QuantState.as_dict(packed=True)``, what transformers saves), from
one quantized random layer reused for all 32 (quantizing 8 B random values would take
many minutes on 2 cores, and inspect never reads the packed bytes anyway). Then runs
`inspect --no-vllm` and `inspect` (with vLLM's model class) and prints both times.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_OUT = ROOT / ".cache" / "bench" / "inspect-llama8b"
HIDDEN, INTER, LAYERS, HEADS, KV, HEAD_DIM, VOCAB = 4096, 14336, 32, 32, 8, 128, 128256
SHAPES = {
    "self_attn.q_proj": (HEADS * HEAD_DIM, HIDDEN), "self_attn.k_proj": (KV * HEAD_DIM, HIDDEN),
    "self_attn.v_proj": (KV * HEAD_DIM, HIDDEN), "self_attn.o_proj": (HIDDEN, HEADS * HEAD_DIM),
    "mlp.gate_proj": (INTER, HIDDEN), "mlp.up_proj": (INTER, HIDDEN),
    "mlp.down_proj": (HIDDEN, INTER),
}
SHARDS = 4


def build(out: Path) -> None:
    import torch
    from bitsandbytes import functional as bnbf
    from safetensors.torch import save_file

    if (out / "config.json").exists():
        return
    out.mkdir(parents=True, exist_ok=True)
    gen = torch.Generator().manual_seed(0)
    layer = {}
    for name, shape in SHAPES.items():
        weight = (torch.randn(shape, generator=gen) / shape[1] ** 0.5).to(torch.bfloat16)
        packed, state = bnbf.quantize_4bit(weight, quant_type="nf4", compress_statistics=True)
        layer[name] = {"weight": packed, **{f"weight.{k}": v
                                            for k, v in state.as_dict(packed=True).items()}}
    weight_map = {}
    per_shard = -(-LAYERS // SHARDS)
    for shard in range(SHARDS):
        tensors = {}
        if shard == 0:
            tensors["model.embed_tokens.weight"] = torch.zeros(VOCAB, HIDDEN, dtype=torch.bfloat16)
        if shard == SHARDS - 1:
            tensors["model.norm.weight"] = torch.ones(HIDDEN, dtype=torch.bfloat16)
            tensors["lm_head.weight"] = torch.zeros(VOCAB, HIDDEN, dtype=torch.bfloat16)
        for i in range(shard * per_shard, min(LAYERS, (shard + 1) * per_shard)):
            prefix = f"model.layers.{i}"
            for norm in ("input_layernorm", "post_attention_layernorm"):
                tensors[f"{prefix}.{norm}.weight"] = torch.ones(HIDDEN, dtype=torch.bfloat16)
            for module, parts in layer.items():
                for key, value in parts.items():
                    tensors[f"{prefix}.{module}.{key}"] = value.clone()
        file = f"model-{shard + 1:05d}-of-{SHARDS:05d}.safetensors"
        save_file(tensors, str(out / file), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(tensors, file))
    (out / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {}, "weight_map": weight_map}))
    (out / "config.json").write_text(json.dumps({
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": HIDDEN,
        "intermediate_size": INTER, "num_hidden_layers": LAYERS, "num_attention_heads": HEADS,
        "num_key_value_heads": KV, "head_dim": HEAD_DIM, "vocab_size": VOCAB,
        "max_position_embeddings": 8192, "rms_norm_eps": 1e-5, "rope_theta": 500000.0,
        "tie_word_embeddings": False, "dtype": "bfloat16", "bos_token_id": 1,
        "eos_token_id": 2,
        "quantization_config": {
            "quant_method": "bitsandbytes", "load_in_4bit": True, "load_in_8bit": False,
            "bnb_4bit_quant_type": "nf4", "bnb_4bit_use_double_quant": True,
            "bnb_4bit_compute_dtype": "bfloat16", "bnb_4bit_quant_storage": "uint8",
        },
    }, indent=1))


def timed(args: list[str]) -> float:
    start = time.monotonic()
    result = subprocess.run([sys.executable, "-m", "vllm_bnb_mm.cli", *args],
                            capture_output=True, text=True)
    seconds = time.monotonic() - start
    if result.returncode not in (0, 1):
        raise SystemExit(result.stderr[-3000:])
    report = json.loads(result.stdout)
    print(f"  {' '.join(args[2:]) or '(default)':12} exit {result.returncode}, "
          f"{seconds:.1f} s wall ({report['seconds']:.2f} s inside inspect), weights as "
          f"loaded {report['loaded_bytes_total'] / 2**30:.2f} GiB")
    return seconds


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = parser.parse_args()
    start = time.monotonic()
    build(args.out)
    size = sum(f.stat().st_size for f in args.out.glob("*.safetensors"))
    print(f"checkpoint {args.out}: {size / 1e9:.2f} GB ({time.monotonic() - start:.0f} s)")
    timed(["inspect", str(args.out), "--json", "--no-vllm"])
    timed(["inspect", str(args.out), "--json"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
