"""`vllm-bnb-mm inspect` on every tiny variant and every broken checkpoint.

Expected facts come from what transformers + bitsandbytes wrote: the builder's
reference.json `layout` (packed modules and their format, lm_head, the quantized groups),
the variant's BitsAndBytesConfig, the safetensors headers read by the builder's own
reader (scripts/tiny_reference.py), and the unquantized base checkpoint's shapes.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import bitsandbytes as bnb
import pytest
import torch
from test_broken_checkpoints import EXPECTED_ERRORS, broken  # noqa: F401  (fixture)

import tiny_reference as ref
from build_tiny_checkpoints import BASES, VARIANTS
from make_broken_checkpoints import CASES, UNKNOWN_MODULE
from vllm_bnb_mm.cli import main
from vllm_bnb_mm.inspection import inspect_checkpoint

ROOT = Path(__file__).resolve().parent.parent
# transformers' Linear4bit weights are bitsandbytes Params4bit with its default blocksize.
BNB_DEFAULT_BLOCKSIZE = bnb.nn.Params4bit(torch.zeros(2), requires_grad=False).blocksize
STATE_SUFFIXES = (".absmax", ".quant_map", ".nested_absmax", ".nested_quant_map", ".SCB",
                  ".weight_format")
TOWER_GROUPS = {"vision_tower", "audio_tower"}
BF16_BASE = {"llama": "llama-bf16", "gemma4": "gemma4-bf16"}  # bases with a bf16 variant


def _reference(ckpt: Path) -> dict:
    return json.loads((ckpt / "reference.json").read_text())


def _codes(report) -> set[str]:
    return {p.code for p in report.problems}


@pytest.mark.parametrize("name", sorted(VARIANTS))
def test_inspect_reports_what_transformers_wrote(tiny, name):
    ckpt = tiny[name]
    data = _reference(ckpt)
    layout, variant = data["layout"], VARIANTS[name]
    report = inspect_checkpoint(str(ckpt))
    modules = {m.name: m for m in report.modules}

    packed = {m.name: m.kind for m in report.modules if m.kind != "plain"}
    assert packed == layout["packed_modules"]
    for module in layout["bf16_linear_modules"]:
        assert modules[module].kind == "plain" and modules[module].storage == "bfloat16"
    double_quant = bool((variant.bnb or {}).get("bnb_4bit_use_double_quant"))
    for m in report.modules:
        if m.kind in ("nf4", "fp4"):
            assert (m.double_quant, m.blocksize) == (double_quant, BNB_DEFAULT_BLOCKSIZE)

    base = BF16_BASE.get(variant.base)
    if base is not None:  # logical shapes are the unquantized model's
        header = ref.checkpoint_header(tiny[base])
        for m in report.modules:
            assert m.shape == header[m.name + ".weight"]["shape"], m.name

    head = layout["lm_head"]
    # transformers 4.x key names (LLaVA legacy, Mistral 3) save it as language_model.lm_head
    heads = [m for name, m in modules.items() if name.split(".")[-1] == "lm_head"]
    assert len(heads) == (head != "tied")
    if head not in ("tied", "bf16"):
        assert heads[0].kind == head and heads[0].built == "dequantized"
    assert ("lm_head-quantized" in _codes(report)) == (head not in ("tied", "bf16"))
    assert ("tower-quantized" in _codes(report)) == bool(
        TOWER_GROUPS & set(layout["quantized_groups"]))
    assert ("k_eq_v" in _codes(report)) == BASES[variant.base].options.get("k_eq_v", False)
    assert ("skip-list-matches-nothing" in _codes(report)) == _unanchored_skip(data)
    assert not report.has_errors
    if variant.base.startswith("llama"):
        assert {p.severity for p in report.problems} <= {"note"}
    assert report.loaded_bytes_total == _loaded_bytes_from_header(ckpt, layout)


def _unanchored_skip(data: dict) -> bool:
    """A skip entry that anchors at no module transformers saw, while modules that carry
    it as a name component were packed (what transformers 5's anchored matching does)."""
    layout = data["layout"]
    linears = set(layout["packed_modules"]) | set(layout["bf16_linear_modules"])
    skips = (data["saved_quantization_config"] or {}).get("llm_int8_skip_modules") or []
    return any(
        not any(m == s or m.startswith(s + ".") for m in linears)
        and any(s in m.split(".") for m in layout["packed_modules"])
        for s in skips
    )


_ITEMSIZE = {"U8": 1, "I8": 1, "BF16": 2, "F16": 2, "F32": 4, "I32": 4, "I64": 8}


def _loaded_bytes_from_header(ckpt: Path, layout: dict) -> int:
    """Weights as loaded on a GPU, from the header alone: 4-bit packed bytes + float32
    absmax + the 16-entry code, 8-bit int8 + float32 row scales, plain floats in
    bfloat16, an LM head stored 4-bit dequantized to bfloat16, k_eq_v K stored twice,
    MoE experts stored bf16 (recipe t5) quantized at load like the checkpoint (blocksize
    64, float32 absmax; int8 + row scales)."""
    header = ref.checkpoint_header(ckpt)
    packed = layout["packed_modules"]
    experts_at_load = layout.get("moe", {}).get("recipe") == "t5"
    eight_bit = "int8" in packed.values()
    total = 0
    for key, meta in header.items():
        if key.endswith(STATE_SUFFIXES) or ".quant_state." in key:
            continue
        module = key.removesuffix(".weight")
        numel = math.prod(meta["shape"])
        if experts_at_load and "experts" in key.split(".") and meta["dtype"] == "BF16":
            rows = numel // meta["shape"][-1]
            total += numel + 4 * rows if eight_bit else numel // 2 + 4 * -(-numel // 64)
        elif packed.get(module) in ("nf4", "fp4"):
            # packed bytes may be stored in a wider dtype (bnb_4bit_quant_storage)
            nbytes = numel * _ITEMSIZE[meta["dtype"]]
            logical = 2 * nbytes
            if module.split(".")[-1] == "lm_head":
                total += 2 * logical
                continue
            blocks = math.prod(header[key + ".absmax"]["shape"])
            copies = 2 if _is_k_eq_v(module, header) else 1
            total += copies * (nbytes + 4 * blocks + 64)
        elif packed.get(module) == "int8":
            total += numel + 4 * meta["shape"][0]
        elif meta["dtype"] in ("BF16", "F16", "F32"):
            total += 2 * numel
        else:
            total += numel * _ITEMSIZE[meta["dtype"]]
    return total


def _is_k_eq_v(module: str, header: dict) -> bool:
    parent, _, leaf = module.rpartition(".")
    return leaf == "k_proj" and f"{parent}.v_proj.weight" not in header


# ------------------------------------------------------------------ broken checkpoints


# Defects in block-scale values: only --full reads the scales (the header says float16).
VALUE_DEFECTS = {"fp16-absmax-overflow"}


def _inspect(ckpt: Path, capsys, *flags: str) -> tuple[int, str, str]:
    code = main(["inspect", str(ckpt), "--no-vllm", *flags])
    out, err = capsys.readouterr()
    assert "Traceback" not in out + err
    return code, out, err


@pytest.mark.parametrize("case", sorted(CASES))
def test_inspect_on_broken_checkpoints_names_tensor_and_file(broken, case, capsys):  # noqa: F811
    ckpt = broken(case)
    code, out, err = _inspect(ckpt, capsys)
    if case in VALUE_DEFECTS:
        assert code == 0 and "absmax-narrowed" in out, out
        code, out, err = _inspect(ckpt, capsys, "--full")
    if case in EXPECTED_ERRORS:
        tensor, what, _ = EXPECTED_ERRORS[case]
        weights = "pytorch_model.bin" if case == "pickle-only" else "model.safetensors"
        assert code == 1 and err.startswith("error: "), out + err
        assert str(ckpt / weights) in err and tensor in err and what in err, err
    elif case == "fp16-absmax":
        assert code == 0 and "absmax-narrowed" in out and ".absmax" in out, out
        assert _inspect(ckpt, capsys, "--full")[0] == 0  # the values are fine
    elif CASES[case].loads:  # e.g. packed bytes stored as bf16: the same bytes, loaded
        assert code == 0 and "error" not in err, out + err
        assert "nf4" in out or "fp4" in out, out
    else:  # only the model class can tell (checked with vLLM below)
        assert CASES[case].needs_model
        assert code == 0 and "architecture-not-checked" in out, out


def test_inspect_json_on_a_broken_checkpoint_is_an_error_object(broken, capsys):  # noqa: F811
    ckpt = broken("missing-absmax")
    assert main(["inspect", str(ckpt), "--no-vllm", "--json"]) == 1
    result = json.loads(capsys.readouterr().out)
    assert result["checkpoint"] == str(ckpt) and ".absmax" in result["error"]


def test_inspect_json_has_every_section(tiny, capsys):
    assert main(["inspect", str(tiny["gemma4-untied-lm4bit"]), "--no-vllm", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    lm_head = next(m for m in result["modules"] if m["name"] == "lm_head")
    assert lm_head["kind"] == "nf4" and lm_head["built"] == "dequantized"
    assert result["loaded_bytes_total"] == sum(result["loaded_bytes_by_kind"].values())
    assert {"lm_head-quantized", "architecture-not-checked"} <= {
        p["code"] for p in result["problems"]}
    assert all(p["fix"] for p in result["problems"])
    assert set(result["tp_exact"]) == {"2", "4", "8"}


# ------------------------------------------------------------------ with vLLM's model class


ARCH_SCRIPT = textwrap.dedent("""
    import json, sys
    from vllm_bnb_mm.architecture import architecture_facts
    from vllm_bnb_mm.inspection import inspect_checkpoint
    for folder in sys.argv[1:]:
        report = inspect_checkpoint(folder, tp_sizes=(2,), architecture=architecture_facts)
        print("REPORT " + json.dumps(report.to_json()), flush=True)
""")


@pytest.fixture(scope="module")
def with_vllm(tiny, broken):  # noqa: F811
    """One process imports vLLM and builds each model class on the meta device."""
    names = ["gemma4-nf4-dq", "gemma4-untied-lm4bit", "gemma4-keqv-nf4", "gemma4-audio-nf4",
             "llama-nf4-dq", "llama-wide-nf4-dq", "llama-int8"]
    folders = [str(tiny[n]) for n in names] + [str(broken("unknown-module"))]
    result = subprocess.run(
        [sys.executable, "-c", ARCH_SCRIPT, *folders], capture_output=True, text=True,
        timeout=900, env={**os.environ, "VLLM_LOGGING_LEVEL": "ERROR"},
    )
    reports = [json.loads(line[7:]) for line in result.stdout.splitlines()
               if line.startswith("REPORT ")]
    assert len(reports) == len(folders), result.stderr[-3000:]
    return dict(zip([*names, "unknown-module"], reports, strict=True))


def test_with_vllm_every_packed_weight_of_a_good_checkpoint_has_its_layer(with_vllm, tiny):
    for name, report in with_vllm.items():
        if name == "unknown-module":
            continue
        assert report["architecture_checked"]
        assert not [p for p in report["problems"] if p["severity"] == "error"], name
        packed = _reference(tiny[name])["layout"]["packed_modules"]
        built = {m["name"]: m["built"] for m in report["modules"] if m["name"] in packed}
        expected = {m: "dequantized" if m == "lm_head" else "packed" for m in packed}
        assert built == expected, name


def test_with_vllm_a_packed_weight_without_a_module_is_an_error(with_vllm):
    report = with_vllm["unknown-module"]
    problem = next(p for p in report["problems"] if p["code"] == "module-not-in-architecture")
    assert problem["severity"] == "error" and problem["examples"] == [UNKNOWN_MODULE]
    assert "LlamaForCausalLM" in problem["message"]


def test_with_vllm_tp_cuts_follow_the_layer_classes(with_vllm):
    # llama-wide is sized so every TP=2 cut lands on a 64-element block; llama's o_proj
    # and down_proj inputs (64 and 128 columns) split into 32/64: o_proj's cut misses.
    assert with_vllm["llama-wide-nf4-dq"]["tp_exact"] == {"2": True}
    assert with_vllm["llama-nf4-dq"]["tp_exact"] == {"2": False}
    tp = next(p for p in with_vllm["llama-nf4-dq"]["problems"] if p["code"] == "tp-cut-not-exact")
    assert all(e.endswith(".o_proj") for e in tp["examples"]), tp
    assert with_vllm["llama-int8"]["tp_exact"] == {"2": True}  # 8-bit cuts are always exact


# ------------------------------------------------------------------ hub ids


HUB_SCRIPT = textwrap.dedent("""
    import sys
    from vllm_bnb_mm.cli import main
    print("FOUND", main(["inspect", "tiny-org/llama-nf4-dq", "--no-vllm", "--json"]))
    print("MISSING", main(["inspect", "tiny-org/not-there", "--no-vllm"]))
""")


def test_hub_id_resolves_through_the_offline_cache(tiny, tmp_path):
    """HF_HUB_OFFLINE=1: a hub id is looked up in the local Hugging Face cache only (the
    layout huggingface_hub writes: refs/main -> snapshots/<commit>/)."""
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = tmp_path / "hub" / "models--tiny-org--llama-nf4-dq"
    snapshot = repo / "snapshots" / commit
    snapshot.mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    for file in tiny["llama-nf4-dq"].iterdir():
        if file.suffix in (".json", ".safetensors"):
            (snapshot / file.name).symlink_to(file)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(tmp_path / "hub")}
    result = subprocess.run([sys.executable, "-c", HUB_SCRIPT], capture_output=True,
                            text=True, timeout=600, env=env)
    assert "FOUND 0" in result.stdout and "MISSING 1" in result.stdout, result.stderr[-3000:]
    report = json.loads(result.stdout.split("FOUND")[0])
    assert report["checkpoint"] == str(snapshot)
    assert "tiny-org/not-there" in result.stderr and "HF_HUB_OFFLINE" in result.stderr
    assert "Traceback" not in result.stderr


# ------------------------------------------------------------------ MoE


def test_moe_experts_left_unquantized_by_transformers_are_reported(tmp_path):
    """transformers 5 keeps MoE experts as 3-D parameters, which bitsandbytes does not
    quantize; save_pretrained writes them back per expert, in bf16, beside packed
    attention. A tiny Mixtral quantized the way users do it."""
    from transformers import BitsAndBytesConfig, MixtralConfig, MixtralForCausalLM

    config = MixtralConfig(
        vocab_size=128, hidden_size=64, intermediate_size=64, num_hidden_layers=1,
        num_attention_heads=2, num_key_value_heads=1, head_dim=32, num_local_experts=4,
        num_experts_per_tok=2, max_position_embeddings=64,
    )
    torch.manual_seed(0)
    MixtralForCausalLM(config).to(torch.bfloat16).save_pretrained(tmp_path / "bf16")
    MixtralForCausalLM.from_pretrained(
        tmp_path / "bf16", dtype=torch.bfloat16,
        quantization_config=BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4"),
    ).save_pretrained(tmp_path / "nf4")
    header = ref.checkpoint_header(tmp_path / "nf4")
    experts = sorted(k for k in header if ".experts." in k)
    assert experts and {header[k]["dtype"] for k in experts} == {"BF16"}  # what HF wrote
    assert header["model.layers.0.self_attn.q_proj.weight"]["dtype"] == "U8"

    report = inspect_checkpoint(str(tmp_path / "nf4"))
    problem = next(p for p in report.problems if p.code == "moe-experts-unquantized")
    assert problem.severity == "warning" and f"{len(experts)} MoE expert" in problem.message
    assert set(problem.examples) <= set(experts) and problem.examples
    assert "moe-experts-unquantized" not in _codes(inspect_checkpoint(str(tmp_path / "bf16")))

    # The loader quantizes those experts (nf4, blocksize 64): they count as 4-bit as
    # loaded, and the warning says so, and how to keep them as HF runs them.
    assert "quantizes them while loading" in problem.message
    assert "bnb_moe_experts" in problem.fix
    numels = [math.prod(header[k]["shape"]) for k in experts]
    assert report.loaded_bytes_by_kind["4bit quantized at load"] == sum(
        n // 2 + n // 64 * 4 for n in numels)
    # With `bnb_moe_experts: "unquantized"` they load as stored (bf16, 2 bytes each).
    config_path = tmp_path / "nf4" / "config.json"
    config_path.write_text(json.dumps({**json.loads(config_path.read_text()),
                                       "bnb_moe_experts": "unquantized"}))
    kept = inspect_checkpoint(str(tmp_path / "nf4"))
    assert "4bit quantized at load" not in kept.loaded_bytes_by_kind
    assert (kept.loaded_bytes_by_kind["plain"]
            == report.loaded_bytes_by_kind["plain"] + 2 * sum(numels))
    problem = next(p for p in kept.problems if p.code == "moe-experts-unquantized")
    assert "load in the model dtype" in problem.message
