"""`flywheel quantize`: GPTQ the base model into the registry, with a quality check against its source.

The checkpoint is GPTQ v1, symmetric, desc_act off: the form transformers loads on CPU (GPTQModel's
torch kernel) and vLLM serves on CUDA as `gptq_marlin`. Calibration texts are the task's own training
data (the champion adapter's), never a download. The quality check runs both models teacher-forced on
held-out examples (the golden set) and compares their next-token predictions: top-1 agreement and the
cosine of the logit vectors. A base below `quantize.min_top1_agreement` is registered as rejected, for
the record, and serving refuses it.
"""

from __future__ import annotations

import contextlib
import os
import re
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel

from flywheel.bases import base_ref, context_length
from flywheel.config import DEMO_MODEL, Settings
from flywheel.logs import stdout_to_stderr
from flywheel.registry import WEIGHT_SUFFIXES, BaseManifest, registry_for
from services.engines.hf_engine import load_causal_lm
from training.evaluate import golden_examples
from training.retrain_data import TrainExample, read_train_data
from training.sft import IGNORE_INDEX, SupervisedExample, completion_text, encode_example, prompt_text

Say = Callable[[str], None]


class QualityReport(BaseModel):
    top1_agreement: float
    logit_cosine: float
    examples: int
    tokens: int


class QuantizeOutcome(BaseModel):
    """What `flywheel quantize --json` prints."""

    name: str
    status: Literal["ready", "rejected"]
    method: Literal["gptq"] = "gptq"
    source: str
    bits: int
    group_size: int
    top1_agreement: float
    logit_cosine: float
    min_top1_agreement: float
    min_logit_cosine: float
    calibration_examples: int
    calibration_source: str
    seconds: float
    size_bytes: int
    source_size_bytes: int
    message: str


class QuantizeError(Exception):
    """Quantization cannot start: the message says what is missing."""


def calibration_examples(settings: Settings, n: int, path: Path | None = None) -> tuple[list[TrainExample], str]:
    """Up to `n` training examples of the task, and where they came from."""
    if path is not None:
        lines = [line for line in path.read_text().splitlines() if line.strip()]
        return [TrainExample.model_validate_json(line) for line in lines][:n], str(path)
    registry = registry_for(settings)
    champion = registry.alias("champion")
    if champion is not None:
        examples = read_train_data(registry.local_path(champion))
        if examples:
            return examples[:n], f"training data of {champion}"
    if settings.model.base == DEMO_MODEL:
        from training.demo_task import generate_examples

        generated = generate_examples(n, seed=settings.bootstrap.seed + 1)
        return ([TrainExample(prompt=e.prompt, reasoning=e.reasoning, answer=e.answer, source="bootstrap")
                 for e in generated], "demo task generator (original distribution)")
    raise QuantizeError(
        "no training data to calibrate on: the champion adapter has none recorded; pass --calibration "
        "FILE.jsonl with {prompt, reasoning, answer} lines from the task"
    )


def calibration_texts(tokenizer: Any, examples: Sequence[SupervisedExample]) -> list[str]:
    """Whole conversations as serving sees them: chat-templated prompt, then the R1-style completion."""
    return [prompt_text(tokenizer, e.prompt) + completion_text(e.reasoning, e.answer) for e in examples]


def measure_quality(source: Any, quantized: Any, tokenizer: Any, examples: Sequence[SupervisedExample],
                    max_len: int) -> QualityReport:
    """Teacher-forced next-token agreement of two models on the completions of `examples`."""
    import torch

    agree = tokens = 0
    cosine_sum = 0.0
    for example in examples:
        encoded = encode_example(tokenizer, example, max_len)
        ids = torch.tensor([encoded["input_ids"]])
        # positions that predict a completion token: the last prompt position onwards
        scored = [i - 1 for i, label in enumerate(encoded["labels"]) if label != IGNORE_INDEX]
        with torch.inference_mode():
            a = source(input_ids=ids).logits[0, scored].float()
            b = quantized(input_ids=ids).logits[0, scored].float()
        agree += int((a.argmax(-1) == b.argmax(-1)).sum())
        cosine_sum += float(torch.nn.functional.cosine_similarity(a, b, dim=-1).sum())
        tokens += len(scored)
    return QualityReport(top1_agreement=agree / max(tokens, 1), logit_cosine=cosine_sum / max(tokens, 1),
                         examples=len(examples), tokens=tokens)


def gptq_quantize(source_dir: str, out_dir: Path, texts: list[str], *, bits: int, group_size: int,
                  cpu_workers: int) -> str:
    """Run GPTQModel on `texts`, save a GPTQ v1 checkpoint (sym, desc_act off) in `out_dir`; return the device."""
    os.environ.setdefault("GPTQMODEL_CPU_WORKERS", str(cpu_workers))  # read when gptqmodel is imported
    import torch
    from gptqmodel import GPTQModel, QuantizeConfig
    from gptqmodel.quantization import FORMAT

    config = QuantizeConfig(bits=bits, group_size=group_size, sym=True, desc_act=False, format=FORMAT.GPTQ,
                            act_group_aware=group_size > 0)  # GPTQModel's reordering needs groups
    device = "cuda" if torch.cuda.is_available() else "cpu"
    source = str(Path(source_dir).resolve()) if Path(source_dir).is_dir() else source_dir
    with contextlib.chdir(out_dir.parent):  # GPTQModel writes per-layer logs to ./logs; keep them in scratch
        model = GPTQModel.load(source, config, device=device)
        model.quantize(texts, batch_size=8)
        model.save(str(out_dir))
    return device


