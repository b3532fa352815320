"""The canary's statistics, decisions and traffic split, on a real registry with simulated ratings.

The whole canary through real Serve + vLLM is in test_retrain (raters who like or dislike the canary).
"""

from __future__ import annotations

import random
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from flywheel.canary import CanaryController, apply, review, sequential_difference
from flywheel.config import CanarySettings, Settings
from flywheel.registry import CANARY_ALIAS, BaseModelRef, Registry
from services.adapters import traffic_bucket
from tests.test_registry import fake_adapter

BASE = BaseModelRef(id="demo", sha256="a" * 64)


def ratings(rng: random.Random, mean: float, n: int) -> list[float]:
    return [float(min(5, max(1, round(rng.gauss(mean, 1.0))))) for _ in range(n)]


def test_checking_after_every_batch_keeps_false_alarms_near_alpha_and_finds_half_a_point() -> None:
    rng = random.Random(7)
    alpha, looks, batch = 0.05, 30, 10

    def first_verdict(mean_a: float, mean_b: float) -> int | None:
        a: list[float] = []
        b: list[float] = []
        for look in range(looks):
            a += ratings(rng, mean_a, batch)
            b += ratings(rng, mean_b, batch)
            result = sequential_difference(a, b, alpha=alpha, effect_sd=0.5)
            if result.low > 0 or result.high < 0:
                return look
        return None

    false_alarms = sum(first_verdict(3.5, 3.5) is not None for _ in range(200))
    assert false_alarms / 200 <= 2 * alpha, false_alarms  # 30 looks at a fixed-n test would give ~25 %
    found = [first_verdict(3.0, 3.5) for _ in range(100)]
    assert sum(f is not None for f in found) >= 80, found


def test_users_keep_their_arm_and_the_share_is_what_was_asked() -> None:
    users = [f"user-{i}" for i in range(4000)]
    at_5 = {u for u in users if traffic_bucket("demo-v3", u) < 0.05}
    at_25 = {u for u in users if traffic_bucket("demo-v3", u) < 0.25}
    assert 0.03 < len(at_5) / len(users) < 0.07 and 0.22 < len(at_25) / len(users) < 0.28
    assert at_5 <= at_25  # stepping up keeps everyone already on the canary there
    assert all(traffic_bucket("demo-v3", u) == traffic_bucket("demo-v3", u) for u in users[:100])


@pytest.fixture
def trial(tmp_path: Path) -> Registry:
    """demo-v1 champion, demo-v2 canary at 5 %."""
    registry = Registry(str(tmp_path / "registry"), "demo")
    for i in range(2):
        registry.register(fake_adapter(tmp_path / f"a{i}", bytes([i])), base=BASE)
    registry.promote("demo-v1", actor="test")
    registry.promote("demo-v2", alias=CANARY_ALIAS, traffic_fraction=0.05, actor="test")
    return registry


CFG = CanarySettings(steps=[0.05, 0.25, 0.5], step_s=60, min_ratings=20, deadline_s=3600)


def arms(champion: list[float], canary: list[float]):
    rated = [("demo-v1", v) for v in champion] + [("demo-v2", v) for v in canary]
    return lambda _since: rated


def test_too_few_ratings_hold_and_say_so(trial: Registry) -> None:
    rng = random.Random(1)
    decided = review(trial, CFG, arms(ratings(rng, 2, 50), ratings(rng, 5, 5)), {})
    assert decided is not None and decided.verdict == "hold"
    assert "too few ratings" in decided.reason and "canary 5" in decided.reason
    apply(trial, decided, actor="test")
    assert trial.aliases()[CANARY_ALIAS].traffic_fraction == 0.05 and trial.alias("champion") == "demo-v1"


def test_a_better_canary_is_promoted_with_its_figures_in_the_history(trial: Registry) -> None:
    rng = random.Random(2)
    decided = review(trial, CFG, arms(ratings(rng, 3.0, 40), ratings(rng, 4.2, 40)), {})
    assert decided is not None and decided.verdict == "promote", decided.reason
    assert decided.test.low > 0 and decided.arms["canary"].mean_rating > decided.arms["champion"].mean_rating
    apply(trial, decided, actor="test")
    assert trial.alias("champion") == "demo-v2" and trial.aliases()[CANARY_ALIAS].traffic_fraction == 0
    promoted = trial.history("champion")[-1]
    assert promoted.version == "demo-v2" and "better" in promoted.reason and "interval" in promoted.reason
    assert review(trial, CFG, arms([], []), {}) is None  # no canary any more


