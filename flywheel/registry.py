"""The adapter registry: the one contract between training and serving.

Layout under the registry root (a local directory or any fsspec URL)::

    versions/<task>-v<N>/adapter_config.json, adapter_model.safetensors, manifest.json
    bases/<model>-gptq-w<bits>g<group>-v<N>/config.json, model.safetensors, …, manifest.json
    tasks/<task>/task.json                     the task's spec (kind, labels, metric, budgets)
    tasks/<task>/golden.jsonl                  its fixed regression set
    tasks/<task>/history/<seq>.json            one file per alias move, numbered 1, 2, 3 …, never rewritten
    tasks/<task>/aliases.json                  a checkpoint: {"seq": N, "aliases": {"champion": {...}}}

Aliases are per task: one registry holds every task of one base, each with its own champion.

An alias move is committed by creating history entry N+1 exclusively (a hard link on local disk, a
conditional put on object stores): of two concurrent moves exactly one gets N+1, the other re-reads
and retries on top of it, so alias and history can never disagree. The checkpoint only saves reading
the whole history: a reader rolls it forward through any entries written after it.

That makes every move a compare-and-swap: a move may name the champion it expects to replace
(`expected_champion`), checked against the state it commits on top of, so a writer that decided on
an old champion (a retrain that gated against it, a canary reviewed against it) gets
`ChampionChangedError` and changes nothing, never overwriting a promotion made meanwhile. A canary's
promotion ends its trial in the same entry (`ends`), so there is no half-done state between the two.

Base versions are quantized copies of the base model (`flywheel quantize`). Adapters keep naming the
unquantized base they were trained against; a base version names it as its `source`, which is how
serving knows an adapter fits a quantized base.

A version is visible only once its ``manifest.json`` exists, and the manifest is written last (on a
local disk the whole directory appears with one atomic rename), so a reader never sees half a version.
Versions are immutable; promotion and rollback move an alias, never weights.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import json
import logging
import os
import re
import shutil
import tempfile
import threading
import uuid
from collections.abc import Callable
from datetime import UTC, datetime
from functools import lru_cache
from pathlib import Path
from types import EllipsisType
from typing import TYPE_CHECKING, Any, Literal, TypeVar

import fsspec
from fsspec import AbstractFileSystem
from fsspec.implementations.local import LocalFileSystem
from pydantic import BaseModel, Field, ValidationError

from flywheel.tasks import BASE_VERSION_PATTERN, TASK_NAME_PATTERN, TaskSpec

if TYPE_CHECKING:
    from flywheel.config import Settings

WEIGHT_SUFFIXES = (".safetensors", ".bin")
MANIFEST = "manifest.json"
TRAIN_DATA_FILE = "train_data.jsonl"  # in a version: its training rows, each naming the feedback events it came from
CLAIM = ".claim"  # on object stores: the first object of a version, created exclusively
TASK_SPEC, GOLDEN = "task.json", "golden.jsonl"
_TASK_NAME = re.compile(TASK_NAME_PATTERN)
_BASE_VERSION_NAME = re.compile(BASE_VERSION_PATTERN)
_HISTORY_NAME = re.compile(r"\d{10}\.json")
LEASE_DIR = ("loop", "lease")  # the loop lease's epochs (flywheel.lease)
MOVE_ATTEMPTS = 50
CANARY_ALIAS = "canary"  # a version on trial: its record's traffic_fraction is its share (0: no canary)

log = logging.getLogger("flywheel.registry")


class RegistryError(Exception):
    """A registry operation that cannot be done; the message says why."""


class VersionNotFoundError(RegistryError):
    pass


class UnknownTaskError(RegistryError):
    """A task name that neither config nor the registry declares."""


class LoraIds:
    """The LoRA int ids engines know adapters by: a name gets the next number the first time it is asked
    for and keeps it, so no number ever stands for two names (demo-v1 and faq-v1 in one engine included).

    The rule: within an engine, never reuse an adapter name or a LoRA int id. vLLM caches an adapter by
    its id, so one id for two sets of weights would silently answer with the wrong ones; a hash of the
    name (as before) collides for some pairs (demo-v29595 and demo-v56814 under a 31-bit sha256 prefix).
    Numbered per process, the ids are distinct in every engine the process drives.
    """

    def __init__(self) -> None:
        self._ids: dict[str, int] = {}
        self._lock = threading.Lock()  # a replica's event loop and the gate's threads both ask

    def __call__(self, name: str) -> int:
        with self._lock:
            return self._ids.setdefault(name, len(self._ids) + 1)


lora_int_id = LoraIds()


class AdapterIntegrityError(RegistryError):
    """Weights that do not match their manifest, or an adapter built for another base."""


class BaseModelRef(BaseModel):
    id: str = Field(description="What the base was loaded from: a hub id or a directory.")
    sha256: str = Field(description="Fingerprint of the base's config, tokenizer and weights.")


# `evaluating`: registered for the gate to judge on the serving replicas, private to it until concluded
AdapterStatus = Literal["evaluating", "ready", "rejected"]


class AdapterManifest(BaseModel):
    schema_version: int = 1
    version: str
    number: int
    task: str
    parent: str | None = None
    base_model: BaseModelRef
    created_at: datetime
    status: AdapterStatus = "ready"
    files: dict[str, str] = Field(description="File name -> sha256 of every file in the version.")
    lora: dict[str, Any] = Field(default_factory=dict)
    training: dict[str, Any] = Field(default_factory=dict)
    data: dict[str, Any] = Field(default_factory=dict)
    metrics: dict[str, Any] = Field(default_factory=dict)
    gate: dict[str, Any] | None = None


class BaseManifest(BaseModel):
    """A quantized base model: where it came from, how it was made, and how close it stays to its source."""

    schema_version: int = 1
    name: str
    number: int
    method: Literal["gptq"] = "gptq"
    source: BaseModelRef = Field(description="The unquantized base it was made from (adapters name this one).")
    created_at: datetime
    status: Literal["ready", "rejected"] = "ready"
    reason: str = Field("", description="Why a rejected base was refused.")
    files: dict[str, str] = Field(description="File name -> sha256 of every file in the version.")
    quantization: dict[str, Any] = Field(default_factory=dict)
    calibration: dict[str, Any] = Field(default_factory=dict)
    quality: dict[str, Any] = Field(default_factory=dict)
    metrics: dict[str, Any] = Field(default_factory=dict)


class BaseRefusedError(RegistryError):
    """A base version that must not be served: rejected by its quality check, or not built from our base."""


ManifestT = TypeVar("ManifestT", AdapterManifest, BaseManifest)


class AliasRecord(BaseModel):
    version: str
    set_at: datetime
    actor: str
    reason: str = ""
    traffic_fraction: float | None = Field(None, description="For a canary alias: its share of traffic.")


class HistoryEntry(BaseModel):
    seq: int = Field(ge=1, description="Position in the task's history; its creation commits the move.")
    at: datetime
    action: Literal["promote", "rollback", "end"]
    alias: str
    version: str
    previous: str | None
    actor: str
    reason: str = ""
    traffic_fraction: float | None = None
    ends: str | None = Field(None, description="An alias this move also takes to share 0, in the same entry: a "
                             "canary promoted to champion ends its trial.")
    fence: int | None = Field(None, description="The loop lease's epoch the move was made under (a leader's "
                              "move); None: made by hand or by a run.")

    def record(self) -> AliasRecord:
        """The alias as this move left it."""
        return AliasRecord(version=self.version, set_at=self.at, actor=self.actor, reason=self.reason,
                           traffic_fraction=self.traffic_fraction)

    def apply(self, aliases: dict[str, AliasRecord]) -> None:
        """Carry this move out on `aliases` (the state before it)."""
        if self.ends is not None and self.ends in aliases:
            aliases[self.ends] = AliasRecord(version=aliases[self.ends].version, set_at=self.at, actor=self.actor,
                                             reason=self.reason, traffic_fraction=0.0)
        aliases[self.alias] = self.record()


class AliasConflictError(RegistryError):
    """Other writers kept moving the task's aliases: this move gave up (nothing was changed)."""


