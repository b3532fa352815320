"""Curation partitioned by Kafka: three curators in one group, one killed mid-batch, every rating once."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import fsspec
import pytest
from kafka import KafkaProducer
from pydantic import ValidationError

from feedback.bus import kafka_client_config
from feedback.curator import BatchResult, Located, SourceRecord, feedback_status, join
from feedback.dataset import CuratedDataset, curated_dataset
from feedback.erasure import forget
from feedback.oversight import author_of, events_matching
from feedback.partitioned import (
    CommitConflict,
    PairState,
    PartitionedCurator,
    PartitionedDataset,
    commit_name,
    partitioned_dataset,
)
from feedback.schemas import CuratedExample, encode_event
from feedback.supervisor import read_curators, read_health
from flywheel.config import Settings
from loadtests.bench_curation import stop_all
from tests.kafka_broker import event_pairs, interleaved, publish, write_config

REPO = Path(__file__).resolve().parents[1]

# One curator of the group, as its own process. It writes the pairs it owns to OWNED every 0.1 s; with
# DIE_AT = k it SIGKILLs itself on its k-th batch, after the batch's Parquet parts are written and before
# their commit is created (the moment a crash can hurt most).
CURATOR = """
import json, os, signal, sys, threading
from pathlib import Path
from typing import Any
from feedback import partitioned
from flywheel.cli_common import settings_or_exit
from flywheel.logs import configure_logging

config, owned, die_at = Path(sys.argv[1]), Path(sys.argv[2]), int(sys.argv[3])
configure_logging()
if die_at:
    store, commits = partitioned.put_whole, 0
    def dying(fs, path, data, *, exclusive):
        global commits
        if exclusive:
            commits += 1
            if commits == die_at:
                print("dying before commit", path, flush=True)
                os.kill(os.getpid(), signal.SIGKILL)
        store(fs, path, data, exclusive=exclusive)
    partitioned.put_whole = dying
stop = threading.Event()
signal.signal(signal.SIGTERM, lambda *_: stop.set())
curator = partitioned.PartitionedCurator(settings_or_exit(config), session_timeout_ms=6000)

def report():
    while not stop.wait(0.1):
        try:
            owned.write_text(json.dumps(curator.pairs))
        except RuntimeError:  # the dict changed while read: next time
            pass
