"""The adapter lifecycle inside one replica: loading → probing → ready → draining → unloaded (or failed).

The manager follows one registry alias of one task (a replica holds one manager per task). When the
alias moves it preloads the new version, probes it with one short generation, then flips: new requests
use the new version while requests already running finish on the one they started with; the old
version is unloaded once drained. A replica that starts later converges by reading the alias itself.
A failed load or probe leaves the old version serving; it is tried again after a backoff (10 s doubling
to 10 min), and at once if the alias moves.

`PinnedAdapters` serves versions asked for by name (`task@version`, e.g. to replay an evaluation)
beside the champions: loaded on demand, the least recently used idle one unloaded past its capacity.

`LoraResidency` is the one door to the engine's LoRAs for all of them: more tasks than the engine holds
still answer, each LoRA loaded when a request needs it (one load per LoRA: a slow one holds up no other) and
the least recently used idle one removed; when every one is answering requests, a new one is refused (503).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import time
import uuid
from collections import OrderedDict, deque
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field
from enum import StrEnum

from flywheel.registry import CANARY_ALIAS, AliasRecord, Registry, RegistryError, VersionNotFoundError, lora_int_id
from flywheel.stats import percentile
from services.engines.protocol import AdapterHandle, ChatMessage, Engine, PromptTooLongError, SamplingOptions

log = logging.getLogger("flywheel.adapters")

BASE_VERSION = "base"
TALLY_WINDOW = 512  # latencies kept per version for its p99
# below this many timed requests a "p99" is the slowest one or two, a single stall: the latency guardrail waits
P99_MIN_SAMPLES = 100
RETRY_FIRST_S, RETRY_MAX_S = 10.0, 600.0  # a failed swap is retried after 10 s, 20 s, 40 s … at most 10 min
UNBOUNDED = 1 << 30  # LoRAs a lone manager may keep loaded (a replica bounds them: `LoraResidency`)


class AdapterState(StrEnum):
    LOADING = "loading"
    PROBING = "probing"
    READY = "ready"
    DRAINING = "draining"
    UNLOADED = "unloaded"
    FAILED = "failed"


@dataclass
class AdapterSlot:
    version: str
    handle: AdapterHandle | None
    state: AdapterState
    in_flight: int = 0
    error: str | None = None
    since: float = field(default_factory=time.time)

    def move(self, state: AdapterState, error: str | None = None) -> None:
        self.state, self.error, self.since = state, error, time.time()
        log.info("event=adapter_state version=%s state=%s%s", self.version, state,
                 f" error={error!r}" if error else "")


@dataclass
class SwapCounters:
    succeeded: int = 0
    failed: int = 0


def traffic_bucket(version: str, user: str | None) -> float:
    """A number in [0, 1) fixed by (canary version, user); uniform over users."""
    key = f"{version}\n{user if user is not None else uuid.uuid4().hex}".encode()
    return int.from_bytes(hashlib.sha256(key).digest()[:8], "big") / 2**64


class AdapterManager:
    def __init__(
        self,
        engine: Engine,
        registry: Registry,
        *,
        alias: str,
        base_sha256: str,
        probe_prompt: str,
        drain_timeout_s: float,
        loras: LoraResidency | None = None,
        on_trial: Callable[[str, str], None] | None = None,
    ) -> None:
        """`on_trial(canary, champion)`: called when this replica first sees a version on trial as the canary."""
        self.on_trial = on_trial or (lambda _canary, _champion: None)
        self.engine = engine
        self.loras = loras or LoraResidency(engine, capacity=UNBOUNDED)  # a replica shares one among its tasks
        self.registry = registry
        self.alias = alias
        self.base_sha256 = base_sha256
        self.probe_prompt = probe_prompt
        self.drain_timeout_s = drain_timeout_s
        self.active = AdapterSlot(BASE_VERSION, None, AdapterState.READY)
        self.canary: AliasRecord | None = None  # a version on trial with a share of traffic, if any
        self.slots: dict[str, AdapterSlot] = {}
        self.counters = SwapCounters()
        self.last_failure: AdapterSlot | None = None
        self._failures_in_row = 0
        self._retry_at = 0.0  # a failed version is tried again from then on (a copy race, a flaky store)
        self._swap_lock = asyncio.Lock()
        self._drains: set[asyncio.Task[None]] = set()  # keep references so tasks are not collected

    @contextlib.contextmanager
    def acquire(self) -> Iterator[AdapterSlot]:
        """The slot a new request runs on; it stays loaded until the request finishes."""
        slot = self.active
        slot.in_flight += 1
        try:
            yield slot
        finally:
            slot.in_flight -= 1

    def arm(self, user: str | None) -> str | None:
        """The canary's version when this request falls in its share of traffic, else None (the champion).

        Sticky: a user's bucket is a hash of who they are, so one person sees one version while the share
        holds, and stays on the canary as it steps up. Anonymous requests are bucketed one by one."""
        canary = self.canary
        if canary is None or canary.version == self.active.version:
            return None
        return canary.version if traffic_bucket(canary.version, user) < (canary.traffic_fraction or 0.0) else None

    def read_aliases(self) -> dict[str, AliasRecord] | None:
        """The task's aliases now (blocking I/O), or None when the registry could not say (logged)."""
        try:
            return self.registry.aliases()
        except (OSError, ValueError, RegistryError) as exc:
            log.warning("event=alias_read_failed task=%s alias=%s error=%r", self.registry.task, self.alias, exc)
            return None

    async def converge(self, aliases: dict[str, AliasRecord] | None = None) -> None:
        """Swap if the alias points somewhere else (and has not already failed there). `aliases`: as the caller
        just read them (`read_aliases`), else read here."""
        aliases = aliases if aliases is not None else await asyncio.to_thread(self.read_aliases)
        if aliases is None:
            return
        canary = aliases.get(CANARY_ALIAS)
        trial = canary if canary and canary.traffic_fraction else None
        if trial is not None and (self.canary is None or self.canary.version != trial.version):
            self.on_trial(trial.version, self.active.version)
        self.canary = trial
        target = aliases[self.alias].version if self.alias in aliases else None
        if target == self.active.version:
            self.last_failure = None  # the alias came back: a failed attempt elsewhere is moot
            return
        if target is None:
            return
        if (self.last_failure is not None and self.last_failure.version == target
                and time.monotonic() < self._retry_at):
            return
        await self.swap(target)

    async def watch(self, interval_s: float) -> None:
        while True:
            await self.converge()
            await asyncio.sleep(interval_s)

    async def swap(self, version: str) -> bool:
        """Preload, probe and flip to `version`; True when it now serves."""
        async with self._swap_lock:
            if version == self.active.version:
                return True
            started = time.perf_counter()
            slot = AdapterSlot(version, None, AdapterState.LOADING)
            log.info("event=swap_started from=%s to=%s", self.active.version, version)
            try:
                manifest = await asyncio.to_thread(
                    self.registry.verify, version, base_sha256=self.base_sha256
                )
                slot.handle = AdapterHandle(
                    name=version, int_id=lora_int_id(manifest.version), path=self.registry.local_path(version)
                )
                async with self.loras.using(slot.handle):  # loads it
                    slot.move(AdapterState.PROBING)
                    probe = await self.engine.generate(
                        [ChatMessage(role="user", content=self.probe_prompt)],
                        SamplingOptions(max_tokens=4),
                        slot.handle,
                        request_id=f"probe-{version}-{time.monotonic_ns()}",
                    )
                if probe.completion_tokens < 1:
                    raise RuntimeError("probe generated no tokens")
            except Exception as exc:  # any failure must leave the old version serving
                slot.move(AdapterState.FAILED, f"{type(exc).__name__}: {exc}")
                self._failures_in_row = self._failures_in_row + 1 if self.last_failure is not None else 1
                self._retry_at = time.monotonic() + min(RETRY_MAX_S, RETRY_FIRST_S * 2 ** (self._failures_in_row - 1))
                self.last_failure = slot
                self.counters.failed += 1
                if slot.handle is not None:
                    with contextlib.suppress(Exception):
                        await self.loras.unload(slot.handle)
                log.error("event=swap_failed to=%s keeps=%s error=%r", version, self.active.version, exc)
                return False
            old, self.active = self.active, slot
            slot.move(AdapterState.READY)
            self.slots[version] = slot
            self.last_failure = None
            self.counters.succeeded += 1
            log.info("event=swap_flipped from=%s to=%s ms=%.0f", old.version, version,
                     (time.perf_counter() - started) * 1000)
            if old.handle is not None:
                old.move(AdapterState.DRAINING)
                self._drains.add(asyncio.get_running_loop().create_task(self._drain(old)))
                self._drains = {t for t in self._drains if not t.done()}
            return True

    async def _drain(self, slot: AdapterSlot) -> None:
        deadline = time.monotonic() + self.drain_timeout_s
        while slot.in_flight > 0 and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        if slot.handle is None or self.active.version == slot.version:  # flipped back meanwhile: keep it
            return
        await self.loras.unload(slot.handle)
        slot.move(AdapterState.UNLOADED)
        self.slots.pop(slot.version, None)

    def status(self) -> dict:
        return {
            "active": self.active.version,
            "active_since": self.active.since,
            "in_flight": self.active.in_flight,
            "adapters": {v: {"state": s.state, "in_flight": s.in_flight} for v, s in self.slots.items()},
            "canary": ({"version": self.canary.version, "share": self.canary.traffic_fraction}
                       if self.canary and self.canary.version != self.active.version else None),
            "swaps_succeeded": self.counters.succeeded,
            "swaps_failed": self.counters.failed,
            "last_failure": (
                {"version": self.last_failure.version, "kind": (self.last_failure.error or "").partition(":")[0],
                 "error": self.last_failure.error}
                if self.last_failure
                else None
            ),
        }


