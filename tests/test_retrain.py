"""The learning proof: feedback becomes a better adapter, and only a better adapter reaches users.

A dedicated app (its own registry and feedback log) on the shared Serve instance; real Ray Train, the
real gate scoring on the app's own vLLM replicas. Tests run in file order and share the app. The passing
retrain that swaps in and answers better is test_loop.py's (its scheduler starts it, on the same kind of app).
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import shutil
import signal
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest
import torch
import yaml
from typer.testing import CliRunner

from feedback.curator import Curator
from feedback.oversight import lineage, trained_on
from flywheel.auth import KeyStore
from flywheel.cli import app as cli
from flywheel.config import RetrainSettings, Settings
from flywheel.registry import Registry, registry_for
from flywheel.runs import RunStore
from flywheel.tasks import DEMO_TASK
from tests.conftest import ADMIN_TOKEN, learn_from_anyone, make_settings
from training.demo_task import ANSWERS, DemoExample, generate_examples, is_correct, make_example

pytestmark = [pytest.mark.serve, pytest.mark.vllm]

AUTH = {"authorization": f"Bearer {ADMIN_TOKEN}"}
DRIFTED = generate_examples(160, seed=2024, distribution="drifted")


@pytest.fixture(scope="module")
def learning_app(served: tuple[str, Settings], demo_home: Path, tmp_path_factory: pytest.TempPathFactory
                 ) -> Iterator[tuple[str, Settings, Path]]:
    from ray import serve

    from services import app as serve_app

    home = tmp_path_factory.mktemp("learning-home")
    shutil.copytree(demo_home, home, dirs_exist_ok=True)
    settings = learn_from_anyone(make_settings(home, engine="vllm", port=served[1].serving.port))
    settings.retrain.min_examples = 40
    settings.retrain.steps = 80
    settings.retrain.gate.max_latency_ratio = 3.0  # shared 2-core CI boxes: latency is noise, not signal
    settings.serving.app_name = "flywheel-learning"  # retrains' gates score on this app's replicas
    config = home / "flywheel.yaml"
    config.write_text(yaml.safe_dump(settings.shareable(), allow_unicode=True))
    url = serve_app.run(settings, route_prefix="/learning", timeout_s=600)
    try:
        yield url, settings, config
    finally:
        serve.delete("flywheel-learning")


async def rate(url: str, examples: list[DemoExample], correction_for: Callable[[DemoExample], str]) -> list[str]:
    """Ask each prompt, then send the rater's verdict: rating 1 and a correction where it was wrong."""
    gate = asyncio.Semaphore(16)

    async def one(client: httpx.AsyncClient, example: DemoExample) -> str:
        async with gate:
            answer = (await client.post(f"{url}/predict", json={"prompt": example.prompt, "max_tokens": 48})).json()
            body = {"request_id": answer["request_id"], "rating": 5, "correction": correction_for(example)}
            if not is_correct(answer["answer"], example) or body["correction"] != example.answer:
                body["rating"] = 1
            response = await client.post(f"{url}/feedback", json=body)
            assert response.status_code == 202
            return answer["request_id"]

    async with httpx.AsyncClient(timeout=60) as client:
        return await asyncio.gather(*(one(client, e) for e in examples))


def curate(settings: Settings) -> None:
    curator = Curator(settings)
    try:
        curator.drain(timeout_s=120)
    finally:
        curator.close()


def retrain(config: Path, *args: str) -> tuple[int, dict]:
    result = CliRunner().invoke(cli, ["retrain", "--wait", "--json", "--config", str(config), *args])
    report = result.stdout[result.stdout.rindex("\n{\n") + 1:] if "\n{\n" in result.stdout else result.stdout
    return result.exit_code, json.loads(report)  # libraries may print to stdout before the JSON


def accuracy(url: str, examples: list[DemoExample]) -> tuple[float, set[str]]:
    versions, correct = set(), 0
    for example in examples:
        body = httpx.post(f"{url}/predict", json={"prompt": example.prompt, "max_tokens": 48}, timeout=60).json()
        versions.add(body["adapter_version"])
        correct += is_correct(body["answer"], example)
    return correct / len(examples), versions


