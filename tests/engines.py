"""Real vLLM engines for tests: `vllm.LLM` in a subprocess, and the OpenAI server."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from contextlib import contextmanager
from pathlib import Path

HERE = Path(__file__).resolve().parent
CACHE = Path(tempfile.gettempdir()) / "vllm-bnb-mm-test-cache"

# Small, fast CPU engine settings shared by every test engine.
ENGINE_KWARGS = {
    "max_model_len": 512,
    "max_num_seqs": 2,
    "enforce_eager": True,
}


# Set by scripts/check_vllm_release.py: the vLLM under test has no compiled ops for this
# machine, so every test that would start an engine (they all take engine_env) skips.
NO_ENGINES_ENV = "VLLM_BNB_MM_NO_ENGINES"


def engine_env(**extra: str) -> dict[str, str]:
    if os.environ.get(NO_ENGINES_ENV) == "1":
        import pytest

        pytest.skip(f"{NO_ENGINES_ENV}=1: unit tests only, no engines")
    env = dict(os.environ)
    # Under pytest-xdist, each worker's engines run on their own core: vLLM's automatic
    # binding would put every single-worker engine on the same core. Tests that start
    # several workers (TP/PP) pass their own binding in `extra`.
    worker = os.environ.get("PYTEST_XDIST_WORKER", "")
    if worker.startswith("gw") and "VLLM_CPU_OMP_THREADS_BIND" not in os.environ:
        env["VLLM_CPU_OMP_THREADS_BIND"] = str(int(worker[2:]) % (os.cpu_count() or 1))
    env.update({
        "HF_HUB_OFFLINE": "1",
        "VLLM_CPU_KVCACHE_SPACE": "1",
        "VLLM_CACHE_ROOT": str(CACHE / "vllm"),
        "TORCHINDUCTOR_CACHE_DIR": str(CACHE / "inductor"),
        "PYTHONUNBUFFERED": "1",
    })
    env.update(extra)
    return env


class EngineFailed(RuntimeError):
    """The message holds stderr's tail; `output` the whole of stdout + stderr (vLLM logs a
    worker's root-cause traceback to stdout, and teardown tracebacks push it out of the tail)."""

    def __init__(self, message: str, output: str = "") -> None:
        super().__init__(message)
        self.output = output


def run_llm(
    model: str, prompts: list[list[int]], max_tokens: int = 8, env: dict | None = None,
    timeout: float = 600, bnb_layers_out: str | None = None,
    loras: list[str | None] | None = None, multiprocess: bool = False, **llm_kwargs,
) -> list[dict]:
    """Prompt logprobs, top-10 first-token logprobs and greedy tokens from `vllm.LLM`;
    with `bnb_layers_out`, every BnB layer's packed weight and quant state as the running
    engine holds them is saved there too (tests/run_llm.py bnb_layer_contents);
    `loras`: per prompt, a LoRA adapter directory or None (needs enable_lora=True).
    The engine core runs in the test's subprocess, and a single worker with it, unless
    `multiprocess` (vLLM's default: engine core and workers in processes of their own)."""
    return run_llm_report(
        model, prompts, max_tokens, env, timeout, bnb_layers_out=bnb_layers_out, loras=loras,
        multiprocess=multiprocess, **llm_kwargs,
    )["results"]


def run_llm_report(
    model: str, prompts: list[list[int]], max_tokens: int = 8, env: dict | None = None,
    timeout: float = 600, expert_memory: bool = False, bnb_layers_out: str | None = None,
    loras: list[str | None] | None = None, multiprocess: bool = False, **llm_kwargs,
) -> dict:
    """`run_llm`'s results under "results", and with `expert_memory` the bytes each
    worker's MoE experts hold under "expert_memory" (see run_llm.py)."""
    spec = {
        "model": model,
        "llm_kwargs": {**ENGINE_KWARGS, **llm_kwargs},
        "prompts": prompts,
        "max_tokens": max_tokens,
        "bnb_layers_out": bnb_layers_out,
        "expert_memory": expert_memory,
        "loras": loras,
        "multiprocess": multiprocess,
    }
    return _run_llm_spec(spec, env, timeout)


