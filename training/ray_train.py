"""The candidate's training step on Ray Train: a `TorchTrainer` whose workers run `fit_sft` or `fit_kto`.

Data flows Parquet → `ray.data.read_parquet` → `TorchTrainer(datasets=...)` → `ray.train.get_dataset_shard`
in each worker. Every worker reads the whole (feedback-sized) dataset and the HF Trainer inside shards the
batches over the torch process group Ray set up: TRL's `KTOTrainer` needs a map-style dataset (it
tokenizes up front and pairs neighbours for its KL term), and a map-style dataset gets a fresh seeded
shuffle every epoch — so one worker trains exactly the batches `train_lora` would, and `prepare_trainer`
(which only matters for streamed Ray Data iterables) is not needed.

Training never blocks serving: Ray is asked for `num_workers` workers of `cpus_per_worker` CPUs (and a
GPU each with `use_gpu`) and nothing else; the Parquet is read before the workers start.
"""

import contextlib
import shutil
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, Literal

import ray
import ray.train
import torch
from pydantic import BaseModel, Field, field_validator, model_validator
from ray.train import CheckpointConfig, DataConfig, RunConfig, ScalingConfig
from ray.train.huggingface.transformers import RayTrainReportCallback
from ray.train.torch import TorchTrainer
from ray.util.queue import Empty, Queue

from training.kto import KtoExample, KtoSpec, fit_kto
from training.sft import SftConfig, TrainResult, completion_text, fit_sft, save_adapter

SFT_COLUMNS = ["prompt", "reasoning", "answer"]
KTO_COLUMNS = [*SFT_COLUMNS, "label"]


class TrainJob(BaseModel):
    """One candidate training run on Ray Train."""

    base_dir: Path = Field(description="The base model directory (HF format).")
    train_path: Path = Field(description="Parquet file or directory: prompt, reasoning, answer (+ label for KTO).")
    eval_path: Path | None = Field(None, description="Held-out Parquet with the same columns, for eval loss.")
    out_dir: Path = Field(description="Where the final PEFT adapter is written (atomically, by rank 0).")
    method: Literal["sft", "kto"] = "sft"
    sft: SftConfig = Field(default_factory=SftConfig, description="Steps, optimizer, batch and LoRA shape.")
    kto: KtoSpec = Field(default_factory=KtoSpec, description="KTO's own knobs (method='kto' only).")
    init_adapter: Path | None = Field(None, description="Start from this adapter (the champion's): incremental.")
    num_workers: int = Field(1, gt=0, description="Ray Train workers (data-parallel replicas).")
    use_gpu: bool = Field(False, description="One GPU per worker; bf16 where supported, else fp16.")
    cpus_per_worker: float = Field(1.0, gt=0, description="Ray CPUs reserved per worker.")
    torch_threads: int = Field(1, gt=0, description="Torch intra-op threads per worker (1 for tiny models).")
    eval_steps: int = Field(10, gt=0, description="Optimizer steps between evaluations (and checkpoints).")
    early_stopping_patience: int | None = Field(
        None, gt=0, description="Stop after this many evaluations without a lower eval loss; None: off."
    )
    checkpoint_dir: Path | None = Field(
        None, description="Ray Train storage for run state and checkpoints; None: a temp dir removed afterwards."
    )

    @field_validator("base_dir", "train_path", "eval_path", "out_dir", "init_adapter", "checkpoint_dir")
    @classmethod
    def _absolute(cls, path: Path | None) -> Path | None:
        """Workers run in other directories: pin paths before they travel."""
        return path.resolve() if path is not None else None

    @model_validator(mode="after")
    def _early_stopping_needs_eval(self) -> "TrainJob":
        if self.early_stopping_patience is not None and self.eval_path is None:
            raise ValueError("early_stopping_patience needs eval_path")
        return self


class TrainOutcome(BaseModel):
    """What a Ray Train run produced."""

    method: Literal["sft", "kto"]
    first_loss: float
    last_loss: float
    best_eval_loss: float | None = Field(description="Lowest eval loss (its adapter is the one saved).")
    steps: int
    train_tokens: int = Field(description="Non-padding tokens, all workers.")
    seconds: float = Field(description="Wall time of `train_on_ray`: worker start-up, data, training, saving.")
    train_seconds: float = Field(description="Wall time of the training loop on rank 0.")
    tokens_per_s: float = Field(description="train_tokens / train_seconds.")
    stopped_early: bool
    adapter_dir: Path


class _Row(BaseModel):
    """One Parquet row; it satisfies `SupervisedExample`."""

    prompt: str
    reasoning: str
    answer: str
    label: bool | None = None

    def kto(self) -> KtoExample:
        if self.label is None:
            raise ValueError("KTO rows need a boolean 'label' column")
        return KtoExample(prompt=self.prompt, completion=completion_text(self.reasoning, self.answer), label=self.label)


def connect_ray(*, object_store_mb: int = 256) -> bool:
    """Use the Ray this process is already connected to; otherwise start a small local one.

    Returns whether Ray was started here (the caller may then `ray.shutdown()` when done).
    """
    if ray.is_initialized():
        return False
    ray.init(object_store_memory=object_store_mb * 1024 * 1024, include_dashboard=False)
    return True


def _rows(name: str) -> list[_Row]:
    """This worker's copy of a dataset (every worker gets all rows, in file order)."""
    shard = ray.train.get_dataset_shard(name)
    assert shard is not None, f"no dataset {name!r} was given to the trainer"
    return [_Row.model_validate(row) for row in shard.iter_rows()]


