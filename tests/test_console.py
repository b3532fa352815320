"""The console (/console): its door (login, session cookie, CSRF) and its pages and buttons, through FastAPI's
TestClient on a real registry, run store and curated dataset (no Ray, no engine)."""

from __future__ import annotations

import logging
import re
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient

from feedback.dataset import CuratedDataset, PartFile
from feedback.oversight import lineage, review_queue
from feedback.schemas import CuratedExample
from flywheel.auth import Authenticator, AuthError, KeyStore
from flywheel.config import Settings
from flywheel.registry import BaseModelRef, Registry, registry_for
from flywheel.runs import RunRecord, RunState, RunStore
from flywheel.tasks import TaskSpec
from services.access import Access
from services.console import ConsoleState, install
from services.console.session import COOKIE
from tests.conftest import ADMIN_TOKEN, make_settings
from tests.timing import fastest_run_s

T0 = datetime(2026, 12, 1, tzinfo=UTC)
CSRF = re.compile(r'name="csrf" value="([^"]+)"')
LOGIN_TOKEN = re.compile(r'name="login_token" value="([^"]+)"')


@dataclass
class Desk:
    client: TestClient
    settings: Settings
    registry: Registry
    keys: dict[str, str]


def _version(registry: Registry, root: Path, n: int) -> str:
    adapter = root / f"adapter-{n}"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text("{}")
    (adapter / "adapter_model.safetensors").write_bytes(f"weights {n}".encode())
    gate = {"verdict": "passed", "metric": "token_f1", "message": "better", "checks": [
        {"name": "gain", "outcome": "passed", "value": 0.12, "threshold": 0.0, "rows": 40, "detail": "gain on new",
         "ci_low": 0.03, "ci_high": 0.2}]} if n > 1 else None
    confusion = {"n": 10, "accuracy": 0.8, "macro_f1": 0.79, "labels": ["positive", "negative"], "per_label": {},
                 "confusion": [[4, 1, 0], [0, 4, 1]]}
    metrics = {"candidate": {"new": {"n": 10, "metric": "accuracy", "score": 0.8, "classification": confusion}}}
    return registry.register(adapter, base=BaseModelRef(id="tiny", sha256="0" * 64), gate=gate, metrics=metrics,
                             parent=f"{registry.task}-v{n - 1}" if n > 1 else None).version


def console_app(root: Path) -> tuple[FastAPI, Settings, Registry, dict[str, str]]:
    """A console on its own app: the default task with v1..v3 (v1 then v2 promoted), an admin key and a
    predict-only key."""
    settings = make_settings(root / "home")
    registry = registry_for(settings)
    for n in (1, 2, 3):
        _version(registry, root, n)
    registry.promote(f"{registry.task}-v1", actor="bootstrap")
    registry.promote(f"{registry.task}-v2", actor="bootstrap")
    store = KeyStore(settings.registry_uri)
    keys = {name: store.create(name, scopes)[1] for name, scopes in
            (("ops", ["predict", "feedback", "admin"]), ("app", ["predict", "feedback"]))}
    return console_on(settings), settings, registry, keys


def console_on(settings: Settings) -> FastAPI:
    """A replica's console: its own state (secret, sessions, key cache) over `settings`' registry."""
    app = FastAPI()
    state = ConsoleState(settings, Access(settings))
    install(app, lambda: state)
    return app


@pytest.fixture
def desk(tmp_path: Path) -> Iterator[Desk]:
    app, settings, registry, keys = console_app(tmp_path)
    with TestClient(app, follow_redirects=False) as client:
        yield Desk(client, settings, registry, keys)


def _login(client: TestClient, key: str) -> object:
    form = client.get("/console/login")
    token = LOGIN_TOKEN.search(form.text).group(1)
    return client.post("/console/login", data={"key": key, "login_token": token})


def _csrf(client: TestClient, path: str) -> str:
    page = client.get(path)
    assert page.status_code == 200, page.text
    return CSRF.search(page.text).group(1)