def run_llm_chat(
    model: str, conversations: list[list[dict]], max_tokens: int = 8, env: dict | None = None,
    timeout: float = 600, **llm_kwargs,
) -> list[dict]:
    """`run_llm` for OpenAI-format chat conversations (images as data URLs) through
    `LLM.chat`: vLLM renders the chat template and runs its multimodal processor, as
    the server does. Each result also holds the `prompt_token_ids` vLLM built."""
    spec = {
        "model": model,
        "llm_kwargs": {**ENGINE_KWARGS, **llm_kwargs},
        "conversations": conversations,
        "max_tokens": max_tokens,
    }
    return _run_llm_spec(spec, env, timeout)["results"]


def _run_llm_spec(spec: dict, env: dict | None, timeout: float) -> dict:
    model = spec["model"]
    env = dict(env or {})
    if spec.get("bnb_layers_out"):
        # The workers unpickle a function of tests/run_llm.py.
        path = os.pathsep.join(p for p in (str(HERE), os.environ.get("PYTHONPATH")) if p)
        env.update({"VLLM_ALLOW_INSECURE_SERIALIZATION": "1", "PYTHONPATH": path})
    world_size = _world_size(spec["llm_kwargs"])
    if not spec.pop("multiprocess", False):
        # The engine core in this process instead of a process of its own, which would
        # re-import vLLM (~12 s); a single worker runs here too (one process instead of
        # three). Same model code and kernels; vLLM's default processes are what the
        # servers and the AMX test run.
        env.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    proc = subprocess.Popen(
        [sys.executable, str(HERE / "run_llm.py"), json.dumps(spec)],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        env=engine_env(**env), start_new_session=True,
    )
    timer = threading.Timer(timeout, _kill_group, (proc,))
    timer.start()
    output, report = [], None
    try:
        for line in proc.stdout:
            if line.startswith('{"results"'):
                report = json.loads(line)
                break
            output.append(line)
    finally:
        timer.cancel()
        if world_size == 1:
            # The answer is in and nothing of the shutdown is under test: vLLM's own
            # takes 5-10 s. (Engines with worker processes stop gracefully, so their
            # shared-memory queues are cleaned up.)
            _kill_group(proc)
        _stop(proc)
    if report is None:
        text = "".join(output)
        raise EngineFailed(
            f"vllm.LLM on {model} failed (exit {proc.returncode}):\n{text[-6000:]}", text,
        )
    return report


def _world_size(llm_kwargs: dict) -> int:
    return llm_kwargs.get("tensor_parallel_size", 1) * llm_kwargs.get("pipeline_parallel_size", 1)


def _kill_group(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    def __init__(self, proc: subprocess.Popen, port: int, log: Path) -> None:
        self.proc, self.port, self.log = proc, port, log
        self.base_url = f"http://127.0.0.1:{port}"

    def healthy(self) -> bool:
        try:
            with urllib.request.urlopen(self.base_url + "/health", timeout=5) as r:
                return r.status == 200
        except OSError:
            return False

    def log_tail(self, n: int = 6000) -> str:
        return self.log.read_text(errors="replace")[-n:]


@contextmanager
def openai_server(
    model: str, *args: str, dtype: str = "bfloat16", timeout: float = 420,
    env: dict | None = None,
):
    """`vllm serve MODEL --load-format bitsandbytes …` on a free loopback port.

    `vllm serve` itself dies on this CPU stack (the distribution is named vllm-cpu);
    the module below is the same server."""
    port = free_port()
    log = Path(tempfile.mkstemp(prefix="vllm-server-", suffix=".log")[1])
    cmd = [
        sys.executable, "-m", "vllm.entrypoints.openai.api_server",
        "--model", model, "--host", "127.0.0.1", "--port", str(port),
        "--load-format", "bitsandbytes", "--dtype", dtype,
        "--max-model-len", "512", "--max-num-seqs", "2", "--enforce-eager",
        "--limit-mm-per-prompt", '{"image":1,"video":0}', *args,
    ]
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            cmd, stdout=out, stderr=subprocess.STDOUT, env=engine_env(**(env or {})),
            start_new_session=True,
        )
    server = Server(proc, port, log)
    try:
        deadline = time.monotonic() + timeout
        while not server.healthy():
            if proc.poll() is not None or time.monotonic() > deadline:
                raise EngineFailed(f"server for {model} did not start:\n{server.log_tail()}")
            time.sleep(1)
        yield server
    finally:
        _stop(proc)


def _stop(proc: subprocess.Popen) -> None:
    """Stop the process and everything it started (engine core, workers)."""
    try:
        os.killpg(proc.pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        pass
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait()
