"""Serving engines: one protocol, a vLLM implementation and a transformers+PEFT reference."""

from __future__ import annotations

from flywheel.bases import ServedBase, context_length, served_base
from flywheel.config import Settings
from services.engines.protocol import Engine, UnsupportedBaseError


def lora_capacity(settings: Settings, tasks: int) -> int:
    """LoRAs one replica keeps loaded (`LoraResidency`): `vllm.max_cpu_loras`, else every task's champion plus
    one incoming, one draining and the pinned versions."""
    return settings.vllm.max_cpu_loras or tasks + 2 + settings.serving.max_pinned_adapters


def build_engine(settings: Settings, base: ServedBase | None = None, *, tasks: int = 1) -> Engine:
    """The engine named by `serving.engine`, on `base` (default: the served base the settings name).

    vLLM runs `vllm.max_loras` adapters per batch. Its host-memory LoRA cache is sized above the replica's
    `lora_capacity`, so the replica decides which LoRAs stay (and counts it), not vLLM's own LRU.
    """
    if base is None:
        from flywheel.registry import registry_for

        base = served_base(settings, registry_for(settings))
    check_engine_runs_base(settings, base)
    if settings.serving.engine == "hf":
        from services.engines.hf_engine import HFEngine

        return HFEngine(base.path, max_model_len=context_length(settings))
    from services.engines.vllm_engine import VLLMEngine

    engine_args = settings.vllm.model_dump()
    engine_args["max_cpu_loras"] = lora_capacity(settings, tasks) + settings.vllm.max_loras
    engine_args["max_model_len"] = context_length(settings)
    return VLLMEngine(base.path, **engine_args)


def check_engine_runs_base(settings: Settings, base: ServedBase) -> None:
    """Raise UnsupportedBaseError, saying what to change, when the engine cannot run `base` here."""
    # replica_gpus > 0: replicas run on GPU nodes even when this process (say, a head node) has none
    on_gpu = settings.serving.replica_gpus > 0 or _cuda_available()
    if settings.serving.engine == "vllm" and base.quantized and not on_gpu:
        raise UnsupportedBaseError(
            f"vLLM's CPU build cannot run the GPTQ kernels {base.quantized} needs (they want AVX-512 or CUDA); "
            "serve a quantized base on CPU with serving.engine=hf (FLYWHEEL_SERVING__ENGINE=hf)"
        )


def _cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()