def test_without_a_session_every_page_sends_to_login_and_every_action_is_401(desk: Desk) -> None:
    task = desk.registry.task
    for path in ("/console", f"/console/tasks/{task}", f"/console/tasks/{task}/versions/{task}-v2", "/console/review",
                 "/console/lineage?id=x"):
        response = desk.client.get(path)
        assert response.status_code == 303 and response.headers["location"] == "/console/login", path
    for path in (f"/console/tasks/{task}/promote", f"/console/tasks/{task}/rollback",
                 f"/console/tasks/{task}/canary/abort", f"/console/tasks/{task}/retrain", "/console/logout"):
        response = desk.client.post(path, data={"version": f"{task}-v3", "csrf": "x"})
        assert response.status_code == 401, path
    # a forged cookie is no session either
    desk.client.cookies.set(COOKIE, "eyJzIjoiYWRtaW4tdG9rZW4ifQ.AAAA", path="/console")
    assert desk.client.get("/console").status_code == 303
    assert desk.registry.alias("champion") == f"{task}-v2"


def test_a_wrong_key_or_one_without_admin_scope_opens_no_session(desk: Desk, caplog: pytest.LogCaptureFixture
                                                                 ) -> None:
    caplog.set_level(logging.INFO)
    wrong = _login(desk.client, "fw_0123456789ab_" + "x" * 43)
    assert wrong.status_code == 401 and "not known" in wrong.text
    not_admin = _login(desk.client, desk.keys["app"])
    assert not_admin.status_code == 403 and "lacks scope" in not_admin.text
    assert COOKIE not in desk.client.cookies
    assert desk.client.get("/console").status_code == 303
    assert desk.keys["app"] not in caplog.text


def test_the_login_form_carries_its_own_csrf_token(desk: Desk) -> None:
    desk.client.get("/console/login")  # the login cookie is set, but the form's token is not sent back
    refused = desk.client.post("/console/login", data={"key": ADMIN_TOKEN, "login_token": "forged"})
    assert refused.status_code == 403 and COOKIE not in desk.client.cookies


def test_a_session_cookie_is_httponly_strict_and_never_holds_the_key(desk: Desk, caplog: pytest.LogCaptureFixture
                                                                     ) -> None:
    caplog.set_level(logging.INFO)
    key = desk.keys["ops"]
    response = _login(desk.client, key)
    assert response.status_code == 303 and response.headers["location"] == "/console"
    cookie = next(c for c in response.headers.get_list("set-cookie") if c.startswith(f"{COOKIE}="))
    attributes = {part.strip().lower() for part in cookie.split(";")}
    assert {"httponly", "samesite=strict", "path=/console"} <= attributes
    assert "secure" not in attributes  # plain http here: a browser would drop a Secure cookie
    assert key not in cookie and key not in response.headers["location"] and key not in caplog.text
    assert "event=console_login principal=ops" in caplog.text
    page = desk.client.get("/console")
    assert page.status_code == 200 and f"{desk.registry.task}-v2" in page.text
    assert page.headers["cache-control"] == "no-store" and "frame-ancestors 'none'" in page.headers[
        "content-security-policy"]


def test_over_https_the_session_cookie_is_secure(desk: Desk) -> None:
    desk.client.base_url = "https://testserver"
    response = _login(desk.client, ADMIN_TOKEN)
    assert response.status_code == 303
    cookie = next(c for c in response.headers.get_list("set-cookie") if c.startswith(f"{COOKIE}="))
    assert "secure" in {part.strip().lower() for part in cookie.split(";")}
    assert desk.client.get("/console").status_code == 200


