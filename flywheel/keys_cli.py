"""`flywheel keys create|list|revoke`: the API keys callers authenticate with (flywheel/auth.py).

Mounted by flywheel/cli.py. Keys live in the registry's store, so every replica on every node sees them.
"""

from __future__ import annotations

from typing import Annotated

import typer
from pydantic import TypeAdapter, ValidationError

from flywheel.auth import SCOPES, KeyName, KeyStore, Scope, valid_rate
from flywheel.cli_common import ConfigOption, JsonOption, emit, fail, settings_or_exit

app = typer.Typer(help="API keys: who may predict, give feedback, vouch for end users, administer.",
                  no_args_is_help=True, pretty_exceptions_enable=False)


def _store(config: object) -> KeyStore:
    settings = settings_or_exit(config)  # type: ignore[arg-type]
    return KeyStore(settings.registry_uri, settings.registry.storage_options)


def _scopes(text: str) -> list[Scope]:
    scopes = [s.strip() for s in text.split(",") if s.strip()]
    unknown = [s for s in scopes if s not in SCOPES]
    if unknown or not scopes:
        fail(f"--scopes takes a comma-separated list of {', '.join(SCOPES)}; got {text!r}", code=2)
    return scopes  # type: ignore[return-value]


@app.command("create")
def create(
    name: Annotated[str, typer.Argument(help="Who holds the key (an app, a team, a person): its calls are made as "
                                        "this name, and ratings count under it.")],
    scopes: Annotated[str, typer.Option(help="Comma-separated: predict, feedback, admin, act-for-users (an app "
                                        "backend that forwards its own users' ids as `user` / `user_id`).")
                      ] = "predict,feedback",
    tenant: Annotated[str | None, typer.Option(help="The tenant the key's calls belong to.")] = None,
    rate: Annotated[str | None, typer.Option(help="Its rate limit, e.g. 20/second or 1000/minute (default: "
                                             "auth.rate).")] = None,
    config: ConfigOption = None,
    as_json: JsonOption = False,
) -> None:
    """Create a key and print it once: it is stored hashed and cannot be shown again."""
    if not _valid_name(name):
        fail(f"invalid key name {name!r}: letters, digits, '.', '_' and '-', at most 64", code=2)
    if rate is not None:
        try:
            valid_rate(rate)
        except ValueError as exc:
            fail(f"--rate: {exc}", code=2)
    try:
        record, key = _store(config).create(name, _scopes(scopes), tenant=tenant, rate=rate)
    except ValueError as exc:
        fail(str(exc))
    emit(as_json, {**record.model_dump(mode="json", exclude={"sha256"}), "key": key},
         f"{key}\nkey {record.name} ({record.key_id}): scopes {','.join(record.scopes)}"
         + (f", tenant {tenant}" if tenant else "") + "\nstore it now: it is not shown again. "
         "Send it as `Authorization: Bearer <key>`.")


def _valid_name(name: str) -> bool:
    try:
        TypeAdapter(KeyName).validate_python(name)
    except ValidationError:
        return False
    return True


@app.command("list")
def list_keys(config: ConfigOption = None, as_json: JsonOption = False,
              revoked: Annotated[bool, typer.Option("--revoked", help="Also list revoked keys.")] = False) -> None:
    """Keys by name, scopes, tenant, rate and state (never the keys themselves)."""
    every = _store(config).all()
    keys = [k for k in every if revoked or k.active]
    lines = [f"{k.name:<24} {k.key_id}  {','.join(k.scopes):<36} tenant={k.tenant or '-'} rate={k.rate or 'default'}"
             + ("" if k.active else f"  revoked {k.revoked_at:%Y-%m-%d %H:%M}") for k in keys]
    hidden = len(every) - len(keys)
    text = ("\n".join(lines) or "no active keys") + (f"\n({hidden} revoked: --revoked lists them)" if hidden else "")
    emit(as_json, [k.model_dump(mode="json", exclude={"sha256"}) for k in keys], text)


@app.command("revoke")
def revoke(name: Annotated[str, typer.Argument(help="The key's name or key id.")], config: ConfigOption = None,
           as_json: JsonOption = False) -> None:
    """Revoke a key: replicas refuse it (401) within auth.key_cache_s."""
    revoked = _store(config).revoke(name)
    if not revoked:
        fail(f"no active key named {name!r}")
    emit(as_json, [k.model_dump(mode="json", exclude={"sha256"}) for k in revoked],
         "\n".join(f"revoked {k.name} ({k.key_id})" for k in revoked))
