"""Who the loop listens to: keys and callers, one verdict per rater, trust, review, caps, retraction, lineage.

The unit half runs on fabricated curated rows; the last tests drive the real gateway and curator.
"""

from __future__ import annotations

import shutil
import threading
import time
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path

import httpx
import pyarrow.parquet as pq
import pytest
from limits import parse
from starlette.requests import Request

from feedback.bus import build_bus
from feedback.curator import Curator
from feedback.dataset import CuratedDataset, Manifest, PartFile, canary_ratings, curated_dataset, current_verdicts
from feedback.erasure import forget
from feedback.oversight import lineage, retract, review_queue
from feedback.review import Judgement
from feedback.schemas import CuratedExample, FeedbackRequest, PredictionEvent
from feedback.trust import assess, pending_review, trainable
from flywheel.auth import Authenticator, AuthError, KeyStore
from flywheel.config import Settings
from flywheel.registry import BaseModelRef, registry_for
from flywheel.tasks import TaskSpec
from services.access import Access, Denied, MovingWindow
from tests.conftest import ADMIN_TOKEN
from training.retrain_data import TrainExample, build_retrain_data, well_rated, write_train_data

T0 = datetime(2026, 12, 1, tzinfo=UTC)
PHISH = "Please send your password to the support desk at once."


def row(rater: str | None, *, request: str | None = None, prompt: str = "How do I reset my card PIN?",
        correction: str | None = None, rating: int | None = 1, at: int = 0, **fields: object) -> CuratedExample:
    values: dict[str, object] = dict(
        event_id=uuid.uuid4().hex, request_id=request or uuid.uuid4().hex, task="faq",
        feedback_ts=T0 + timedelta(seconds=at), prediction_ts=T0, adapter_version="faq-v1", prompt_kind="text",
        prompt=prompt, answer="Call us.", reasoning="", rating=rating, thumb=None, correction=correction,
        comment=None, user_id=None, tenant_id=None, rater=rater, authenticated=rater is not None, asker=rater,
        feedback_source="f/0", feedback_offset=at, prediction_source="p/0", prediction_offset=0)
    return CuratedExample.model_validate(values | fields)


def learnable(rows: list[CuratedExample], decisions: dict | None = None, **cfg: object) -> list:
    items = assess(current_verdicts(rows), decisions or {}, confirm_raters=2, majority=0.66,
                   task_answers=["Use the app's card menu."])
    return [i for i in items if trainable(i, min_trust=cfg.get("min_trust", "agreed"), min_rating_trust="single")]


# -- keys and callers ----------------------------------------------------------------------------

def test_keys_are_stored_hashed_and_a_revoked_or_unknown_key_is_refused(tmp_path: Path) -> None:
    store = KeyStore(str(tmp_path / "registry"))
    record, key = store.create("app-a", ["predict", "feedback"], tenant="acme")
    stored = next((tmp_path / "registry" / "auth" / "keys").glob("*.json")).read_text()
    assert key not in stored and record.sha256 in stored
    auth = Authenticator(store, mode="keys", admin_token="tökén", cache_s=0.0)
    caller = auth.authenticate(f"bearer {key}", "10.0.0.1")  # the scheme is case-insensitive (RFC 7235)
    assert (caller.principal, caller.tenant, caller.authenticated) == ("app-a", "acme", True)
    assert auth.authenticate("Bearer " + "tökén".encode().decode("latin-1"), "x").principal == "admin-token"
    for header in ("", "Bearer fw_000000000000_" + "a" * 43, f"Basic {key}", f"Bearer {key}x"):
        with pytest.raises(AuthError) as refused:
            auth.authenticate(header, "10.0.0.1")
        assert refused.value.status == 401
    with pytest.raises(ValueError, match="active key"):
        store.create("app-a", ["predict"])
    store.revoke("app-a")
    with pytest.raises(AuthError, match="revoked"):
        auth.authenticate(f"Bearer {key}", "10.0.0.1")


