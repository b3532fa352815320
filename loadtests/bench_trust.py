"""`flywheel bench trust`: what knowing who is calling costs, measured in one run on one machine.

1. auth:    p50 of /predict with an API key ÷ p50 without one (open mode on loopback takes both), the two
            interleaved request by request so the box's drift moves both alike
2. lineage: a lineage query (an event, a request, a version) on a scratch home with `rows` curated rows and
            versions that trained on them
3. forget:  `users forget` of one user with 1 % of those rows, on the same scratch home

`predict=False` leaves out the first (no model, no Serve app): the other two on a box that cannot serve.
"""

from __future__ import annotations

import tempfile
import time
import uuid
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path

import httpx
from pydantic import BaseModel, Field

from feedback.dataset import Manifest, PartFile, curated_dataset
from feedback.erasure import forget
from feedback.oversight import lineage
from feedback.schemas import CuratedExample
from flywheel.auth import KeyStore
from flywheel.config import Settings
from flywheel.registry import BaseModelRef, registry_for
from flywheel.stats import percentile
from loadtests.bench_serve import PROMPT
from training.demo_bootstrap import bootstrap
from training.retrain_data import TrainExample, write_train_data

ROWS_PER_PART = 200  # the curator's default batch


class TrustBenchReport(BaseModel):
    requests_each: int = Field(description="0: the auth phase was left out (`--no-predict`).")
    open_p50_ms: float | None
    key_p50_ms: float | None
    key_over_open_p50: float | None
    curated_rows: int
    versions: int
    lineage_event_s: float
    lineage_request_s: float
    lineage_version_s: float
    forget_s: float
    forgot_rows: int


def _auth_phase(settings: Settings, requests: int, say: Callable[[str], None]) -> tuple[float, float]:
    from services import app as serve_app

    _, key = KeyStore(settings.registry_uri).create(f"bench-{uuid.uuid4().hex[:6]}", ["predict", "feedback"])
    url = serve_app.run(settings)
    try:
        say(f"{requests} requests each way, interleaved")
        timings: dict[bool, list[float]] = {True: [], False: []}
        with httpx.Client(timeout=60) as client:
            for i in range(requests * 2 + 10):
                keyed = i % 2 == 0
                started = time.perf_counter()
                response = client.post(f"{url}/predict", json={"prompt": PROMPT, "max_tokens": 16},
                                       headers={"authorization": f"Bearer {key}"} if keyed else {})
                response.raise_for_status()
                if i >= 10:  # warm both paths first
                    timings[keyed].append((time.perf_counter() - started) * 1000)
    finally:
        serve_app.shutdown()
    return percentile(timings[False], 50), percentile(timings[True], 50)


def scratch_home(root: Path, rows: int, versions: int) -> tuple[Settings, CuratedExample, str]:
    """A home with `rows` curated rows of task `faq` (1 % by user `bench-user`) and `versions` versions each
    trained on a slice of them. Returns the settings, one row of that user's, and the newest version."""
    settings = Settings(home=root, tasks=[{"name": "faq", "kind": "generation", "metric": "token_f1"}])
    dataset = curated_dataset(settings)
    t0 = datetime(2026, 12, 1, tzinfo=UTC)
    parts, all_rows = [], []
    for batch, start in enumerate(range(0, rows, ROWS_PER_PART), start=1):
        chunk = []
        for i in range(start, min(rows, start + ROWS_PER_PART)):
            rater = "app/bench-user" if i % 100 == 0 else f"app/person-{i % 5000}"
            chunk.append(CuratedExample(
                event_id=uuid.uuid4().hex, request_id=uuid.uuid4().hex, task="faq",
                feedback_ts=t0 + timedelta(seconds=i), prediction_ts=t0, adapter_version="faq-v1",
                prompt_kind="text", prompt=f"question {i % 20000}", answer="an answer", reasoning="", rating=5,
                thumb=None, correction=None, comment=None, user_id=None, tenant_id=None, rater=rater,
                authenticated=True, asker=rater, feedback_source="f/0", feedback_offset=i,
                prediction_source="p/0", prediction_offset=i))
        path = f"day=2026-12-01/part-{batch:010d}-000.parquet"
        dataset.write_part(path, chunk)
        parts.append(PartFile(path=path, day="2026-12-01", batch=batch, rows=len(chunk), offsets={},
                              positions={}, created_at=t0))
        all_rows += chunk
    dataset.write_manifest(Manifest(updated_at=t0, files=parts))
    registry = registry_for(settings, "faq")
    adapter = root / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text("{}")
    (adapter / "adapter_model.safetensors").write_bytes(b"weights")
    newest, share = "", max(1, rows // versions)
    for n in range(versions):
        trained = all_rows[: (n + 1) * share]  # each version learned everything before it (replay)
        write_train_data(adapter, [TrainExample(prompt=r.prompt, reasoning="", answer=r.answer, source="approved",
                                                event_ids=[r.event_id], raters=[r.rater or ""]) for r in trained])
        newest = registry.register(adapter, base=BaseModelRef(id="demo", sha256="0" * 64),
                                   parent=newest or None).version
    return settings, all_rows[0], newest


def _timed(work: Callable[[], object]) -> float:
    started = time.perf_counter()
    work()
    return time.perf_counter() - started


def run_trust_bench(settings: Settings, *, requests: int = 200, rows: int = 100_000, versions: int = 5,
                    predict: bool = True, say: Callable[[str], None] = print) -> TrustBenchReport:
    open_p50 = key_p50 = None
    if predict:
        say("bootstrapping (if needed)")
        bootstrap(settings, progress=say)
        open_p50, key_p50 = _auth_phase(settings, requests, say)
    with tempfile.TemporaryDirectory(prefix="flywheel-bench-trust-") as scratch:
        say(f"building a scratch home with {rows} curated rows and {versions} versions")
        home, row, version = scratch_home(Path(scratch), rows, versions)
        say("lineage queries")
        event_s = _timed(lambda: lineage(home, row.event_id))
        request_s = _timed(lambda: lineage(home, row.request_id))
        version_s = _timed(lambda: lineage(home, version))
        say("forgetting one user")
        started = time.perf_counter()
        erased = forget(home, "bench-user")
        forget_s = time.perf_counter() - started
    return TrustBenchReport(
        requests_each=requests if predict else 0, open_p50_ms=open_p50, key_p50_ms=key_p50,
        key_over_open_p50=key_p50 / open_p50 if key_p50 is not None and open_p50 else None,
        curated_rows=rows, versions=versions, lineage_event_s=event_s, lineage_request_s=request_s,
        lineage_version_s=version_s, forget_s=forget_s, forgot_rows=erased.curated_rows)
