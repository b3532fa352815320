"""The canary's statistics, decisions and traffic split, on a real registry with simulated ratings.

The whole canary through real Serve + vLLM is in test_retrain (raters who like or dislike the canary).
"""

from __future__ import annotations

import json
import random
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from typer.testing import CliRunner

from flywheel.canary import (
    CanaryController,
    NoCanaryError,
    apply,
    decide_by_hand,
    review,
    sequential_difference,
    sequential_trial,
)
from flywheel.cli import app
from flywheel.config import CanarySettings, Settings
from flywheel.registry import CANARY_ALIAS, BaseModelRef, Registry, registry_for
from services.adapters import traffic_bucket
from tests.conftest import make_settings
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


def a_a_trial(rng: random.Random, *, name_raters: bool, raters: int = 60, rated: int = 1500):
    """A canary no better than the champion, rated by users with personal biases who each rate many answers and
    keep their arm; the ratings arrive interleaved. Returns the trial as the canary would end it."""
    bias = [rng.gauss(0, 0.8) for _ in range(raters)]
    on_canary = [rng.random() < 0.5 for _ in range(raters)]
    stream = []
    for _ in range(rated):
        user = rng.randrange(raters)
        rating = float(min(5, max(1, round(3.5 + bias[user] + rng.gauss(0, 0.7)))))
        stream.append((on_canary[user], rating, f"user-{user}" if name_raters else None))
    return sequential_trial(stream, alpha=0.05, effect_sd=0.5, min_ratings=30)


def test_raters_who_rate_many_answers_do_not_fool_the_canary() -> None:
    """Over 300 A/A trials looked at after every rating, one mean per rater keeps false verdicts within alpha
    (2.3 % here); counting each rating as independent gives about half."""
    rng = random.Random(1)

    def false_verdicts(name_raters: bool, trials: int) -> float:
        results = [a_a_trial(rng, name_raters=name_raters) for _ in range(trials)]
        return sum(r.low is not None and (r.low > 0 or r.high < 0) for r in results) / trials

    assert false_verdicts(True, 300) <= 0.05 + 0.025
    assert false_verdicts(False, 50) > 0.2  # what the rater ids are for


def test_the_first_crossing_ends_the_trial_and_its_p_value_never_rises() -> None:
    rng = random.Random(8)
    better = [(i % 2 == 1, float(min(5, max(1, round(rng.gauss(3.0 + (i % 2), 1.0))))), None) for i in range(400)]
    ended = sequential_trial(better, alpha=0.05, effect_sd=0.5, min_ratings=30)
    assert ended.low > 0 and ended.p_value <= 0.05 and ended.n_a + ended.n_b < 400  # it stopped at the crossing
    # Ratings after the crossing that cancel the gain (the champion's users suddenly delighted) change nothing.
    later = better + [(False, 5.0, None)] * 170
    assert sequential_trial(later, alpha=0.05, effect_sd=0.5, min_ratings=30) == ended
    at_the_end = sequential_difference([v for b, v, _ in later if not b], [v for b, v, _ in later if b], alpha=0.05,
                                       effect_sd=0.5)
    assert at_the_end.low < 0 < at_the_end.high and at_the_end.p_value > 0.05  # a look at the end alone: no
    same = [(i % 2 == 1, float(min(5, max(1, round(rng.gauss(3.5, 1.0))))), None) for i in range(300)]
    p_values = [sequential_trial(same[:k], alpha=0.05, effect_sd=0.5, min_ratings=30).p_value
                for k in range(60, 301, 30)]
    assert p_values == sorted(p_values, reverse=True) and p_values[-1] > 0.05, p_values


def test_ratings_with_their_rater_count_one_mean_per_rater(trial: Registry) -> None:
    """Three fans rate the canary 60 times: its mean is half a point higher, which 60 independent ratings would
    call better; from three raters it is no verdict. Pairs without a rater still count, each its own rater."""
    rng = random.Random(6)

    def rating(mean: float) -> float:
        return float(min(5, max(1, round(rng.gauss(mean, 0.7)))))

    champion = [("demo-v1", rating(3.5)) for _ in range(60)]
    fans = [("demo-v2", rating(3.5 + (1.2, 0.9, -0.3)[i % 3]), f"fan-{i % 3}") for i in range(60)]
    decided = review(trial, CFG, lambda _since: [*champion, *fans], {})
    assert decided is not None and decided.verdict == "hold", decided.reason
    assert (decided.test.raters_a, decided.test.raters_b) == (60, 3) and "60/60 by 3/60 raters" in decided.reason
    anonymous = review(trial, CFG, lambda _since: [*champion, *((v, r) for v, r, _ in fans)], {})
    assert anonymous is not None and anonymous.verdict == "promote", anonymous.reason


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


