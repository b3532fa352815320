"""`flywheel bench fencing`: what fencing adds to an alias move.

A leader moves aliases under the loop lease's epoch (`Registry.fenced`): before it commits, the move reads the
newest epoch claimed (one listing of the lease folder), so a leader whose lease was taken over is refused by the
store. The benchmark moves a scratch task's champion back and forth, unfenced and fenced in turns of
`TURN` moves (a store that speeds up or slows down moves both alike), on a scratch registry beside the
configured one: a folder of its own on the same store (the local disk, or the same object store and bucket).
It reports each kind's p50 and their ratio and difference.
"""

from __future__ import annotations

import statistics
import tempfile
import time
import uuid
from collections.abc import Callable
from pathlib import Path

from pydantic import BaseModel, Field

from flywheel.config import Settings
from flywheel.lease import StoreLease
from flywheel.registry import BaseModelRef, Registry, registry_for

TURN = 10
SCRATCH_BASE = BaseModelRef(id="bench-fencing", sha256="0" * 64)  # no weights are loaded: only aliases move


class FencingReport(BaseModel):
    registry: str = Field(description="Where the scratch registry lived.")
    moves: int = Field(description="Moves of each kind.")
    unfenced_p50_ms: float
    fenced_p50_ms: float
    ratio: float = Field(description="Fenced p50 / unfenced p50.")
    added_ms: float = Field(description="Fenced p50 - unfenced p50.")


def _fake_adapter(path: Path, payload: bytes) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    (path / "adapter_config.json").write_text('{"r": 8}')
    (path / "adapter_model.safetensors").write_bytes(payload)
    return path


def _scratch_uri(settings: Settings, local_root: Path) -> str:
    configured = settings.registry.uri
    if configured and "://" in configured and not configured.startswith("file://"):
        return f"{configured.rstrip('/')}-bench-fencing-{uuid.uuid4().hex[:8]}"
    return str(local_root / "registry")


def run_fencing_bench(settings: Settings, *, moves: int = 200, say: Callable[[str], None] = print) -> FencingReport:
    with tempfile.TemporaryDirectory(prefix="flywheel-bench-fencing-") as tmp:
        root = Path(tmp)
        scratch = settings.model_copy(update={"registry": settings.registry.model_copy(
            update={"uri": _scratch_uri(settings, root)})})
        registry = registry_for(scratch, "bench-fencing")
        versions = [registry.register(_fake_adapter(root / f"adapter-{n}", bytes([n])), base=SCRATCH_BASE).version
                    for n in range(2)]
        lease = StoreLease(registry, holder="bench", lease_s=60.0)
        epoch = lease.claim()
        if epoch is None:
            raise RuntimeError("could not claim the scratch registry's lease")
        fenced = registry.fenced(epoch)
        say(f"moving aliases on {registry.uri}: {moves} unfenced and {moves} fenced moves, in turns of {TURN}")
        times: dict[bool, list[float]] = {False: [], True: []}
        try:
            for n in range(2 * moves):
                is_fenced = (n // TURN) % 2 == 1
                mover: Registry = fenced if is_fenced else registry
                started = time.perf_counter()
                mover.promote(versions[n % 2], actor="bench", reason="fencing benchmark")
                times[is_fenced].append(time.perf_counter() - started)
        finally:
            lease.release()
            if not registry.is_local:
                registry.fs.rm(registry.root, recursive=True)
        unfenced, fenced_p50 = (statistics.median(times[k]) * 1000 for k in (False, True))
        return FencingReport(registry=registry.uri, moves=moves, unfenced_p50_ms=unfenced, fenced_p50_ms=fenced_p50,
                             ratio=fenced_p50 / unfenced, added_ms=fenced_p50 - unfenced)
