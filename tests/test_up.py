"""`flywheel up` as an operator runs it: a broker that is not there, then a stop signal.

The process serves although the feedback stream cannot be reached (the curator waits, /healthz says so),
and SIGTERM (or Ctrl-C's SIGINT, even to a process a shell started in the background with SIGINT ignored)
stops everything it started, Ray's agents and the ingress included, and exits 0. Once with each ingress:
HAProxy (the default, which every other test goes through too) and Serve's own proxy.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import psutil
import pytest
import yaml

from tests.conftest import make_settings

pytestmark = [pytest.mark.serve]


@pytest.mark.parametrize(("ingress", "listener", "stop"),
                         [("haproxy", "haproxy", signal.SIGTERM), ("serve", "ProxyActor", signal.SIGINT)])
def test_up_serves_without_its_broker_and_a_stop_signal_stops_everything(
        home_copy: Path, tmp_path: Path, ingress: str, listener: str, stop: signal.Signals) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        nobody = f"127.0.0.1:{s.getsockname()[1]}"
    settings = make_settings(home_copy, engine="hf")
    settings.feedback.kafka_bootstrap, settings.feedback.kafka_api_version = nobody, None  # auto-detect: no answer
    settings.retrain.schedule_enabled = False
    settings.loop.enabled = True  # the curator runs in the app's keeper, as for every user
    settings.ray.num_cpus = 2
    settings.serving.ingress = ingress
    config = tmp_path / "flywheel.yaml"
    config.write_text(yaml.safe_dump(settings.shareable(), allow_unicode=True))
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}  # its own Ray, as on an operator's box
    log = (tmp_path / "up.log").open("w")
    up = subprocess.Popen([sys.executable, "-m", "flywheel.cli", "up", "--config", str(config)], env=env,
                          stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                          preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_IGN))  # as `cmd &` in a script
    url = f"http://127.0.0.1:{settings.serving.port}"
    try:
        health = _wait_until_curator_waits(url, up, timeout_s=600)
        assert health["status"] in ("ok", "degraded") and health["feedback"]["connected"] is False
        assert health["loop"]["role"] == "leading" and "curator" in health["loop"]["parts"], health["loop"]
        answer = httpx.post(f"{url}/predict", json={"prompt": "Acme shares surged", "max_tokens": 8}, timeout=60)
        assert answer.status_code == 200, answer.text
        rated = httpx.post(f"{url}/feedback", json={"request_id": answer.json()["request_id"], "rating": 4})
        assert rated.status_code == 202  # spooled: the broker is not needed to accept it
        started = psutil.Process(up.pid).children(recursive=True)
        assert any("raylet" in " ".join(p.cmdline()) for p in started), "no Ray under flywheel up?"
        assert [p for p in started if listener in " ".join(p.cmdline()) and any(
            c.status == psutil.CONN_LISTEN and c.laddr.port == settings.serving.port for c in p.net_connections())
        ], f"{listener} is not what answers on the port"
        chat = {"model": "demo", "messages": [{"role": "user", "content": "Acme shares surged"}], "max_tokens": 8}
        completion = httpx.post(f"{url}/v1/chat/completions", json=chat, timeout=60)
        assert completion.status_code == 200 and completion.json()["model"] == "demo-v1", completion.text
        with httpx.stream("POST", f"{url}/v1/chat/completions", json={**chat, "stream": True}, timeout=60) as stream:
            lines = [line for line in stream.iter_lines() if line.startswith("data: ")]
        assert len(lines) >= 3 and lines[-1] == "data: [DONE]", lines
        up.send_signal(stop)
        assert up.wait(timeout=180) == 0, (tmp_path / "up.log").read_text()[-3000:]
    finally:
        if up.poll() is None:
            os.killpg(up.pid, signal.SIGKILL)
        log.close()
    survivors = _alive(started)
    deadline = time.monotonic() + 20
    while survivors and time.monotonic() < deadline:
        time.sleep(0.5)
        survivors = _alive(survivors)
    assert not survivors, [" ".join(p.cmdline())[:120] for p in survivors]
    assert "Aborted" not in (tmp_path / "up.log").read_text()


def _wait_until_curator_waits(url: str, up: subprocess.Popen[bytes], timeout_s: float) -> dict:
    deadline = time.monotonic() + timeout_s
    health: dict = {}
    while time.monotonic() < deadline:
        assert up.poll() is None, "flywheel up exited"
        try:
            health = httpx.get(f"{url}/healthz", timeout=5).json()
            if health.get("replicas") and (health.get("feedback") or {}).get("curator") == "waiting":
                return health
        except (httpx.HTTPError, ValueError):
            pass
        time.sleep(1)
    raise AssertionError(f"flywheel up did not come up with a waiting curator: {health}")


def _alive(processes: list[psutil.Process]) -> list[psutil.Process]:
    alive = []
    for process in processes:
        try:
            if process.is_running() and process.status() != psutil.STATUS_ZOMBIE:
                alive.append(process)
        except psutil.NoSuchProcess:
            pass
    return alive


def test_a_haproxy_side_port_inherited_but_taken_is_moved(monkeypatch: pytest.MonkeyPatch) -> None:
    """A `flywheel up` started from a process whose own HAProxy holds the side ports it was told (inherited
    variables) picks free ones instead of crashing HAProxy on start."""
    from services.app import HAPROXY_SIDE_PORTS, _haproxy_side_ports

    with socket.socket() as taken:
        taken.bind(("0.0.0.0", 0))
        taken.listen()
        port = str(taken.getsockname()[1])
        for variable in HAPROXY_SIDE_PORTS:
            monkeypatch.setenv(variable, port)
        _haproxy_side_ports()
        assert all(os.environ[variable] != port for variable in HAPROXY_SIDE_PORTS)
