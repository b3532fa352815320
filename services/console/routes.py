"""The console's routes under /console: thin, server-rendered (Jinja2), behind a session opened with an admin key.

A page without a session redirects to the login form (any other method answers 401); every POST carries the
session's CSRF token; the key is only ever in the login form's body, never in a URL, a cookie or a log line.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Callable
from datetime import datetime
from pathlib import Path
from typing import Annotated, Any, Literal
from urllib.parse import urlencode, urlsplit

from fastapi import APIRouter, FastAPI, Form, Request
from fastapi.responses import RedirectResponse, Response
from fastapi.staticfiles import StaticFiles
from fastapi.templating import Jinja2Templates

from flywheel.auth import AuthError, Caller
from flywheel.canary import NoCanaryError
from flywheel.config import Settings
from flywheel.registry import ChampionChangedError, RegistryError, UnknownTaskError, VersionNotFoundError
from flywheel.runs import RetrainBusyError
from services.access import Access, Denied
from services.console.charts import heat, loss_chart, rating_chart, sparkline
from services.console.session import COOKIE, LOGIN_COOKIE, SESSION_TTL_S, Session, Sessions, load_secret
from services.console.views import OVERVIEW_DAYS, Console

log = logging.getLogger("flywheel.console")
HERE = Path(__file__).parent
LOGIN_RATE = "10/minute"  # login attempts per client address: a key is 256 bits, but a flood still costs reads
MAX_REVIEW_IDS = 500
HEADERS = {  # every console page: no framing, no sniffing, nothing cached, no referrer, only our own assets
    "content-security-policy": "default-src 'self'; img-src 'self' data:; style-src 'self'; script-src 'self'; "
                               "form-action 'self'; frame-ancestors 'none'; base-uri 'none'",
    "x-frame-options": "DENY",
    "x-content-type-options": "nosniff",
    "referrer-policy": "same-origin",  # no-referrer would make the browser send `Origin: null` on our own forms
    "cache-control": "no-store",
}

templates = Jinja2Templates(directory=HERE / "templates")
templates.env.filters["when"] = lambda at: at.strftime("%Y-%m-%d %H:%M:%S") if isinstance(at, datetime) else "-"
templates.env.filters["pct"] = lambda v: "-" if v is None else f"{v:.0%}"
templates.env.filters["num"] = lambda v, digits=2: "-" if v is None else f"{v:.{digits}f}"
templates.env.globals.update(rating_chart=rating_chart, heat=heat, sparkline=sparkline, loss_chart=loss_chart,
                             overview_days=OVERVIEW_DAYS)
templates.env.filters["pretty"] = lambda v: json.dumps(v, indent=1, default=str, ensure_ascii=False)


class ConsoleState:
    """What the routes need on a replica: the views, the door's authenticator and rates, and sessions."""

    def __init__(self, settings: Settings, access: Access) -> None:
        self.views = Console(settings)
        self.access = access
        self.sessions = Sessions(access.authenticator, load_secret(access.authenticator))


class LoginRequired(Exception):
    """No session, or one whose key was revoked or that expired."""


class Refused(Exception):
    """A request the console turns away with a page saying why (403 for a bad CSRF token or scope)."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status, self.message = status, message


router = APIRouter(prefix="/console", include_in_schema=False)


def install(app: FastAPI, state_of: Callable[[], ConsoleState]) -> None:
    """Serve the console on `app`; `state_of()` gives the replica's ConsoleState when a request comes."""
    app.state.console_of = state_of
    app.include_router(router)
    app.mount("/console/static", StaticFiles(directory=HERE / "static"), name="console-static")
    app.add_exception_handler(LoginRequired, _login_required)
    app.add_exception_handler(Refused, _refused)


def _state(request: Request) -> ConsoleState:
    return request.app.state.console_of()


def _root(request: Request) -> str:
    return f"{request.scope.get('root_path', '')}/console"


