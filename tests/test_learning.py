"""Learning that fits the data (issue 23), through `flywheel train`, Ray Train, the live Serve app's vLLM replicas
and a retrain: a small FAQ is learned on the demo base, then a batch of answers users corrected is learned by one
retrain while the rest stays. One test, because the retrain starts from the adapter the FAQ train made."""

from __future__ import annotations

import json
import uuid
from pathlib import Path

import httpx
import pytest
from typer.testing import CliRunner

from flywheel.auth import KeyStore
from flywheel.cli import app
from flywheel.config import Settings
from flywheel.registry import registry_for
from tests.test_retrain import curate, retrain, wait_for
from tests.test_train_task import flywheel_train

pytestmark = [pytest.mark.serve, pytest.mark.vllm]

# 20 questions a support desk gets, each in three phrasings, with short answers
FAQ = {
    "reset my password": "Settings, then Security.",
    "download my invoice": "Billing, then History.",
    "cancel my plan": "Billing, then Cancel plan.",
    "change my email address": "Profile, then Email.",
    "add a team member": "Team, then Invite.",
    "turn on two-factor login": "Security, then 2FA.",
    "export my data": "Account, then Export.",
    "delete my account": "Account, then Delete.",
    "change the language": "Profile, then Language.",
    "update my card": "Billing, then Payment.",
    "contact a human agent": "Call 555-0100.",
    "get a refund": "Refunds take 5 days.",
    "upgrade to the pro plan": "Billing, then Upgrade.",
    "rename my workspace": "Workspace, then Name.",
    "leave a workspace": "Workspace, then Leave.",
    "mute notifications": "Alerts, then Mute.",
    "install the mobile app": "Search Acme in the store.",
    "see my usage": "Dashboard, then Usage.",
    "share a report": "Report, then Share.",
    "restore a deleted file": "Trash, then Restore.",
}
PHRASINGS = ["How do I {q}?", "What is the way to {q}?", "Can you tell me how to {q}?"]


def test_a_small_faq_is_learned_and_then_its_corrections_are(served: tuple[str, Settings], tmp_path: Path) -> None:
    url, settings = served
    data = tmp_path / "faq.jsonl"
    data.write_text("".join(json.dumps({"prompt": p.format(q=q), "completion": a}) + "\n"
                            for q, a in FAQ.items() for p in PHRASINGS))
    added = CliRunner().invoke(app, ["tasks", "add", "faq", "--metric", "contains", "--max-new-tokens", "32",
                                     "--max-seq-len", "128"], env={"FLYWHEEL_HOME": str(settings.home)})
    assert added.exit_code == 0, added.output

    code, report, stderr = flywheel_train(settings, tmp_path, "--task", "faq", "--data", str(data), max_steps=600)
    assert code == 0, stderr[-3000:]
    training, scores = report["training"], report["evaluation"]
    assert report["data"]["rows_kept"] == 60 and scores["candidate"]["metric"] == "contains"
    assert scores["candidate"]["score"] >= 0.8, (scores, training["stop_reason"], training["steps"])
    assert training["stop_reason"] in {"plateau", "cap"} and training["loss_curve"], training
    assert report["champion"] and report["learned"], report["message"]
    registry = registry_for(settings, "faq")
    first = registry.alias("champion")

    def ask(prompt: str) -> dict:
        return httpx.post(f"{url}/predict", json={"prompt": prompt, "task": "faq"}, timeout=60).json()

    assert wait_for(lambda: ask("ping").get("adapter_version") == first, timeout_s=60)
    golden = registry.golden_text() or ""  # the test split
    test = {p.format(q=q): a for q, a in FAQ.items() for p in PHRASINGS if p.format(q=q) in golden}
    right = sum(answer in ask(prompt)["answer"] for prompt, answer in test.items())
    assert len(test) == 9 and right >= 0.8 * len(test), f"{right} of {len(test)} test phrasings answered right, live"

    # The desk moves 12 answers and users correct each (on its first phrasing, three raters each). They are
    # answers the golden set (the test split) does not hold: a correction the golden set contradicts is
    # rightly rejected by its regression check. The other 8 questions' answers stay.
    moved = {q: f"Help, then {i + 1:02d}." for i, q in enumerate(q for q in FAQ if q not in golden)}
    assert len(moved) == 12, moved
    unchanged = {p.format(q=q): FAQ[q] for q in FAQ if q not in moved for p in PHRASINGS}
    kept_before = [p for p, answer in unchanged.items() if answer in ask(p)["answer"]]

    store = KeyStore(settings.registry_uri)
    keys = [store.create(f"faq-rater-{uuid.uuid4().hex[:6]}", ["predict", "feedback"])[1] for _ in range(3)]
    raters = [{"authorization": f"Bearer {key}"} for key in keys]
    for question, answer in moved.items():
        for rater in raters:
            asked = httpx.post(f"{url}/predict", json={"prompt": PHRASINGS[0].format(q=question), "task": "faq"},
                               headers=rater, timeout=60).json()
            given = httpx.post(f"{url}/feedback", json={"request_id": asked["request_id"], "rating": 1,
                                                        "correction": answer}, headers=rater, timeout=60)
            assert given.status_code == 202, given.text
    for prompt in kept_before[:4]:  # answers users liked: the candidate must keep giving them
        asked = httpx.post(f"{url}/predict", json={"prompt": prompt, "task": "faq"}, headers=raters[0],
                           timeout=60).json()
        httpx.post(f"{url}/feedback", json={"request_id": asked["request_id"], "rating": 5}, headers=raters[0],
                   timeout=60)
    curate(settings)
    config = tmp_path / "flywheel.yaml"
    code, result = retrain(config, "--task", "faq")
    trained = {k: (result.get("training") or {}).get(k) for k in ("steps", "stop_reason", "loss_curve", "seconds")}
    assert code == 0 and result["verdict"] == "passed", (result["message"], result["report"].get("checks"), trained)
    assert result["report"]["policy"] == "confirmed_corrections"
    assert trained["stop_reason"] in {"reproduced", "plateau", "steps"} and trained["loss_curve"], trained
    second = result["version"]
    assert wait_for(lambda: ask("ping").get("adapter_version") == second, timeout_s=60)
    honoured = sum(answer in ask(PHRASINGS[0].format(q=q))["answer"] for q, answer in moved.items())
    assert honoured >= 10, f"{honoured} of 12 corrections served after one retrain"
    kept_after = [p for p in kept_before if unchanged[p] in ask(p)["answer"]]
    assert len(kept_after) >= 0.9 * len(kept_before), (kept_before, kept_after)
