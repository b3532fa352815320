"""The candidate's training step on real Ray Train (TorchTrainer, Ray Data, HF Trainer + PEFT in the workers)."""

import math
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import ray
import torch
from peft import PeftModel
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer, EvalPrediction

from training.demo_model import build_demo_base
from training.demo_task import ANSWERS, QUOTES, REASONING, DemoExample, generate_examples
from training.kto import KtoExample
from training.ray_train import TrainJob, TrainOutcome, connect_ray, train_on_ray, write_rows
from training.sft import SftConfig, collate, completion_text, encode_example, reproduced_share, train_lora

BASE_STEPS = 150
STEPS = 20
# Another label for each label: mislabelled news trains the early-stopping case and is KTO's thumbs down.
WRONG = {"positive": "negative", "negative": "neutral", "neutral": "positive"}


def mislabelled(ex: DemoExample) -> DemoExample:
    """The same news with another label's rationale and answer."""
    label = next(label for label, word in ANSWERS[ex.lang].items() if word == ex.answer)
    opening, closing = QUOTES[ex.lang]
    cue = ex.reasoning.split(opening, 1)[1].split(closing, 1)[0]
    wrong = WRONG[label]
    return ex.model_copy(
        update={"reasoning": REASONING[ex.lang][wrong].format(cue=cue), "answer": ANSWERS[ex.lang][wrong]}
    )


@torch.inference_mode()
def eval_loss(base_dir: Path, adapter_dir: Path, examples: list[DemoExample], batch_size: int = 16) -> float:
    """The HF Trainer's eval loss (mean over equal batches of the token-mean loss), recomputed with PEFT."""
    tokenizer = AutoTokenizer.from_pretrained(base_dir)
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_dir), adapter_dir).eval()
    losses = []
    for start in range(0, len(examples), batch_size):
        features = [encode_example(tokenizer, ex, 256) for ex in examples[start : start + batch_size]]
        losses.append(model(**collate(features, tokenizer.pad_token_id)).loss.item())
    return sum(losses) / len(losses)


def lora_b(adapter_dir: Path) -> dict[str, torch.Tensor]:
    return {k: v for k, v in load_file(adapter_dir / "adapter_model.safetensors").items() if "lora_B" in k}


