"""`flywheel train` on a company's own, messy data, through Ray Train, the vLLM engine and the live Serve app.

The trainings run as `flywheel train` subprocesses joined to the session's Ray cluster and write into the
live app's registry: the replicas discover each new task by themselves and serve it through /predict.
"""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
import yaml
from typer.testing import CliRunner

from flywheel.cli import app
from flywheel.config import Settings
from flywheel.registry import registry_for
from loadtests.bench_data import ROUTINE, URGENT, WHO, triage_rows

pytestmark = [pytest.mark.serve, pytest.mark.vllm]

EMAIL, PHONE = "jane.roe@example.org", "13912345678"

def write_messy_triage(path: Path) -> dict[str, list[int]]:
    """A classification export with every defect the issue names; returns the defects' line numbers."""
    rows = [json.dumps(r) for r in triage_rows(260, seed=1)]
    lines = list(rows)
    defects: dict[str, list[int]] = {}

    def add(kind: str, line: str) -> None:
        lines.append(line)
        defects.setdefault(kind, []).append(len(lines))

    add("duplicate", rows[0])
    add("duplicate", rows[1])
    add("duplicate", rows[1])
    add("malformed_json", '{"instruction": "Triage this", "input": "broken')
    add("unknown_label", json.dumps({"instruction": "Triage this patient message.", "input": "Uma writes: a cough",
                                     "output": "critical"}))
    add("pii", json.dumps({"prompt": f"Zed ({EMAIL}, {PHONE}) writes: chest pain today", "completion": "urgent"}))
    add("too_long", json.dumps({"instruction": "Triage this patient message.",
                                "input": " ".join(f"word{i}" for i in range(600)), "output": "routine"}))
    add("empty_output", json.dumps({"instruction": "Triage this patient message.", "input": "Vic writes: hi",
                                    "output": "  "}))
    path.write_text("\n".join(lines) + "\n")
    return defects


SUPPORT = {
    "How do I reset my password?": "Open Settings, then Security, then Reset password.",
    "Where can I download my invoice?": "Invoices are under Billing, then History.",
    "How do I cancel my plan?": "Go to Billing and press Cancel plan.",
    "Can I change my email address?": "Yes: Profile, then Email, then Save.",
    "How do I add a team member?": "Open Team and press Invite.",
    "Why was my card declined?": "Your bank refused it; try another card.",
}
OPENERS = ["", "Hi! ", "Hello, ", "Quick question: ", "Sorry to bother you. ", "Hey team, "]
CLOSERS = ["", " Thanks.", " Thank you!", " Cheers.", " Please help.", " Regards."]


def write_messy_support(path: Path) -> int:
    """A generation export in OpenAI `messages` format: system prompts, multi-turn, and a few bad rows."""
    rng = random.Random(2)
    lines = []
    for question, answer in SUPPORT.items():
        for opener in OPENERS:
            for closer in CLOSERS:
                messages = [{"role": "user", "content": f"{opener}{question}{closer}"}]
                if rng.random() < 0.3:
                    messages.insert(0, {"role": "system", "content": "You are the Acme support desk."})
                if rng.random() < 0.2:
                    messages[-1:-1] = [{"role": "user", "content": "Hello"},
                                       {"role": "assistant", "content": "Hello! How can I help?"}]
                lines.append(json.dumps({"messages": [*messages, {"role": "assistant", "content": answer}]}))
    lines.append("not json at all")
    lines.append(json.dumps({"messages": [{"role": "user", "content": "no answer here"}]}))
    lines.append(json.dumps({"messages": [{"role": "user", "content": "empty"}, {"role": "assistant",
                                                                                  "content": ""}]}))
    path.write_text("\n".join(lines) + "\n")
    return len(lines)


def flywheel_train(settings: Settings, tmp_path: Path, *args: str, max_steps: int = 240) -> tuple[int, dict, str]:
    """`flywheel train ... --json` in a child process that joins this session's Ray cluster (steps capped)."""
    import ray

    config = tmp_path / "flywheel.yaml"
    config.write_text(yaml.safe_dump(settings.shareable()))
    env = {**os.environ, "RAY_ADDRESS": ray.get_runtime_context().gcs_address,
           "FLYWHEEL_TRAIN__MAX_STEPS": str(max_steps)}
    done = subprocess.run([sys.executable, "-m", "flywheel.cli", "train", "--config", str(config), *args, "--json"],
                          capture_output=True, text=True, env=env, timeout=1200)
    payload = json.loads(done.stdout) if done.returncode == 0 else {}
    return done.returncode, payload, done.stderr