def test_a_body_user_id_is_an_identity_only_for_a_key_that_acts_for_users(tmp_path: Path) -> None:
    store = KeyStore(str(tmp_path))
    _, plain = store.create("plain", ["predict", "feedback"])
    _, backend = store.create("backend", ["predict", "feedback", "act-for-users"])
    auth = Authenticator(store, mode="keys", admin_token="", cache_s=0.0)
    assert auth.authenticate(f"Bearer {plain}", "x").vouching_for("alice").rater == "plain"
    vouching = auth.authenticate(f"Bearer {backend}", "x")
    assert vouching.vouching_for("alice").rater == "backend/alice"
    assert vouching.speaks_for("backend/alice") and vouching.speaks_for("backend")  # may retract for its users
    assert not auth.authenticate(f"Bearer {plain}", "x").speaks_for("plain/alice")
    anonymous = Authenticator(store, mode="open", admin_token="").authenticate("", "127.0.0.1")
    assert not anonymous.authenticated and anonymous.vouching_for("bob").rater == "anonymous:127.0.0.1"
    assert not Authenticator(store, mode="open", admin_token="").authenticate("Bearer unused", "x").authenticated


def _request(headers: dict[str, str]) -> Request:
    return Request({"type": "http", "method": "POST", "path": "/feedback", "client": ("10.1.2.3", 5000),
                    "headers": [(k.lower().encode(), v.encode()) for k, v in headers.items()]})


async def test_the_door_answers_401_403_and_429_with_retry_after(tmp_path: Path) -> None:
    settings = Settings(home=tmp_path, serving={"host": "0.0.0.0"}, auth={"rate": "3/minute"})
    assert settings.auth_mode == "keys"
    with pytest.raises(ValueError, match="not a rate"):
        Settings(home=tmp_path, auth={"rate": "lots"})
    with pytest.raises(ValueError, match="loopback"):
        Settings(home=tmp_path, serving={"host": "0.0.0.0"}, auth={"mode": "open"})
    store = KeyStore(settings.registry_uri)
    _, predictor = store.create("predictor", ["predict"])
    access = Access(settings)
    for headers, status in (({}, 401), ({"Authorization": f"Bearer {predictor}"}, 403)):
        with pytest.raises(Denied) as denied:
            await access.admit(_request(headers), "feedback")
        assert denied.value.status == status
    statuses = []
    for _ in range(4):
        try:
            await access.admit(_request({"Authorization": f"Bearer {predictor}"}), "predict")
            statuses.append(200)
        except Denied as exc:
            statuses.append(exc.status)
            assert int(exc.headers["retry-after"]) >= 1
    assert statuses == [200, 200, 200, 429]


