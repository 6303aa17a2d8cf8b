"""`vllm-bnb-mm` command line: `vllm-bnb-mm inspect <checkpoint dir or hub id> [--json]`."""

from __future__ import annotations

import argparse
import json
import logging
import os
import re
import sys
import time
from collections.abc import Callable


def _quiet_bitsandbytes_kernel_hub_notice() -> None:
    """On AVX512-BF16 CPUs bitsandbytes tries, when imported, to fetch a CPU kernel from
    the Hugging Face hub and logs a warning when it cannot; it then uses its built-in
    kernel. inspect runs no matmul, so the notice is noise here (README: Install)."""
    logging.getLogger("bitsandbytes.backends.cpu.ops").addFilter(
        lambda record: "kernels-community" not in record.getMessage()
    )


_quiet_bitsandbytes_kernel_hub_notice()

from . import __version__  # noqa: E402  (after the filter: these import bitsandbytes)
from .checkpoint import CheckpointError  # noqa: E402
from .inspection import DEFAULT_TP_SIZES, Report, inspect_checkpoint  # noqa: E402

EXIT_OK, EXIT_PROBLEMS = 0, 1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="vllm-bnb-mm", description="bitsandbytes checkpoints for vLLM: tools"
    )
    parser.add_argument("--version", action="version", version=f"vllm-bnb-mm {__version__}")
    commands = parser.add_subparsers(dest="command", required=True)
    inspect = commands.add_parser(
        "inspect",
        help="what is in a BnB checkpoint, what it will cost, and its known problems",
        description="Reads safetensors headers and the quant-state JSON only (never the "
        "packed weights; --full adds the block scales). Exit status 1 when the checkpoint "
        "would not load.",
    )
    inspect.add_argument("checkpoint", help="checkpoint folder, or a Hugging Face hub id")
    inspect.add_argument("--json", action="store_true", help="machine-readable output")
    inspect.add_argument("--dtype", choices=["bfloat16", "float16", "float32"],
                         help="vLLM --dtype for plain weights (default: the config's)")
    inspect.add_argument("--tp", type=_tp_sizes, default=DEFAULT_TP_SIZES,
                         help="tensor-parallel sizes to check, e.g. 2,4 (default 2,4,8)")
    inspect.add_argument("--full", action="store_true",
                         help="also read every block scale (absmax) and check it as the "
                         "loader does; reads about 1/16 of the packed bytes")
    inspect.add_argument("--revision", help="hub revision (hub ids only)")
    inspect.add_argument("--no-vllm", action="store_true",
                         help="skip the checks that build vLLM's model class on the meta "
                         "device (those need vLLM, and importing it takes seconds)")
    args = parser.parse_args(argv)
    return run_inspect(args)


def run_inspect(args: argparse.Namespace) -> int:
    start = time.monotonic()
    try:
        folder = resolve_checkpoint(args.checkpoint, args.revision)
        report = inspect_checkpoint(
            folder, dtype=args.dtype, tp_sizes=args.tp, full=args.full,
            architecture=None if args.no_vllm else _architecture_check(),
        )
    except CheckpointError as e:
        if args.json:
            print(json.dumps({"checkpoint": args.checkpoint, "error": str(e)}, indent=1))
        else:
            print(f"error: {e}", file=sys.stderr)
        return EXIT_PROBLEMS
    seconds = time.monotonic() - start
    if args.json:
        print(json.dumps({"vllm_bnb_mm": __version__, **report.to_json(),
                          "seconds": round(seconds, 3)}, indent=1))
    else:
        print(format_report(report, seconds))
    return EXIT_PROBLEMS if report.has_errors else EXIT_OK


def _tp_sizes(text: str) -> tuple[int, ...]:
    try:
        sizes = tuple(int(t) for t in text.split(",") if t.strip())
    except ValueError:
        sizes = ()
    if not sizes or any(s < 2 for s in sizes):
        raise argparse.ArgumentTypeError(f"expected sizes >= 2 like 2,4,8, got {text!r}")
    return sizes


def _architecture_check() -> Callable | None:
    """The vLLM-backed checks when vLLM is importable; a failure there (an architecture
    this vLLM lacks, a config it rejects) becomes a note, not a crash."""
    # vLLM logs to stdout, which is the report's (and --json's) stream.
    os.environ.setdefault("VLLM_LOGGING_LEVEL", "ERROR")
    try:
        from .architecture import architecture_facts
    except ImportError:
        return None

    def check(folder, layout):
        try:
            return architecture_facts(folder, layout)
        except Exception as e:  # vLLM's own config/model errors, whatever their type
            print(f"note: vLLM could not build the model class ({type(e).__name__}: "
                  f"{str(e)[:300]}); using assumptions instead", file=sys.stderr)
            return None

    return check


