"""The candidate's training step on Ray Train: a `TorchTrainer` whose workers run `fit_sft` or `fit_kto`.

Data flows Parquet → `ray.data.read_parquet` → `TorchTrainer(datasets=...)` → `ray.train.get_dataset_shard`
in each worker. The driver reads the (feedback-sized) data once; every worker gets all rows and the HF
Trainer inside shards the batches over the torch process group Ray set up. Why not Ray Data's streaming
split: TRL's `KTOTrainer` needs a map-style dataset (it tokenizes up front and pairs neighbours for its
KL term), and a map-style dataset gets a fresh seeded shuffle every epoch — so one worker trains exactly
the batches `train_lora` would, and `prepare_trainer` (which only matters for streamed Ray Data
iterables) has nothing to do.

Training never blocks serving: Ray is asked for `num_workers` workers of `cpus_per_worker` CPUs (and a
GPU each with `use_gpu`) and nothing else.
"""

import contextlib
import json
import os
import shutil
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, Literal

import pyarrow as pa
import pyarrow.dataset as pa_dataset
import pyarrow.parquet as pq
import ray
import ray.train
import torch
from pydantic import BaseModel, Field, field_validator, model_validator
from ray.train import CheckpointConfig, DataConfig, RunConfig, ScalingConfig
from ray.train.huggingface.transformers import RayTrainReportCallback
from ray.train.torch import TorchTrainer
from ray.util.queue import Empty, Queue

from training.kto import KtoExample, KtoSpec, fit_kto
from training.sft import SftConfig, SupervisedExample, TrainResult, fit_sft, save_adapter

# The Parquet layout per method. KTO rows carry the rated completion whole: a thumbs-down answer is often
# malformed (no closed think block), so it need not split into reasoning and answer.
COLUMNS: dict[str, list[str]] = {"sft": ["prompt", "reasoning", "answer"], "kto": ["prompt", "completion", "label"]}


class TrainJob(BaseModel):
    """One candidate training run on Ray Train."""

    base_dir: Path = Field(description="The base model directory (HF format).")
    train_path: Path = Field(
        description="Parquet file or directory: prompt, reasoning, answer (SFT) or prompt, completion, label (KTO)."
    )
    eval_path: Path | None = Field(None, description="Held-out Parquet with the method's columns, for eval loss.")
    out_dir: Path = Field(description="Where the final PEFT adapter is written (atomically, by rank 0).")
    method: Literal["sft", "kto"] = "sft"
    sft: SftConfig = Field(default_factory=SftConfig, description="Steps, optimizer, batch and LoRA shape.")
    kto: KtoSpec = Field(default_factory=KtoSpec, description="KTO's own knobs (method='kto' only).")
    init_adapter: Path | None = Field(None, description="Start from this adapter (the champion's): incremental.")
    num_workers: int = Field(1, gt=0, description="Ray Train workers (data-parallel replicas).")
    use_gpu: bool = Field(False, description="Train on GPUs; bf16 where supported, else fp16.")
    gpus_per_worker: float = Field(1.0, gt=0, le=1, description="GPU share per worker: below 1 to share one GPU "
                                   "with a serving replica (size vLLM's gpu_memory_utilization to leave room).")
    cpus_per_worker: float = Field(1.0, gt=0, description="Ray CPUs reserved per worker.")
    torch_threads: int = Field(1, gt=0, description="Torch intra-op threads per worker (1 for tiny models).")
    eval_steps: int = Field(10, gt=0, description="Optimizer steps between evaluations (and checkpoints).")
    early_stopping_patience: int | None = Field(
        None, gt=0, description="Stop after this many evaluations without a lower eval loss; None: off."
    )
    stop_when_reproduced: bool = Field(
        False, description="SFT: stop at the first evaluation where greedy decoding reproduces every eval example.")
    checkpoint_dir: Path | None = Field(
        None, description="Ray Train storage for run state and checkpoints; None: a temp dir removed afterwards."
    )
    tensorboard_dir: Path | None = Field(None, description="Where rank 0 writes TensorBoard loss curves (SFT).")
    resource_wait_s: float = Field(
        300.0, ge=0, description="How long the workers may wait for the cluster to free or add what they ask for; "
        "then the run fails saying what is missing (Ray alone would wait forever).")

    @field_validator("train_path", "eval_path", "out_dir", "init_adapter", "checkpoint_dir", "tensorboard_dir")
    @classmethod
    def _absolute(cls, path: Path | None) -> Path | None:
        """Workers run in other directories: pin paths before they travel."""
        return path.resolve() if path is not None else None

    @field_validator("base_dir")
    @classmethod
    def _local_dir_or_hub_id(cls, base: Path) -> Path:
        """A local directory is pinned like the other paths; a hub id (`org/name`) travels as it is."""
        return base.resolve() if base.expanduser().exists() or str(base).startswith((".", "/", "~")) else base

    @model_validator(mode="after")
    def _early_stopping_needs_eval(self) -> "TrainJob":
        if self.early_stopping_patience is not None and self.eval_path is None:
            raise ValueError("early_stopping_patience needs eval_path")
        if self.stop_when_reproduced and (self.eval_path is None or self.method != "sft"):
            raise ValueError("stop_when_reproduced needs eval_path and method sft")
        return self