@dataclass
class VersionTally:
    requests: int = 0
    failures: int = 0
    latencies_ms: deque[float] = field(default_factory=lambda: deque(maxlen=TALLY_WINDOW))


class VersionTallies:
    """Users' requests per version on one replica: how many, how many failed, recent latencies. A canary's
    guardrails compare these between its version and the champion's.

    They judge the trial, not the version's lifetime: `restart` begins both arms' tallies afresh when a trial
    starts, and the first `warmup` requests of a version since its tally began (its LoRA's first use in the
    engine, a cold prefix cache) count as requests and failures but are not timed. A version's p99 is 0 (not
    known) until P99_MIN_SAMPLES of its requests were timed."""

    def __init__(self, keep_versions: int = 16, warmup: int = 0) -> None:
        self.keep_versions = keep_versions
        self.warmup = warmup
        self.by_version: dict[str, VersionTally] = {}

    def restart(self, *versions: str) -> None:
        """Forget what `versions` did so far: a canary trial between them starts now."""
        for version in versions:
            self.by_version.pop(version, None)
        log.info("event=tallies_restarted versions=%s", ",".join(versions))

    @contextlib.asynccontextmanager
    async def timed(self, version: str) -> AsyncIterator[None]:
        tally = self.by_version.pop(version, None) or VersionTally()
        self.by_version[version] = tally  # most recently used last; the oldest versions are forgotten
        while len(self.by_version) > self.keep_versions:
            del self.by_version[next(iter(self.by_version))]
        tally.requests += 1
        timed = tally.requests > self.warmup
        started = time.perf_counter()
        try:
            yield
        except PromptTooLongError:  # the request's fault, not the version's
            raise
        except Exception:
            tally.failures += 1
            raise
        if timed:
            tally.latencies_ms.append((time.perf_counter() - started) * 1000)

    def status(self) -> dict[str, dict[str, float]]:
        return {version: {"requests": t.requests, "failures": t.failures,
                          "p99_ms": (percentile(list(t.latencies_ms), 0.99) or 0.0)
                          if len(t.latencies_ms) >= P99_MIN_SAMPLES else 0.0}
                for version, t in self.by_version.items()}


