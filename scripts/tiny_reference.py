"""HF transformers reference outputs and on-disk BnB layout checks for tiny checkpoints.

Used by ``build_tiny_checkpoints.py``. Everything here reads a checkpoint directory exactly as
a user (or vLLM) would: config, tokenizer/processor and weights all come from the saved files.
"""

from __future__ import annotations

import base64
import contextlib
import json
import logging
import math
import os
import struct
import wave
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import bitsandbytes as bnb
import bitsandbytes.functional as bnbf
import numpy as np
import torch
import transformers
from PIL import Image
from torch import nn

DTYPES: dict[str, torch.dtype] = {"float32": torch.float32, "bfloat16": torch.bfloat16}
GREEDY_STEPS = 8
TOP_LOGPROBS = 10

IMAGE_SIZE = (64, 48)  # (width, height), as PIL and the OpenAI image size convention use
IMAGE_COLORS = {"red": (255, 0, 0), "blue": (0, 0, 255)}
IMAGE_QUESTION = "What color is this?"
AUDIO_FILE = "tone.wav"
AUDIO_QUESTION = "What is this sound?"
AUDIO_SAMPLE_RATE = 16_000
TEXT_PROMPTS = ("Hello, how are you today?", "Tell me a short story about a red fox.")

# --------------------------------------------------------------------------------------------
# Cases
# --------------------------------------------------------------------------------------------


def _text_message(text: str) -> list[dict[str, Any]]:
    return [{"role": "user", "content": text}]


def _data_url(mime: str, payload: bytes) -> str:
    return f"data:{mime};base64,{base64.b64encode(payload).decode('ascii')}"


def write_images(ckpt_dir: Path) -> None:
    """Solid-color PNGs; PNG is lossless, so vLLM decodes exactly these pixels."""
    for color, rgb in IMAGE_COLORS.items():
        Image.new("RGB", IMAGE_SIZE, rgb).save(ckpt_dir / f"{color}.png", format="PNG")


