"""Learning that fits the data (issue 23), through `flywheel train`, Ray Train and the live Serve app's vLLM
replicas: a small FAQ is learned on the demo base, its steps set by the data, not by a fixed epoch count."""

from __future__ import annotations

import json
from pathlib import Path

import httpx
import pytest
from typer.testing import CliRunner

from flywheel.cli import app
from flywheel.config import Settings
from flywheel.registry import registry_for
from tests.test_retrain import wait_for
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


def test_a_small_faq_is_learned_in_the_steps_its_data_needs(served: tuple[str, Settings], tmp_path: Path) -> None:
    url, settings = served
    rows = {p.format(q=q): a for q, a in FAQ.items() for p in PHRASINGS}
    data = tmp_path / "faq.jsonl"
    data.write_text("".join(json.dumps({"prompt": prompt, "completion": answer}) + "\n"
                            for prompt, answer in rows.items()))
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
    first = registry_for(settings, "faq").alias("champion")
    golden = registry_for(settings, "faq").golden_text() or ""  # the test split

    def ask(prompt: str) -> dict:
        return httpx.post(f"{url}/predict", json={"prompt": prompt, "task": "faq"}, timeout=60).json()

    assert wait_for(lambda: ask("ping").get("adapter_version") == first, timeout_s=60)
    test = {prompt: answer for prompt, answer in rows.items() if prompt in golden}
    right = sum(answer in ask(prompt)["answer"] for prompt, answer in test.items())
    assert len(test) == 9 and right >= 0.8 * len(test), f"{right} of {len(test)} test phrasings answered right, live"
