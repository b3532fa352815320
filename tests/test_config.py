"""Settings sources and secrets: a secret is masked everywhere and only ever travels in an environment."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from flywheel.config import Settings, load_settings
from flywheel.runs import RunStore

TOKEN, PASSWORD = "tok-7f3a9c", "pw-51bd20"


@pytest.fixture
def secret_settings(tmp_path: Path) -> Settings:
    return load_settings(home=tmp_path / "home", admin_token=TOKEN,
                         feedback={"kafka_bootstrap": "kafka:9092", "sasl_password": PASSWORD})


def test_secrets_are_masked_in_every_dump(secret_settings: Settings) -> None:
    for text in (repr(secret_settings), str(secret_settings), secret_settings.model_dump_json(),
                 json.dumps(secret_settings.model_dump(mode="json")), json.dumps(secret_settings.shareable())):
        assert TOKEN not in text and PASSWORD not in text
    assert "admin_token" not in secret_settings.shareable()
    assert "sasl_password" not in secret_settings.shareable()["feedback"]


def test_a_child_process_gets_the_same_settings_and_secrets_through_its_environment(
    secret_settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    env = secret_settings.child_env()
    loaded = subprocess.run(
        [sys.executable, "-c", "from flywheel.config import load_settings; s = load_settings(); "
         "print(s.admin_token.get_secret_value(), s.feedback.sasl_password.get_secret_value(), s.home)"],
        env={k: v for k, v in env.items() if k != "FLYWHEEL_CONFIG"}, capture_output=True, text=True, check=True)
    assert loaded.stdout.split() == [TOKEN, PASSWORD, str(secret_settings.home)]
    # A deployment rebuilds its settings from the shareable part plus its own environment.
    monkeypatch.setenv("FLYWHEEL_ADMIN_TOKEN", TOKEN)
    rebuilt = Settings.from_shared(secret_settings.shareable())
    assert rebuilt.admin_token.get_secret_value() == TOKEN and rebuilt.feedback.sasl_password is None
    assert rebuilt.shareable() == secret_settings.shareable()


def test_a_launched_retrain_writes_no_settings_file(
    secret_settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    launched: dict[str, object] = {}
    monkeypatch.setattr(RunStore, "launch", lambda self, command, trigger, task, env: launched.update(
        command=command, env=env))
    store = RunStore(secret_settings.home / "runs")
    store.launch_retrain(secret_settings, "admin", "demo")
    assert "--config" not in launched["command"] and launched["command"][-2:] == ["--task", "demo"]
    assert launched["env"]["FLYWHEEL_ADMIN_TOKEN"] == TOKEN  # type: ignore[index]
    assert not any(p.is_file() for p in secret_settings.home.rglob("*"))


def test_a_lone_llm_replica_is_its_own_ingress_and_several_sit_behind_a_gateway() -> None:
    assert Settings().serving.fused, "one replica: no hop between a gateway and the engine"
    assert not Settings(serving={"replicas": 2}).serving.fused, "several: Serve routes each task to its replicas"
    assert not Settings(serving={"autoscaling": {"max_replicas": 2}}).serving.fused
    assert Settings(serving={"replicas": 2, "topology": "fused"}).serving.fused
    assert not Settings(serving={"topology": "split"}).serving.fused
    with pytest.raises(ValueError, match="topology"):
        Settings(serving={"topology": "merged"})


def test_llm_replicas_are_fixed_or_autoscaled_from_config() -> None:
    from ray.serve.config import AutoscalingConfig

    from services.app import build_app, replica_count

    assert replica_count(Settings(serving={"replicas": 2})) == {"num_replicas": 2}
    scaled = replica_count(Settings(serving={"autoscaling": {"min_replicas": 1, "max_replicas": 3,
                                                             "target_ongoing_requests": 8}}))
    assert scaled["num_replicas"] == "auto"
    config = AutoscalingConfig(**scaled["autoscaling_config"])  # what Serve itself accepts
    assert (config.min_replicas, config.max_replicas, config.target_ongoing_requests) == (1, 3, 8)
    build_app(Settings(serving={"autoscaling": {"max_replicas": 2}}))  # Serve validates the options here
    with pytest.raises(ValueError, match="below min_replicas"):
        Settings(serving={"autoscaling": {"min_replicas": 3, "max_replicas": 2}})