def test_an_action_needs_the_sessions_csrf_token_and_is_recorded_with_who_pressed_it(desk: Desk) -> None:
    task = desk.registry.task
    _login(desk.client, desk.keys["ops"])
    token = _csrf(desk.client, f"/console/tasks/{task}")
    for data, headers in (({"version": f"{task}-v3"}, {}), ({"version": f"{task}-v3", "csrf": "0" * 64}, {}),
                          ({"version": f"{task}-v3", "csrf": token}, {"origin": "https://elsewhere.example"})):
        refused = desk.client.post(f"/console/tasks/{task}/promote", data=data, headers=headers)
        assert refused.status_code == 403
    assert desk.registry.alias("champion") == f"{task}-v2"
    done = desk.client.post(f"/console/tasks/{task}/promote", data={"version": f"{task}-v3", "csrf": token,
                                                                    "expected_champion": f"{task}-v2"})
    assert done.status_code == 303 and done.headers["location"].startswith(f"/console/tasks/{task}?done=")
    assert desk.registry.alias("champion") == f"{task}-v3"
    entry = desk.registry.history("champion")[-1]
    assert (entry.action, entry.version, entry.actor) == ("promote", f"{task}-v3", "ops (console)")
    page = desk.client.get(done.headers["location"])
    assert f"{task}-v3 is champion" in page.text and "by ops (console)" in page.text
    back = desk.client.post(f"/console/tasks/{task}/rollback", data={"csrf": token,
                                                                     "expected_champion": f"{task}-v3"})
    assert back.status_code == 303 and desk.registry.alias("champion") == f"{task}-v2"
    assert desk.registry.history("champion")[-1].actor == "ops (console)"


EXPECTED = re.compile(r'name="expected_champion" value="([^"]*)"')


def test_promote_and_rollback_name_the_champion_the_page_showed_and_are_refused_if_it_moved(desk: Desk) -> None:
    """Two operators open the task page; one promotes v3. The other's rollback and promote forms still name v2,
    the champion their page showed: each is refused with a message saying who moved it, and nothing changes."""
    task = desk.registry.task
    _login(desk.client, desk.keys["ops"])
    page = desk.client.get(f"/console/tasks/{task}")
    token = CSRF.search(page.text).group(1)
    assert set(EXPECTED.findall(page.text)) == {f"{task}-v2"}  # every promote and rollback form carries it
    desk.registry.promote(f"{task}-v3", actor="someone else", reason="a hotfix")
    back = desk.client.post(f"/console/tasks/{task}/rollback",
                            data={"csrf": token, "expected_champion": f"{task}-v2"})
    assert back.status_code == 409, back.text
    assert f"is {task}-v3" in back.text and "someone else" in back.text and "reload the page" in back.text
    stale = desk.client.post(f"/console/tasks/{task}/promote",
                             data={"version": f"{task}-v1", "csrf": token, "expected_champion": f"{task}-v2"})
    assert stale.status_code == 409 and desk.registry.alias("champion") == f"{task}-v3"
    unnamed = desk.client.post(f"/console/tasks/{task}/promote", data={"version": f"{task}-v1", "csrf": token})
    assert unnamed.status_code == 400 and "which champion" in unnamed.text
    assert desk.registry.alias("champion") == f"{task}-v3"
    fresh = desk.client.get(f"/console/tasks/{task}")
    assert set(EXPECTED.findall(fresh.text)) == {f"{task}-v3"}
    done = desk.client.post(f"/console/tasks/{task}/rollback", data={"csrf": token, "expected_champion": f"{task}-v3"})
    assert done.status_code == 303 and desk.registry.alias("champion") == f"{task}-v2"


def test_logging_out_ends_the_session_on_the_server_not_only_in_this_browser(desk: Desk) -> None:
    _login(desk.client, desk.keys["ops"])
    copied = desk.client.cookies[COOKIE]
    with TestClient(desk.client.app, follow_redirects=False) as other:  # the same key's other session stays open
        _login(other, desk.keys["ops"])
        out = desk.client.post("/console/logout", data={"csrf": _csrf(desk.client, "/console")})
        assert out.status_code == 303 and out.headers["location"] == "/console/login"
        desk.client.cookies.set(COOKIE, copied, path="/console")  # the cookie, copied before logging out
        assert desk.client.get("/console").status_code == 303
        assert other.get("/console").status_code == 200
    # a second replica (its own state, the same registry) refuses it too
    with TestClient(console_on(desk.settings), follow_redirects=False) as replica:
        replica.cookies.set(COOKIE, copied, path="/console")
        assert replica.get("/console").status_code == 303


