"""KTO (TRL `KTOTrainer`) on unpaired thumbs up / thumbs down, as a LoRA adapter.

Users rate answers one at a time, so there are no preference pairs: KTO learns from each rated
completion alone. The reference policy is the adapter training starts from (the champion's, or the bare
base for a fresh adapter): TRL keeps a frozen copy of it beside the trained one. Prompts go through the
tokenizer's own chat template (R1's `<think>` generation prompt) as in SFT; a completion is the assistant
text that followed (`reasoning\\n</think>\\n\\nanswer` when well formed) and TRL appends the EOS.
"""

import random
import tempfile
import time
from collections.abc import Callable, Sequence
from fractions import Fraction
from pathlib import Path

import torch
from datasets import Dataset
from peft import PeftModel
from pydantic import BaseModel, Field
from transformers import AutoTokenizer, PreTrainedTokenizerBase, TrainerCallback
from trl import KTOConfig, KTOTrainer

from training.sft import (
    SftConfig,
    TrainResult,
    load_lora_model,
    prompt_text,
    run_trainer,
    save_adapter,
    trainer_arguments,
    trainer_callbacks,
)

# KTO paper (Eq. 8) and TRL's docs: desirable:undesirable between 1:1 and 4:3 with equal weights.
MAX_DESIRABLE_RATIO = Fraction(4, 3)


class KtoExample(BaseModel):
    """One rated completion: thumbs up (`label=True`, desirable) or down."""

    prompt: str = Field(description="The user's message (not yet chat-templated).")
    completion: str = Field(description="The assistant text after the generation prompt, EOS excluded.")
    label: bool


class KtoSpec(BaseModel):
    """KTO's own knobs; the optimizer, steps and LoRA shape come from `SftConfig`."""

    beta: float = Field(0.1, gt=0, description="How far the policy may drift from the reference (higher: less).")
    desirable_weight: float = Field(1.0, gt=0, description="Loss weight of thumbs-up examples.")
    undesirable_weight: float = Field(1.0, gt=0, description="Loss weight of thumbs-down examples.")


def balance_kto(rows: Sequence[KtoExample], *, seed: int = 0) -> list[KtoExample]:
    """Downsample the larger side so desirable:undesirable lies within 1:1 to 4:3.

    Which rows are dropped depends only on `seed`; kept rows stay in their original order.
    """
    desirable = [i for i, row in enumerate(rows) if row.label]
    undesirable = [i for i, row in enumerate(rows) if not row.label]
    if not desirable or not undesirable:
        raise ValueError(
            f"KTO needs both thumbs up and thumbs down: got {len(desirable)} desirable and "
            f"{len(undesirable)} undesirable examples"
        )
    keep_undesirable = min(len(undesirable), len(desirable))
    keep_desirable = min(len(desirable), int(MAX_DESIRABLE_RATIO * keep_undesirable))
    rng = random.Random(seed)
    kept = {*rng.sample(desirable, keep_desirable), *rng.sample(undesirable, keep_undesirable)}
    return [row for i, row in enumerate(rows) if i in kept]


def _dataset(tokenizer: PreTrainedTokenizerBase, rows: Sequence[KtoExample]) -> Dataset:
    """TRL's unpaired-preference format, prompts already rendered by the chat template (TRL adds the EOS)."""
    return Dataset.from_list(
        [{"prompt": prompt_text(tokenizer, r.prompt), "completion": r.completion, "label": r.label} for r in rows]
    )


def fit_kto(
    base_dir: Path,
    rows: Sequence[KtoExample],
    config: SftConfig,
    scratch: Path,
    *,
    kto: KtoSpec | None = None,
    eval_rows: Sequence[KtoExample] = (),
    init_adapter: Path | None = None,
    use_gpu: bool = False,
    eval_steps: int = 10,
    early_stopping_patience: int | None = None,
    progress: Callable[[str], None] | None = None,
    callbacks: Sequence[TrainerCallback] = (),
) -> tuple[PeftModel, TrainResult]:
    """Train a LoRA adapter with KTO on balanced `rows`; the caller saves the model (as with `fit_sft`).

    TRL's KL estimate pairs each example with its neighbour's completion inside a batch, so it samples
    sequentially: the balanced rows are shuffled here, once, by `config.seed`.
    """
    if early_stopping_patience is not None and not eval_rows:
        raise ValueError("early stopping needs eval rows")
    kto = kto or KtoSpec()
    started = time.perf_counter()
    balanced = balance_kto(rows, seed=config.seed)
    random.Random(config.seed).shuffle(balanced)
    torch.set_flush_denormal(True)
    torch.manual_seed(config.seed)
    tokenizer = AutoTokenizer.from_pretrained(base_dir)
    model = load_lora_model(base_dir, config.lora, init_adapter)
    evaluate = bool(eval_rows)
    args = KTOConfig(
        **trainer_arguments(config, scratch, use_gpu=use_gpu, eval_steps=eval_steps if evaluate else None),
        beta=kto.beta,
        desirable_weight=kto.desirable_weight,
        undesirable_weight=kto.undesirable_weight,
        max_length=config.max_seq_len,
    )
    trainer = KTOTrainer(
        model=model,
        args=args,
        train_dataset=_dataset(tokenizer, balanced),
        eval_dataset=_dataset(tokenizer, eval_rows) if evaluate else None,
        processing_class=tokenizer,
        callbacks=trainer_callbacks(
            "kto", progress=progress, early_stopping_patience=early_stopping_patience,
            max_seconds=config.max_seconds, extra=callbacks,
        ),
    )
    return model, run_trainer(trainer, started)


def train_kto(
    base_dir: Path,
    rows: Sequence[KtoExample],
    out_dir: Path,
    config: SftConfig,
    *,
    kto: KtoSpec | None = None,
    init_adapter: Path | None = None,
    progress: Callable[[str], None] | None = None,
) -> TrainResult:
    """KTO in this process (no Ray): train on `rows` and save the adapter atomically to `out_dir`."""
    with tempfile.TemporaryDirectory(prefix="flywheel-kto-") as scratch:
        model, result = fit_kto(
            base_dir,
            rows,
            config,
            Path(scratch),
            kto=kto,
            init_adapter=init_adapter,
            use_gpu=torch.cuda.is_available(),
            progress=progress,
        )
    save_adapter(model, out_dir)
    return result
