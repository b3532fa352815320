"""What a newcomer meets first, in a fresh home (no base built yet): `tasks add`, `train` and `--json`.

Every check that can be made is made before any work; the heavy stages are stood in for, so these run in
seconds (tests/test_train_task.py trains for real).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from flywheel.cli import app
from flywheel.config import Settings
from flywheel.registry import registry_for
from flywheel.tasks import TaskSpec
from training import demo_bootstrap, demo_model, train_task
from training.user_data import DataReport, Splits

LABELS = ["positive", "negative", "neutral"]


@pytest.fixture
def home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A fresh home: nothing built, nothing registered; building the demo base or its adapter fails the test."""
    home = tmp_path / "home"
    monkeypatch.setenv("FLYWHEEL_HOME", str(home))
    monkeypatch.delenv("FLYWHEEL_CONFIG", raising=False)

    def no_work(*_args: Any, **_kwargs: Any) -> None:
        raise AssertionError("work started before the checks")

    monkeypatch.setattr(demo_model, "build_demo_base", no_work)
    monkeypatch.setattr(demo_bootstrap, "train_demo_adapter", no_work)
    return home


def write_rows(path: Path, rows: list[dict[str, str]]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def sentiment_rows(n: int = 30) -> list[dict[str, str]]:
    return [{"prompt": f"Shares of company {i} moved today.", "completion": LABELS[i % 3]} for i in range(n)]


def test_tasks_add_refuses_budgets_that_never_fit_and_defaults_to_ones_that_do(home: Path) -> None:
    cli = CliRunner()
    answer = cli.invoke(app, ["tasks", "add", "faq", "--max-new-tokens", "512"])
    assert answer.exit_code == 2 and "max_new_tokens 512 leaves no room" in answer.stderr, answer.output
    rows = cli.invoke(app, ["tasks", "add", "faq", "--max-new-tokens", "64", "--max-seq-len", "1024"])
    assert rows.exit_code == 2 and "max_seq_len 1024 is longer than the 512-token context" in rows.stderr
    assert registry_for(Settings(home=home), "faq").task_spec() is None

    declared = cli.invoke(app, ["tasks", "add", "faq"])
    assert declared.exit_code == 0, declared.output
    assert "budgets: max_new_tokens 128, max_seq_len 512 (within the base's 512-token context)" in declared.stdout
    spec = registry_for(Settings(home=home), "faq").task_spec()
    assert spec is not None and (spec.max_new_tokens, spec.max_seq_len) == (128, 512)
    chosen = json.loads(cli.invoke(app, ["tasks", "add", "faq", "--max-new-tokens", "32", "--json"]).stdout)
    assert (chosen["max_new_tokens"], chosen["max_seq_len"]) == (32, 512)
    assert not (home / "models").exists() or not any((home / "models").rglob("config.json"))


def test_train_checks_everything_checkable_before_any_work(home: Path, tmp_path: Path) -> None:
    cli = CliRunner()
    data = write_rows(tmp_path / "news.jsonl", sentiment_rows())
    registry_for(Settings(home=home), "wide").save_task_spec(  # declared before `tasks add` checked budgets
        TaskSpec(name="wide", kind="classification", labels=LABELS))
    wide = cli.invoke(app, ["train", "--task", "wide", "--data", str(data)])
    assert wide.exit_code == 2 and "max_new_tokens 512 leaves no room" in wide.stderr, wide.output

    assert cli.invoke(app, ["tasks", "add", "news", "--kind", "classification", "--labels", ",".join(LABELS)]
                      ).exit_code == 0
    text = tmp_path / "news.txt"
    text.write_text("positive\n")
    unreadable = cli.invoke(app, ["train", "--task", "news", "--data", str(text)])
    assert unreadable.exit_code == 2 and "unsupported file type '.txt'" in unreadable.stderr, unreadable.output
    columns = cli.invoke(app, ["train", "--task", "news", "--data", str(data), "--columns", "text=body"])
    assert columns.exit_code == 2 and "cannot map to 'body'" in columns.stderr, columns.output
    evaluated = cli.invoke(app, ["train", "--task", "news", "--data", str(data), "--eval-file", str(text)])
    assert evaluated.exit_code == 2 and "unsupported file type" in evaluated.stderr, evaluated.output


class FakeTrainer:
    """Stands in for the Ray training and the engine: chatters on stdout like the libraries they import."""

    def __init__(self, settings: Settings, spec: TaskSpec, request: train_task.TrainRequest, say: Any = None
                 ) -> None:
        self.spec = spec
        print("GPTQModel banner: a library says hello on stdout")

    def prepare(self) -> tuple[Splits, DataReport]:
        print("progress bar 100%")
        return Splits(train=[], val=[], test=[]), DataReport(file="news.jsonl")

    def run(self, splits: Splits, data_report: DataReport) -> train_task.TrainReport:
        print("(TrainWorker pid=1) step 1/1")
        return train_task.TrainReport(task=self.spec.name, version=f"{self.spec.name}-v1", data={}, message="done")


def test_train_json_is_alone_on_stdout_and_never_trains_the_demo_adapter(
        home: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def build_base(out_dir: Path, **_kwargs: Any) -> Path:
        print("building a base prints too")
        out_dir.mkdir(parents=True)
        (out_dir / "config.json").write_text("{}")
        return out_dir

    monkeypatch.setattr(demo_model, "build_demo_base", build_base)
    monkeypatch.setattr(train_task, "TaskTrainer", FakeTrainer)
    monkeypatch.setattr("flywheel.cli._ray_is_up", lambda: True)  # no Ray of our own to stop
    cli = CliRunner()
    assert cli.invoke(app, ["tasks", "add", "news", "--kind", "classification", "--labels", ",".join(LABELS)]
                      ).exit_code == 0
    data = write_rows(tmp_path / "news.jsonl", sentiment_rows())

    result = cli.invoke(app, ["train", "--task", "news", "--data", str(data), "--json"])

    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["version"] == "news-v1"
    assert "GPTQModel banner" in result.stderr and "building a base prints too" in result.stderr
    settings = Settings(home=home)
    assert (settings.demo_base_dir / "config.json").exists()  # the base was built ...
    assert registry_for(settings, "demo").versions() == []  # ... and no demo adapter trained beside it


def test_an_undeclared_task_is_offered_its_tasks_add_line_from_the_data(home: Path, tmp_path: Path) -> None:
    cli = CliRunner()
    labelled = write_rows(tmp_path / "news.jsonl", sentiment_rows())
    result = cli.invoke(app, ["train", "--task", "news", "--data", str(labelled)])
    assert result.exit_code == 2, result.output
    assert "flywheel tasks add news --kind classification --labels positive,negative,neutral" in result.stderr

    answers = write_rows(tmp_path / "faq.jsonl", [{"question": f"How do I do thing {i}?",
                                                   "answer": f"Open menu {i}, then press Go."} for i in range(12)])
    result = cli.invoke(app, ["train", "--task", "faq", "--data", str(answers)])
    assert result.exit_code == 2 and "flywheel tasks add faq --kind generation\n" in result.stderr, result.output


def test_json_stays_alone_on_the_real_stdout_when_a_library_writes_to_file_descriptor_1(home: Path) -> None:
    """The real process: a C library's write to fd 1 (and Python's print) while the command runs go to stderr."""
    script = (
        "import os\n"
        "import flywheel.registry as registry\n"
        "known = registry.known_tasks\n"
        "def noisy(settings):\n"
        "    os.write(1, b'banner from a C library\\n')\n"
        "    print('banner from Python')\n"
        "    return known(settings)\n"
        "registry.known_tasks = noisy\n"
        "from flywheel.cli import app\n"
        "app(['tasks', 'list', '--json'])\n"
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "FLYWHEEL_HOME": str(home)}, cwd=Path(__file__).parent.parent)
    assert done.returncode == 0, done.stderr
    assert [row["name"] for row in json.loads(done.stdout)] == ["demo"]
    assert "banner from a C library" in done.stderr and "banner from Python" in done.stderr