class _Unchanged(Exception):
    """A move found, on the latest state, that it has nothing left to do."""


class FencedError(RegistryError):
    """A move by a writer that lost its right to move (the loop's lease, or a retrain's lock, was taken over):
    nothing was changed."""


class ChampionChangedError(RegistryError):
    """A move named the champion it expected to replace, and the champion is another now: nothing was changed."""

    def __init__(self, task: str, expected: str | None, actual: AliasRecord | None) -> None:
        self.expected = expected
        self.actual = actual.version if actual else None
        how = f" (set by {actual.actor} at {actual.set_at:%Y-%m-%d %H:%M:%S}Z: {actual.reason})" if actual else ""
        super().__init__(f"the champion of task {task!r} is {self.actual or 'none'}{how}, not "
                         f"{expected or 'none'} as this move expected; nothing was changed")


def _sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


@lru_cache(maxsize=8)
def _fingerprint_dir(path: str, stat_key: tuple[tuple[str, int, int], ...]) -> str:
    digest = hashlib.sha256()
    for name, _size, _mtime in stat_key:
        digest.update(name.encode())
        digest.update(_sha256_file(Path(path) / name).encode())
    return digest.hexdigest()


def fingerprint_base(model: str) -> str:
    """sha256 over a base model's config, tokenizer and weight files (cached per file stat).

    `model` is a local directory or a hub id (resolved through the local HF cache).
    """
    path = Path(model)
    if not path.is_dir():
        from huggingface_hub import snapshot_download

        path = Path(snapshot_download(model))
    names = sorted(
        p.name
        for p in path.iterdir()
        if p.is_file() and (p.suffix in WEIGHT_SUFFIXES or p.name in ("config.json", "tokenizer.json"))
    )
    if "config.json" not in names:
        raise RegistryError(f"{model} is not a model directory: no config.json")
    stat_key = tuple((n, (path / n).stat().st_size, (path / n).stat().st_mtime_ns) for n in names)
    return _fingerprint_dir(str(path.resolve()), stat_key)


