"""LoRA supervised fine-tuning with HF `Trainer` + PEFT.

`train_lora` is one plain function so a Ray Train worker can call it unchanged (pass Ray's report
callback through `callbacks`). Examples are formatted with the base tokenizer's own chat template:
the prompt is the user turn plus the generation prompt (`<｜Assistant｜><think>\\n` for R1 models), the
target is `reasoning\\n</think>\\n\\nanswer` + EOS, and the loss covers the target only.
"""

import contextlib
import os
import shutil
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, Literal, Protocol

import torch
from peft import LoraConfig, PeftModel, get_peft_model
from pydantic import BaseModel, Field
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    PreTrainedTokenizerBase,
    PrinterCallback,
    Trainer,
    TrainerCallback,
    TrainerControl,
    TrainerState,
    TrainingArguments,
)

IGNORE_INDEX = -100
THINK_END = "</think>"


class SupervisedExample(Protocol):
    """Anything with a prompt, a rationale and an answer (e.g. `DemoExample`, a curated example)."""

    @property
    def prompt(self) -> str: ...

    @property
    def reasoning(self) -> str: ...

    @property
    def answer(self) -> str: ...


class LoraSpec(BaseModel):
    """Shape of the LoRA adapter."""

    r: int = Field(16, gt=0, description="Rank of the update matrices.")
    alpha: int = Field(32, gt=0, description="Scaling numerator (scale = alpha / r).")
    dropout: float = Field(0.1, ge=0.0, lt=1.0, description="Dropout on the LoRA input.")
    target_modules: list[str] | Literal["all-linear"] = Field(
        default_factory=lambda: ["q_proj", "v_proj"], description="Module names to adapt, or 'all-linear'."
    )


class SftConfig(BaseModel):
    """One LoRA SFT run."""

    steps: int = Field(60, gt=0, description="Optimizer steps.")
    learning_rate: float = Field(
        2e-3, gt=0, description="Peak AdamW learning rate (short warmup, linear decay)."
    )
    batch_size: int = Field(16, gt=0, description="Examples per micro-batch.")
    grad_accum: int = Field(1, gt=0, description="Micro-batches per optimizer step.")
    seed: int = Field(0, description="Seed for LoRA init, dropout and data order.")
    lora: LoraSpec = Field(default_factory=LoraSpec, description="Ignored when starting from an adapter.")
    max_seq_len: int = Field(256, gt=0, description="Examples are truncated to this many tokens.")
    max_grad_norm: float = Field(1.0, gt=0, description="Gradient clipping norm.")


class SftResult(BaseModel):
    """What a run did."""

    first_loss: float
    last_loss: float
    steps: int
    train_tokens: int = Field(description="Non-padding tokens fed to the model.")
    seconds: float


def completion_text(reasoning: str, answer: str) -> str:
    """The assistant text that follows the generation prompt (EOS not included)."""
    return f"{reasoning}\n{THINK_END}\n\n{answer}"


def prompt_text(tokenizer: PreTrainedTokenizerBase, prompt: str) -> str:
    """The user turn rendered with the tokenizer's chat template, ending in the generation prompt."""
    text = tokenizer.apply_chat_template(
        [{"role": "user", "content": prompt}], add_generation_prompt=True, tokenize=False
    )
    assert isinstance(text, str)
    return text


def encode_example(
    tokenizer: PreTrainedTokenizerBase, example: SupervisedExample, max_seq_len: int
) -> dict[str, list[int]]:
    """Token ids and labels for one example; labels are `IGNORE_INDEX` on the prompt."""
    prompt_ids = tokenizer(prompt_text(tokenizer, example.prompt), add_special_tokens=False)["input_ids"]
    target = completion_text(example.reasoning, example.answer)
    target_ids = [*tokenizer(target, add_special_tokens=False)["input_ids"], tokenizer.eos_token_id]
    input_ids = [*prompt_ids, *target_ids][:max_seq_len]
    labels = [*([IGNORE_INDEX] * len(prompt_ids)), *target_ids][:max_seq_len]
    return {"input_ids": input_ids, "labels": labels}


def collate(features: Sequence[dict[str, list[int]]], pad_token_id: int) -> dict[str, torch.Tensor]:
    """Right-pad encoded examples into a batch."""
    width = max(len(f["input_ids"]) for f in features)

    def pad(values: list[int], fill: int) -> list[int]:
        return values + [fill] * (width - len(values))

    return {
        "input_ids": torch.tensor([pad(f["input_ids"], pad_token_id) for f in features]),
        "attention_mask": torch.tensor([pad([1] * len(f["input_ids"]), 0) for f in features]),
        "labels": torch.tensor([pad(f["labels"], IGNORE_INDEX) for f in features]),
    }


