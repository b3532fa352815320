"""The OpenAPI document tells the truth: a contract fuzzer (schemathesis) runs every check against a live app.

Every operation is fuzzed (admin routes with the token) except the ones that move aliases or start
retrains: 0 server errors, 0 responses the document does not describe. It runs against the shared app:
the feedback it sends names request ids that never existed, which the curator bounds and other tests
(counting only their own requests) never see.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from flywheel.config import Settings
from tests.conftest import ADMIN_TOKEN

pytestmark = [pytest.mark.serve, pytest.mark.vllm]


@pytest.fixture(scope="module")
def contract_app(served: tuple[str, Settings]) -> str:
    return served[0]


def test_every_route_answers_as_its_openapi_document_says(contract_app: str, tmp_path: Path) -> None:
    url = contract_app
    command = [
        Path(sys.executable).with_name("schemathesis").as_posix(),
        "--config-file", str(Path(__file__).with_name("schemathesis.toml")), "run", f"{url}/openapi.json", "--url", url,
        "--checks", "all",
        "--exclude-path-regex", "^/admin/(promote|rollback|retrain)$",
        "--header", f"Authorization: Bearer {ADMIN_TOKEN}",
        "--max-examples", "12", "--seed", "7", "--request-timeout", "120", "--workers", "1",
        "--report", "junit", "--report-dir", str(tmp_path),
    ]
    done = subprocess.run(command, capture_output=True, text=True, timeout=1500,
                          env={**os.environ, "NO_COLOR": "1", "SCHEMATHESIS_TELEMETRY": "false"})
    assert done.returncode == 0, done.stdout[-20000:] + done.stderr[-2000:]


def test_hostile_headers_paths_and_bodies_get_clear_4xx(contract_app: str) -> None:
    import httpx

    url = contract_app
    odd = httpx.get(f"{url}/admin/status", headers={"authorization": "Bearer \xe9\xff".encode("latin-1")})
    assert odd.status_code == 401 and "token" in odd.json()["error"]  # was a 500 on a non-ASCII token
    auth = {"authorization": f"Bearer {ADMIN_TOKEN}"}
    for version in ("../../etc/passwd", "/abs/demo-v1", "demo-v1%2F..", "demo-v1/../x"):
        moved = httpx.post(f"{url}/admin/promote", json={"version": version}, headers=auth)
        assert moved.status_code == 422 and moved.json()["detail"][0]["field"] == "version", (version, moved.text)
    huge = httpx.post(f"{url}/predict", content=b" " * (2 << 20), headers={"content-type": "application/json"})
    assert huge.status_code == 413 and "bytes" in huge.json()["error"]