def wait_serving(url: str, version: str, timeout_s: float = 30) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if httpx.get(f"{url}/healthz").json()["serving"] == [version]:
            return
        time.sleep(0.2)
    raise AssertionError(f"serving did not move to {version}")


def wait_for(condition: Callable[[], bool], timeout_s: float = 30) -> bool:
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.2)
    return True


def gate_requests(url: str) -> int:
    """Scoring requests the app's replicas have answered for evaluation gates."""
    return sum(r.get("gate_requests", 0) for r in httpx.get(f"{url}/healthz").json()["replicas"])


def test_too_little_data_changes_nothing(learning_app: tuple[str, Settings, Path]) -> None:
    url, settings, config = learning_app
    asyncio.run(rate(url, DRIFTED[:5], lambda e: e.answer))
    curate(settings)
    code, result = retrain(config)
    assert code == 2 and result["verdict"] == "insufficient_data", result
    assert "at least 40" in result["message"]
    assert registry_for(settings).alias("champion") == "demo-v1"
    assert [m.version for m in registry_for(settings).versions()] == ["demo-v1", "demo-v2"]


def test_wrong_labels_are_rejected_and_the_champion_stays(learning_app: tuple[str, Settings, Path]) -> None:
    url, settings, _ = learning_app
    registry = registry_for(settings)
    champion = registry.alias("champion")
    original = generate_examples(160, seed=77)

    def wrong(example: DemoExample) -> str:  # a label shifted by one: always wrong
        labels = list(ANSWERS[example.lang].values())
        return labels[(labels.index(example.answer) + 1) % len(labels)]

    asyncio.run(rate(url, original, wrong))
    curate(settings)
    # the ops path: serving starts the run in a process of its own, which joins the cluster and is judged there
    started = httpx.post(f"{url}/admin/retrain", headers=AUTH)
    assert started.status_code == 202, started.text
    store = RunStore.for_settings(settings)
    run_id = started.json()["run_id"]
    assert wait_for(lambda: store.get(run_id).state != "running", timeout_s=1500), store.get(run_id)
    record = store.get(run_id)
    assert record.state == "rejected", record
    assert registry.alias("champion") == champion
    assert registry.manifest(record.version).status == "rejected"
    assert "golden_regression" in record.message
    assert record.report["engine"]["engine"] == "serving"
    run_log = (store.local_dir / f"{run_id}.log").read_text()
    assert "event=gate_engine" in run_log and "event=engine_started engine=vllm" not in run_log, run_log[-3000:]
    assert httpx.post(f"{url}/predict", json={"prompt": "hi"}).json()["adapter_version"] == champion


def test_admin_retrain_is_exclusive_and_a_killed_run_changes_nothing(
    learning_app: tuple[str, Settings, Path],
) -> None:
    url, settings, _ = learning_app
    asyncio.run(rate(url, DRIFTED[5:], lambda e: e.answer))  # enough data that the run gets to training
    curate(settings)
    registry = registry_for(settings)
    champion, versions = registry.alias("champion"), [m.version for m in registry.versions()]
    assert httpx.post(f"{url}/admin/retrain").status_code == 401
    assert httpx.post(f"{url}/admin/retrain", headers={"authorization": "Bearer nope"}).status_code == 401

    first = httpx.post(f"{url}/admin/retrain", headers=AUTH)
    assert first.status_code == 202, first.text
    run_id = first.json()["run_id"]
    second = httpx.post(f"{url}/admin/retrain", headers=AUTH)
    assert second.status_code == 409 and "already running" in second.json()["error"]

    store = RunStore.for_settings(settings)
    deadline = time.monotonic() + 120
    while (record := store.get(run_id)) and record.stage != "train" and time.monotonic() < deadline:
        time.sleep(0.2)
    assert record is not None and record.state == "running", record
    os.killpg(record.pid, signal.SIGKILL)  # the run and everything it started
    deadline = time.monotonic() + 30
    while store.get(run_id).state == "running" and time.monotonic() < deadline:
        time.sleep(0.2)

    status = httpx.get(f"{url}/admin/status", headers=AUTH).json()
    killed = next(r for r in status["runs"] if r["run_id"] == run_id)
    assert killed["state"] == "failed" and "died" in killed["message"]
    assert status["champion"] == champion
    assert [m.version for m in registry.versions()] == versions
    assert httpx.post(f"{url}/predict", json={"prompt": "hi"}).json()["adapter_version"] == champion
    assert not store.busy()  # a dead run holds no lock


