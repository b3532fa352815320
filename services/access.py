"""The gateway's door: who is calling (flywheel.auth), whether the route's scope allows it, and how often.

Every route but /healthz, /metrics and the API document goes through `Access.admit`; those two go through
`Access.throttle` (no key, but a rate per client address). Rate limits are per
caller (a key's principal; an anonymous caller's client address) and per replica, with `limits`' moving
window; a caller over its rate gets 429 with `Retry-After`.
"""

from __future__ import annotations

import asyncio
import math
import time

from fastapi import Request
from fastapi.responses import JSONResponse
from limits import RateLimitItem, parse
from limits.storage import MemoryStorage
from limits.strategies import MovingWindowRateLimiter

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


class Access:
    def __init__(self, settings: Settings) -> None:
        self.mode = settings.auth_mode
        self.authenticator = Authenticator(
            KeyStore(settings.registry_uri, settings.registry.storage_options), mode=self.mode,
            admin_token=settings.admin_token.get_secret_value(), cache_s=settings.auth.key_cache_s)
        self._default_rate = parse(settings.auth.rate)
        self._rates: dict[str, RateLimitItem] = {}
        self._limiter = MovingWindowRateLimiter(MemoryStorage())

    async def admit(self, request: Request, scope: Scope) -> Caller:
        """The caller, allowed `scope` and within its rate; Denied otherwise."""
        header = request.headers.get("authorization", "")
        client = request.client.host if request.client else "unknown"
        try:
            if self.authenticator.stale:  # the key store is read off the event loop (an object store is slow)
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
        if self._limiter.hit(rate, who):
            return
        reset_at = self._limiter.get_window_stats(rate, who).reset_time
        retry = max(1, math.ceil(reset_at - time.time()))
        raise Denied(429, f"rate limit {rate} exceeded; retry in {retry} s", {"retry-after": str(retry)})