def _check_files(name: str, directory: Path, files: dict[str, str]) -> None:
    for file, expected in files.items():
        path = directory / file
        if not path.is_file():
            raise AdapterIntegrityError(f"{name}: file {file} is missing")
        actual = _sha256_file(path)
        if actual != expected:
            raise AdapterIntegrityError(
                f"{name}: {file} sha256 {actual[:12]}… does not match manifest {expected[:12]}…"
            )


def _now() -> datetime:
    return datetime.now(UTC)


class Registry:
    """Adapter versions, aliases and their history for one task."""

    def __init__(
        self, uri: str, task: str, cache_dir: Path | None = None, storage_options: dict[str, Any] | None = None,
    ) -> None:
        if not _TASK_NAME.fullmatch(task):
            raise RegistryError(f"invalid task name {task!r}: use lowercase letters, digits and dashes (max 64)")
        self.uri = uri.rstrip("/")
        self.task = task
        self.fs, self.root = fsspec.core.url_to_fs(self.uri, **(storage_options or {}))
        self.is_local = isinstance(self.fs, LocalFileSystem)
        self._cache_dir = cache_dir or Path(tempfile.gettempdir()) / "flywheel-adapter-cache"
        self._version_re = re.compile(rf"{re.escape(task)}-v(\d+)")
        self.fence: int | None = None  # set by `fenced`: the loop lease's epoch this leader moves aliases under
        self.lost: Callable[[], str | None] | None = None  # set by `guarded`: why this writer may no longer move

    def fenced(self, epoch: int) -> Registry:
        """This registry for the loop's leader holding lease `epoch` (flywheel.lease): each alias move it makes
        carries the epoch and is refused (FencedError) once a newer epoch has been claimed or has moved this
        task's aliases."""
        leader = copy.copy(self)
        leader.fence = epoch
        return leader

    def guarded(self, lost: Callable[[], str | None]) -> Registry:
        """This registry for a writer whose right to move aliases can lapse (a retrain holding the retrain lock):
        before each move `lost()` says why it has lapsed (the move is refused with FencedError), or None."""
        writer = copy.copy(self)
        writer.lost = lost
        return writer

    def loop_epoch(self) -> int:
        """The newest epoch claimed of the loop's lease on this registry (0: never claimed)."""
        return latest_epoch(self.fs, self.path(*LEASE_DIR))

    # -- paths ---------------------------------------------------------------------------------------

    def path(self, *parts: str) -> str:
        return "/".join([self.root, *parts])

    def _check_version_name(self, version: str) -> None:
        if not self._version_re.fullmatch(version):  # a version name becomes a path: refuse anything else
            raise VersionNotFoundError(f"{version!r} is not a version of task {self.task!r} ({self.task}-v<N>)")

    def _version_dir(self, version: str) -> str:
        self._check_version_name(version)
        return self.path("versions", version)

    def _task_path(self, *parts: str) -> str:
        return self.path("tasks", self.task, *parts)

    # -- the task itself -----------------------------------------------------------------------------

    def task_spec(self) -> TaskSpec | None:
        """The spec stored for this task (by `flywheel train` or `flywheel tasks add`), if any."""
        path = self._task_path(TASK_SPEC)
        if not self.fs.exists(path):
            return None
        return TaskSpec.model_validate_json(self.read_text(path))

    def save_task_spec(self, spec: TaskSpec) -> None:
        if spec.name != self.task:
            raise RegistryError(f"spec of task {spec.name!r} cannot be stored under task {self.task!r}")
        self.write_text(self._task_path(TASK_SPEC), spec.model_dump_json(indent=2))

    def golden_text(self) -> str | None:
        """The task's golden set as JSONL text (rows of the training data format), if it has one."""
        path = self._task_path(GOLDEN)
        if not self.fs.exists(path):
            return None
        return self.read_text(path)

    def save_golden(self, jsonl: str) -> None:
        self.write_text(self._task_path(GOLDEN), jsonl)

    def read_text(self, path: str) -> str:
        """A small file, whole, in one request: a stream read of an object replaced meanwhile fails its ETag
        precondition on S3, where one GET sees the old object or the new one."""
        return self.fs.cat_file(path).decode("utf-8")

    def write_text(self, path: str, text: str) -> None:
        """Replace a small file whole: readers see the old or the new text, never a mix."""
        if self.is_local:
            Path(path).parent.mkdir(parents=True, exist_ok=True)
            tmp = f"{path}.{uuid.uuid4().hex}.tmp"
            Path(tmp).write_text(text)
            os.replace(tmp, path)
        else:
            with self.fs.open(path, "w") as f:
                f.write(text)

    # -- versions ------------------------------------------------------------------------------------

    def versions(self) -> list[AdapterManifest]:
        """All complete versions, oldest first."""
        self.fs.invalidate_cache(self.path("versions"))
        if not self.fs.exists(self.path("versions")):
            return []
        manifests = []
        for entry in self.fs.ls(self.path("versions"), detail=False):
            name = entry.rstrip("/").rsplit("/", 1)[-1]
            if self._version_re.fullmatch(name) and self.fs.exists(self.path("versions", name, MANIFEST)):
                manifests.append(self.manifest(name))
        return sorted(manifests, key=lambda m: m.number)

    def manifest(self, version: str) -> AdapterManifest:
        self._check_version_name(version)
        return self._read_manifest("versions", version, AdapterManifest, "adapter version")

    def _read_manifest(self, folder: str, name: str, model: type[ManifestT], what: str) -> ManifestT:
        path = self.path(folder, name, MANIFEST)
        if not self.fs.exists(path):
            raise VersionNotFoundError(f"{what} {name!r} is not in the registry at {self.uri}")
        return model.model_validate_json(self.read_text(path))

    def _next_number(self) -> int:
        numbers = [0]
        self.fs.invalidate_cache(self.path("versions"))
        if self.fs.exists(self.path("versions")):
            for entry in self.fs.ls(self.path("versions"), detail=False):
                match = self._version_re.fullmatch(entry.rstrip("/").rsplit("/", 1)[-1])
                if match:
                    numbers.append(int(match.group(1)))
        return max(numbers) + 1

    def register(
        self,
        adapter_dir: Path,
        *,
        base: BaseModelRef,
        parent: str | None = None,
        status: AdapterStatus = "ready",
        **fields: Any,
    ) -> AdapterManifest:
        """Copy a PEFT adapter directory in as a new immutable version and return its manifest.

        Extra keyword fields (lora, training, data, metrics, gate) go into the manifest as given.
        """
        files = sorted(p for p in Path(adapter_dir).iterdir() if p.is_file() and p.name != MANIFEST)
        if not any(p.name.startswith("adapter_config") for p in files):
            raise RegistryError(f"{adapter_dir} holds no PEFT adapter (adapter_config.json missing)")
        hashes = {p.name: _sha256_file(p) for p in files}
        self.fs.makedirs(self.path("versions"), exist_ok=True)
        for _attempt in range(100):
            number = self._next_number()
            manifest = AdapterManifest(
                version=f"{self.task}-v{number}",
                number=number,
                task=self.task,
                parent=parent,
                base_model=base,
                created_at=_now(),
                status=status,
                files=hashes,
                **fields,
            )
            if self._publish(self._version_dir(manifest.version), manifest, files):
                return manifest
        raise RegistryError("could not allocate a version number after 100 attempts")

    def _publish(self, target: str, manifest: BaseModel, files: list[Path]) -> bool:
        """Write a version; False when its number was taken meanwhile (the caller picks another)."""
        if self.is_local:
            staging = Path(self.path(".staging", uuid.uuid4().hex))
            staging.mkdir(parents=True)
            for p in files:
                shutil.copy2(p, staging / p.name)
            (staging / MANIFEST).write_text(manifest.model_dump_json(indent=2))
            try:
                os.rename(staging, target)  # atomic; fails if another writer took the number
            except OSError:
                shutil.rmtree(staging, ignore_errors=True)
                return False
            return True
        # Claim the name first with an exclusive create: of two writers exactly one uploads into it.
        if not self.create_exclusive(f"{target}/{CLAIM}", uuid.uuid4().hex):
            return False
        for p in files:
            self.fs.put_file(str(p), f"{target}/{p.name}")
        with self.fs.open(f"{target}/{MANIFEST}", "w") as f:  # last: makes the version visible
            f.write(manifest.model_dump_json(indent=2))
        return True

    def conclude(self, version: str, status: Literal["ready", "rejected"], **fields: Any) -> AdapterManifest:
        """Settle an `evaluating` version as ready or rejected, with the gate's findings (`gate`, `metrics`).

        Only the manifest changes (its file hashes stay), replaced whole: a reader sees before or after.
        """
        manifest = self.manifest(version)
        if manifest.status != "evaluating":
            raise RegistryError(f"{version} is {manifest.status}; only an evaluating version can be concluded")
        concluded = manifest.model_copy(update={"status": status, **fields})
        self.write_text(self.path("versions", version, MANIFEST), concluded.model_dump_json(indent=2))
        return concluded

    def redact_train_data(self, version: str, keep: Callable[[dict[str, Any]], bool]) -> int:
        """Drop the training rows of `version` that `keep` refuses (an erasure request: the weights stay, the
        record of personal data goes); returns how many went. The file's hash in the manifest follows."""
        local = self.local_path(version) / TRAIN_DATA_FILE
        if not local.is_file():
            return 0
        lines = [line for line in local.read_text(encoding="utf-8").splitlines() if line.strip()]
        kept = [line for line in lines if keep(json.loads(line))]
        if len(kept) == len(lines):
            return 0
        text = "".join(line + "\n" for line in kept)
        self.write_text(self.path("versions", version, TRAIN_DATA_FILE), text)
        if not self.is_local:  # the node's cached copy goes too: the next use downloads the redacted one
            shutil.rmtree(self._cache_dir / version, ignore_errors=True)
        manifest = self.manifest(version)
        files = {**manifest.files, TRAIN_DATA_FILE: hashlib.sha256(text.encode()).hexdigest()}
        self.write_text(self.path("versions", version, MANIFEST),
                         manifest.model_copy(update={"files": files}).model_dump_json(indent=2))
        return len(lines) - len(kept)

    def verify(self, version: str, *, base_sha256: str | None = None) -> AdapterManifest:
        """Recompute every file's sha256 (and check the base); raise AdapterIntegrityError if off."""
        manifest = self.manifest(version)
        _check_files(version, self.local_path(version), manifest.files)
        if base_sha256 is not None and manifest.base_model.sha256 != base_sha256:
            raise AdapterIntegrityError(
                f"{version} was trained on base {manifest.base_model.id} "
                f"({manifest.base_model.sha256[:12]}…), not on the served base ({base_sha256[:12]}…)"
            )
        return manifest

    def local_path(self, version: str) -> Path:
        """A local directory holding the version's files (downloaded once for remote registries)."""
        return self._local_copy(self._version_dir(version), version)

    def _local_copy(self, remote_dir: str, name: str) -> Path:
        if self.is_local:
            return Path(remote_dir)
        cached = self._cache_dir / name
        if not (cached / MANIFEST).exists():
            staging = self._cache_dir / f".{name}.{uuid.uuid4().hex}"
            self.fs.get(remote_dir + "/", str(staging), recursive=True)
            try:
                staging.rename(cached)
            except OSError:  # another replica on this node finished the same copy first: use that one
                shutil.rmtree(staging, ignore_errors=True)
                if not (cached / MANIFEST).exists():
                    raise
        return cached

    # -- base versions (quantized bases) -------------------------------------------------------------

    def bases(self) -> list[BaseManifest]:
        """All complete base versions, oldest first."""
        if not self.fs.exists(self.path("bases")):
            return []
        names = [e.rstrip("/").rsplit("/", 1)[-1] for e in self.fs.ls(self.path("bases"), detail=False)]
        manifests = [self.base_manifest(n) for n in names if self.fs.exists(self.path("bases", n, MANIFEST))]
        return sorted(manifests, key=lambda m: m.created_at)

    def base_manifest(self, name: str) -> BaseManifest:
        if not _BASE_VERSION_NAME.fullmatch(name):  # a base version name becomes a path: refuse anything else
            raise VersionNotFoundError(f"{name!r} is not a base version name (<model>-gptq-w<bits>g<group>-v<N>)")
        return self._read_manifest("bases", name, BaseManifest, "base version")

    def register_base(
        self, model_dir: Path, *, prefix: str, source: BaseModelRef,
        status: Literal["ready", "rejected"] = "ready", **fields: Any,
    ) -> BaseManifest:
        """Copy a quantized model directory in as base version `<prefix>-v<N>` and return its manifest."""
        files = sorted(p for p in Path(model_dir).iterdir() if p.is_file() and p.name != MANIFEST)
        if not any(p.name == "config.json" for p in files):
            raise RegistryError(f"{model_dir} is not a model directory: no config.json")
        hashes = {p.name: _sha256_file(p) for p in files}
        self.fs.makedirs(self.path("bases"), exist_ok=True)
        pattern = re.compile(rf"{re.escape(prefix)}-v(\d+)")
        for _attempt in range(100):
            entries = self.fs.ls(self.path("bases"), detail=False)
            taken = [pattern.fullmatch(e.rstrip("/").rsplit("/", 1)[-1]) for e in entries]
            number = max([0, *(int(m.group(1)) for m in taken if m)]) + 1
            manifest = BaseManifest(name=f"{prefix}-v{number}", number=number, source=source, created_at=_now(),
                                    status=status, files=hashes, **fields)
            if self._publish(self.path("bases", manifest.name), manifest, files):
                return manifest
        raise RegistryError("could not allocate a base version number after 100 attempts")

    def base_path(self, name: str, *, source_sha256: str) -> tuple[Path, BaseManifest]:
        """The local directory of a servable base version, after checking its files, status and source.

        Raises BaseRefusedError for a base its quality check rejected, or one made from another base.
        """
        manifest = self.base_manifest(name)
        if manifest.status != "ready":
            raise BaseRefusedError(f"base version {name} was refused and is never served: {manifest.reason}")
        if manifest.source.sha256 != source_sha256:
            raise BaseRefusedError(
                f"base version {name} was made from {manifest.source.id} ({manifest.source.sha256[:12]}…), "
                f"not from the configured base ({source_sha256[:12]}…)"
            )
        local = self._local_copy(self.path("bases", name), f"base-{name}")
        _check_files(name, local, manifest.files)
        return local, manifest

    # -- aliases -------------------------------------------------------------------------------------

    def aliases(self) -> dict[str, AliasRecord]:
        return self._alias_state()[1]

    def canary_on_trial(self, aliases: dict[str, AliasRecord] | None = None) -> AliasRecord | None:
        """The canary alias while a version other than the champion is on trial (a share above 0)."""
        aliases = self.aliases() if aliases is None else aliases
        canary, champion = aliases.get(CANARY_ALIAS), aliases.get("champion")
        if canary is None or not canary.traffic_fraction or (champion and champion.version == canary.version):
            return None
        return canary

    def alias(self, name: str = "champion") -> str | None:
        record = self.aliases().get(name)
        return record.version if record else None

    def _history_path(self, seq: int) -> str:
        return self._task_path("history", f"{seq:010d}.json")

    def _alias_state(self) -> tuple[int, dict[str, AliasRecord], int]:
        """(seq of the latest move, aliases after it, the newest lease epoch a move carried): the checkpoint,
        rolled forward."""
        self.fs.invalidate_cache(self._task_path("history"))  # object-store listings are cached; moves are not
        seq, aliases, fence = 0, {}, 0
        path = self._task_path("aliases.json")
        if self.fs.exists(path):
            raw = json.loads(self.read_text(path))
            if "seq" not in raw:  # written before moves were numbered: {alias: record}
                raw = {"seq": 0, "aliases": raw}
            seq, fence = raw["seq"], raw.get("fence", 0)
            aliases = {name: AliasRecord.model_validate(r) for name, r in raw["aliases"].items()}
        while self.fs.exists(self._history_path(seq + 1)):  # moves committed after the checkpoint
            seq += 1
            entry = self._history_entry(self._history_path(seq))
            if entry is not None:
                entry.apply(aliases)
                fence = max(fence, entry.fence or 0)
        return seq, aliases, fence

    def _history_entry(self, path: str) -> HistoryEntry | None:
        try:
            return HistoryEntry.model_validate_json(self.read_text(path))
        except (OSError, ValidationError) as exc:  # one unreadable entry must not break status or rollback
            log.error("event=history_entry_unreadable task=%s path=%s error=%r", self.task, path, exc)
            return None

    def history(self, alias: str | None = None) -> list[HistoryEntry]:
        folder = self._task_path("history")
        self.fs.invalidate_cache(folder)
        if not self.fs.exists(folder):
            return []
        paths = sorted(p for p in self.fs.ls(folder, detail=False) if _HISTORY_NAME.fullmatch(p.rsplit("/", 1)[-1]))
        entries = [e for e in map(self._history_entry, paths) if e is not None]
        return [e for e in entries if alias is None or alias in (e.alias, e.ends)]

    def promote(
        self, version: str, *, alias: str = "champion", actor: str, reason: str = "",
        traffic_fraction: float | None = None, expected_champion: str | EllipsisType | None = ...,
    ) -> HistoryEntry:
        """Point `alias` at `version` after checking its weights and that it fits the current base.

        `expected_champion`: the champion this move was decided against (None: that there is none); if the
        champion is another when the move commits, ChampionChangedError and nothing changes. `...`: unchecked.
        """
        manifest = self.verify(version)
        if manifest.status != "ready":
            raise RegistryError(f"{version} is {manifest.status}; only ready versions can be promoted")

        def onto(aliases: dict[str, AliasRecord]) -> tuple[str, str | None]:
            current = aliases[alias].version if alias in aliases else None
            if current is not None:
                current_base = self.manifest(current).base_model
                if current_base.sha256 != manifest.base_model.sha256:
                    raise AdapterIntegrityError(
                        f"{version} was trained on base {manifest.base_model.id}, but {alias} {current} "
                        f"serves on base {current_base.id}"
                    )
            return version, current

        return self._move(alias, "promote", onto, actor=actor, reason=reason, traffic_fraction=traffic_fraction,
                          expected_champion=expected_champion)

    def promote_canary(self, version: str, *, expected_champion: str, actor: str, reason: str) -> HistoryEntry:
        """Make the canary on trial, `version`, champion and end its trial: one move, so never half done.

        Refused (nothing changed) if `version` is no longer on trial or the champion is not `expected_champion`.
        """
        manifest = self.verify(version)
        if manifest.status != "ready":
            raise RegistryError(f"{version} is {manifest.status}; only ready versions can be promoted")

        def canary_on_trial(aliases: dict[str, AliasRecord]) -> tuple[str, str | None]:
            canary = aliases.get(CANARY_ALIAS)
            if canary is None or canary.version != version or not canary.traffic_fraction:
                raise RegistryError(f"{version} is not on trial as the canary of task {self.task!r}; nothing was "
                                    "changed")
            return version, aliases["champion"].version if "champion" in aliases else None

        return self._move("champion", "promote", canary_on_trial, actor=actor, reason=reason,
                          expected_champion=expected_champion, ends=CANARY_ALIAS)

    def rollback(
        self, *, alias: str = "champion", actor: str, reason: str = "",
        expected_champion: str | EllipsisType | None = ...,
    ) -> HistoryEntry:
        """Undo the latest promotion of `alias` (repeatable: each call goes one step further back)."""

        def back(_aliases: dict[str, AliasRecord]) -> tuple[str, str | None]:
            stack: list[str] = []
            for entry in self.history(alias):
                if entry.alias != alias:  # a move of another alias that also ended this one
                    continue
                if entry.action == "promote":
                    stack.append(entry.version)
                elif stack:
                    stack.pop()
            if len(stack) < 2:
                raise RegistryError(f"nothing to roll back to: {alias} has no earlier version in its history")
            self.verify(stack[-2])
            return stack[-2], stack[-1]

        return self._move(alias, "rollback", back, actor=actor, reason=reason, expected_champion=expected_champion)

    def end_canary(self, *, actor: str, reason: str, version: str | None = None) -> HistoryEntry | None:
        """Take the canary's share of traffic to 0 (its version stays named, for the record); None if none ran.

        `version`: end the trial only if that version is the one on trial (a verdict on one canary must not end
        another's trial started meanwhile)."""
        current = self.aliases().get(CANARY_ALIAS)
        if current is None or not current.traffic_fraction or version not in (None, current.version):
            return None

        def keep(aliases: dict[str, AliasRecord]) -> tuple[str, str | None]:
            on_trial = aliases[CANARY_ALIAS]
            if version not in (None, on_trial.version) or not on_trial.traffic_fraction:
                raise _Unchanged  # ended (or replaced) by another writer meanwhile
            return on_trial.version, on_trial.version

        try:
            return self._move(CANARY_ALIAS, "end", keep, actor=actor, reason=reason, traffic_fraction=0.0)
        except _Unchanged:
            return None

    def _move(
        self, alias: str, action: Literal["promote", "rollback", "end"],
        choose: Callable[[dict[str, AliasRecord]], tuple[str, str | None]],
        *, actor: str, reason: str, traffic_fraction: float | None = None,
        expected_champion: str | EllipsisType | None = ..., ends: str | None = None,
    ) -> HistoryEntry:
        """Commit one alias move on top of the latest state; `choose(aliases)` -> (version, previous).

        The expected champion is checked against the very state the entry commits on top of (entry N+1 is
        created exclusively), so the check and the move are one compare-and-swap."""
        for _attempt in range(MOVE_ATTEMPTS):
            seq, aliases, fence = self._alias_state()
            if self.fence is not None and (newest := max(fence, self.loop_epoch())) > self.fence:
                why: str | None = (f"the loop's lease it was made under (epoch {self.fence}) was taken over "
                                   f"(epoch {newest})")
            else:
                why = self.lost() if self.lost is not None else None
            if why:
                raise FencedError(f"{why}: its move of {alias!r} in task {self.task!r} was refused; nothing was "
                                  "changed")
            champion = aliases.get("champion")
            if expected_champion is not ... and (champion.version if champion else None) != expected_champion:
                raise ChampionChangedError(self.task, expected_champion, champion)
            version, previous = choose(aliases)
            entry = HistoryEntry(seq=seq + 1, at=_now(), action=action, alias=alias, version=version,
                                 previous=previous, actor=actor, reason=reason, traffic_fraction=traffic_fraction,
                                 ends=ends, fence=self.fence)
            if self.create_exclusive(self._history_path(entry.seq), entry.model_dump_json()):
                entry.apply(aliases)
                checkpoint = {"seq": entry.seq, "fence": max(fence, self.fence or 0),
                              "aliases": {k: v.model_dump(mode="json") for k, v in aliases.items()}}
                self.write_text(self._task_path("aliases.json"), json.dumps(checkpoint, indent=2))
                return entry
            log.info("event=alias_move_retry task=%s alias=%s seq=%d", self.task, alias, entry.seq)
        raise AliasConflictError(f"the aliases of task {self.task!r} kept moving under {MOVE_ATTEMPTS} attempts; "
                                 "nothing was changed, try again")

    def create_exclusive(self, path: str, text: str) -> bool:
        """Create `path` holding `text` unless it exists; False if another writer created it first."""
        return create_exclusive(self.fs, path, text)