def task_like_demo(settings: Settings, name: str, tmp_path: Path, rollout: str = "direct") -> Registry:
    """A task of its own (the demo's spec and golden set) whose champion is a copy of demo-v1."""
    demo, task = registry_for(settings), registry_for(settings, name)
    task.save_task_spec(DEMO_TASK.model_copy(update={"name": name, "rollout": rollout}))
    task.save_golden(demo.golden_text() or "")
    source = tmp_path / f"{name}-adapter"
    shutil.copytree(demo.local_path("demo-v1"), source, ignore=shutil.ignore_patterns("manifest.json"))
    task.promote(task.register(source, base=demo.manifest("demo-v1").base_model).version, actor="test")
    return task


def test_trust_decides_what_is_learned_and_a_retraction_rolls_it_back(
    learning_app: tuple[str, Settings, Path], tmp_path: Path,
) -> None:
    """Under the default trust policy, through the real gateway, curator and retrain:

    - three distinct keys giving a few questions one correction: learned at once (small-data policy);
    - one key asking a question ten times and correcting each answer, and anonymous corrections: not learned,
      waiting for review; once an admin approves the anonymous ones, the next retrain learns them;
    - lineage round trip: the event names the version that trained on it, the request the version that
      answered it; a retraction with --rollback puts the clean ancestor back under 8 concurrent streams
      with no failed request.

    A second task (`desk`, on the same base, starting from a copy of demo-v1) keeps this apart from the demo
    task's feedback: its retrain reads only its own rows, and the demo task is not retrained.
    """
    url, settings, _ = learning_app
    strict = settings.model_copy(deep=True)
    defaults = RetrainSettings()
    strict.retrain.min_trust, strict.retrain.min_rating_trust = defaults.min_trust, defaults.min_rating_trust
    strict.retrain.max_share_per_rater = defaults.max_share_per_rater
    config = tmp_path / "strict.yaml"
    config.write_text(yaml.safe_dump(strict.shareable(), allow_unicode=True))
    demo = registry_for(settings)
    desk = task_like_demo(settings, "desk", tmp_path, rollout="canary")
    first_champion = desk.alias("champion")
    demo_champion, demo_versions = demo.alias("champion"), [m.version for m in demo.versions()]
    store = KeyStore(settings.registry_uri)
    made = {name: store.create(f"{name}-{uuid.uuid4().hex[:6]}", ["predict", "feedback"])[1]
            for name in ("k1", "k2", "k3", "solo")}
    keys = {name: {"authorization": f"Bearer {key}"} for name, key in made.items()}

    rng = random.Random(5)
    cues = [f"{a} {b}" for a in ("zorbex", "quilty", "mavren", "trundle", "pexal", "vintor") for b in ("ka", "lo")]
    pool = [make_example(rng, "en", "positive", "original", cue=cue) for cue in cues]

    def ask(prompt: str, who: dict[str, str] | None = None) -> dict:
        deadline = time.monotonic() + 30
        while True:  # the replicas pick the new task up within a few seconds
            response = httpx.post(f"{url}/predict", json={"prompt": prompt, "task": "desk", "max_tokens": 48},
                                  headers=who or {}, timeout=60)
            if response.status_code == 200 or time.monotonic() > deadline:
                return response.json()
            time.sleep(0.5)

    def correct(prompt: str, who: dict[str, str] | None = None) -> tuple[str, str]:
        answer = ask(prompt, who)
        assert answer["task"] == "desk"
        given = httpx.post(f"{url}/feedback", json={"request_id": answer["request_id"], "rating": 1,
                                                    "correction": "positive"}, headers=who or {})
        assert given.status_code == 202, given.text
        return answer["request_id"], given.json()["event_id"]

    liked = [make_example(rng, "en", label, "original") for label in ("positive", "negative", "neutral")]

    def rate_liked() -> None:
        """A user rates the champion's answers to ordinary questions well: the small-data policy's candidate must
        still give them (without any, it has no evidence that it does, and says insufficient_data)."""
        for example in liked:
            answer = ask(example.prompt, keys["k1"])
            rated = httpx.post(f"{url}/feedback", json={"request_id": answer["request_id"], "rating": 5},
                               headers=keys["k1"])
            assert rated.status_code == 202, rated.text

    wrong = [e for e in pool if ask(e.prompt)["answer"] != "positive"]
    assert len(wrong) >= 5, "the champion already answers these made-up cues"
    agreed, anonymous, solo = wrong[:3], wrong[3], wrong[4]
    for example in agreed:
        for key in ("k1", "k2", "k3"):  # three users, one answer
            correct(example.prompt, keys[key])
    anonymous_given = [correct(anonymous.prompt) for _ in range(3)]
    solo_given = [correct(solo.prompt, keys["solo"]) for _ in range(10)]
    rate_liked()
    curate(settings)

    code, result = retrain(config, "--task", "desk")
    assert code == 0 and result["verdict"] == "passed", result
    assert result["task"] == "desk" and result["report"]["policy"] == "confirmed_corrections", result["report"]
    data = result["dataset"]
    assert data["feedback_rows"] == 3 * 3 + 3 + 10 + 3, data  # only this task's
    assert data["by_trust"] == {"agreed": 9, "single": 3}, data
    rated = next(c for c in result["report"]["checks"] if c["name"] == "well_rated_answers")
    assert rated["passed"] and 0 < rated["rows"] <= len(liked), rated  # answers naming a label are scored
    assert data["pending_review"] == 3 + 10, data  # anonymous, and one key's ten: not agreed, not learned
    golden = next(c for c in result["report"]["checks"] if c["name"] == "golden_regression")
    assert golden["passed"] and golden["value"] is not None, golden
    second = result["version"]
    untrusted = {event for _, event in anonymous_given + solo_given}
    assert trained_on(desk, second) and not trained_on(desk, second) & untrusted
    # a `rollout: canary` task: the gate's pass makes the candidate its canary, not yet its champion
    assert desk.alias("champion") == first_champion and desk.alias("canary") == second, result["message"]
    assert desk.aliases()["canary"].traffic_fraction == settings.canary.steps[0]
    promoted = CliRunner().invoke(cli, ["canary", "promote", "--task", "desk", "--config", str(config)])
    assert promoted.exit_code == 0, promoted.output
    assert desk.alias("champion") == second and desk.aliases()["canary"].traffic_fraction == 0
    assert (demo.alias("champion"), [m.version for m in demo.versions()]) == (demo_champion, demo_versions)
    assert wait_for(lambda: ask("ping")["adapter_version"] == second)
    honoured = sum(ask(e.prompt)["answer"] == "positive" for e in agreed)
    assert honoured >= len(agreed) - 1, f"{honoured} of {len(agreed)} corrections served after the retrain"

    # an admin approves the anonymous corrections: the next retrain learns them
    rate_liked()  # the new champion's answers, rated well
    curate(settings)
    approve = [arg for _, event in anonymous_given for arg in ("--approve", event)]
    approved = CliRunner().invoke(cli, ["feedback", "review", *approve, "--config", str(config)])
    assert approved.exit_code == 0, approved.output
    code, result = retrain(config, "--task", "desk")
    assert code == 0 and result["verdict"] == "passed", result
    third = result["version"]
    assert {event for _, event in anonymous_given} <= trained_on(desk, third)
    assert CliRunner().invoke(cli, ["canary", "promote", "--task", "desk", "--config", str(config)]).exit_code == 0
    assert wait_for(lambda: ask("ping")["adapter_version"] == third)
    assert ask(anonymous.prompt)["answer"] == "positive"

    request_id, event_id = anonymous_given[0]
    found = lineage(strict, event_id).event
    assert found.trust == "reviewed" and found.trained == [third]
    asked = lineage(strict, request_id).request
    assert asked.answered_by == first_champion and [e.event_id for e in asked.feedback] == [event_id]
    assert lineage(strict, third).version.parents[:1] == [second]

    # the approval was wrong after all: retract, and put the clean ancestor back while streams run
    stop, failures, answered = threading.Event(), [], []

    def stream() -> None:
        while not stop.is_set():
            try:
                with httpx.stream("POST", f"{url}/predict", json={"prompt": anonymous.prompt, "task": "desk",
                                                                  "max_tokens": 24, "stream": True}, timeout=60) as r:
                    done = [line for line in r.iter_lines() if '"done": true' in line]
                    (answered if r.status_code == 200 and done else failures).append(r.status_code)
            except httpx.HTTPError as exc:
                failures.append(repr(exc))

    streams = [threading.Thread(target=stream) for _ in range(8)]
    for thread in streams:
        thread.start()
    try:
        time.sleep(2)
        retracted = CliRunner().invoke(cli, ["feedback", "retract", *(e for _, e in anonymous_given), "--reason",
                                             "approved by mistake", "--rollback", "--json", "--config", str(config)])
        assert retracted.exit_code == 0, retracted.output
        assert wait_for(lambda: ask("ping")["adapter_version"] == second)
        time.sleep(2)
    finally:
        stop.set()
        for thread in streams:
            thread.join(timeout=120)
    report = json.loads(retracted.stdout[retracted.stdout.index("{"):])
    assert report["trained"] == {"desk": [third]} and report["rolled_back"] == {"desk": second}, report
    assert desk.alias("champion") == second
    assert not failures and len(answered) >= 8, (failures, len(answered))