def wait_for_task(url: str, task: str, version: str, timeout_s: float = 60) -> dict:
    deadline = time.monotonic() + timeout_s
    body: dict = {}
    while time.monotonic() < deadline:
        response = httpx.post(f"{url}/predict", json={"prompt": "ping", "task": task, "max_tokens": 4}, timeout=60)
        body = response.json()
        if response.status_code == 200 and body["adapter_version"] == version:
            return body
        time.sleep(1)
    raise AssertionError(f"{task} never served {version}: {body}")


def test_train_a_classification_task_from_a_messy_export(served: tuple[str, Settings], tmp_path: Path) -> None:
    url, settings = served
    data = tmp_path / "triage.jsonl"
    defects = write_messy_triage(data)
    added = CliRunner().invoke(app, ["tasks", "add", "triage", "--kind", "classification", "--labels",
                                     "urgent,routine", "--max-new-tokens", "48", "--max-seq-len", "256",
                                     "--instruction", "Answer urgent or routine."],
                               env={"FLYWHEEL_HOME": str(settings.home)})
    assert added.exit_code == 0, added.output

    code, report, stderr = flywheel_train(settings, tmp_path, "--task", "triage", "--data", str(data))
    assert code == 0, stderr[-3000:]
    data_report = report["data"]
    invalid = data_report["invalid"]
    for kind in ("malformed_json", "unknown_label", "too_long", "empty_output"):
        assert invalid[kind]["lines"] == defects[kind], (kind, invalid)
    assert data_report["duplicates_removed"] >= 3 and data_report["pii_masked_rows"] >= 1
    assert set(data_report["label_distribution"]) == {"urgent", "routine"}
    assert "event=train_progress" in stderr and "loss=" in stderr  # progress while training
    for needle in (EMAIL, PHONE):  # nothing written anywhere holds the raw PII
        leaks = [p for p in settings.home.rglob("*") if p.is_file() and needle.encode() in p.read_bytes()]
        assert not leaks, (needle, leaks)

    scores = report["evaluation"]
    assert scores["candidate"]["metric"] == "accuracy" and "confusion_png" in scores["candidate"]
    # learned, not merely better than the base (issue 23: a classification task of ~200 rows reaches 0.9 on its own
    # test split; this one measured 0.974 after its 240 capped steps)
    assert scores["candidate"]["score"] >= max(0.9, scores["base"]["score"] + 0.4), (scores, report["training"])
    assert report["version"] == "triage-v1" and report["champion"] and not report["forced"]
    assert report["beats_base"]["outcome"] == "passed", report["beats_base"]  # champion because it beats the base
    registry = registry_for(settings, "triage")
    version_dir = registry.local_path("triage-v1")
    assert (version_dir / "confusion.png").stat().st_size > 0
    assert list(version_dir.glob("events.out.tfevents*")), "loss curves for TensorBoard beside the version"
    assert registry.golden_text() and registry.alias("champion") == "triage-v1"

    served_answer = wait_for_task(url, "triage", "triage-v1")
    assert served_answer["task"] == "triage"
    answer = httpx.post(f"{url}/predict", json={"prompt": "Triage this patient message.\n\nOla (40) writes: "
                                                          "chest pain today", "task": "triage"}, timeout=60).json()
    assert answer["adapter_version"] == "triage-v1" and answer["answer"] in {"urgent", "routine"}, answer
    demo = httpx.post(f"{url}/predict", json={"prompt": "ping", "max_tokens": 4}, timeout=60).json()
    assert demo["task"] == "demo" and demo["adapter_version"].startswith("demo-v")  # the default task is untouched
    unknown = httpx.post(f"{url}/predict", json={"prompt": "x", "task": "nope"}, timeout=60)
    assert unknown.status_code == 404 and "triage" in unknown.json()["error"] and "demo" in unknown.json()["error"]
    health = httpx.get(f"{url}/healthz", timeout=30).json()
    assert health["tasks"]["triage"]["serving"] == ["triage-v1"]