@pytest.fixture(scope="module", autouse=True)
def _one_thread() -> Iterator[None]:
    """Tiny models run far slower with two threads on a busy 2-core box (OpenMP spin-waits)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_demo_base(tmp_path_factory.mktemp("ray-train") / "base", steps=BASE_STEPS, seed=0)


@pytest.fixture(scope="module", autouse=True)
def _ray() -> Iterator[None]:
    started = connect_ray()
    yield
    if started:
        ray.shutdown()


@pytest.fixture(scope="module")
def train_examples() -> list[DemoExample]:
    return generate_examples(128, seed=42, distribution="drifted")


@pytest.fixture(scope="module")
def train_path(base_dir: Path, train_examples: list[DemoExample]) -> Path:
    return write_rows(base_dir.parent / "train.parquet", train_examples)


@pytest.fixture(scope="module")
def scratch_run(base_dir: Path, train_path: Path) -> tuple[TrainOutcome, list[str]]:
    """One worker, a fresh adapter, no eval data."""
    lines: list[str] = []
    job = TrainJob(
        base_dir=base_dir, train_path=train_path, out_dir=base_dir.parent / "scratch", sft=SftConfig(steps=STEPS)
    )
    return train_on_ray(job, progress=lines.append), lines


def test_sft_on_ray_learns_and_writes_an_adapter(scratch_run: tuple[TrainOutcome, list[str]]) -> None:
    outcome, lines = scratch_run
    assert outcome.method == "sft" and outcome.steps == STEPS and not outcome.stopped_early
    assert outcome.stop_reason == "steps"
    # without validation data the curve has a point every 10 steps: the mean training loss since the one before
    assert [(p.step, p.eval_loss) for p in outcome.loss_curve] == [(10, None), (20, None)]
    assert outcome.loss_curve[-1].train_loss < outcome.loss_curve[0].train_loss
    assert outcome.last_loss < outcome.first_loss
    assert outcome.best_eval_loss is None
    assert outcome.train_tokens > 0 and outcome.tokens_per_s > 0
    assert outcome.seconds > outcome.train_seconds > 0
    assert (outcome.adapter_dir / "adapter_config.json").exists()
    weights = lora_b(outcome.adapter_dir)
    assert weights and all(w.abs().sum() > 0 for w in weights.values())  # lora_B starts at zero
    assert not [p for p in outcome.adapter_dir.parent.iterdir() if p.name.startswith(".scratch")]
    steps = [line for line in lines if line.startswith("event=train_progress method=sft step=")]
    assert len(steps) == STEPS and steps[-1].startswith(f"event=train_progress method=sft step={STEPS}/{STEPS} loss=")


def test_one_worker_trains_the_batches_train_lora_would(
    base_dir: Path, train_examples: list[DemoExample], scratch_run: tuple[TrainOutcome, list[str]]
) -> None:
    plain = train_lora(base_dir, train_examples, base_dir.parent / "plain", SftConfig(steps=STEPS))
    outcome, _ = scratch_run
    assert outcome.train_tokens == plain.train_tokens
    assert outcome.first_loss == pytest.approx(plain.first_loss, rel=1e-4)
    assert outcome.last_loss == pytest.approx(plain.last_loss, rel=1e-3)


def test_incremental_run_starts_from_the_champion(base_dir: Path, scratch_run: tuple[TrainOutcome, list[str]]) -> None:
    champion = scratch_run[0]
    newer = write_rows(base_dir.parent / "newer.parquet", generate_examples(64, seed=43, distribution="drifted"))
    job = TrainJob(
        base_dir=base_dir,
        train_path=newer,
        out_dir=base_dir.parent / "incremental",
        init_adapter=champion.adapter_dir,
        sft=SftConfig(steps=5, seed=1),
    )
    outcome = train_on_ray(job)
    assert outcome.first_loss < champion.first_loss / 2  # it starts where the champion left off
    before, after = lora_b(champion.adapter_dir), lora_b(outcome.adapter_dir)
    assert before.keys() == after.keys()
    assert any(not torch.equal(before[k], after[k]) for k in before)


def test_the_time_budget_stops_training(base_dir: Path, train_examples: list[DemoExample]) -> None:
    result = train_lora(base_dir, train_examples, base_dir.parent / "budget", SftConfig(steps=500, max_seconds=1.0))
    assert result.stop_reason == "time_budget" and result.stopped_early and result.steps < 500


def test_greedy_reproduction_counts_an_example_only_when_every_target_token_is_the_greedy_one() -> None:
    labels = np.array([[-100, -100, 5, 6], [-100, 7, 8, -100], [-100, -100, 9, -100]])
    greedy = np.array([[0, 5, 6, 1], [7, 8, 3, 3], [0, 4, 2, 2]])  # predicted at i: the token at i + 1
    shares = reproduced_share(EvalPrediction(predictions=greedy, label_ids=labels))
    assert shares == {"reproduced": pytest.approx(2 / 3)}


def test_corrections_train_until_greedy_decoding_gives_them(base_dir: Path) -> None:
    """A corrections retrain's stop: once every eval example comes back exactly, training ends before its cap."""
    corrections = [mislabelled(ex) for ex in generate_examples(8, seed=46)]
    path = write_rows(base_dir.parent / "corrections.parquet", corrections)
    job = TrainJob(base_dir=base_dir, train_path=path, eval_path=path, out_dir=base_dir.parent / "reproduced",
                   sft=SftConfig(steps=80, batch_size=8), eval_steps=5, stop_when_reproduced=True)
    outcome = train_on_ray(job)
    assert outcome.stop_reason == "reproduced" and outcome.steps < 80, outcome.loss_curve
    assert outcome.loss_curve[-1].eval_reproduced == 1.0 and outcome.loss_curve[0].eval_reproduced < 1.0


def test_early_stopping_stops_once_eval_loss_rises(base_dir: Path) -> None:
    # Wrong labels on news the base already reads right: every step raises the loss on correct labels.
    train = [mislabelled(ex) for ex in generate_examples(64, seed=44)]
    train_path = write_rows(base_dir.parent / "mislabelled.parquet", train)
    correct = generate_examples(32, seed=45)
    eval_path = write_rows(base_dir.parent / "correct.parquet", correct)
    lines: list[str] = []
    job = TrainJob(
        base_dir=base_dir,
        train_path=train_path,
        eval_path=eval_path,
        out_dir=base_dir.parent / "early",
        sft=SftConfig(steps=40),
        eval_steps=2,
        early_stopping_patience=1,
    )
    outcome = train_on_ray(job, progress=lines.append)
    evals = [float(line.rsplit("eval_loss=", 1)[1]) for line in lines if "eval_loss=" in line]
    assert outcome.stopped_early and outcome.steps < 40 and outcome.stop_reason == "plateau"
    assert outcome.steps == 2 * len(evals)
    assert [p.step for p in outcome.loss_curve] == list(range(2, outcome.steps + 1, 2))
    assert [p.eval_loss for p in outcome.loss_curve] == pytest.approx(evals, abs=1e-4)
    assert evals[-1] > evals[-2]  # the rise that stopped it
    assert outcome.best_eval_loss == pytest.approx(min(evals), abs=1e-4)
    # The saved adapter is the best checkpoint, not the last weights.
    assert eval_loss(base_dir, outcome.adapter_dir, correct) == pytest.approx(outcome.best_eval_loss, abs=1e-3)


