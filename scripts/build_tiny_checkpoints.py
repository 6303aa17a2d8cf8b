"""Build tiny, hermetic HF checkpoints (bf16 and bitsandbytes pre-quantized) plus HF references.

Usage::

    .venv/bin/python scripts/build_tiny_checkpoints.py [--out DIR] [--force] [NAME ...]

Each variant becomes ``DIR/NAME/``: a checkpoint directory exactly as a user would produce it
(random tiny model saved in bf16 by transformers; BnB variants are that bf16 checkpoint loaded
with ``from_pretrained(..., quantization_config=BitsAndBytesConfig(...))`` and saved again),
with tokenizer/processor/chat-template files so ``vllm serve DIR/NAME`` works, and a
``reference.json`` holding HF transformers outputs of the saved checkpoint (see
``tiny_reference.py``). Offline, CPU-only, seeded; a variant whose ``reference.json`` carries
the current ``BUILDER_VERSION`` is not rebuilt.

reference.json (top level)::

    builder_version, variant, description, family (tiny_families name), architecture, base,
    bnb_config            BitsAndBytesConfig kwargs used to quantize (null for bf16)
    saved_quantization_config   config.json's quantization_config as transformers wrote it
    layout                {quantized_groups, packed_modules {module: nf4|fp4|int8},
                           bf16_linear_modules, lm_head ("tied"|"bf16"|"nf4"...),
                           num_packed_modules} - checked against the safetensors header
    processor             {processor_class, image_processor_class, image_processor_backend}
    eos_token_ids, reference_notes (HF-side patches, e.g. the lm_head workaround),
    sampling              {greedy_steps, top_logprobs, greedy_ignores_eos, ...}
    versions, metrics     {red_blue_top5_max_gap_bf16, fp32_bf16_top5_max_gap}
    cases                 [{name, kind ("text"|"image"|"audio"), messages (OpenAI chat format,
                           media inlined as data), media_file?, audio_sample_rate?}]
    references            {"float32"|"bfloat16": {case name: {prompt_token_ids,
                           prompt_logprobs (positions 1..n-1), next_top_logprobs [[id, lp]]
                           (top 10), greedy_token_ids, greedy_logprobs,
                           greedy_top2_margins}}}
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import json
import multiprocessing
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Iterator
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

# Must precede the transformers import: huggingface_hub reads it at import time.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import bitsandbytes
import torch
import transformers
from transformers import BitsAndBytesConfig

sys.path.insert(0, str(Path(__file__).resolve().parent))
import tiny_moe
import tiny_reference as ref
from tiny_families import FAMILIES
from tiny_families.common import Base, Family, Variant

# Bump whenever the recipe (configs, weights, tokenizer, cases, JSON schema) changes.
BUILDER_VERSION = "tiny-ckpt-2026.3"
REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_OUT = REPO_ROOT / ".cache" / "tiny"
# Processes building bases in parallel (each variant still builds exactly as alone).
BUILD_WORKERS = int(os.environ.get("TINY_BUILD_WORKERS", min(2, os.cpu_count() or 1)))

# --------------------------------------------------------------------------------------------
# Registries (names are a fixed API used by the tests); each family module owns its entries
# --------------------------------------------------------------------------------------------


def _unique(pairs: list[tuple[str, Any]], what: str) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise ValueError(f"{what} {key!r} is defined twice")
        out[key] = value
    return out


BASES: dict[str, Base] = _unique(
    [item for f in FAMILIES.values() for item in f.bases.items()], "base"
)
VARIANTS: dict[str, Variant] = _unique(
    [(v.name, v) for f in FAMILIES.values() for v in f.variants], "variant"
)


def family_of(variant: Variant) -> Family:
    return FAMILIES[BASES[variant.base].family]


# --------------------------------------------------------------------------------------------
# Variant build
# --------------------------------------------------------------------------------------------


def bnb_config(kwargs: dict[str, Any]) -> BitsAndBytesConfig:
    kwargs = dict(kwargs)
    if "bnb_4bit_compute_dtype" in kwargs:
        kwargs["bnb_4bit_compute_dtype"] = getattr(torch, kwargs["bnb_4bit_compute_dtype"])
    return BitsAndBytesConfig(**kwargs)


def _architecture(ckpt_dir: Path) -> str:
    return json.loads((ckpt_dir / "config.json").read_text())["architectures"][0]


def quantize(base_dir: Path, variant: Variant, out: Path) -> None:
    """Load the bf16 checkpoint with a BnB config and save it."""
    cls = getattr(transformers, _architecture(base_dir))
    model = cls.from_pretrained(
        base_dir, quantization_config=bnb_config(variant.bnb or {}), dtype=torch.bfloat16
    )
    model.save_pretrained(out)
    del model
    # Tokenizer, processor, chat template: everything that is not weights or model config.
    for file in base_dir.iterdir():
        if not (out / file.name).exists():
            shutil.copy2(file, out / file.name)


def check_layout(ckpt_dir: Path, variant: Variant, linears: dict[str, str]) -> dict[str, Any]:
    """Compare what the safetensors header really holds with the variant's intent.
    ``linears``: every Linear module, transformers' module name -> its name in the files."""
    header = ref.checkpoint_header(ckpt_dir)
    config = json.loads((ckpt_dir / "config.json").read_text())
    tied = bool(config.get("tie_word_embeddings", False))
    packed = ref.packed_modules(header, _storage_dtype(variant))
    fmt = variant.quant_format
    expected = ref.expected_packed(
        linears, variant.quantized_groups, fmt or "", tied, family_of(variant).module_group
    )
    if packed != expected:
        extra = sorted(set(packed) - set(expected))
        missing = sorted(set(expected) - set(packed))
        raise AssertionError(
            f"{variant.name}: packed modules differ from intent; unexpected {extra}, "
            f"missing {missing}"
        )
    unpacked = [m for m in linears.values() if m not in packed and f"{m}.weight" in header]
    for module in unpacked:
        ref.expect_dtype(header, f"{module}.weight", "BF16")
    if fmt in ("nf4", "fp4"):
        double_quant = bool(variant.bnb and variant.bnb.get("bnb_4bit_use_double_quant"))
        for module in packed:
            missing_keys = ref.four_bit_keys(module, double_quant, fmt) - set(header)
            if missing_keys:
                raise AssertionError(f"{variant.name}: missing {sorted(missing_keys)}")
    if variant.check is not None:
        variant.check(header, packed, config)
    return {
        "quantized_groups": list(variant.quantized_groups),
        "packed_modules": packed,
        "bf16_linear_modules": unpacked,
        "lm_head": "tied" if tied else packed.get(linears["lm_head"], "bf16"),
        "num_packed_modules": len(packed),
    }


