"""Tasks as first-class citizens: declared, validated, stored per task in the registry, judged by their metric."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path

import pytest
from pydantic import ValidationError

from feedback.dataset import CuratedDataset
from feedback.schemas import CuratedExample
from flywheel.config import Settings
from flywheel.r1 import split_completion
from flywheel.registry import (
    BaseModelRef,
    Registry,
    RegistryError,
    UnknownTaskError,
    VersionNotFoundError,
    known_tasks,
    lora_int_id,
    registry_for,
    resolve_task,
)
from flywheel.tasks import DEMO_TASK, TaskSpec
from training.evaluate import SliceScores
from training.gate import decide
from training.metrics import token_f1

BASE = BaseModelRef(id="tiny", sha256="0" * 64)


def adapter_dir(tmp_path: Path, name: str) -> Path:
    path = tmp_path / name
    path.mkdir()
    (path / "adapter_config.json").write_text("{}")
    (path / "adapter_model.safetensors").write_bytes(name.encode())
    return path


@pytest.mark.parametrize("name", ["../etc", "/abs", "UPPER", "a b", "-lead", "%2e%2e", "x" * 65, "", "demo\n"])
def test_task_names_that_would_escape_or_mislead_are_refused(name: str, tmp_path: Path) -> None:
    with pytest.raises(ValidationError):
        TaskSpec(name=name)
    with pytest.raises(RegistryError, match="invalid task name"):
        Registry(str(tmp_path), name)


def test_a_task_declares_a_consistent_kind_labels_and_metric() -> None:
    with pytest.raises(ValidationError, match="at least two distinct labels"):
        TaskSpec(name="s", kind="classification", labels=["yes"])
    with pytest.raises(ValidationError, match="not a classification metric"):
        TaskSpec(name="s", kind="classification", labels=["a", "b"], metric="chrf")
    with pytest.raises(ValidationError, match="not a generation metric"):
        TaskSpec(name="faq", metric="macro_f1")
    assert TaskSpec(name="faq").gate_metric == "token_f1"
    assert TaskSpec(name="s", kind="classification", labels=["a", "b"]).binary_metric
    spec = TaskSpec(name="faq", instruction="Answer as our support desk.")
    assert spec.conversation([{"role": "user", "content": "hi"}])[0] == {
        "role": "system", "content": "Answer as our support desk."}
    own = [{"role": "system", "content": "mine"}, {"role": "user", "content": "hi"}]
    assert spec.conversation(own) == own  # the caller's own system prompt wins


def test_default_task_is_the_first_declared_and_config_replaces_the_demo(tmp_path: Path) -> None:
    assert Settings(home=tmp_path).default_task == DEMO_TASK.name
    settings = Settings(home=tmp_path, tasks=[{"name": "faq"}, {"name": "triage", "kind": "classification",
                                                                  "labels": ["urgent", "routine"]}])
    assert settings.default_task == "faq"
    assert set(known_tasks(settings)) == {"faq", "triage"}
    with pytest.raises(UnknownTaskError, match="known tasks: faq, triage"):
        resolve_task(settings, "demo")
    with pytest.raises(ValidationError, match="each name once"):
        Settings(home=tmp_path, tasks=[{"name": "faq"}, {"name": "faq"}])


def test_tasks_have_their_own_versions_aliases_history_and_golden_set(tmp_path: Path) -> None:
    settings = Settings(home=tmp_path, tasks=[{"name": "faq"}])
    faq, demo = registry_for(settings, "faq"), registry_for(settings, "demo")
    v_faq = faq.register(adapter_dir(tmp_path, "a"), base=BASE).version
    v_demo = demo.register(adapter_dir(tmp_path, "b"), base=BASE).version
    assert (v_faq, v_demo) == ("faq-v1", "demo-v1")
    faq.promote(v_faq, actor="t")
    assert faq.alias("champion") == "faq-v1" and demo.alias("champion") is None
    assert [e.version for e in faq.history()] == ["faq-v1"] and demo.history() == []
    assert lora_int_id("faq-v1") != lora_int_id("demo-v1")  # one engine holds both: ids must differ
    with pytest.raises(VersionNotFoundError):
        faq.promote("demo-v1", actor="t")  # another task's version is not this task's
    with pytest.raises(VersionNotFoundError):
        faq.manifest("../../etc/passwd")

    faq.save_task_spec(TaskSpec(name="faq", metric="rouge_l"))
    faq.save_golden('{"messages": [], "answer": "x"}\n')
    # a task stored in the registry (by `flywheel train`) is known even when config does not declare it
    stored_only = Settings(home=tmp_path, tasks=[DEMO_TASK])
    assert known_tasks(stored_only)["faq"].metric == "rouge_l"
    assert registry_for(stored_only, "faq").golden_text() == '{"messages": [], "answer": "x"}\n'


def _row(task: str, i: int) -> CuratedExample:
    now = datetime.now(UTC)
    return CuratedExample(
        event_id=f"e{task}{i}", request_id=f"{i:032x}", task=task, feedback_ts=now, prediction_ts=now,
        adapter_version=f"{task}-v1", prompt_kind="text", prompt=f"q{i}", answer="a", reasoning="", rating=5,
        thumb=None, correction=None, comment=None, user_id=None, tenant_id=None, feedback_source="f",
        feedback_offset=i, prediction_source="p", prediction_offset=i)


def test_curated_rows_are_read_per_task(tmp_path: Path) -> None:
    from feedback.dataset import Manifest, PartFile

    dataset = CuratedDataset(tmp_path)
    rows = [_row("faq", i) for i in range(3)] + [_row("demo", i) for i in range(5)]
    dataset.write_part("day=1/part-1.parquet", rows)
    part = PartFile(path="day=1/part-1.parquet", day="1", batch=1, rows=8, offsets={}, positions={},
                    created_at=datetime.now(UTC))
    manifest = Manifest(updated_at=datetime.now(UTC), files=[part])
    assert {r.request_id for r in dataset.examples(manifest, task="faq")} == {f"{i:032x}" for i in range(3)}
    assert dataset.rows_by_task(manifest) == {"faq": 3, "demo": 5}


@pytest.mark.parametrize(("text", "opened", "expected"), [
    ("thinking…\n</think>\n\nPositive.", True, ("thinking…", "Positive.", False)),
    ("still thinking and the budget ran o", True, ("still thinking and the budget ran o", "", True)),
    ("<think>model opened it itself", False, ("model opened it itself", "", True)),
    ("a model that does not think", False, ("", "a model that does not think", False)),
])
def test_a_completion_cut_off_while_thinking_has_no_answer(text: str, opened: bool, expected: tuple) -> None:
    assert tuple(split_completion(text, opened_think=opened)) == expected


def _scores(per_example: list[float], metric: str = "token_f1") -> SliceScores:
    n = len(per_example)
    return SliceScores(n=n, metric=metric, score=sum(per_example) / n if n else 0.0, per_example=per_example,
                       format_validity=1.0, mean_latency_ms=10.0)


def test_generation_gate_uses_the_tasks_metric_with_a_paired_permutation_test() -> None:
    spec = TaskSpec(name="faq-zh", metric="token_f1")
    reference = "请在设置中选择重置密码"
    champion_answers = ["我不知道"] * 20
    candidate_answers = ["请在设置中选择重置密码"] * 15 + ["请在设置里重置"] * 5
    champion = [token_f1(a, reference) for a in champion_answers]
    candidate = [token_f1(a, reference) for a in candidate_answers]
    assert all(v > 0 for v in candidate)  # characters, not an ASCII tokenizer: Chinese is scored
    report = decide({"new": _scores(champion), "golden": _scores([0.5] * 80)},
                    {"new": _scores(candidate), "golden": _scores([0.5] * 80)},
                    spec=spec, new_slice="new", golden_slice="golden", parity=1.0,
                    policy=Settings().retrain.gate)
    assert report.verdict == "passed", report
    significance = next(c for c in report.checks if c.name == "significance")
    assert "paired permutation" in significance.detail and significance.value < 0.05

    worse = decide({"new": _scores(candidate), "golden": _scores([0.5] * 80)},
                   {"new": _scores(champion), "golden": _scores([0.5] * 80)},
                   spec=spec, new_slice="new", golden_slice="golden", parity=1.0, policy=Settings().retrain.gate)
    assert worse.verdict == "rejected"


def test_a_hold_out_too_small_to_ever_be_significant_is_insufficient_data_not_a_rejection() -> None:
    spec = TaskSpec(name="s", kind="classification", labels=["a", "b"])
    golden = _scores([1.0, 0.0] * 40, "accuracy")  # enough for the golden non-inferiority check
    tiny = decide({"new": _scores([0.0] * 4, "accuracy"), "golden": golden},
                  {"new": _scores([1.0] * 4, "accuracy"), "golden": golden},
                  spec=spec, new_slice="new", golden_slice="golden", parity=None, policy=Settings().retrain.gate)
    assert tiny.verdict == "insufficient_data" and "needs at least 5" in tiny.message
    enough = decide({"new": _scores([0.0] * 8, "accuracy"), "golden": golden},
                    {"new": _scores([1.0] * 8, "accuracy"), "golden": golden},
                    spec=spec, new_slice="new", golden_slice="golden", parity=None, policy=Settings().retrain.gate)
    assert enough.verdict == "passed", enough


async def test_evaluation_never_scores_a_completion_cut_off_while_thinking(demo_home: Path) -> None:
    """The demo base's template opens <think> like R1's: a budget that ends inside it yields no answer."""
    from services.engines.hf_engine import HFEngine
    from services.engines.protocol import AdapterHandle
    from tests.conftest import make_settings
    from training.demo_task import generate_examples
    from training.evaluate import EvalExample, score_slice

    settings = make_settings(demo_home)
    registry = registry_for(settings, "demo")
    engine = HFEngine(settings.base_model_path)
    await engine.start()
    adapter = AdapterHandle(name="demo-v1", int_id=lora_int_id("demo-v1"), path=registry.local_path("demo-v1"))
    await engine.add_adapter(adapter)
    examples = [EvalExample.of(e.prompt, e.answer, e.reasoning) for e in generate_examples(6, seed=5)]
    cut = await score_slice(engine, adapter, examples, DEMO_TASK.model_copy(update={"max_new_tokens": 3}))
    assert (cut.truncated, cut.score, cut.format_validity) == (1.0, 0.0, 0.0), cut
    whole = await score_slice(engine, adapter, examples, DEMO_TASK)
    assert whole.truncated == 0.0 and whole.score >= 0.5 and whole.format_validity == 1.0, whole


def test_a_hub_id_reaches_ray_train_as_a_hub_id_and_a_directory_as_an_absolute_path(tmp_path: Path,
                                                                                     monkeypatch) -> None:
    from training.ray_train import TrainJob

    monkeypatch.chdir(tmp_path)
    hub = TrainJob(base_dir=Path("deepseek-ai/DeepSeek-R1-Distill-Qwen-1.5B"), train_path=Path("t.parquet"),
                   out_dir=Path("out"))
    assert str(hub.base_dir) == "deepseek-ai/DeepSeek-R1-Distill-Qwen-1.5B"  # not <cwd>/deepseek-ai/…
    (tmp_path / "my-base").mkdir()
    local = TrainJob(base_dir=Path("my-base"), train_path=Path("t.parquet"), out_dir=Path("out"))
    assert local.base_dir == tmp_path / "my-base" and hub.train_path == tmp_path / "t.parquet"


def test_bootstrap_never_trains_a_demo_adapter_on_another_base(demo_home: Path, tmp_path: Path) -> None:
    """A real base (here: a directory, as a hub id would be) gets no demo adapter, whatever tasks say."""
    from training.demo_bootstrap import bootstrap

    base_dir = demo_home / "models" / "demo-base"
    settings = Settings(home=tmp_path, model={"base": str(base_dir)})
    result = bootstrap(settings)
    assert result.champion is None and not result.adapter_registered and not result.base_built
    assert registry_for(settings, "demo").versions() == []


STREAMED = ["\nThe cue signals good news.\n</think>\n\nPositive answer here.", "thinking <think> twice\n</think>\n\n",
            "<think>\nself-opened\n</think>answer", "no think at all, just an answer  ", "cut off while thinking </thi",
            "<th"]


# A stream knows it is thinking only when the prompt or the model opened <think>: no (text, False) pair
# whose reasoning nobody opened.
@pytest.mark.parametrize(("text", "opened"), [(t, True) for t in STREAMED] + [
    (t, False) for t in STREAMED if "</think>" not in t or t.lstrip().startswith("<think>")])
def test_streamed_pieces_join_to_the_same_reasoning_and_answer(text: str, opened: bool) -> None:
    from flywheel.r1 import StreamSplitter

    expected = split_completion(text, opened_think=opened)
    for seed in range(20):
        rng = __import__("random").Random(seed)
        cuts = sorted(rng.sample(range(1, len(text)), k=min(len(text) - 1, rng.randint(0, 6))))
        pieces = [text[a:b] for a, b in zip([0, *cuts], [*cuts, len(text)], strict=True)]
        splitter = StreamSplitter(opened_think=opened)
        reasoning = answer = ""
        for piece in pieces:
            r, a = splitter.feed(piece)
            reasoning, answer = reasoning + r, answer + a
        r, a, truncated = splitter.finish()
        assert (reasoning + r, answer + a, truncated) == tuple(expected), (pieces, expected)