def _page(request: Request, template: str, status: int = 200, **context: Any) -> Response:
    response = templates.TemplateResponse(request, template, {"root": _root(request), **context}, status_code=status)
    response.headers.update(HEADERS)
    return response


def _secure(request: Request) -> bool:
    return request.url.scheme == "https" or request.headers.get("x-forwarded-proto", "").lower() == "https"


def _redirect(request: Request, path: str, **query: str) -> RedirectResponse:
    url = f"{_root(request)}{path}" + (f"?{urlencode(query)}" if query else "")
    return RedirectResponse(url, status_code=303, headers=HEADERS)


async def _login_required(request: Request, exc: Exception) -> Response:
    if request.method in ("GET", "HEAD"):
        response = _redirect(request, "/login")
        response.delete_cookie(COOKIE, path=_root(request))
        return response
    return _page(request, "error.html", 401, session=None, message="Your session ended: log in again.")


async def _refused(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, Refused)
    return _page(request, "error.html", exc.status, session=None, message=exc.message)


async def _session(request: Request) -> Session:
    state = _state(request)
    session = await asyncio.to_thread(state.sessions.read, request.cookies.get(COOKIE))
    if session is None:
        raise LoginRequired
    if "admin" not in session.caller.scopes:  # the key lost nothing since login, but say so if it did
        raise Refused(403, f"key {session.caller.principal!r} lacks scope 'admin'")
    return session


def _same_origin(request: Request) -> bool:
    """A browser's POST names where its page came from: it must be this host (SameSite=Strict already keeps the
    cookie off other sites' requests; this and the CSRF token hold where a browser does not honour it)."""
    origin = request.headers.get("origin") or request.headers.get("referer")
    if not origin or origin == "null":
        return origin is None
    return urlsplit(origin).netloc == request.headers.get("host", "")


async def _acting(request: Request, csrf: str) -> Session:
    """The session behind a POST, its CSRF token checked."""
    session = await _session(request)
    if not Sessions.csrf_ok(session, csrf) or not _same_origin(request):
        log.info("event=console_csrf_refused path=%s principal=%s", request.url.path, session.caller.principal)
        raise Refused(403, "This form is stale or came from another site: reload the page and try again.")
    return session


def _who(session: Session) -> str:
    return f"{session.caller.principal} (console)"


async def _run(call: Callable[..., Any], *args: Any) -> Any:
    """A view's call off the event loop, its errors as the page that explains them."""
    try:
        return await asyncio.to_thread(call, *args)
    except (UnknownTaskError, VersionNotFoundError) as exc:
        raise Refused(404, str(exc)) from None
    except ChampionChangedError as exc:
        raise Refused(409, f"{exc}. Someone moved it since this page was shown: reload the page and decide "
                           "again.") from None
    except (RegistryError, NoCanaryError, RetrainBusyError) as exc:
        raise Refused(409, str(exc)) from None


# -- login ---------------------------------------------------------------------------------------------

@router.get("/login", name="console_login")
async def login_form(request: Request) -> Response:
    state = _state(request)
    if await asyncio.to_thread(state.sessions.read, request.cookies.get(COOKIE)):
        return _redirect(request, "")
    return _login_page(request, state, 200, None)


def _login_page(request: Request, state: ConsoleState, status: int, error: str | None) -> Response:
    nonce, token = state.sessions.login_nonce()
    response = _page(request, "login.html", status, session=None, login_token=token, error=error)
    response.set_cookie(LOGIN_COOKIE, nonce, max_age=600, path=_root(request), httponly=True, samesite="strict",
                        secure=_secure(request))
    return response