def _storage_dtype(variant: Variant) -> str:
    """The safetensors dtype of the packed 4-bit weights (bnb_4bit_quant_storage)."""
    storage = (variant.bnb or {}).get("bnb_4bit_quant_storage", "uint8")
    return {"uint8": "U8", "bfloat16": "BF16", "float16": "F16", "float32": "F32"}[storage]


def _top5_gap(references: dict[str, Any]) -> float | None:
    """Largest difference in first-token logprobs (union of top-5s) between red and blue."""
    refs = references["bfloat16"]
    if "image-red" not in refs:
        return None
    red = dict(map(tuple, refs["image-red"]["next_top_logprobs"]))
    blue = dict(map(tuple, refs["image-blue"]["next_top_logprobs"]))
    floor = min(min(red.values()), min(blue.values()))  # below every stored top-10 entry
    top5 = {t for t, _ in refs["image-red"]["next_top_logprobs"][:5]}
    top5 |= {t for t, _ in refs["image-blue"]["next_top_logprobs"][:5]}
    return max(abs(red.get(t, floor) - blue.get(t, floor)) for t in top5)


def _dtype_gap(references: dict[str, Any]) -> float:
    """Max |fp32 - bf16| over the first-token top-5 (fp32 ids) of every case."""
    gap = 0.0
    for case, r32 in references["float32"].items():
        r16 = dict(map(tuple, references["bfloat16"][case]["next_top_logprobs"]))
        for token, lp in r32["next_top_logprobs"][:5]:
            if token in r16:
                gap = max(gap, abs(lp - r16[token]))
    return gap


