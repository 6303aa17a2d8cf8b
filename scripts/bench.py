"""Benchmark: our BnB loader vs the incumbent (vllm-bnb-plugin) vs vLLM bf16 vs the read floor.

Usage::

    .venv/bin/python scripts/bench.py [--reps 3] [--quick] [--tokens 64] [--only NAME ...]

What it does, in one run:

1. Builds (once, cached under ``.cache/bench/<model>/``) a random-weight Gemma 4-shaped
   text+vision checkpoint (``Gemma4ForConditionalGeneration``, ~0.6 B parameters; ``--quick``:
   ~60 M) in bf16, and its bitsandbytes nf4 + double-quant version quantized by
   transformers + bitsandbytes on CPU.
2. Installs the incumbent ``vllm-bnb-plugin==0.0.3`` with ``--no-deps`` into
   ``.cache/bench/incumbent`` (on PYTHONPATH only for the incumbent's runs).
3. For each repetition, runs every contender in its own subprocess (fresh engine):
   - ``floor-nf4`` / ``floor-bf16``: safetensors ``safe_open`` + ``get_tensor().clone()`` of
     every tensor (page cache warm), the cost of just reading the bytes;
   - ``ours``: ``LLM(load_format="bitsandbytes")`` with only our plugin enabled;
   - ``incumbent``: the same with only vllm-bnb-plugin enabled;
   - ``native-bf16``: vLLM's default loader on the bf16 checkpoint, no BnB plugin.
   Engine contenders measure, in the process that loads the model (via a tiny general plugin
   ``bench_hook`` that wraps the loader returned by ``get_model_loader``): the loader's
   ``load_weights`` wall time (same boundary for every loader), the whole ``load_model`` wall
   time (model init + load_weights + post-processing), the loader class actually used, and the
   peak RSS of that process during ``load_model`` (sampled every 5 ms, and ``ru_maxrss``). Then
   what users feel: time to first token for a 600-token text prompt and for an image + text
   chat request, and greedy decode throughput (``ignore_eos``, fixed token-id prompts) at
   batch 1, 4 and 16.
4. Writes ``results/bench/latest.{md,json,png}``.

Engine settings (every engine contender alike): ``ENGINE_KWARGS`` below,
``VLLM_CPU_KVCACHE_SPACE=2``. Each contender's log goes to ``.cache/bench/logs/``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

REPO = Path(__file__).resolve().parent.parent
CACHE = REPO / ".cache" / "bench"
RESULTS = REPO / "results" / "bench"
INCUMBENT_SPEC = "vllm-bnb-plugin==0.0.3"
INCUMBENT_DIR = CACHE / "incumbent"
HOOK_DIR = CACHE / "hook"
LOG_DIR = CACHE / "logs"
BUILD_VERSION = "bench-ckpt-1"
ENGINE_TIMEOUT_S = 900
BATCHES = (1, 4, 16)
TTFT_TEXT_TOKENS = 600  # a long text prompt: one 600-token prefill step
TTFT_REPS = 3
IMAGE_SIZE = 768  # any size: the processor resizes to the model's 280 soft tokens
# Every engine contender alike. Prefix caching off: a repeated measurement must not be
# served from the KV cache of an earlier one. max_model_len fits the long prompts;
# max_num_seqs fits the largest decode batch.
ENGINE_KWARGS: dict[str, Any] = dict(
    dtype="bfloat16", enforce_eager=True, max_model_len=1024, max_num_seqs=max(BATCHES),
    seed=0, enable_prefix_caching=False,
    limit_mm_per_prompt={"image": 1, "audio": 0, "video": 0},
)


def log(msg: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", flush=True)


# ============================================================================================
# Checkpoint
# ============================================================================================


@dataclass(frozen=True)
class ModelSpec:
    name: str
    vocab: int
    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    global_head_dim: int
    ple_dim: int  # hidden_size_per_layer_input (multiple of 64 for the BnB CPU kernel)
    sliding_window: int
    v_hidden: int
    v_intermediate: int
    v_layers: int
    v_heads: int
    soft_tokens: int  # vision default_output_length == processor max_soft_tokens

    def layer_types(self) -> list[str]:
        # Gemma 4 pattern: 5 sliding : 1 full, last layer full.
        types = ["full_attention" if (i + 1) % 6 == 0 else "sliding_attention"
                 for i in range(self.layers)]
        types[-1] = "full_attention"
        return types


FULL = ModelSpec(
    name="gemma4-mid", vocab=32768, hidden=1536, intermediate=6144, layers=12, heads=8,
    kv_heads=2, head_dim=256, global_head_dim=512, ple_dim=128, sliding_window=512,
    v_hidden=384, v_intermediate=1536, v_layers=4, v_heads=6, soft_tokens=280,
)
QUICK = ModelSpec(
    name="gemma4-small", vocab=8192, hidden=512, intermediate=2048, layers=4, heads=4,
    kv_heads=1, head_dim=128, global_head_dim=256, ple_dim=64, sliding_window=512,
    v_hidden=128, v_intermediate=512, v_layers=1, v_heads=2, soft_tokens=70,
)

SPECIAL = ["<pad>", "<eos>", "<bos>", "<unk>", "<mask>"]
NAMED = {
    "sot_token": "<|turn>", "eot_token": "<turn|>", "boi_token": "<|image>",
    "eoi_token": "<image|>", "image_token": "<|image|>", "boa_token": "<|audio>",
    "eoa_token": "<audio|>", "audio_token": "<|audio|>", "soc_token": "<|channel>",
    "eoc_token": "<channel|>", "think_token": "<|think|>", "escape_token": '<|"|>',
    "str_token": "<|tool_response>", "etr_token": "<tool_response|>",
    "stc_token": "<|tool_call>", "etc_token": "<tool_call|>", "std_token": "<|tool>",
    "etd_token": "<tool|>",
}
VIDEO = "<|video|>"
CORPUS = (
    "The quick brown fox jumps over the lazy dog. A model reads tokens and looks at images. "
    "Once upon a time there was a small cat who lived in a green house near the river. "
    "We went to the market to buy bread, milk, cheese, eggs and fresh fruit. "
    "one two three four five six seven eight nine ten 0 1 2 3 4 5 6 7 8 9"
)


def _tokenizer(vocab_size: int):
    """Byte-fallback BPE padded to ``vocab_size`` with <unusedN>, saved as GemmaTokenizer."""
    from tokenizers import Tokenizer, models, normalizers, trainers
    from transformers import GemmaTokenizer

    from tiny_families.gemma4 import CHAT_TEMPLATE

    reserved = SPECIAL + list(NAMED.values()) + [VIDEO]
    prefix = reserved + [f"<0x{i:02X}>" for i in range(256)]
    bpe = Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=True))
    bpe.normalizer = normalizers.Replace(" ", "▁")
    bpe.train_from_iterator([CORPUS], trainers.BpeTrainer(vocab_size=200, show_progress=False))
    vocab = {tok: i for i, tok in enumerate(prefix)}
    for tok, _ in sorted(bpe.get_vocab().items(), key=lambda kv: kv[1]):
        vocab.setdefault(tok, len(vocab))
    while len(vocab) < vocab_size:
        vocab[f"<unused{len(vocab)}>"] = len(vocab)
    merges = [tuple(m) for m in json.loads(bpe.to_str())["model"]["merges"]]
    return GemmaTokenizer(
        vocab=vocab, merges=merges, add_bos_token=False, padding_side="left",
        extra_special_tokens=dict(NAMED), chat_template=CHAT_TEMPLATE,
    )


def _save_bf16(spec: ModelSpec, out: Path) -> int:
    import torch
    from transformers import Gemma4Config, Gemma4ForConditionalGeneration, Gemma4Processor
    from transformers.models.gemma4.feature_extraction_gemma4 import (
        Gemma4AudioFeatureExtractor,
    )
    from transformers.models.gemma4.image_processing_gemma4 import Gemma4ImageProcessor
    from transformers.models.gemma4.video_processing_gemma4 import Gemma4VideoProcessor

    tok = _tokenizer(spec.vocab)
    ids = tok.convert_tokens_to_ids
    text = {
        "vocab_size": spec.vocab, "hidden_size": spec.hidden,
        "intermediate_size": spec.intermediate, "num_hidden_layers": spec.layers,
        "layer_types": spec.layer_types(), "num_attention_heads": spec.heads,
        "num_key_value_heads": spec.kv_heads, "head_dim": spec.head_dim,
        "global_head_dim": spec.global_head_dim, "sliding_window": spec.sliding_window,
        "final_logit_softcapping": 30.0, "hidden_size_per_layer_input": spec.ple_dim,
        "vocab_size_per_layer_input": spec.vocab, "max_position_embeddings": 8192,
        "tie_word_embeddings": True, "pad_token_id": tok.pad_token_id,
        "bos_token_id": tok.bos_token_id, "eos_token_id": tok.eos_token_id,
    }
    vision = {
        "hidden_size": spec.v_hidden, "intermediate_size": spec.v_intermediate,
        "num_hidden_layers": spec.v_layers, "num_attention_heads": spec.v_heads,
        "num_key_value_heads": spec.v_heads, "head_dim": 64, "patch_size": 16,
        "pooling_kernel_size": 3, "position_embedding_size": 10240,
        "default_output_length": spec.soft_tokens,
    }
    config = Gemma4Config(
        text_config=text, vision_config=vision, audio_config=None, tie_word_embeddings=True,
        image_token_id=ids(NAMED["image_token"]), boi_token_id=ids(NAMED["boi_token"]),
        eoi_token_id=ids(NAMED["eoi_token"]), video_token_id=ids(VIDEO),
        audio_token_id=ids(NAMED["audio_token"]), boa_token_id=ids(NAMED["boa_token"]),
        eoa_token_index=ids(NAMED["eoa_token"]),
    )
    torch.manual_seed(1234)
    prev = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        model = Gemma4ForConditionalGeneration(config)
    finally:
        torch.set_default_dtype(prev)
    # Seeded redraw with fan-in scaled weights (HF's init leaves some tensors at 0/1/inf).
    gen = torch.Generator().manual_seed(1234)
    with torch.no_grad():
        for name, p in model.named_parameters():
            leaf = name.rsplit(".", 1)[-1]
            if p.ndim == 1:
                p.copy_(1.0 + 0.1 * torch.randn(p.shape, generator=gen))
            elif "embed" in name or leaf == "position_embedding_table":
                p.copy_(0.05 * torch.randn(p.shape, generator=gen))
            else:
                fan_in = p[0].numel()
                p.copy_(torch.randn(p.shape, generator=gen) / fan_in**0.5)
    model.generation_config.eos_token_id = [tok.eos_token_id, ids("<turn|>")]
    model.to(torch.bfloat16).save_pretrained(out)
    n_params = sum(p.numel() for p in model.parameters())
    del model
    Gemma4Processor(
        feature_extractor=Gemma4AudioFeatureExtractor(),
        image_processor=Gemma4ImageProcessor(max_soft_tokens=spec.soft_tokens),
        tokenizer=tok, video_processor=Gemma4VideoProcessor(),
        chat_template=tok.chat_template, image_seq_length=spec.soft_tokens,
    ).save_pretrained(out)
    return n_params


def _quantize(bf16: Path, out: Path) -> None:
    import torch
    from transformers import BitsAndBytesConfig, Gemma4ForConditionalGeneration

    cfg = BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=torch.bfloat16,
    )
    model = Gemma4ForConditionalGeneration.from_pretrained(
        bf16, quantization_config=cfg, dtype=torch.bfloat16, device_map="cpu"
    )
    model.save_pretrained(out)
    del model
    for f in bf16.iterdir():
        if f.is_file() and not (out / f.name).exists():
            shutil.copy2(f, out / f.name)


def _safetensors(folder: Path) -> list[Path]:
    return sorted(folder.glob("*.safetensors"))


def _checkpoint_summary(folder: Path) -> dict[str, Any]:
    from safetensors import safe_open

    counts: dict[str, int] = {}
    n_packed = 0
    for f in _safetensors(folder):
        with safe_open(str(f), "pt") as sf:
            for k in sf.keys():
                dt = str(sf.get_slice(k).get_dtype())
                counts[dt] = counts.get(dt, 0) + 1
                if k.endswith(".weight.quant_map"):
                    n_packed += 1
    size = sum(f.stat().st_size for f in _safetensors(folder))
    return {"bytes": size, "tensors_by_dtype": counts, "packed_linears": n_packed,
            "files": [f.name for f in _safetensors(folder)]}


def build_checkpoints(spec: ModelSpec) -> dict[str, Any]:
    root = CACHE / spec.name
    stamp = root / "build.json"
    key = {"version": BUILD_VERSION, "spec": spec.__dict__}
    if stamp.exists():
        info = json.loads(stamp.read_text())
        if info.get("key") == key:
            log(f"checkpoints cached in {root}")
            return info
    log(f"building {spec.name} checkpoints in {root} (one-time)")
    if root.exists():
        shutil.rmtree(root)
    root.mkdir(parents=True)
    t0 = time.monotonic()
    n_params = _save_bf16(spec, root / "bf16")
    log(f"  bf16 saved: {n_params / 1e6:.0f} M params ({time.monotonic() - t0:.0f} s)")
    t1 = time.monotonic()
    # Quantize in a child: transformers+bnb hold on to memory, and the parent stays small.
    subprocess.run(
        [sys.executable, __file__, "_quantize", str(root / "bf16"), str(root / "nf4")],
        check=True,
    )
    log(f"  nf4 saved ({time.monotonic() - t1:.0f} s)")
    info = {
        "key": key, "params": n_params, "architecture": "Gemma4ForConditionalGeneration",
        "bf16": _checkpoint_summary(root / "bf16"), "nf4": _checkpoint_summary(root / "nf4"),
        "build_s": round(time.monotonic() - t0, 1),
    }
    stamp.write_text(json.dumps(info, indent=1))
    return info


# ============================================================================================
# Incumbent + measurement hook
# ============================================================================================


PYCACHE = CACHE / "pycache"


def setup_bytecode_cache() -> None:
    """This environment sets PYTHONDONTWRITEBYTECODE and ships no .pyc files, so every vLLM
    process (driver, model-info probe, engine core, worker: all spawned) would compile vLLM,
    torch and transformers from source, ~20 s each on this box. Keep compiled bytecode in a
    private prefix instead (the venv stays untouched); it only shortens engine start-up."""
    os.environ["PYTHONPYCACHEPREFIX"] = str(PYCACHE)
    os.environ.pop("PYTHONDONTWRITEBYTECODE", None)
    import sysconfig

    dirs = [sysconfig.get_paths()["stdlib"], sysconfig.get_paths()["purelib"],
            str(REPO / "vllm_bnb_mm"), str(INCUMBENT_DIR)]
    t = time.monotonic()
    subprocess.run([sys.executable, "-m", "compileall", "-q", "-j", "2", *dirs],
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=False)
    log(f"bytecode cache ready in {PYCACHE} ({time.monotonic() - t:.0f} s)")


def build_cpu_kernels() -> None:
    """Our CPU kernels are compiled once per machine into VLLM_CACHE_ROOT, on the first
    engine's first use: ~1 s inside `load_weights`, which would land in the first
    repetition only. Build them before the timed runs, and say what that one-time cost is."""
    env = dict(os.environ, VLLM_CACHE_ROOT=str(CACHE / "vllm-cache"))
    code = ("import time; from vllm_bnb_mm import cpu; t = time.monotonic(); "
            "lib = cpu.kernels(); print(lib is not None, f'{time.monotonic() - t:.1f}')")
    out = subprocess.run([sys.executable, "-c", code], env=env, cwd=REPO, capture_output=True,
                         text=True, check=True).stdout.split()
    log(f"our CPU kernels: built={out[-2]} in {out[-1]} s (compiled once per machine; "
        f"cached in {CACHE / 'vllm-cache'})")


def install_incumbent() -> str:
    marker = INCUMBENT_DIR / "vllm_bnb_plugin" / "__init__.py"
    if not marker.exists():
        log(f"installing {INCUMBENT_SPEC} --no-deps into {INCUMBENT_DIR}")
        subprocess.run(
            [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target",
             str(INCUMBENT_DIR), INCUMBENT_SPEC], check=True,
        )
    dist = next(INCUMBENT_DIR.glob("vllm_bnb_plugin-*.dist-info"))
    return dist.name.removeprefix("vllm_bnb_plugin-").removesuffix(".dist-info")


# A general plugin (found through its dist-info on PYTHONPATH, like the incumbent) that vLLM
# loads in every process. It wraps the loader that get_model() gets, so every contender is
# timed at the same boundaries in the process that really loads the model.
HOOK_SRC = r'''
"""bench_hook: times vLLM model loading (generated by scripts/bench.py)."""
import json, os, resource, threading, time, traceback

_done = False


def _rss_bytes():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class _Sampler(threading.Thread):
    def __init__(self):
        super().__init__(daemon=True)
        self.peak = _rss_bytes()
        self.stop = threading.Event()

    def run(self):
        while not self.stop.wait(0.005):
            self.peak = max(self.peak, _rss_bytes())


def _start_pyspy(out):
    """Profiling runs only: sample this process with py-spy until _stop_pyspy."""
    if not out:
        return None
    import subprocess

    spy = subprocess.Popen(
        [os.environ["BENCH_PYSPY_BIN"], "record", "--pid", str(os.getpid()), "--rate", "100",
         "--nonblocking", "--format", "raw", "-o", out],
        stdout=subprocess.DEVNULL, stderr=open(out + ".log", "w"),
        preexec_fn=lambda: os.sched_setaffinity(0, range(os.cpu_count())),
    )
    time.sleep(2.0)  # let it attach
    return spy


def _stop_pyspy(spy):
    if spy is not None:
        import signal

        spy.send_signal(signal.SIGINT)
        spy.wait(timeout=60)


def _write(rec):
    path = os.environ.get("BENCH_RECORD")
    if path:
        with open(path, "a") as f:
            f.write(json.dumps(rec) + "\n")


def _wrap(loader):
    cls = type(loader)
    rec = {"pid": os.getpid(), "loader": f"{cls.__module__}.{cls.__qualname__}"}

    def load_weights(model, model_config):
        t = time.perf_counter()
        try:
            return cls.load_weights(loader, model, model_config)
        finally:
            rec["load_weights_s"] = time.perf_counter() - t

    def load_model(vllm_config, model_config=None, prefix="", **kw):
        qc = getattr(vllm_config, "quant_config", None)
        if qc is not None:
            rec["quant_config"] = f"{type(qc).__module__}.{type(qc).__qualname__}"
        spy = _start_pyspy(os.environ.get("BENCH_PYSPY_LOAD"))
        rec["rss_before_mb"] = _rss_bytes() / 2**20
        sampler = _Sampler()
        sampler.start()
        t = time.perf_counter()
        try:
            model = cls.load_model(loader, vllm_config, model_config, prefix, **kw)
            rec["ok"] = True
            return model
        except BaseException as e:
            rec["ok"] = False
            rec["error"] = f"{type(e).__name__}: {e}"
            rec["traceback"] = traceback.format_exc()[-4000:]
            raise
        finally:
            rec["load_model_s"] = time.perf_counter() - t
            _stop_pyspy(spy)
            sampler.stop.set()
            sampler.join()
            rec["rss_peak_mb"] = max(sampler.peak, _rss_bytes()) / 2**20
            rec["rss_after_mb"] = _rss_bytes() / 2**20
            rec["ru_maxrss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
            _write(rec)

    loader.load_weights = load_weights
    loader.load_model = load_model
    return loader


def register():
    global _done
    if _done:
        return
    _done = True
    import vllm.model_executor.model_loader as ml

    orig = ml.get_model_loader
    if getattr(orig, "_bench_hook", False):
        return

    def get_model_loader(load_config):
        return _wrap(orig(load_config))

    get_model_loader._bench_hook = True
    ml.get_model_loader = get_model_loader
'''


def install_hook() -> None:
    HOOK_DIR.mkdir(parents=True, exist_ok=True)
    (HOOK_DIR / "bench_hook.py").write_text(HOOK_SRC.lstrip())
    dist = HOOK_DIR / "bench_hook-0.0.0.dist-info"
    dist.mkdir(exist_ok=True)
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: bench-hook\nVersion: 0.0.0\n")
    (dist / "entry_points.txt").write_text(
        "[vllm.general_plugins]\nbench_hook = bench_hook:register\n"
    )


# ============================================================================================
# Contenders
# ============================================================================================


@dataclass(frozen=True)
class Contender:
    name: str
    label: str
    kind: str  # "floor" | "engine"
    ckpt: str  # "nf4" | "bf16"
    plugins: str = ""  # VLLM_PLUGINS besides bench_hook
    bnb: bool = False
    expect_loader: str = ""  # substring of the loader class that must have run


CONTENDERS = [
    Contender("floor-nf4", "read floor (nf4 file)", "floor", "nf4"),
    Contender("floor-bf16", "read floor (bf16 file)", "floor", "bf16"),
    Contender("ours", "ours (vllm-bnb-mm)", "engine", "nf4", "bitsandbytes_mm", True,
              "vllm_bnb_mm.loader.BnbModelLoader"),
    Contender("incumbent", "incumbent (vllm-bnb-plugin 0.0.3)", "engine", "nf4",
              "bitsandbytes", True, "vllm_bnb_plugin.bitsandbytes_loader."),
    Contender("native-bf16", "vLLM native bf16", "engine", "bf16", "", False,
              "vllm.model_executor.model_loader.default_loader.DefaultModelLoader"),
]
BY_NAME = {c.name: c for c in CONTENDERS}


def contender_env(c: Contender, record: Path) -> dict[str, str]:
    env = dict(os.environ)
    paths = [str(HOOK_DIR)]
    if c.name == "incumbent":
        paths.append(str(INCUMBENT_DIR))
    old = env.get("PYTHONPATH")
    env["PYTHONPATH"] = os.pathsep.join(paths + ([old] if old else []))
    env["VLLM_PLUGINS"] = ",".join(p for p in ("bench_hook", c.plugins) if p)
    env.update({
        "BENCH_RECORD": str(record),
        "VLLM_CPU_KVCACHE_SPACE": "2",
        "HF_HUB_OFFLINE": "1",
        "TOKENIZERS_PARALLELISM": "false",
        "VLLM_CACHE_ROOT": str(CACHE / "vllm-cache"),
        "TORCHINDUCTOR_CACHE_DIR": str(CACHE / "inductor-cache"),
        "VLLM_NO_USAGE_STATS": "1",
        "DO_NOT_TRACK": "1",
        "PYTHONUNBUFFERED": "1",
    })
    return env


def prompts(n: int, vocab: int) -> list[list[int]]:
    """Fixed token-id prompts (16 tokens, distinct per sequence), no tokenizer involved."""
    base = 300  # past the special and byte tokens
    return [[2] + [base + (7 * i + 13 * j) % (min(vocab, 4096) - base) for i in range(15)]
            for j in range(n)]


def worker_floor(args: argparse.Namespace) -> dict[str, Any]:
    """The read floor: every tensor of the file read with safe_open + get_tensor().clone()
    (get_tensor alone is an mmap view and reads nothing). "stream" drops each copy (what the
    anchor numbers measure); "keep" holds them all, as a loader must, so it also pays the page
    faults of fresh memory and gives the RSS bound."""
    import resource

    import torch
    from safetensors import safe_open

    files = _safetensors(Path(args.ckpt))
    torch.set_num_threads(1)

    def read_all(keep: list | None) -> int:
        total = 0
        for f in files:
            with safe_open(str(f), "pt") as sf:
                for k in sf.keys():
                    t = sf.get_tensor(k).clone()
                    total += t.numel() * t.element_size()
                    if keep is not None:
                        keep.append(t)
                    del t
        return total

    read_all(None)  # page cache and code paths warm
    stream = []
    for _ in range(3):
        t = time.perf_counter()
        total = read_all(None)
        stream.append(time.perf_counter() - t)
    rss_before = _rss_mb()
    kept: list = []
    t = time.perf_counter()
    read_all(kept)
    dt_keep = time.perf_counter() - t
    return {
        "ok": True, "load_weights_s": statistics.median(stream), "stream_s": stream,
        "keep_s": dt_keep, "bytes": total, "rss_before_mb": rss_before,
        "rss_peak_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "loader": "safetensors safe_open + get_tensor().clone()",
    }


def _rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def worker_engine(args: argparse.Namespace) -> dict[str, Any]:
    import psutil

    c = BY_NAME[args.contender]
    out: dict[str, Any] = {"ok": False}
    tree_peak = [0]
    stop = threading.Event()

    def sample_tree() -> None:
        me = psutil.Process()
        while not stop.wait(0.05):
            try:
                procs = [me] + me.children(recursive=True)
                total = 0
                for p in procs:
                    try:
                        total += p.memory_info().rss
                    except psutil.Error:
                        pass
                tree_peak[0] = max(tree_peak[0], total)
            except psutil.Error:
                pass

    sampler = threading.Thread(target=sample_tree, daemon=True)
    sampler.start()
    from vllm import LLM, SamplingParams

    kwargs: dict[str, Any] = dict(ENGINE_KWARGS, model=args.ckpt)
    if c.bnb:
        kwargs.update(quantization="bitsandbytes", load_format="bitsandbytes")
    t0 = time.perf_counter()
    try:
        llm = LLM(**kwargs)
    except BaseException as e:  # the incumbent may not support this model
        stop.set()
        out["error"] = f"{type(e).__name__}: {e}"
        out["engine_init_s"] = time.perf_counter() - t0
        out["tree_peak_rss_mb"] = tree_peak[0] / 2**20
        return out
    out["engine_init_s"] = time.perf_counter() - t0
    stop.set()
    out["tree_peak_rss_mb"] = tree_peak[0] / 2**20
    spy = _Spy(os.environ.get("BENCH_PYSPY_BIN"), os.environ.get("BENCH_PYSPY_RUN"))
    # Warm-up: first requests pay one-time costs (kernels, allocator, image processor).
    t = time.perf_counter()
    greedy = dict(temperature=0.0, ignore_eos=True, detokenize=False)
    llm.generate([{"prompt_token_ids": p} for p in prompts(4, args.vocab)],
                 SamplingParams(max_tokens=4, **greedy), use_tqdm=False)
    ttft_text(llm, SamplingParams, args.vocab, seed=-1)
    ttft_image(llm, SamplingParams, seed=-1)
    out["warmup_s"] = time.perf_counter() - t
    out["ttft"] = {}
    for phase, measure in (("text", ttft_text), ("image", ttft_image)):
        runs = []
        with spy(f"ttft-{phase}"):
            for rep in range(TTFT_REPS):
                runs.append(measure(llm, SamplingParams, args.vocab, seed=rep)
                            if phase == "text" else measure(llm, SamplingParams, seed=rep))
        out["ttft"][phase] = {"seconds": [r[0] for r in runs], "prompt_tokens": runs[0][1]}
        log(f"    {c.name}: TTFT {phase} ({runs[0][1]} prompt tokens): "
            + ", ".join(f"{r[0]:.3f}" for r in runs) + " s")
    decode: dict[str, Any] = {}
    for b in BATCHES:
        sp = SamplingParams(max_tokens=args.tokens, **greedy)
        batch = [{"prompt_token_ids": p} for p in prompts(b, args.vocab)]
        with spy(f"decode-b{b}"):
            t = time.perf_counter()
            res = llm.generate(batch, sp, use_tqdm=False)
            dt = time.perf_counter() - t
        n = sum(len(r.outputs[0].token_ids) for r in res)
        decode[str(b)] = {"tokens": n, "seconds": dt, "tok_s": n / dt,
                          "first_ids": list(res[0].outputs[0].token_ids[:8])}
        log(f"    {c.name}: batch {b}: {n} tokens in {dt:.2f} s = {n / dt:.2f} tok/s")
    out["decode"] = decode
    out["ok"] = True
    return out


def long_text_prompt(vocab: int, seed: int) -> list[int]:
    """TTFT_TEXT_TOKENS fixed token ids, different per seed (no prefix shared with another
    measurement, so no cache can serve it)."""
    base = 300  # past the special and byte tokens
    span = min(vocab, 4096) - base
    return [2] + [base + (11 * i + 101 * (seed + 2)) % span for i in range(TTFT_TEXT_TOKENS - 1)]


def ttft_text(llm, sampling_params, vocab: int, seed: int) -> tuple[float, int]:
    """Wall time of a one-token generation for a long text prompt: prefill + first token."""
    prompt = {"prompt_token_ids": long_text_prompt(vocab, seed)}
    t = time.perf_counter()
    llm.generate([prompt], sampling_params(max_tokens=1, temperature=0.0, detokenize=False),
                 use_tqdm=False)
    return time.perf_counter() - t, len(prompt["prompt_token_ids"])


def ttft_image(llm, sampling_params, seed: int) -> tuple[float, int]:
    """Wall time of a one-token chat answer to an image + a question, as a user sends it:
    image processing, vision tower, prefill, first token. A new random image each time."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed + 7)
    image = Image.fromarray(rng.integers(0, 256, (IMAGE_SIZE, IMAGE_SIZE, 3), dtype=np.uint8))
    messages = [{"role": "user", "content": [
        {"type": "image_pil", "image_pil": image},
        {"type": "text", "text": "What is in this picture? Describe it in one sentence."},
    ]}]
    t = time.perf_counter()
    res = llm.chat(messages, sampling_params(max_tokens=1, temperature=0.0, detokenize=False),
                   use_tqdm=False)
    return time.perf_counter() - t, len(res[0].prompt_token_ids)


