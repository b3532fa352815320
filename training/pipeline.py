"""One retrain, top to bottom: snapshot → dataset → train → register → evaluate → gate → promote.

The candidate is registered `evaluating` before it is judged, so the serving replicas can load it by name
and the gate scores it on the engine that would serve it; it stays private to the gate until the verdict
makes it `ready` or `rejected`. Any failure marks the run failed and rejects its candidate; only a
passing candidate moves an alias: the champion, or for a `rollout: canary` task the canary at its first
share of users (`flywheel.canary` takes it from there).
"""

from __future__ import annotations

import asyncio
import logging
import shutil
from collections import Counter
from collections.abc import Callable
from datetime import UTC, datetime
from functools import partial
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from feedback.dataset import curated_dataset
from feedback.trust import assess, pending_review, trainable
from flywheel.bases import ServedBase, base_ref, context_length, served_base
from flywheel.config import Settings
from flywheel.registry import (
    CANARY_ALIAS,
    ChampionChangedError,
    FencedError,
    Registry,
    lora_int_id,
    registry_for,
    resolve_task,
)
from flywheel.runs import RunRecord, RunState, RunStore
from services.engines import build_engine
from services.engines.hf_engine import HFEngine
from services.engines.protocol import AdapterHandle, Engine
from services.engines.served import ServedEngine
from training.evaluate import EvalExample, SliceScores, evaluate, golden_examples, parity
from training.gate import decide, decide_confirmed, min_holdout, small_data_problem
from training.kto import KtoExample
from training.ray_train import TrainJob, connect_ray, train_on_ray
from training.retrain_data import (
    RetrainData,
    TrainExample,
    build_retrain_data,
    confirmed_batch,
    kto_training_rows,
    read_train_data,
    well_rated,
    write_train_data,
)
from training.sft import LoraSpec, SftConfig

log = logging.getLogger("flywheel.retrain")

NEW_SLICE, GOLDEN_SLICE, RATED_SLICE = "new_feedback", "golden", "well_rated"
PRIVATE_CONCURRENCY = 16  # a private engine serves nobody else: keep vLLM's continuous batching busy


