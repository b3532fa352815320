"""The registry contract: immutable versions, verified promotion, aliases and their history."""

from __future__ import annotations

import itertools
import json
import multiprocessing
import threading
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import pytest
from pydantic import TypeAdapter, ValidationError

from flywheel.config import ModelSettings
from flywheel.registry import (
    AdapterIntegrityError,
    BaseModelRef,
    BaseRefusedError,
    ChampionChangedError,
    Registry,
    RegistryError,
    VersionNotFoundError,
    fingerprint_base,
)
from flywheel.tasks import BaseVersionName, TaskName, VersionName

BASE = BaseModelRef(id="demo", sha256="a" * 64)
OTHER_BASE = BaseModelRef(id="other", sha256="b" * 64)


def fake_adapter(path: Path, payload: bytes = b"weights") -> Path:
    path.mkdir(parents=True, exist_ok=True)
    (path / "adapter_config.json").write_text(json.dumps({"r": 16}))
    (path / "adapter_model.safetensors").write_bytes(payload)
    return path


@pytest.fixture
def registry(tmp_path: Path) -> Registry:
    return Registry(str(tmp_path / "registry"), "demo")


def test_register_assigns_increasing_versions_and_hashes(registry: Registry, tmp_path: Path) -> None:
    v1 = registry.register(fake_adapter(tmp_path / "a1", b"one"), base=BASE, metrics={"loss": 1.0})
    v2 = registry.register(fake_adapter(tmp_path / "a2", b"two"), base=BASE, parent=v1.version)
    assert (v1.version, v2.version) == ("demo-v1", "demo-v2")
    assert v2.parent == "demo-v1"
    assert [m.version for m in registry.versions()] == ["demo-v1", "demo-v2"]
    assert registry.manifest("demo-v1").metrics == {"loss": 1.0}
    assert set(v1.files) == {"adapter_config.json", "adapter_model.safetensors"}
    assert v1.files["adapter_model.safetensors"] != v2.files["adapter_model.safetensors"]


def in_threads(*work: Callable[[], object]) -> list[object]:
    """Run each callable in a thread of its own, all at once; their results once all are done."""
    results: list[object] = []
    threads = [threading.Thread(target=lambda w=w: results.append(w())) for w in work]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return results


def test_concurrent_registrations_never_share_a_version(registry: Registry, tmp_path: Path) -> None:
    sources = [fake_adapter(tmp_path / f"a{i}", str(i).encode()) for i in range(6)]
    results = [m.version for m in in_threads(*(lambda s=s: registry.register(s, base=BASE) for s in sources))]
    assert sorted(results) == sorted(f"demo-v{i}" for i in range(1, 7))
    for manifest in registry.versions():
        registry.verify(manifest.version)


def test_half_written_version_is_invisible(registry: Registry, tmp_path: Path) -> None:
    registry.register(fake_adapter(tmp_path / "a1"), base=BASE)
    half = Path(registry.root) / "versions" / "demo-v2"
    half.mkdir()
    (half / "adapter_model.safetensors").write_bytes(b"partial")  # no manifest yet
    assert [m.version for m in registry.versions()] == ["demo-v1"]
    with pytest.raises(VersionNotFoundError):
        registry.manifest("demo-v2")


