"""The gateway's door: who is calling (flywheel.auth), whether the route's scope allows it, and how often.

Every route but /healthz, /metrics and the API document goes through `Access.admit`; those two go through
`Access.throttle` (no key, but a rate per client address). Rate limits are per
caller (a key's principal; an anonymous caller's client address) and per replica, over a moving window
(`MovingWindow`); a caller over its rate gets 429 with `Retry-After`.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections import deque

from fastapi import Request
from fastapi.responses import JSONResponse
from limits import RateLimitItem, parse

from flywheel.auth import Authenticator, AuthError, Caller, KeyStore, Scope, require
from flywheel.config import Settings
from services.openai_api import openai_error


class Denied(Exception):
    """A request turned away at the door: 401, 403 or 429, with the headers the status calls for."""

    def __init__(self, status: int, message: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.headers = status, message, headers or {}

    def response(self, openai: bool) -> JSONResponse:
        if openai:
            kind = {401: "authentication_error", 403: "permission_error", 429: "rate_limit_exceeded"}[self.status]
            response = openai_error(self.status, self.message, param=None, code=kind)
        else:
            response = JSONResponse(status_code=self.status, content={"error": self.message})
        response.headers.update(self.headers)
        return response


class MovingWindow:
    """Per-caller rate limits over a moving window, kept on the event loop with no thread: each caller's last
    `amount` hits, oldest first; a hit counts when fewer than `amount` lie within the window. Callers idle for
    longer than their window are forgotten every SWEEP_EVERY hits.

    Why not `limits`' own MovingWindowRateLimiter: its MemoryStorage starts a timer thread every 10 ms while
    requests flow, in the process that serves them (measured under load, f99b180). `limits` still parses the
    rates (`RateLimitItem`), so `auth.rate` and `--rate` read as before."""

    SWEEP_EVERY = 4096

    def __init__(self) -> None:
        self._hits: dict[tuple[str, str], tuple[float, deque[float]]] = {}
        self._until_sweep = self.SWEEP_EVERY

    def hit(self, rate: RateLimitItem, who: str) -> float | None:
        """None: within `rate`, and counted. Otherwise the seconds until a hit would be."""
        now = time.monotonic()
        window, hits = self._hits.get((str(rate), who)) or self._hits.setdefault(
            (str(rate), who), (float(rate.get_expiry()), deque(maxlen=rate.amount)))
        if len(hits) == hits.maxlen and now - hits[0] < window:
            return hits[0] + window - now
        hits.append(now)
        self._until_sweep -= 1
        if not self._until_sweep:
            self._until_sweep = self.SWEEP_EVERY
            self._hits = {key: kept for key, kept in self._hits.items() if now - kept[1][-1] < kept[0]}
        return None


class Access:
    def __init__(self, settings: Settings) -> None:
        self.mode = settings.auth_mode
        self.authenticator = Authenticator(
            KeyStore(settings.registry_uri, settings.registry.storage_options), mode=self.mode,
            admin_token=settings.admin_token.get_secret_value(), cache_s=settings.auth.key_cache_s)
        self._default_rate = parse(settings.auth.rate)
        self._rates: dict[str, RateLimitItem] = {}
        self._window = MovingWindow()

    async def admit(self, request: Request, scope: Scope) -> Caller:
        """The caller, allowed `scope` and within its rate; Denied otherwise."""
        header = request.headers.get("authorization", "")
        client = request.client.host if request.client else "unknown"
        try:
            if self.authenticator.reads_store(header):  # off the event loop: an object store is slow
                caller = await asyncio.to_thread(self.authenticator.authenticate, header, client)
            else:
                caller = self.authenticator.authenticate(header, client)
            if scope == "admin" and not caller.authenticated:
                raise AuthError(401, "admin routes need the admin token or a key with scope admin "
                                     "(Authorization: Bearer <key>)")
            require(caller, scope)
        except AuthError as exc:
            headers = {"www-authenticate": "Bearer"} if exc.status == 401 else {}
            raise Denied(exc.status, str(exc), headers) from None
        self._within_rate(caller)
        return caller

    def within(self, caller: Caller, rate: str, route: str) -> None:
        """A second, tighter rate for a costly route (Denied 429 past it), counted apart from the caller's own."""
        item = self._rates.get(rate) or self._rates.setdefault(rate, parse(rate))
        self._hit(item, f"{caller.principal}:{route}")

    def throttle(self, request: Request) -> None:
        """A route that needs no key still counts against its caller's rate (Denied 429 past it)."""
        client = request.client.host if request.client else "unknown"
        self._within_rate(Caller(principal=f"anonymous:{client}", authenticated=False, scopes=frozenset()))

    def _within_rate(self, caller: Caller) -> None:
        rate = self._default_rate
        if caller.rate:
            rate = self._rates.get(caller.rate) or self._rates.setdefault(caller.rate, parse(caller.rate))
        self._hit(rate, caller.principal)

    def _hit(self, rate: RateLimitItem, who: str) -> None:
        wait = self._window.hit(rate, who)
        if wait is not None:
            retry = max(1, math.ceil(wait))
            raise Denied(429, f"rate limit {rate} exceeded; retry in {retry} s", {"retry-after": str(retry)})