def test_revoking_the_key_ends_its_sessions(desk: Desk) -> None:
    _login(desk.client, desk.keys["ops"])
    assert desk.client.get("/console").status_code == 200
    KeyStore(desk.settings.registry_uri).revoke("ops")
    time.sleep(desk.settings.auth.key_cache_s + 0.1)
    assert desk.client.get("/console").status_code == 303


def test_the_canary_is_shown_and_aborted_by_hand(desk: Desk) -> None:
    task = desk.registry.task
    desk.registry.promote(f"{task}-v3", alias="canary", traffic_fraction=0.2, actor="gate")
    _login(desk.client, ADMIN_TOKEN)
    overview = desk.client.get("/console")
    assert f"{task}-v3 at 20%" in overview.text
    token = _csrf(desk.client, f"/console/tasks/{task}")
    done = desk.client.post(f"/console/tasks/{task}/canary/abort", data={"csrf": token})
    assert done.status_code == 303
    canary = desk.registry.aliases()["canary"]
    assert canary.traffic_fraction == 0.0 and canary.actor == "admin-token (console)"
    assert desk.registry.alias("champion") == f"{task}-v2"
    again = desk.client.post(f"/console/tasks/{task}/canary/abort", data={"csrf": token})
    assert again.status_code == 409 and "runs no canary" in again.text


def test_the_gate_report_is_one_click_from_the_version(desk: Desk) -> None:
    task = desk.registry.task
    _login(desk.client, ADMIN_TOKEN)
    page = desk.client.get(f"/console/tasks/{task}/versions/{task}-v2")
    assert page.status_code == 200 and "gain on new" in page.text and "[0.030, 0.200]" in page.text
    assert "Confusion matrix, candidate on the new slice" in page.text
    assert '<td class="heat h4">4</td><td class="heat h1">1</td><td class="heat h0">0</td>' in page.text
    assert desk.client.get(f"/console/tasks/{task}/versions/{task}-v9").status_code == 404
    assert desk.client.get("/console/tasks/no-such-task").status_code == 404


def rated(task: str, version: str, at: datetime, rating: int, correction: str | None = None) -> CuratedExample:
    """A curated answer of `version`, rated (and corrected) at `at` by an anonymous user."""
    return CuratedExample(
        event_id=uuid.uuid4().hex, request_id=uuid.uuid4().hex, task=task, feedback_ts=at, prediction_ts=at,
        adapter_version=version, prompt_kind="text", prompt="How do I reset my card PIN?", answer="Call us.",
        reasoning="", rating=rating, thumb=None, correction=correction, comment=None, user_id=None, tenant_id=None,
        rater=None, authenticated=False, asker=None, feedback_source="f/0", feedback_offset=0,
        prediction_source="p/0", prediction_offset=0)


def curate(settings: Settings, rows: list[CuratedExample]) -> None:
    """Add `rows` to the curated dataset as one more part, as the curator would."""
    dataset = CuratedDataset(settings.feedback_dir / "dataset")
    manifest = dataset.manifest()
    batch, now = len(manifest.files) + 1, datetime.now(UTC)
    part = f"day={now.date()}/part-{batch:010d}-000.parquet"
    dataset.write_part(part, rows)
    manifest.files.append(PartFile(path=part, day=str(now.date()), batch=batch, rows=len(rows), offsets={},
                                   positions={}, created_at=now))
    dataset.write_manifest(manifest)