@dataclass
class PinnedCounters:
    loads: int = 0
    evictions: int = 0
    load_seconds: float = 0.0


class AdaptersBusyError(RuntimeError):
    """Every place for one more pinned version holds one answering requests: the caller's 503, with `Retry-After`."""


class PinnedAdaptersBusyError(AdaptersBusyError):
    """Every place for a version asked for by name holds one answering requests."""


BUSY_RETRY_AFTER_S = 2  # what that 503 tells the client to wait: about one request's time


class PinnedAdapters:
    """Versions served by name next to the champions, loaded on demand, least recently used unloaded first.

    At most `capacity` are resident: a new one makes room by unloading the least recently used idle ones,
    and is refused (PinnedAdaptersBusyError) when every one is answering requests, rather than loaded past
    it. A version in use (`in_flight` > 0) is never unloaded, nor one `in_use_elsewhere` says a champion
    holds. Verifying and loading a version (a sha256 of its weights, then the engine's load) wait on
    nothing shared: requests for versions already loaded, or being loaded, go on meanwhile.
    """

    def __init__(self, engine: Engine, *, base_sha256: str, capacity: int,
                 in_use_elsewhere: Callable[[str], bool] = lambda _version: False,
                 loras: LoraResidency | None = None) -> None:
        self.engine = engine
        self.loras = loras or LoraResidency(engine, capacity=UNBOUNDED)
        self.base_sha256 = base_sha256
        self.capacity = capacity
        self.in_use_elsewhere = in_use_elsewhere
        self.slots: OrderedDict[str, AdapterSlot] = OrderedDict()
        self.counters = PinnedCounters()
        self.evaluating: set[str] = set()  # loaded for the gate; may not answer users yet
        self._loading: dict[str, asyncio.Future[AdapterSlot]] = {}  # one load per version, its requests await it
        self._places_reserved = 0  # places taken by versions verified and now loading

    @contextlib.asynccontextmanager
    async def acquire(self, registry: Registry, version: str, *, for_gate: bool = False) -> AsyncIterator[AdapterSlot]:
        """The slot of `version`, loaded if needed; VersionNotFoundError/AdapterIntegrityError if it cannot be,
        PinnedAdaptersBusyError if there is no room for it now.

        A version still `evaluating` answers only the gate (`for_gate`): users never see a candidate
        before the gate has passed it.
        """
        while (slot := self.slots.get(version)) is None:  # (loaded, it may be evicted before this request resumes)
            await self._load_once(registry, version)
        self.slots.move_to_end(version)
        slot.in_flight += 1  # at once (no await since the lookup): it is never unloaded under this request
        try:
            if version in self.evaluating and not for_gate:
                if (await asyncio.to_thread(registry.manifest, version)).status == "evaluating":
                    raise VersionNotFoundError(f"{version} is being evaluated; it answers once the gate passes it")
                self.evaluating.discard(version)
            yield slot
        finally:
            slot.in_flight -= 1

    async def _load_once(self, registry: Registry, version: str) -> None:
        """Load `version`, or wait for the load a concurrent request started (its outcome is ours too)."""
        loading = self._loading.get(version)
        if loading is None:
            loading = self._loading[version] = asyncio.ensure_future(self._load(registry, version))
            loading.add_done_callback(lambda done: self._loaded(version, done))
        await asyncio.shield(loading)  # a request that goes away leaves the load to the others

    def _loaded(self, version: str, load: asyncio.Future[AdapterSlot]) -> None:
        del self._loading[version]
        if not load.cancelled():
            load.exception()  # seen: an error whose requests all went away is not reported as never retrieved

    async def _load(self, registry: Registry, version: str) -> AdapterSlot:
        started = time.perf_counter()
        manifest = await asyncio.to_thread(registry.verify, version, base_sha256=self.base_sha256)
        handle = AdapterHandle(name=version, int_id=lora_int_id(manifest.version), path=registry.local_path(version))
        evicted = self._reserve_place()
        try:
            for old_version, old in evicted:
                await self._unload(old_version, old)
            await self.loras.load(handle)
        finally:
            self._places_reserved -= 1
        if manifest.status == "evaluating":
            self.evaluating.add(version)
        seconds = time.perf_counter() - started
        self.counters.loads += 1
        self.counters.load_seconds += seconds
        log.info("event=pinned_loaded version=%s ms=%.0f resident=%d", version, seconds * 1000, len(self.slots) + 1)
        slot = self.slots[version] = AdapterSlot(version, handle, AdapterState.READY)
        return slot

    def _reserve_place(self) -> list[tuple[str, AdapterSlot]]:
        """Take a place for one more version, evicting the least recently used idle ones to free it.

        No await from the count to the reservation: two loads never take the same place.
        """
        excess = len(self.slots) + self._places_reserved + 1 - self.capacity
        idle = [(version, slot) for version, slot in self.slots.items() if not slot.in_flight][:max(0, excess)]
        if len(idle) < excess:
            raise PinnedAdaptersBusyError(f"all {self.capacity} pinned versions are answering requests")
        for version, _ in idle:
            del self.slots[version]
            self.evaluating.discard(version)
            self.counters.evictions += 1
        self._places_reserved += 1
        return idle

    async def _unload(self, version: str, slot: AdapterSlot) -> None:
        if slot.handle is not None and not self.in_use_elsewhere(version):
            await self.loras.unload(slot.handle)
        log.info("event=pinned_unloaded version=%s resident=%d", version, len(self.slots))

    def status(self) -> dict:
        return {"resident": {v: {"in_flight": s.in_flight} for v, s in self.slots.items()},
                "loads": self.counters.loads, "evictions": self.counters.evictions,
                "load_seconds": round(self.counters.load_seconds, 4)}


