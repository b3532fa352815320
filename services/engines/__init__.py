"""Serving engines: one protocol, a vLLM implementation and a transformers+PEFT reference."""

from __future__ import annotations

from flywheel.config import Settings
from services.engines.protocol import Engine


def build_engine(settings: Settings) -> Engine:
    """The engine named by `serving.engine`, configured from the settings."""
    base = settings.base_model_path
    if settings.serving.engine == "hf":
        from services.engines.hf_engine import HFEngine

        return HFEngine(base, max_model_len=settings.vllm.max_model_len)
    from services.engines.vllm_engine import VLLMEngine

    return VLLMEngine(base, **settings.vllm.model_dump())