def pending_correction(settings: Settings, task: str, at: datetime = T0) -> CuratedExample:
    """A correction of the task's v2 with a rating of 1, waiting for review (one rater, anonymous)."""
    row = rated(task, f"{task}-v2", at, 1, correction="Use the app's card menu.")
    curate(settings, [row])
    return row


def test_a_pending_correction_is_approved_from_the_review_queue(desk: Desk) -> None:
    task = desk.registry.task
    row = pending_correction(desk.settings, task)
    assert [p.event_id for p in review_queue(desk.settings)] == [row.event_id]
    _login(desk.client, desk.keys["ops"])
    overview = desk.client.get("/console")
    assert f'href="/console/review?task={task}">1</a>' in overview.text
    queue = desk.client.get("/console/review")
    assert row.correction is not None and "Use the app&#39;s card menu." in queue.text
    token = CSRF.search(queue.text).group(1)
    done = desk.client.post("/console/review", data={"csrf": token, "action": "approve", "event_id": [row.event_id],
                                                     "reason": "checked"})
    assert done.status_code == 303 and "approved+1" in done.headers["location"]
    assert review_queue(desk.settings) == []
    assert f'href="/console/review?task={task}">' not in desk.client.get("/console").text  # the judgement shows
    assert lineage(desk.settings, row.event_id).event.trust == "reviewed"
    found = desk.client.get(f"/console/lineage?id={row.event_id}")
    assert found.status_code == 200 and "reviewed" in found.text and "approve by ops (console)" in found.text


def test_a_polling_reader_reads_each_part_once_yet_sees_new_and_rewritten_parts(tmp_path: Path) -> None:
    """The console and the canary controller keep one dataset reader; it remembers the ratings of each part it
    read, and a new part or one an erasure rewrote (fewer rows) is read again."""
    settings = Settings(home=tmp_path)
    reader = CuratedDataset(settings.feedback_dir / "dataset")
    now = datetime.now(UTC)
    kept, erased = rated("faq", "faq-v1", now, 5), rated("faq", "faq-v1", now, 1)
    curate(settings, [kept, erased])

    def values() -> list[float]:
        return sorted(value for _, value, _ in reader.ratings("faq", now - timedelta(hours=1), anonymous=True))

    assert values() == [1.0, 5.0]
    curate(settings, [rated("faq", "faq-v2", now, 3)])
    assert values() == [1.0, 3.0, 5.0]
    manifest = reader.manifest()
    reader.write_part(manifest.files[0].path, [kept])  # as `users forget` rewrites a part
    manifest.files[0].rows = 1
    reader.write_manifest(manifest)
    assert values() == [3.0, 5.0]


def test_the_task_page_plots_ratings_per_version_and_the_loop_page_shows_runs_and_the_feedback_plane(
        desk: Desk) -> None:
    task = desk.registry.task
    today = datetime.now(UTC)
    pending_correction(desk.settings, task, today)  # one rating of 1 for v2 today
    _login(desk.client, desk.keys["ops"])
    page = desk.client.get(f"/console/tasks/{task}")
    assert '<svg class="chart"' in page.text and f"{task}-v2 {today.date()}: 1.00 from 1 ratings" in page.text
    loop = desk.client.get("/console/loop")
    assert loop.status_code == 200 and "No retrains yet." in loop.text
    assert "<dt>Curated</dt>" in loop.text or "cannot be read here" in loop.text


def test_the_tasks_page_shows_the_champions_ratings_per_day(desk: Desk) -> None:
    task, now = desk.registry.task, datetime.now(UTC)
    champion, other = f"{task}-v2", f"{task}-v3"
    curate(desk.settings, [rated(task, champion, now - timedelta(days=20), 5),  # before the overview's window
                           rated(task, champion, now - timedelta(days=2), 2), rated(task, champion, now - timedelta(
                               days=2), 4), rated(task, champion, now, 5), rated(task, other, now, 1)])
    _login(desk.client, desk.keys["ops"])
    cell = re.search(r'<td class="daily">(.*?)</td>', desk.client.get("/console").text, re.S).group(1)
    assert f'aria-label="{champion}: mean rating per day, the last 14 days"' in cell
    assert cell.count("<circle") == 2  # two days rated in the window; the other version is not the champion's
    assert f"{(now - timedelta(days=2)).date()}: 3.00 from 2 ratings" in cell
    assert f"5.00 (1) on {now:%m-%d}" in cell