class Retrain:
    """A retrain run; `run()` never raises: the outcome is in the returned record."""

    def __init__(self, settings: Settings, record: RunRecord, say: Callable[[str], None] | None = None) -> None:
        self.settings = settings
        self.record = record
        self.store = RunStore.for_settings(settings)
        self.task = resolve_task(settings, record.task)
        self.record.task = self.task.name
        task_registry = registry_for(settings, self.task.name)
        # a run the loop's leader started moves aliases under its lease: refused once another leader took over
        self.registry: Registry = task_registry if record.fence is None else task_registry.fenced(record.fence)
        if record.lock is not None:  # and under the retrain lock: refused once another run took the lock over
            lock = record.lock
            self.registry = self.registry.guarded(lambda: self.store.lock_lost(record.run_id, lock))
        self.workdir = self.store.local_dir / record.run_id
        self._say = say or (lambda _msg: None)

    def stage(self, name: str) -> None:
        self.record.stage = name
        self.record.stages[name] = datetime.now(UTC)
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
        except Exception as exc:  # a crash must leave the champion and serving untouched, and say why
            log.exception("event=retrain_failed run_id=%s stage=%s", self.record.run_id, self.record.stage)
            message = f"{type(exc).__name__} at {self.record.stage}: {exc}"
            self._withdraw_candidate(message)
            return self.finish(RunState.FAILED, message)
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
        dataset = curated_dataset(self.settings)
        snapshot = dataset.manifest()
        rows = dataset.examples(snapshot, task=self.task.name, newest=cfg.max_feedback_rows)

        self.stage("dataset")
        champion_dir = self.registry.local_path(champion)
        champion_data = read_train_data(champion_dir)
        decisions = dataset.reviews.decisions()
        retracted = {e for e, j in decisions.items() if j.action == "retract"}
        assessed = assess(rows, decisions, confirm_raters=cfg.confirm_raters, majority=cfg.majority,
                          task_answers=[e.answer for e in champion_data],
                          labelled=self.task.kind == "classification")
        learnable = [i for i in assessed
                     if trainable(i, min_trust=cfg.min_trust, min_rating_trust=cfg.min_rating_trust)]
        golden = golden_examples(self.registry)  # its prompts are never trained on: it stays a fair judge
        golden_prompts = [e.prompt for e in golden]
        data = build_retrain_data(learnable, champion_data, holdout_fraction=cfg.holdout_fraction,
                                  replay_fraction=cfg.replay_fraction, max_share_per_rater=cfg.max_share_per_rater,
                                  retracted=retracted, golden_prompts=golden_prompts, task=self.task)
        fresh = len(data.train) - data.replay
        kto_rows: list[KtoExample] = []
        if cfg.method == "kto":
            try:
                kto_rows = kto_training_rows([i.row for i in learnable], data.holdout, golden_prompts)
            except ValueError as exc:  # one kind of verdict only: nothing to contrast
                return self.finish(RunState.INSUFFICIENT_DATA, str(exc))
            fresh = len(kto_rows)
        # Small-data policy: a hold-out too small for significance cannot judge a few distinct prompts that
        # users corrected again and again with one answer; learn them, and gate on honouring them.
        needed = min_holdout(self.task, cfg.gate.significance_alpha)
        policy = "held_out_significance"
        if data.confirmed and cfg.method == "sft" and (fresh < cfg.min_examples or len(data.holdout) < needed):
            policy = "confirmed_corrections"
            batch = confirmed_batch(data, champion_data, replay_per_row=cfg.small_data_replay_per_row,
                                    generation=self.task.kind == "generation", retracted=retracted)
            data = data.model_copy(update={"train": batch, "holdout": data.confirmed,
                                           "replay": sum(e.source == "replay" for e in batch)})
        self.record.dataset = {
            "feedback_rows": len(rows), "trainable_rows": data.feedback_rows,
            "pending_review": len(pending_review(assessed, min_trust=cfg.min_trust)),
            "by_trust": dict(Counter(i.trust for i in learnable)), "capped_per_rater": data.capped,
            "usable": data.usable, "duplicates_removed": data.duplicates, "golden_held_out": data.golden_held_out,
            "train": len(data.train), "replay": data.replay, "holdout": len(data.holdout),
            "confirmed": len(data.confirmed), "policy": policy, "snapshot_positions": snapshot.positions,
            "unknown_label": data.unknown_label,
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

        rated = well_rated(learnable, champion, limit=cfg.max_well_rated) if policy == "confirmed_corrections" else []
        if policy == "confirmed_corrections" and (problem := small_data_problem(
                self.task, confirmed=len(data.confirmed), golden=len(golden), well_rated=len(rated),
                min_prompts=cfg.min_confirmed_prompts)):
            return self.finish(RunState.INSUFFICIENT_DATA, problem)

        # The gate judges on the weights that will serve (a quantized base, when configured): a
        # candidate that only works unquantized must not pass.
        base = served_base(self.settings, self.registry)
        self.stage("train")
        candidate_dir = self._train(data, champion_dir, kto_rows, base, policy)

        # Registered first, as `evaluating`: the serving replicas load it by name to score it, privately.
        self.stage("register")
        manifest = self.registry.register(
            candidate_dir,
            base=base_ref(self.settings),
            parent=champion,
            status="evaluating",
            lora=self._lora_spec().model_dump(),
            training={"method": cfg.method, "run_id": self.record.run_id, **self.record.metrics},
            data=self.record.dataset,
        )
        self.record.version = manifest.version

        self.stage("evaluate")
        slices = {
            NEW_SLICE: [EvalExample.of(e.prompt, e.answer, e.reasoning) for e in data.holdout],
            GOLDEN_SLICE: golden,
        }
        if policy == "confirmed_corrections":  # the champion's answers users liked: the candidate must keep them
            slices[RATED_SLICE] = [EvalExample.of(e.prompt, e.answer, e.reasoning) for e in rated]
        scores, agreement, engine = asyncio.run(self._evaluate(champion, manifest.version, slices, base))

        self.stage("gate")
        judge = (partial(decide_confirmed, rated_slice=RATED_SLICE, min_prompts=cfg.min_confirmed_prompts)
                 if policy == "confirmed_corrections" else decide)
        report = judge(scores[champion], scores[manifest.version], spec=self.task, new_slice=NEW_SLICE,
                       golden_slice=GOLDEN_SLICE, parity=agreement, policy=cfg.gate)
        summary = {
            arm: {name: s.model_dump(exclude={"per_example"}) for name, s in scores[version].items()}
            for arm, version in (("champion", champion), ("candidate", manifest.version))
        }
        self.record.report = {"passed": report.passed, "verdict": report.verdict, "metric": report.metric,
                              "policy": policy,
                              "checks": [c.model_dump() for c in report.checks], "scores": summary,
                              "parity": agreement, "message": report.message,
                              "engine": {**engine, "base": base.label, "quantization": base.quantization or None}}
        self.registry.conclude(manifest.version, "ready" if report.passed else "rejected", metrics=summary,
                               gate=self.record.report)
        if report.verdict == "insufficient_data":  # the data could not have decided: no judgement on the weights
            return self.finish(RunState.INSUFFICIENT_DATA, report.message)
        if not report.passed:
            return self.finish(RunState.REJECTED, "; ".join(report.failures()))
        return self._release(manifest.version, champion, report.message)

    def _release(self, candidate: str, champion: str, gate_message: str) -> RunRecord:
        """Move the alias a passing candidate earned, on the condition that `champion`, the one it was gated
        against, is still the champion; if another version was promoted meanwhile the run ends `superseded`
        and leaves that promotion alone (the candidate stays `ready`: an operator may still promote it)."""
        actor = f"retrain:{self.record.run_id}"
        try:
            if self.task.rollout == "canary":  # live ratings decide the rest (flywheel.canary)
                self.stage("canary")
                share = self.settings.canary.steps[0]
                self.registry.promote(candidate, alias=CANARY_ALIAS, traffic_fraction=share, actor=actor,
                                      reason=f"gate passed ({self.record.trigger}); canary at {share:.0%}",
                                      expected_champion=champion)
                return self.finish(RunState.PASSED, f"{candidate} is canary for {share:.0%} of users; {gate_message}")
            self.stage("promote")
            self.registry.promote(candidate, actor=actor, reason=f"gate passed ({self.record.trigger})",
                                  expected_champion=champion)
        except FencedError as exc:
            return self.finish(RunState.SUPERSEDED, f"superseded: {candidate} passed its gate, but {exc}; whoever "
                               "leads the loop or holds the retrain lock now decides what runs next")
        except ChampionChangedError as exc:
            message = (f"superseded: {candidate} passed its gate against {champion}, but the champion changed while "
                       f"the run went on ({exc}); retrain to judge a candidate against {exc.actual or 'no champion'}")
            self.record.report = {**(self.record.report or {}),
                                  "superseded": {"gated_against": champion, "champion_now": exc.actual}}
            return self.finish(RunState.SUPERSEDED, message)
        return self.finish(RunState.PASSED, f"{candidate} is champion; {gate_message}")

    def _withdraw_candidate(self, why: str) -> None:
        """A candidate the gate never concluded on is rejected (a version never stays `evaluating` by mistake)."""
        if self.record.version is None:
            return
        try:
            if self.registry.manifest(self.record.version).status == "evaluating":
                self.registry.conclude(self.record.version, "rejected",
                                       gate={"passed": False, "verdict": "failed", "message": why})
        except Exception:  # the registry itself may be what failed: the run's record still says why
            log.exception("event=candidate_withdraw_failed run_id=%s version=%s", self.record.run_id,
                          self.record.version)

    def _lora_spec(self) -> LoraSpec:
        cfg = self.settings.retrain
        return LoraSpec(r=cfg.lora_r, alpha=cfg.lora_alpha, dropout=cfg.lora_dropout,
                        target_modules=cfg.lora_target_modules)

    def _train(self, data: RetrainData, champion_dir: Path, kto_rows: list[KtoExample], base: ServedBase,
               policy: str) -> Path:
        """Train the candidate from the champion. Under the small-data policy the hold-out is the confirmed
        corrections: training goes on (up to its cap) until they are learned or their loss stops falling."""
        cfg = self.settings.retrain
        corrections = policy == "confirmed_corrections"
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
                sft=SftConfig(steps=cfg.corrections_max_steps if corrections else cfg.steps,
                              learning_rate=cfg.learning_rate, batch_size=cfg.batch_size, grad_accum=cfg.grad_accum,
                              lora=self._lora_spec(), max_seq_len=self.task.max_seq_len),
                init_adapter=champion_dir,
                num_workers=cfg.num_workers,
                use_gpu=cfg.use_gpu,
                gpus_per_worker=cfg.gpus_per_worker,
                cpus_per_worker=cfg.cpus_per_worker,
                torch_threads=cfg.torch_threads,
                resource_wait_s=cfg.resource_wait_s,
                early_stopping_patience=(cfg.corrections_patience if corrections
                                         else cfg.early_stopping_patience if eval_path else None),
                stop_when_reproduced=corrections,
                checkpoint_dir=self.workdir / "checkpoints",
            ),
            progress=self._say,
        )
        self.record.metrics = {**outcome.model_dump(mode="json", exclude={"adapter_dir"}), "trained_on": train_base}
        self.store.save(self.record)
        write_train_data(out_dir, [TrainExample.model_validate(e) for e in data.train])
        return out_dir

    async def _evaluate(
        self, champion: str, candidate: str, slices: dict[str, list[EvalExample]], base: ServedBase
    ) -> tuple[dict[str, dict[str, SliceScores]], float, dict[str, Any]]:
        """Score both versions on the serving replicas (a private engine when no platform serves here); probe
        the candidate against the PEFT reference. Returns the scores, the parity and which engine judged."""
        handles = {v: AdapterHandle(name=v, int_id=lora_int_id(v), path=self.registry.local_path(v))
                   for v in (champion, candidate)}
        engine, concurrency, identity = self._judging_engine(base)
        log.info("event=gate_engine run_id=%s engine=%s", self.record.run_id, identity)
        await engine.start()
        try:
            for handle in handles.values():
                await engine.add_adapter(handle)
            scores = await evaluate(engine, handles, slices, self.task, concurrency=concurrency)
            reference = HFEngine(base.path, max_model_len=context_length(self.settings))
            await reference.start()
            await reference.add_adapter(handles[candidate])
            agreement = await parity(engine, reference, handles[candidate], slices[NEW_SLICE], self.task,
                                     limit=self.settings.retrain.gate.parity_prompts)
            await reference.shutdown()
        finally:
            await engine.shutdown()
        if isinstance(engine, ServedEngine):
            identity = engine.identity()
        return scores, agreement, identity

    def _judging_engine(self, base: ServedBase) -> tuple[Engine, int, dict[str, Any]]:
        """(engine, requests in flight, its identity): the serving replicas of this cluster's app, or else a
        private engine of the serving kind on the served base (a retrain with no platform running)."""
        app = self.settings.serving.app_name
        served = ServedEngine.connect(app, task=self.task.name, base_model=base.label)
        if served is not None:
            return served, self.settings.retrain.gate.serving_concurrency, served.identity()
        log.warning("event=gate_private_engine run_id=%s why=%r", self.record.run_id,
                    f"no Serve app {app!r} runs on this Ray cluster")
        return build_engine(self.settings, base), PRIVATE_CONCURRENCY, {"engine": self.settings.serving.engine,
                                                                        "private": True}
