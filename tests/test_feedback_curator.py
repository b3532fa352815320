"""The curator: every rating curated exactly once, joined, masked, through duplicates and crashes."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from typer.testing import CliRunner

from feedback import cli
from feedback.curator import Curator, CuratorState, feedback_status
from feedback.dataset import CuratedDataset, PartFile
from feedback.local_log import RecordLog
from feedback.pii import mask_event, mask_pii, pseudonym
from feedback.schemas import CuratedExample, FeedbackEvent, PredictionEvent, decode_event, encode_event
from feedback.supervisor import CuratorHealth, read_curators, read_health, supervise
from flywheel.config import Settings
from loadtests.hostile import ADVERSARIAL_UNITS, repeated
from tests.kafka_broker import BACKENDS, event_pairs, feedback, interleaved, prediction, publish, write_config
from tests.timing import fastest_run_s

REPO = Path(__file__).resolve().parents[1]


def _curate(settings: Settings) -> list[CuratedExample]:
    curator = Curator(settings)
    try:
        curator.drain(timeout_s=120)
        return curator.dataset.examples()
    finally:
        curator.close()


def _assert_exactly_once(rows: list[CuratedExample], pairs: list[tuple[PredictionEvent, FeedbackEvent]]) -> None:
    assert len(rows) == len(pairs)
    assert len({row.event_id for row in rows}) == len(rows), "duplicates in the dataset"
    by_event = {row.event_id: row for row in rows}
    for pred, fb in pairs:  # each row joined to its own prediction
        row = by_event[fb.event_id]
        assert (row.request_id, row.adapter_version, row.prompt, row.rating, row.prediction_ts) == (
            pred.request_id, pred.adapter_version, pred.prompt, fb.rating, pred.timestamp)


@pytest.mark.parametrize("backend", BACKENDS)
def test_every_feedback_is_curated_once_and_joined(backend: str, feedback_settings: Callable[..., Settings]) -> None:
    settings = feedback_settings(backend)
    pairs = event_pairs(1000)
    publish(settings, interleaved(pairs))  # some predictions only after all the feedback
    started = time.monotonic()
    rows = _curate(settings)
    print(f"curated {len(rows)} rows in {time.monotonic() - started:.2f}s ({backend})")
    _assert_exactly_once(rows, pairs)

    status = feedback_status(settings)
    assert (status.received, status.curated, status.unmatched, status.duplicates) == (1000, 1000, 0, 0)
    manifest = CuratedDataset(settings.feedback_dir / "dataset").manifest()
    assert sum(part.rows for part in manifest.files) == 1000 and manifest.positions == status.positions
    day = datetime.now(UTC).strftime("%Y-%m-%d")
    assert all(part.path.startswith(f"day={day}/part-") for part in manifest.files)
    assert all(part.rows <= settings.feedback.curator_batch_size for part in manifest.files)
    assert all(part.tasks is not None and sum(part.tasks.values()) == part.rows for part in manifest.files)
    assert CuratedDataset(settings.feedback_dir / "dataset").rows_by_task() == dict(Counter(r.task for r in rows))

    # Lineage: rows are selectable by the positions a snapshot covers.
    dataset = CuratedDataset(settings.feedback_dir / "dataset")
    assert dataset.read_table(until=manifest.positions).num_rows == 1000
    assert dataset.read_table(until={}).num_rows == 0
    first = manifest.files[0]
    assert dataset.read_table(until=first.positions).num_rows == first.rows


@pytest.mark.parametrize("backend", BACKENDS)
def test_duplicates_are_curated_once(backend: str, feedback_settings: Callable[..., Settings]) -> None:
    settings = feedback_settings(backend)
    pairs = event_pairs(100)
    events = interleaved(pairs)
    resubmitted = [fb.model_copy(update={"timestamp": datetime.now(UTC)}) for _, fb in pairs[:30]]
    publish(settings, events + events[:50] + resubmitted)  # redelivery, and the client sending again
    _assert_exactly_once(_curate(settings), pairs)
    publish(settings, events)  # everything again, to a restarted curator
    _assert_exactly_once(_curate(settings), pairs)
    status = feedback_status(settings)
    redelivered = sum(isinstance(event, FeedbackEvent) for event in events[:50])
    assert status.received == 100 and status.duplicates == redelivered + 30 + 100


def _parts_rows(settings: Settings) -> int:
    return sum(part.rows for part in CuratedDataset(settings.feedback_dir / "dataset").manifest().files)


@pytest.mark.parametrize("backend", BACKENDS)
def test_curator_killed_mid_run_loses_and_duplicates_nothing(
    backend: str, feedback_settings: Callable[..., Settings], tmp_path: Path
) -> None:
    settings = feedback_settings(backend, curator_batch_size=10, curator_flush_s=0.05)
    pairs = event_pairs(1000)
    publish(settings, interleaved(pairs))
    config = write_config(settings, tmp_path / "flywheel.yaml")
    with (tmp_path / "curator.log").open("w") as log:
        proc = subprocess.Popen([sys.executable, "-m", "feedback.cli", "curator", "-c", str(config)],
                                cwd=REPO, stdout=log, stderr=subprocess.STDOUT)
        try:
            deadline = time.monotonic() + 60
            while _parts_rows(settings) < 100 and time.monotonic() < deadline and proc.poll() is None:
                time.sleep(0.01)
        finally:
            proc.send_signal(signal.SIGKILL)
            proc.wait(timeout=10)
    before = _parts_rows(settings)
    assert 100 <= before < 1000, (tmp_path / "curator.log").read_text()[-3000:]

    _assert_exactly_once(_curate(settings), pairs)  # the restarted curator finishes the job


class _Crash(BaseException):
    """Stands for the process dying: nothing after it runs, no except-Exception handler sees it."""


@pytest.mark.parametrize("backend", BACKENDS)
def test_crash_between_parquet_write_and_commit_is_replayed_exactly(
    backend: str, feedback_settings: Callable[..., Settings], monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    settings = feedback_settings(backend)
    pairs = event_pairs(300)
    publish(settings, interleaved(pairs))
    curator = Curator(settings)
    parts = 0
    add_part = CuratorState.add_part

    def crash_after_second_part(self: CuratorState, part: PartFile) -> None:
        nonlocal parts
        add_part(self, part)
        parts += 1
        if parts == 2:  # the part is on disk; the transaction listing it never commits
            raise _Crash

    monkeypatch.setattr(CuratorState, "add_part", crash_after_second_part)
    with pytest.raises(_Crash):
        curator.drain(timeout_s=120)
    curator.close()  # the dead process's consumer leaves the group
    monkeypatch.undo()
    root = settings.feedback_dir / "dataset"
    dataset = CuratedDataset(root)
    on_disk = {p.relative_to(root).as_posix() for p in root.glob("day=*/*.parquet")}
    listed = {part.path for part in dataset.manifest().files}
    assert listed < on_disk, "the crashed batch left parts the manifest does not name"

    with caplog.at_level("WARNING", logger="flywheel.feedback.curator"):
        rows = _curate(settings)
    assert "event=uncommitted_parts_removed" in caplog.text
    _assert_exactly_once(rows, pairs)


def test_unmatched_feedback_is_reported_until_its_prediction_arrives(
    feedback_settings: Callable[..., Settings], tmp_path: Path
) -> None:
    settings = feedback_settings("local")
    pairs = event_pairs(15)
    orphans = pairs[:10]
    hour_ago = datetime.now(UTC) - timedelta(hours=1)
    late_feedback = [fb.model_copy(update={"timestamp": hour_ago}) if i == 0 else fb
                     for i, (_, fb) in enumerate(orphans)]
    publish(settings, [e for pair in pairs[10:] for e in pair] + late_feedback)
    assert len(_curate(settings)) == 5

    status = feedback_status(settings)
    assert (status.received, status.curated, status.unmatched) == (15, 5, 10)
    assert status.unmatched_oldest_age_s is not None and status.unmatched_oldest_age_s >= 3600
    config = write_config(settings, tmp_path / "flywheel.yaml")
    shown = CliRunner().invoke(cli.app, ["status", "-c", str(config)])
    assert shown.exit_code == 0 and "unmatched 10 (oldest 36" in shown.output

    publish(settings, [pred for pred, _ in orphans])  # the predictions finally arrive
    rows = _curate(settings)
    assert len(rows) == 15 and feedback_status(settings).unmatched == 0
    assert {r.event_id for r in rows} == {fb.event_id for _, fb in pairs}


def test_feedback_for_unknown_requests_cannot_fill_the_state(
    feedback_settings: Callable[..., Settings], tmp_path: Path
) -> None:
    """A client sends ratings for request ids that never existed: the waiting room stays bounded."""
    settings = feedback_settings("local", max_unmatched=50, unmatched_retention_s=1800)
    stale = [fb.model_copy(update={"timestamp": datetime.now(UTC) - timedelta(hours=1)}) for _, fb in event_pairs(20)]
    flood = [fb for _, fb in event_pairs(200)]
    publish(settings, stale + flood)
    _curate(settings)
    status = feedback_status(settings)
    assert status.unmatched == 50 and status.unmatched_dropped == 170  # the stale 20, then the oldest 150
    state = CuratorState(settings.feedback_dir / "curator" / "state.db")
    try:
        waiting = {e.event.event_id for fb in flood[-50:] for e in state.take_unmatched(fb.request_id)}
    finally:
        state.close()
    assert waiting == {fb.event_id for fb in flood[-50:]}  # the newest are the ones kept
    shown = CliRunner().invoke(cli.app, ["status", "-c", str(write_config(settings, tmp_path / "f.yaml"))])
    assert "170 dropped" in shown.output and "on disk: log " in shown.output
    assert status.disk_bytes["curator"] > 0 and status.disk_bytes["log"] > 0


PII = {
    "id": "11010519900307128X",  # check digit valid
    "phone": "+86 138-1234-5678",
    "email": "zhang.san@example.com",
    "card": "6222 0212 3456 7892 009",  # UnionPay, 19 digits, Luhn-valid
}


@pytest.mark.parametrize(("text", "masked"), [
    ("身份证110105199003071239，手机13912345678", "身份证[ID]，手机[PHONE]"),
    ("order 110105199003071234 ships", None),  # an ID's shape, but its check digit is wrong
    ("order 110001199001010001 ships", None),  # a valid check digit, but 110001 is no county (stdnum: KeyError)
    (f"ID {PII['id']} phone {PII['phone']}", "ID [ID] phone [PHONE]"),
    ("mail 13800138000@163.com now", "mail [EMAIL] now"),
    (f"card {PII['card']} or 4111-1111-1111-1111", "card [CARD] or [CARD]"),
    ("order 4111111111111112 is not Luhn-valid", "order 4111111111111112 is not Luhn-valid"),
    ("Price ¥1,299.00 (+3.5%) in 2024, 12 units, ts 1700000000000", None),
    ("pi is 3.14159265358979323846", None),
    ("call 0086 15912345678, or 8615912345678.", "call [PHONE], or [PHONE]."),
])
def test_mask_pii(text: str, masked: str | None) -> None:
    assert mask_pii(text) == (text if masked is None else masked)


ADVERSARIAL_LENGTH = 64_000


@pytest.mark.parametrize("unit", ADVERSARIAL_UNITS)
def test_mask_pii_is_linear_on_adversarial_text(unit: str) -> None:
    """64 000 characters of any repeated shape mask in tens of milliseconds (the email search took ~8 s on letters)."""
    text = repeated(unit, ADVERSARIAL_LENGTH)
    assert fastest_run_s(lambda: mask_pii(text)) < 0.5
    assert fastest_run_s(lambda: mask_pii(f"card {PII['card']} {PII['email']} " + text)) < 0.5


def test_many_valid_resident_ids_look_their_region_up_once(monkeypatch: pytest.MonkeyPatch) -> None:
    """`ric.is_valid` per match searched the region database for each of 3 000 IDs (over 100 ms)."""
    from stdnum.cn import ric

    lookups: list[str] = []
    get_birth_place = ric.get_birth_place
    monkeypatch.setattr(ric, "get_birth_place", lambda number: lookups.append(number) or get_birth_place(number))
    assert mask_pii(" ".join([PII["id"]] * 3000)) == " ".join(["[ID]"] * 3000)
    assert len(lookups) <= 1  # (none when an earlier test looked this region and year up)


def test_the_resident_id_check_agrees_with_stdnum() -> None:
    """The inline check (check digit, date, then a cached place) says what `ric.is_valid` says, on numbers of the
    ID's shape with a mostly valid check digit (so the date and place checks decide), except where it raises."""
    import random

    from stdnum.cn import ric

    from feedback.pii import _is_resident_id

    rng, agreed = random.Random(27), 0
    for _ in range(5000):
        region = rng.choice(["110105", "652901", "110001", "999999"]) if rng.random() < 0.3 else str(
            rng.randint(100000, 999999))
        body = (f"{region}{rng.randint(1800, 2099)}{rng.randint(1, 12):02d}{rng.randint(1, 31):02d}"
                f"{rng.randint(0, 999):03d}")
        number = body + (ric.calc_check_digit(body + "0") if rng.random() < 0.8 else rng.choice("0123456789Xx"))
        number = number.lower() if rng.random() < 0.2 else number
        try:
            expected = ric.is_valid(number)
        except KeyError:  # a region known only as a province: no county, so no ID
            expected = False
        agreed += _is_resident_id(number) == expected
    assert agreed == 5000


