"""Who is calling: API keys (stored hashed in the registry's store), scopes, and the caller they make.

A key is `fw_<key id>_<secret>`, 256 random bits, shown once by `flywheel keys create`. The store keeps
its SHA-256 only (`<registry>/auth/keys/<key id>.json`): a key is a random secret, not a password, so a
fast hash is safe and lets every request be checked without a slow KDF. A caller's identity comes from
its credentials alone: the key's principal (its name), plus an end user only when the key holds
`act-for-users` (an app backend vouching for its own users). A body field is never an identity.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import logging
import re
import secrets
import threading
import time
import uuid
from collections.abc import Iterable
from datetime import UTC, datetime
from pathlib import Path
from typing import Annotated, Any, Literal

import fsspec
from fsspec.implementations.local import LocalFileSystem
from limits import parse
from pydantic import BaseModel, Field, ValidationError, field_validator

Scope = Literal["predict", "feedback", "admin", "act-for-users"]
SCOPES: tuple[Scope, ...] = ("predict", "feedback", "admin", "act-for-users")
KeyName = Annotated[str, Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$",
                               description="Who holds the key: the principal its calls are made as.")]
KEY_PREFIX = "fw_"
_KEY_RE = re.compile(r"fw_([0-9a-f]{12})_[A-Za-z0-9_-]{43}")
ADMIN_TOKEN_PRINCIPAL = "admin-token"  # the bootstrap admin: settings' admin_token

log = logging.getLogger("flywheel.auth")


class AuthError(Exception):
    """A request the credentials do not allow: `status` 401 (who are you?) or 403 (not allowed)."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


class ApiKey(BaseModel):
    """What the store keeps of a key: never the key itself."""

    key_id: str = Field(pattern=r"^[0-9a-f]{12}$")
    name: KeyName
    scopes: list[Scope]
    tenant: str | None = None
    rate: str | None = Field(None, description="Its rate limit (`limits` notation, e.g. `20/second`); None: the "
                             "configured default.")
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    created_at: datetime
    revoked_at: datetime | None = None

    @field_validator("rate")
    @classmethod
    def _a_rate(cls, rate: str | None) -> str | None:
        return rate if rate is None else valid_rate(rate)

    @property
    def active(self) -> bool:
        return self.revoked_at is None


class Caller(BaseModel):
    """Who made a request, as its credentials say."""

    principal: str = Field(description="The key's name, `admin-token`, or `anonymous:<address>` in open mode.")
    end_user: str | None = Field(None, description="The end user a key with `act-for-users` vouched for.")
    tenant: str | None = None
    authenticated: bool
    scopes: frozenset[str]
    rate: str | None = None

    @property
    def rater(self) -> str:
        """The identity a rating counts under: one verdict per rater per answer."""
        return f"{self.principal}/{self.end_user}" if self.end_user else self.principal

    def speaks_for(self, rater: str | None) -> bool:
        """Whether this caller may act as `rater`: it is them, or the backend that vouched for them."""
        return rater is not None and (rater == self.rater or (
            "act-for-users" in self.scopes and rater.startswith(f"{self.principal}/")))

    def vouching_for(self, end_user: str | None) -> Caller:
        """This caller speaking for `end_user`: honoured only with `act-for-users`, otherwise ignored."""
        if end_user is None or "act-for-users" not in self.scopes:
            return self
        return self.model_copy(update={"end_user": end_user})


def valid_rate(rate: str) -> str:
    """`rate` if `limits` reads it (`20/second`, `1000/minute`); ValueError otherwise."""
    try:
        parse(rate)
    except ValueError:
        raise ValueError(f"{rate!r} is not a rate; e.g. 20/second or 1000/minute") from None
    return rate


