"""One retrain, top to bottom: snapshot → dataset → train → evaluate → gate → register → promote.

Any failure marks the run failed and leaves the registry and serving as they were: nothing is
registered before the gate has decided, and only a passing candidate moves the champion alias.
"""

from __future__ import annotations

import asyncio
import logging
import shutil
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from feedback.dataset import CuratedDataset
from flywheel.bases import ServedBase, base_ref, context_length, served_base
from flywheel.config import Settings
from flywheel.registry import Registry, lora_int_id, registry_for, resolve_task
from flywheel.runs import RunRecord, RunState, RunStore
from services.engines import build_engine
from services.engines.hf_engine import HFEngine
from services.engines.protocol import AdapterHandle
from training.evaluate import EvalExample, SliceScores, evaluate, golden_examples, parity
from training.gate import decide, decide_confirmed
from training.kto import KtoExample
from training.metrics import min_pairs_for_alpha
from training.ray_train import TrainJob, connect_ray, train_on_ray
from training.retrain_data import (
    RetrainData,
    TrainExample,
    build_retrain_data,
    confirmed_batch,
    kto_training_rows,
    read_train_data,
    write_train_data,
)
from training.sft import LoraSpec, SftConfig

log = logging.getLogger("flywheel.retrain")

NEW_SLICE, GOLDEN_SLICE = "new_feedback", "golden"
CANDIDATE_LORA_ID = 1_000_000  # evaluation engines are private to a run: no clash with served ids