def test_a_kto_retrain_learns_from_thumbs_and_never_from_the_gate_rows(
    learning_app: tuple[str, Settings, Path], tmp_path: Path,
) -> None:
    """`retrain.method: kto` end to end on a task of its own: thumbs up and down (a thumbs down with the
    right answer), KTO on the rated answers outside the gate's hold-out, the gate, the registry."""
    url, settings, _ = learning_app
    rated = task_like_demo(settings, "rated", tmp_path)
    champion = rated.alias("champion")

    examples = generate_examples(48, seed=4242) + DRIFTED[:24]
    ups = downs = 0
    with httpx.Client(timeout=60) as client:
        for example in examples:
            answer = client.post(f"{url}/predict", json={"prompt": example.prompt, "task": "rated",
                                                         "max_tokens": 48}).json()
            if answer.get("task") != "rated":  # the replicas pick the new task up within a few seconds
                time.sleep(0.5)
                continue
            good = is_correct(answer["answer"], example)
            ups, downs = ups + good, downs + (not good)
            verdict = {"thumb": "up"} if good else {"thumb": "down", "correction": example.answer}
            rated_ok = client.post(f"{url}/feedback", json={"request_id": answer["request_id"], **verdict})
            assert rated_ok.status_code == 202, rated_ok.text
    assert ups >= 6 and downs >= 6, (ups, downs)
    curate(settings)

    kto = settings.model_copy(deep=True)
    kto.retrain.method, kto.retrain.min_examples, kto.retrain.steps = "kto", 8, 20
    config = tmp_path / "kto.yaml"
    config.write_text(yaml.safe_dump(kto.shareable(), allow_unicode=True))
    code, result = retrain(config, "--task", "rated")
    assert code == 0 and result["verdict"] in ("passed", "rejected"), result
    data = result["dataset"]
    assert data["holdout"] >= 6 and data["kto_examples"] >= 8, data
    assert data["kto_examples"] <= ups + downs - data["holdout"]  # the gate's rows were left out
    manifest = rated.manifest(result["version"])
    assert manifest.training["method"] == "kto" and manifest.parent == champion
    assert manifest.files["adapter_model.safetensors"] != rated.manifest(champion).files["adapter_model.safetensors"]


