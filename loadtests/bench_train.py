"""`flywheel bench train`: what Ray Train costs (or gains) for the candidate's LoRA SFT.

The same run — model, data, steps, batch, seed — once with the HF Trainer in this process (`train_lora`)
and once through Ray Train (`train_on_ray`). Throughput compares the training loops (tokens/s, goal:
Ray ÷ plain ≥ 1.0); wall times show the fixed costs apart: starting Ray, and starting the worker group
(worker processes, torch process group, data, model load) around the loop.
"""

import tempfile
import time
from pathlib import Path

import ray
import torch
from pydantic import BaseModel, Field

from training.demo_task import generate_examples
from training.ray_train import TrainJob, connect_ray, train_on_ray, write_rows
from training.sft import SftConfig, train_lora


class TrainBenchReport(BaseModel):
    steps: int
    workers: int = Field(description="Ray Train workers (the plain run is one process).")
    threads: int = Field(description="Torch threads per process, in both runs.")
    examples: int
    batch_size: int = Field(description="Per worker and step.")
    plain_tokens_per_s: float
    ray_tokens_per_s: float
    ray_over_plain: float = Field(description="Training-loop tokens/s through Ray ÷ plain (goal ≥ 1.0).")
    plain_step_ms_p50: float = Field(description="Median step time of the plain loop.")
    ray_step_ms_p50: float = Field(description="Median step time of the loop on Ray's rank 0.")
    ray_over_plain_p50: float = Field(
        description="The same ratio from median step times: on a shared machine the loop total catches others' stalls."
    )
    plain_train_s: float = Field(description="The plain training loop.")
    ray_train_s: float = Field(description="The training loop inside Ray's rank-0 worker.")
    plain_wall_s: float = Field(description="`train_lora`: model load, loop, save.")
    ray_wall_s: float = Field(description="`train_on_ray`: data read, worker group start-up, loop, save.")
    ray_startup_s: float = Field(description="ray_wall_s - ray_train_s: what Ray Train adds around the loop.")
    ray_init_s: float = Field(description="Starting local Ray (0 when this process was already connected).")
    same_batches: bool = Field(description="Both runs saw the same tokens and first loss (expected with 1 worker).")
    plain_first_loss: float
    plain_last_loss: float
    ray_first_loss: float
    ray_last_loss: float


def run_train_bench(
    base_dir: Path, *, steps: int = 40, workers: int = 1, threads: int = 1, examples: int = 256
) -> TrainBenchReport:
    """Train the same LoRA SFT plainly and through Ray Train over the model in `base_dir`; compare them."""
    config = SftConfig(steps=steps)
    data = generate_examples(examples, seed=config.seed, distribution="drifted")
    with tempfile.TemporaryDirectory(prefix="flywheel-bench-train-") as tmp:
        scratch = Path(tmp)
        train_path = write_rows(scratch / "train.parquet", data)

        threads_before = torch.get_num_threads()
        torch.set_num_threads(threads)
        try:
            started = time.perf_counter()
            plain = train_lora(base_dir, data, scratch / "plain", config)
            plain_wall = time.perf_counter() - started
        finally:
            torch.set_num_threads(threads_before)

        started = time.perf_counter()
        started_ray = connect_ray()
        ray_init = time.perf_counter() - started if started_ray else 0.0
        try:
            job = TrainJob(
                base_dir=base_dir,
                train_path=train_path,
                out_dir=scratch / "ray",
                sft=config,
                num_workers=workers,
                torch_threads=threads,
                cpus_per_worker=threads,
            )
            outcome = train_on_ray(job)
        finally:
            if started_ray:
                ray.shutdown()

    return TrainBenchReport(
        steps=steps,
        workers=workers,
        threads=threads,
        examples=examples,
        batch_size=config.batch_size,
        plain_tokens_per_s=plain.tokens_per_s,
        ray_tokens_per_s=outcome.tokens_per_s,
        ray_over_plain=outcome.tokens_per_s / plain.tokens_per_s,
        plain_step_ms_p50=plain.step_seconds_p50 * 1000,
        ray_step_ms_p50=outcome.step_seconds_p50 * 1000,
        ray_over_plain_p50=(outcome.train_tokens / outcome.steps / outcome.step_seconds_p50)
        / (plain.train_tokens / plain.steps / plain.step_seconds_p50),
        plain_train_s=plain.train_seconds,
        ray_train_s=outcome.train_seconds,
        plain_wall_s=plain_wall,
        ray_wall_s=outcome.seconds,
        ray_startup_s=outcome.seconds - outcome.train_seconds,
        ray_init_s=ray_init,
        same_batches=outcome.train_tokens == plain.train_tokens and abs(outcome.first_loss - plain.first_loss) < 1e-4,
        plain_first_loss=plain.first_loss,
        plain_last_loss=plain.last_loss,
        ray_first_loss=outcome.first_loss,
        ray_last_loss=outcome.last_loss,
    )
