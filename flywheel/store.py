"""Files written whole to a store, a local disk or an object store (the curated dataset's, the retrain runs'): a
reader sees the old file or the new one, never half of one, and an exclusive write loses cleanly to one that came
first."""

from __future__ import annotations

import os
import uuid
from collections.abc import Callable
from pathlib import Path

from fsspec import AbstractFileSystem
from fsspec.implementations.local import LocalFileSystem

from flywheel.registry import create_exclusive


class CommitConflict(Exception):
    """Another writer created this file first (a curator's commit of a pair from this start)."""


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_new(path: Path, write: Callable[[Path], object], *, replace: bool) -> None:
    """Write through a temp file of this writer's own (two curators may write the same name at once), then
    rename it onto `path` (`replace`), or link it there only if `path` does not exist (CommitConflict)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        write(tmp)
        _fsync(tmp)
        if replace:
            os.replace(tmp, path)
        else:
            try:
                os.link(tmp, path)
            except FileExistsError:
                raise CommitConflict(str(path)) from None
    finally:
        tmp.unlink(missing_ok=True)
    _fsync(path.parent)


def put_whole(fs: AbstractFileSystem, path: str, data: bytes, *, exclusive: bool) -> None:
    """Put `data` at `path` whole, never half-written: replacing what is there, or (`exclusive`) only if nothing
    is (CommitConflict).
    A local disk: a temp file of this writer's own, renamed or hard-linked; an object store: one PUT, conditional
    (If-None-Match) when exclusive."""
    if isinstance(fs, LocalFileSystem):
        write_new(Path(path), lambda tmp: tmp.write_bytes(data), replace=not exclusive)
    elif not exclusive:
        fs.pipe_file(path, data)
    elif not create_exclusive(fs, path, data.decode()):
        raise CommitConflict(path)
