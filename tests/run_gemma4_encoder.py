"""Gemma 4's encoder-CUDA-graph vision path vs its eager path, inside a real engine.

Run by test_gemma4_adapter.py in a subprocess: `python run_gemma4_encoder.py CKPT`
prints {"adapted": max|graph - eager|, "unadapted": same without our adapter, "scale": …}.
The graph path runs fine on CPU when called directly; it is what GPUs use by default.
"""

from __future__ import annotations

import functools
import json
import os
import sys


def compare_paths(model, pixel_values, position_ids):
    import torch

    dtype = next(model.language_model.parameters()).dtype
    real = (position_ids[0] != -1).all(dim=-1)  # vLLM hands the model unpadded patches
    mm_kwargs = {
        "pixel_values": [pixel_values[0][real].to(dtype)],
        "pixel_position_ids": [position_ids[0][real]],
    }
    with torch.no_grad():
        eager = model.encoder_eager_forward(mm_kwargs).float()
        buffers = model.prepare_encoder_cudagraph_replay_buffers(mm_kwargs)
        adapted = model.encoder_cudagraph_forward(buffers.values).float()
        original = type(model).encoder_cudagraph_forward.__wrapped__
        unadapted = original(model, buffers.values).float()
    return {
        "adapted": (adapted - eager).abs().max().item(),
        "unadapted": (unadapted - eager).abs().max().item(),
        "scale": eager.abs().max().item(),
        "weight_dtype": str(model.embed_vision.embedding_projection.weight.dtype),
    }


def main() -> None:
    from PIL import Image
    from transformers import AutoProcessor
    from vllm import LLM

    ckpt = sys.argv[1]
    processor = AutoProcessor.from_pretrained(ckpt)
    image = Image.open(f"{ckpt}/red.png").convert("RGB")
    pixels = processor.image_processor(images=[image], return_tensors="pt")
    llm = LLM(
        model=ckpt, load_format="bitsandbytes", dtype="bfloat16", max_model_len=512,
        max_num_seqs=2, enforce_eager=True, limit_mm_per_prompt={"image": 1, "video": 0},
    )
    # A function of an importable module (tests/ is on PYTHONPATH): the workers unpickle it.
    import run_gemma4_encoder

    run = functools.partial(
        run_gemma4_encoder.compare_paths,
        pixel_values=pixels["pixel_values"], position_ids=pixels["image_position_ids"],
    )
    [result] = llm.apply_model(run)
    print(json.dumps({"encoder": result}), flush=True)


if __name__ == "__main__":
    main()
    os._exit(0)  # the answer is out; vLLM's shutdown adds seconds and nothing under test
