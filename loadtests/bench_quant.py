"""`flywheel bench quant`: what GPTQ buys, measured as ratios in one run on one machine.

CPU (always): time and size of quantizing the base; decode tokens/s of the transformers+PEFT engine
on the GPTQ base + the champion's LoRA ÷ the same engine on the fp32 base + the same LoRA.
GPU (where CUDA exists): vLLM decode tokens/s for base, base+LoRA and GPTQ base+LoRA at 1 and 32
concurrent requests, and the device memory each engine holds (weights, plus the KV cache vLLM
reserves at `gpu_memory_utilization`). Without a GPU those rows say "not measured".
"""

from __future__ import annotations

import asyncio
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from pydantic import BaseModel

from flywheel.bootstrap import bootstrap, registry_for
from flywheel.config import Settings
from services.engines.hf_engine import HFEngine
from services.engines.protocol import AdapterHandle, ChatMessage, Engine, SamplingOptions
from training.quantize import calibration_examples, calibration_texts, gptq_quantize

MAX_TOKENS = 48


class GpuRow(BaseModel):
    engine: str
    concurrency: int
    tokens_per_s: float
    device_memory_gib: float


class QuantBenchReport(BaseModel):
    base: str
    bits: int
    group_size: int
    quantize_s: float
    source_mb: float
    quantized_mb: float
    cpu_fp32_lora_tokens_per_s: float
    cpu_gptq_lora_tokens_per_s: float
    cpu_gptq_over_fp32: float
    gpu: list[GpuRow] | None = None
    gpu_note: str = ""

    def summary(self) -> str:
        lines = [
            f"quantize {self.base} to GPTQ {self.bits}-bit g{self.group_size}: {self.quantize_s:.1f} s, "
            f"{self.source_mb:.2f} MB -> {self.quantized_mb:.2f} MB ({self.quantized_mb / self.source_mb:.0%})",
            f"CPU tokens/s, transformers+PEFT: GPTQ+LoRA {self.cpu_gptq_lora_tokens_per_s:.0f} / fp32+LoRA "
            f"{self.cpu_fp32_lora_tokens_per_s:.0f} = {self.cpu_gptq_over_fp32:.2f}",
        ]
        if self.gpu is None:
            lines.append(f"GPU rows: not measured ({self.gpu_note})")
        else:
            lines += [f"GPU {r.engine:<16} x{r.concurrency:<3} {r.tokens_per_s:8.0f} tokens/s  "
                      f"{r.device_memory_gib:.1f} GiB" for r in self.gpu]
        return "\n".join(lines)


def _prompts(n: int) -> list[list[ChatMessage]]:
    from training.demo_task import generate_examples

    return [[ChatMessage(role="user", content=e.prompt)] for e in generate_examples(n, seed=4242)]


async def _tokens_per_s(engine: Engine, adapter: AdapterHandle | None, concurrency: int, requests: int) -> float:
    """Completion tokens per second over `requests` greedy generations, `concurrency` at a time."""
    gate = asyncio.Semaphore(concurrency)
    options = SamplingOptions(max_tokens=MAX_TOKENS)

    async def one(i: int, messages: list[ChatMessage]) -> int:
        async with gate:
            return (await engine.generate(messages, options, adapter, f"bench-{i}")).completion_tokens

    await one(-1, _prompts(1)[0])  # warm-up
    started = time.perf_counter()
    tokens = sum(await asyncio.gather(*(one(i, m) for i, m in enumerate(_prompts(requests)))))
    return tokens / (time.perf_counter() - started)


async def _engine_rate(engine: Engine, adapter: AdapterHandle | None, concurrency: int, requests: int) -> float:
    await engine.start()
    try:
        if adapter is not None:
            await engine.add_adapter(adapter)
        return await _tokens_per_s(engine, adapter, concurrency, requests)
    finally:
        await engine.shutdown()


def _gpu_rows(settings: Settings, gptq_dir: Path, adapter: AdapterHandle, requests: int) -> list[GpuRow]:
    import torch

    from services.engines.vllm_engine import VLLMEngine

    rows = []
    for label, path, lora in (("bf16 base", settings.base_model_path, None),
                              ("bf16 base+LoRA", settings.base_model_path, adapter),
                              ("GPTQ base+LoRA", str(gptq_dir), adapter)):
        for concurrency in (1, 32):
            engine = VLLMEngine(path, **{**settings.vllm.model_dump(), "dtype": "bfloat16"})
            free_before = torch.cuda.mem_get_info()[0]
            rate = asyncio.run(_engine_rate(engine, lora, concurrency, max(requests, 2 * concurrency)))
            rows.append(GpuRow(engine=label, concurrency=concurrency, tokens_per_s=rate,
                               device_memory_gib=(free_before - torch.cuda.mem_get_info()[0]) / 2**30))
    return rows


def run_quant_bench(settings: Settings, *, requests: int = 24, say: Callable[[str], None] = print) -> QuantBenchReport:
    import torch

    bootstrap(settings, progress=say)
    registry = registry_for(settings)
    champion = registry.alias("champion")
    if champion is None:
        raise RuntimeError("no champion adapter to benchmark with: run `flywheel bootstrap`")
    adapter = AdapterHandle(name=champion, int_id=registry.manifest(champion).number,
                            path=registry.local_path(champion))
    cfg = settings.quantize
    source = Path(settings.base_model_path)
    with tempfile.TemporaryDirectory(prefix="flywheel-bench-gptq-") as scratch:
        out = Path(scratch) / "model"
        examples, _ = calibration_examples(settings, cfg.calibration_examples)
        from transformers import AutoTokenizer

        texts = calibration_texts(AutoTokenizer.from_pretrained(source), examples)
        say(f"quantizing {settings.model.base} on {len(texts)} calibration texts")
        started = time.perf_counter()
        gptq_quantize(str(source), out, texts, bits=cfg.bits, group_size=cfg.group_size,
                      cpu_workers=cfg.cpu_workers or 2)
        quantize_s = time.perf_counter() - started

        def size_mb(d: Path) -> float:
            return sum(p.stat().st_size for p in d.glob("*.safetensors")) / 1e6

        say(f"CPU decode: {requests} requests each on fp32+LoRA and GPTQ+LoRA (transformers+PEFT)")
        fp32 = asyncio.run(_engine_rate(HFEngine(str(source)), adapter, 1, requests))
        gptq = asyncio.run(_engine_rate(HFEngine(str(out)), adapter, 1, requests))
        gpu_rows, note = None, "no CUDA GPU on this machine"
        if torch.cuda.is_available():
            say("GPU: vLLM base, base+LoRA, GPTQ+LoRA at 1 and 32 concurrent")
            gpu_rows, note = _gpu_rows(settings, out, adapter, requests), ""
        return QuantBenchReport(
            base=settings.model.base, bits=cfg.bits, group_size=cfg.group_size, quantize_s=quantize_s,
            source_mb=size_mb(source), quantized_mb=size_mb(out), cpu_fp32_lora_tokens_per_s=fp32,
            cpu_gptq_lora_tokens_per_s=gptq, cpu_gptq_over_fp32=gptq / fp32, gpu=gpu_rows, gpu_note=note,
        )
