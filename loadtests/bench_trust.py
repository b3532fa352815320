"""`flywheel bench trust`: what knowing who is calling costs, measured in one run on one machine.

1. auth:    /predict with an API key ÷ without one (open mode on loopback takes both), in pairs sent back to
            back in a random order. The ratio is the median of the pairs' ratios: on a shared 2-core VM the
            level of /predict latency moves from run to run by more than the key could cost (p50s of one
            code 46 ms in one run, 70 ms in the next), and a pair sees one level. The p50s are reported too.
2. lineage: a lineage query (an event, a request, a version) on a scratch home with `rows` curated rows and
            versions that trained on them
3. forget:  `users forget` of one user with 1 % of those rows, on the same scratch home

`predict=False` leaves out the first (no model, no Serve app): the other two on a box that cannot serve.
"""

from __future__ import annotations

import random
import statistics
import tempfile
import time
import uuid
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path

import httpx
from pydantic import BaseModel, Field
from scipy.stats import binom

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
    key_over_open: float | None = Field(description="Median over pairs of (keyed ms ÷ open ms).")
    key_over_open_ci95: tuple[float, float] | None = Field(
        description="Distribution-free 95 % interval of that median (order statistics of the pairs' ratios).")
    curated_rows: int
    versions: int
    lineage_event_s: float
    lineage_request_s: float
    lineage_version_s: float
    forget_s: float
    forgot_rows: int


class AuthTimings:
    """(keyed ms, open ms) pairs, each pair sent back to back."""

    def __init__(self, pairs: list[tuple[float, float]]) -> None:
        self.pairs = pairs

    def p50s(self) -> tuple[float | None, float | None]:
        return percentile([k for k, _ in self.pairs], 50), percentile([o for _, o in self.pairs], 50)

    def ratio(self) -> tuple[float, tuple[float, float]]:
        """The median of the pairs' ratios and its 95 % interval: the order statistics k and n-k+1 where a
        Binomial(n, 1/2) leaves 2.5 % on each side (no assumption on how latency is distributed)."""
        ratios = sorted(k / o for k, o in self.pairs)
        n = len(ratios)
        low = max(int(binom.ppf(0.025, n, 0.5)) - 1, 0)
        return float(statistics.median(ratios)), (ratios[low], ratios[n - 1 - low])


def _auth_phase(settings: Settings, requests: int, say: Callable[[str], None]) -> AuthTimings:
    from services import app as serve_app

    _, key = KeyStore(settings.registry_uri).create(f"bench-{uuid.uuid4().hex[:6]}", ["predict", "feedback"])
    order = random.Random(0)
    url = serve_app.run(settings)
    try:
        say(f"{requests} pairs of /predict, one with a key and one without, in a random order each")
        with httpx.Client(timeout=60) as client:
            def timed_predict(keyed: bool) -> float:
                started = time.perf_counter()
                client.post(f"{url}/predict", json={"prompt": PROMPT, "max_tokens": 16},
                            headers={"authorization": f"Bearer {key}"} if keyed else {}).raise_for_status()
                return (time.perf_counter() - started) * 1000

            for _ in range(5):  # warm both paths first
                timed_predict(True), timed_predict(False)
            pairs = []
            for _ in range(requests):
                first = order.random() < 0.5
                times = {first: timed_predict(first), not first: timed_predict(not first)}
                pairs.append((times[True], times[False]))
    finally:
        serve_app.shutdown()
    return AuthTimings(pairs)


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


def _auth_fields(timings: AuthTimings) -> dict:
    key_p50, open_p50 = timings.p50s()
    ratio, interval = timings.ratio()
    return {"open_p50_ms": open_p50, "key_p50_ms": key_p50, "key_over_open": ratio, "key_over_open_ci95": interval}


def _timed(work: Callable[[], object]) -> float:
    started = time.perf_counter()
    work()
    return time.perf_counter() - started


def run_trust_bench(settings: Settings, *, requests: int = 200, rows: int = 100_000, versions: int = 5,
                    predict: bool = True, say: Callable[[str], None] = print) -> TrustBenchReport:
    timings = None
    if predict:
        say("bootstrapping (if needed)")
        bootstrap(settings, progress=say)
        timings = _auth_phase(settings, requests, say)
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
        requests_each=requests if predict else 0,
        **(_auth_fields(timings) if timings else {"open_p50_ms": None, "key_p50_ms": None, "key_over_open": None,
                                                  "key_over_open_ci95": None}),
        curated_rows=rows, versions=versions, lineage_event_s=event_s, lineage_request_s=request_s,
        lineage_version_s=version_s, forget_s=forget_s, forgot_rows=erased.curated_rows)
