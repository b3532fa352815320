"""LoRA supervised fine-tuning with HF `Trainer` + PEFT.

`fit_sft` is the one training step: `train_lora` runs it in-process, and each Ray Train worker runs it
unchanged (`training.ray_train`). Examples are formatted with the base tokenizer's own chat template:
the prompt is the user turn plus the generation prompt (`<｜Assistant｜><think>\\n` for R1 models), the
target is `reasoning\\n</think>\\n\\nanswer` + EOS, and the loss covers the target only.
"""

import contextlib
import os
import shutil
import statistics
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, Literal, Protocol

import numpy as np
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from pydantic import BaseModel, Field, computed_field
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    EarlyStoppingCallback,
    EvalPrediction,
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
    learning_rate: float = Field(2e-3, gt=0, description="Peak AdamW learning rate (short warmup, linear decay).")
    batch_size: int = Field(16, gt=0, description="Examples per micro-batch.")
    grad_accum: int = Field(1, gt=0, description="Micro-batches per optimizer step.")
    seed: int = Field(0, description="Seed for LoRA init, dropout and data order.")
    lora: LoraSpec = Field(default_factory=LoraSpec, description="Ignored when starting from an adapter.")
    max_seq_len: int = Field(256, gt=0, description="Examples are truncated to this many tokens.")
    max_grad_norm: float = Field(1.0, gt=0, description="Gradient clipping norm.")
    max_seconds: float | None = Field(
        None, gt=0, description="Time budget of the training loop: stop (keeping the best checkpoint) once spent.")


StopReason = Literal["plateau", "steps", "time_budget", "reproduced"]


class LossPoint(BaseModel):
    """The losses at one evaluation: the mean training loss since the previous one, and the validation loss."""

    step: int
    train_loss: float
    eval_loss: float | None = None
    eval_reproduced: float | None = Field(
        None, description="Share of eval examples greedy decoding reproduces exactly (when asked to stop on it).")


class TrainResult(BaseModel):
    """What a training run did (SFT or KTO; plain or on Ray)."""

    first_loss: float
    last_loss: float
    steps: int
    train_tokens: int = Field(description="Non-padding tokens fed to the model (all workers).")
    seconds: float = Field(description="Wall time of the run: loading, training and evaluation.")
    train_seconds: float = Field(description="Wall time inside the training loop (`Trainer.train`).")
    step_seconds_p50: float = Field(description="Median wall time from one optimizer step to the next.")
    best_eval_loss: float | None = Field(None, description="Lowest eval loss; None without eval data.")
    trainable_share: float | None = Field(None, description="Trainable (LoRA) parameters / all parameters.")
    stopped_early: bool = Field(False, description="Early stopping ended the run before `steps`.")
    stop_reason: StopReason = Field(
        "steps", description="Why training ended: the validation loss stopped falling (`plateau`), every planned "
        "step was taken (`steps`), the time budget was spent (`time_budget`), or greedy decoding reproduced every "
        "eval example (`reproduced`, when asked to stop then).")
    loss_curve: list[LossPoint] = Field(default_factory=list, description="The losses at each evaluation.")

    @computed_field  # type: ignore[prop-decorator]
    @property
    def tokens_per_s(self) -> float:
        """Training-loop throughput."""
        return self.train_tokens / self.train_seconds


SftResult = TrainResult  # the name `train_lora`'s callers know


def completion_text(reasoning: str, answer: str) -> str:
    """The assistant text that follows the generation prompt (EOS not included)."""
    return f"{reasoning}\n{THINK_END}\n\n{answer}"


def chat_text(tokenizer: PreTrainedTokenizerBase, messages: list[dict[str, str]]) -> str:
    """A conversation rendered with the tokenizer's chat template, ending in the generation prompt."""
    text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    assert isinstance(text, str)
    return text


def prompt_text(tokenizer: PreTrainedTokenizerBase, prompt: str) -> str:
    """The user turn rendered with the tokenizer's chat template, ending in the generation prompt."""
    return chat_text(tokenizer, [{"role": "user", "content": prompt}])


def conversation_of(example: SupervisedExample) -> list[dict[str, str]]:
    """The turns before the answer: an example's own `messages` (system, earlier turns) or its one prompt."""
    messages = getattr(example, "messages", None)
    if messages:
        return [m if isinstance(m, dict) else m.model_dump() for m in messages]
    return [{"role": "user", "content": example.prompt}]


