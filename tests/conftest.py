"""Shared fixtures: a bootstrapped demo home (built once per session), a live Serve app on it, and the S3 API
server the registry lives on in the object-store tests."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import torch
from typer.testing import CliRunner

from flywheel.config import Settings
from flywheel.registry import Registry, registry_for
from training.demo_bootstrap import bootstrap, train_demo_adapter

pytest_plugins = ["tests.kafka_broker"]

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
# A Ray job's entrypoint says `python`, as on a cluster's image: here, this venv's (Ray's processes inherit it).
os.environ["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"
# The tiny demo model is 50-100x slower on 2 threads when the other core is busy (Ray, vLLM).
torch.set_num_threads(1)
torch.set_flush_denormal(True)

# Small but real: enough steps that the base answers in the R1 format and v1/v2 differ.
TEST_BOOTSTRAP = {"base_steps": 200, "adapter_steps": 60, "train_examples": 200, "seed": 0}


ADMIN_TOKEN = "test-admin-token"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def make_settings(home: Path, **serving: object) -> Settings:
    return Settings(
        home=home,
        admin_token=ADMIN_TOKEN,
        bootstrap=TEST_BOOTSTRAP,
        serving={"port": free_port(), **serving},
        ray={"num_cpus": 4, "object_store_mb": 256, "dashboard_port": free_port()},
        loop={"enabled": False},  # tests drive the curator themselves; tests/test_loop.py runs the keeper
        # a revoked key is refused at once; fuzzers never wait
        auth={"key_cache_s": 0.2, "rate": "100000/second", "retract_rate": "100000/second"},
    )


def learn_from_anyone(settings: Settings) -> Settings:
    """For tests of learning itself, whose single anonymous client stands in for many users: every verdict trains.
    The defaults (agreed corrections from distinct keys, a cap per rater) are proven in tests/test_trust.py."""
    settings.retrain.min_trust = settings.retrain.min_rating_trust = "anonymous"
    settings.retrain.max_share_per_rater = 1.0
    settings.canary.count_anonymous = True
    return settings


@pytest.fixture(scope="session")
def demo_home(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A home with the demo base, champion demo-v1 (original task) and demo-v2 (drifted task)."""
    home = tmp_path_factory.mktemp("flywheel-home")
    settings = make_settings(home)
    bootstrap(settings)
    train_demo_adapter(settings, registry_for(settings), distribution="drifted", seed=7)
    return home


@pytest.fixture
def home_copy(demo_home: Path, tmp_path: Path) -> Path:
    """A private copy of the demo home, for tests that change the registry."""
    target = tmp_path / "home"
    shutil.copytree(demo_home, target, symlinks=True)
    return target


@pytest.fixture
def cli(home_copy: Path, monkeypatch: pytest.MonkeyPatch) -> CliRunner:
    """The `flywheel` CLI, in-process, on a private copy of the demo home."""
    monkeypatch.setenv("FLYWHEEL_HOME", str(home_copy))
    for key, value in TEST_BOOTSTRAP.items():
        monkeypatch.setenv(f"FLYWHEEL_BOOTSTRAP__{key.upper()}", str(value))
    monkeypatch.delenv("FLYWHEEL_CONFIG", raising=False)
    return CliRunner()


@pytest.fixture(scope="session")
def served(demo_home: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, Settings]]:
    """A real local Ray + Serve app (vLLM engine) over its own copy of the demo registry."""
    from services import app as serve_app

    home = tmp_path_factory.mktemp("served-home")
    shutil.copytree(demo_home, home, dirs_exist_ok=True)
    settings = make_settings(home, engine="vllm")
    url = serve_app.run(settings, timeout_s=600)
    try:
        yield url, settings
    finally:
        serve_app.shutdown()


@pytest.fixture
def served_registry(served: tuple[str, Settings]) -> Registry:
    return registry_for(served[1])


@pytest.fixture(scope="module")
def s3_endpoint() -> Iterator[str]:
    """moto's S3 API server, run locally: where the registry lives on an object store in the tests."""
    port = free_port()
    server = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    endpoint = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                httpx.get(endpoint, timeout=1)
                break
            except httpx.TransportError:
                if time.monotonic() > deadline or server.poll() is not None:
                    raise RuntimeError("the moto S3 server did not start") from None
                time.sleep(0.2)
        yield endpoint
    finally:
        server.terminate()
        server.wait(timeout=10)