def create_exclusive(fs: AbstractFileSystem, path: str, text: str, *, private: bool = False) -> bool:
    """Create `path` on `fs` holding `text` unless it exists; False if another writer created it first.
    `private`: readable by its owner only, where the store has file modes (a local disk)."""
    if isinstance(fs, LocalFileSystem):
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        tmp = f"{path}.{uuid.uuid4().hex}.tmp"
        Path(tmp).write_text(text)
        if private:
            Path(tmp).chmod(0o600)
        try:
            os.link(tmp, path)  # atomic and exclusive: readers see the whole entry or none
        except FileExistsError:
            return False
        finally:
            os.unlink(tmp)
        return True
    try:
        with fs.open(path, "xb") as f:  # a conditional put (If-None-Match) on stores that have one
            f.write(text.encode())
    except (ValueError, NotImplementedError):  # a store without exclusive writes: best effort
        log.warning("event=no_exclusive_write path=%s: concurrent writers could collide", path)
        if fs.exists(path):
            return False
        with fs.open(path, "wb") as f:
            f.write(text.encode())
    except OSError:  # FileExistsError, or S3's 412 PreconditionFailed: someone else created it
        fs.invalidate_cache(path.rsplit("/", 1)[0])
        if fs.exists(path):
            return False
        raise
    return True