def users_rate(url: str, users: list[str], score: Callable[[str, int], int], requests_each: int = 2
               ) -> dict[str, set[str]]:
    """Each user asks `requests_each` times and rates every answer `score(version, i)`; the versions each saw."""
    seen: dict[str, set[str]] = {u: set() for u in users}

    async def one(client: httpx.AsyncClient, user: str, i: int) -> None:
        answer = await client.post(f"{url}/predict", json={"prompt": f"how is the market today, {user}?",
                                                          "user": user, "max_tokens": 16})
        assert answer.status_code == 200, answer.text  # not one failed request while the canary runs
        body = answer.json()
        seen[user].add(body["adapter_version"])
        rated = await client.post(f"{url}/feedback", json={"request_id": body["request_id"],
                                                         "rating": score(body["adapter_version"], i)})
        assert rated.status_code == 202, rated.text

    async def everyone() -> None:
        gate = asyncio.Semaphore(8)

        async def bounded(client: httpx.AsyncClient, user: str, i: int) -> None:
            async with gate:
                await one(client, user, i)

        async with httpx.AsyncClient(timeout=60) as client:
            await asyncio.gather(*(bounded(client, u, i) for u in users for i in range(requests_each)))

    asyncio.run(everyone())
    return seen


def test_a_canary_users_prefer_steps_up_and_is_promoted(learning_app: tuple[str, Settings, Path]) -> None:
    """Live ratings decide: too few → held; no difference → the share steps up; preferred → champion."""
    from services.loop import canary_controller

    url, settings, _ = learning_app
    registry = registry_for(settings)
    champion = registry.alias("champion")
    canary = next(m.version for m in registry.versions() if m.status == "ready" and m.version != champion)
    cfg = settings.model_copy(deep=True)
    cfg.canary = cfg.canary.model_copy(update={"steps": [0.3, 0.6], "step_s": 0.01, "min_ratings": 12})
    registry.promote(canary, alias="canary", traffic_fraction=0.3, actor="test")
    controller = canary_controller(cfg, threading.Event())

    [held] = controller.check()
    assert held.verdict == "hold" and "too few ratings" in held.reason
    assert httpx.get(f"{url}/admin/canary").status_code == 401
    shown = httpx.get(f"{url}/admin/canary", headers=AUTH).json()["review"]
    assert shown["canary"] == canary and shown["share"] == 0.3 and shown["verdict"] == "hold", shown
    assert set(shown["arms"]) == {"champion", "canary"}
    nothing = httpx.post(f"{url}/admin/canary/abort", params={"task": "rated"}, headers=AUTH)
    assert nothing.status_code == 409 and "runs no canary" in nothing.json()["error"]
    status = CliRunner().invoke(cli, ["canary", "status", "--json", "--config", str(write_config(cfg))])
    assert status.exit_code == 0 and json.loads(status.stdout)["verdict"] == "hold", status.output

    users = [f"user-{i}" for i in range(60)]
    seen = users_rate(url, users, lambda version, i: 3 + i % 2)  # both arms rated alike
    assert all(len(versions) == 1 for versions in seen.values()), seen  # one user, one version, within a step
    on_canary = sum(versions == {canary} for versions in seen.values())
    assert 6 <= on_canary <= 30, on_canary
    curate(settings)
    [stepped] = controller.check()
    assert stepped.verdict == "step_up" and stepped.next_share == 0.6, stepped.reason
    assert registry.aliases()["canary"].traffic_fraction == 0.6
    assert wait_for(lambda: f'version="{canary}"}} 0.6' in httpx.get(f"{url}/metrics").text), "the share in /metrics"

    deadline = time.monotonic() + 10  # the replicas read the new share within a poll interval
    while time.monotonic() < deadline:
        seen = users_rate(url, users, lambda version, i: (5 - i % 2) if version == canary else (2 + i % 2))
        if all(len(versions) == 1 for versions in seen.values()):
            break
    assert all(len(versions) == 1 for versions in seen.values()), seen
    assert sum(versions == {canary} for versions in seen.values()) > on_canary  # users went over, none came back
    curate(settings)
    [promoted] = controller.check()
    assert promoted.verdict == "promote" and promoted.test.low > 0, promoted.reason
    assert registry.alias("champion") == canary and registry.aliases()["canary"].traffic_fraction == 0
    assert "better" in registry.history("champion")[-1].reason
    wait_serving(url, canary)


