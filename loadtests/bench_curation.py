"""`flywheel bench curation`: ratings curated per second by one partitioned curator and by three in one group.

Each run gets topics, a consumer group and a dataset of its own and the same events; its curators (each its own
process, as on many machines) join the group first, and a run lasts from the first event published until the
commits hold every rating. The broker is `feedback.kafka_bootstrap`, or the
dev broker (deploy/local/kafka.sh) started for the bench; the dataset goes under `feedback.dataset_uri`, so an
object store is measured as well as a disk.
"""

from __future__ import annotations

import contextlib
import json
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, NamedTuple

from kafka import KafkaProducer
from pydantic import BaseModel, Field

from feedback.bus import build_bus, kafka_client_config
from feedback.partitioned import PairCommit, PartitionedCurator, PartitionedDataset, commit_name, partitioned_dataset
from feedback.schemas import FeedbackEvent, FeedbackRequest, PredictionEvent
from flywheel.config import Settings, load_settings
from flywheel.logs import configure_logging
from flywheel.store import put_whole

REPO = Path(__file__).resolve().parents[1]
KAFKA_SH = REPO / "deploy" / "local" / "kafka.sh"


class CurationBenchReport(BaseModel):
    ratings: int
    dataset_uri: str
    one_curator_per_s: float
    three_curators_per_s: float
    three_over_one: float
    published_per_s: float = Field(description="How fast the bench published (the slower run's): a ceiling on "
                                   "both rates, shared with the curators' CPU on a small box.")
    manifest: list[ManifestCost] = Field(description="What publishing the manifest costs as commits accumulate "
                                         "(on the same store; a curator waits 9 times as long between two).")


class ManifestCost(BaseModel):
    commits: int
    publish_s: float = Field(description="A curator's publication of the manifest: every commit listed (p50 of 3).")
    cold_s: float = Field(description="A curator's first manifest: every commit listed and read.")


class _Run(NamedTuple):
    curated_per_s: float
    published_per_s: float


def _events(ratings: int) -> list[PredictionEvent | FeedbackEvent]:
    events: list[PredictionEvent | FeedbackEvent] = []
    for i in range(ratings):
        request_id = uuid.uuid4().hex
        events.append(PredictionEvent(request_id=request_id, prompt=f"Sentiment of headline {i}: shares rose",
                                      answer="positive", reasoning="rose is good news", adapter_version="demo-v1",
                                      latency_ms=12.5, prompt_tokens=9, completion_tokens=3))
        request = FeedbackRequest(request_id=request_id, rating=1 + i % 5)
        events.append(request.to_event(f"rater-{i % 50}", authenticated=True, user_id=None, tenant_id=None))
    return events


def _curated(settings: Settings) -> int:
    return sum(part.rows for commit in partitioned_dataset(settings).commits() for part in commit.files)


def _partitions(settings: Settings) -> set[int]:
    """The pairs of the run's topics (asking for them makes the broker create both)."""
    producer = KafkaProducer(**kafka_client_config(settings.feedback))
    try:
        counts = {len(producer.partitions_for(topic))
                  for topic in (settings.feedback.predictions_topic, settings.feedback.feedback_topic)}
    finally:
        producer.close()
    if len(counts) != 1:
        raise RuntimeError(f"the run's two topics have different partition counts: {counts}")
    return set(range(counts.pop()))


def _rate(settings: Settings, curators: int, events: list[PredictionEvent | FeedbackEvent], scratch: Path,
          timeout_s: float) -> _Run:
    """Ratings curated per second by `curators` processes in one group, settled before the first event is
    published, until the last rating is committed."""
    partitions = _partitions(settings)
    owned = [scratch / f"owned-{n}.json" for n in range(curators)]
    logs = [scratch / f"curator-{n}.log" for n in range(curators)]
    procs = []
    for owned_file, log_file in zip(owned, logs, strict=True):
        with log_file.open("w") as out:
            procs.append(subprocess.Popen([sys.executable, "-m", "loadtests.bench_curation", str(owned_file)],
                                          cwd=REPO, env=settings.child_env(), stdout=out, stderr=subprocess.STDOUT))

    def wait_for(what: str, done: Callable[[], bool]) -> None:
        deadline = time.monotonic() + timeout_s
        while not done():
            if time.monotonic() > deadline or any(proc.poll() is not None for proc in procs):
                tails = "\n".join(f"--- {log}\n{log.read_text()[-1500:]}" for log in logs)
                raise RuntimeError(f"{curators} curator(s): no {what} in {timeout_s:.0f} s\n{tails}")
            time.sleep(0.1)

    def settled() -> bool:  # every pair owned, by every curator
        seen = [json.loads(path.read_text()) if path.is_file() else [] for path in owned]
        return all(seen) and {pair for pairs in seen for pair in pairs} == partitions

    try:
        wait_for("settled group", settled)
        started = time.monotonic()
        bus = build_bus(settings)
        try:
            for event in events:
                bus.publish(event)
            bus.flush(timeout_s=timeout_s)
        finally:
            bus.close()
        ratings = len(events) // 2
        published_s = time.monotonic() - started
        wait_for("complete dataset", lambda: _curated(settings) >= ratings)
        return _Run(ratings / (time.monotonic() - started), ratings / published_s)
    finally:
        stop_all(procs)


