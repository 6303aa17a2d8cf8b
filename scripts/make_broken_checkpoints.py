"""Broken copies of a good tiny BnB checkpoint: one per way a checkpoint can be wrong.

Usage::

    .venv/bin/python scripts/make_broken_checkpoints.py [--out DIR] [CASE ...]

Each case becomes ``DIR/CASE/`` (default ``.cache/broken/CASE``, never committed): the
source checkpoint's config, tokenizer and other files copied, its ``model.safetensors``
rewritten with one defect (or ``config.json`` edited, or the weights pickled). Sources
are the tiny checkpoints of ``build_tiny_checkpoints.py``: ``llama-nf4-dq`` (4-bit,
double quant) and ``llama-int8`` where a case needs 8-bit. Most cases break one tensor,
``model.layers.0.self_attn.q_proj.weight`` (``WEIGHT``). Tests use ``CASES`` and
``make(case, out)``.
"""

from __future__ import annotations

import argparse
import json
import shutil
import struct
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from bitsandbytes import functional as bnbf
from bitsandbytes.functional import QuantState
from safetensors.torch import load_file, save_file

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_OUT = ROOT / ".cache" / "broken"
DEFAULT_SOURCES = {
    "4bit": ROOT / ".cache" / "tiny" / "llama-nf4-dq",
    "8bit": ROOT / ".cache" / "tiny" / "llama-int8",
}
WEIGHTS_FILE = "model.safetensors"
MODULE = "model.layers.0.self_attn.q_proj"
WEIGHT = MODULE + ".weight"
STATE_JSON = WEIGHT + ".quant_state.bitsandbytes__nf4"
UNKNOWN_MODULE = "model.layers.0.mlp.extra_proj"

Tensors = dict[str, torch.Tensor]


@dataclass(frozen=True)
class Case:
    name: str
    source: str  # "4bit" | "8bit": which tiny checkpoint it starts from
    what: str  # the defect, in words
    loads: bool = False  # True: the documented behaviour is to load (with a warning)
    needs_model: bool = False  # only the built model can tell (no pre-model check can)
    tensors: Callable[[Tensors], Tensors] | None = None
    raw: Callable[[bytes], bytes] | None = None  # rewrites the file's bytes
    config: Callable[[dict], None] | None = None  # edits quantization_config in place
    pickle: bool = False  # weights written as pytorch_model.bin instead


# ------------------------------------------------------------ tensor edits


def _meta(t: Tensors, key: str = STATE_JSON) -> dict:
    return json.loads(bytes(t[key].numpy()).decode())


def _json_bytes(payload: bytes) -> torch.Tensor:
    return torch.frombuffer(bytearray(payload), dtype=torch.uint8).clone()


def _set_meta(t: Tensors, meta: dict, key: str = STATE_JSON) -> Tensors:
    t[key] = _json_bytes(json.dumps(meta).encode())
    return t


def _edit_meta(**changes) -> Callable[[Tensors], Tensors]:
    def edit(t: Tensors) -> Tensors:
        return _set_meta(t, {**_meta(t), **changes})

    return edit


def _drop(*names: str) -> Callable[[Tensors], Tensors]:
    def edit(t: Tensors) -> Tensors:
        for name in names:
            del t[name]
        return t

    return edit


def _malformed_json(t: Tensors) -> Tensors:
    t[STATE_JSON] = _json_bytes(b'{"quant_type": "nf4", "blocksize": 64, "shape": [64, 6')
    return t


def _unknown_quant_type(t: Tensors) -> Tensors:
    meta = {**_meta(t), "quant_type": "nf3"}
    del t[STATE_JSON]
    return _set_meta(t, meta, WEIGHT + ".quant_state.bitsandbytes__nf3")


def _extra_module(t: Tensors) -> Tensors:
    # A packed weight and full quant state for a module the Llama model does not have.
    for name in [n for n in t if n.startswith(WEIGHT)]:
        t[UNKNOWN_MODULE + name.removeprefix(MODULE)] = t[name].clone()
    return t


