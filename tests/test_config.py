"""Settings sources and secrets: a secret is masked everywhere and only ever travels in an environment."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import typer
import yaml
from pydantic import ValidationError

from flywheel.cli_common import settings_or_exit
from flywheel.config import Settings, TrainSettings, load_settings
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
    monkeypatch.setattr(RunStore, "launch", lambda self, command, trigger, task, env, fence: launched.update(
        command=command, env=env))
    store = RunStore.for_settings(secret_settings)
    store.launch_retrain(secret_settings, "admin", "demo")
    assert "--config" not in launched["command"] and launched["command"][-2:] == ["--task", "demo"]
    assert launched["env"]["FLYWHEEL_ADMIN_TOKEN"] == TOKEN  # type: ignore[index]
    assert not any(p.is_file() for p in secret_settings.home.rglob("*"))


def test_llm_replicas_are_their_own_ingress_unless_several_sit_behind_serves_proxy() -> None:
    assert Settings().serving.fused, "one replica: no hop between a gateway and the engine"
    assert Settings(serving={"replicas": 2}).serving.fused, "several behind HAProxy: a TaskRouter picks each one"
    assert Settings(serving={"autoscaling": {"max_replicas": 2}}).serving.fused
    several_behind_serve = {"ingress": "serve", "replicas": 2}
    assert not Settings(serving=several_behind_serve).serving.fused, "Serve's proxy cannot ask a TaskRouter"
    assert not Settings(serving={"ingress": "serve", "autoscaling": {"max_replicas": 2}}).serving.fused
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


@pytest.mark.parametrize("fused", [True, False])
def test_no_secret_travels_in_a_deployment_runtime_env_or_init_args(
    secret_settings: Settings, fused: bool, caplog: pytest.LogCaptureFixture
) -> None:
    """Ray's dashboard and state API show every actor's runtime env and arguments: secrets reach replicas
    through their process environment only, and a config-file secret not in it is named in a warning."""
    from ray.serve import Application

    from services.app import build_app

    secret_settings.serving.topology = "fused" if fused else "split"
    app = build_app(secret_settings)
    seen, pending = [], [app]
    while pending:
        node = pending.pop()
        if isinstance(node, Application):
            deployment = node._bound_deployment
            seen.append(repr(deployment.ray_actor_options))
            pending += [*deployment.init_args, *deployment.init_kwargs.values()]
        else:
            seen.append(json.dumps(node, default=repr))
    assert len(seen) >= 3 and not any(TOKEN in text or PASSWORD in text for text in seen)
    assert "FLYWHEEL_ADMIN_TOKEN" in caplog.text and TOKEN not in caplog.text


@pytest.mark.parametrize(("section", "field"),
                         [("registry", "storage_options"), ("feedback", "dataset_storage_options")])
def test_a_credential_in_storage_options_is_refused_without_echoing_it(
    section: str, field: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = tmp_path / "flywheel.yaml"
    for options in ({"key": "AKIA-1", "secret": "s3cr3t-value"},
                    {"client_kwargs": {"aws_secret_access_key": "s3cr3t-value"}}, {"token": "s3cr3t-value"}):
        config.write_text(yaml.safe_dump({"home": str(tmp_path / "home"), section: {field: options}}))
        with pytest.raises(typer.Exit):
            settings_or_exit(config)
        refused = capsys.readouterr().err
        assert "looks like a credential" in refused and f"{section}.{field}" in refused
        assert "s3cr3t-value" not in refused
    allowed = {"endpoint_url": "http://minio:9000", "key_prefix": "a", "config_kwargs": {"signature_version": "s3v4"}}
    assert getattr(getattr(load_settings(home=tmp_path / "home", **{section: {field: allowed}}), section), field) \
        == allowed


def test_the_curated_dataset_goes_on_an_object_store_only_with_partitioned_curation(tmp_path: Path) -> None:
    assert Settings(home=tmp_path).dataset_uri == str(tmp_path / "feedback" / "dataset")
    with pytest.raises(ValidationError, match=r"needs feedback\.curation partitioned"):
        Settings(home=tmp_path, feedback={"dataset_uri": "s3://bucket/dataset"})
    with pytest.raises(ValidationError, match="fsspec knows no nope:// store"):
        Settings(home=tmp_path, feedback={"dataset_uri": "nope://bucket/dataset"})
    remote = Settings(home=tmp_path, feedback={"dataset_uri": "s3://bucket/dataset", "curation": "partitioned",
                                               "kafka_bootstrap": "kafka:9092"})
    assert remote.dataset_uri == "s3://bucket/dataset"
    assert Settings(home=tmp_path, feedback={"dataset_uri": str(tmp_path / "d")}).dataset_uri == str(tmp_path / "d")


def test_small_datasets_get_more_epochs_the_way_hosted_services_pick_them() -> None:
    train = TrainSettings(epochs=3, min_examples_seen=100, max_epochs=25)
    assert train.epochs_for(1_000) == 3  # large enough: the base's epochs
    assert train.epochs_for(20) == 5  # small: until 100 examples are seen
    assert train.epochs_for(2) == 25  # tiny: no more than max_epochs
    assert TrainSettings(epochs=3).epochs_for(20) == 3  # without a floor on examples seen, epochs as given
    assert TrainSettings(epochs=40, max_epochs=25).epochs_for(20) == 40  # epochs asked for outright are taken


def test_every_base_has_a_step_cap_and_a_floor_on_examples_seen() -> None:
    for base in ("demo", "deepseek-ai/DeepSeek-R1-Distill-Qwen-1.5B"):
        train = Settings(model={"base": base}).training()
        assert train.max_steps and train.min_examples_seen and train.epochs


def test_several_fused_replicas_behind_haproxy_get_a_task_router_and_one_does_not(monkeypatch) -> None:
    from ray.serve._private import build_app as serve_builder

    from services.app import build_app

    monkeypatch.setattr(serve_builder, "RAY_SERVE_ENABLE_HA_PROXY", True)
    several = build_app(Settings(serving={"replicas": 2}))
    assert several._ingress_request_router._bound_deployment.name == "TaskRouter"
    assert build_app(Settings())._ingress_request_router is None, "one replica: nothing to choose"
    autoscaled = build_app(Settings(serving={"autoscaling": {"min_replicas": 1, "max_replicas": 4}}))
    assert autoscaled._ingress_request_router._bound_deployment.name == "TaskRouter", "it may scale to several"
    monkeypatch.setattr(serve_builder, "RAY_SERVE_ENABLE_HA_PROXY", False)
    assert build_app(Settings(serving={"replicas": 2, "topology": "fused"}))._ingress_request_router is None


@pytest.mark.parametrize(("body", "task"), [
    (b'{"model": "sentiment", "messages": []}', "sentiment"),
    (b'{"model": "sentiment@sentiment-v3"}', "sentiment"),
    (b'{"task": "faq", "prompt": "hi"}', "faq"),
    (b'{"prompt": "hi"}', "demo"),
    (b'{"model": "Not A Task"}', None),
    (b'{"model": 7}', None),
    (b'[1, 2]', None),
    (b'{"model": "sentim', None),
    (b'\xff\xfe', None),
    (b'', None),
    (b'[' * 100_000, None),  # nested past Python's stack: no task, not a router error (HAProxy would answer 503)
])
def test_the_task_router_reads_the_task_a_body_asks_for(body: bytes, task: str | None) -> None:
    from services.task_router import task_of

    assert task_of(body, "demo") == task