def stop_all(procs: list[subprocess.Popen], timeout_s: float = 30.0) -> None:
    """SIGTERM every process still running, then wait for each; kill one that outlasts `timeout_s`."""
    for proc in procs:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
    for proc in procs:
        try:
            proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def manifest_cost(uri: str, storage_options: dict[str, Any], sizes: tuple[int, ...]) -> list[ManifestCost]:
    """Commits of empty batches written under `uri` up to each of `sizes`, and what the manifest costs then; the
    scratch folder is removed at the end."""
    dataset = PartitionedDataset(uri, "p", "f", storage_options)
    try:
        return _manifest_cost(dataset, uri, storage_options, sizes)
    finally:
        with contextlib.suppress(OSError):
            dataset.fs.rm(dataset.root, recursive=True)


def _manifest_cost(dataset: PartitionedDataset, uri: str, storage_options: dict[str, Any], sizes: tuple[int, ...]
                   ) -> list[ManifestCost]:
    costs, written, now = [], 0, datetime.now(UTC)
    for size in sizes:
        for n in range(written, size):  # over 4 pairs, as a topic's partitions would spread them
            start = (n // 4 * 10, n // 4 * 10)
            commit = PairCommit(pair=n % 4, start=start, end=(start[0] + 10, start[1] + 10), files=[], created_at=now)
            put_whole(dataset.fs, dataset.curated.path(commit_name(commit.pair, start)),
                      commit.model_dump_json().encode(), exclusive=True)
        written = size
        started = time.perf_counter()
        fresh = PartitionedDataset(uri, "p", "f", storage_options)
        fresh.manifest()
        cold = time.perf_counter() - started
        publish = []
        for _ in range(3):
            started = time.perf_counter()
            fresh.publish_manifest()
            publish.append(time.perf_counter() - started)
        costs.append(ManifestCost(commits=size, publish_s=statistics.median(publish), cold_s=cold))
    return costs


def run_curation_bench(settings: Settings, *, ratings: int, say: Callable[[str], None],
                       timeout_s: float = 300.0, commits: tuple[int, ...] = (1000, 5000)) -> CurationBenchReport:
    events = _events(ratings)
    with tempfile.TemporaryDirectory(prefix="flywheel-bench-curation-") as scratch:
        broker_dir = Path(scratch) / "kafka"
        bootstrap, api_version = settings.feedback.kafka_bootstrap, settings.feedback.kafka_api_version
        if bootstrap is None:
            say("starting the dev Kafka broker")
            started = subprocess.run([str(KAFKA_SH), "start", str(broker_dir)], capture_output=True, text=True,
                                     check=True, timeout=300)
            bootstrap, api_version = started.stdout.strip().splitlines()[-1], "0.9"
        try:
            rates: dict[int, _Run] = {}
            for curators in (1, 3):
                tag = uuid.uuid4().hex[:8]
                base = settings.feedback.dataset_uri or str(Path(scratch) / "datasets")
                run = settings.model_copy(update={"home": Path(scratch) / f"home-{tag}", "feedback": settings.feedback
                                          .model_copy(update={
                                              "kafka_bootstrap": bootstrap, "kafka_api_version": api_version,
                                              "curation": "partitioned", "consumer_group": f"bench-{tag}",
                                              "predictions_topic": f"bench.{tag}.predictions",
                                              "feedback_topic": f"bench.{tag}.feedback",
                                              "dataset_uri": f"{base.rstrip('/')}/bench-{tag}"})})
                say(f"{curators} curator(s): {ratings} ratings")
                run_dir = Path(scratch) / f"run-{tag}"
                run_dir.mkdir()
                rates[curators] = _rate(run, curators, events, run_dir, timeout_s)
                say(f"{curators} curator(s): {rates[curators].curated_per_s:.0f} ratings/s")
        finally:
            if settings.feedback.kafka_bootstrap is None:
                subprocess.run([str(KAFKA_SH), "stop", str(broker_dir)], capture_output=True, timeout=120)
        base = settings.feedback.dataset_uri or str(Path(scratch) / "datasets")
        scratch_uri = f"{base.rstrip('/')}/bench-manifest-{uuid.uuid4().hex[:8]}"
        say(f"the manifest's cost at {', '.join(map(str, commits))} commits ({scratch_uri})")
        manifest = manifest_cost(scratch_uri, settings.feedback.dataset_storage_options, commits)
    return CurationBenchReport(manifest=manifest, ratings=ratings,
                               dataset_uri=settings.feedback.dataset_uri or "(a local scratch dir)",
                               one_curator_per_s=rates[1].curated_per_s, three_curators_per_s=rates[3].curated_per_s,
                               three_over_one=rates[3].curated_per_s / rates[1].curated_per_s,
                               published_per_s=min(run.published_per_s for run in rates.values()))


def _curate_until_stopped(owned: Path) -> None:
    """One curator of a run, its settings handed down by the bench (FLYWHEEL_SETTINGS_JSON), until SIGTERM; the
    pairs it owns written to `owned` as they change (the bench starts timing once the group has settled)."""
    configure_logging()
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    curator = PartitionedCurator(load_settings(), session_timeout_ms=6000)

    def report() -> None:
        while not stop.wait(0.1):
            written = owned.with_suffix(".tmp")
            written.write_text(json.dumps(list(curator.pairs)))
            written.replace(owned)  # whole: the bench reads it meanwhile

    threading.Thread(target=report, daemon=True).start()
    try:
        curator.run(stop)
    finally:
        curator.close()


if __name__ == "__main__":
    _curate_until_stopped(Path(sys.argv[1]))