def encode_example(
    tokenizer: PreTrainedTokenizerBase, example: SupervisedExample, max_seq_len: int
) -> dict[str, list[int]]:
    """Token ids and labels for one example; labels are `IGNORE_INDEX` on the prompt (loss on the answer)."""
    prompt_ids = tokenizer(chat_text(tokenizer, conversation_of(example)), add_special_tokens=False)["input_ids"]
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
    """Forwards logged losses (rank 0 only) to a progress function as `event=train_progress` lines."""

    def __init__(self, progress: Callable[[str], None], method: str) -> None:
        self.progress = progress
        self.method = method

    def on_log(
        self,
        args: TrainingArguments,
        state: TrainerState,
        control: TrainerControl,
        logs: dict[str, float] | None = None,
        **kwargs: Any,
    ) -> None:
        if not logs or not state.is_world_process_zero:
            return
        for key in ("loss", "eval_loss"):
            if key in logs:
                self.progress(
                    f"event=train_progress method={self.method} step={state.global_step}/{state.max_steps} "
                    f"{key}={logs[key]:.4f}"
                )


class _TimeBudget(TrainerCallback):
    """Ends training once the loop has run `seconds`; the Trainer then restores the best checkpoint."""

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds
        self.deadline = 0.0
        self.spent = False

    def on_train_begin(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        self.deadline = time.perf_counter() + self.seconds

    def on_step_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any) -> None:
        if time.perf_counter() >= self.deadline and state.global_step < state.max_steps:
            self.spent = True
            # evaluate (and checkpoint) now, so the steps since the last evaluation can still be the best
            control.should_evaluate = control.should_save = args.eval_strategy != "no"
            control.should_training_stop = True