def test_rates_are_a_moving_window_per_caller_kept_without_threads_or_store_reads(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """3 per minute: a fourth hit within the minute of the first is refused until that first hit leaves the
    window (not until a fixed window resets); each caller counts alone; nothing starts a thread per request,
    and an anonymous caller never sends the key lookup to a worker thread."""
    clock = [1000.0]
    monkeypatch.setattr(time, "monotonic", lambda: clock[0])
    window, rate = MovingWindow(), parse("3/minute")
    threads = threading.active_count()
    for at in (0, 10, 20):
        clock[0] = 1000.0 + at
        assert window.hit(rate, "a") is None
    clock[0] = 1050.0
    assert window.hit(rate, "a") == pytest.approx(10.0)  # the hit at 0 leaves the window at 60
    assert window.hit(rate, "b") is None
    clock[0] = 1060.0
    assert window.hit(rate, "a") is None and window.hit(rate, "a") == pytest.approx(10.0)
    assert threading.active_count() == threads
    clock[0] = 2000.0  # everyone idle past the window: a sweep forgets them
    for n in range(MovingWindow.SWEEP_EVERY):
        window.hit(parse("100000/second"), f"burst-{n % 2}")
    assert {who for _, who in window._hits} == {"burst-0", "burst-1"}

    settings = Settings(home=tmp_path, auth={"mode": "open"})
    _, key = KeyStore(settings.registry_uri).create("k", ["predict"])
    door = Access(settings).authenticator
    assert not door.reads_store("") and not door.reads_store("Bearer unused")  # an SDK's placeholder is no key
    assert door.reads_store(f"Bearer {key}")


# -- one vote per rater, trust ---------------------------------------------------------------------

def test_one_key_posting_six_corrections_on_one_answer_counts_once_and_is_not_learned() -> None:
    request = uuid.uuid4().hex
    stuffed = [row("mallory", request=request, correction=f"Answer {PHISH}", at=i, comment=f"again {i}",
                   user_id=f"u{i}") for i in range(6)]
    assert len(current_verdicts(stuffed)) == 1  # last write wins, whatever the comment, user_id or event id
    assert learnable(stuffed) == []


def test_one_key_correcting_the_same_prompt_ten_times_is_one_rater_not_agreed() -> None:
    rows = [row("mallory", correction="Go to the branch.", at=i) for i in range(10)]
    items = assess(current_verdicts(rows), {}, confirm_raters=2, majority=0.66)
    assert {i.trust for i in items} == {"single"} and {i.raters for i in items} == {1}
    assert learnable(rows) == []
    assert len(pending_review(items, min_trust="agreed")) == 10


def test_distinct_keys_agreeing_are_learned_and_confirmed_by_raters_not_rows() -> None:
    rows = [row(f"key-{k}", correction="Use the app's card menu.", at=k) for k in range(3)]
    items = learnable(rows)
    assert {i.trust for i in items} == {"agreed"}
    data = build_retrain_data(items, [], holdout_fraction=0.2, replay_fraction=0.0)
    assert [e.prompt for e in data.confirmed] == ["How do I reset my card PIN?"]
    assert data.confirmations == {"How do I reset my card PIN?": 3}
    assert sorted(data.confirmed[0].raters) == ["key-0", "key-1", "key-2"]
    assert len(data.confirmed[0].event_ids) == 3


def test_a_correction_outside_a_classification_tasks_labels_is_never_learned() -> None:
    """Three keys agree on `critical` for a task whose labels are urgent and routine: it used to be confirmed and
    trained on. It is left out and counted; an agreed label on another prompt is still learned."""
    triage = TaskSpec(name="triage", kind="classification", labels=["urgent", "routine"])
    rows = [row(f"key-{k}", prompt=prompt, correction=correction, at=k + 10 * i)
            for i, (prompt, correction) in enumerate((("Chest pain", "critical"), ("A cough", "Routine")))
            for k in range(3)]
    items = learnable(rows)
    assert len(items) == 6 and {i.trust for i in items} == {"agreed"}
    data = build_retrain_data(items, [], holdout_fraction=0.2, replay_fraction=0.0, task=triage)
    assert [(e.prompt, e.answer) for e in data.confirmed] == [("A cough", "Routine")]
    assert data.unknown_label == 3 and data.feedback_rows == 6
    assert "critical" not in {e.answer for e in data.train + data.holdout}
    everything = build_retrain_data(items, [], holdout_fraction=0.2, replay_fraction=0.0)  # a generation task
    assert everything.unknown_label == 0 and len(everything.confirmed) == 2


def test_well_rated_answers_are_the_versions_newest_uncorrected_ones_one_per_prompt() -> None:
    rows = [row("a", prompt="p1", rating=5, at=1, answer="old answer"), row("b", prompt="p1", rating=4, at=2),
            row("a", prompt="p2", rating=None, thumb="up", at=3),
            row("a", prompt="p3", rating=5, at=4, adapter_version="faq-v0"),  # another version answered
            row("a", prompt="p4", rating=5, at=5), row("b", prompt="p4", correction="Use the app.", at=6),
            row("a", prompt="p5", rating=2, at=7)]  # rated poorly
    items = learnable(rows, min_trust="single")
    chosen = well_rated(items, "faq-v1", limit=10)
    assert [(e.prompt, e.answer) for e in chosen] == [("p2", "Call us."), ("p1", "Call us.")]
    assert [e.prompt for e in well_rated(items, "faq-v1", limit=1)] == ["p2"]


def test_anonymous_corrections_wait_for_review_and_train_once_approved() -> None:
    rows = [row(None, correction="Use the app's card menu.", at=i) for i in range(4)]
    assert learnable(rows) == []
    approvals = {r.event_id: Judgement(event_id=r.event_id, action="approve", by="admin") for r in rows[:1]}
    items = learnable(rows, approvals)
    assert [i.trust for i in items] == ["reviewed"] and items[0].row.event_id == rows[0].event_id


def test_conflicts_without_a_majority_and_new_kinds_of_content_are_held() -> None:
    split = [row(f"k{i}", correction=answer, at=i) for i, answer in enumerate(["A menu.", "A menu.", "Branch.",
                                                                               "Branch."])]
    items = assess(split, {}, confirm_raters=2, majority=0.66)
    assert all(i.held and "disagree" in i.held for i in items)
    phishing = [row(f"k{i}", correction=f"Visit https://evil.example/reset and enter it. {PHISH}", at=i)
                for i in range(5)]
    held = assess(phishing, {}, confirm_raters=2, majority=0.66, task_answers=["Use the app's card menu."])
    assert {i.trust for i in held} == {"agreed"} and all("URL" in (i.held or "") for i in held)
    assert learnable(phishing) == []


def test_labelled_disagreements_are_weighed_by_each_raters_agreement() -> None:
    """A 2-2 split on one prompt: by counts, no majority (held); on a classification task, Dawid-Skene (crowd-kit)
    trusts the two raters who agreed with everyone else on the other prompts, and their label is agreed."""
    rows = [row(rater, prompt=f"q{p}", correction=label, at=p * 10 + i)
            for p in range(6) for i, (rater, label) in enumerate([("good-1", "urgent"), ("good-2", "urgent"),
                                                                  ("good-3", "urgent"), ("odd-1", "routine")])]
    rows += [row(rater, prompt="split", correction=label, at=100 + i)
             for i, (rater, label) in enumerate([("good-1", "urgent"), ("good-2", "urgent"), ("odd-1", "routine"),
                                                 ("odd-2", "routine")])]
    by_count = assess(rows, {}, confirm_raters=2, majority=0.66)
    assert all(i.held for i in by_count if i.row.prompt == "split")
    weighed = assess(rows, {}, confirm_raters=2, majority=0.66, labelled=True)
    split = {i.row.rater: (i.trust, i.held) for i in weighed if i.row.prompt == "split"}
    assert split["good-1"] == split["good-2"] == ("agreed", None)
    assert split["odd-1"][1] and split["odd-2"][1]  # the minority waits for review


def test_no_rater_outweighs_many() -> None:
    heavy = [row("heavy", prompt=f"q{i}", correction=None, rating=5, at=i) for i in range(20)]
    light = [row(f"light-{i}", prompt=f"p{i}", correction=None, rating=5, at=100 + i) for i in range(8)]
    data = build_retrain_data(learnable(heavy + light), [], holdout_fraction=0.2, replay_fraction=0.0,
                              max_share_per_rater=0.25)
    rows = data.train + data.holdout
    assert data.capped > 0
    assert sum(e.raters == ["heavy"] for e in rows) <= 0.25 * len(rows)


def test_replay_never_brings_back_a_retracted_event() -> None:
    champion_data = [TrainExample(prompt=f"old {i}", reasoning="", answer="x", source="correction",
                                  event_ids=[f"ev{i}"], raters=["k"]) for i in range(10)]
    fresh = learnable([row(f"k{i}", prompt=f"new {i}", rating=5, at=i) for i in range(10)])
    data = build_retrain_data(fresh, champion_data, holdout_fraction=0.2, replay_fraction=0.5,
                              retracted={f"ev{i}" for i in range(9)})
    replayed = [e for e in data.train if e.source == "replay"]
    assert [e.event_ids for e in replayed] == [["ev9"]]


def test_golden_prompts_are_never_trained_on_and_are_counted() -> None:
    golden = ["What is the daily ATM limit?", "Can I freeze my card?"]
    on_golden = [row(f"g{i}", prompt=p, correction="Ask a teller.", at=i)
                 for i, p in enumerate(["  what is the DAILY atm limit?", "What is the daily ATM limit?",
                                        "Can I freeze my card?"])]
    on_golden += [row(f"h{i}", prompt="Can I freeze   my card?", correction="Ask a teller.", at=10 + i)
                  for i in range(2)]  # agreed by two keys: confirmed, were it not golden
    fresh = [row(f"k{i}", prompt=f"new {i}", rating=5, at=20 + i) for i in range(10)]
    champion_data = [TrainExample(prompt="Can I freeze my card?", reasoning="", answer="Yes.", source="dataset")]
    items = learnable(on_golden + fresh, min_trust="single")
    data = build_retrain_data(items, champion_data, holdout_fraction=0.2, replay_fraction=0.0, golden_prompts=golden)
    used = {e.prompt for e in data.train + data.holdout + data.confirmed}
    assert used == {f"new {i}" for i in range(10)}
    assert data.golden_held_out == 5 and data.confirmations == {}
    plain = build_retrain_data(items, [], holdout_fraction=0.2, replay_fraction=0.0)
    assert plain.golden_held_out == 0 and "Can I freeze   my card?" in {e.prompt for e in plain.confirmed}


def test_every_pod_sees_each_review_decision_on_the_datasets_store(
    tmp_path: Path, s3_endpoint: str, monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Two pods that share no volume, one curated dataset on the S3 API server: a retraction judged on one is
    final on the other (the review log lives beside the dataset); an erasure rewrites only the batch that held
    its event, and an older home's review.jsonl is adopted once, with no copy left behind."""
    import fsspec

    for name, value in (("AWS_ACCESS_KEY_ID", "testing"), ("AWS_SECRET_ACCESS_KEY", "testing"),
                        ("AWS_DEFAULT_REGION", "us-east-1")):
        monkeypatch.setenv(name, value)
    bucket = f"reviews-{uuid.uuid4().hex[:8]}"
    fsspec.filesystem("s3", endpoint_url=s3_endpoint).mkdir(bucket)
    feedback = {"curation": "partitioned", "kafka_bootstrap": "127.0.0.1:9", "dataset_uri": f"s3://{bucket}/dataset",
                "dataset_storage_options": {"endpoint_url": s3_endpoint}}
    pod_a, pod_b = (Settings(home=tmp_path / name, feedback=feedback) for name in ("pod-a", "pod-b"))
    legacy = pod_a.feedback_dir / "review.jsonl"  # judged before the log moved beside the dataset
    legacy.parent.mkdir(parents=True)
    legacy.write_text(Judgement(event_id="e-old", action="retract", by="cli:ops").model_dump_json() + "\n")

    curated_dataset(pod_a).reviews.append([Judgement(event_id="e1", action="approve", by="lead"),
                                           Judgement(event_id="e2", action="approve", by="lead")])
    curated_dataset(pod_b).reviews.append([Judgement(event_id="e1", action="retract", by="alice")])
    curated_dataset(pod_a).reviews.append([Judgement(event_id="e1", action="approve", by="lead")])  # too late
    on_b = curated_dataset(pod_b).reviews
    assert on_b.retracted() == {"e1", "e-old"} and on_b.decisions()["e2"].action == "approve"
    assert not legacy.exists() and not list(legacy.parent.glob("review.jsonl*"))
    before = on_b.files()
    assert len(before) == 4 and before[0].endswith("00000000T000000000000-review.jsonl")

    assert curated_dataset(pod_a).reviews.rewrite_without({"e2"}) == 1
    after = curated_dataset(pod_b).reviews
    assert "e2" not in after.decisions() and after.retracted() == {"e1", "e-old"}
    assert len(after.files()) == 4 and set(after.files()) - set(before) == {after.files()[1]}  # same place
    assert on_b.decisions().keys() == {"e1", "e-old"}  # a reader that had cached the old batch reads anew


def test_retraction_and_review_through_the_dataset_and_lineage(tmp_path: Path) -> None:
    """A retracted row leaves every reader; lineage names the versions that trained on it."""
    settings = Settings(home=tmp_path, tasks=[{"name": "faq", "kind": "generation", "metric": "token_f1"}])
    dataset = CuratedDataset(settings.feedback_dir / "dataset")
    rows = [row(f"k{i}", correction="Use the app's card menu.", at=i) for i in range(2)] + [row(None, correction="x")]
    dataset.write_part("day=2026-12-01/part-0000000001-000.parquet", rows)
    dataset.write_manifest(Manifest(updated_at=T0, files=[PartFile(
        path="day=2026-12-01/part-0000000001-000.parquet", day="2026-12-01", batch=1, rows=3, offsets={},
        positions={}, created_at=T0)]))
    assert [p.event_id for p in review_queue(settings)] == [rows[2].event_id]
    # the canary: authenticated raters only, one rating per rater per answer
    assert dataset.ratings("faq", T0) == [("faq-v1", 1.0, "k0"), ("faq-v1", 1.0, "k1")]
    registry = registry_for(settings, "faq")
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text("{}")
    (adapter / "adapter_model.safetensors").write_bytes(b"w")
    write_train_data(adapter, [TrainExample(prompt="p", reasoning="", answer="a", source="correction",
                                            event_ids=[rows[0].event_id], raters=["k0"])])
    version = registry.register(adapter, base=BaseModelRef(id="demo", sha256="0" * 64)).version
    assert lineage(settings, rows[0].event_id).event.trained == [version]
    assert lineage(settings, version).version.rows_by_source == {"correction": 1}
    done = retract(settings, [rows[0].event_id, "nope"], by="cli:ops", reason="wrong")
    assert done.retracted == [rows[0].event_id] and done.unknown == ["nope"] and done.trained == {"faq": [version]}
    assert rows[0].event_id not in {r.event_id for r in dataset.examples()}
    assert lineage(settings, rows[0].event_id).event.retracted
    assert curated_dataset(settings).reviews.retracted() == {rows[0].event_id}


def test_the_canary_counts_one_rater_rating_one_answer_three_times_once_by_their_last_verdict(
    tmp_path: Path,
) -> None:
    """k0 rates one answer 3 times (1, 2, then 5; the last in a later part): the canary sees one rating, 5. k1 on
    the same answer is a rater of their own; an anonymous rating is left out (canary.count_anonymous is off)."""
    settings = Settings(home=tmp_path, tasks=[{"name": "faq", "kind": "generation", "metric": "token_f1"}])
    dataset = CuratedDataset(settings.feedback_dir / "dataset")
    answer = uuid.uuid4().hex
    first = [row("k0", request=answer, rating=1, at=0, comment="meh"), row("k0", request=answer, rating=2, at=1),
             row("k1", request=answer, rating=4, at=1), row(None, request=answer, rating=1, at=1)]
    last = [row("k0", request=answer, rating=5, at=2, comment="actually fine")]
    parts = []
    for batch, rows in enumerate((first, last), start=1):
        path = f"day=2026-12-01/part-{batch:010d}-000.parquet"
        dataset.write_part(path, rows)
        parts.append(PartFile(path=path, day="2026-12-01", batch=batch, rows=len(rows), offsets={}, positions={},
                              created_at=T0))
    dataset.write_manifest(Manifest(updated_at=T0, files=parts))

    seen = canary_ratings(settings)("faq", T0)  # what the canary controller, admin API and CLI review with

    assert sorted(seen, key=lambda r: str(r[2])) == [("faq-v1", 5.0, "k0"), ("faq-v1", 4.0, "k1")]
    day = dataset.daily_ratings(T0, "faq", anonymous=False)["faq"]["faq-v1"]
    assert [(d.ratings, d.mean) for d in day] == [(2, 4.5)]


def test_forget_erases_a_user_from_every_store_and_names_the_versions_that_learned(tmp_path: Path) -> None:
    """Through the real local log and curator: afterwards no file under the home holds the user's id or prompt."""
    settings = Settings(home=tmp_path, tasks=[{"name": "faq", "kind": "generation", "metric": "token_f1"}])
    bus = build_bus(settings)
    secret, kept_prompt = "where is alice-private-prompt-7731", "where is bob's ordinary prompt"
    ids = {}
    for user, prompt, n in (("alice", secret, 3), ("bob", kept_prompt, 2)):
        for i in range(n):
            request_id = uuid.uuid4().hex
            rater = f"app/{user}"
            bus.publish(PredictionEvent(request_id=request_id, task="faq", prompt=f"{prompt} {i}", answer="a",
                                        adapter_version="faq-v1", latency_ms=1, prompt_tokens=1, completion_tokens=1,
                                        asker=rater))
            event = FeedbackRequest(request_id=request_id, rating=5, user_id=user).to_event(rater, True, user, None)
            bus.publish(event)
            ids.setdefault(user, []).append(event.event_id)
    waiting = uuid.uuid4().hex  # asked, never rated: only in the join state and the log
    bus.publish(PredictionEvent(request_id=waiting, task="faq", prompt=f"{secret} unrated", answer="a",
                                adapter_version="faq-v1", latency_ms=1, prompt_tokens=1, completion_tokens=1,
                                asker="app/alice"))
    bus.close()
    curator = Curator(settings)
    try:
        curator.drain(timeout_s=60)
    finally:
        curator.close()
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text("{}")
    (adapter / "adapter_model.safetensors").write_bytes(b"w")
    write_train_data(adapter, [TrainExample(prompt=secret, reasoning="", answer="a", source="approved",
                                            event_ids=[ids["alice"][0]], raters=["app/alice"]),
                               TrainExample(prompt=kept_prompt, reasoning="", answer="a", source="approved",
                                            event_ids=[ids["bob"][0]], raters=["app/bob"])])
    registry = registry_for(settings, "faq")
    version = registry.register(adapter, base=BaseModelRef(id="demo", sha256="0" * 64)).version
    shutil.rmtree(adapter)

    report = forget(settings, "alice")

    assert (report.curated_rows, report.joined_predictions, report.training_rows) == (3, 4, 1)  # 3 rated, 1 not
    assert report.log_records == 7 and report.trained == {"faq": [version]}
    registry.verify(version)  # the redacted training rows still match the manifest
    rows = CuratedDataset(settings.feedback_dir / "dataset").examples()
    assert sorted(r.event_id for r in rows) == sorted(ids["bob"])
    assert CuratedDataset(settings.feedback_dir / "dataset").rows_by_task() == {"faq": 2}  # the parts' counts too
    for path in tmp_path.rglob("*"):
        if path.is_file():
            data = path.read_bytes()
            assert b"alice" not in data and b"alice-private-prompt" not in data, path
    parquet = [pq.read_table(p).to_pylist() for p in (settings.feedback_dir / "dataset").rglob("*.parquet")]
    assert "alice" not in str(parquet) and kept_prompt in str(parquet)


# -- through the real gateway and curator ------------------------------------------------------------

@pytest.mark.serve
@pytest.mark.vllm
def test_through_the_gateway_identity_comes_from_keys_and_only_the_asker_rates(served: tuple[str, Settings]) -> None:
    url, settings = served
    store = KeyStore(settings.registry_uri)
    keys = {name: store.create(f"{name}-{uuid.uuid4().hex[:6]}", ["predict", "feedback"])[1]
            for name in ("alice", "bob")}
    _, burst = store.create(f"burst-{uuid.uuid4().hex[:6]}", ["predict"], rate="3/minute")

    def as_key(name: str) -> dict[str, str]:
        return {"Authorization": f"Bearer {keys[name]}"}

    with httpx.Client(base_url=url, timeout=60) as client:
        asked = client.post("/predict", json={"prompt": "Acme shares surged", "max_tokens": 8}, headers=as_key("alice"))
        assert asked.status_code == 200
        request_id = asked.json()["request_id"]
        stranger = client.post("/feedback", json={"request_id": request_id, "rating": 5}, headers=as_key("bob"))
        assert stranger.status_code == 403 and "asked" in stranger.json()["error"]
        assert client.post("/feedback", json={"request_id": request_id, "rating": 5}).status_code == 403  # anonymous
        stuffed = [client.post("/feedback", headers=as_key("alice"), json={
            "request_id": request_id, "rating": 1, "correction": "negative", "comment": f"again {i}",
            "user_id": f"someone-{i}", "event_id": f"ev-{i}"}) for i in range(6)]
        assert {r.status_code for r in stuffed} == {202}
        unknown = {"Authorization": "Bearer fw_000000000000_" + "a" * 43}
        assert client.post("/predict", json={"prompt": "x"}, headers=unknown).status_code == 401
        # in open mode an SDK's placeholder token ("unused") is no key: the call is anonymous
        assert client.post("/predict", json={"prompt": "x", "max_tokens": 4},
                           headers={"Authorization": "Bearer unused"}).status_code == 200
        store.revoke(next(k.name for k in store.all() if k.name.startswith("bob-")))
        time.sleep(0.5)
        revoked = client.post("/predict", json={"prompt": "x", "max_tokens": 4}, headers=as_key("bob"))
        assert revoked.status_code == 401 and revoked.headers["www-authenticate"] == "Bearer"
        statuses = [client.post("/predict", json={"prompt": "x", "max_tokens": 4},
                                headers={"Authorization": f"Bearer {burst}"}).status_code for _ in range(4)]
        assert statuses == [200, 200, 200, 429]

    curator = Curator(settings)
    try:
        curator.drain(timeout_s=120)
    finally:
        curator.close()
    dataset = CuratedDataset(settings.feedback_dir / "dataset")
    mine = [r for r in dataset.examples() if r.request_id == request_id]
    assert len(mine) == 1 and mine[0].rater.startswith("alice-") and mine[0].comment == "again 5"
    assert mine[0].user_id is None  # a body's user_id from a key without act-for-users is no identity

    event_id = mine[0].event_id
    admin = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
    with httpx.Client(base_url=url, timeout=60) as client:
        queue = client.get("/admin/feedback/review", headers=admin)
        assert queue.status_code == 200 and event_id in [p["event_id"] for p in queue.json()]  # one key: single
        assert client.get("/admin/feedback/review", headers=as_key("alice")).status_code == 403
        rejected = client.post("/admin/feedback/review", headers=admin, json={"reject": [event_id, "nope"]})
        assert rejected.json() == {"approved": [], "rejected": [event_id], "unknown": ["nope"]}
        found = client.get(f"/admin/lineage/{request_id}", headers=admin).json()
        assert found["kind"] == "request" and found["request"]["answered_by"] == mine[0].adapter_version
        assert client.get("/admin/lineage/no-such-thing", headers=admin).status_code == 404
        assert client.delete(f"/feedback/{event_id}", headers=as_key("alice")).status_code == 200
        assert client.delete(f"/feedback/{event_id}", headers={"Authorization": f"Bearer {burst}"}).status_code == 403
    assert event_id not in {r.event_id for r in dataset.examples()}