def _bf16_storage(t: Tensors) -> Tensors:
    # bnb_4bit_quant_storage=bfloat16: the same bytes, labelled BF16.
    t[WEIGHT] = t[WEIGHT].reshape(-1).view(torch.bfloat16).reshape(-1, 1).clone()
    return t


def _bf16_cast_packed(t: Tensors) -> Tensors:
    # The packed byte values converted to bf16 numbers (a careless `.to(bfloat16)` over a
    # state dict): twice the bytes, none of them the packed nibbles any more.
    t[WEIGHT] = t[WEIGHT].to(torch.bfloat16)
    return t


def _flatten_absmax(t: Tensors, name: str) -> torch.Tensor:
    """float32 absmax of a double-quantized weight, dequantized with bitsandbytes."""
    meta = _meta(t, f"{name}.quant_state.bitsandbytes__nf4")
    nested = QuantState(
        absmax=t[f"{name}.nested_absmax"], code=t[f"{name}.nested_quant_map"],
        blocksize=meta["nested_blocksize"], dtype=torch.float32,
    )
    absmax = bnbf.dequantize_blockwise(t[f"{name}.absmax"], nested)
    return absmax.float() + torch.tensor(meta["nested_offset"], dtype=torch.float32)


def _fp16_absmax(scale_weight: float = 1.0) -> Callable[[Tensors], Tensors]:
    """Every 4-bit weight without double quant, absmax cast to float16 (as a careless
    `state_dict` conversion would). `scale_weight` > 65504/max(absmax) makes WEIGHT's
    absmax overflow to inf."""

    def edit(t: Tensors) -> Tensors:
        for key in [k for k in t if k.endswith(".quant_state.bitsandbytes__nf4")]:
            name = key.removesuffix(".quant_state.bitsandbytes__nf4")
            absmax = _flatten_absmax(t, name)
            if name == WEIGHT:
                absmax = absmax * scale_weight
            t[f"{name}.absmax"] = absmax.half()
            del t[f"{name}.nested_absmax"], t[f"{name}.nested_quant_map"]
            meta = _meta(t, key)
            for k in ("nested_blocksize", "nested_dtype", "nested_offset"):
                meta.pop(k, None)
            _set_meta(t, meta, key)
        return t

    return edit


# ------------------------------------------------------------ raw file edits


def _split(data: bytes) -> tuple[dict, bytes]:
    (n,) = struct.unpack("<Q", data[:8])
    return json.loads(data[8 : 8 + n]), data[8 + n :]


def _join(header: dict, body: bytes) -> bytes:
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # safetensors pads the header with spaces
    return struct.pack("<Q", len(raw)) + raw + body