def test_masking_an_event_twice_changes_nothing() -> None:
    rid = uuid.uuid4().hex
    for event in (prediction(rid, prompt=f"card {PII['card']}", answer=PII["phone"]),
                  feedback(rid, correction=PII["id"], user_id=PII["phone"], tenant_id=PII["email"])):
        once = mask_event(event)
        assert mask_event(once) == once and once.event_type == event.event_type and once != event
        assert not any(value in once.model_dump_json() for value in PII.values())


def test_pii_is_masked_before_anything_is_stored(feedback_settings: Callable[..., Settings], tmp_path: Path) -> None:
    settings = feedback_settings("local")
    ordinary = "revenue rose 3.5% to ¥1,299.00 in 2024"
    text_id, chat_id, orphan_id = (uuid.uuid4().hex for _ in range(3))
    events: list[PredictionEvent | FeedbackEvent] = [
        prediction(text_id, prompt=f"My ID is {PII['id']}, {ordinary}", answer=f"Call {PII['phone']}",
                   reasoning=f"user id {PII['id']}"),
        feedback(text_id, correction=f"Pay to {PII['card']}", comment=f"write to {PII['email']}",
                 user_id=PII["email"], tenant_id="acme"),
        prediction(chat_id, prompt=None, messages=[{"role": "system", "content": "be brief"},
                                                   {"role": "user", "content": f"card {PII['card']}; {ordinary}"}]),
        feedback(chat_id, thumb="down"),
        feedback(orphan_id, correction=f"phone {PII['phone']}"),  # waits in the state DB, masked too
    ]
    publish(settings, events)
    rows = {row.request_id: row for row in _curate(settings)}

    text_row, chat_row = rows[text_id], rows[chat_id]
    assert text_row.prompt == f"My ID is [ID], {ordinary}" and text_row.answer == "Call [PHONE]"
    assert text_row.reasoning == "user id [ID]"
    assert text_row.correction == "Pay to [CARD]" and text_row.comment == "write to [EMAIL]"
    assert text_row.user_id == pseudonym(PII["email"]) != pseudonym("someone.else@example.com")
    assert text_row.tenant_id == "acme"  # an ordinary id stays as it is
    assert chat_row.prompt_kind == "messages"
    assert json.loads(chat_row.prompt) == [{"role": "system", "content": "be brief"},
                                           {"role": "user", "content": f"card [CARD]; {ordinary}"}]

    out = tmp_path / "export.jsonl"
    exported = CliRunner().invoke(cli.app, ["export", "--out", str(out), "-c",
                                            str(write_config(settings, tmp_path / "c.yaml"))])
    assert exported.exit_code == 0 and "exported 2 rows" in exported.output
    assert len(out.read_text().splitlines()) == 2
    stored = [out, *(settings.feedback_dir / "curator").iterdir(), *(settings.feedback_dir / "dataset").rglob("*.*")]
    for path in stored:  # dataset, manifest, curator state (with its WAL), export
        data = path.read_bytes()
        for value in (*PII.values(), "138-1234-5678", "zhang.san"):
            assert value.encode() not in data, f"{value} stored unmasked in {path}"


