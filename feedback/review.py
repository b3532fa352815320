"""What people decided about curated rows: approvals and rejections from the review queue, retractions.

An append-only JSON-lines log at `<feedback_dir>/review.jsonl` (appends under an exclusive lock, each
line written whole and fsynced). The newest judgement of an event counts, except that a retraction is
final: a retracted row is a tombstone, never trained on again (replay included).
"""

from __future__ import annotations

import fcntl
import os
from collections.abc import Iterable
from datetime import UTC, datetime
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, Field

Action = Literal["approve", "reject", "retract"]


class Judgement(BaseModel):
    event_id: str
    action: Action
    by: str = Field(description="Who decided: a key's principal, `admin-token`, or `cli:<os user>`.")
    reason: str = ""
    at: datetime = Field(default_factory=lambda: datetime.now(UTC))


class ReviewLog:
    def __init__(self, feedback_dir: Path) -> None:
        self.path = feedback_dir / "review.jsonl"

    def append(self, judgements: Iterable[Judgement]) -> None:
        text = "".join(j.model_dump_json() + "\n" for j in judgements)
        if not text:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self.path.open("a", encoding="utf-8") as f:
            fcntl.flock(f, fcntl.LOCK_EX)  # concurrent writers (CLI, admin routes) never interleave lines
            f.write(text)
            f.flush()
            os.fsync(f.fileno())

    def judgements(self) -> list[Judgement]:
        if not self.path.is_file():
            return []
        lines = self.path.read_text(encoding="utf-8").splitlines()
        return [Judgement.model_validate_json(line) for line in lines if line.strip()]

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
        """Drop every judgement of `event_ids` (an erasure); returns how many lines went."""
        judgements = self.judgements()
        kept = [j for j in judgements if j.event_id not in event_ids]
        removed = len(judgements) - len(kept)
        if removed:
            tmp = self.path.with_name(f".{self.path.name}.tmp")
            tmp.write_text("".join(j.model_dump_json() + "\n" for j in kept), encoding="utf-8")
            os.replace(tmp, self.path)
        return removed