def _truncate(data: bytes) -> bytes:
    header, body = _split(data)
    return data[: len(data) - len(body) // 2]


def _lying_header(data: bytes) -> bytes:
    header, body = _split(data)
    rows, cols = header[WEIGHT]["shape"]
    header[WEIGHT]["shape"] = [rows - 1, cols]  # data_offsets still span `rows` rows
    return _join(header, body)


# ------------------------------------------------------------ config edits


def _drop_load_in(q: dict) -> None:
    for key in ("load_in_4bit", "load_in_8bit", "_load_in_4bit", "_load_in_8bit"):
        q.pop(key, None)


def _says_8bit(q: dict) -> None:
    q.update(load_in_8bit=True, _load_in_8bit=True, load_in_4bit=False, _load_in_4bit=False)


CASES: dict[str, Case] = {c.name: c for c in [
    Case("truncated", "4bit", "model.safetensors cut in the middle of its data", raw=_truncate),
    Case("header-size-mismatch", "4bit",
         f"header shape of {WEIGHT} says one row fewer than its data_offsets span",
         raw=_lying_header),
    Case("missing-absmax", "4bit", f"{WEIGHT}.absmax removed", tensors=_drop(WEIGHT + ".absmax")),
    Case("missing-quant-map", "4bit", f"{WEIGHT}.quant_map removed",
         tensors=_drop(WEIGHT + ".quant_map")),
    Case("missing-state-json", "4bit", f"{STATE_JSON} removed", tensors=_drop(STATE_JSON)),
    Case("malformed-json", "4bit", "quant-state JSON cut short", tensors=_malformed_json),
    Case("oversized-json", "4bit", "quant-state JSON padded past 64 KiB",
         tensors=lambda t: _set_meta(t, {**_meta(t), "padding": "x" * 70_000})),
    Case("unknown-quant-type", "4bit", "quant_type nf3, in the JSON and in its key",
         tensors=_unknown_quant_type),
    Case("json-quant-type-mismatch", "4bit", "JSON says nf3, its key says nf4",
         tensors=_edit_meta(quant_type="nf3")),
    Case("blocksize-mismatch", "4bit", "JSON blocksize 128, absmax count is for 64",
         tensors=_edit_meta(blocksize=128)),
    Case("blocksize-invalid", "4bit", "JSON blocksize 100", tensors=_edit_meta(blocksize=100)),
    Case("packed-size-mismatch", "4bit", "JSON shape [64, 128] for 2048 packed bytes",
         tensors=_edit_meta(shape=[64, 128])),
    Case("unknown-module", "4bit", f"packed {UNKNOWN_MODULE}.weight + state: no such module",
         needs_model=True, tensors=_extra_module),
    Case("int8-missing-scb", "8bit", f"{MODULE}.SCB removed", tensors=_drop(MODULE + ".SCB")),
    Case("fp16-absmax", "4bit", "no double quant, every absmax stored as float16 (loads)",
         loads=True, tensors=_fp16_absmax()),
    Case("fp16-absmax-overflow", "4bit", f"float16 absmax of {WEIGHT} overflowed to inf",
         tensors=_fp16_absmax(scale_weight=1e6)),
    Case("bf16-quant-storage", "4bit", f"{WEIGHT}'s bytes stored as BF16 (loads, as "
         "bnb_4bit_quant_storage=bfloat16 writes them)", loads=True, tensors=_bf16_storage),
    Case("bf16-cast-packed", "4bit", f"{WEIGHT}'s packed values cast to BF16",
         tensors=_bf16_cast_packed),
    Case("config-no-load-in", "4bit", "quantization_config without load_in_4bit/8bit",
         config=_drop_load_in),
    Case("config-contradicts", "4bit", "quantization_config says load_in_8bit, tensors 4-bit",
         config=_says_8bit),
    Case("pickle-only", "4bit", "weights as pytorch_model.bin (refused unless opted in)",
         pickle=True),
]}


def make(case: str, out: Path | None = None, sources: dict[str, Path] | None = None) -> Path:
    """Write case `case` into directory `out` (default .cache/broken/CASE); returns it."""
    spec = CASES[case]
    src = Path((sources or DEFAULT_SOURCES)[spec.source])
    out = Path(out) if out is not None else DEFAULT_OUT / case
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    for path in src.iterdir():
        if path.name != WEIGHTS_FILE and path.is_file():
            shutil.copy2(path, out / path.name)
    _write_config(spec, out)
    _write_weights(spec, src / WEIGHTS_FILE, out)
    (out / "BROKEN.txt").write_text(f"{case}: {spec.what}\n(source {src})\n")
    return out


def _write_config(spec: Case, out: Path) -> None:
    if spec.config is None:
        return
    config = json.loads((out / "config.json").read_text())
    spec.config(config["quantization_config"])
    (out / "config.json").write_text(json.dumps(config, indent=2))


def _write_weights(spec: Case, src: Path, out: Path) -> None:
    if spec.raw is not None:
        (out / WEIGHTS_FILE).write_bytes(spec.raw(src.read_bytes()))
        return
    tensors = load_file(str(src))
    if spec.tensors is not None:
        tensors = spec.tensors(tensors)
    if spec.pickle:
        torch.save(tensors, out / "pytorch_model.bin")
        return
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(out / WEIGHTS_FILE),
              metadata={"format": "pt"})


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    parser.add_argument("cases", nargs="*", metavar="CASE", help=", ".join(CASES))
    args = parser.parse_args(argv)
    unknown = sorted(set(args.cases) - set(CASES))
    if unknown:
        parser.error(f"unknown case(s) {unknown}; known: {', '.join(CASES)}")
    for case in args.cases or list(CASES):
        path = make(case, args.out / case)
        print(f"{case:26} {path}  ({CASES[case].what})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
