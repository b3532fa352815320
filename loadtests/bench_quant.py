"""`flywheel bench quant`: what GPTQ buys, measured as ratios in one run on one machine.

CPU (always), for the demo base and for a random-weight model as wide as DeepSeek-R1-Distill-Qwen-1.5B
(hidden 1536, MLP 8960, two layers: the tiny demo model is too small for int4 kernels to matter):
time and size of quantizing, and decode tokens/s of the transformers+PEFT engine on the GPTQ base +
a LoRA ÷ the same engine on the fp32 base + the same LoRA.
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

from flywheel.config import Settings
from flywheel.registry import registry_for
from services.engines.hf_engine import HFEngine
from services.engines.protocol import AdapterHandle, ChatMessage, Engine, SamplingOptions
from training.demo_bootstrap import bootstrap
from training.quantize import calibration_examples, calibration_texts, gptq_quantize, stdout_to_stderr

MAX_TOKENS = 48
WIDE = {"hidden_size": 1536, "intermediate_size": 8960, "num_hidden_layers": 2, "num_attention_heads": 12,
        "num_key_value_heads": 2, "head_dim": 128}  # DeepSeek-R1-Distill-Qwen-1.5B's layer shapes


class CpuRow(BaseModel):
    model: str
    quantize_s: float
    source_mb: float
    quantized_mb: float
    fp32_lora_tokens_per_s: float
    gptq_lora_tokens_per_s: float
    gptq_over_fp32: float


class GpuRow(BaseModel):
    engine: str
    concurrency: int
    tokens_per_s: float
    device_memory_gib: float


class QuantBenchReport(BaseModel):
    bits: int
    group_size: int
    cpu: list[CpuRow]
    gpu: list[GpuRow] | None = None
    gpu_note: str = ""

    def summary(self) -> str:
        lines = [f"GPTQ {self.bits}-bit g{self.group_size}; CPU tokens/s with the transformers+PEFT engine:"]
        lines += [f"  {r.model}: quantize {r.quantize_s:.1f} s, {r.source_mb:.1f} MB -> {r.quantized_mb:.1f} MB; "
                  f"GPTQ+LoRA {r.gptq_lora_tokens_per_s:.0f} / fp32+LoRA {r.fp32_lora_tokens_per_s:.0f} "
                  f"= {r.gptq_over_fp32:.2f}" for r in self.cpu]
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


def _size_mb(directory: Path) -> float:
    return sum(p.stat().st_size for p in directory.glob("*.safetensors")) / 1e6


def _wide_model(demo_dir: Path, out: Path) -> tuple[Path, AdapterHandle]:
    """A random-weight Qwen2 with the demo tokenizer and 1.5B-wide layers, and a fresh LoRA on it."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(0)
    config = AutoConfig.from_pretrained(demo_dir)
    for key, value in WIDE.items():
        setattr(config, key, value)
    model = AutoModelForCausalLM.from_config(config)
    model.save_pretrained(out / "base")
    AutoTokenizer.from_pretrained(demo_dir).save_pretrained(out / "base")
    lora = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, target_modules=["q_proj", "v_proj"],
                                            init_lora_weights=False))  # non-zero B: the adapter does work
    lora.save_pretrained(out / "lora")
    return out / "base", AdapterHandle(name="wide-lora", int_id=1, path=out / "lora")


def _cpu_row(label: str, source: Path, adapter: AdapterHandle, texts: list[str], settings: Settings,
             scratch: Path, requests: int, say: Callable[[str], None]) -> tuple[CpuRow, Path]:
    cfg = settings.quantize
    out = scratch / f"{label}-gptq"
    say(f"{label}: quantizing on {len(texts)} calibration texts")
    started = time.perf_counter()
    gptq_quantize(str(source), out, texts, bits=cfg.bits, group_size=cfg.group_size,
                  cpu_workers=cfg.cpu_workers or 2)
    quantize_s = time.perf_counter() - started
    say(f"{label}: {requests} greedy generations on fp32+LoRA, then on GPTQ+LoRA")
    fp32 = asyncio.run(_engine_rate(HFEngine(str(source)), adapter, 1, requests))
    gptq = asyncio.run(_engine_rate(HFEngine(str(out)), adapter, 1, requests))
    return CpuRow(model=label, quantize_s=quantize_s, source_mb=_size_mb(source), quantized_mb=_size_mb(out),
                  fp32_lora_tokens_per_s=fp32, gptq_lora_tokens_per_s=gptq, gptq_over_fp32=gptq / fp32), out


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


def run_quant_bench(settings: Settings, *, requests: int = 24, wide: bool = True,
                    say: Callable[[str], None] = print) -> QuantBenchReport:
    import torch
    from transformers import AutoTokenizer

    bootstrap(settings, progress=say)
    registry = registry_for(settings)
    champion = registry.alias("champion")
    if champion is None:
        raise RuntimeError("no champion adapter to benchmark with: run `flywheel bootstrap`")
    adapter = AdapterHandle(name=champion, int_id=registry.manifest(champion).number,
                            path=registry.local_path(champion))
    source = Path(settings.base_model_path)
    examples, _ = calibration_examples(settings, settings.quantize.calibration_examples)
    texts = calibration_texts(AutoTokenizer.from_pretrained(source), examples)
    with tempfile.TemporaryDirectory(prefix="flywheel-bench-gptq-") as scratch_dir, stdout_to_stderr():
        scratch = Path(scratch_dir)
        demo_row, demo_gptq = _cpu_row(settings.model.base, source, adapter, texts, settings, scratch, requests, say)
        rows = [demo_row]
        if wide:
            wide_base, wide_lora = _wide_model(source, scratch / "wide")
            rows.append(_cpu_row("random, 1.5B-wide x2 layers", wide_base, wide_lora, texts, settings, scratch,
                                 requests, say)[0])
        gpu_rows, note = None, "no CUDA GPU on this machine"
        if torch.cuda.is_available():
            say("GPU: vLLM base, base+LoRA, GPTQ+LoRA at 1 and 32 concurrent")
            gpu_rows, note = _gpu_rows(settings, demo_gptq, adapter, requests), ""
    return QuantBenchReport(bits=settings.quantize.bits, group_size=settings.quantize.group_size, cpu=rows,
                            gpu=gpu_rows, gpu_note=note)