@router.post("/login")
async def login(request: Request, key: Annotated[str, Form(max_length=512)] = "",
                login_token: Annotated[str, Form(max_length=128)] = "") -> Response:
    state = _state(request)
    client = request.client.host if request.client else "unknown"
    if not state.sessions.login_ok(request.cookies.get(LOGIN_COOKIE), login_token) or not _same_origin(request):
        return _login_page(request, state, 403, "The form was stale: try again.")
    try:
        state.access.within(Caller(principal=f"anonymous:{client}", authenticated=False, scopes=frozenset()),
                            LOGIN_RATE, "console-login")
    except Denied as exc:
        return _login_page(request, state, 429, f"Too many attempts: {exc.message}.")
    try:
        caller, subject = await asyncio.to_thread(state.access.authenticator.login, key, client)
    except AuthError:
        log.info("event=console_login_refused client=%s why=unknown_key", client)
        return _login_page(request, state, 401, "That key is not known, or was revoked.")
    current = await asyncio.to_thread(state.access.authenticator.subject, subject)
    if "admin" not in caller.scopes or current is None:
        log.info("event=console_login_refused client=%s principal=%s why=no_admin_scope", client, caller.principal)
        return _login_page(request, state, 403, f"Key {caller.principal!r} lacks scope 'admin'.")
    log.info("event=console_login principal=%s client=%s", caller.principal, client)
    response = _redirect(request, "")
    response.set_cookie(COOKIE, state.sessions.issue(subject, current[1]), max_age=SESSION_TTL_S,
                        path=_root(request), httponly=True, samesite="strict", secure=_secure(request))
    response.delete_cookie(LOGIN_COOKIE, path=_root(request))
    return response


@router.post("/logout")
async def logout(request: Request, csrf: Annotated[str, Form()] = "") -> Response:
    session = await _acting(request, csrf)
    await asyncio.to_thread(_state(request).sessions.end, session)
    log.info("event=console_logout principal=%s", session.caller.principal)
    response = _redirect(request, "/login")
    response.delete_cookie(COOKIE, path=_root(request))
    return response


# -- pages ---------------------------------------------------------------------------------------------

@router.get("", name="console_tasks")
async def tasks(request: Request) -> Response:
    session = await _session(request)
    rows = await _run(_state(request).views.tasks)
    return _page(request, "tasks.html", session=session, rows=rows)


@router.get("/tasks/{task}")
async def task(request: Request, task: str, done: str = "") -> Response:
    session = await _session(request)
    page = await _run(_state(request).views.task, task)
    return _page(request, "task.html", session=session, page=page, done=done[:300])


@router.get("/tasks/{task}/versions/{version}")
async def version(request: Request, task: str, version: str) -> Response:
    session = await _session(request)
    manifest, curve = await _run(_state(request).views.version, task, version)
    return _page(request, "version.html", session=session, task=task, manifest=manifest, curve=curve)


@router.get("/loop")
async def loop(request: Request) -> Response:
    session = await _session(request)
    page = await _run(_state(request).views.loop)
    running = any(r.state.value == "running" for r in page.runs)
    return _page(request, "loop.html", session=session, page=page, refresh=10 if running else None)


@router.get("/review")
async def review_queue(request: Request, task: str | None = None, done: str = "") -> Response:
    session = await _session(request)
    queue = await _run(_state(request).views.review_queue, task or None)
    return _page(request, "review.html", session=session, queue=queue, task=task or "", done=done[:300])


@router.get("/lineage")
async def lineage(request: Request, id: str = "") -> Response:  # the query is `?id=`
    session = await _session(request)
    found, error = None, None
    if id:
        try:
            found = await asyncio.to_thread(_state(request).views.lineage, id.strip()[:80])
        except (LookupError, ValueError) as exc:
            error = str(exc)
    return _page(request, "lineage.html", session=session, query=id, found=found, error=error)


# -- actions: each needs the CSRF token, asks for confirmation in the page, and is recorded with who did it --

def _shown_champion(expected_champion: str | None) -> str | None:
    """The champion the page showed when the form was drawn ("" for none); a form without it is refused, so every
    move from the console names the champion it replaces."""
    if expected_champion is None:
        raise Refused(400, "This form does not say which champion it was shown: reload the page and try again.")
    return expected_champion or None