@contextlib.contextmanager
def atomic_dir(out_dir: Path) -> Iterator[Path]:
    """Yield a temp sibling of `out_dir` to fill; on success it replaces `out_dir` by rename."""
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_dir.parent / f".{out_dir.name}.tmp-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        yield tmp
        if out_dir.exists():
            old = out_dir.parent / f".{out_dir.name}.old-{uuid.uuid4().hex[:8]}"
            os.replace(out_dir, old)
            os.replace(tmp, out_dir)
            shutil.rmtree(old)
        else:
            os.replace(tmp, out_dir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


class _Progress(TrainerCallback):
    """Forwards logged losses to a progress function."""

    def __init__(self, progress: Callable[[str], None]) -> None:
        self.progress = progress

    def on_log(
        self,
        args: TrainingArguments,
        state: TrainerState,
        control: TrainerControl,
        logs: dict[str, float] | None = None,
        **kwargs: Any,
    ) -> None:
        if logs and "loss" in logs:
            self.progress(f"sft step={state.global_step}/{state.max_steps} loss={logs['loss']:.4f}")


def train_lora(
    base_dir: Path,
    examples: Sequence[SupervisedExample],
    out_dir: Path,
    config: SftConfig,
    *,
    init_adapter: Path | None = None,
    progress: Callable[[str], None] | None = None,
    callbacks: Sequence[TrainerCallback] = (),
) -> SftResult:
    """Train a LoRA adapter on `examples` over the model in `base_dir` and save it to `out_dir`.

    With `init_adapter` training continues from that adapter's weights (and its LoRA shape);
    otherwise a fresh adapter is built from `config.lora`.
    """
    if not examples:
        raise ValueError("train_lora needs at least one example")
    started = time.perf_counter()
    torch.set_flush_denormal(True)
    torch.manual_seed(config.seed)
    tokenizer = AutoTokenizer.from_pretrained(base_dir)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    dataset = [encode_example(tokenizer, ex, config.max_seq_len) for ex in examples]

    base = AutoModelForCausalLM.from_pretrained(base_dir)
    if init_adapter is not None:
        model = PeftModel.from_pretrained(base, init_adapter, is_trainable=True)
    else:
        lora = LoraConfig(
            r=config.lora.r,
            lora_alpha=config.lora.alpha,
            lora_dropout=config.lora.dropout,
            target_modules=config.lora.target_modules,
            task_type="CAUSAL_LM",
        )
        model = get_peft_model(base, lora)

    with tempfile.TemporaryDirectory(prefix="flywheel-sft-") as scratch:
        args = TrainingArguments(
            output_dir=scratch,
            max_steps=config.steps,
            per_device_train_batch_size=config.batch_size,
            gradient_accumulation_steps=config.grad_accum,
            learning_rate=config.learning_rate,
            lr_scheduler_type="linear",
            warmup_steps=min(5, config.steps // 10),
            max_grad_norm=config.max_grad_norm,
            weight_decay=0.0,
            seed=config.seed,
            logging_steps=1,
            logging_strategy="steps",
            save_strategy="no",
            report_to=[],
            disable_tqdm=True,
            log_level="error",
            use_cpu=not torch.cuda.is_available(),
            remove_unused_columns=False,
            dataloader_num_workers=0,
            include_num_input_tokens_seen="non_padding",
        )
        all_callbacks = [*callbacks, *([_Progress(progress)] if progress else [])]
        trainer = Trainer(
            model=model,
            args=args,
            train_dataset=dataset,  # type: ignore[arg-type]  # a list is a map-style dataset
            data_collator=lambda batch: collate(batch, pad_id),
            callbacks=all_callbacks,
        )
        trainer.remove_callback(PrinterCallback)  # it prints every log dict to stdout
        trainer.train()

    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    with atomic_dir(out_dir) as tmp:
        model.save_pretrained(tmp)
    return SftResult(
        first_loss=losses[0],
        last_loss=losses[-1],
        steps=trainer.state.global_step,
        train_tokens=int(trainer.state.num_input_tokens_seen),
        seconds=time.perf_counter() - started,
    )