def _train_worker(config: dict[str, Any]) -> dict[str, Any]:
    """Ray Train worker loop: fit on the shared data, rank 0 saves the adapter; returns rank 0's `TrainResult`."""
    job: TrainJob = config["job"]
    lines: Queue | None = config["progress"]
    torch.set_num_threads(job.torch_threads)
    train_rows = _rows("train")
    eval_rows = _rows("eval") if job.eval_path is not None else []
    options: dict[str, Any] = {
        "init_adapter": job.init_adapter,
        "use_gpu": job.use_gpu,
        "eval_steps": job.eval_steps,
        "early_stopping_patience": job.early_stopping_patience,
        "progress": lines.put if lines is not None else None,
        "callbacks": [RayTrainReportCallback()],  # reports each checkpoint (+ eval loss) to Ray Train
    }
    with tempfile.TemporaryDirectory(prefix=f"flywheel-{job.method}-") as scratch:
        if job.method == "kto":
            kto_rows = [row.kto() for row in train_rows]
            kto_eval = [row.kto() for row in eval_rows]
            model, result = fit_kto(
                job.base_dir, kto_rows, job.sft, Path(scratch), kto=job.kto, eval_rows=kto_eval, **options
            )
        else:
            model, result = fit_sft(
                job.base_dir, train_rows, job.sft, Path(scratch), eval_examples=eval_rows, **options
            )
    if ray.train.get_context().get_world_rank() == 0:
        save_adapter(model, job.out_dir)
    return result.model_dump()


@contextlib.contextmanager
def _forwarding(progress: Callable[[str], None] | None) -> Iterator[Queue | None]:
    """A Ray queue the workers put progress lines on; a thread here hands them to `progress`."""
    if progress is None:
        yield None
        return
    lines = Queue(actor_options={"num_cpus": 0})
    done = threading.Event()

    def pump() -> None:
        while not done.is_set():
            with contextlib.suppress(Empty):
                progress(lines.get(timeout=0.5))

    thread = threading.Thread(target=pump, name="train-progress", daemon=True)
    thread.start()
    try:
        yield lines
    finally:
        done.set()
        thread.join()
        with contextlib.suppress(Empty):
            while True:
                progress(lines.get_nowait())
        lines.shutdown()


def _dataset(path: Path, method: str) -> ray.data.Dataset:
    """Read a Parquet file or directory into the object store, here, before the workers take their CPUs.

    Ray Data's file listing asks for a whole CPU, which a worker group that holds every CPU would never
    leave it; read once here, every worker then only fetches the same blocks, in the same order.
    """
    columns = KTO_COLUMNS if method == "kto" else SFT_COLUMNS
    context = ray.data.DataContext.get_current()
    progress_bars, context.enable_progress_bars = context.enable_progress_bars, False  # noise for tiny reads
    try:
        return ray.data.read_parquet(str(path), columns=columns, num_cpus=0).materialize()
    finally:
        context.enable_progress_bars = progress_bars


def train_on_ray(job: TrainJob, *, progress: Callable[[str], None] | None = None) -> TrainOutcome:
    """Train a candidate adapter with Ray Train and write it to `job.out_dir`.

    `progress` gets `event=train_progress ...` lines from rank 0 (on a helper thread). A failed run raises
    Ray's `TrainingFailedError` and leaves `job.out_dir` untouched.
    """
    started = time.perf_counter()
    connect_ray()
    datasets = {"train": _dataset(job.train_path, job.method)}
    if job.eval_path is not None:
        datasets["eval"] = _dataset(job.eval_path, job.method)
    ingest = DataConfig.default_ingest_options()
    ingest.preserve_order = True  # every worker must see the same row order for the Trainer's sharding
    storage = job.checkpoint_dir or Path(tempfile.mkdtemp(prefix="flywheel-ray-train-"))
    try:
        with _forwarding(progress) as lines:
            trainer = TorchTrainer(
                _train_worker,
                train_loop_config={"job": job, "progress": lines},
                scaling_config=ScalingConfig(
                    num_workers=job.num_workers,
                    use_gpu=job.use_gpu,
                    resources_per_worker={"CPU": job.cpus_per_worker, **({"GPU": 1} if job.use_gpu else {})},
                ),
                run_config=RunConfig(
                    name=f"flywheel-{job.method}-{uuid.uuid4().hex[:8]}",
                    storage_path=str(storage),
                    checkpoint_config=CheckpointConfig(
                        num_to_keep=1, checkpoint_score_attribute="eval_loss", checkpoint_score_order="min"
                    ),
                ),
                datasets=datasets,
                dataset_config=DataConfig(datasets_to_split=[], execution_options=ingest),
            )
            result = TrainResult.model_validate(trainer.fit().return_value)
    finally:
        if job.checkpoint_dir is None:
            shutil.rmtree(storage, ignore_errors=True)
    return TrainOutcome(
        method=job.method,
        first_loss=result.first_loss,
        last_loss=result.last_loss,
        best_eval_loss=result.best_eval_loss,
        steps=result.steps,
        train_tokens=result.train_tokens,
        seconds=time.perf_counter() - started,
        train_seconds=result.train_seconds,
        tokens_per_s=result.tokens_per_s,
        stopped_early=result.stopped_early,
        adapter_dir=job.out_dir,
    )