def build_variant(variant: Variant, base_dir: Path, staging: Path) -> dict[str, Any]:
    """Write the checkpoint into ``staging`` and return its reference.json content."""
    base = BASES[variant.base]
    family = FAMILIES[base.family]
    if variant.bnb is None:
        shutil.copytree(base_dir, staging, dirs_exist_ok=True)
    else:
        quantize(base_dir, variant, staging)
    layout = check_layout(staging, variant, ref.linear_modules_on_disk(base_dir))
    if variant.moe:
        layout["moe"] = tiny_moe.finish_files(staging, variant.moe, variant.bnb)
        # the per-expert recipe packs experts (and a router) the save left plain
        packed = ref.packed_modules(ref.checkpoint_header(staging), _storage_dtype(variant))
        layout |= {"packed_modules": packed, "num_packed_modules": len(packed)}
    kinds = family.media_kinds(base)
    ref.write_media(staging, kinds)
    cases = ref.build_cases(staging, kinds)
    architecture = _architecture(staging)
    load_model = (
        tiny_moe.reference_loader(variant.moe, base_dir, staging, variant.bnb)
        if variant.moe else None
    )
    references, notes, processor_info = ref.compute_references(
        staging, family, architecture, cases, load_model=load_model
    )
    config = json.loads((staging / "config.json").read_text())
    generation = json.loads((staging / "generation_config.json").read_text())
    eos = generation.get("eos_token_id")
    return {
        "builder_version": BUILDER_VERSION,
        "variant": variant.name,
        "description": variant.description,
        "family": base.family,
        "architecture": architecture,
        "base": variant.base,
        "bnb_config": variant.bnb,
        "saved_quantization_config": config.get("quantization_config"),
        "layout": layout,
        "processor": processor_info,
        "eos_token_ids": eos if isinstance(eos, list) else [eos],
        "reference_notes": notes,
        "sampling": {
            "greedy_steps": ref.GREEDY_STEPS,
            "top_logprobs": ref.TOP_LOGPROBS,
            "greedy_ignores_eos": True,
            "prompt_logprob_positions": "1..n-1",
        },
        "versions": {
            "transformers": transformers.__version__,
            "torch": torch.__version__,
            "bitsandbytes": bitsandbytes.__version__,
        },
        "metrics": {
            "red_blue_top5_max_gap_bf16": _top5_gap(references),
            "fp32_bf16_top5_max_gap": _dtype_gap(references),
        },
        "cases": cases,
        "references": references,
    }


def _is_current(ckpt_dir: Path) -> bool:
    try:
        data = json.loads((ckpt_dir / "reference.json").read_text())
    except (OSError, ValueError):
        return False
    return data.get("builder_version") == BUILDER_VERSION


def _publish(staging: Path, final: Path) -> None:
    """Swap the finished staging dir into place; readers never see a half-written variant."""
    _make_readable(staging)
    if final.exists():
        trash = Path(tempfile.mkdtemp(prefix=f".{final.name}.old-", dir=final.parent))
        final.rename(trash / final.name)
        shutil.rmtree(trash)
    staging.rename(final)


def _make_readable(path: Path) -> None:
    # mkdtemp (and the safetensors writer) create owner-only entries; a checkpoint dir should
    # look like any other saved model, readable per the user's umask.
    umask = os.umask(0)
    os.umask(umask)
    path.chmod(0o777 & ~umask)
    for file in path.iterdir():
        file.chmod(0o666 & ~umask)


def build(
    names: list[str] | None = None, out: Path | None = None, *, force: bool = False
) -> dict[str, Path]:
    """Build (or reuse cached) variants; returns variant name -> checkpoint directory."""
    names = list(VARIANTS) if not names else list(dict.fromkeys(names))
    unknown = sorted(set(names) - set(VARIANTS))
    if unknown:
        raise ValueError(f"unknown variant(s) {unknown}; known: {sorted(VARIANTS)}")
    out = Path(out) if out is not None else DEFAULT_OUT
    out.mkdir(parents=True, exist_ok=True)
    with build_lock(out):
        _remove_stale_staging(out)
        # Checked under the lock: another process (e.g. a parallel test worker) may have just
        # built what we need.
        todo = [n for n in names if force or not _is_current(out / n)]
        if todo:
            _build_all(todo, out)
    return {name: out / name for name in names}