def test_records_that_are_not_events_are_kept_aside(feedback_settings: Callable[..., Settings]) -> None:
    settings = feedback_settings("local")
    (pred, fb), = event_pairs(1)
    newer = encode_event(fb).replace(b'"schema_version":1', b'"schema_version":2')
    log = RecordLog(settings.feedback_dir / "log" / f"{settings.feedback.feedback_topic}.log")
    for record in (b"not json at all", newer, encode_event(fb)):
        log.append(record)
    log.close()
    publish(settings, [pred])
    assert len(_curate(settings)) == 1
    status = feedback_status(settings)
    assert (status.rejected, status.curated, status.received) == (2, 1, 1)


def test_cli_curator_once_status_and_errors(feedback_settings: Callable[..., Settings], tmp_path: Path) -> None:
    settings = feedback_settings("local")
    publish(settings, interleaved(event_pairs(40)))
    config = str(write_config(settings, tmp_path / "flywheel.yaml"))
    runner = CliRunner()

    once = runner.invoke(cli.app, ["curator", "--once", "--json", "-c", config])
    assert once.exit_code == 0, once.output
    assert json.loads(once.stdout)["curated"] == 40

    status = runner.invoke(cli.app, ["status", "--json", "-c", config])
    report = json.loads(status.stdout)
    assert (report["backend"], report["received"], report["curated"], report["spooled"]) == ("local", 40, 40, 0)
    assert report["positions"] == report["log_end"]

    missing = runner.invoke(cli.app, ["status", "-c", str(tmp_path / "nope.yaml")])
    assert missing.exit_code == 1 and "error: invalid configuration" in missing.output