def hash_key(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def bearer_token(header: str) -> bytes | None:
    """The token of an `Authorization: Bearer <token>` header as the bytes the client sent (HTTP headers
    reach us decoded as Latin-1); the scheme is case-insensitive (RFC 7235). None: no bearer token."""
    scheme, _, token = header.strip().partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        return None
    return token.strip().encode("latin-1", errors="replace")


class KeyStore:
    """API keys under `<registry uri>/auth/keys/`, one small JSON file per key."""

    def __init__(self, uri: str, storage_options: dict[str, Any] | None = None) -> None:
        self.fs, root = fsspec.core.url_to_fs(uri.rstrip("/"), **(storage_options or {}))
        self.root = f"{root}/auth/keys"
        self._local = isinstance(self.fs, LocalFileSystem)

    def _write(self, key: ApiKey) -> None:
        path, text = f"{self.root}/{key.key_id}.json", key.model_dump_json(indent=1)
        if self._local:  # whole or not at all
            Path(self.root).mkdir(parents=True, exist_ok=True)
            tmp = f"{path}.{uuid.uuid4().hex}.tmp"
            Path(tmp).write_text(text)
            Path(tmp).chmod(0o600)
            Path(tmp).replace(path)
        else:
            with self.fs.open(path, "w") as f:
                f.write(text)

    def all(self) -> list[ApiKey]:
        """Every key, revoked ones included, oldest first."""
        self.fs.invalidate_cache(self.root)
        if not self.fs.exists(self.root):
            return []
        keys = []
        for path in self.fs.ls(self.root, detail=False):
            if not str(path).endswith(".json"):
                continue
            try:
                keys.append(ApiKey.model_validate_json(self.fs.cat_file(path)))
            except (ValidationError, OSError):
                log.warning("event=key_file_unreadable file=%s", str(path).rsplit("/", 1)[-1])
        return sorted(keys, key=lambda k: k.created_at)

    def create(self, name: str, scopes: Iterable[Scope], tenant: str | None = None, rate: str | None = None
               ) -> tuple[ApiKey, str]:
        """A new key: (its record, the key itself, which is never stored)."""
        if any(k.name == name and k.active for k in self.all()):
            raise ValueError(f"an active key named {name!r} exists: revoke it first to rotate it")
        key_id = secrets.token_hex(6)
        secret = f"{KEY_PREFIX}{key_id}_{secrets.token_urlsafe(32)}"
        record = ApiKey(key_id=key_id, name=name, scopes=sorted(set(scopes), key=SCOPES.index), tenant=tenant,
                        rate=rate, sha256=hash_key(secret), created_at=datetime.now(UTC))
        self._write(record)
        return record, secret

    def revoke(self, name_or_id: str) -> list[ApiKey]:
        """Revoke the active keys with this name or key id; returns them (empty: none matched)."""
        revoked = []
        for key in self.all():
            if key.active and name_or_id in (key.name, key.key_id):
                key = key.model_copy(update={"revoked_at": datetime.now(UTC)})
                self._write(key)
                revoked.append(key)
        return revoked


class Authenticator:
    """Turns a request's Authorization header into a Caller, or an AuthError.

    Keys are re-read from the store at most every `cache_s` (a revoked key stops working within that);
    an unknown key id never makes it read sooner, so a flood of made-up keys costs no store reads.
    """

    def __init__(self, store: KeyStore, *, mode: Literal["keys", "open"], admin_token: str,
                 cache_s: float = 5.0) -> None:
        self.store, self.mode, self.cache_s = store, mode, cache_s
        self._admin_token = admin_token.encode()
        self._keys: dict[str, ApiKey] = {}
        self._read_at = float("-inf")
        self._lock = threading.Lock()

    def _key(self, key_id: str) -> ApiKey | None:
        with self._lock:
            if time.monotonic() - self._read_at > self.cache_s:
                try:
                    self._keys = {k.key_id: k for k in self.store.all()}
                except OSError:  # the store is unreachable: keep the keys we had
                    log.warning("event=key_store_unreadable", exc_info=True)
                self._read_at = time.monotonic()
            return self._keys.get(key_id)

    def login(self, token: str, client: str) -> tuple[Caller, str]:
        """A key typed into a form (the console's login): the caller it makes and its subject (the key id, or
        `admin-token`), for a session that names the key without holding it; AuthError if it is no known key."""
        sent = token.strip().encode()  # a form's text is Unicode: its UTF-8 bytes are what a header would carry
        if not sent:
            raise AuthError(401, "unknown API key or admin token")
        caller = self._caller(sent, client)
        if not caller.authenticated:  # open mode takes an unknown token for no key: a login needs a real one
            raise AuthError(401, "unknown API key or admin token")
        if self._admin_token and hmac.compare_digest(sent, self._admin_token):
            return caller, ADMIN_TOKEN_PRINCIPAL
        match = _KEY_RE.fullmatch(token.strip())
        if match is None:
            raise AuthError(401, "unknown API key or admin token")
        return caller, match.group(1)

    def subject(self, subject: str) -> tuple[Caller, str] | None:
        """The caller a session's subject makes now, and a fingerprint of its credential (the stored hash); None when
        the key was revoked or is gone, or the admin token is no longer configured, so a session ends with its key."""
        if subject == ADMIN_TOKEN_PRINCIPAL:
            if not self._admin_token:
                return None
            return (Caller(principal=ADMIN_TOKEN_PRINCIPAL, authenticated=True, scopes=frozenset(SCOPES)),
                    hashlib.sha256(self._admin_token).hexdigest())
        key = self._key(subject)
        if key is None or not key.active:
            return None
        return (Caller(principal=key.name, tenant=key.tenant, authenticated=True, scopes=frozenset(key.scopes),
                       rate=key.rate), key.sha256)

    def reads_store(self, authorization: str) -> bool:
        """Authenticating `authorization` now would read the key store: it names a key, and the cache is older
        than `cache_s`. (No header, the admin token or an SDK's placeholder never read it.)"""
        token = bearer_token(authorization) if authorization else None
        return (token is not None and time.monotonic() - self._read_at > self.cache_s
                and _KEY_RE.fullmatch(token.decode("latin-1")) is not None)

    @staticmethod
    def _anonymous(client: str) -> Caller:
        return Caller(principal=f"anonymous:{client}", authenticated=False, scopes=frozenset({"predict", "feedback"}))

    def authenticate(self, authorization: str, client: str) -> Caller:
        """The caller; AuthError(401) for a missing (in `keys` mode), malformed, unknown or revoked key. In `open`
        mode a bearer token that is no flywheel key nor the admin token (an SDK's placeholder) is no key at all."""
        token = bearer_token(authorization) if authorization else None
        if token is None:
            if authorization:
                raise AuthError(401, "the Authorization header must be `Bearer <key>`")
            if self.mode == "keys":
                raise AuthError(401, "an API key is required: Authorization: Bearer <key> (flywheel keys create)")
            return self._anonymous(client)
        return self._caller(token, client)

    def _caller(self, token: bytes, client: str) -> Caller:
        """The caller a bearer token (the bytes the client sent) makes; AuthError(401) for an unknown or revoked key."""
        if self._admin_token and hmac.compare_digest(token, self._admin_token):
            return Caller(principal=ADMIN_TOKEN_PRINCIPAL, authenticated=True, scopes=frozenset(SCOPES))
        match = _KEY_RE.fullmatch(token.decode("latin-1"))
        if match is None and self.mode == "open":  # SDKs send some token ("unused"): no key, so anonymous
            return self._anonymous(client)
        key = self._key(match.group(1)) if match else None
        if key is None or not hmac.compare_digest(hash_key(token.decode("latin-1")), key.sha256):
            raise AuthError(401, "unknown API key or admin token")
        if not key.active:
            raise AuthError(401, "this API key was revoked")
        return Caller(principal=key.name, tenant=key.tenant, authenticated=True, scopes=frozenset(key.scopes),
                      rate=key.rate)


def require(caller: Caller, scope: Scope) -> None:
    if scope not in caller.scopes:
        who = "an anonymous caller" if not caller.authenticated else f"key {caller.principal!r}"
        raise AuthError(403, f"{who} lacks scope {scope!r}")