def trained_run(settings: Settings, task: str) -> RunRecord:
    """A finished run whose training outcome carries, as the training plane writes it, a loss curve (eval every 20
    steps) and why training stopped; its version's manifest keeps the same training record."""
    curve = [{"step": s, "train_loss": 2.0 - s / 100, "eval_loss": 2.1 - s / 120 if s % 20 == 0 else None}
             for s in range(10, 110, 10)]
    training = {"loss_curve": curve, "stop_reason": "plateau", "steps": 100}
    registry = registry_for(settings, task)
    adapter = settings.home / "trained-run-adapter"
    adapter.mkdir(parents=True)
    (adapter / "adapter_config.json").write_text("{}")
    (adapter / "adapter_model.safetensors").write_bytes(b"trained by the run")
    version = registry.register(adapter, base=BaseModelRef(id="tiny", sha256="0" * 64), status="rejected",
                                training=training).version
    record = RunRecord(run_id="run-20261205-080000-aaaaaa", trigger="test", task=task, state=RunState.REJECTED,
                       version=version, metrics=training)
    RunStore.for_settings(settings).save(record)
    return record


def test_the_runs_page_draws_a_runs_loss_curve_and_why_it_stopped_and_nothing_for_a_run_without(desk: Desk) -> None:
    run = trained_run(desk.settings, desk.registry.task)
    RunStore.for_settings(desk.settings).save(RunRecord(run_id="run-20261205-070000-bbbbbb", trigger="test",
                                                         state=RunState.REJECTED, report={"verdict": "rejected"}))
    _login(desk.client, desk.keys["ops"])
    page = desk.client.get("/console/loop").text
    drawn = re.search(r'<tr data-run="run-20261205-080000-aaaaaa">.*?<td class="loss">(.*?)</td>', page, re.S).group(1)
    assert 'aria-label="run-20261205-080000-aaaaaa: train and eval loss by step"' in drawn
    train, evaluated = re.findall(r'<polyline points="([^"]+)"', drawn)
    assert len(train.split()) == 10 and len(evaluated.split()) == 5  # eval every 20 steps: its own points only
    assert "train 1.000 at step 100" in drawn and "eval 1.267 at step 100" in drawn
    assert "stopped: plateau" in drawn
    plain = re.search(r'<tr data-run="run-20261205-070000-bbbbbb">.*?<td class="loss">(.*?)</td>', page, re.S).group(1)
    assert plain.strip() == "—"
    task, version = desk.registry.task, run.version  # the version's gate report page draws the same curve
    version_page = desk.client.get(f"/console/tasks/{task}/versions/{version}").text
    assert f'aria-label="{version}: train and eval loss by step"' in version_page and "stopped: plateau" in version_page
    assert "loss by step" not in desk.client.get(f"/console/tasks/{task}/versions/{task}-v1").text