def test_no_broker_and_no_version_leaves_the_curator_waiting_not_dead(
    feedback_settings: Callable[..., Settings],
) -> None:
    """The documented production default (version auto-detected) with nothing at the address: the
    supervisor keeps retrying and says why, and stops cleanly when told to."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        nobody = f"127.0.0.1:{s.getsockname()[1]}"
    settings = feedback_settings("local", kafka_bootstrap=nobody, kafka_api_version=None)
    stop = threading.Event()
    supervisor = threading.Thread(target=supervise, args=(settings, stop))
    supervisor.start()
    try:
        deadline = time.monotonic() + 60
        while (health := read_health(settings)) is None or health.state != "waiting":
            assert time.monotonic() < deadline, health
            time.sleep(0.2)
        assert supervisor.is_alive() and nobody in health.detail and health.retries >= 1
        status = feedback_status(settings)
        assert status.curator is not None and status.curator.state == "waiting"
    finally:
        stop.set()
        supervisor.join(timeout=30)
    assert not supervisor.is_alive() and read_health(settings).state == "stopped"


def test_the_supervisor_rebuilds_a_curator_that_failed_to_start_or_crashed(
    feedback_settings: Callable[..., Settings], monkeypatch: pytest.MonkeyPatch,
) -> None:
    from feedback import supervisor as module

    monkeypatch.setattr(module, "FIRST_RETRY_S", 0.01)
    settings = feedback_settings("local")
    stop = threading.Event()
    attempts: list[str] = []

    class Flaky:
        def run(self, stop_event: threading.Event) -> None:
            attempts.append("ran")
            if len(attempts) < 4:
                raise RuntimeError("a bug")
            assert read_health(settings).state == "running"
            stop_event.set()

        def close(self) -> None:
            attempts.append("closed")

    def build(_settings: Settings) -> Flaky:
        if attempts.count("refused") < 2:
            attempts.append("refused")
            raise ConnectionError("no broker yet")
        return Flaky()

    supervise(settings, stop, build=build)
    assert attempts == ["refused", "refused", "ran", "closed", "ran", "closed"]
    assert read_health(settings).state == "stopped"


def test_each_curator_reports_in_its_own_file_and_a_gone_or_silent_one_counts_as_stopped(
    feedback_settings: Callable[..., Settings], monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Partitioned curation runs curators on several hosts. Each writes its own health file; /healthz sums the
    running ones' lag. One on this host whose process is gone, or one elsewhere that has been silent too long,
    counts as stopped, and a new supervisor here removes this host's gone ones."""
    from feedback import supervisor as module

    settings = feedback_settings("local")
    fs, folder = module.health_store(settings)
    fs.makedirs(folder, exist_ok=True)
    now = time.time()

    def write(name: str, **fields: object) -> None:
        health = CuratorHealth.model_validate({"state": "running", "since": now - 60, "updated": now, **fields})
        fs.pipe_file(f"{folder}/{name}.json", health.model_dump_json().encode())

    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    write("here-dead", pid=int(dead.stdout), host=socket.gethostname(), lag_records=7)
    write("node-b", pid=1, host="node-b", lag_records=30, lag_seconds=2.0)
    write("node-c", pid=1, host="node-c", lag_records=12, lag_seconds=9.0, updated=now - 5)
    write("node-d", pid=1, host="node-d", lag_records=99, updated=now - module.SILENT_S - 1)
    states = {h.host: h.state for h in read_curators(settings)}
    assert states == {socket.gethostname(): "stopped", "node-b": "running", "node-c": "running",
                      "node-d": "stopped"}, states
    whole = read_health(settings)
    assert (whole.state, whole.host, whole.lag_records, whole.lag_seconds) == ("running", "node-b", 42, 9.0)

    stop = threading.Event()
    stop.set()  # the supervisor starts, finds nothing to do, and says so
    supervise(settings, stop, build=lambda _: pytest.fail("not built: told to stop"))
    mine = [h for h in read_curators(settings) if h.host == socket.gethostname()]
    assert [(h.pid, h.state) for h in mine] == [(os.getpid(), "stopped")], mine  # the dead one's file is gone
    assert {h.host for h in read_curators(settings)} == {socket.gethostname(), "node-b", "node-c", "node-d"}


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_running_curator_catches_up_with_a_burst_of_2000_predictions(
    backend: str, feedback_settings: Callable[..., Settings],
) -> None:
    """The keeper's curator (supervised, in a thread) and a burst the serving plane could send in seconds: it
    curates all of it, exactly once; publishing and curating it take under 5 s of this process's CPU (a busy
    box moves wall time, not CPU time); and it reports no lag afterwards."""
    settings = feedback_settings(backend)
    stop = threading.Event()
    curating = threading.Thread(target=supervise, args=(settings, stop), daemon=True)
    curating.start()
    try:
        deadline = time.monotonic() + 60
        while (read_health(settings) is None or read_health(settings).state != "running") \
                and time.monotonic() < deadline:
            time.sleep(0.1)
        pairs = event_pairs(2000)
        rated = pairs[::10]  # one answer in ten is rated, as on a busy service
        started_cpu, started = time.process_time(), time.monotonic()
        publish(settings, [event for prediction_, feedback_ in pairs
                           for event in ((prediction_, feedback_) if (prediction_, feedback_) in rated
                                         else (prediction_,))])
        published = time.monotonic()
        while feedback_status(settings).curated < len(rated) and time.monotonic() < published + 120:
            time.sleep(0.05)
        caught_up, cpu_s = time.monotonic(), time.process_time() - started_cpu
        status = feedback_status(settings)
        print(f"{backend}: 2000 predictions + {len(rated)} ratings published in {published - started:.2f}s, "
              f"curated {caught_up - published:.2f}s after the burst, {cpu_s:.2f}s CPU in all")
        assert (status.received, status.curated, status.duplicates) == (len(rated), len(rated), 0)
        assert cpu_s < 5.0
        deadline = time.monotonic() + 30
        while (health := read_health(settings)).lag_records and time.monotonic() < deadline:
            time.sleep(0.2)
        assert health.lag_records == 0 and health.lag_seconds == 0, health
    finally:
        stop.set()
        curating.join(timeout=60)