@router.post("/tasks/{task}/promote")
async def promote(request: Request, task: str, version: Annotated[str, Form(max_length=80)],
                  csrf: Annotated[str, Form()] = "",
                  expected_champion: Annotated[str | None, Form(max_length=80)] = None) -> Response:
    session = await _acting(request, csrf)
    entry = await _run(_state(request).views.promote, task, version, _who(session),
                       _shown_champion(expected_champion))
    log.info("event=console_promote task=%s version=%s previous=%s by=%s", task, entry.version, entry.previous,
             session.caller.principal)
    return _redirect(request, f"/tasks/{task}", done=f"{entry.version} is champion (was {entry.previous or '-'})")


@router.post("/tasks/{task}/rollback")
async def rollback(request: Request, task: str, csrf: Annotated[str, Form()] = "",
                   expected_champion: Annotated[str | None, Form(max_length=80)] = None) -> Response:
    session = await _acting(request, csrf)
    entry = await _run(_state(request).views.rollback, task, _who(session), _shown_champion(expected_champion))
    log.info("event=console_rollback task=%s version=%s previous=%s by=%s", task, entry.version, entry.previous,
             session.caller.principal)
    return _redirect(request, f"/tasks/{task}", done=f"rolled back: {entry.previous} → {entry.version}")


@router.post("/tasks/{task}/canary/{action}")
async def canary(request: Request, task: str, action: Literal["promote", "abort"],
                 csrf: Annotated[str, Form()] = "") -> Response:
    session = await _acting(request, csrf)
    verdict: Literal["promote", "rollback"] = "promote" if action == "promote" else "rollback"
    decided = await _run(_state(request).views.canary, task, verdict, _who(session))
    log.info("event=console_canary_%s task=%s version=%s by=%s", action, task, decided.canary,
             session.caller.principal)
    text = f"canary {decided.canary} " + ("is champion" if action == "promote" else "aborted: its share is 0")
    return _redirect(request, f"/tasks/{task}", done=text)


@router.post("/tasks/{task}/retrain")
async def retrain(request: Request, task: str, csrf: Annotated[str, Form()] = "") -> Response:
    session = await _acting(request, csrf)
    record = await _run(_state(request).views.retrain, task, session.caller.principal)
    log.info("event=console_retrain task=%s run_id=%s by=%s", task, record.run_id, session.caller.principal)
    return _redirect(request, f"/tasks/{task}", done=f"retrain {record.run_id} started")


@router.post("/review")
async def review(request: Request, action: Annotated[Literal["approve", "reject", "retract"], Form()],
                 event_id: Annotated[list[str] | None, Form()] = None,
                 reason: Annotated[str, Form(max_length=500)] = "",
                 task: Annotated[str, Form(max_length=64)] = "",
                 csrf: Annotated[str, Form()] = "") -> Response:
    session = await _acting(request, csrf)
    ids = [i for i in (event_id or [])[:MAX_REVIEW_IDS] if i]
    views = _state(request).views
    if not ids:
        return _redirect(request, "/review", **({"task": task} if task else {}), done="nothing was selected")
    if action == "retract":
        if not reason.strip():
            raise Refused(422, "A retraction needs a reason (it is recorded beside it).")
        result = await _run(views.retract, ids, _who(session), reason)
        done = f"retracted {len(result.retracted)}" + (
            f"; learned by {', '.join(v for vs in result.trained.values() for v in vs)}" if result.trained else "")
    else:
        outcome = await _run(views.judge, ids if action == "approve" else [], ids if action == "reject" else [],
                             _who(session), reason)
        done = f"approved {len(outcome['approved'])}, rejected {len(outcome['rejected'])}"
    log.info("event=console_review action=%s count=%d by=%s", action, len(ids), session.caller.principal)
    return _redirect(request, "/review", **({"task": task} if task else {}), done=done)