def _weights_bytes(directory: Path) -> int:
    return sum(p.stat().st_size for p in directory.iterdir() if p.suffix in WEIGHT_SUFFIXES)


def base_version_prefix(settings: Settings, bits: int, group_size: int) -> str:
    """`demo-gptq-w4g128`, `DeepSeek-R1-Distill-Qwen-1.5B-gptq-w4g128`: the model, the method, the shape."""
    model = re.sub(r"[^A-Za-z0-9._-]+", "-", Path(settings.model.base.rstrip("/")).name) or "base"
    return f"{model}-gptq-w{bits}g{group_size if group_size > 0 else 'row'}"


def _local_model_dir(settings: Settings) -> str:
    """The base's directory: the demo's or a local one as is, a hub id through the HF cache."""
    source = settings.base_model_path
    looks_like_hub_id = settings.model.base != DEMO_MODEL and not source.startswith(("/", ".", "~"))
    if not Path(source).is_dir() and looks_like_hub_id:
        from huggingface_hub import snapshot_download

        try:
            source = snapshot_download(source)
        except Exception as exc:
            raise QuantizeError(f"cannot load base {source!r}: {exc}") from exc
    if not Path(source, "config.json").exists():
        raise QuantizeError(f"no base model at {source}: run `flywheel bootstrap` (demo) or set model.base")
    return source


def quantize_base(settings: Settings, *, calibration_path: Path | None = None,
                  say: Say | None = None) -> tuple[QuantizeOutcome, BaseManifest]:
    """Quantize the configured base, check it against its source, and register it as a base version."""
    with stdout_to_stderr():
        return _quantize_base(settings, calibration_path, say or (lambda _msg: None))


def _quantize_base(settings: Settings, calibration_path: Path | None, say: Say) -> tuple[QuantizeOutcome, BaseManifest]:
    from transformers import AutoTokenizer

    cfg = settings.quantize
    source_dir = _local_model_dir(settings)
    started = time.monotonic()
    examples, calibration_source = calibration_examples(settings, cfg.calibration_examples, calibration_path)
    if len(examples) < 8:
        raise QuantizeError(f"{len(examples)} calibration examples from {calibration_source}; at least 8 are needed")
    seen = {e.prompt for e in examples}
    held_out = [e for e in golden_examples(registry_for(settings)) if e.prompt not in seen][: cfg.quality_examples]
    if not held_out:
        raise QuantizeError("no held-out examples for the quality check: the golden set is empty or all calibration")
    tokenizer = AutoTokenizer.from_pretrained(source_dir)
    say(f"quantizing {settings.model.base} to GPTQ {cfg.bits}-bit, group size {cfg.group_size}, calibrating on "
        f"{len(examples)} examples ({calibration_source})")
    registry = registry_for(settings)
    with tempfile.TemporaryDirectory(prefix="flywheel-gptq-") as scratch:
        out = Path(scratch) / "model"
        device = gptq_quantize(source_dir, out, calibration_texts(tokenizer, examples), bits=cfg.bits,
                               group_size=cfg.group_size, cpu_workers=cfg.cpu_workers or os.cpu_count() or 1)
        seconds = time.monotonic() - started
        say(f"quantized in {seconds:.0f} s; checking quality on {len(held_out)} held-out examples")
        quality = measure_quality(load_causal_lm(source_dir), load_causal_lm(str(out)), tokenizer, held_out,
                                  context_length(settings))
        shortfalls = [
            f"{label} with {settings.model.base} is {value:.4f}, below the quality bar {bar:.4f} (quantize.{key})"
            for label, key, value, bar in (
                ("top-1 agreement", "min_top1_agreement", quality.top1_agreement, cfg.min_top1_agreement),
                ("logit cosine", "min_logit_cosine", quality.logit_cosine, cfg.min_logit_cosine),
            )
            if value < bar
        ]
        passed, reason = not shortfalls, "; ".join(shortfalls)
        manifest = registry.register_base(
            out,
            prefix=base_version_prefix(settings, cfg.bits, cfg.group_size),
            source=base_ref(settings),
            status="ready" if passed else "rejected",
            reason=reason,
            quantization={"bits": cfg.bits, "group_size": cfg.group_size, "sym": True, "desc_act": False,
                          "format": "gptq", "checkpoint_format": "gptq", "quantizer": "gptqmodel"},
            calibration={"examples": len(examples), "source": calibration_source},
            quality={**quality.model_dump(), "min_top1_agreement": cfg.min_top1_agreement,
                     "min_logit_cosine": cfg.min_logit_cosine, "held_out": "golden set"},
            metrics={"seconds": seconds, "device": device, "size_bytes": _weights_bytes(out),
                     "source_size_bytes": _weights_bytes(Path(source_dir))},
        )
    message = (
        f"{manifest.name} is ready: serve it with model.quantized_base={manifest.name} "
        f"(FLYWHEEL_MODEL__QUANTIZED_BASE={manifest.name}; on CPU also FLYWHEEL_SERVING__ENGINE=hf)"
        if passed else f"refused {manifest.name}: {reason}; it is recorded as rejected and will never be served"
    )
    outcome = QuantizeOutcome(
        name=manifest.name, status=manifest.status, source=settings.model.base, bits=cfg.bits,
        group_size=cfg.group_size, top1_agreement=quality.top1_agreement, logit_cosine=quality.logit_cosine,
        min_top1_agreement=cfg.min_top1_agreement, min_logit_cosine=cfg.min_logit_cosine,
        calibration_examples=len(examples),
        calibration_source=calibration_source, seconds=seconds, size_bytes=manifest.metrics["size_bytes"],
        source_size_bytes=manifest.metrics["source_size_bytes"], message=message,
    )
    return outcome, manifest