threading.Thread(target=report, daemon=True).start()
curator.run(stop)
curator.close()
"""


def _read_owned(path: Path) -> list[int] | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _wait_for(what: str, check: Callable[[], bool], timeout_s: float, logs: list[Path]) -> None:
    deadline = time.monotonic() + timeout_s
    while not check():
        if time.monotonic() > deadline:
            tails = "\n".join(f"--- {log}\n{log.read_text()[-2000:]}" for log in logs)
            pytest.fail(f"timed out waiting for {what}\n{tails}")
        time.sleep(0.1)


def _rows(settings: Settings) -> list[CuratedExample]:
    """What a reader sees: the rows of every committed part (straight from the commits)."""
    dataset = partitioned_dataset(settings)
    table = dataset.curated.read_table(dataset.manifest())
    return [CuratedExample.model_validate(row) for row in table.to_pylist()]


def _on_s3(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> dict[str, Any]:
    """Feedback settings that put the dataset in a fresh bucket of the moto S3 server, credentials in the
    environment (the curators' processes inherit it), as on a cluster."""
    endpoint = request.getfixturevalue("s3_endpoint")
    for name, value in (("AWS_ACCESS_KEY_ID", "testing"), ("AWS_SECRET_ACCESS_KEY", "testing"),
                        ("AWS_DEFAULT_REGION", "us-east-1")):
        monkeypatch.setenv(name, value)
    bucket = f"curated-{uuid.uuid4().hex[:8]}"
    options = {"endpoint_url": endpoint}
    fsspec.filesystem("s3", **options).mkdir(bucket)
    return {"dataset_uri": f"s3://{bucket}/dataset", "dataset_storage_options": options}


@pytest.mark.kafka
@pytest.mark.parametrize("store", ["disk", "s3"])
def test_three_curators_one_killed_mid_batch_curate_every_rating_exactly_once(
    store: str, feedback_settings: Callable[..., Settings], tmp_path: Path, request: pytest.FixtureRequest,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    on_store = _on_s3(request, monkeypatch) if store == "s3" else {}
    settings = feedback_settings("kafka", curation="partitioned", curator_batch_size=20, curator_flush_s=0.05,
                                 **on_store)
    fs = settings.feedback
    producer = KafkaProducer(**kafka_client_config(fs))  # the broker creates both topics (num.partitions=4)
    try:
        counts = [len(producer.partitions_for(topic)) for topic in (fs.predictions_topic, fs.feedback_topic)]
    finally:
        producer.close()
    assert counts[0] == counts[1] >= 3, counts
    partitions = set(range(counts[0]))

    config = write_config(settings, tmp_path / "flywheel.yaml")
    owned = [tmp_path / f"owned-{n}.json" for n in range(3)]
    logs = [tmp_path / f"curator-{n}.log" for n in range(3)]
    procs = []
    for n in range(3):
        with logs[n].open("w") as log:
            procs.append(subprocess.Popen(
                [sys.executable, "-c", CURATOR, str(config), str(owned[n]), "3" if n == 0 else "0"],
                cwd=REPO, stdout=log, stderr=subprocess.STDOUT))
    try:
        started = time.monotonic()

        def settled() -> bool:  # every pair owned by exactly one curator, each curator owning some
            seen = [_read_owned(path) for path in owned]
            return all(seen) and sorted(p for s in seen for p in s or []) == sorted(partitions)

        _wait_for("the group to settle", settled, 45, logs)
        victim_pairs = _read_owned(owned[0])
        print(f"group settled in {time.monotonic() - started:.1f}s: {[_read_owned(p) for p in owned]}")

        pairs = event_pairs(600)
        publish(settings, interleaved(pairs))
        _wait_for("the victim to die mid-batch", lambda: procs[0].poll() is not None, 30, logs)
        assert procs[0].returncode == -signal.SIGKILL, logs[0].read_text()[-3000:]
        assert "dying before commit" in logs[0].read_text()
        dataset = partitioned_dataset(settings)  # the victim's pairs stand still until the group rebalances
        written_parts = {path for path in dataset.parts()
                         for pair in victim_pairs or [] if f"/part-p{pair:04d}-" in path}
        uncommitted = written_parts - {part.path for commit in dataset.commits() for part in commit.files}
        assert uncommitted, "the victim died with no part written: not mid-batch"
        # its rows are on the store, and no reader sees them (until a survivor curates them again and commits)
        unseen = {event for path in uncommitted
                  for event in dataset.curated.read_part(path, columns=["event_id"])["event_id"].to_pylist()}
        assert unseen and unseen.isdisjoint(row.event_id for row in _rows(settings))
        died = time.monotonic()

        _wait_for("every rating curated", lambda: len(_rows(settings)) >= len(pairs), 60, logs)
        print(f"victim {victim_pairs} died; all {len(pairs)} curated {time.monotonic() - died:.1f}s later "
              f"({time.monotonic() - started:.1f}s in all)")
        written = curated_dataset(settings)  # and what readers of manifest.json see, once the curators rewrote it
        _wait_for("manifest.json to name every part", lambda: sum(p.rows for p in written.manifest().files) ==
                  len(pairs), 15, logs)
        time.sleep(1.0)  # anything curated twice would show up now
        # each curator says how it is doing in its own file: the victim is gone, the survivors run, caught up
        _wait_for("the survivors to report no lag",
                  lambda: (health := read_health(settings)) is not None and health.lag_records == 0, 15, logs)
        curators = {h.pid: h for h in read_curators(settings)}
        assert curators[procs[0].pid].state == "stopped", curators
        assert [curators[proc.pid].state for proc in procs[1:]] == ["running", "running"], curators
        if store == "s3":  # the reports are beside the dataset: a pod sharing no volume with them sees them
            another_pod = Settings(home=tmp_path / "another-pod", feedback=settings.feedback.model_dump())
            assert {h.pid: h.state for h in read_curators(another_pod)} == {
                pid: h.state for pid, h in curators.items()}
    finally:
        stop_all(procs, timeout_s=20)

    rows = _rows(settings)
    ids = [row.event_id for row in rows]
    assert len(ids) - len(set(ids)) == 0, "duplicated"
    assert {fb.event_id for _, fb in pairs} - set(ids) == set(), "lost"
    assert len(rows) == len(pairs)
    by_event = {row.event_id: row for row in rows}
    for pred, fb in pairs:  # each row joined to its own prediction
        row = by_event[fb.event_id]
        assert (row.request_id, row.prompt, row.rating) == (pred.request_id, pred.prompt, fb.rating)
    # keyed by request id: a prediction and its feedback came from the same partition number
    assert all(row.prediction_source.rsplit("/", 1)[1] == row.feedback_source.rsplit("/", 1)[1] for row in rows)
    assert len({row.feedback_source for row in rows}) == len(partitions)
    survivors = logs[1].read_text() + logs[2].read_text()
    for pair in victim_pairs or []:  # taken over from the victim's chain, its cache replayed from the topics
        assert f"event=pair_taken pair={pair} chain_end=" in survivors
    written_ids = curated_dataset(settings).read_table()["event_id"].to_pylist()  # via manifest.json
    assert sorted(written_ids) == sorted(ids)
    status = feedback_status(settings)
    assert status.curated == len(pairs) and set(status.positions) == {
        f"{topic}/{p}" for topic in (fs.predictions_topic, fs.feedback_topic) for p in partitions}
    assert not (settings.feedback_dir / "curator" / "state.db").exists()  # no SQLite anywhere
    if store == "s3":
        assert status.dataset == settings.dataset_uri and not (settings.feedback_dir / "dataset").exists()


def test_partitioned_curation_needs_kafka(tmp_path: Path) -> None:
    with pytest.raises(ValidationError, match=r"needs feedback\.kafka_bootstrap"):
        Settings(home=tmp_path, feedback={"curation": "partitioned"})


@pytest.mark.kafka
def test_a_curator_taking_over_finished_pairs_replays_them_and_writes_nothing_new(
    feedback_settings: Callable[..., Settings],
) -> None:
    """The chain's rule on a whole replay: with redelivered and resent feedback, late predictions, a restart."""
    settings = feedback_settings("kafka", curation="partitioned")
    pairs = event_pairs(200)
    events = interleaved(pairs)
    publish(settings, events + events[:60])  # the first 60 events delivered twice
    for attempt in range(2):  # the second curator takes every pair over from the end of its chain
        curator = PartitionedCurator(settings, session_timeout_ms=6000)
        try:
            result = curator.drain(timeout_s=120)
        finally:
            curator.close()
        assert result.curated == (len(pairs) if attempt == 0 else 0), result
        rows = _rows(settings)
        assert sorted(row.event_id for row in rows) == sorted(fb.event_id for _, fb in pairs)


class _NoBroker:
    def commit(self, offsets: object) -> None:
        pass


def _offline_curator(settings: Settings) -> PartitionedCurator:
    """A curator's pair logic without a consumer group: the test hands it records itself."""
    curator = PartitionedCurator.__new__(PartitionedCurator)
    curator.settings, curator._topics = settings, ("p", "f")
    curator.dataset = PartitionedDataset(settings.dataset_uri, "p", "f")
    curator._consumer = _NoBroker()  # type: ignore[assignment]
    return curator


def test_a_takeover_commits_nothing_until_both_partitions_reach_the_chains_end(tmp_path: Path) -> None:
    """One partition replayed ahead of the other must not let a commit claim offsets the other has not read."""
    settings = Settings(home=tmp_path)
    pairs = event_pairs(12)
    predictions = [(0, SourceRecord("p/0", i, i + 1, encode_event(pred))) for i, (pred, _) in enumerate(pairs)]
    feedback = [(1, SourceRecord("f/0", i, i + 1, encode_event(fb))) for i, (_, fb) in enumerate(pairs)]
    first = _offline_curator(settings)
    first._curate_pair(PairState(0, (0, 0), 0), predictions[:4] + feedback[:8], BatchResult())
    assert [c.end for c in first.dataset.commits(0)] == [(4, 8)]  # rows 0-3; feedback 4-7 waits

    second = _offline_curator(settings)
    state = PairState(0, (4, 8), 1)
    second._curate_pair(state, predictions + feedback[:6], BatchResult())  # feedback 4, 5 join: new rows
    assert len(state.pending) == 2 and len(second.dataset.commits(0)) == 1  # feedback 6, 7 not read yet
    second._curate_pair(state, feedback[6:], BatchResult())
    assert [c.end for c in second.dataset.commits(0)] == [(4, 8), (12, 12)]
    rows = curated_dataset(settings).read_table(second.dataset.manifest())["event_id"].to_pylist()
    assert sorted(rows) == sorted(fb.event_id for _, fb in pairs)


def test_the_manifest_is_published_less_often_as_listing_every_commit_takes_longer(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Publishing lists every commit (2 s for 10 000 on moto's server): a curator spends at most about a tenth of
    its time on it, whatever the dataset's size."""
    curator = _offline_curator(Settings(home=tmp_path))
    curator._manifest_written, curator._manifest_gap_s = float("-inf"), 0.0
    published: list[float] = []

    def slow_publish() -> None:
        time.sleep(0.05)  # a long listing
        published.append(time.monotonic())

    monkeypatch.setattr(curator.dataset, "publish_manifest", slow_publish)
    curator._publish_manifest_if_due(committed=True)
    assert len(published) == 1 and curator._manifest_gap_s >= 0.45
    curator._publish_manifest_if_due(committed=True)
    assert len(published) == 1  # a commit right after waits for the gap
    time.sleep(curator._manifest_gap_s)
    curator._publish_manifest_if_due(committed=True)
    assert len(published) == 2
    curator._publish_manifest_if_due(committed=False)
    assert len(published) == 2  # without a commit of its own: every MANIFEST_EVERY_S at most


@pytest.mark.parametrize("store", ["disk", "s3"])
def test_a_commit_is_created_once(store: str, tmp_path: Path, request: pytest.FixtureRequest,
                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """The second writer of a pair's batch from the same start is refused (a hard link on a disk, a conditional
    put on S3); its parts stay invisible."""
    on_store = _on_s3(request, monkeypatch) if store == "s3" else {}
    uri, options = str(on_store.get("dataset_uri", tmp_path)), on_store.get("dataset_storage_options")
    dataset = PartitionedDataset(uri, "p", "f", options)
    (pred, fb), = event_pairs(1)
    row = join(Located(fb, "f/0", 0), Located(pred, "p/0", 0), "demo")
    first = dataset.write_batch(0, (0, 0), (1, 1), [row], 0)
    with pytest.raises(CommitConflict):
        dataset.write_batch(0, (0, 0), (2, 3), [row], 0)
    assert dataset.fs.isfile(dataset.curated.path(commit_name(0, (0, 0))))
    assert [c.end for c in dataset.commits(0)] == [(1, 1)] and dataset.manifest().files == first.files
    assert len(dataset.parts()) == 2
    assert len(dataset.remove_orphans(0, dataset.commits(0))) == 1  # never committable: removed
    assert dataset.curated.read_table(dataset.manifest()).num_rows == 1
    assert len(dataset.parts()) == 1
    dataset.publish_manifest()  # and what a retrain, the scheduler and the canary read there
    reader = CuratedDataset(uri, options)
    assert reader.rows_by_task() == {"demo": 1} and [r.event_id for r in reader.examples()] == [fb.event_id]
    assert reader.ratings("demo", datetime(2000, 1, 1, tzinfo=UTC), anonymous=True) == [
        (pred.adapter_version, float(fb.rating), fb.rater)]
    settings = Settings(home=tmp_path / "home", feedback={
        "curation": "partitioned", "kafka_bootstrap": "127.0.0.1:9", "dataset_uri": uri,
        "dataset_storage_options": options or {}})
    assert author_of(settings, fb.event_id) == fb.rater and events_matching(settings, rater=fb.rater) == [fb.event_id]


@pytest.mark.parametrize("store", ["disk", "s3"])
def test_an_erasure_of_partitioned_output_reaches_every_reader(store: str, tmp_path: Path,
                                                              request: pytest.FixtureRequest,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    """`flywheel users forget` on partitioned output: the part that held the user's rows is rewritten, the
    erasure's record laid over the commits (which never change) says what it holds now, and every reader (the
    chains, manifest.json, the rows, the counts the scheduler reads) sees the user gone."""
    on_store = _on_s3(request, monkeypatch) if store == "s3" else {}
    settings = Settings(home=tmp_path / "home", feedback={
        "curation": "partitioned", "kafka_bootstrap": "127.0.0.1:9",
        "dataset_uri": str(on_store.get("dataset_uri", tmp_path / "dataset")),
        "dataset_storage_options": on_store.get("dataset_storage_options", {})})
    writer = partitioned_dataset(settings)
    pairs = event_pairs(3)
    rows = [join(Located(fb, "f/0", i), Located(pred, "p/0", i), "demo") for i, (pred, fb) in enumerate(pairs)]
    writer.write_batch(0, (0, 0), (3, 3), rows, 0)
    writer.publish_manifest()

    report = forget(settings, pairs[1][1].rater)
    assert (report.curated_rows, report.parts_rewritten) == (1, 1), report
    assert [part.rows for part in partitioned_dataset(settings).manifest().files] == [2]  # a fresh reader
    assert [commit.files[0].rows for commit in writer.commits(0)] == [3]  # the commit is as it was
    reader = curated_dataset(settings)  # through manifest.json
    assert reader.rows_by_task() == {"demo": 2}
    assert sorted(r.event_id for r in reader.examples()) == sorted([pairs[0][1].event_id, pairs[2][1].event_id])
    writer.publish_manifest()  # a curator publishing later keeps the erasure
    assert curated_dataset(settings).rows_by_task() == {"demo": 2}


@pytest.mark.kafka
def test_the_curation_bench_at_a_small_size_curates_every_rating_in_both_runs(
    feedback_settings: Callable[..., Settings],
) -> None:
    """`flywheel bench curation` (3 000 ratings by default) on the session's broker."""
    from loadtests.bench_curation import run_curation_bench

    report = run_curation_bench(feedback_settings("kafka"), ratings=200, say=print, timeout_s=90, commits=(20, 60))
    assert report.one_curator_per_s > 0 and report.three_curators_per_s > 0 and report.published_per_s > 0
    assert report.three_over_one == report.three_curators_per_s / report.one_curator_per_s
    assert [m.commits for m in report.manifest] == [20, 60] and all(m.publish_s > 0 for m in report.manifest)