def write_audio(ckpt_dir: Path) -> None:
    """0.5 s, 440 Hz tone as 16-bit mono PCM WAV at the feature extractor's sampling rate.

    int16 samples make the float waveform unambiguous (sample / 32768) whichever decoder vLLM
    uses, and 16 kHz means no resampling on either side.
    """
    t = np.arange(AUDIO_SAMPLE_RATE // 2) / AUDIO_SAMPLE_RATE
    samples = np.round(0.5 * 32767 * np.sin(2 * math.pi * 440.0 * t)).astype("<i2")
    with wave.open(str(ckpt_dir / AUDIO_FILE), "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(AUDIO_SAMPLE_RATE)
        w.writeframes(samples.tobytes())


def read_wav(path: Path) -> np.ndarray:
    with wave.open(str(path), "rb") as w:
        frames = w.readframes(w.getnframes())
    return np.frombuffer(frames, dtype="<i2").astype(np.float32) / 32768.0


def write_media(ckpt_dir: Path, kinds: Iterable[str]) -> None:
    if "image" in kinds:
        write_images(ckpt_dir)
    if "audio" in kinds:
        write_audio(ckpt_dir)


def build_cases(ckpt_dir: Path, kinds: Iterable[str]) -> list[dict[str, Any]]:
    """The fixed case list: text cases, then one per media kind in ``kinds`` (files already
    written). ``messages`` are ready to send to vLLM's OpenAI chat endpoint."""
    kinds = set(kinds)
    images, audio = "image" in kinds, "audio" in kinds
    cases: list[dict[str, Any]] = [
        {"name": f"text-{i}", "kind": "text", "messages": _text_message(prompt)}
        for i, prompt in enumerate(TEXT_PROMPTS)
    ]
    if images:
        for color in IMAGE_COLORS:
            file = f"{color}.png"
            url = _data_url("image/png", (ckpt_dir / file).read_bytes())
            content = [
                {"type": "image_url", "image_url": {"url": url}},
                {"type": "text", "text": IMAGE_QUESTION},
            ]
            cases.append(
                {
                    "name": f"image-{color}",
                    "kind": "image",
                    "media_file": file,
                    "messages": [{"role": "user", "content": content}],
                }
            )
    if audio:
        data = base64.b64encode((ckpt_dir / AUDIO_FILE).read_bytes()).decode("ascii")
        content = [
            {"type": "input_audio", "input_audio": {"data": data, "format": "wav"}},
            {"type": "text", "text": AUDIO_QUESTION},
        ]
        cases.append(
            {
                "name": "audio-tone",
                "kind": "audio",
                "media_file": AUDIO_FILE,
                "audio_sample_rate": AUDIO_SAMPLE_RATE,
                "messages": [{"role": "user", "content": content}],
            }
        )
    return cases


# --------------------------------------------------------------------------------------------
# Model loading
# --------------------------------------------------------------------------------------------


def _set_bnb_compute_dtype(model: nn.Module, dtype: torch.dtype) -> None:
    # transformers ignores a quantization_config passed for an already-quantized checkpoint and
    # keeps the saved bnb_4bit_compute_dtype, so the fp32 reference sets it on the modules.
    for module in model.modules():
        if isinstance(module, bnb.nn.Linear4bit):
            module.compute_dtype = dtype


def upcast_plain_tensors(model: nn.Module, dtype: torch.dtype) -> int:
    """transformers 5.19 keeps some pre-quantized models' unquantized tensors in the stored
    bf16 whatever ``dtype`` says (seen on Gemma 3); upcast them, so a float32 reference is
    float32. Packed weights and bitsandbytes' own tensors are left alone, and nothing is
    ever narrowed (HF keeps e.g. rotary tables in float32 on purpose)."""
    count = 0
    for module in model.modules():
        if isinstance(module, (bnb.nn.Linear4bit, bnb.nn.Linear8bitLt)):
            tensors = [module.bias] if module.bias is not None else []
        else:
            tensors = [*module.parameters(recurse=False), *module.buffers(recurse=False)]
        for tensor in tensors:
            wider = tensor.is_floating_point() and tensor.dtype.itemsize < dtype.itemsize
            if wider and dtype.is_floating_point:
                tensor.data = tensor.data.to(dtype)
                count += 1
    return count


def _plain_lm_head(head: nn.Linear, dtype: torch.dtype) -> tuple[nn.Linear, str]:
    weight = head.weight
    quant_state = getattr(weight, "quant_state", None)
    linear = nn.Linear(head.in_features, head.out_features, bias=False)
    if quant_state is not None:
        data = bnb.functional.dequantize_4bit(weight.data, quant_state).to(dtype)
        linear.weight = nn.Parameter(data, requires_grad=False)
        return linear, "lm_head was Linear4bit; replaced by nn.Linear with dequantize_4bit weight"
    # Tied embeddings: the Linear4bit wraps the plain bf16 embedding tensor and has no quant
    # state, so bitsandbytes' forward asserts (it expects a packed [n, 1] weight). Keep the tie
    # by reusing that tensor.
    linear.weight = weight
    return linear, (
        "lm_head is a bnb Linear4bit around the tied, unquantized embedding (no quant state, "
        "bitsandbytes asserts in forward); replaced by nn.Linear sharing the embedding weight"
    )


def _probe(model: nn.Module, inputs: dict[str, torch.Tensor]) -> Exception | None:
    try:
        with torch.no_grad():
            model(**inputs, use_cache=False)
    except Exception as exc:  # any failure means HF cannot run the checkpoint as saved
        return exc
    return None


def load_reference_model(
    ckpt_dir: Path, architecture: str, dtype: torch.dtype, probe_inputs: dict[str, torch.Tensor]
) -> tuple[nn.Module, list[str]]:
    """Load the saved checkpoint (quantized weights as stored) and make HF inference run.

    Returns the model and notes about anything that had to be patched.
    """
    cls = getattr(transformers, architecture)
    model = cls.from_pretrained(ckpt_dir, dtype=dtype).eval()
    _set_bnb_compute_dtype(model, dtype)
    notes: list[str] = []
    recast = upcast_plain_tensors(model, dtype)
    if recast:
        notes.append(
            f"{recast} unquantized tensor(s) loaded in the checkpoint's dtype despite "
            f"dtype={dtype}; cast to {dtype}"
        )
    error = _probe(model, probe_inputs)
    if error is None:
        return model, notes
    head = model.get_output_embeddings()
    if not isinstance(head, bnb.nn.Linear4bit):
        raise RuntimeError(f"HF inference fails for {ckpt_dir.name}") from error
    new_head, note = _plain_lm_head(head, dtype)
    model.set_output_embeddings(new_head)
    detail = f": {error}" if str(error) else ""
    notes.append(f"{note} (HF error: {type(error).__name__}{detail})")
    error = _probe(model, probe_inputs)
    if error is not None:
        raise RuntimeError(f"HF inference still fails for {ckpt_dir.name}") from error
    return model, notes


# --------------------------------------------------------------------------------------------
# Reference computation
# --------------------------------------------------------------------------------------------


def _log_probs(model: nn.Module, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    with torch.no_grad(), _contiguous_cpu_4bit_inputs():
        logits = model(**inputs, use_cache=False).logits[0]
    return torch.log_softmax(logits.float(), dim=-1)


@contextlib.contextmanager
def _contiguous_cpu_4bit_inputs() -> Iterator[None]:
    """bitsandbytes' CPU 4-bit kernel (0.50.2, `gemv_4bit` on the AVX512-BF16 layout
    transformers uses for inference) reads each row of its input as contiguous and takes
    only the row stride: a transposed view, which Gemma 4's audio tower hands a 4-bit
    linear, gives a wrong product (1.95 off on a 13 x 64 input whose outputs are at most
    1.21). The reference is the checkpoint's right answer, so its inputs are made contiguous
    here, as they are on every other path (GPU, dequantize + matmul)."""
    original = bnbf.gemv_4bit

    def gemv_4bit(A: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        return original(A.contiguous(), *args, **kwargs)

    bnbf.gemv_4bit = gemv_4bit
    try:
        yield
    finally:
        bnbf.gemv_4bit = original


def _append_token(inputs: dict[str, torch.Tensor], token: int) -> dict[str, torch.Tensor]:
    out = dict(inputs)
    out["input_ids"] = torch.cat([inputs["input_ids"], torch.tensor([[token]])], dim=1)
    # Generated tokens are text: attention 1, multimodal token type 0.
    for key, fill in (("attention_mask", 1), ("mm_token_type_ids", 0), ("token_type_ids", 0)):
        if key in inputs:
            extra = torch.full((1, 1), fill, dtype=inputs[key].dtype)
            out[key] = torch.cat([inputs[key], extra], dim=1)
    return out


def _cast_floats(inputs: dict[str, torch.Tensor], dtype: torch.dtype) -> dict[str, torch.Tensor]:
    # vLLM casts every floating processor output (pixel_values, input_features) to the model
    # dtype before the encoder runs; do the same.
    return {k: v.to(dtype) if v.is_floating_point() else v for k, v in inputs.items()}


def reference_for_case(
    model: nn.Module, inputs: dict[str, torch.Tensor], dtype: torch.dtype
) -> dict[str, Any]:
    """Prompt logprobs, top next-token logprobs and a free-running greedy continuation."""
    inputs = _cast_floats(inputs, dtype)
    ids = inputs["input_ids"][0].tolist()
    lp = _log_probs(model, inputs)
    prompt_lp = lp[:-1].gather(1, torch.tensor(ids[1:]).unsqueeze(1)).squeeze(1)
    top = lp[-1].topk(TOP_LOGPROBS)
    greedy_ids: list[int] = []
    greedy_lps: list[float] = []
    margins: list[float] = []
    step_lp = lp[-1]
    for _ in range(GREEDY_STEPS):
        best = step_lp.topk(2)
        token = int(best.indices[0])
        greedy_ids.append(token)
        greedy_lps.append(float(best.values[0]))
        margins.append(float(best.values[0] - best.values[1]))
        inputs = _append_token(inputs, token)
        step_lp = _log_probs(model, inputs)[-1]
    return {
        "prompt_token_ids": ids,
        "prompt_logprobs": [float(x) for x in prompt_lp],
        "next_top_logprobs": [
            [int(i), float(v)] for i, v in zip(top.indices, top.values, strict=True)
        ],
        "greedy_token_ids": greedy_ids,
        "greedy_logprobs": greedy_lps,
        "greedy_top2_margins": margins,
    }


def compute_references(
    ckpt_dir: Path, family: Any, architecture: str, cases: list[dict[str, Any]],
    load_model: Any = None,
) -> tuple[dict[str, dict[str, Any]], list[str], dict[str, Any]]:
    """Run every case in fp32 and bf16. ``family`` (a ``tiny_families`` Family) loads the
    processor and encodes each case. Returns (references, notes, processor info).

    `load_model(ckpt_dir, architecture, dtype, probe_inputs) -> (model, notes)` replaces
    `load_reference_model` where the reference is not the checkpoint as HF loads it
    (MoE experts as the plugin quantizes them, see tiny_moe.py)."""
    load_model = load_model or load_reference_model
    processor = family.load_processor(ckpt_dir)
    encoded = {case["name"]: family.encode_case(processor, case, ckpt_dir) for case in cases}
    references: dict[str, dict[str, Any]] = {}
    notes: list[str] = []
    for dtype_name, dtype in DTYPES.items():
        probe = _cast_floats(encoded[cases[0]["name"]], dtype)
        with _quiet_bitsandbytes():
            model, load_notes = load_model(ckpt_dir, architecture, dtype, probe)
            notes += [f"{dtype_name}: {n}" for n in load_notes]
            references[dtype_name] = {
                name: reference_for_case(model, inputs, dtype) for name, inputs in encoded.items()
            }
        del model
    _check_same_prompts(references)
    return references, notes, _processor_info(processor)


@contextlib.contextmanager
def _quiet_bitsandbytes() -> Iterator[None]:
    # bnb logs on every int8 matmul that CPU inputs are cast to fp16, and once per forward for
    # a Linear4bit without quant state (the tied lm_head case); both are expected here.
    log = logging.getLogger("bitsandbytes")
    level = log.level
    log.setLevel(logging.ERROR)
    try:
        yield
    finally:
        log.setLevel(level)


def _check_same_prompts(references: dict[str, dict[str, Any]]) -> None:
    prompts = [{n: r["prompt_token_ids"] for n, r in refs.items()} for refs in references.values()]
    if any(p != prompts[0] for p in prompts):
        raise AssertionError("prompt token ids differ between dtypes")


def _processor_info(processor: Any) -> dict[str, Any]:
    info: dict[str, Any] = {"processor_class": type(processor).__name__}
    image_processor = getattr(processor, "image_processor", None)
    if image_processor is not None:
        info["image_processor_class"] = type(image_processor).__name__
        info["image_processor_backend"] = (
            "pil" if type(image_processor).__name__.endswith("Pil") else "torchvision"
        )
    return info


# --------------------------------------------------------------------------------------------
# On-disk layout
# --------------------------------------------------------------------------------------------


def read_safetensors_header(path: Path) -> dict[str, dict[str, Any]]:
    """Tensor name -> {dtype, shape, data_offsets}, straight from the file header."""
    with path.open("rb") as f:
        (length,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(length))
    header.pop("__metadata__", None)
    return header


def checkpoint_header(ckpt_dir: Path) -> dict[str, dict[str, Any]]:
    header: dict[str, dict[str, Any]] = {}
    for file in sorted(ckpt_dir.glob("*.safetensors")):
        header.update(read_safetensors_header(file))
    return header


def packed_modules(header: dict[str, dict[str, Any]], storage: str = "U8") -> dict[str, str]:
    """Module name -> "nf4" | "fp4" | "int8" for every Linear stored in BnB packed form
    (4-bit bytes stored as `storage`, the safetensors name of bnb_4bit_quant_storage)."""
    packed: dict[str, str] = {}
    marker = ".weight.quant_state.bitsandbytes__"
    for key in header:
        if marker in key:
            module, fmt = key.split(marker)
            expect_dtype(header, f"{module}.weight", storage)
            packed[module] = fmt
        elif key.endswith(".SCB"):
            module = key.removesuffix(".SCB")
            expect_dtype(header, f"{module}.weight", "I8")
            packed[module] = "int8"
    return dict(sorted(packed.items()))


def expect_dtype(header: dict[str, dict[str, Any]], key: str, dtype: str) -> None:
    actual = header.get(key, {}).get("dtype")
    if actual != dtype:
        raise AssertionError(f"{key}: expected {dtype}, found {actual}")


def four_bit_keys(module: str, double_quant: bool, fmt: str) -> set[str]:
    """Every tensor transformers+bitsandbytes write for one 4-bit Linear."""
    suffixes = ["", ".absmax", ".quant_map", f".quant_state.bitsandbytes__{fmt}"]
    if double_quant:
        suffixes += [".nested_absmax", ".nested_quant_map"]
    return {f"{module}.weight{s}" for s in suffixes}


def linear_module_names(model: nn.Module) -> list[str]:
    """Names of all Linear layers (BnB ones included: they subclass nn.Linear)."""
    return sorted(name for name, m in model.named_modules() if isinstance(m, nn.Linear))


def expected_packed(
    linear_modules: dict[str, str],
    groups: Iterable[str],
    fmt: str,
    tied_lm_head: bool,
    module_group: Callable[[str], str],
) -> dict[str, str]:
    """File module name -> format for every Linear whose group the variant quantizes;
    ``linear_modules`` maps transformers' module names (which groups are stated in) to the
    names in the files."""
    groups = set(groups)
    return {
        linear_modules[name]: fmt
        for name in sorted(linear_modules)
        if module_group(name) in groups and not (name == "lm_head" and tied_lm_head)
    }


def linear_modules_on_disk(ckpt_dir: Path) -> dict[str, str]:
    """Every Linear of the bf16 checkpoint: transformers' module name -> name in the files.

    transformers 5 renames some layouts on load (e.g. LLaVA's ``language_model.model.*`` ->
    ``model.language_model.*``) and back on save, so the two differ; matched by content
    (seeded random weights are unique). A weight with no tensor of its own (a tied lm_head)
    keeps its module name.
    """
    from safetensors.torch import load_file

    config = transformers.AutoConfig.from_pretrained(ckpt_dir)
    model = getattr(transformers, config.architectures[0]).from_pretrained(
        ckpt_dir, dtype=torch.bfloat16
    )
    by_content: dict[bytes, list[str]] = {}
    for file in sorted(ckpt_dir.glob("*.safetensors")):
        for key, tensor in load_file(file).items():
            by_content.setdefault(_content_key(tensor), []).append(key)
    tied = model.get_input_embeddings().weight
    names: dict[str, str] = {}
    for name in linear_module_names(model):
        weight = model.get_submodule(name).weight
        keys = by_content.get(_content_key(weight.detach()), [])
        if weight is tied or f"{name}.weight" in keys or len(keys) != 1:
            names[name] = name
        else:
            names[name] = keys[0].removesuffix(".weight")
    return names


def _content_key(tensor: torch.Tensor) -> bytes:
    data = tensor.contiguous().view(-1).view(torch.uint8).numpy().tobytes()
    return str(tensor.dtype).encode() + str(tuple(tensor.shape)).encode() + data