def test_a_worse_canary_or_a_broken_guardrail_is_rolled_back(trial: Registry) -> None:
    rng = random.Random(3)
    worse = review(trial, CFG, arms(ratings(rng, 4.0, 40), ratings(rng, 2.5, 40)), {})
    assert worse is not None and worse.verdict == "rollback" and worse.test.high < 0
    slow = {"demo-v1": {"requests": 100, "failures": 0, "p99_ms": 100.0},
            "demo-v2": {"requests": 30, "failures": 0, "p99_ms": 400.0}}
    breach = review(trial, CFG, arms([], []), slow)  # no ratings needed to stop a canary that hurts
    assert breach is not None and breach.verdict == "rollback" and "p99" in breach.reason
    failing = {"demo-v1": {"requests": 100, "failures": 1, "p99_ms": 100.0},
               "demo-v2": {"requests": 30, "failures": 3, "p99_ms": 100.0}}
    assert review(trial, CFG, arms([], []), failing).verdict == "rollback"  # type: ignore[union-attr]
    apply(trial, worse, actor="test")
    assert trial.aliases()[CANARY_ALIAS].traffic_fraction == 0 and trial.alias("champion") == "demo-v1"
    assert "rolled back: worse" in trial.history(CANARY_ALIAS)[-1].reason


def test_no_harm_steps_up_after_the_step_and_the_deadline_holds_or_rolls_back(trial: Registry) -> None:
    rng = random.Random(4)
    same = arms(ratings(rng, 3.5, 40), ratings(rng, 3.5, 40))
    now = datetime.now(UTC)
    assert review(trial, CFG, same, {}, now=now).verdict == "hold"  # type: ignore[union-attr]
    later = review(trial, CFG, same, {}, now=now + timedelta(seconds=61))
    assert later is not None and later.verdict == "step_up" and later.next_share == 0.25
    apply(trial, later, actor="test")
    assert trial.aliases()[CANARY_ALIAS].traffic_fraction == 0.25
    stepped = review(trial, CFG, same, {}, now=now + timedelta(seconds=62))
    assert stepped is not None and stepped.share == 0.25 and stepped.started_at < stepped.step_started_at
    past = now + timedelta(seconds=CFG.deadline_s + 1)
    assert review(trial, CFG, same, {}, now=past).verdict == "hold"  # type: ignore[union-attr]
    strict = CFG.model_copy(update={"on_deadline": "rollback"})
    assert review(trial, strict, same, {}, now=past).verdict == "rollback"  # type: ignore[union-attr]


def test_the_controller_reviews_every_task_and_acts(trial: Registry, tmp_path: Path) -> None:
    settings = Settings(home=tmp_path / "home", registry={"uri": str(tmp_path / "registry")},
                        canary=CFG.model_dump())
    rng = random.Random(5)
    rated = [("demo-v1", v) for v in ratings(rng, 2.0, 40)] + [("demo-v2", v) for v in ratings(rng, 4.5, 40)]
    controller = CanaryController(settings, stop=None, ratings=lambda task, since: rated,  # type: ignore[arg-type]
                                  figures=dict)
    [decided] = controller.check()
    assert decided.task == "demo" and decided.verdict == "promote"
    assert trial.alias("champion") == "demo-v2"


def test_no_retrain_is_scheduled_while_a_canary_is_on_trial(trial: Registry, tmp_path: Path) -> None:
    import threading

    from flywheel.scheduler import RetrainScheduler

    settings = Settings(home=tmp_path / "home", registry={"uri": str(tmp_path / "registry")})
    scheduler = RetrainScheduler(settings, threading.Event())
    due, why = scheduler.due("demo")
    assert not due and "canary demo-v2 is on trial" in why
    trial.end_canary(actor="test", reason="done")
    assert "on trial" not in scheduler.due("demo")[1]