class TrainOutcome(TrainResult):
    """What a Ray Train run produced; `seconds` is the whole `train_on_ray` call, worker start-up included."""

    method: Literal["sft", "kto"]
    adapter_dir: Path = Field(description="The final adapter (with eval data: the checkpoint of best eval loss).")


class _SftRow(BaseModel):
    """One SFT Parquet row; it satisfies `SupervisedExample`. `messages_json`: the turns before the answer."""

    prompt: str
    reasoning: str
    answer: str
    messages_json: str = ""

    @property
    def messages(self) -> list[dict[str, str]]:
        return json.loads(self.messages_json) if self.messages_json else []


def write_rows(path: Path, rows: Sequence[SupervisedExample] | Sequence[KtoExample]) -> Path:
    """Write SFT examples or KTO rated completions as the Parquet `TrainJob` reads."""
    columns = COLUMNS["kto" if rows and isinstance(rows[0], KtoExample) else "sft"]
    pq.write_table(pa.Table.from_pylist([{c: getattr(row, c) for c in columns} for row in rows]), path)
    return path


def connect_ray(*, address: str | None = None, object_store_mb: int = 256) -> bool:
    """Use the Ray this process is connected to, else the cluster at `address` (or `RAY_ADDRESS`); else start
    a small local one.

    Returns whether this call initialised Ray (the caller may then `ray.shutdown()` when done).
    """
    if ray.is_initialized():
        return False
    address = address or os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address)  # the serving cluster, or a KubeRay RayJob's: its own settings apply
    else:
        ray.init(object_store_memory=object_store_mb * 1024 * 1024, include_dashboard=False)
    return True


def _rows(name: str, row_type: type[BaseModel]) -> list[Any]:
    """This worker's copy of a dataset (every worker gets all rows, in file order)."""
    shard = ray.train.get_dataset_shard(name)
    assert shard is not None, f"no dataset {name!r} was given to the trainer"
    return [row_type.model_validate(row) for row in shard.iter_rows()]


def _train_worker(config: dict[str, Any]) -> TrainResult:
    """Ray Train worker loop: fit on the shared data, rank 0 saves the adapter; returns rank 0's `TrainResult`."""
    job: TrainJob = config["job"]
    lines: Queue | None = config["progress"]
    torch.set_num_threads(job.torch_threads)
    row_type = KtoExample if job.method == "kto" else _SftRow
    train_rows = _rows("train", row_type)
    eval_rows = _rows("eval", row_type) if job.eval_path is not None else []
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
            model, result = fit_kto(
                job.base_dir, train_rows, job.sft, Path(scratch), kto=job.kto, eval_rows=eval_rows, **options
            )
        else:
            is_rank0 = ray.train.get_context().get_world_rank() == 0
            model, result = fit_sft(
                job.base_dir, train_rows, job.sft, Path(scratch), eval_examples=eval_rows,
                stop_when_reproduced=job.stop_when_reproduced,
                tensorboard_dir=job.tensorboard_dir if is_rank0 else None, **options
            )
    if ray.train.get_context().get_world_rank() == 0:
        save_adapter(model, job.out_dir)
    return result


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


