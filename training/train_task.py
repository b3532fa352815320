"""`flywheel train`: a task's adapter from the user's own data, in one recipe.

load → clean → split → train (Ray Train) → evaluate (serving engine: the untrained base vs the new
adapter on the held-out test split) → register `<task>-v<N>` with its report → champion if the task
has none and the adapter beats the bare base on the test split by the task's gate test (`--force`: even
if not; the report says so). The test split becomes the task's golden set unless the task (or `--eval-file`) names one.
Nothing is registered unless every stage succeeds; bad data is reported, never half-written.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
from pydantic import BaseModel, Field

from flywheel.bases import base_ref, budget_problem, served_base
from flywheel.config import GateSettings, Settings, TrainSettings
from flywheel.registry import AdapterManifest, ChampionChangedError, Registry, lora_int_id, registry_for
from flywheel.tasks import TaskSpec
from services.engines import build_engine
from services.engines.protocol import AdapterHandle
from training.evaluate import EvalExample, SliceScores, evaluate
from training.gate import GateCheck, first_champion
from training.metrics import ClassificationReport, confusion_png
from training.ray_train import TrainJob, connect_ray, train_on_ray
from training.retrain_data import TrainExample, write_train_data
from training.sft import LoraSpec, SftConfig, StopReason, chat_text, completion_text
from training.user_data import DataReport, Example, Splits, prepare_dataset

log = logging.getLogger("flywheel.train")

Say = Callable[[str], None]
REPORT_FILE = "train_report.json"


class TrainError(Exception):
    """`flywheel train` cannot go on; the message says why and what to do (nothing was registered)."""


class TrainRequest(BaseModel):
    """What the user asked `flywheel train` for."""

    task: str
    data: Path
    eval_file: Path | None = None
    val_size: float | None = None
    test_size: float | None = None
    strict: bool = False
    balance: bool = False
    columns: dict[str, str] = Field(default_factory=dict)
    force: bool = Field(False, description="Make the first adapter champion even if it does not beat the base.")


class TrainReport(BaseModel):
    """Everything `flywheel train` did, printed and stored beside the version."""

    task: str
    version: str | None = None
    champion: bool = False
    data: dict[str, Any]
    trainable_share: float | None = None
    training: dict[str, Any] = Field(default_factory=dict)
    evaluation: dict[str, dict[str, Any]] = Field(default_factory=dict, description="{base|candidate: scores}")
    golden: str = ""
    beats_base: dict[str, Any] | None = Field(
        None, description="A first adapter's test against the bare base on the test split (the gate's check).")
    forced: bool = Field(False, description="Made champion by --force although it did not beat the base.")
    learned: bool | None = Field(
        None, description="The adapter scores above the bare base on the test split; None: no test split.")
    advice: list[str] = Field(default_factory=list, description="What to change when the adapter learned nothing.")
    stage_seconds: dict[str, float] = Field(default_factory=dict)
    message: str = ""

    def lines(self) -> list[str]:
        out = [f"task {self.task}: {self.message}"]
        out += [f"  stage {k}: {v:.1f} s" for k, v in self.stage_seconds.items()]
        if self.training:
            out.append(training_line(self.training))
        for who, scores in self.evaluation.items():
            out.append(f"  test {who}: {scores['metric']} {scores['score']:.3f} on {scores['n']} examples"
                       + (f" ({scores['too_long']} too long for the context)" if scores.get("too_long") else "")
                       + f", format validity {scores['format_validity']:.2f}, truncated {scores['truncated']:.2f}")
        if self.beats_base:
            out.append(f"  against the base: {self.beats_base['outcome']}, {self.beats_base['detail']}")
        if self.learned is False:
            out.append("  not learned: the adapter scores no better than the bare base on the test split; try "
                       + "; or ".join(self.advice))
        if self.golden:
            out.append(f"  golden set: {self.golden}")
        return out


STOP_REASONS = {"plateau": "the validation loss stopped falling", "cap": "the step cap (train.max_steps)",
                "epochs": "every planned epoch", "time_budget": "the time budget (train.max_train_seconds)"}


def training_line(training: dict[str, Any]) -> str:
    """The run in one line: steps taken, why it stopped, and the loss curve's ends."""
    curve = training.get("loss_curve") or []
    line = (f"  training: {training['steps']} of {training['planned_steps']} planned steps, stopped by "
            f"{STOP_REASONS.get(training['stop_reason'], training['stop_reason'])}")
    if curve:
        line += f"; training loss {curve[0]['train_loss']:.3f} -> {curve[-1]['train_loss']:.3f}"
    evals = [p for p in curve if p.get("eval_loss") is not None]
    if evals:
        best = min(evals, key=lambda p: p["eval_loss"])
        line += (f", validation loss {evals[0]['eval_loss']:.3f} -> best {best['eval_loss']:.3f} "
                 f"at step {best['step']} (kept)")
    return line