def test_a_promotion_and_the_end_of_its_trial_are_one_move(trial: Registry, tmp_path: Path,
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    """The move's commit (its history entry) lands, then writing the checkpoint fails: a fresh look still sees
    the canary champion and its trial over, so the scheduler never waits on a trial that ended."""
    from flywheel.scheduler import RetrainScheduler

    rng = random.Random(6)
    decided = review(trial, CFG, arms(ratings(rng, 3.0, 40), ratings(rng, 4.2, 40)), {})
    assert decided is not None and decided.verdict == "promote"
    seq = len(trial.history())
    real_write = Registry.write_text

    def checkpoint_fails(self: Registry, path: str, text: str) -> None:
        if path.endswith("aliases.json"):
            raise OSError("disk full")
        real_write(self, path, text)

    monkeypatch.setattr(Registry, "write_text", checkpoint_fails)
    with pytest.raises(OSError, match="disk full"):
        apply(trial, decided, actor="test")
    monkeypatch.undo()
    fresh = Registry(trial.uri, "demo")
    assert len(fresh.history()) == seq + 1  # one move
    assert fresh.alias("champion") == "demo-v2" and fresh.aliases()[CANARY_ALIAS].traffic_fraction == 0
    assert [e.action for e in fresh.history(CANARY_ALIAS)][-1] == "promote"  # it ended the trial too
    settings = Settings(home=tmp_path / "home", registry={"uri": trial.uri})
    assert "on trial" not in RetrainScheduler(settings, None).due("demo")[1]  # type: ignore[arg-type]
    assert review(fresh, CFG, arms([], []), {}) is None
    assert fresh.rollback(actor="ops").version == "demo-v1"  # and it rolls back like any promotion


def test_a_move_left_half_done_is_completed_on_the_next_look(trial: Registry, tmp_path: Path) -> None:
    """A registry written by the two-move promotion, with a failure between: champion moved, trial not ended."""
    from flywheel.scheduler import RetrainScheduler

    trial.promote("demo-v2", actor="canary-controller", reason="canary promoted: better")  # end_canary never ran
    settings = Settings(home=tmp_path / "home", registry={"uri": trial.uri}, canary=CFG.model_dump())
    assert "on trial" not in RetrainScheduler(settings, None).due("demo")[1]  # type: ignore[arg-type]
    controller = CanaryController(settings, stop=None, ratings=lambda task, since: [],  # type: ignore[arg-type]
                                  figures=dict)
    assert controller.check() == []
    assert trial.aliases()[CANARY_ALIAS].traffic_fraction == 0 and trial.alias("champion") == "demo-v2"
    ended = trial.history(CANARY_ALIAS)[-1]
    assert ended.action == "end" and "half done" in ended.reason


def test_a_verdict_on_a_state_that_changed_since_the_review_changes_nothing(trial: Registry) -> None:
    rng = random.Random(8)
    decided = review(trial, CFG, arms(ratings(rng, 3.0, 40), ratings(rng, 4.2, 40)), {})
    assert decided is not None and decided.verdict == "promote"
    trial.end_canary(actor="ops", reason="stopped by hand")
    trial.promote("demo-v1", alias=CANARY_ALIAS, traffic_fraction=0.05, actor="ops")  # another trial, say
    before = trial.history()
    apply(trial, decided, actor="test")  # demo-v2 is no longer on trial: not promoted
    worse = decided.model_copy(update={"verdict": "rollback"})
    apply(trial, worse, actor="test")  # a rollback of demo-v2 must not end demo-v1's trial
    assert trial.history() == before and trial.alias("champion") == "demo-v1"


def test_by_hand_a_canary_is_promoted_or_aborted_now_whatever_its_ratings(trial: Registry) -> None:
    """The one sequence the CLI, the admin API and the console share."""
    rng = random.Random(9)
    few = arms(ratings(rng, 3.0, 5), ratings(rng, 3.0, 5))  # too few for any verdict of the test's own
    aborted = decide_by_hand(trial, CFG, few, "rollback", actor="ops (console)", via="console")
    assert aborted.verdict == "rollback" and aborted.reason.startswith("by hand (console); too few ratings")
    assert trial.aliases()[CANARY_ALIAS].traffic_fraction == 0 and trial.alias("champion") == "demo-v1"
    assert trial.history(CANARY_ALIAS)[-1].actor == "ops (console)"
    with pytest.raises(NoCanaryError, match="task 'demo' runs no canary"):
        decide_by_hand(trial, CFG, few, "promote", actor="ops", via="console")
    trial.promote("demo-v2", alias=CANARY_ALIAS, traffic_fraction=0.05, actor="test")
    decide_by_hand(trial, CFG, few, "promote", actor="cli", via="cli")
    assert trial.alias("champion") == "demo-v2" and trial.aliases()[CANARY_ALIAS].traffic_fraction == 0
    promoted = trial.history("champion")[-1]
    assert promoted.actor == "cli" and "by hand (cli)" in promoted.reason


def test_the_cli_aborts_and_promotes_a_canary_by_hand(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    settings = make_settings(tmp_path / "home")
    registry = registry_for(settings)
    for i in range(3):
        registry.register(fake_adapter(tmp_path / f"a{i}", bytes([i])), base=BASE)
    registry.promote(f"{registry.task}-v1", actor="test")
    registry.promote(f"{registry.task}-v2", alias=CANARY_ALIAS, traffic_fraction=0.05, actor="test")
    monkeypatch.setenv("FLYWHEEL_HOME", str(settings.home))
    monkeypatch.delenv("FLYWHEEL_CONFIG", raising=False)
    cli = CliRunner()
    aborted = cli.invoke(app, ["canary", "abort", "--json"])
    assert aborted.exit_code == 0 and json.loads(aborted.stdout)["verdict"] == "rollback", aborted.output
    assert registry.aliases()[CANARY_ALIAS].traffic_fraction == 0 and registry.alias("champion").endswith("-v1")
    none = cli.invoke(app, ["canary", "promote"])
    assert none.exit_code == 2 and "runs no canary" in none.stderr
    registry.promote(f"{registry.task}-v3", alias=CANARY_ALIAS, traffic_fraction=0.05, actor="test")
    assert cli.invoke(app, ["canary", "promote"]).exit_code == 0
    assert registry.alias("champion") == f"{registry.task}-v3"
    assert registry.history("champion")[-1].actor == "cli"


def test_the_canary_bench_at_a_small_size_holds_alpha_and_finds_three_tenths() -> None:
    """`flywheel bench canary` at a small size (the benchmark runs 1 000 trials): raters with personal biases who
    rate many answers; A/A trials end in a verdict within alpha, counting every rating as its own rater would not."""
    from loadtests.bench_canary import Population, run_canary_bench

    cfg = CanarySettings()
    report = run_canary_bench(cfg, difference=0.3, trials=80, population=Population(raters=300, ratings=1500))
    assert report.false_verdicts.share <= 1 - cfg.confidence and report.false_verdicts_within_alpha
    assert report.false_verdicts.low <= 1 - cfg.confidence <= report.false_verdicts.high + 1e-9
    assert report.false_verdicts_per_rating.low > 1 - cfg.confidence  # what one mean per rater is for
    assert report.power.found.share >= 0.6 and report.power.ratings_per_arm_median is not None
    assert 50 < report.power.ratings_per_arm_median < 750
    assert "within alpha" in "\n".join(report.lines())


def test_our_msprt_and_savvis_anytime_valid_test_agree_on_the_same_streams() -> None:
    """savvi (Lindon et al.'s anytime-valid t-test, a published implementation) beside ours on identical streams.
    Independent raters: both hold alpha and both find +0.5 in every trial. Correlated raters: savvi, which takes
    every rating as independent, is fooled in many A/A trials; ours is not."""
    pytest.importorskip("savvi", reason="savvi comes with the dev extra")
    from loadtests.bench_canary import Population, run_canary_bench

    cfg = CanarySettings()
    report = run_canary_bench(cfg, difference=0.5, trials=30, compare_trials=30,
                              population=Population(raters=80, rater_sd=1.0, ratings=1000))
    compared = report.savvi
    assert compared is not None and compared.trials == 30
    assert compared.independent_ours_aa.verdicts <= 3 and compared.independent_savvi_aa.verdicts <= 3
    assert compared.independent_ours_power.found.share == compared.independent_savvi_power.found.share == 1.0
    ours_n = compared.independent_ours_power.ratings_per_arm_median
    savvi_n = compared.independent_savvi_power.ratings_per_arm_median
    assert ours_n is not None and savvi_n is not None and 0.33 < ours_n / savvi_n < 3, (ours_n, savvi_n)
    assert report.false_verdicts.verdicts <= 1 and compared.savvi_aa.low > 1 - cfg.confidence, compared.savvi_aa


def rated_by(raters: int, champion_mean: float, canary_mean: float, per_rater: int = 20):
    """Each arm rated by `raters` users, `per_rater` answers each, interleaved; the canary far better."""
    rng = random.Random(raters)
    rated = []
    for _ in range(per_rater):
        for r in range(raters):
            rated.append(("demo-v1", float(min(5, max(1, round(rng.gauss(champion_mean, 0.5))))), f"k-{r}"))
            rated.append(("demo-v2", float(min(5, max(1, round(rng.gauss(canary_mean, 0.5))))), f"c-{r}"))
    return lambda _since: rated


def test_a_verdict_waits_for_enough_distinct_raters_in_each_arm(trial: Registry) -> None:
    """Two raters per arm, each rating the canary far better 20 times: strong evidence from too few people (2
    raters per arm gave 16 % false verdicts in simulated A/A trials). It holds until `canary.min_raters` each."""
    assert CFG.min_raters == 5
    few = review(trial, CFG, rated_by(2, 2.0, 4.5), {})
    assert few is not None and few.verdict == "hold", few.reason
    assert "too few raters" in few.reason and "canary.min_raters" in few.reason
    assert few.test.low is not None and few.test.low > 0  # the evidence looks strong: it rests on 2 people
    enough = review(trial, CFG, rated_by(5, 2.0, 4.5), {})
    assert enough is not None and enough.verdict == "promote", enough.reason
    assert (enough.test.raters_a, enough.test.raters_b) == (5, 5)