@pytest.mark.slow  # ~35 s more on 2 cores: a second worker group start-up
def test_two_workers_split_the_batches(
    base_dir: Path, train_path: Path, scratch_run: tuple[TrainOutcome, list[str]]
) -> None:
    job = TrainJob(
        base_dir=base_dir,
        train_path=train_path,
        out_dir=base_dir.parent / "two-workers",
        sft=SftConfig(steps=5),
        num_workers=2,
    )
    outcome = train_on_ray(job)
    one = scratch_run[0]
    # Each rank trains its own batch of 16 per step: twice the tokens per step of one worker.
    assert outcome.train_tokens / outcome.steps > 1.6 * one.train_tokens / one.steps
    assert outcome.steps == 5
    assert lora_b(outcome.adapter_dir)


def rated(ex: DemoExample, label: bool) -> KtoExample:
    return KtoExample(prompt=ex.prompt, completion=completion_text(ex.reasoning, ex.answer), label=label)


def test_kto_on_ray(base_dir: Path, train_examples: list[DemoExample]) -> None:
    examples = train_examples[:48]
    rows = [rated(ex, True) for ex in examples] + [rated(mislabelled(ex), False) for ex in examples]
    job = TrainJob(
        base_dir=base_dir,
        train_path=write_rows(base_dir.parent / "kto.parquet", rows),
        out_dir=base_dir.parent / "kto",
        method="kto",
        sft=SftConfig(steps=8, batch_size=8, learning_rate=5e-3),
    )
    outcome = train_on_ray(job)
    assert outcome.method == "kto" and outcome.steps == 8
    assert outcome.first_loss == pytest.approx(0.5, abs=1e-3)  # the policy starts equal to its reference
    assert abs(outcome.last_loss - outcome.first_loss) > 1e-3  # (test_kto.py checks that it goes down)
    assert any(w.abs().sum() > 0 for w in lora_b(outcome.adapter_dir).values())


def test_wrong_columns_fail_before_training(base_dir: Path, train_path: Path) -> None:
    job = TrainJob(base_dir=base_dir, train_path=train_path, out_dir=base_dir.parent / "never", method="kto")
    with pytest.raises(ValueError, match=r"kto reads columns .* lacks \['completion', 'label'\]"):
        train_on_ray(job)
    assert not job.out_dir.exists()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_sft_on_ray_on_a_gpu(base_dir: Path, train_path: Path) -> None:
    job = TrainJob(
        base_dir=base_dir, train_path=train_path, out_dir=base_dir.parent / "gpu", sft=SftConfig(steps=5), use_gpu=True
    )
    outcome = train_on_ray(job)  # mixed precision: bf16 where the GPU has it, else fp16
    assert outcome.steps == 5 and math.isfinite(outcome.last_loss)
    assert lora_b(outcome.adapter_dir)


def test_early_stopping_needs_eval_data(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="early_stopping_patience needs eval_path"):
        TrainJob(base_dir=tmp_path, train_path=tmp_path, out_dir=tmp_path, early_stopping_patience=2)


def test_workers_the_cluster_can_never_hold_fail_at_once_saying_why(base_dir: Path, train_path: Path) -> None:
    from training.ray_train import ResourcesUnavailableError

    job = TrainJob(base_dir=base_dir, train_path=train_path, out_dir=base_dir.parent / "never",
                   sft=SftConfig(steps=STEPS), num_workers=2, cpus_per_worker=10_000, resource_wait_s=1)
    never = r"need 20000 CPU.*has only \d+ CPU in all.*retrain.num_workers"
    with pytest.raises(ResourcesUnavailableError, match=never):
        train_on_ray(job)
    assert not (base_dir.parent / "never").exists()
