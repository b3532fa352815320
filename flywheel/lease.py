"""Who runs the loop of one registry, across every Ray cluster that shares it: a lease in the registry's own
store, whose epoch is a fencing token.

Why the store: it is the one thing all the loop's keepers share (two RayServices during an upgrade are two
Ray clusters, each with its own named actors), and it already commits alias moves by exclusive creation.

- A claim is an epoch, `<registry>/loop/lease/<epoch>.json`, created exclusively (a hard link on a local
  disk, a conditional put with If-None-Match on S3): two keepers never both hold one epoch.
- The holder renews by rewriting its epoch's beat (`<epoch>.beat`) every third of the lease. A keeper that
  finds the latest epoch's beat older than the lease claims the next epoch; the holder of an older epoch
  has lost the loop and stands by.
- The epoch fences the leader's registry writes (`Registry.fenced`): a move carrying an epoch older than the
  latest claim, or than one the task's alias history has already seen, is refused with FencedError and
  changes nothing. So a leader that was paused or cut off past its lease cannot move an alias once another
  has taken the loop over, even before it notices.

Clocks: a beat's age is judged by the reader's clock, so keepers' clocks must agree to well within the
lease (NTP does).
"""

from __future__ import annotations

import logging
from datetime import UTC, datetime

from pydantic import BaseModel, ValidationError

from flywheel.registry import LEASE_DIR, Registry, forget_epochs_before

log = logging.getLogger("flywheel.lease")

class LeaseClaim(BaseModel):
    epoch: int
    holder: str
    claimed_at: datetime


class LeaseState(BaseModel):
    """The latest claim and when its holder last renewed it."""

    claim: LeaseClaim
    beat_at: datetime

    def age_s(self) -> float:
        return (datetime.now(UTC) - self.beat_at).total_seconds()


class StoreLease:
    """One keeper's view of the loop's lease on the registry that `store` (any task's Registry) lives in."""

    def __init__(self, store: Registry, holder: str, lease_s: float) -> None:
        self.store = store
        self.holder = holder
        self.lease_s = lease_s
        self.epoch: int | None = None  # the epoch this keeper holds, while it leads

    def _claim_path(self, epoch: int) -> str:
        return self.store.path(*LEASE_DIR, f"{epoch:010d}.json")

    def _beat_path(self, epoch: int) -> str:
        return self.store.path(*LEASE_DIR, f"{epoch:010d}.beat")

    def current(self) -> LeaseState | None:
        epoch = self.store.loop_epoch()
        if epoch == 0:
            return None
        try:
            claim = LeaseClaim.model_validate_json(self.store.read_text(self._claim_path(epoch)))
        except (OSError, ValidationError):  # a claim being written, or damaged: judged by its age alone
            return None
        try:
            beat_at = datetime.fromisoformat(self.store.read_text(self._beat_path(epoch)))
        except (OSError, ValueError):
            beat_at = claim.claimed_at
        return LeaseState(claim=claim, beat_at=beat_at)

    def claim(self) -> int | None:
        """Renew or take the lease; the epoch this keeper leads under, or None while another holds it."""
        state = self.current()
        if state is not None and state.claim.holder == self.holder and state.claim.epoch == self.epoch:
            self._beat(state.claim.epoch)
            return self.epoch
        self.epoch = None  # whatever this keeper held, a newer claim has replaced it
        if state is not None and state.age_s() <= self.lease_s:
            return None
        epoch = (state.claim.epoch if state else self.store.loop_epoch()) + 1
        claim = LeaseClaim(epoch=epoch, holder=self.holder, claimed_at=datetime.now(UTC))
        if not self.store.create_exclusive(self._claim_path(epoch), claim.model_dump_json()):
            return None  # another keeper claimed this epoch first
        self._beat(epoch)
        self.epoch = epoch
        forget_epochs_before(self.store.fs, self.store.path(*LEASE_DIR), epoch - 1)  # the last one stays, for ops
        log.info("event=lease_claimed holder=%s epoch=%d after=%s", self.holder, epoch,
                 state.claim.holder if state else None)
        return epoch

    def holder_now(self) -> str | None:
        state = self.current()
        return state.claim.holder if state is not None and state.age_s() <= self.lease_s else None

    def release(self) -> None:
        """Let another keeper take over at once (a beat older than any lease), if this one still holds it."""
        state = self.current()
        if self.epoch is not None and state is not None and state.claim.epoch == self.epoch:
            self.store.write_text(self._beat_path(self.epoch), datetime(1970, 1, 1, tzinfo=UTC).isoformat())
        self.epoch = None

    def _beat(self, epoch: int) -> None:
        self.store.write_text(self._beat_path(epoch), datetime.now(UTC).isoformat())