def _greedy_tokens(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    return logits.argmax(dim=-1)


def reproduced_share(prediction: EvalPrediction) -> dict[str, float]:
    """Share of eval examples whose every target token is the model's greedy choice given the tokens before it:
    exactly the examples greedy decoding reproduces from their prompt."""
    predicted, labels = np.asarray(prediction.predictions), np.asarray(prediction.label_ids)
    target = labels[:, 1:]  # the token at i is predicted at i - 1
    scored = target != IGNORE_INDEX
    wrong = (predicted[:, :-1] != target) & scored
    return {"reproduced": float((~wrong.any(axis=1)).mean())}


class _StopWhenReproduced(TrainerCallback):
    """Ends training at the first evaluation where greedy decoding reproduces every eval example."""

    def __init__(self) -> None:
        self.done = False

    def on_evaluate(self, args: TrainingArguments, state: TrainerState, control: TrainerControl,
                    metrics: dict[str, float] | None = None, **kwargs: Any) -> None:
        if metrics and metrics.get("eval_reproduced", 0.0) >= 1.0:
            self.done = True
            control.should_training_stop = True


class _StepClock(TrainerCallback):
    """Times the loop step by step: the median survives the stalls of a busy machine, the total does not."""

    def __init__(self) -> None:
        self.last = 0.0
        self.seconds: list[float] = []

    def on_train_begin(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        self.last = time.perf_counter()

    def on_step_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any) -> None:
        now = time.perf_counter()
        self.seconds.append(now - self.last)
        self.last = now


def load_lora_model(base_dir: Path, lora: LoraSpec, init_adapter: Path | None = None) -> PeftModel:
    """The base model with a trainable LoRA adapter: `init_adapter`'s weights and shape, or a fresh `lora`."""
    # fp32 on CPU: a GPTQ base (QLoRA-style training) would otherwise load in bf16, which CPUs emulate
    base = AutoModelForCausalLM.from_pretrained(base_dir, dtype="auto" if torch.cuda.is_available() else torch.float32)
    if init_adapter is not None:
        return PeftModel.from_pretrained(base, init_adapter, is_trainable=True)
    config = LoraConfig(
        r=lora.r,
        lora_alpha=lora.alpha,
        lora_dropout=lora.dropout,
        target_modules=lora.target_modules,
        task_type="CAUSAL_LM",
    )
    return get_peft_model(base, config)  # type: ignore[return-value]


def trainer_arguments(
    config: SftConfig, output_dir: Path, *, use_gpu: bool, eval_steps: int | None = None,
    tensorboard_dir: Path | None = None,
) -> dict[str, Any]:
    """`TrainingArguments` keywords shared by SFT and KTO (`KTOConfig` subclasses `TrainingArguments`).

    Mixed precision only on a GPU (bf16 where supported, else fp16): CPU autocast is slower for small models.
    With `eval_steps`, each evaluation also saves a checkpoint, and the best one (lowest eval loss) is
    restored at the end, which is what early stopping needs.
    """
    bf16 = use_gpu and torch.cuda.is_bf16_supported()
    kwargs: dict[str, Any] = {
        "output_dir": str(output_dir),
        "max_steps": config.steps,
        "per_device_train_batch_size": config.batch_size,
        "per_device_eval_batch_size": config.batch_size,
        "gradient_accumulation_steps": config.grad_accum,
        "learning_rate": config.learning_rate,
        "lr_scheduler_type": "linear",
        "warmup_steps": min(5, config.steps // 10),
        "max_grad_norm": config.max_grad_norm,
        "weight_decay": 0.0,
        "seed": config.seed,
        "logging_steps": 1,
        "logging_strategy": "steps",
        "save_strategy": "no",
        "report_to": ["tensorboard"] if tensorboard_dir is not None else [],
        "disable_tqdm": True,
        "log_level": "error",
        "log_level_replica": "error",
        "use_cpu": not use_gpu,
        "bf16": bf16,
        "fp16": use_gpu and not bf16,
        "gradient_checkpointing": False,  # TRL turns it on by default; LoRA on these sizes does not need it
        "ddp_find_unused_parameters": False,  # the frozen base gets no gradients, by design
        "remove_unused_columns": False,
        "dataloader_num_workers": 0,
        "include_num_input_tokens_seen": "non_padding",
    }
    if tensorboard_dir is not None:  # loss curves where TensorBoard reads them
        os.environ["TENSORBOARD_LOGGING_DIR"] = str(tensorboard_dir)
    if eval_steps is not None:
        kwargs |= {
            "eval_strategy": "steps",
            "eval_steps": eval_steps,
            "save_strategy": "steps",
            "save_steps": eval_steps,
            "save_total_limit": 1,  # the Trainer still keeps the best checkpoint beside the latest
            "save_only_model": True,
            "load_best_model_at_end": True,
            "metric_for_best_model": "eval_loss",
            "greater_is_better": False,
        }
    return kwargs


def trainer_callbacks(
    method: str,
    *,
    progress: Callable[[str], None] | None,
    early_stopping_patience: int | None,
    max_seconds: float | None = None,
    extra: Sequence[TrainerCallback] = (),
) -> list[TrainerCallback]:
    """Progress lines, early stopping on eval loss (when asked), the time budget and the caller's own callbacks."""
    callbacks = list(extra)
    if max_seconds is not None:
        callbacks.append(_TimeBudget(max_seconds))
    if progress is not None:
        callbacks.append(_Progress(progress, method))
    if early_stopping_patience is not None:
        callbacks.append(EarlyStoppingCallback(early_stopping_patience=early_stopping_patience))
    return callbacks


def run_trainer(trainer: Trainer, started: float) -> TrainResult:
    """Run `trainer` and summarise what it did; `started` is when the whole run began (for `seconds`)."""
    trainer.remove_callback(PrinterCallback)  # it prints every log dict to stdout
    clock = _StepClock()
    trainer.add_callback(clock)
    loop_started = time.perf_counter()
    trainer.train()
    loop_seconds = time.perf_counter() - loop_started
    history = trainer.state.log_history
    losses = [entry["loss"] for entry in history if "loss" in entry]
    eval_losses = [entry["eval_loss"] for entry in history if "eval_loss" in entry]
    budget = next((c for c in trainer.callback_handler.callbacks if isinstance(c, _TimeBudget)), None)
    reproduced = next((c for c in trainer.callback_handler.callbacks if isinstance(c, _StopWhenReproduced)), None)
    stopped_early = trainer.state.global_step < trainer.state.max_steps
    reason: StopReason = ("time_budget" if budget is not None and budget.spent
                          else "reproduced" if reproduced is not None and reproduced.done
                          else "plateau" if stopped_early else "steps")
    return TrainResult(
        first_loss=losses[0],
        last_loss=losses[-1],
        steps=trainer.state.global_step,
        train_tokens=int(trainer.state.num_input_tokens_seen),
        seconds=time.perf_counter() - started,
        train_seconds=loop_seconds,
        step_seconds_p50=statistics.median(clock.seconds),
        best_eval_loss=min(eval_losses) if eval_losses else None,
        stopped_early=stopped_early,
        stop_reason=reason,
        loss_curve=loss_curve(history, every=trainer.args.eval_steps or 10),
        trainable_share=_trainable_share(trainer.model),
    )


def loss_curve(history: Sequence[dict[str, float]], *, every: int) -> list[LossPoint]:
    """One point per evaluation from the Trainer's log history (without evaluations: one per `every` steps, and
    the last step), each with the mean training loss of the steps since the point before."""
    train = [(int(e["step"]), e["loss"]) for e in history if "loss" in e]
    evals = {int(e["step"]): e for e in history if "eval_loss" in e}
    last = train[-1][0] if train else 0
    ends = sorted(evals) if evals else sorted({*range(every, last + 1, every), last} - {0})
    points, start = [], 0
    for end in ends:
        window = [loss for step, loss in train if start < step <= end]
        if window:
            evaluation = evals.get(end, {})
            points.append(LossPoint(step=end, train_loss=statistics.fmean(window),
                                    eval_loss=evaluation.get("eval_loss"),
                                    eval_reproduced=evaluation.get("eval_reproduced")))
        start = end
    return points


def _trainable_share(model: Any) -> float | None:
    if not hasattr(model, "get_nb_trainable_parameters"):
        return None
    trainable, total = model.get_nb_trainable_parameters()
    return trainable / total if total else None


def save_adapter(model: PeftModel, out_dir: Path) -> None:
    """Write the trained adapter (only the `default` one: TRL adds a frozen `ref` copy) atomically to `out_dir`."""
    with atomic_dir(out_dir) as tmp:
        model.save_pretrained(tmp, selected_adapters=["default"])


def fit_sft(
    base_dir: Path,
    examples: Sequence[SupervisedExample],
    config: SftConfig,
    scratch: Path,
    *,
    eval_examples: Sequence[SupervisedExample] = (),
    init_adapter: Path | None = None,
    use_gpu: bool = False,
    eval_steps: int = 10,
    early_stopping_patience: int | None = None,
    stop_when_reproduced: bool = False,
    progress: Callable[[str], None] | None = None,
    callbacks: Sequence[TrainerCallback] = (),
    tensorboard_dir: Path | None = None,
) -> tuple[PeftModel, TrainResult]:
    """Train a LoRA adapter with the HF `Trainer` (checkpoints go to `scratch`); the caller saves the model.

    This is the one training step: `train_lora` calls it in-process, and every Ray Train worker calls it
    with the same arguments (the Trainer sees the torch process group Ray set up and shards the batches).
    """
    if not examples:
        raise ValueError("SFT needs at least one example")
    if (early_stopping_patience is not None or stop_when_reproduced) and not eval_examples:
        raise ValueError("stopping on the eval examples needs eval examples")
    started = time.perf_counter()
    torch.set_flush_denormal(True)
    torch.manual_seed(config.seed)
    tokenizer = AutoTokenizer.from_pretrained(base_dir)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    train_set = [encode_example(tokenizer, ex, config.max_seq_len) for ex in examples]
    eval_set = [encode_example(tokenizer, ex, config.max_seq_len) for ex in eval_examples]
    model = load_lora_model(base_dir, config.lora, init_adapter)
    args = TrainingArguments(
        **trainer_arguments(config, scratch, use_gpu=use_gpu, eval_steps=eval_steps if eval_set else None,
                            tensorboard_dir=tensorboard_dir)
    )
    trainer = Trainer(
        model=model,
        args=args,
        train_dataset=train_set,  # type: ignore[arg-type]  # a list is a map-style dataset
        eval_dataset=eval_set or None,  # type: ignore[arg-type]
        data_collator=lambda batch: collate(batch, pad_id),
        callbacks=trainer_callbacks(
            "sft", progress=progress, early_stopping_patience=early_stopping_patience,
            max_seconds=config.max_seconds, extra=[*callbacks, _StopWhenReproduced()] if stop_when_reproduced
            else callbacks,
        ),
        **({"compute_metrics": reproduced_share, "preprocess_logits_for_metrics": _greedy_tokens}
           if stop_when_reproduced else {}),
    )
    return model, run_trainer(trainer, started)


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
    with tempfile.TemporaryDirectory(prefix="flywheel-sft-") as scratch:
        model, result = fit_sft(
            base_dir,
            examples,
            config,
            Path(scratch),
            init_adapter=init_adapter,
            use_gpu=torch.cuda.is_available(),
            progress=progress,
            callbacks=callbacks,
        )
    save_adapter(model, out_dir)
    return result