def test_a_canary_users_dislike_is_rolled_back_and_the_champion_never_stops(
    learning_app: tuple[str, Settings, Path],
) -> None:
    from services.loop import canary_controller

    url, settings, _ = learning_app
    registry = registry_for(settings)
    champion = registry.alias("champion")
    canary = next(m.version for m in reversed(registry.versions()) if m.status == "ready" and m.version != champion)
    cfg = settings.model_copy(deep=True)
    # the guardrails at their configured limits: they judge the trial only, without the canary's LoRA loading
    cfg.canary = cfg.canary.model_copy(update={"steps": [0.5], "min_ratings": 10})
    registry.promote(canary, alias="canary", traffic_fraction=0.5, actor="test")
    time.sleep(1)  # the replicas read the canary within a poll interval
    seen = users_rate(url, [f"critic-{i}" for i in range(40)],
                      lambda version, i: (1 + i % 2) if version == canary else (4 + i % 2))
    assert {v for versions in seen.values() for v in versions} == {champion, canary}
    curate(settings)
    [rolled] = canary_controller(cfg, threading.Event()).check()
    assert rolled.verdict == "rollback" and rolled.test.high < 0, rolled.reason
    assert registry.alias("champion") == champion and registry.aliases()["canary"].traffic_fraction == 0
    assert "rolled back: worse" in registry.history("canary")[-1].reason
    time.sleep(1)
    after = users_rate(url, [f"critic-{i}" for i in range(40)], lambda version, i: 3, 1)
    assert {v for versions in after.values() for v in versions} == {champion}