def latest_epoch(fs: AbstractFileSystem, folder: str) -> int:
    """The highest epoch claimed in `folder`, whose claims are `<epoch>.json` files (0: none)."""
    fs.invalidate_cache(folder)
    if not fs.exists(folder):
        return 0
    names = (p.rsplit("/", 1)[-1] for p in fs.ls(folder, detail=False))
    return max((int(n[:-5]) for n in names if n.endswith(".json") and n[:-5].isdigit()), default=0)


def forget_epochs_before(fs: AbstractFileSystem, folder: str, epoch: int) -> None:
    """Delete the files of epochs older than `epoch` in `folder` (`<epoch>.json`, and a lease's `<epoch>.beat`):
    only the newest count, and a folder listed on every renewal must not grow forever."""
    fs.invalidate_cache(folder)
    for path in fs.ls(folder, detail=False) if fs.exists(folder) else []:
        number, _, kind = path.rsplit("/", 1)[-1].partition(".")
        if number.isdigit() and kind in ("json", "beat") and int(number) < epoch:
            with contextlib.suppress(FileNotFoundError):  # another writer forgot it first
                fs.rm_file(path)


def task_names(uri: str, storage_options: dict[str, Any] | None = None) -> list[str]:
    """Tasks that have anything in the registry at `uri` (a spec, versions or aliases)."""
    fs, root = fsspec.core.url_to_fs(uri.rstrip("/"), **(storage_options or {}))
    fs.invalidate_cache(f"{root}/tasks")
    fs.invalidate_cache(f"{root}/versions")
    names: set[str] = set()
    if fs.exists(f"{root}/tasks"):
        names |= {e.rstrip("/").rsplit("/", 1)[-1] for e in fs.ls(f"{root}/tasks", detail=False)}
    if fs.exists(f"{root}/versions"):
        names |= {e.rstrip("/").rsplit("/", 1)[-1].rsplit("-v", 1)[0] for e in fs.ls(f"{root}/versions", detail=False)}
    return sorted(n for n in names if _TASK_NAME.fullmatch(n))


def registry_for(settings: Settings, task: str | None = None) -> Registry:
    """The registry of `task` (default: the settings' default task)."""
    return Registry(settings.registry_uri, task or settings.default_task, cache_dir=settings.home / "cache",
                    storage_options=settings.registry.storage_options)


def known_tasks(settings: Settings) -> dict[str, TaskSpec]:
    """Every task this platform serves: declared in config, or stored in the registry (`flywheel train`).

    Config wins over a stored spec of the same name: it is what the operator declared last.
    """
    tasks: dict[str, TaskSpec] = {}
    for name in task_names(settings.registry_uri, settings.registry.storage_options):
        try:
            spec = registry_for(settings, name).task_spec()
        except (OSError, ValidationError):
            continue
        if spec is not None:
            tasks[name] = spec
    tasks.update({t.name: t for t in settings.tasks})
    return tasks


def resolve_task(settings: Settings, name: str | None = None) -> TaskSpec:
    """The spec of task `name` (default: the settings' default task); UnknownTaskError names the known ones."""
    name = name or settings.default_task
    tasks = known_tasks(settings)
    if name not in tasks:
        raise UnknownTaskError(f"unknown task {name!r}; known tasks: {', '.join(sorted(tasks)) or 'none'}")
    return tasks[name]