def test_a_retrain_reads_only_the_newest_rows_it_asks_for(feedback_settings: Callable[..., Settings]) -> None:
    """`newest` stops reading at the newest parts: a long history does not grow a retrain's memory."""
    settings = feedback_settings("local")
    events = []
    for i, (pred, fb) in enumerate(event_pairs(250)):
        events += [pred.model_copy(update={"task": "faq" if i % 5 == 0 else "demo"}), fb]
    publish(settings, events)
    every = _curate(settings)
    dataset = CuratedDataset(settings.feedback_dir / "dataset")
    assert len(dataset.manifest().files) >= 3
    assert dataset.examples(newest=120) == every[-120:]
    faq = [row for row in every if row.task == "faq"]
    assert dataset.examples(task="faq", newest=7) == faq[-7:]
    assert dataset.examples(newest=10_000) == every


def test_the_local_log_gives_back_the_space_of_curated_records(feedback_settings: Callable[..., Settings]) -> None:
    """Retention never drops what the curator has not read, and positions stay valid across the hole."""
    settings = feedback_settings("local", log_retention_bytes=0)
    filler = "shares rose on strong demand " * 40  # ~1 KB prompts: a few MB of log
    pairs = [(pred.model_copy(update={"prompt": f"{i} {filler}"}), fb)
             for i, (pred, fb) in enumerate(event_pairs(3000))]
    publish(settings, [e for pair in pairs for e in pair])
    log_path = settings.feedback_dir / "log" / f"{settings.feedback.predictions_topic}.log"
    before = RecordLog(log_path)
    size, on_disk = before.size(), before.disk_bytes()
    before.close()
    assert len(_curate(settings)) == 3000
    after = RecordLog(log_path)
    try:
        assert after.size() == size and after.disk_bytes() < on_disk / 4, (size, on_disk, after.disk_bytes())
        survivors = after.read(0, 10_000)  # a reader starting in the hole skips it
        assert 0 < len(survivors) < 3000 and all(decode_event(r.value) for r in survivors)
    finally:
        after.close()
    more = [(pred.model_copy(update={"prompt": f"late {i}"}), fb) for i, (pred, fb) in enumerate(event_pairs(50))]
    publish(settings, [e for pair in more for e in pair])
    assert len(_curate(settings)) == 3050  # positions past the hole still work