def _check_columns(path: Path, method: str) -> None:
    """Fail before any Ray work when the Parquet lacks the method's columns (reads the schema only)."""
    missing = set(COLUMNS[method]) - set(pa_dataset.dataset(str(path), format="parquet").schema.names)
    if missing:
        raise ValueError(f"{method} reads columns {COLUMNS[method]}; {path} lacks {sorted(missing)}")


def _dataset(path: Path) -> ray.data.Dataset:
    """Read a Parquet file or directory into the object store, here, before the workers take their CPUs.

    Ray Data's file listing asks for a whole CPU, which a worker group that holds every CPU would never
    leave it; read once here, every worker then only fetches the same blocks, in the same order.
    """
    context = ray.data.DataContext.get_current()
    progress_bars, context.enable_progress_bars = context.enable_progress_bars, False  # noise for tiny reads
    try:
        return ray.data.read_parquet(str(path), num_cpus=0).materialize()
    finally:
        context.enable_progress_bars = progress_bars


class ResourcesUnavailableError(RuntimeError):
    """The cluster did not have what a training run's workers ask for within the run's wait."""


def wait_for_resources(job: TrainJob, *, poll_s: float = 1.0) -> None:
    """Return once the cluster has the workers' CPUs and GPUs free; else ResourcesUnavailableError after
    `job.resource_wait_s`, saying whether the cluster could ever grant them or something holds them.

    Meanwhile the request is shown to the Ray autoscaler (a no-op without one), so a cluster that can grow
    adds the nodes instead of the run failing."""
    from ray.autoscaler.sdk import request_resources

    per_worker = {"CPU": job.cpus_per_worker, **({"GPU": job.gpus_per_worker} if job.use_gpu else {})}
    need = {name: amount * job.num_workers for name, amount in per_worker.items()}
    deadline = time.monotonic() + job.resource_wait_s
    asked = False
    try:
        while True:
            free = ray.available_resources()
            short = {name: amount for name, amount in need.items() if free.get(name, 0.0) + 1e-9 < amount}
            if not short:
                return
            if time.monotonic() >= deadline:
                total = ray.cluster_resources()
                never = [name for name, amount in need.items() if total.get(name, 0.0) + 1e-9 < amount]
                why = (f"the cluster has only {', '.join(f'{total.get(n, 0.0):g} {n}' for n in never)} in all"
                       if never else "serving or other jobs hold them")
                raise ResourcesUnavailableError(
                    f"{job.num_workers} training worker(s) need {', '.join(f'{v:g} {k}' for k, v in need.items())}"
                    f"; {', '.join(f'{free.get(k, 0.0):g} {k}' for k in need)} free after {job.resource_wait_s:.0f}s "
                    f"and {why}: lower retrain.num_workers, cpus_per_worker or gpus_per_worker, or add nodes")
            if not asked:
                request_resources(bundles=[per_worker] * job.num_workers)
                asked = True
            time.sleep(poll_s)
    finally:
        if asked:
            request_resources(bundles=[])  # the trainer's own placement group asks from here on


def train_on_ray(job: TrainJob, *, progress: Callable[[str], None] | None = None) -> TrainOutcome:
    """Train a candidate adapter with Ray Train and write it to `job.out_dir`.

    `progress` gets `event=train_progress ...` lines from rank 0 (on a helper thread). A failed run raises
    Ray's `TrainingFailedError`; a cluster without room for the workers, `ResourcesUnavailableError`.
    """
    started = time.perf_counter()
    paths = {"train": job.train_path, **({"eval": job.eval_path} if job.eval_path is not None else {})}
    for path in paths.values():
        _check_columns(path, job.method)
    connect_ray()
    wait_for_resources(job)
    datasets = {name: _dataset(path) for name, path in paths.items()}
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
                    resources_per_worker={"CPU": job.cpus_per_worker,
                                          **({"GPU": job.gpus_per_worker} if job.use_gpu else {})},
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
            result: TrainResult = trainer.fit().return_value
    finally:
        if job.checkpoint_dir is None:
            shutil.rmtree(storage, ignore_errors=True)
    return TrainOutcome(
        **result.model_dump(exclude={"seconds", "tokens_per_s"}),
        seconds=time.perf_counter() - started,
        method=job.method,
        adapter_dir=job.out_dir,
    )