@contextlib.contextmanager
def build_lock(out: Path) -> Iterator[None]:
    """One builder at a time per output folder (parallel test workers, tiny_lora)."""
    with (out / ".build.lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def _remove_stale_staging(out: Path) -> None:
    # Hidden leftovers of a killed run; safe to delete because we hold the build lock.
    for pattern in (".*.tmp-*", ".bases-*", ".*.old-*"):
        for path in out.glob(pattern):
            shutil.rmtree(path, ignore_errors=True)


def _build_all(names: list[str], out: Path) -> None:
    """Bases are independent: their groups of variants build in parallel processes, one
    core each (the build is CPU-bound torch; CI has 2 cores)."""
    groups: dict[str, list[str]] = {}
    for name in names:
        groups.setdefault(VARIANTS[name].base, []).append(name)
    ordered = sorted(groups.items(), key=lambda kv: -len(kv[1]))  # longest first
    workers = min(len(ordered), BUILD_WORKERS)
    if workers <= 1:
        for base, members in ordered:
            _build_group(base, members, out)
        return
    threads = max(1, (os.cpu_count() or 1) // workers)
    context = multiprocessing.get_context("spawn")  # no forked torch state
    with ProcessPoolExecutor(
        workers, mp_context=context, initializer=torch.set_num_threads, initargs=(threads,)
    ) as pool:
        for job in [pool.submit(_build_group, base, members, out) for base, members in ordered]:
            job.result()


def _build_group(base_name: str, names: list[str], out: Path) -> None:
    with tempfile.TemporaryDirectory(prefix=".bases-", dir=out) as tmp:
        base_dir = Path(tmp) / base_name
        base = BASES[base_name]
        FAMILIES[base.family].save_base(base, base_dir)
        for name in names:
            staging = Path(tempfile.mkdtemp(prefix=f".{name}.tmp-", dir=out))
            try:
                data = build_variant(VARIANTS[name], base_dir, staging)
                (staging / "reference.json").write_text(json.dumps(data, indent=1) + "\n")
                _publish(staging, out / name)
            finally:
                shutil.rmtree(staging, ignore_errors=True)


# --------------------------------------------------------------------------------------------
# CLI
# --------------------------------------------------------------------------------------------


def _dir_size(path: Path) -> int:
    return sum(f.stat().st_size for f in path.iterdir() if f.is_file())


def _format_top(entries: list[list[float]], k: int = 5) -> str:
    return " ".join(f"{int(t)}:{lp:.2f}" for t, lp in entries[:k])


def summarize(paths: dict[str, Path]) -> None:
    for name, path in paths.items():
        data = json.loads((path / "reference.json").read_text())
        refs = data["references"]["bfloat16"]
        metrics = data["metrics"]
        print(
            f"{name:24s} {_dir_size(path) / 1e6:6.2f} MB  "
            f"packed={data['layout']['num_packed_modules']:3d}  "
            f"lm_head={data['layout']['lm_head']:5s}  "
            f"fp32~bf16={metrics['fp32_bf16_top5_max_gap']:.3f}"
        )
        if "image-red" in refs:
            print(f"    red : {_format_top(refs['image-red']['next_top_logprobs'])}")
            print(f"    blue: {_format_top(refs['image-blue']['next_top_logprobs'])}")
            print(f"    red/blue max top-5 gap: {metrics['red_blue_top5_max_gap_bf16']:.2f}")
        for note in data["reference_notes"]:
            print(f"    note: {note}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("names", nargs="*", metavar="NAME", help=f"any of {', '.join(VARIANTS)}")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="output dir")
    parser.add_argument("--force", action="store_true", help="rebuild even if cached")
    args = parser.parse_args(argv)
    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    start = time.monotonic()
    paths = build(args.names or None, args.out, force=args.force)
    summarize(paths)
    print(f"done in {time.monotonic() - start:.1f} s -> {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