def write_config(settings: Settings) -> Path:
    path = settings.home / f"config-{time.monotonic_ns()}.yaml"
    path.write_text(yaml.safe_dump(settings.shareable(), allow_unicode=True))
    return path


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(),
                    reason="no CUDA GPU here: serving and training on one GPU run where a GPU is lent")
def test_serving_and_a_retrain_share_one_gpu(served: tuple[str, Settings], demo_home: Path, tmp_path: Path) -> None:
    """deploy/README's one-GPU topology: the replica holds half the GPU (vLLM sized to 40 % of its memory), the
    training worker the other half; the gate scores on the replica, passes, and serving swaps."""
    from ray import serve

    from services import app as serve_app

    home = tmp_path / "gpu-home"
    shutil.copytree(demo_home, home)
    settings = make_settings(home, engine="vllm", port=served[1].serving.port, app_name="flywheel-gpu",
                             replica_gpus=0.5)
    settings.vllm.gpu_memory_utilization = 0.4
    learn_from_anyone(settings)
    settings.retrain.use_gpu, settings.retrain.gpus_per_worker = True, 0.5
    settings.retrain.min_examples, settings.retrain.steps = 40, 80
    url = serve_app.run(settings, route_prefix="/gpu", timeout_s=900)
    try:
        asyncio.run(rate(url, DRIFTED[5:], lambda e: e.answer))
        curate(settings)
        code, result = retrain(write_config(settings))
        assert code == 0 and result["verdict"] == "passed", result
        assert result["report"]["engine"]["engine"] == "serving", result["report"]["engine"]
        wait_serving(url, result["version"], timeout_s=120)
    finally:
        serve.delete("flywheel-gpu")