class _Spy:
    """Profiling runs only: py-spy on the engine worker (the process that loaded the
    model) for the duration of one phase."""

    def __init__(self, exe: str | None, prefix: str | None) -> None:
        self.exe, self.prefix, self.pid = exe, prefix, None
        if exe and prefix:
            recs = Path(os.environ["BENCH_RECORD"]).read_text().splitlines()
            self.pid = json.loads(recs[-1])["pid"] if recs else None

    @contextlib.contextmanager
    def __call__(self, phase: str):
        if self.pid is None:
            yield
            return
        proc = subprocess.Popen(
            [self.exe, "record", "--pid", str(self.pid), "--rate", "100", "--nonblocking",
             "--format", "raw", "-o", f"{self.prefix}-{phase}.txt"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )
        time.sleep(2.0)
        try:
            yield
        finally:
            proc.send_signal(signal.SIGINT)
            proc.wait(timeout=60)


def run_contender(c: Contender, ckpts: dict[str, Path], rep: int | str, vocab: int,
                  tokens: int, extra_env: dict[str, str] | None = None) -> dict[str, Any]:
    LOG_DIR.mkdir(parents=True, exist_ok=True)
    logfile = LOG_DIR / (f"{c.name}-rep{rep}.log" if isinstance(rep, int)
                         else f"{c.name}-{rep}.log")
    record = Path(tempfile.mkstemp(prefix="rec-", suffix=".jsonl", dir=CACHE)[1])
    result_file = Path(tempfile.mkstemp(prefix="res-", suffix=".json", dir=CACHE)[1])
    # Page cache warm for every contender alike.
    for f in _safetensors(ckpts[c.ckpt]):
        with open(f, "rb") as fh:
            while fh.read(1 << 24):
                pass
    cmd = [sys.executable, __file__, "_worker", "--contender", c.name,
           "--ckpt", str(ckpts[c.ckpt]), "--vocab", str(vocab), "--tokens", str(tokens),
           "--result", str(result_file)]
    load_before = os.getloadavg()[0]
    t0 = time.monotonic()
    with open(logfile, "w") as lf:
        env = contender_env(c, record) | (extra_env or {})
        proc = subprocess.Popen(cmd, env=env, stdout=lf,
                                stderr=subprocess.STDOUT, start_new_session=True)
        try:
            rc = proc.wait(timeout=ENGINE_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            rc = "timeout"
    try:  # leftovers of the engine (its worker processes) go with the session
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    wall = time.monotonic() - t0
    try:
        res = json.loads(result_file.read_text())
    except (OSError, ValueError):
        res = {"ok": False}
    recs = [json.loads(line) for line in record.read_text().splitlines() if line.strip()]
    record.unlink(missing_ok=True)
    result_file.unlink(missing_ok=True)
    res.update({"contender": c.name, "rep": rep, "rc": rc, "wall_s": wall,
                "loadavg1_before": load_before, "loadavg1_after": os.getloadavg()[0],
                "log": str(logfile.relative_to(REPO))})
    text = logfile.read_text(errors="replace")
    if c.kind == "engine":
        loads = [r for r in recs if "load_model_s" in r]
        if loads:
            hook = loads[-1]
            res["hook"] = hook
            res["loader"] = hook["loader"]
            res["quant_config"] = hook.get("quant_config")
            res["load_weights_s"] = hook.get("load_weights_s")
            res["load_model_s"] = hook.get("load_model_s")
            res["rss_peak_mb"] = hook.get("rss_peak_mb")
            res["rss_before_mb"] = hook.get("rss_before_mb")
            if not hook.get("ok"):
                res["ok"] = False
                res["error"] = hook.get("error")
                res["traceback"] = hook.get("traceback")
        else:
            res.setdefault("error", "no load record (the hook plugin did not run)")
            res["ok"] = False
        m = re.search(r"Loading weights took ([\d.]+) seconds", text)
        res["vllm_logged_loading_weights_s"] = float(m.group(1)) if m else None
        if res.get("loader") and c.expect_loader not in res["loader"]:
            res["ok"] = False
            res["error"] = f"wrong plugin active: loader {res['loader']}"
        if not res.get("ok") and not res.get("error"):
            errs = [ln for ln in text.splitlines() if "Error" in ln or "error" in ln]
            res["error"] = errs[-1][-500:] if errs else f"exit {rc}, see {logfile}"
    return res


PROFILE_PHASES = (
    # phase, file suffix, root frame (stacks outside it are other threads / idle polling)
    ("load", "-load.txt", "load_model (bench_hook.py"),
    ("TTFT long text prompt", "-ttft-text.txt", "GPUModelRunner.execute_model ("),
    ("TTFT image + text", "-ttft-image.txt", "GPUModelRunner.execute_model ("),
    ("decode batch 1", "-decode-b1.txt", "GPUModelRunner.execute_model ("),
    ("decode batch 16", "-decode-b16.txt", "GPUModelRunner.execute_model ("),
)


def ensure_pyspy() -> str | None:
    exe = Path(sys.executable).parent / "py-spy"
    if not exe.exists():
        log("installing py-spy into the venv (for --profile)")
        subprocess.run([sys.executable, "-m", "pip", "install", "-q", "py-spy"], check=False)
    return str(exe) if exe.exists() else shutil.which("py-spy")


def summarize_profile(path: Path, root: str, top: int = 12) -> dict[str, Any] | None:
    """Top leaf frames and top functions (inclusive) of py-spy raw (collapsed) stacks."""
    if not path.exists():
        return None
    leaf: dict[str, int] = {}
    incl: dict[str, int] = {}
    total = 0

    def short(frame: str) -> str:
        return re.sub(r"\((?:/[^()]*?/)?(?:site-packages|work/main)/", "(", frame)

    for line in path.read_text(errors="replace").splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        frames = stack.split(";")
        at = next((k for k, fr in enumerate(frames) if root in fr), None)
        if at is None:
            continue
        frames = frames[at:]
        n = int(count)
        total += n
        key = short(frames[-1])
        leaf[key] = leaf.get(key, 0) + n
        for fn in {re.sub(r":\d+\)$", ")", short(fr)) for fr in frames}:
            incl[fn] = incl.get(fn, 0) + n
    if not total:
        return None
    # Drop the wrapper chain above the root and generic dispatch frames.
    generic = ("torch/nn/modules/module.py", "torch/_ops.py", "torch/_compile.py",
               "torch/_dynamo/", "torch/library.py", "torch/utils/_contextlib.py",
               "vllm/compilation/decorators.py", "vllm/ir/op.py", "vllm/tracing/",
               "CustomOp.forward", "<frozen importlib")
    inner = [(k, v) for k, v in incl.items()
             if v < total and not any(x in k for x in generic)]
    return {
        "root": root, "samples": total,
        "self": [(k, 100 * v / total)
                 for k, v in sorted(leaf.items(), key=lambda kv: -kv[1])[:top]],
        "inclusive": [(k, 100 * v / total)
                      for k, v in sorted(inner, key=lambda kv: -kv[1])[:top + 8]],
    }


def run_profiles(names: list[str], ckpts: dict[str, Path], vocab: int,
                 tokens: int) -> list[dict[str, Any]]:
    spy = ensure_pyspy()
    if spy is None:
        log("py-spy not available; skipping profiles")
        return []
    out_dir = CACHE / "profiles"
    out_dir.mkdir(parents=True, exist_ok=True)
    profiles = []
    for name in names:
        c = BY_NAME[name]
        if c.kind != "engine":
            continue
        for _, suffix, _ in PROFILE_PHASES:
            (out_dir / f"{name}{suffix}").unlink(missing_ok=True)
        log(f"profile run (py-spy, not measured): {name} ...")
        env = {"BENCH_PYSPY_BIN": spy,
               "BENCH_PYSPY_LOAD": str(out_dir / f"{name}-load.txt"),
               "BENCH_PYSPY_RUN": str(out_dir / name)}
        r = run_contender(c, ckpts, "profile", vocab, tokens, extra_env=env)
        if not r.get("ok"):
            log(f"  {name}: profile run failed: {(r.get('error') or '')[:200]}")
        for phase, suffix, root in PROFILE_PHASES:
            summary = summarize_profile(out_dir / f"{name}{suffix}", root)
            if summary:
                profiles.append({"contender": name, "phase": phase,
                                 "file": str((out_dir / f"{name}{suffix}").relative_to(REPO)),
                                 **summary})
    return profiles


# ============================================================================================
# Report
# ============================================================================================


def stats(vals: list[float]) -> dict[str, float] | None:
    vals = [v for v in vals if v is not None]
    if not vals:
        return None
    return {"min": min(vals), "median": statistics.median(vals), "max": max(vals), "n": len(vals)}


def aggregate(runs: list[dict[str, Any]]) -> dict[str, Any]:
    agg: dict[str, Any] = {}
    for c in CONTENDERS:
        rs = [r for r in runs if r["contender"] == c.name]
        if not rs:
            continue
        ok = [r for r in rs if r.get("ok")]
        a: dict[str, Any] = {
            "label": c.label, "runs": len(rs), "ok_runs": len(ok),
            "errors": sorted({r.get("error") or "" for r in rs if not r.get("ok")}),
            "loaders": sorted({r.get("loader") for r in rs if r.get("loader")}),
            "load_weights_s": stats([r.get("load_weights_s") for r in ok]),
            "load_model_s": stats([r.get("load_model_s") for r in ok]),
            "rss_peak_mb": stats([r.get("rss_peak_mb") for r in ok]),
            "rss_before_mb": stats([r.get("rss_before_mb") for r in ok]),
            "rss_growth_mb": stats([r["rss_peak_mb"] - r["rss_before_mb"] for r in ok
                                    if r.get("rss_peak_mb") and r.get("rss_before_mb")]),
            "keep_s": stats([r.get("keep_s") for r in ok]),
            "engine_init_s": stats([r.get("engine_init_s") for r in ok]),
            "loadavg1": stats([r.get("loadavg1_before") for r in rs]),
        }
        for b in BATCHES:
            a[f"decode_b{b}_tok_s"] = stats(
                [r["decode"][str(b)]["tok_s"] for r in ok if "decode" in r])
        for phase in ("text", "image"):  # every measurement of every run
            a[f"ttft_{phase}_s"] = stats(
                [x for r in ok if "ttft" in r for x in r["ttft"][phase]["seconds"]])
            a[f"ttft_{phase}_tokens"] = next(
                (r["ttft"][phase]["prompt_tokens"] for r in ok if "ttft" in r), None)
        agg[c.name] = a
    return agg


def ours_revision() -> str:
    """Last commit touching vllm_bnb_mm/ (+ "-dirty" with uncommitted changes there)."""
    def git(*a: str) -> str:
        r = subprocess.run(["git", "-C", str(REPO), *a], capture_output=True, text=True)
        return r.stdout.strip() if r.returncode == 0 else ""

    rev = git("log", "-1", "--format=%h", "--", "vllm_bnb_mm") or "unknown"
    return rev + ("-dirty" if git("status", "--porcelain", "--", "vllm_bnb_mm") else "")


def machine() -> dict[str, Any]:
    import bitsandbytes
    import torch
    import transformers
    import vllm

    cpu = "unknown"
    ident: dict[str, int] = {}
    flags: list[str] = []
    with open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name") and cpu == "unknown":
                cpu = line.split(":", 1)[1].strip()
            if line.startswith("cpu family") and "family" not in ident:
                ident["family"] = int(line.split(":", 1)[1])
            if re.match(r"model\s*:", line) and "model" not in ident:
                ident["model"] = int(line.split(":", 1)[1])
            if line.startswith("flags") and not flags:
                flags = line.split(":", 1)[1].split()
    mem_gib = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    if ident.get("family") == 25 and ident.get("model") in (0x11, 0x18, 0x61, 0xA0):
        cpu += " (Zen 4)"
    hypervisor = "hypervisor" in flags
    return {
        "cpu": cpu, "cpu_family_model": ident, "virtualized": hypervisor,
        "cores": os.cpu_count(),
        "affinity": len(os.sched_getaffinity(0)),
        "isa": [f for f in ("avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile")
                if f in flags],
        "mem_gib": round(mem_gib, 1), "python": platform.python_version(),
        "kernel": platform.release(), "vllm": vllm.__version__, "torch": torch.__version__,
        "transformers": transformers.__version__, "bitsandbytes": bitsandbytes.__version__,
        # Set to stand for CPUs without AMX (oneDNN and our kernel choice follow it).
        "onednn_max_cpu_isa": os.environ.get("ONEDNN_MAX_CPU_ISA"),
    }


def _fmt(s: dict | None, key: str = "median", digits: int = 2) -> str:
    return "n/a" if not s else f"{s[key]:.{digits}f}"


def _pair(s: dict | None, digits: int = 2) -> str:
    return "n/a" if not s else f"{s['median']:.{digits}f} ({s['min']:.{digits}f})"


def _ratio(a: dict | None, b: dict | None) -> str:
    if not a or not b or not b["median"] or not b["min"]:
        return "n/a"
    return f"{a['median'] / b['median']:.2f}× ({a['min'] / b['min']:.2f}×)"


def _tokens(agg: dict[str, Any], phase: str) -> str:
    found = {a.get(f"ttft_{phase}_tokens") for a in agg.values()} - {None}
    return "/".join(str(t) for t in sorted(found)) or "?"


def _kwargs_text() -> str:
    return ", ".join(f"{k}={v!r}" for k, v in ENGINE_KWARGS.items())


def _esc(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def render_md(report: dict[str, Any]) -> str:
    agg, m, ck = report["aggregate"], report["machine"], report["checkpoint"]
    sp = ck["spec"]
    isa_cap = m.get("onednn_max_cpu_isa")
    cap = f"; ONEDNN_MAX_CPU_ISA={isa_cap}, as CPUs without AMX" if isa_cap else ""
    lines = [
        "# Load and decode benchmark: vllm-bnb-mm vs vllm-bnb-plugin vs vLLM bf16",
        "",
        f"Generated {report['date']} by `{report['command']}` "
        f"({report['reps']} repetitions, {report['wall_min']:.1f} min).",
        "",
        f"**Machine**: {m['cpu']} (family {m['cpu_family_model'].get('family')}, model "
        f"{m['cpu_family_model'].get('model')}{', KVM guest' if m['virtualized'] else ''}), "
        f"{m['cores']} cores ({'/'.join(m['isa'])}{cap}), {m['mem_gib']} GiB RAM; Python "
        f"{m['python']}, vLLM {m['vllm']} (CPU), torch {m['torch']}, transformers "
        f"{m['transformers']}, bitsandbytes {m['bitsandbytes']}; incumbent vllm-bnb-plugin "
        f"{report['incumbent_version']}; ours (vllm-bnb-mm) at {report.get('ours', 'n/a')}.",
        "",
        f"**Checkpoint**: random weights, `{ck['architecture']}` ({sp['name']}: "
        f"{ck['params'] / 1e6:.0f} M params; text hidden {sp['hidden']}, intermediate "
        f"{sp['intermediate']}, {sp['layers']} layers (5 sliding : 1 full), {sp['heads']} heads, "
        f"head_dim {sp['head_dim']}/{sp['global_head_dim']}, vocab {sp['vocab']}, per-layer "
        f"embeddings {sp['ple_dim']}, tied embeddings; vision {sp['v_layers']} layers × "
        f"{sp['v_hidden']}). bf16 file {ck['bf16']['bytes'] / 1e6:.0f} MB; nf4 + double quant "
        f"(transformers + bitsandbytes, default skip list) {ck['nf4']['bytes'] / 1e6:.0f} MB, "
        f"{ck['nf4']['packed_linears']} packed linears (text, PLE, vision tower, "
        "embed_vision).",
        "",
        f"Engine: `LLM({_kwargs_text()})`, `VLLM_CPU_KVCACHE_SPACE=2`; BnB contenders add "
        "`quantization=load_format=\"bitsandbytes\"` with only their plugin enabled "
        "(`VLLM_PLUGINS`). One fresh subprocess per contender and repetition, page cache warm. "
        "Cells: median (min) over repetitions (TTFT: over every measurement of every "
        "repetition).",
        "",
        "| contender | load_weights s | load_model s | peak RSS MiB | RSS growth MiB | status |",
        "|---|---:|---:|---:|---:|---|",
    ]
    speed = [
        "",
        f"| contender | TTFT text ({_tokens(agg, 'text')} tok) s "
        f"| TTFT image+text ({_tokens(agg, 'image')} tok) s "
        + "".join(f"| decode b{b} tok/s " for b in BATCHES) + "|",
        "|---|---:|---:|" + "---:|" * len(BATCHES),
    ]
    for name, a in agg.items():
        status = "ok" if not a["errors"] else (
            "FAILED: " + "; ".join(_esc(e)[:300] for e in a["errors"]))
        if a["ok_runs"] and a["errors"]:
            status = f"{a['ok_runs']}/{a['runs']} ok; " + status
        floor = name.startswith("floor")

        def mib(key: str, a: dict = a) -> str:
            return "n/a" if not a.get(key) else format(a[key]["median"], ".0f")

        lines.append(
            f"| {a['label']} | {_pair(a['load_weights_s'])} | "
            f"{'—' if floor else _pair(a['load_model_s'])} | {mib('rss_peak_mb')} | "
            f"{mib('rss_growth_mb')} | {status} |"
        )
        if not floor:
            speed.append(
                f"| {a['label']} | {_pair(a.get('ttft_text_s'), 3)} | "
                f"{_pair(a.get('ttft_image_s'), 3)} | "
                + " | ".join(_pair(a.get(f"decode_b{b}_tok_s")) for b in BATCHES) + " |"
            )
    lines += speed
    o, i, f, n = (agg.get(k, {}) for k in ("ours", "incumbent", "floor-nf4", "native-bf16"))

    def g(d: dict, k: str) -> dict | None:
        return d.get(k) if d else None

    keys = ["load_weights_s", "load_model_s", "rss_peak_mb", "ttft_text_s", "ttft_image_s",
            *(f"decode_b{b}_tok_s" for b in BATCHES)]
    lines += [
        "",
        "| ratio: median (min) | load_weights | load_model | peak RSS | TTFT text "
        "| TTFT image | " + " | ".join(f"decode b{b}" for b in BATCHES) + " |",
        "|---|" + "---:|" * len(keys),
    ]
    for label, other in (("ours / incumbent", i), ("ours / read floor (nf4)", f),
                         ("ours / native bf16", n)):
        cells = [_ratio(g(o, k), g(other, k)) for k in keys]
        if other is f:
            cells[1:2] = ["—"]
            cells[3:] = ["—"] * (len(keys) - 3)
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    loads = sorted(r.get("loadavg1_before", 0.0) for r in report["runs"])
    keep = g(f, "keep_s")
    lines += [
        "",
        "Load, RSS and TTFT ratios below 1× are better (faster / smaller); decode ratios above "
        "1× are better.",
        "",
        "- **load_weights**: wall time of the loader's `load_weights(model, model_config)` "
        "(read, route, copy; for the incumbent also its quant-state stacking), timed by a "
        "general plugin (`bench_hook`) that wraps the loader `get_model_loader` returns, in the "
        "vLLM worker process that loads the model; for vLLM's default loader it agrees with "
        "its own `Loading weights took` log line. Read floors: `safe_open` + "
        "`get_tensor().clone()` of every tensor, each copy dropped (median of 3 passes)"
        + (f"; keeping every copy, as a loader must, takes {keep['median']:.2f} s for the nf4 "
           "file (fresh-memory page faults)"
           + (f", and ours / that is {o['load_weights_s']['median'] / keep['median']:.2f}×"
              if o.get("load_weights_s") else "") if keep else "") + ".",
        "- **load_model**: the whole `loader.load_model` (model construction, anything a loader "
        "does before `load_weights`, `load_weights`, and `process_weights_after_loading`, "
        "where kernel-format repacking happens).",
        "- **peak RSS**: highest RSS of the loading process during `load_model` (sampled every "
        "5 ms); **RSS growth**: that peak minus the RSS just before loading (the process "
        "baseline, Python + torch + vLLM, is "
        + (f"{o['rss_before_mb']['median']:.0f} MiB" if o.get("rss_before_mb") else "n/a")
        + "). Read floors: `ru_maxrss` with every tensor kept, over the RSS after the "
        "streaming passes; it also counts the file's mmap pages that `safe_open` maps "
        "(file-backed, ≈ the file size), as RSS does for any mmap-based loader.",
        "- **TTFT** (time to first token, what a user waits before the answer starts): wall "
        "time of `LLM.generate(max_tokens=1)` for a long text prompt (fixed token ids, a "
        "different prompt per measurement: prefix caching is off anyway), and of "
        "`LLM.chat(max_tokens=1)` for an image (a fresh random "
        f"{IMAGE_SIZE}×{IMAGE_SIZE} picture each time) with a one-line question: image "
        "processing, vision tower, prefill of the soft tokens and text, first token. "
        f"{TTFT_REPS} measurements per engine after one warm-up of each.",
        "- **decode**: `LLM.generate` of "
        f"{report['tokens']} new tokens per sequence (greedy, `ignore_eos`, 16-token prompts, "
        "no detokenization) after a warm-up request; tok/s = generated tokens / wall time. "
        "All contenders produced the same greedy tokens (first 8 ids compared).",
        f"- **Noise**: the box is shared; 1-min load average before each run ranged "
        f"{loads[0]:.1f}–{loads[-1]:.1f} on {m['cores']} cores"
        if loads else "- **Noise**: n/a",
    ]
    if report.get("same_tokens") is False:
        lines[-2] = lines[-2].replace("All contenders produced the same greedy tokens",
                                      "Greedy tokens DIFFER between contenders")
    lines[-1] += ("; vLLM pins its CPU worker to one core and leaves the other to the "
                  "engine. Compare ratios within this run, not absolute numbers across runs.")
    loaders = {name: a["loaders"] for name, a in agg.items() if not name.startswith("floor")}
    lines += ["", "Loader class that actually ran (checked per run): " + "; ".join(
        f"{k}: `{', '.join(v) or 'none'}`" for k, v in loaders.items()) + "."]
    if report.get("profiles"):
        lines += ["", "## py-spy profiles (one extra, unmeasured run each; 100 Hz)", ""]
        for prof in report["profiles"]:
            lines += [f"### {prof['contender']}: {prof['phase']} ({prof['samples']} samples in "
                      f"`{prof['root']}`)", "", "| self % | leaf frame |", "|---:|---|"]
            lines += [f"| {pct:.1f} | `{_esc(fr)}` |" for fr, pct in prof["self"]]
            lines += ["", "| incl. % | frame |", "|---:|---|"]
            lines += [f"| {pct:.1f} | `{_esc(fr)}` |" for fr, pct in prof["inclusive"]]
            lines.append("")
    if report.get("notes"):
        lines += ["", "Notes:", ""] + [f"- {x}" for x in report["notes"]]
    return "\n".join(lines) + "\n"


def render_png(report: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    agg = report["aggregate"]
    colors = {"floor-nf4": "#999999", "floor-bf16": "#cccccc", "ours": "#1f77b4",
              "incumbent": "#ff7f0e", "native-bf16": "#2ca02c"}
    engines = [k for k in agg if not k.startswith("floor")]
    panels = [
        # (title, names, [(key, bar style), ...]); a second key draws a hatched twin bar.
        ("load time (s, lower is better)\nsolid: load_weights · hatched: whole load_model",
         list(agg), [("load_weights_s", ""), ("load_model_s", "//")]),
        ("peak RSS while loading (MiB)\ndashed: engine worker RSS before loading",
         list(agg), [("rss_peak_mb", "")]),
        (f"time to first token (s, lower is better)\nsolid: {TTFT_TEXT_TOKENS}-token text · "
         "hatched: image + text", engines, [("ttft_text_s", ""), ("ttft_image_s", "//")]),
        *((f"decode batch {b} (tok/s, higher is better)", engines,
           [(f"decode_b{b}_tok_s", "")]) for b in BATCHES),
    ]
    fig, axes = plt.subplots(2, 3, figsize=(16, 9))
    for ax, (title, names, keys) in zip(axes.flat, panels, strict=True):
        width = 0.8 / len(keys)
        for j, (key, hatch) in enumerate(keys):
            for i, nm in enumerate(names):
                s = agg[nm].get(key)
                xpos = i + (j - (len(keys) - 1) / 2) * width
                if not s:
                    if j == 0:
                        ax.text(xpos, 0, "failed" if agg[nm]["errors"] else "", ha="center",
                                va="bottom", fontsize=8, color="red")
                    continue
                med = s["median"]
                ax.bar(xpos, med, width=width * 0.95, color=colors.get(nm, "#555555"),
                       hatch=hatch, alpha=0.55 if hatch else 1.0, edgecolor="black",
                       linewidth=0.4,
                       yerr=[[med - s["min"]], [s["max"] - med]], capsize=3)
                txt = f"{med:.2f}" if med < 100 else f"{med:.0f}"
                ax.annotate(txt, (xpos, med), xytext=(0, 2), textcoords="offset points",
                            ha="left" if len(keys) > 1 else "right", va="bottom", fontsize=7)
        if keys[0][0] == "rss_peak_mb":
            base = [agg[nm]["rss_before_mb"]["median"] for nm in names
                    if agg[nm].get("rss_before_mb")]
            if base:
                ax.axhline(statistics.median(base), color="black", linestyle="--",
                           linewidth=0.8)
        ax.set_xticks(range(len(names)))
        ax.set_xticklabels(names, rotation=25, ha="right", fontsize=8)
        ax.set_title(title, fontsize=9)
    m, ck = report["machine"], report["checkpoint"]
    fig.suptitle(
        f"{ck['spec']['name']}: Gemma 4 text+vision, {ck['params'] / 1e6:.0f} M params, bf16 "
        f"{ck['bf16']['bytes'] / 1e6:.0f} MB / nf4 {ck['nf4']['bytes'] / 1e6:.0f} MB; "
        f"{m['cpu']}, {m['cores']} cores; vLLM {m['vllm']} CPU; "
        f"median of {report['reps']} fresh engines, whiskers min–max",
        fontsize=10,
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ============================================================================================
# Main
# ============================================================================================


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--quick", action="store_true", help="small model (~60 M params)")
    p.add_argument("--tokens", type=int, default=64, help="new tokens per sequence")
    p.add_argument("--only", nargs="*", choices=list(BY_NAME), help="subset of contenders")
    p.add_argument("--out", type=Path, default=RESULTS)
    p.add_argument("--build-only", action="store_true", help="only build the checkpoints")
    p.add_argument("--render", type=Path, metavar="JSON",
                   help="only re-render the markdown table and chart from a saved JSON")
    p.add_argument("--profile", nargs="*", default=["ours"], choices=list(BY_NAME),
                   help="contenders to profile with py-spy in one extra, unmeasured run "
                   "after the measured ones (default: ours; no names: none)")
    args = p.parse_args(argv)
    if args.render:
        report = json.loads(args.render.read_text())
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "latest.md").write_text(render_md(report))
        render_png(report, args.out / "latest.png")
        log(f"rendered {args.out}/latest.{{md,png}} from {args.render}")
        return 0
    start = time.monotonic()
    spec = QUICK if args.quick else FULL
    CACHE.mkdir(parents=True, exist_ok=True)
    incumbent_version = install_incumbent()
    install_hook()
    setup_bytecode_cache()
    build_cpu_kernels()
    info = build_checkpoints(spec)
    ckpts = {"nf4": CACHE / spec.name / "nf4", "bf16": CACHE / spec.name / "bf16"}
    if args.build_only:
        return 0
    contenders = [c for c in CONTENDERS if not args.only or c.name in args.only]
    runs: list[dict[str, Any]] = []
    failed_engine: set[str] = set()
    for rep in range(args.reps):
        for c in contenders:
            if c.name in failed_engine:
                log(f"rep {rep + 1}/{args.reps} {c.name}: skipped (failed in rep 1)")
                continue
            log(f"rep {rep + 1}/{args.reps} {c.name} ...")
            r = run_contender(c, ckpts, rep, spec.vocab, args.tokens)
            runs.append(r)
            if r.get("ok"):
                log(f"  {c.name}: load_weights {r.get('load_weights_s', 0):.3f} s, "
                    f"load_model {r.get('load_model_s') or 0:.3f} s, "
                    f"peak RSS {r.get('rss_peak_mb') or 0:.0f} MiB, "
                    f"loader {r.get('loader')} (wall {r['wall_s']:.0f} s)")
            else:
                log(f"  {c.name}: FAILED: {(r.get('error') or '')[:300]} (log {r['log']})")
                # A deterministic load failure repeats; don't spend the budget on it.
                if c.kind == "engine" and rep == 0:
                    failed_engine.add(c.name)
    profiles = run_profiles(args.profile, ckpts, spec.vocab, args.tokens) if args.profile else []
    firsts = {json.dumps(r["decode"][str(b)]["first_ids"]) for r in runs if r.get("decode")
              for b in BATCHES}
    wall_min = (time.monotonic() - start) / 60
    report = {
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "command": " ".join([".venv/bin/python scripts/bench.py",
                             *(argv if argv is not None else sys.argv[1:])]),
        "reps": args.reps, "tokens": args.tokens, "wall_min": wall_min,
        "machine": machine(), "incumbent_version": incumbent_version, "ours": ours_revision(),
        "checkpoint": {**info, "spec": spec.__dict__},
        "aggregate": aggregate(runs), "runs": runs, "notes": [],
        "same_tokens": len(firsts) <= 1, "profiles": profiles,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "latest.json").write_text(json.dumps(report, indent=1) + "\n")
    (args.out / "latest.md").write_text(render_md(report))
    render_png(report, args.out / "latest.png")
    print(render_md(report))
    log(f"done in {wall_min:.1f} min -> {args.out}/latest.{{md,json,png}}")
    return 0


def _worker_main(argv: list[str]) -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--contender", required=True)
    p.add_argument("--ckpt", required=True)
    p.add_argument("--vocab", type=int, required=True)
    p.add_argument("--tokens", type=int, required=True)
    p.add_argument("--result", required=True)
    args = p.parse_args(argv)
    c = BY_NAME[args.contender]
    res = worker_floor(args) if c.kind == "floor" else worker_engine(args)
    Path(args.result).write_text(json.dumps(res))
    # Engine shutdown can hang on CPU; the results are written, leave now.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "_worker":
        sys.exit(_worker_main(sys.argv[2:]))
    if len(sys.argv) > 1 and sys.argv[1] == "_quantize":
        _quantize(Path(sys.argv[2]), Path(sys.argv[3]))
        sys.exit(0)
    sys.exit(main())