def test_a_promote_in_one_task_under_load_on_both_disturbs_neither(served: tuple[str, Settings],
                                                                    tmp_path: Path) -> None:
    """Two tasks on one app: swapping triage's champion under concurrent load on both fails nothing, and
    the demo task keeps answering exactly as before."""
    import shutil
    from concurrent.futures import ThreadPoolExecutor

    url, settings = served
    triage = registry_for(settings, "triage")
    source = tmp_path / "v2"
    shutil.copytree(triage.local_path("triage-v1"), source, ignore=shutil.ignore_patterns("manifest.json"))
    v2 = triage.register(source, base=triage.manifest("triage-v1").base_model, parent="triage-v1").version
    demo_prompts = [f"Analyze the sentiment of this news: Acme shares {cue}" for cue in
                    ("surged", "plunged", "held a meeting", "beat expectations")]
    triage_prompts = [f"Triage this patient message.\n\n{who} (50) writes: {cue} today"
                      for who, cue in zip(WHO, URGENT + ROUTINE, strict=False)]

    def ask(task: str, prompt: str) -> tuple[int, str, str]:
        response = httpx.post(f"{url}/predict", json={"prompt": prompt, "task": task, "max_tokens": 24}, timeout=120)
        body = response.json()
        return response.status_code, body.get("adapter_version", ""), body.get("answer", "")

    before = {p: ask("demo", p)[2] for p in demo_prompts}
    with ThreadPoolExecutor(8) as pool:
        load = [pool.submit(ask, task, prompt) for _ in range(6)
                for task, prompts in (("demo", demo_prompts), ("triage", triage_prompts)) for prompt in prompts]
        time.sleep(1.0)
        triage.promote(v2, actor="test", reason="swap under load")
        results = [f.result() for f in load]
    assert all(code == 200 for code, _, _ in results), [r for r in results if r[0] != 200]
    wait_for_task(url, "triage", v2)
    after = {p: ask("demo", p) for p in demo_prompts}
    assert {version for _, version, _ in after.values()} == {"demo-v1"}
    assert {p: answer for p, (_, _, answer) in after.items()} == before  # the other task never moved
    versions = {version for code, version, _ in results if version.startswith("triage")}
    assert versions <= {"triage-v1", v2}


def test_train_a_generation_task_in_messages_format(served: tuple[str, Settings], tmp_path: Path) -> None:
    url, settings = served
    data = tmp_path / "support.jsonl"
    total = write_messy_support(data)
    added = CliRunner().invoke(app, ["tasks", "add", "support", "--metric", "token_f1", "--max-new-tokens", "48",
                                     "--max-seq-len", "256"], env={"FLYWHEEL_HOME": str(settings.home)})
    assert added.exit_code == 0, added.output

    code, report, stderr = flywheel_train(settings, tmp_path, "--task", "support", "--data", str(data))
    assert code == 0, stderr[-3000:]
    data_report = report["data"]
    assert data_report["rows_read"] == total
    assert set(data_report["invalid"]) >= {"malformed_json", "empty_output"}, data_report["invalid"]
    scores = report["evaluation"]
    assert scores["candidate"]["metric"] == "token_f1"
    assert scores["candidate"]["score"] >= scores["base"]["score"] + 0.3, scores
    wait_for_task(url, "support", "support-v1")
    answer = httpx.post(f"{url}/predict", json={"messages": [
        {"role": "system", "content": "You are the Acme support desk."},
        {"role": "user", "content": "Hi! How do I reset my password? Thanks."}], "task": "support"}, timeout=60).json()
    assert answer["adapter_version"] == "support-v1" and "Reset password" in answer["answer"], answer


def test_zero_valid_rows_and_strict_mode_are_clear_errors(home_copy: Path, tmp_path: Path) -> None:
    runner = CliRunner()
    env = {"FLYWHEEL_HOME": str(home_copy)}
    settings = Settings(home=home_copy)
    # a 512-token answer budget cannot fit the tiny model's 512-token context: refused when declared
    refused = runner.invoke(app, ["tasks", "add", "strict-demo", "--kind", "classification", "--labels", "a,b",
                                  "--max-new-tokens", "512"], env=env)
    assert refused.exit_code == 2 and "max_new_tokens 512 leaves no room" in refused.stderr, refused.output
    garbage = tmp_path / "garbage.jsonl"
    garbage.write_text("nope\n{\"x\": 1}\n")
    assert runner.invoke(app, ["tasks", "add", "strict-demo", "--kind", "classification", "--labels", "a,b",
                               "--max-new-tokens", "32", "--max-seq-len", "128"], env=env).exit_code == 0
    result = runner.invoke(app, ["train", "--task", "strict-demo", "--data", str(garbage)], env=env)
    assert result.exit_code == 2 and "no valid rows" in result.stderr, result.output
    messy = tmp_path / "messy.jsonl"
    messy.write_text(json.dumps({"prompt": "p", "completion": "a"}) + "\nbroken\n")
    strict = runner.invoke(app, ["train", "--task", "strict-demo", "--data", str(messy), "--strict"], env=env)
    assert strict.exit_code == 2 and "line 2" in strict.stderr, strict.output
    unknown = runner.invoke(app, ["train", "--task", "never-declared", "--data", str(messy)], env=env)
    assert unknown.exit_code == 2 and "flywheel tasks add never-declared --kind generation" in unknown.stderr, \
        unknown.output
    assert registry_for(settings, "strict-demo").versions() == []  # nothing registered