@dataclass
class Resident:
    handle: AdapterHandle
    users: int = 0  # requests running on it now: it is never removed under them


@dataclass
class LoraCounters:
    loads: dict[str, int] = field(default_factory=dict)
    evictions: dict[str, int] = field(default_factory=dict)
    load_seconds: dict[str, float] = field(default_factory=dict)


class LoraResidency:
    """The LoRAs in the engine (champions, canaries, pinned versions, candidates under evaluation): loaded on
    demand, at most `capacity` at once, the least recently used idle one removed to make room.

    More tasks than fit still answer, each with its own version: a request waits for its LoRA's load, and only
    for its own: each LoRA has one load of its own (concurrent requests for it await that one), and nothing
    shared is held across the engine's work. The engine's own cache is sized above `capacity`, so it never
    evicts by itself: every load and eviction is counted here, per version, and a LoRA a request is running on
    is never removed under it.
    """

    def __init__(self, engine: Engine, capacity: int) -> None:
        self.engine = engine
        self.capacity = capacity
        self.resident: OrderedDict[int, Resident] = OrderedDict()  # least recently used first
        self.counters = LoraCounters()
        self._loading: dict[int, asyncio.Future[None]] = {}  # one load per LoRA, its requests await it
        self._removing: dict[int, asyncio.Future[None]] = {}  # a LoRA is loaded again only once it is removed
        self._places_reserved = 0  # places taken by LoRAs now loading

    async def load(self, handle: AdapterHandle) -> None:
        """Make `handle` resident (a swap preloads its version before the flip)."""
        await self._resident(handle)

    @contextlib.asynccontextmanager
    async def using(self, handle: AdapterHandle) -> AsyncIterator[None]:
        """Hold `handle` resident while a request runs on it, loading it first if it was evicted."""
        entry = await self._resident(handle)  # no await from its lookup to the count: never evicted in between
        self.resident.move_to_end(handle.int_id)
        entry.users += 1
        try:
            yield
        finally:
            entry.users -= 1

    async def unload(self, handle: AdapterHandle) -> None:
        """Remove a retired version (swapped out and drained, or an unpinned one) now, unless a request uses it."""
        if (loading := self._loading.get(handle.int_id)) is not None:  # retired while loading: once it is in
            await asyncio.wait([loading])
        entry = self.resident.get(handle.int_id)
        if entry is not None and not entry.users:
            del self.resident[handle.int_id]
            await self._remove(handle)

    async def _resident(self, handle: AdapterHandle) -> Resident:
        """The entry of `handle`, loaded if needed; returns with no await after its lookup."""
        while (entry := self.resident.get(handle.int_id)) is None:  # (loaded, it may be evicted before we resume)
            loading = self._loading.get(handle.int_id)
            if loading is None:
                loading = self._loading[handle.int_id] = asyncio.ensure_future(self._load(handle))
                loading.add_done_callback(lambda done, int_id=handle.int_id: self._loaded(int_id, done))
            await asyncio.shield(loading)  # a request that goes away leaves the load to the others
        return entry

    def _loaded(self, int_id: int, load: asyncio.Future[None]) -> None:
        del self._loading[int_id]
        if not load.cancelled():
            load.exception()  # seen: an error whose requests all went away is not reported as never retrieved

    async def _load(self, handle: AdapterHandle) -> None:
        evicted = self._reserve_place()
        try:
            for entry in evicted:
                await self._remove(entry.handle)
            if (removing := self._removing.get(handle.int_id)) is not None:  # evicted a moment ago: gone first
                await asyncio.wait([removing])
            started = time.perf_counter()
            await self.engine.add_adapter(handle)
        finally:
            self._places_reserved -= 1
        seconds = time.perf_counter() - started
        _add(self.counters.loads, handle.name, 1)
        _add(self.counters.load_seconds, handle.name, seconds)
        self.resident[handle.int_id] = Resident(handle)
        log.info("event=lora_loaded version=%s ms=%.0f resident=%d", handle.name, seconds * 1000, len(self.resident))

    def _reserve_place(self) -> list[Resident]:
        """Take a place for one more LoRA, evicting the least recently used idle ones to free it. When every loaded
        LoRA is answering requests, the new one goes past `capacity` for a while (the engine's cache is sized with
        room for that) rather than refuse a swap or a task's request; later loads evict back down. No await from
        the count to the reservation: two loads never take the same place."""
        excess = len(self.resident) + self._places_reserved + 1 - self.capacity
        idle = [entry for entry in self.resident.values() if not entry.users][:max(0, excess)]
        if len(idle) < excess:
            log.warning("event=lora_capacity_exceeded capacity=%d answering=%d", self.capacity,
                        len(self.resident) - len(idle))
        for entry in idle:
            del self.resident[entry.handle.int_id]
            _add(self.counters.evictions, entry.handle.name, 1)
            log.info("event=lora_evicted version=%s resident=%d", entry.handle.name, len(self.resident))
        self._places_reserved += 1
        return idle

    async def _remove(self, handle: AdapterHandle) -> None:
        """Remove from the engine a LoRA already taken out of `resident`; a load of it waits for this."""
        removing = self._removing[handle.int_id] = asyncio.ensure_future(self.engine.remove_adapter(handle))
        removing.add_done_callback(lambda _done: self._removing.pop(handle.int_id, None))
        await asyncio.shield(removing)

    def status(self) -> dict:
        return {"capacity": self.capacity, "resident": [e.handle.name for e in self.resident.values()],
                "loads": dict(self.counters.loads), "evictions": dict(self.counters.evictions),
                "load_seconds": {v: round(s, 4) for v, s in self.counters.load_seconds.items()}}


def _add(counts: dict, key: str, amount: float) -> None:
    counts[key] = counts.get(key, 0) + amount