def test_register_refuses_a_directory_without_an_adapter(registry: Registry, tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    with pytest.raises(RegistryError, match="adapter_config"):
        registry.register(tmp_path / "empty", base=BASE)


def test_tampered_weights_cannot_be_promoted(registry: Registry, tmp_path: Path) -> None:
    v1 = registry.register(fake_adapter(tmp_path / "a1", b"one"), base=BASE)
    registry.promote(v1.version, actor="test")
    v2 = registry.register(fake_adapter(tmp_path / "a2", b"two"), base=BASE)
    (registry.local_path(v2.version) / "adapter_model.safetensors").write_bytes(b"corrupted")
    with pytest.raises(AdapterIntegrityError, match="sha256"):
        registry.promote(v2.version, actor="test")
    assert registry.alias("champion") == "demo-v1"


def test_adapter_for_another_base_is_refused(registry: Registry, tmp_path: Path) -> None:
    v1 = registry.register(fake_adapter(tmp_path / "a1", b"one"), base=BASE)
    registry.promote(v1.version, actor="test")
    v2 = registry.register(fake_adapter(tmp_path / "a2", b"two"), base=OTHER_BASE)
    with pytest.raises(AdapterIntegrityError, match="base"):
        registry.promote(v2.version, actor="test")
    with pytest.raises(AdapterIntegrityError, match="served base"):
        registry.verify(v2.version, base_sha256=BASE.sha256)


def test_rejected_versions_cannot_be_promoted(registry: Registry, tmp_path: Path) -> None:
    v1 = registry.register(fake_adapter(tmp_path / "a1"), base=BASE, status="rejected")
    with pytest.raises(RegistryError, match="rejected"):
        registry.promote(v1.version, actor="test")


def test_promote_and_rollback_keep_an_append_only_history(registry: Registry, tmp_path: Path) -> None:
    versions = [registry.register(fake_adapter(tmp_path / f"a{i}", bytes([i])), base=BASE).version
                for i in range(3)]
    with pytest.raises(RegistryError, match="nothing to roll back"):
        registry.rollback(actor="ops")
    for version in versions:
        registry.promote(version, actor="ops", reason=f"ship {version}")
    assert registry.alias("champion") == "demo-v3"
    assert registry.rollback(actor="ops", reason="bad ratings").version == "demo-v2"
    assert registry.rollback(actor="ops").version == "demo-v1"
    with pytest.raises(RegistryError):
        registry.rollback(actor="ops")
    history = registry.history("champion")
    assert [(e.action, e.previous, e.version) for e in history] == [
        ("promote", None, "demo-v1"),
        ("promote", "demo-v1", "demo-v2"),
        ("promote", "demo-v2", "demo-v3"),
        ("rollback", "demo-v3", "demo-v2"),
        ("rollback", "demo-v2", "demo-v1"),
    ]
    assert history[3].reason == "bad ratings" and history[3].actor == "ops"
    aliases = registry.aliases()
    assert aliases["champion"].version == "demo-v1"


def _promote_many(root: str, versions: list[str], worker: int) -> list[int]:
    registry = Registry(root, "demo")
    return [registry.promote(versions[(worker + i) % len(versions)], actor=f"w{worker}").seq for i in range(10)]


def test_concurrent_promotes_leave_one_consistent_alias_and_history(registry: Registry, tmp_path: Path) -> None:
    """Four processes promote at once: every move lands once, in one order, and the alias is the last."""
    versions = [registry.register(fake_adapter(tmp_path / f"a{i}", bytes([i])), base=BASE).version
                for i in range(3)]
    with ProcessPoolExecutor(4, mp_context=multiprocessing.get_context("fork")) as pool:
        seqs = [s for done in [pool.submit(_promote_many, registry.uri, versions, w) for w in range(4)]
                for s in done.result()]
    assert sorted(seqs) == list(range(1, 41))  # 40 moves, 40 distinct positions: none lost, none doubled
    history = registry.history()
    assert [e.seq for e in history] == list(range(1, 41))
    assert all(later.previous == earlier.version for earlier, later in itertools.pairwise(history))
    assert registry.alias("champion") == history[-1].version
    rolled = registry.rollback(actor="ops")
    assert registry.alias("champion") == rolled.version and rolled.previous == history[-1].version


def test_a_broken_history_entry_breaks_neither_alias_nor_history(registry: Registry, tmp_path: Path) -> None:
    v1, v2 = (registry.register(fake_adapter(tmp_path / f"a{i}", bytes([i])), base=BASE).version for i in range(2))
    registry.promote(v1, actor="ops")
    history_dir = Path(registry.root) / "tasks" / "demo" / "history"
    (history_dir / "0000000002.json").write_text('{"seq": 2, "at": "2026-')  # e.g. a disk that lost a write
    assert registry.alias("champion") == v1 and len(registry.history()) == 1
    assert registry.promote(v2, actor="ops").seq == 3
    assert registry.alias("champion") == v2 and [e.seq for e in registry.history()] == [1, 3]
    (Path(registry.root) / "tasks" / "demo" / "aliases.json").unlink()  # the checkpoint is only a shortcut
    assert registry.alias("champion") == v2


def test_unknown_version_is_a_clear_error(registry: Registry) -> None:
    with pytest.raises(VersionNotFoundError, match="demo-v9"):
        registry.promote("demo-v9", actor="test")


@pytest.mark.parametrize("name", ["demo-v1\n", "demo-v1/", "demo-v1 "])
def test_a_version_name_with_anything_after_it_is_refused(registry: Registry, tmp_path: Path, name: str) -> None:
    """Python's `$` matches before a final newline: "demo-v1\n" must not pass as (a path beside) demo-v1."""
    registry.register(fake_adapter(tmp_path / "a1"), base=BASE)
    with pytest.raises(VersionNotFoundError, match="is not a version of task 'demo'"):
        registry.manifest(name)
    with pytest.raises(VersionNotFoundError, match="is not a version of task 'demo'"):
        registry.promote(name, actor="test")
    with pytest.raises(VersionNotFoundError, match="is not a base version name"):
        registry.base_manifest("demo-gptq-w4g128-v1\n")


def test_pydantic_name_patterns_end_at_the_end_of_the_text() -> None:
    """pydantic checks `pattern=` with Rust's regex, where `$` is the end of the text: no final newline passes."""
    for name_type, name in ((TaskName, "demo"), (VersionName, "demo-v1"), (BaseVersionName, "demo-gptq-w4g128-v1")):
        names = TypeAdapter(name_type)
        assert names.validate_python(name) == name
        with pytest.raises(ValidationError):
            names.validate_python(name + "\n")
    assert ModelSettings(quantized_base="DeepSeek-R1-Distill-Qwen-1.5B-gptq-w4g128-v1").quantized_base
    for bad_base in ("demo-gptq-w4g128-v1\n", "../demo-gptq-w4g128-v1", "demo-gptq"):
        with pytest.raises(ValidationError):
            ModelSettings(quantized_base=bad_base)


def test_remote_style_registry_through_fsspec(tmp_path: Path) -> None:
    """A non-local filesystem (fsspec memory://) takes the upload-then-manifest path."""
    registry = Registry("memory://flywheel-test-registry", "demo", cache_dir=tmp_path / "cache")
    v1 = registry.register(fake_adapter(tmp_path / "a1", b"one"), base=BASE)
    registry.promote(v1.version, actor="test")
    assert not registry.is_local
    assert registry.alias("champion") == "demo-v1"
    assert (registry.local_path("demo-v1") / "adapter_model.safetensors").read_bytes() == b"one"
    registry.verify("demo-v1", base_sha256=BASE.sha256)


def test_replicas_copying_the_same_version_at_once_both_get_it(tmp_path: Path) -> None:
    """Two replicas on one node download a remote version into the shared cache at the same moment."""
    registry = Registry("memory://flywheel-cache-race", "demo", cache_dir=tmp_path / "cache")
    registry.register(fake_adapter(tmp_path / "a1", b"one"), base=BASE)
    both_downloaded = threading.Barrier(2)
    download = registry.fs.get
    # fsspec's memory filesystem hands every reader one shared file object, so two reads at once can tear
    # (S3 and GCS do not): the downloads take turns, and the race under test is the one between the renames.
    one_reader = threading.Lock()

    def slow_get(*args: object, **kwargs: object) -> None:
        with one_reader:
            download(*args, **kwargs)
        both_downloaded.wait(timeout=10)  # neither renames its copy before the other has one too

    registry.fs.get = slow_get  # type: ignore[method-assign]
    try:
        results: list[object] = []
        threads = [threading.Thread(target=lambda: results.append(_path_or_error(registry))) for _ in range(2)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    finally:
        del registry.fs.get
    assert results == [tmp_path / "cache" / "demo-v1"] * 2
    assert [p.name for p in (tmp_path / "cache").iterdir()] == ["demo-v1"]  # no staging copy left behind
    registry.verify("demo-v1", base_sha256=BASE.sha256)


def _path_or_error(registry: Registry) -> object:
    try:
        return registry.local_path("demo-v1")
    except Exception as exc:  # the test reports it
        return exc


def test_base_fingerprint_changes_with_weights(tmp_path: Path) -> None:
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text("{}")
    (model / "model.safetensors").write_bytes(b"one")
    first = fingerprint_base(str(model))
    assert fingerprint_base(str(model)) == first
    (model / "model.safetensors").write_bytes(b"two!")
    assert fingerprint_base(str(model)) != first
    with pytest.raises(RegistryError, match=r"config\.json"):
        fingerprint_base(str(tmp_path))


def fake_model(path: Path, payload: bytes = b"packed int4") -> Path:
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps({"quantization_config": {"quant_method": "gptq"}}))
    (path / "model.safetensors").write_bytes(payload)
    return path


@pytest.mark.parametrize("uri", ["local", "memory://flywheel-test-bases"])
def test_base_versions_number_per_shape_and_serve_only_when_ready_and_ours(
    uri: str, tmp_path: Path
) -> None:
    registry = Registry(str(tmp_path / "registry") if uri == "local" else uri, "demo", cache_dir=tmp_path / "c")
    w4 = registry.register_base(fake_model(tmp_path / "q1"), prefix="demo-gptq-w4g128", source=BASE,
                                quantization={"bits": 4}, quality={"top1_agreement": 0.99})
    again = registry.register_base(fake_model(tmp_path / "q2"), prefix="demo-gptq-w4g128", source=BASE)
    w2 = registry.register_base(fake_model(tmp_path / "q3"), prefix="demo-gptq-w2g32", source=BASE,
                                status="rejected", reason="top-1 agreement 0.41 below 0.90")
    assert (w4.name, again.name, w2.name) == ("demo-gptq-w4g128-v1", "demo-gptq-w4g128-v2", "demo-gptq-w2g32-v1")
    assert [m.name for m in registry.bases()] == [w4.name, again.name, w2.name]
    assert registry.base_manifest(w4.name).quality == {"top1_agreement": 0.99}

    path, manifest = registry.base_path(w4.name, source_sha256=BASE.sha256)
    assert (path / "model.safetensors").read_bytes() == b"packed int4" and manifest.quantization == {"bits": 4}
    with pytest.raises(BaseRefusedError, match=r"never served: top-1 agreement 0\.41"):
        registry.base_path(w2.name, source_sha256=BASE.sha256)
    with pytest.raises(BaseRefusedError, match="not from the configured base"):
        registry.base_path(w4.name, source_sha256=OTHER_BASE.sha256)
    with pytest.raises(VersionNotFoundError, match="demo-gptq-w4g128-v9"):
        registry.base_path("demo-gptq-w4g128-v9", source_sha256=BASE.sha256)
    (path / "model.safetensors").write_bytes(b"tampered")
    with pytest.raises(AdapterIntegrityError, match="sha256"):
        registry.base_path(w4.name, source_sha256=BASE.sha256)
    assert [m.version for m in registry.versions()] == [], "base versions are not adapter versions"


def test_an_evaluating_candidate_is_concluded_once_and_only_a_ready_one_is_promoted(
    registry: Registry, tmp_path: Path,
) -> None:
    v1 = registry.register(fake_adapter(tmp_path / "a1", b"one"), base=BASE)
    registry.promote(v1.version, actor="test")
    candidate = registry.register(fake_adapter(tmp_path / "a2", b"two"), base=BASE, status="evaluating")
    with pytest.raises(RegistryError, match="evaluating; only ready"):
        registry.promote(candidate.version, actor="test")
    concluded = registry.conclude(candidate.version, "ready", gate={"passed": True})
    assert registry.manifest(candidate.version) == concluded and concluded.gate == {"passed": True}
    assert registry.verify(candidate.version).files == candidate.files  # the weights' hashes are untouched
    with pytest.raises(RegistryError, match="only an evaluating version"):
        registry.conclude(candidate.version, "rejected")
    registry.promote(candidate.version, actor="test")
    assert registry.alias("champion") == candidate.version


def test_benchmarks_add_their_tasks_to_a_scratch_registry_never_the_users(home_copy: Path, tmp_path: Path) -> None:
    from flywheel.registry import known_tasks, registry_for
    from loadtests.bench_openai import add_tasks, scratch_registry
    from tests.conftest import make_settings

    settings = make_settings(home_copy)
    users = registry_for(settings)
    before = (set(known_tasks(settings)), users.aliases(), [m.version for m in users.versions()])
    scratch = scratch_registry(settings, tmp_path / "scratch")
    copy = registry_for(scratch)
    champion = copy.alias("champion")
    assert copy.manifest(champion).files == users.manifest(users.alias("champion")).files, "the champion's weights"
    [added] = add_tasks(scratch, [copy.local_path(champion)], 1)
    assert set(known_tasks(scratch)) == {settings.default_task, added}
    assert registry_for(scratch, added).alias("champion") == f"{added}-v1"
    assert (set(known_tasks(settings)), users.aliases(), [m.version for m in users.versions()]) == before


# -- compare-and-swap: a move names the champion it expects to replace ---------------------------------------------


def _promote_expecting(root: str, version: str, expected: str) -> str:
    try:
        Registry(root, "demo").promote(version, actor=f"w-{version}", expected_champion=expected)
    except ChampionChangedError as exc:
        return f"refused: {exc.actual}"
    return "moved"


def test_a_move_that_expects_another_champion_changes_nothing(registry: Registry, tmp_path: Path) -> None:
    v1, v2, v3 = (registry.register(fake_adapter(tmp_path / f"a{i}", bytes([i])), base=BASE).version
                  for i in range(3))
    registry.promote(v1, actor="ops", expected_champion=None)
    with pytest.raises(ChampionChangedError, match=r"is demo-v1 .*set by ops.*not none as this move expected"):
        registry.promote(v2, actor="ops", expected_champion=None)
    registry.promote(v2, actor="ops", reason="hotfix", expected_champion=v1)
    before = registry.history()
    with pytest.raises(ChampionChangedError, match=r"is demo-v2 .*hotfix.*not demo-v1") as refused:
        registry.promote(v3, actor="retrain", expected_champion=v1)
    assert (refused.value.expected, refused.value.actual) == (v1, v2)
    with pytest.raises(ChampionChangedError):
        registry.promote(v3, alias="canary", traffic_fraction=0.05, actor="retrain", expected_champion=v1)
    with pytest.raises(ChampionChangedError):
        registry.rollback(actor="ops", expected_champion=v1)
    assert registry.history() == before and registry.alias("champion") == v2 and registry.alias("canary") is None


def test_of_moves_racing_on_one_expected_champion_exactly_one_lands(registry: Registry, tmp_path: Path) -> None:
    """Four processes each promote their own version over demo-v1 at once: the first commits, the others see
    it and change nothing (the check and the move are one compare-and-swap on the history's next entry)."""
    versions = [registry.register(fake_adapter(tmp_path / f"a{i}", bytes([i])), base=BASE).version
                for i in range(5)]
    registry.promote(versions[0], actor="ops")
    with ProcessPoolExecutor(4, mp_context=multiprocessing.get_context("fork")) as pool:
        outcomes = list(pool.map(_promote_expecting, [registry.uri] * 4, versions[1:], [versions[0]] * 4))
    assert outcomes.count("moved") == 1, outcomes
    winner = versions[1 + outcomes.index("moved")]
    assert registry.alias("champion") == winner
    assert all(o == f"refused: {winner}" for o in outcomes if o != "moved")
    assert [(e.previous, e.version) for e in registry.history()] == [(None, versions[0]), (versions[0], winner)]


def test_a_retrain_whose_champion_changed_meanwhile_ends_superseded(tmp_path: Path) -> None:
    """The retrain's decision point: its candidate passed a gate against demo-v1, and an operator promoted
    demo-v3 while it ran; the run ends `superseded` and demo-v3 stays champion (and no canary starts)."""
    from flywheel.config import Settings
    from flywheel.runs import RunRecord, RunState, RunStore
    from training.pipeline import Retrain

    settings = Settings(home=tmp_path / "home", registry={"uri": str(tmp_path / "registry")})
    registry = Registry(settings.registry_uri, "demo")
    v1, v2, v3 = (registry.register(fake_adapter(tmp_path / f"a{i}", bytes([i])), base=BASE).version
                  for i in range(3))
    registry.promote(v1, actor="flywheel train")
    for rollout in ("direct", "canary"):
        retrain = Retrain(settings, RunRecord(run_id=f"run-{rollout}", trigger="test", task="demo"))
        retrain.task = retrain.task.model_copy(update={"rollout": rollout})
        retrain.record.champion_before = registry.alias("champion")
        registry.promote(v3 if rollout == "direct" else v1, actor="ops", reason="promoted by hand meanwhile")
        record = retrain._release(v2, retrain.record.champion_before, "gate passed")
        assert record.state == RunState.SUPERSEDED and record.verdict == "superseded"
        now = registry.alias("champion")
        assert "champion changed while the run went on" in record.message and f"is {now}" in record.message
        assert record.report == {"superseded": {"gated_against": retrain.record.champion_before, "champion_now": now}}
        assert RunStore.for_settings(settings).get(record.run_id).state == RunState.SUPERSEDED  # type: ignore[union-attr]
        assert registry.history()[-1].actor == "ops" and registry.alias("canary") is None
    assert registry.alias("champion") == v1
    passing = Retrain(settings, RunRecord(run_id="run-ok", trigger="test", task="demo"))
    assert passing._release(v2, v1, "gate passed").state == RunState.PASSED and registry.alias("champion") == v2


def test_the_cli_promotes_and_rolls_back_only_over_the_champion_it_expects(registry: Registry, tmp_path: Path) -> None:
    import yaml
    from typer.testing import CliRunner

    from flywheel.cli import app

    v1, v2 = (registry.register(fake_adapter(tmp_path / f"a{i}", bytes([i])), base=BASE).version for i in range(2))
    registry.promote(v1, actor="ops")
    config = tmp_path / "flywheel.yaml"
    config.write_text(yaml.safe_dump({"home": str(tmp_path / "home"), "registry": {"uri": registry.uri}}))
    refused = CliRunner().invoke(app, ["promote", v2, "--expect", "demo-v7", "--config", str(config)])
    assert refused.exit_code != 0 and "is demo-v1" in refused.output and "not demo-v7" in refused.output
    assert registry.alias("champion") == v1
    moved = CliRunner().invoke(app, ["promote", v2, "--expect", v1, "--config", str(config)])
    assert moved.exit_code == 0, moved.output
    assert CliRunner().invoke(app, ["rollback", "--expect", v1, "--config", str(config)]).exit_code != 0
    assert CliRunner().invoke(app, ["rollback", "--expect", v2, "--config", str(config)]).exit_code == 0
    assert registry.alias("champion") == v1
