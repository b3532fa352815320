"""Console sessions: a signed cookie that names the admin key it was opened with, never the key itself.

The cookie holds `{subject, nonce, expires}` and an HMAC over it, keyed with the console's secret and the key's
stored hash: every replica reading the same registry verifies it without shared memory, and revoking (or
rotating) the key ends its sessions at once. Logging out ends one session for every replica: a marker named by
the session's expiry and nonce, beside the secret, refuses the cookie until it would have expired anyway. Forms
carry a CSRF token derived from the session's nonce; the login form, before any session, a token tied to a
short-lived cookie of its own (double submit).
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import hmac
import json
import secrets
import time

from pydantic import BaseModel, ValidationError

from flywheel.auth import Authenticator, Caller
from flywheel.registry import create_exclusive

COOKIE = "flywheel_console"
LOGIN_COOKIE = "flywheel_console_login"
SESSION_TTL_S = 8 * 3600  # a working day; then the key is asked for again
SECRET_FILE = "console.secret"  # beside the keys, in the registry's store: one secret for every replica
ENDED_DIR = "console-sessions-ended"  # beside the secret: `<expires>.<nonce>` for each session logged out


class Session(BaseModel):
    """An open console session: who (as their key makes them now) and its CSRF token."""

    caller: Caller
    subject: str
    expires: int
    nonce: str
    csrf: str


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def _beside_keys(authenticator: Authenticator) -> str:
    return authenticator.store.root.rsplit("/", 1)[0]


def load_secret(authenticator: Authenticator) -> bytes:
    """The console's signing secret: created once (exclusively) beside the keys in the registry's store."""
    store = authenticator.store
    path = f"{_beside_keys(authenticator)}/{SECRET_FILE}"
    if store.fs.exists(path):
        return bytes.fromhex(store.fs.cat_file(path).decode().strip())
    create_exclusive(store.fs, path, secrets.token_hex(32), private=True)  # the first replica's secret wins
    return bytes.fromhex(store.fs.cat_file(path).decode().strip())


class Sessions:
    def __init__(self, authenticator: Authenticator, secret: bytes, ttl_s: int = SESSION_TTL_S) -> None:
        self.authenticator, self.secret, self.ttl_s = authenticator, secret, ttl_s
        self.fs, self.ended_dir = authenticator.store.fs, f"{_beside_keys(authenticator)}/{ENDED_DIR}"

    def _mac(self, fingerprint: str, payload: bytes) -> bytes:
        return hmac.new(self.secret + fingerprint.encode(), payload, hashlib.sha256).digest()

    def issue(self, subject: str, fingerprint: str) -> str:
        """A cookie value for a session of `subject` (a key id or `admin-token`) whose credential hashes to
        `fingerprint`."""
        payload = json.dumps({"s": subject, "n": secrets.token_urlsafe(16),
                              "e": int(time.time()) + self.ttl_s}).encode()
        return f"{_b64(payload)}.{_b64(self._mac(fingerprint, payload))}"

    def read(self, cookie: str | None) -> Session | None:
        """The session a cookie holds; None when it is missing, forged, expired, or its key was revoked."""
        if not cookie or cookie.count(".") != 1:
            return None
        try:
            encoded, mac = cookie.split(".")
            payload = _unb64(encoded)
            fields = json.loads(payload)
            subject, nonce, expires = str(fields["s"]), str(fields["n"]), int(fields["e"])
            sent_mac = _unb64(mac)
        except (ValueError, KeyError, TypeError, json.JSONDecodeError):
            return None
        if expires < time.time():
            return None
        current = self.authenticator.subject(subject)
        if current is None:
            return None
        caller, fingerprint = current
        if not hmac.compare_digest(sent_mac, self._mac(fingerprint, payload)) or self._ended(expires, nonce):
            return None
        try:
            return Session(caller=caller, subject=subject, expires=expires, nonce=nonce,
                           csrf=self._token("csrf", nonce))
        except ValidationError:
            return None

    def _ended(self, expires: int, nonce: str) -> bool:
        self.fs.invalidate_cache(self.ended_dir)  # another replica may have ended it a moment ago
        return bool(self.fs.exists(f"{self.ended_dir}/{expires}.{nonce}"))

    def end(self, session: Session) -> None:
        """Log `session` out on every replica (its cookie, copied anywhere, opens nothing after this), and forget
        the sessions ended earlier that have expired since (their cookies are refused for that already)."""
        create_exclusive(self.fs, f"{self.ended_dir}/{session.expires}.{session.nonce}", "")
        now = time.time()
        for path in self.fs.ls(self.ended_dir, detail=False):
            expires = path.rsplit("/", 1)[-1].split(".", 1)[0]
            if expires.isdigit() and int(expires) < now:
                with contextlib.suppress(FileNotFoundError):  # another replica forgot it first
                    self.fs.rm_file(path)

    def _token(self, purpose: str, nonce: str) -> str:
        return hmac.new(self.secret, f"{purpose}:{nonce}".encode(), hashlib.sha256).hexdigest()

    @staticmethod
    def csrf_ok(session: Session, token: str | None) -> bool:
        return bool(token) and hmac.compare_digest(session.csrf.encode(), (token or "").encode())

    def login_nonce(self) -> tuple[str, str]:
        """(the login cookie's value, the token the login form carries)."""
        nonce = secrets.token_urlsafe(16)
        return nonce, self._token("login", nonce)

    def login_ok(self, nonce: str | None, token: str | None) -> bool:
        if not nonce or not token:
            return False
        return hmac.compare_digest(self._token("login", nonce).encode(), token.encode())