class Retrain:
    """A retrain run; `run()` never raises: the outcome is in the returned record."""

    def __init__(self, settings: Settings, record: RunRecord, say: Callable[[str], None] | None = None) -> None:
        self.settings = settings
        self.record = record
        self.store = RunStore(settings.home / "runs", keep=settings.retrain.keep_runs)
        self.task = resolve_task(settings, record.task)
        self.record.task = self.task.name
        self.registry: Registry = registry_for(settings, self.task.name)
        self.workdir = self.store.root / record.run_id
        self._say = say or (lambda _msg: None)

    def stage(self, name: str) -> None:
        self.record.stage = name
        self.store.save(self.record)
        log.info("event=retrain_stage run_id=%s stage=%s", self.record.run_id, name)
        self._say(f"[{self.record.run_id}] {name}")

    def finish(self, state: RunState, message: str) -> RunRecord:
        self.record.state, self.record.message = state, message
        self.record.finished_at = datetime.now(UTC)
        self.store.save(self.record)
        log.info("event=retrain_finished run_id=%s verdict=%s version=%s message=%r", self.record.run_id,
                 state, self.record.version, message)
        self._say(f"[{self.record.run_id}] {state}: {message}")
        return self.record

    def run(self) -> RunRecord:
        try:
            return self._run()
        except Exception as exc:  # a crash must leave registry and serving untouched, and say why
            log.exception("event=retrain_failed run_id=%s stage=%s", self.record.run_id, self.record.stage)
            return self.finish(RunState.FAILED, f"{type(exc).__name__} at {self.record.stage}: {exc}")
        finally:
            shutil.rmtree(self.workdir, ignore_errors=True)

    def _run(self) -> RunRecord:
        cfg = self.settings.retrain
        self.stage("snapshot")
        champion = self.registry.alias("champion")
        if champion is None:
            raise RuntimeError(f"task {self.task.name} has no champion adapter to start from: train one with "
                               f"`flywheel train --task {self.task.name} --data FILE` first")
        self.record.champion_before = champion
        dataset = CuratedDataset(self.settings.feedback_dir / "dataset")
        snapshot = dataset.manifest()
        rows = dataset.examples(snapshot, task=self.task.name, newest=cfg.max_feedback_rows)

        self.stage("dataset")
        champion_dir = self.registry.local_path(champion)
        champion_data = read_train_data(champion_dir)
        data = build_retrain_data(rows, champion_data, holdout_fraction=cfg.holdout_fraction,
                                  replay_fraction=cfg.replay_fraction, confirm_repeats=cfg.confirm_repeats)
        fresh = len(data.train) - data.replay
        kto_rows: list[KtoExample] = []
        if cfg.method == "kto":
            try:
                kto_rows = kto_training_rows(rows, data.holdout)
            except ValueError as exc:  # one kind of verdict only: nothing to contrast
                return self.finish(RunState.INSUFFICIENT_DATA, str(exc))
            fresh = len(kto_rows)
        # Small-data policy: a hold-out too small for significance cannot judge a few distinct prompts that
        # users corrected again and again with one answer; learn them, and gate on honouring them.
        needed = min_pairs_for_alpha(cfg.gate.significance_alpha, binary=self.task.binary_metric)
        policy = "held_out_significance"
        if data.confirmed and cfg.method == "sft" and (fresh < cfg.min_examples or len(data.holdout) < needed):
            policy = "confirmed_corrections"
            batch = confirmed_batch(data, champion_data, replay_per_row=cfg.small_data_replay_per_row)
            data = data.model_copy(update={"train": batch, "holdout": data.confirmed,
                                           "replay": sum(e.source == "replay" for e in batch)})
        self.record.dataset = {
            "feedback_rows": data.feedback_rows, "usable": data.usable, "duplicates_removed": data.duplicates,
            "train": len(data.train), "replay": data.replay, "holdout": len(data.holdout),
            "confirmed": len(data.confirmed), "policy": policy, "snapshot_positions": snapshot.positions,
            **({"kto_examples": len(kto_rows)} if cfg.method == "kto" else {}),
        }
        if policy == "held_out_significance" and fresh < cfg.min_examples:
            usable = ("rated answers, balanced up/down" if cfg.method == "kto"
                      else f"{data.usable} usable, i.e. corrections or answers rated >= 4")
            return self.finish(
                RunState.INSUFFICIENT_DATA,
                f"{fresh} feedback examples left for training after holding out {len(data.holdout)} for the gate; "
                f"at least {cfg.min_examples} are needed ({usable}; {data.feedback_rows} curated rows)",
            )

        # The gate judges on the weights that will serve (a quantized base, when configured): a
        # candidate that only works unquantized must not pass.
        base = served_base(self.settings, self.registry)
        self.stage("train")
        candidate_dir = self._train(data, champion_dir, kto_rows, base)

        self.stage("evaluate")
        slices = {
            NEW_SLICE: [EvalExample.of(e.prompt, e.answer, e.reasoning) for e in data.holdout],
            GOLDEN_SLICE: golden_examples(self.registry),
        }
        scores, agreement = asyncio.run(self._evaluate(champion, candidate_dir, slices, base))

        self.stage("gate")
        judge = decide_confirmed if policy == "confirmed_corrections" else decide
        report = judge(scores[champion], scores["candidate"], spec=self.task, new_slice=NEW_SLICE,
                       golden_slice=GOLDEN_SLICE, parity=agreement, policy=cfg.gate)
        summary = {
            version: {name: s.model_dump(exclude={"per_example"}) for name, s in by_slice.items()}
            for version, by_slice in (("champion", scores[champion]), ("candidate", scores["candidate"]))
        }
        self.record.report = {"passed": report.passed, "verdict": report.verdict, "metric": report.metric,
                              "policy": policy,
                              "checks": [c.model_dump() for c in report.checks], "scores": summary,
                              "parity": agreement, "message": report.message,
                              "engine": {"engine": self.settings.serving.engine, "base": base.label,
                                         "quantization": base.quantization or None}}
        if report.verdict == "insufficient_data":  # nothing is registered: the data could not have decided
            return self.finish(RunState.INSUFFICIENT_DATA, report.message)

        self.stage("register")
        manifest = self.registry.register(
            candidate_dir,
            base=base_ref(self.settings),
            parent=champion,
            status="ready" if report.passed else "rejected",
            lora=self._lora_spec().model_dump(),
            training={"method": cfg.method, "run_id": self.record.run_id, **self.record.metrics},
            data=self.record.dataset,
            metrics=summary,
            gate=self.record.report,
        )
        self.record.version = manifest.version
        if not report.passed:
            return self.finish(RunState.REJECTED, "; ".join(report.failures()))

        self.stage("promote")
        self.registry.promote(manifest.version, actor=f"retrain:{self.record.run_id}",
                              reason=f"gate passed ({self.record.trigger})")
        return self.finish(RunState.PASSED, f"{manifest.version} is champion; {report.message}")

    def _lora_spec(self) -> LoraSpec:
        cfg = self.settings.retrain
        return LoraSpec(r=cfg.lora_r, alpha=cfg.lora_alpha, dropout=cfg.lora_dropout,
                        target_modules=cfg.lora_target_modules)

    def _train(self, data: RetrainData, champion_dir: Path, kto_rows: list[KtoExample], base: ServedBase) -> Path:
        cfg = self.settings.retrain
        if cfg.train_on == "quantized" and not base.quantized:
            raise ValueError("retrain.train_on=quantized needs model.quantized_base (run `flywheel quantize`)")
        train_base = base.path if cfg.train_on == "quantized" else self.settings.base_model_path
        self.workdir.mkdir(parents=True, exist_ok=True)
        train_path = self.workdir / "train.parquet"
        if cfg.method == "kto":
            pq.write_table(pa.Table.from_pylist([k.model_dump() for k in kto_rows]), train_path)
        else:
            pq.write_table(pa.Table.from_pylist([e.model_dump(exclude={"at", "source"}) for e in data.train]),
                           train_path)
        eval_path: Path | None = None
        if cfg.method == "sft":  # KTO rows are rated completions: its eval loss has no SFT hold-out to use
            eval_path = self.workdir / "eval.parquet"
            pq.write_table(pa.Table.from_pylist([e.model_dump(exclude={"at", "source"}) for e in data.holdout]),
                           eval_path)
        out_dir = self.workdir / "candidate"
        # A run launched by serving joins its cluster (its address is in the run's settings): no second
        # Ray to start on a busy box, and the workers get the CPUs the cluster keeps for training.
        connect_ray(address=self.settings.ray.address)
        outcome = train_on_ray(
            TrainJob(
                base_dir=Path(train_base),
                train_path=train_path,
                eval_path=eval_path,
                out_dir=out_dir,
                method=cfg.method,
                sft=SftConfig(steps=cfg.steps, learning_rate=cfg.learning_rate, batch_size=cfg.batch_size,
                              grad_accum=cfg.grad_accum, lora=self._lora_spec(), max_seq_len=self.task.max_seq_len),
                init_adapter=champion_dir,
                num_workers=cfg.num_workers,
                use_gpu=cfg.use_gpu,
                gpus_per_worker=cfg.gpus_per_worker,
                cpus_per_worker=cfg.cpus_per_worker,
                torch_threads=cfg.torch_threads,
                early_stopping_patience=cfg.early_stopping_patience if eval_path else None,
                checkpoint_dir=self.workdir / "checkpoints",
            ),
            progress=self._say,
        )
        self.record.metrics = {**outcome.model_dump(mode="json", exclude={"adapter_dir"}), "trained_on": train_base}
        self.store.save(self.record)
        write_train_data(out_dir, [TrainExample.model_validate(e) for e in data.train])
        return out_dir

    async def _evaluate(
        self, champion: str, candidate_dir: Path, slices: dict[str, list[EvalExample]], base: ServedBase
    ) -> tuple[dict[str, dict[str, SliceScores]], float]:
        """Score both adapters on the serving engine and base; probe it against the PEFT reference."""
        champion_handle = AdapterHandle(name=champion, int_id=lora_int_id(champion),
                                        path=self.registry.local_path(champion))
        candidate = AdapterHandle(name=f"candidate-{self.record.run_id}", int_id=CANDIDATE_LORA_ID, path=candidate_dir)
        engine = build_engine(self.settings, base)
        await engine.start()
        try:
            for handle in (champion_handle, candidate):
                await engine.add_adapter(handle)
            scores = await evaluate(engine, {champion: champion_handle, "candidate": candidate}, slices, self.task)
            reference = HFEngine(base.path, max_model_len=context_length(self.settings))
            await reference.start()
            await reference.add_adapter(candidate)
            probe = slices[NEW_SLICE][: self.settings.retrain.gate.parity_prompts]
            agreement = await parity(engine, reference, candidate, probe, self.task)
            await reference.shutdown()
        finally:
            await engine.shutdown()
        return scores, agreement
