"""What people decided about curated rows: approvals and rejections from the review queue, retractions.

Kept beside the curated dataset, on its store (`<dataset>/reviews/`), so every pod that reads the dataset
(a retrain on a Ray worker, the console on any replica) sees every decision, with no shared volume. An
object store cannot append, so each batch of judgements is one file written whole, named by when it was
made (`<UTC time>-<random>.jsonl`): the log is those files in name order. The newest judgement of an event
counts, except that a retraction is final: a retracted row is a tombstone, never trained on again (replay
included). A home from before keeps its `review.jsonl`: it is adopted as the log's first file.
"""

from __future__ import annotations

import contextlib
import uuid
from collections.abc import Iterable
from datetime import UTC, datetime
from pathlib import Path
from typing import Literal

from fsspec import AbstractFileSystem
from pydantic import BaseModel, Field

from flywheel.store import put_whole

Action = Literal["approve", "reject", "retract"]
REVIEWS_FOLDER = "reviews"
_ADOPTED = "00000000T000000000000-review.jsonl"  # an older home's single log sorts before every batch


class Judgement(BaseModel):
    event_id: str
    action: Action
    by: str = Field(description="Who decided: a key's principal, `admin-token`, or `cli:<os user>`.")
    reason: str = ""
    at: datetime = Field(default_factory=lambda: datetime.now(UTC))


def _lines(judgements: Iterable[Judgement]) -> bytes:
    return "".join(j.model_dump_json() + "\n" for j in judgements).encode()


class ReviewLog:
    def __init__(self, fs: AbstractFileSystem, folder: str, legacy: Path | None = None) -> None:
        """`folder` on `fs`: the log; `legacy`: an older home's `review.jsonl`, adopted on first use."""
        self.fs, self.folder, self.legacy = fs, folder, legacy
        self._read: dict[str, list[Judgement]] = {}  # a batch file never changes (an erasure writes a new one)

    def append(self, judgements: Iterable[Judgement]) -> None:
        data = _lines(judgements)
        if data:
            self._adopt_legacy()
            name = f"{datetime.now(UTC):%Y%m%dT%H%M%S%f}-{uuid.uuid4().hex[:12]}.jsonl"
            put_whole(self.fs, f"{self.folder}/{name}", data, exclusive=True)

    def files(self) -> list[str]:
        """The log's files in order, listed afresh (another pod may have judged since)."""
        self._adopt_legacy()
        self.fs.invalidate_cache(self.folder)
        try:
            listed = self.fs.ls(self.folder, detail=False)
        except FileNotFoundError:
            return []
        return sorted(p for p in listed if p.endswith(".jsonl") and not p.rsplit("/", 1)[-1].startswith("."))

    def judgements(self) -> list[Judgement]:
        found = []
        for path in self.files():
            if path not in self._read:
                try:
                    text = self.fs.cat_file(path).decode("utf-8")
                except FileNotFoundError:  # rewritten by an erasure meanwhile: its successor is listed next time
                    continue
                self._read[path] = [Judgement.model_validate_json(line) for line in text.splitlines() if line.strip()]
            found.extend(self._read[path])
        return found

    def decisions(self) -> dict[str, Judgement]:
        """Each judged event's standing judgement: the newest, or its retraction."""
        standing: dict[str, Judgement] = {}
        for judgement in self.judgements():
            current = standing.get(judgement.event_id)
            if current is None or current.action != "retract":
                standing[judgement.event_id] = judgement
        return standing

    def retracted(self) -> set[str]:
        return {e for e, j in self.decisions().items() if j.action == "retract"}

    def rewrite_without(self, event_ids: set[str]) -> int:
        """Drop every judgement of `event_ids` (an erasure); returns how many lines went. A file that held any is
        replaced by one under a new name at the same place in the order (readers cache files by name)."""
        self.judgements()
        removed = 0
        for path, judgements in list(self._read.items()):
            kept = [j for j in judgements if j.event_id not in event_ids]
            if len(kept) == len(judgements):
                continue
            removed += len(judgements) - len(kept)
            if kept:
                stamp = path.rsplit("/", 1)[-1].split("-", 1)[0]
                put_whole(self.fs, f"{self.folder}/{stamp}-{uuid.uuid4().hex[:12]}.jsonl", _lines(kept),
                          exclusive=True)
            with contextlib.suppress(FileNotFoundError):
                self.fs.rm_file(path)
            del self._read[path]
        return removed

    def _adopt_legacy(self) -> None:
        if self.legacy is None or not self.legacy.is_file():
            return
        try:
            data = self.legacy.read_bytes()
        except FileNotFoundError:  # another process adopted it first
            return
        put_whole(self.fs, f"{self.folder}/{_ADOPTED}", data, exclusive=False)  # the same bytes, if twice
        self.legacy.unlink(missing_ok=True)  # no copy left behind for an erasure to miss