def resolve_checkpoint(spec: str, revision: str | None = None) -> str:
    """A local folder as is; anything else as a hub id, through huggingface_hub (its
    cache, the one vLLM uses; HF_HUB_OFFLINE=1 means the cache only). Downloads the
    config and safetensors files: the header reads need local files."""
    if os.path.isdir(spec):
        return spec
    if spec.startswith((".", "/", "~")) or spec.count("/") > 1 or os.path.exists(spec):
        raise CheckpointError(f"{spec}: no such checkpoint folder")
    from huggingface_hub import snapshot_download

    try:
        return snapshot_download(
            spec, revision=revision, allow_patterns=["*.json", "*.safetensors"]
        )
    except Exception as e:  # hub errors come as many types (HTTP, offline, not found)
        offline = os.environ.get("HF_HUB_OFFLINE", "") not in ("", "0")
        hint = ("HF_HUB_OFFLINE is set, so only the local Hugging Face cache was searched"
                if offline else "check the id, your network and HF_TOKEN for gated models")
        raise CheckpointError(
            f"{spec}: not a local folder, and the hub did not provide it "
            f"({type(e).__name__}: {str(e)[:300]}); {hint}"
        ) from e


# ----------------------------------------------------------------------- text output


def format_report(report: Report, seconds: float) -> str:
    lines = [
        f"checkpoint    {report.checkpoint} ({', '.join(report.files)})",
        f"architecture  {report.architecture or '?'}",
        f"quantization  {_describe_quantization(report)}",
        f"model dtype   {report.dtype} (plain and dequantized weights)",
        "",
        "modules (kind, logical shape, count, name with layer numbers folded as *):",
        *_module_lines(report),
        "",
        "on disk       " + _sizes(report.disk_bytes_by_kind),
        "as loaded     " + _sizes(report.loaded_bytes_by_kind)
        + f" = {_size(report.loaded_bytes_total)} of weights",
        *[f"              - {a}" for a in report.memory_assumptions],
        "",
        "tensor parallel  " + ", ".join(
            f"TP={tp} {'exact' if ok else 'requantizes some slices'}"
            for tp, ok in report.tp_exact.items()
        ),
        "",
        "problems" if report.problems else "problems      none",
    ]
    for p in report.problems:
        lines += [f"  [{p.severity}] {p.code}: {p.message}", f"      fix: {p.fix}"]
    lines.append(f"\n({seconds:.2f} s)")
    return "\n".join(lines)


def _describe_quantization(report: Report) -> str:
    kinds = sorted({m.kind for m in report.modules if m.kind != "plain"})
    packed = sum(m.kind != "plain" for m in report.modules)
    if not kinds:
        return "none (no packed weights)"
    dq = {m.double_quant for m in report.modules if m.double_quant is not None}
    blocks = sorted({m.blocksize for m in report.modules if m.blocksize})
    extra = []
    if dq:
        extra.append("double quant" if dq == {True} else "no double quant" if dq == {False}
                     else "double quant on some")
    if blocks:
        extra.append("blocksize " + "/".join(map(str, blocks)))
    return f"{'+'.join(kinds)}, {packed} packed module(s)" + (
        f" ({', '.join(extra)})" if extra else "")


def _module_lines(report: Report) -> list[str]:
    groups: dict[tuple, int] = {}
    for m in report.modules:
        if m.kind == "plain":
            kind = f"plain {m.storage}"
        else:
            kind = m.kind + (" dq" if m.double_quant else "") + (
                f" bs{m.blocksize}" if m.blocksize else "")
        key = (kind, str(list(m.shape)), re.sub(r"\.\d+(?=\.|$)", ".*", m.name), m.built)
        groups[key] = groups.get(key, 0) + 1
    kind_w = max((len(k[0]) for k in groups), default=0)
    shape_w = max((len(k[1]) for k in groups), default=0)
    return [
        f"  {kind:<{kind_w}}  {shape:<{shape_w}}  x{count:<4} {pattern}"
        + ("" if built in ("packed", "plain") else f"  -> {built} at load")
        for (kind, shape, pattern, built), count in groups.items()
    ]


def _sizes(by_kind: dict[str, int]) -> str:
    return ", ".join(f"{k} {_size(v)}" for k, v in by_kind.items()) or "nothing"


def _size(n: int) -> str:
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= scale:
            return f"{n / scale:.2f} {unit}"
    return f"{n} B"


if __name__ == "__main__":
    sys.exit(main())
