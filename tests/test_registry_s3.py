"""The registry on a real S3 API (moto's server, run locally): the path the cluster instructions use."""

from __future__ import annotations

import uuid
from pathlib import Path

import pytest

from flywheel.config import Settings
from flywheel.registry import ChampionChangedError, Registry, known_tasks, registry_for
from flywheel.tasks import TaskSpec
from tests.test_registry import BASE, fake_adapter, in_threads

pytest.importorskip("s3fs", reason="the `s3` extra is not installed")


@pytest.fixture
def s3_settings(s3_endpoint: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Settings:
    """Settings with a fresh bucket; credentials from the environment, as on a cluster."""
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    bucket = f"flywheel-{uuid.uuid4().hex[:8]}"
    settings = Settings(home=tmp_path / "home", registry={"uri": f"s3://{bucket}/registry",
                                                          "storage_options": {"endpoint_url": s3_endpoint}})
    registry_for(settings).fs.mkdir(bucket)
    return settings


def test_versions_aliases_and_tasks_round_trip_through_s3(s3_settings: Settings, tmp_path: Path) -> None:
    registry = registry_for(s3_settings, "faq")
    assert not registry.is_local
    registry.save_task_spec(TaskSpec(name="faq", kind="generation", metric="rouge_l"))
    v1 = registry.register(fake_adapter(tmp_path / "a1", b"one"), base=BASE)
    v2 = registry.register(fake_adapter(tmp_path / "a2", b"two"), base=BASE, parent=v1.version)
    registry.promote(v1.version, actor="ops")
    registry.promote(v2.version, actor="ops")
    assert registry.rollback(actor="ops").version == "faq-v1"
    fresh = Registry(registry.uri, "faq", cache_dir=tmp_path / "other-cache",
                     storage_options=s3_settings.registry.storage_options)  # another node, another process
    assert fresh.alias("champion") == "faq-v1"
    assert [e.action for e in fresh.history()] == ["promote", "promote", "rollback"]
    assert (fresh.local_path("faq-v2") / "adapter_model.safetensors").read_bytes() == b"two"
    fresh.verify("faq-v2", base_sha256=BASE.sha256)
    assert "faq" in known_tasks(s3_settings)


def test_concurrent_writers_on_s3_never_share_a_version_or_a_move(s3_settings: Settings, tmp_path: Path) -> None:
    """Conditional puts (If-None-Match) make version numbers and alias moves exclusive on S3 too."""
    registry = registry_for(s3_settings, "demo")
    sources = [fake_adapter(tmp_path / f"a{i}", bytes([i])) for i in range(4)]
    versions = [m.version for m in in_threads(*(lambda s=s: registry.register(s, base=BASE) for s in sources))]
    assert sorted(versions) == [f"demo-v{i}" for i in range(1, 5)]
    for version in versions:
        registry.verify(version)

    def promote_all(offset: int) -> list[int]:
        return [registry.promote(versions[(offset + i) % 4], actor=f"w{offset}").seq for i in range(4)]

    seqs = [seq for done in in_threads(*(lambda w=w: promote_all(w) for w in range(3))) for seq in done]
    assert sorted(seqs) == list(range(1, 13))
    history = registry.history()
    assert [e.seq for e in history] == list(range(1, 13)) and registry.alias("champion") == history[-1].version


def test_a_move_over_an_expected_champion_is_a_compare_and_swap_on_s3(s3_settings: Settings, tmp_path: Path) -> None:
    """Three writers (separate clients, as on three nodes) promote over faq-v1 at once: exactly one lands."""
    registry = registry_for(s3_settings, "faq")
    versions = [registry.register(fake_adapter(tmp_path / f"a{i}", bytes([i])), base=BASE).version for i in range(4)]
    registry.promote(versions[0], actor="ops")

    def promote_over_v1(version: str) -> str:
        node = Registry(registry.uri, "faq", cache_dir=tmp_path / version,
                        storage_options=s3_settings.registry.storage_options)
        try:
            node.promote(version, actor="node", expected_champion=versions[0])
        except ChampionChangedError as exc:
            return f"refused: {exc.actual}"
        return version

    outcomes = in_threads(*(lambda v=v: promote_over_v1(v) for v in versions[1:]))
    landed = [o for o in outcomes if not str(o).startswith("refused")]
    assert len(landed) == 1 and registry.alias("champion") == landed[0], outcomes
    assert all(o == f"refused: {landed[0]}" for o in outcomes if o not in landed)
    assert [e.version for e in registry.history()] == [versions[0], landed[0]]


def test_bench_fencing_measures_both_kinds_of_move_and_leaves_nothing_behind(s3_settings: Settings) -> None:
    from loadtests.bench_fencing import run_fencing_bench

    report = run_fencing_bench(s3_settings, moves=10, say=print)
    assert report.registry.startswith(s3_settings.registry.uri + "-bench-fencing-")
    assert report.unfenced_p50_ms > 0 and report.fenced_p50_ms > 0 and report.ratio > 0
    fs = registry_for(s3_settings).fs
    bucket = s3_settings.registry.uri.removeprefix("s3://").split("/")[0]
    fs.invalidate_cache()
    assert not [p for p in fs.ls(bucket) if "bench-fencing" in p], "the scratch registry was removed"
