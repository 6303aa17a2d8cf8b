"""bitsandbytes checkpoints for vLLM: the `bitsandbytes` quantization and load format."""

from __future__ import annotations

__version__ = "0.1.0"

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