def test_the_tasks_page_stays_fast_with_30_tasks_and_1000_versions(tmp_path: Path) -> None:
    """A guard (tests/timing.py), not the target: the issue's goal is < 300 ms server-side; this box measured
    about 0.2 s while busy, 0.3-0.4 s with the champions' ratings per day on a box loaded by a training run. An
    unbounded read (every manifest of every task per row, say) would blow far past."""
    app, settings, _, _ = console_app(tmp_path)
    adapter = tmp_path / "adapter-bench"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text("{}")
    (adapter / "adapter_model.safetensors").write_bytes(b"w")
    for i in range(29):  # and the default task's 3: 30 tasks, 1 000 versions
        registry = registry_for(settings, f"task-{i:02d}")
        registry.save_task_spec(TaskSpec(name=registry.task, kind="generation", metric="token_f1"))
        for _ in range(35 if i < 9 else 34):
            registry.register(adapter, base=BaseModelRef(id="tiny", sha256="0" * 64))
        registry.promote(f"{registry.task}-v1", actor="bootstrap")
    now = datetime.now(UTC)  # and two weeks of ratings of every champion, 2 100 of them, for its ratings per day
    curate(settings, [rated(f"task-{i % 30:02d}", f"task-{i % 30:02d}-v1", now - timedelta(hours=i % 330), 1 + i % 5)
                      for i in range(2100)])
    with TestClient(app, follow_redirects=False) as client:
        _login(client, ADMIN_TOKEN)
        page = client.get("/console")
        assert page.text.count('<tr data-task="') == 30 and ", 35 versions" in page.text
        assert page.text.count('<svg class="chart spark"') == 29  # the default task's champion got none
        seconds = fastest_run_s(lambda: client.get("/console"))
    print(f"tasks page, 30 tasks and 1000 versions: {seconds * 1000:.0f} ms")
    assert seconds < 2.0


def test_a_login_names_its_key_by_id_and_the_session_ends_with_the_key(tmp_path: Path) -> None:
    settings = make_settings(tmp_path / "home")
    store = KeyStore(settings.registry_uri)
    record, key = store.create("ops", ["admin"])
    authenticator = Access(settings).authenticator
    caller, subject = authenticator.login(key, "127.0.0.1")
    assert (caller.principal, subject) == ("ops", record.key_id)
    assert authenticator.login(f"  {ADMIN_TOKEN} ", "127.0.0.1")[1] == "admin-token"
    with pytest.raises(AuthError):  # open mode (loopback) takes an unknown token for no key: no login with it
        authenticator.login("unused", "127.0.0.1")
    assert authenticator.subject(record.key_id)[1] == record.sha256
    store.revoke("ops")
    time.sleep(settings.auth.key_cache_s + 0.1)
    assert authenticator.subject(record.key_id) is None and authenticator.subject("0" * 12) is None


def test_a_non_ascii_admin_token_logs_in_through_the_form(tmp_path: Path) -> None:
    authenticator = Authenticator(KeyStore(str(tmp_path / "registry")), mode="keys", admin_token="tökén", cache_s=0.0)
    caller, subject = authenticator.login(" tökén ", "10.0.0.1")  # a form's text: Unicode, compared as UTF-8 bytes
    assert (caller.principal, subject) == ("admin-token", "admin-token")
    for wrong in ("tokén", "t\xf6k\xe9n".encode().decode("latin-1"), ""):
        with pytest.raises(AuthError):
            authenticator.login(wrong, "10.0.0.1")


def test_a_correction_is_retracted_from_its_lineage_with_a_reason(desk: Desk) -> None:
    row = pending_correction(desk.settings, desk.registry.task)
    _login(desk.client, desk.keys["ops"])
    page = desk.client.get(f"/console/lineage?id={row.event_id}")
    assert f"Retract {row.event_id}?" in page.text
    token = CSRF.search(page.text).group(1)
    without_reason = desk.client.post("/console/review", data={"csrf": token, "action": "retract",
                                                               "event_id": row.event_id})
    assert without_reason.status_code == 422 and not lineage(desk.settings, row.event_id).event.retracted
    done = desk.client.post("/console/review", data={"csrf": token, "action": "retract", "event_id": row.event_id,
                                                     "reason": "a customer's account number"})
    assert done.status_code == 303 and "retracted+1" in done.headers["location"]
    found = lineage(desk.settings, row.event_id).event
    assert found.retracted and found.judgements[-1].by == "ops (console)"
    assert review_queue(desk.settings) == []