def not_learned_advice(report: TrainReport, cfg: TrainSettings) -> list[str]:
    """What to change when an adapter scores no better than the bare base, from how its training went."""
    training, splits = report.training, report.data.get("splits") or {}
    advice = []
    if training.get("stop_reason") in ("cap", "time_budget", "epochs"):
        advice.append(f"more steps: training ended at step {training.get('steps')} by "
                      f"{STOP_REASONS[training['stop_reason']]} before the validation loss stopped falling")
    if splits.get("train", 0) < 200:
        advice.append(f"more data: {splits.get('train', 0)} training rows; several phrasings of each question help")
    lora = training.get("lora") or {}
    if lora.get("target_modules") != "all-linear" or lora.get("r", 0) < 32:
        advice.append(f"a larger adapter: LoRA r={lora.get('r')} on {lora.get('target_modules')}; try "
                      "train.lora_r 32 with train.lora_target_modules all-linear")
    return advice or [f"a higher learning rate than {cfg.learning_rate}, or a larger base model"]


def stop_reason(trainer_reason: StopReason, *, capped: bool) -> str:
    """Why training ended, as the report says it: `plateau`, `time_budget`, or every planned step taken, which
    the step cap (`cap`) or the epochs (`epochs`) set."""
    if trainer_reason == "steps":
        return "cap" if capped else "epochs"
    return trainer_reason


def first_adapter_verdict(scores: dict[str, SliceScores], spec: TaskSpec, policy: GateSettings, *,
                          force: bool) -> tuple[bool, GateCheck | None, str]:
    """(champion?, the check, why) for a task's first adapter, from its and the bare base's test-split scores:
    champion only when it beats the base by the task's gate test, or when forced."""
    check = first_champion(scores["base"], scores["candidate"], spec, policy) if scores else None
    if check is not None and check.passed:
        return True, check, f"it beats the bare base ({check.detail})"
    why = check.detail if check is not None else "there is no test split to score it on"
    if force:
        return True, check, f"forced with --force, although it does not beat the bare base: {why}"
    verdict = "does not beat" if check is not None and check.outcome == "failed" else "cannot show it beats"
    return False, check, f"it {verdict} the bare base: {why}"


def _counter(settings: Settings) -> Callable[[Example], int]:
    """Token length of a row as training sees it: chat-templated conversation + R1 completion + EOS."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(settings.base_model_path)

    def count(example: Example) -> int:
        text = chat_text(tokenizer, [t.model_dump() for t in example.messages])
        text += completion_text(example.reasoning, example.answer)
        return len(tokenizer(text, add_special_tokens=False)["input_ids"]) + 1

    return count


def _training_rows(spec: TaskSpec, examples: list[Example]) -> list[dict[str, str]]:
    return [{"prompt": e.prompt, "reasoning": e.reasoning, "answer": e.answer,
             "messages_json": json.dumps(spec.conversation([t.model_dump() for t in e.messages]),
                                         ensure_ascii=False)} for e in examples]


def _eval_examples(examples: list[Example]) -> list[EvalExample]:
    return [EvalExample(messages=[t.model_dump() for t in e.messages], answer=e.answer, reasoning=e.reasoning)
            for e in examples]


def _golden_jsonl(examples: list[Example]) -> str:
    return "".join(e.model_dump_json() + "\n" for e in examples)


class TaskTrainer:
    """One `flywheel train` run; `run()` returns the report or raises TrainError (nothing registered)."""

    def __init__(self, settings: Settings, spec: TaskSpec, request: TrainRequest, say: Say | None = None) -> None:
        self.settings = settings
        self.spec = spec
        self.request = request
        self.registry: Registry = registry_for(settings, spec.name)
        self.say = say or (lambda _msg: None)
        self.seconds: dict[str, float] = {}
        self.scores: dict[str, SliceScores] = {}

    def _timed(self, stage: str, started: float) -> None:
        self.seconds[stage] = round(time.perf_counter() - started, 2)
        log.info("event=train_stage task=%s stage=%s seconds=%.1f", self.spec.name, stage, self.seconds[stage])

    def prepare(self) -> tuple[Splits, DataReport]:
        """Load, validate, clean and split the user's file (raises DataError on unusable data)."""
        if problem := budget_problem(self.settings, self.spec):
            raise TrainError(problem)
        cfg = self.settings.training()
        started = time.perf_counter()
        eval_file = self.request.eval_file or (Path(self.spec.golden_path) if self.spec.golden_path else None)
        splits, report = prepare_dataset(
            self.request.data, self.spec, columns=self.request.columns or None, strict=self.request.strict,
            count_tokens=_counter(self.settings), near_dup_threshold=cfg.near_duplicate_threshold,
            val_size=self.request.val_size if self.request.val_size is not None else cfg.val_size,
            test_size=self.request.test_size if self.request.test_size is not None else cfg.test_size,
            seed=cfg.seed, balance=self.request.balance, eval_file=eval_file,
        )
        self._timed("load_clean_split", started)
        return splits, report

    def run(self, splits: Splits, data_report: DataReport) -> TrainReport:
        if not splits.train:
            raise TrainError("no rows left for training after the split; add data or lower --val-size/--test-size")
        report = TrainReport(task=self.spec.name, data=data_report.model_dump(mode="json"))
        with tempfile.TemporaryDirectory(prefix=f"flywheel-train-{self.spec.name}-") as scratch:
            workdir = Path(scratch)
            candidate_dir = self._train(splits, workdir, report)
            self._evaluate(splits, candidate_dir, workdir, report)
            self._register(splits, candidate_dir, report)
        report.stage_seconds = self.seconds
        return report

    def _train(self, splits: Splits, workdir: Path, report: TrainReport) -> Path:
        cfg = self.settings.training()
        started = time.perf_counter()
        train_path = workdir / "train.parquet"
        pq.write_table(pa.Table.from_pylist(_training_rows(self.spec, splits.train)), train_path)
        eval_path = None
        if splits.val:
            eval_path = workdir / "val.parquet"
            pq.write_table(pa.Table.from_pylist(_training_rows(self.spec, splits.val)), eval_path)
        steps_per_epoch = math.ceil(len(splits.train) / cfg.batch_size)
        epochs = cfg.epochs_for(len(splits.train))
        by_epochs = max(1, round(steps_per_epoch * epochs))
        steps = min(by_epochs, cfg.max_steps or by_epochs)
        lora = LoraSpec(r=cfg.lora_r or 16, alpha=cfg.lora_alpha or 32,
                        target_modules=cfg.lora_target_modules or ["q_proj", "v_proj"])
        out_dir = workdir / "adapter"
        self.say(f"training {self.spec.name} on {len(splits.train)} rows ({len(splits.val)} for validation): "
                 f"up to {steps} steps ({epochs:g} epochs{', capped' if steps < by_epochs else ''}), "
                 f"LoRA r={lora.r} on {lora.target_modules}, lr {cfg.learning_rate}")
        patience = cfg.early_stopping_patience if eval_path is not None else None
        connect_ray(address=self.settings.ray.address)
        outcome = train_on_ray(
            TrainJob(
                base_dir=Path(self.settings.base_model_path),
                train_path=train_path,
                eval_path=eval_path,
                out_dir=out_dir,
                sft=SftConfig(steps=steps, learning_rate=cfg.learning_rate or 2e-4, batch_size=cfg.batch_size,
                              lora=lora, seed=cfg.seed, max_seq_len=self.spec.max_seq_len,
                              max_seconds=cfg.max_train_seconds),
                num_workers=self.settings.retrain.num_workers,
                use_gpu=self.settings.retrain.use_gpu,
                gpus_per_worker=self.settings.retrain.gpus_per_worker,
                cpus_per_worker=self.settings.retrain.cpus_per_worker,
                torch_threads=self.settings.retrain.torch_threads,
                resource_wait_s=self.settings.retrain.resource_wait_s,
                eval_steps=max(5, min(steps_per_epoch, 50)),
                early_stopping_patience=patience,
                tensorboard_dir=out_dir.parent / "tensorboard",
            ),
            progress=self.say,
        )
        report.training = outcome.model_dump(mode="json", exclude={"adapter_dir"}) | {
            "lora": lora.model_dump(), "planned_steps": steps, "epochs": epochs,
            "stop_reason": stop_reason(outcome.stop_reason, capped=steps < by_epochs)}
        report.trainable_share = outcome.trainable_share
        # TensorBoard reads the loss curves from the version's directory (`tensorboard --logdir <registry>`)
        for event_file in (out_dir.parent / "tensorboard").rglob("events.out.tfevents*"):
            event_file.rename(out_dir / event_file.name)
        write_train_data(out_dir, [TrainExample(prompt=e.prompt, reasoning=e.reasoning, answer=e.answer,
                                                source="dataset") for e in splits.train])
        self._timed("train", started)
        return out_dir

    def _evaluate(self, splits: Splits, candidate_dir: Path, workdir: Path, report: TrainReport) -> None:
        started = time.perf_counter()
        test = _eval_examples(splits.test)
        if not test:
            self.say("no test rows: the adapter is registered without a held-out score")
            self._timed("evaluate", started)
            return
        self.say(f"evaluating the base and the new adapter on {len(test)} test rows with the serving engine "
                 f"({self.settings.serving.engine})")
        scores = self.scores = asyncio.run(self._score(candidate_dir, test))
        report.evaluation = {who: s.model_dump(exclude={"per_example"}) for who, s in scores.items()}
        candidate = scores["candidate"]
        if candidate.classification:
            png = confusion_png(ClassificationReport.model_validate(candidate.classification),
                                candidate_dir / "confusion.png", title=f"{self.spec.name}: test split")
            report.evaluation["candidate"]["confusion_png"] = png.name
        self._timed("evaluate", started)

    async def _score(self, candidate_dir: Path, test: list[EvalExample]) -> dict[str, SliceScores]:
        base = served_base(self.settings, self.registry)
        engine = build_engine(self.settings, base)
        name = f"train-{self.spec.name}-{time.time_ns()}"
        handle = AdapterHandle(name=name, int_id=lora_int_id(name), path=candidate_dir)
        await engine.start()
        try:
            await engine.add_adapter(handle)
            scores = await evaluate(engine, {"base": None, "candidate": handle}, {"test": test}, self.spec)
        finally:
            await engine.shutdown()
        return {who: by_slice["test"] for who, by_slice in scores.items()}

    def _register(self, splits: Splits, candidate_dir: Path, report: TrainReport) -> AdapterManifest:
        started = time.perf_counter()
        self.registry.save_task_spec(self.spec)
        if self.registry.golden_text() is None and splits.test:
            self.registry.save_golden(_golden_jsonl(splits.test))
            report.golden = f"the {len(splits.test)} test rows"
        elif splits.test:
            report.golden = "kept the task's existing golden set"
        champion = self.registry.alias("champion")
        serve, why = False, ""
        if champion is None:
            serve, check, why = first_adapter_verdict(self.scores, self.spec, self.settings.retrain.gate,
                                                      force=self.request.force)
            report.beats_base = check.model_dump() if check is not None else None
            report.forced = serve and (check is None or not check.passed)
        (candidate_dir / REPORT_FILE).write_text(report.model_dump_json(indent=2))
        manifest = self.registry.register(
            candidate_dir,
            base=base_ref(self.settings),
            parent=champion,
            lora=report.training.get("lora", {}),
            training={"method": "sft", "source": "flywheel train", "file": self.request.data.name,
                      **{k: v for k, v in report.training.items() if k != "lora"}},
            data={k: report.data.get(k) for k in ("rows_read", "rows_kept", "splits", "label_distribution")},
            metrics={who: {"metric": s["metric"], "score": s["score"], **s["metrics"]}
                     for who, s in report.evaluation.items()},
        )
        report.version = manifest.version
        if champion is None:
            if serve:
                try:  # only over no champion: one promoted while this trained stays
                    self.registry.promote(manifest.version, actor="flywheel train", expected_champion=None,
                                          reason=f"first adapter of the task; {why}")
                except ChampionChangedError as exc:
                    report.message = f"{manifest.version} registered as ready but not champion: {exc}"
                else:
                    report.champion = True
                    report.message = f"{manifest.version} registered and made champion (the task had none): {why}"
            else:
                report.message = (f"{manifest.version} registered as ready but not champion: {why}; the task "
                                  f"serves nothing yet (`flywheel promote {manifest.version}`, or train again with "
                                  f"--force, to serve it anyway)")
        else:
            report.message = (f"{manifest.version} registered as ready; champion stays {champion} "
                              f"(`flywheel promote {manifest.version}` to switch)")
        scores = report.evaluation
        if scores:
            report.message += (f"; test {scores['candidate']['metric']}: base {scores['base']['score']:.3f} -> "
                               f"adapter {scores['candidate']['score']:.3f}")
            report.learned = scores["candidate"]["score"] > scores["base"]["score"]
            if not report.learned:
                report.advice = not_learned_advice(report, self.settings.training())
                report.message += "; NOT LEARNED (see the advice)"
        self._timed("register", started)
        return manifest

