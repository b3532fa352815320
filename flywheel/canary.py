"""The canary: a candidate the gate passed earns its task's traffic on what users say about its answers.

For a task whose `rollout` is `canary`, a retrain makes its passing candidate the task's `canary` alias at
the first share of traffic instead of the champion. Replicas send that share of users to it, sticky per
user. `review` compares the two arms on the ratings given since the canary started, with an always-valid
sequential test followed rating by rating, whose first crossing ends the trial (so looking every few
seconds is fine), on one mean per rater (a user rates many answers and keeps their arm), and on guardrails
from the replicas (failures, p99 latency); `apply` carries the verdict out through the registry, whose
history keeps the figures:

- a guardrail broken, or worse at the configured confidence: roll back (share 0) at once;
- too few ratings, or too few distinct raters (`min_raters`), in either arm: hold, and say so;
- better at that confidence: promote to champion;
- otherwise step up once the step has lasted `step_s`; at the deadline, hold or roll back (config).
"""

from __future__ import annotations

import logging
import math
import statistics
import threading
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Literal, NamedTuple

from pydantic import BaseModel, Field

from flywheel.config import CanarySettings, Settings
from flywheel.registry import (
    CANARY_ALIAS,
    HistoryEntry,
    Registry,
    RegistryError,
    known_tasks,
    registry_for,
)

log = logging.getLogger("flywheel.canary")

Verdict = Literal["promote", "rollback", "step_up", "hold"]
Rated = tuple[str, float] | tuple[str, float, str | None]
"""(adapter version, rating 1-5) or (adapter version, rating 1-5, rater): one rated answer. The rater is whoever
rated it (a user id); None or absent, the rating counts as a rater of its own."""
Ratings = list[Rated]
"""A task's rated answers since a time, oldest first."""
VersionFigures = dict[str, dict[str, float]]
"""Per version, over the serving replicas: `requests`, `failures`, `p99_ms` of users' requests."""


class SequentialResult(BaseModel):
    """Arm B against arm A: an always-valid test of the difference of their mean ratings, one mean per rater."""

    n_a: int = Field(description="Ratings in arm A.")
    n_b: int
    raters_a: int = Field(0, description="Raters in arm A: the independent units the variance is counted in.")
    raters_b: int = 0
    mean_a: float = Field(description="Mean over arm A's raters of each rater's mean rating.")
    mean_b: float
    difference: float = Field(description="mean_b - mean_a")
    low: float | None = Field(description="Confidence sequence for the difference: valid however often it is "
                              "looked at (None until each arm has two raters).")
    high: float | None
    p_value: float = Field(description="Always-valid p-value that the means are equal.")


class _Arm:
    """One arm's ratings, kept as one mean per rater and updated a rating at a time."""

    def __init__(self) -> None:
        self.sums: dict[object, float] = {}
        self.counts: dict[object, int] = {}
        self.ratings = 0
        self.sum_of_means = 0.0
        self.sum_of_squares = 0.0

    def add(self, rating: float, rater: str | None) -> None:
        key: object = rater if rater is not None else object()  # unknown rater: a cluster of its own
        if key in self.sums:
            old = self.sums[key] / self.counts[key]
            self.sum_of_means -= old
            self.sum_of_squares -= old * old
        self.sums[key] = self.sums.get(key, 0.0) + rating
        self.counts[key] = self.counts.get(key, 0) + 1
        new = self.sums[key] / self.counts[key]
        self.sum_of_means += new
        self.sum_of_squares += new * new
        self.ratings += 1

    @property
    def raters(self) -> int:
        return len(self.sums)

    @property
    def mean(self) -> float:
        return self.sum_of_means / self.raters if self.sums else 0.0

    @property
    def variance(self) -> float:
        """Sample variance of the raters' means (two raters at least)."""
        return max(0.0, (self.sum_of_squares - self.sum_of_means**2 / self.raters) / (self.raters - 1))


class _Look(NamedTuple):
    low: float
    high: float
    p_value: float


def _msprt(a: _Arm, b: _Arm, *, alpha: float, effect_sd: float) -> _Look | None:
    """The test now (None until each arm has two raters)."""
    if a.raters < 2 or b.raters < 2:
        return None
    d = b.mean - a.mean
    tau2 = effect_sd**2
    floor = 0.05 * tau2
    var = max(a.variance, floor) / a.raters + max(b.variance, floor) / b.raters
    log_ratio = 0.5 * math.log(var / (var + tau2)) + tau2 * d * d / (2 * var * (var + tau2))
    half = math.sqrt(var * (var + tau2) / tau2 * (2 * math.log(1 / alpha) + math.log((var + tau2) / var)))
    return _Look(low=d - half, high=d + half, p_value=min(1.0, math.exp(-log_ratio)))


def _result(a: _Arm, b: _Arm, look: _Look | None) -> SequentialResult:
    return SequentialResult(n_a=a.ratings, n_b=b.ratings, raters_a=a.raters, raters_b=b.raters, mean_a=a.mean,
                            mean_b=b.mean, difference=b.mean - a.mean, low=look.low if look else None,
                            high=look.high if look else None, p_value=look.p_value if look else 1.0)


def sequential_difference(
    a: list[float], b: list[float], *, alpha: float, effect_sd: float,
    raters_a: list[str | None] | None = None, raters_b: list[str | None] | None = None,
) -> SequentialResult:
    """A mixture sequential probability ratio test (mSPRT) of mean(b) - mean(a), Gaussian approximation.

    Ratings are clustered by rater (a user rates many answers, and keeps their arm), so each arm is one
    mean per rater and its variance is that of the raters' means: counting each rating as independent
    would make the test too sure. `raters_a`/`raters_b` name each rating's rater (absent or None: the
    rating is its own rater). With the mixture prior N(0, τ²) (τ = `effect_sd`) on the difference and V
    the variance of its estimate, the ratio is sqrt(V / (V + τ²)) · exp(τ² d² / (2 V (V + τ²))). 1/ratio
    is a p-value, and d ± the half-width below a confidence sequence, that stay valid when checked after
    every new sample (Johari et al., 2017). Each arm's variance is floored so a run of identical ratings
    cannot make the test certain. This is one look; `sequential_trial` follows a trial rating by rating.
    """
    arms = _Arm(), _Arm()
    for arm, values, raters in ((arms[0], a, raters_a), (arms[1], b, raters_b)):
        for value, rater in zip(values, raters or [None] * len(values), strict=True):
            arm.add(value, rater)
    return _result(*arms, _msprt(*arms, alpha=alpha, effect_sd=effect_sd))


def sequential_trial(
    rated: list[tuple[bool, float, str | None]], *, alpha: float, effect_sd: float, min_ratings: int,
    min_raters: int = 2,
) -> SequentialResult:
    """`sequential_difference` looked at after every rating, in arrival order ((in arm B?, rating, rater)).

    Once both arms have `min_ratings` ratings from `min_raters` distinct raters, every look counts: the p-value is
    the running minimum over the counted looks and the interval their running intersection, both as valid as one
    look's; the first that excludes 0 ends the trial, so later ratings never reverse a verdict. Below
    `min_raters` the variance of the raters' means rests on too few units to trust (2 raters per arm gave 16 %
    false verdicts in simulated A/A trials).

    The trial's ratings are pooled across its share steps, and that is sound: a user keeps their arm as the
    share steps up (the buckets are sticky, and a larger share only adds users to the canary, never moves one
    back), and the estimate is one mean per rater, so a step changes only how many raters each arm gets, not
    what any rater's ratings measure. Raters who join at a later step are more raters of the same two arms; the
    mSPRT's validity does not depend on how many arrive when."""
    arms = _Arm(), _Arm()
    look: _Look | None = None
    counting = False
    for in_b, rating, rater in rated:
        arms[in_b].add(rating, rater)
        now = _msprt(*arms, alpha=alpha, effect_sd=effect_sd)
        if (now is None or min(arms[0].ratings, arms[1].ratings) < min_ratings
                or min(arms[0].raters, arms[1].raters) < min_raters):
            look = now
            continue
        if counting and look is not None:
            now = _Look(low=max(look.low, now.low), high=min(look.high, now.high),
                        p_value=min(look.p_value, now.p_value))
        look, counting = now, True
        if look.low > 0 or look.high < 0:
            break
    return _result(*arms, look)


class Arm(BaseModel):
    version: str
    ratings: int
    mean_rating: float | None
    thumbs_up_rate: float | None = Field(description="Share of ratings of 4 or 5 (a thumb up counts 5).")
    requests: int | None = Field(None, description="Users' requests it answered (None: replicas not asked).")
    failures: int | None = None
    p99_ms: float | None = None


class CanaryReview(BaseModel):
    task: str
    champion: str
    canary: str
    share: float
    next_share: float | None
    started_at: datetime
    step_started_at: datetime
    deadline: datetime
    arms: dict[str, Arm] = Field(description="`champion` and `canary`.")
    test: SequentialResult
    confidence: float
    verdict: Verdict
    reason: str


def interval(test: SequentialResult) -> str:
    return "-" if test.low is None or test.high is None else f"{test.low:+.2f}..{test.high:+.2f}"


def _arm(version: str, values: list[float], figures: VersionFigures) -> Arm:
    served = figures.get(version, {})
    return Arm(version=version, ratings=len(values), mean_rating=statistics.fmean(values) if values else None,
               thumbs_up_rate=sum(v >= 4 for v in values) / len(values) if values else None,
               requests=int(served["requests"]) if served else None,
               failures=int(served["failures"]) if served else None, p99_ms=served.get("p99_ms"))


def _guardrail_breach(champion: Arm, canary: Arm, cfg: CanarySettings) -> str | None:
    if not champion.requests or not canary.requests or canary.requests < cfg.min_guardrail_requests:
        return None
    increase = (canary.failures or 0) / canary.requests - (champion.failures or 0) / champion.requests
    if increase > cfg.max_error_rate_increase:
        return f"failures {increase:+.1%} over the champion's rate (limit {cfg.max_error_rate_increase:+.1%})"
    if champion.p99_ms and canary.p99_ms and canary.p99_ms / champion.p99_ms > cfg.max_p99_ratio:
        return (f"p99 latency {canary.p99_ms:.0f} ms is {canary.p99_ms / champion.p99_ms:.2f}x the champion's "
                f"{champion.p99_ms:.0f} ms (limit {cfg.max_p99_ratio:.2f}x)")
    return None


def _trial(history: list[HistoryEntry], version: str) -> tuple[datetime, datetime]:
    """(when this canary's current trial began, when its current share was set), from the alias history."""
    started: datetime | None = None
    step: datetime | None = None
    for entry in history:  # oldest first; a version may have been tried, ended and tried again
        live = entry.version == version and bool(entry.traffic_fraction)
        started = (started or entry.at) if live else None
        step = entry.at if live else step
    if started is None or step is None:
        raise ValueError(f"{version} is not on trial")
    return started, step


def review(registry: Registry, cfg: CanarySettings, ratings: Callable[[datetime], Ratings],
           figures: VersionFigures, now: datetime | None = None) -> CanaryReview | None:
    """What to do about `registry`'s task's canary now; None when it runs none.

    `ratings(since)` gives the task's ratings since a time, oldest first, with or without each rating's rater
    (`Rated`); `figures` the replicas' tallies per version.
    """
    aliases = registry.aliases()
    canary = registry.canary_on_trial(aliases)
    champion = aliases.get("champion")
    if canary is None or champion is None:
        return None
    now = now or datetime.now(UTC)
    started, step_started = _trial(registry.history(CANARY_ALIAS), canary.version)
    rated = [(r[0], r[1], r[2] if len(r) > 2 else None) for r in ratings(started)
             if r[0] in (champion.version, canary.version)]
    values = {arm: [v for version, v, _ in rated if version == name]
              for arm, name in (("champion", champion.version), ("canary", canary.version))}
    arms = {arm: _arm(name, values[arm], figures)
            for arm, name in (("champion", champion.version), ("canary", canary.version))}
    test = sequential_trial([(version == canary.version, v, rater) for version, v, rater in rated],
                            alpha=1 - cfg.confidence, effect_sd=cfg.effect_sd, min_ratings=cfg.min_ratings,
                            min_raters=cfg.min_raters)
    share = canary.traffic_fraction
    later = [s for s in cfg.steps if s > share + 1e-9]
    deadline = started + timedelta(seconds=cfg.deadline_s)
    figures_text = (f"canary {canary.version} mean {test.mean_b:.2f} vs champion {champion.version} "
                    f"{test.mean_a:.2f} ({test.difference:+.2f}, {cfg.confidence:.0%} interval {interval(test)}, "
                    f"p={test.p_value:.3f}, ratings {test.n_b}/{test.n_a} by {test.raters_b}/{test.raters_a} raters)")
    verdict: Verdict
    breach = _guardrail_breach(arms["champion"], arms["canary"], cfg)
    if breach:
        verdict, reason = "rollback", f"guardrail: {breach}"
    elif now >= deadline and cfg.on_deadline == "rollback":
        verdict, reason = "rollback", f"no verdict by the deadline; {figures_text}"
    elif min(test.n_a, test.n_b) < cfg.min_ratings:
        verdict, reason = "hold", (f"too few ratings for a verdict: champion {test.n_a}, canary {test.n_b}, "
                                   f"{cfg.min_ratings} needed in each")
    elif min(test.raters_a, test.raters_b) < cfg.min_raters:
        verdict, reason = "hold", (f"too few raters for a verdict: champion {test.raters_a}, canary "
                                   f"{test.raters_b}, {cfg.min_raters} needed in each (canary.min_raters); "
                                   f"{figures_text}")
    elif test.high is not None and test.high < 0:
        verdict, reason = "rollback", f"worse: {figures_text}"
    elif test.low is not None and test.low > 0:
        verdict, reason = "promote", f"better: {figures_text}"
    elif now >= deadline:
        verdict, reason = "hold", f"no verdict by the deadline; holding at {share:.0%}: {figures_text}"
    elif later and (now - step_started).total_seconds() >= cfg.step_s:
        verdict, reason = "step_up", f"no harm seen at {share:.0%}: {figures_text}"
    else:
        verdict, reason = "hold", f"no verdict yet: {figures_text}"
    return CanaryReview(task=registry.task, champion=champion.version, canary=canary.version, share=share,
                        next_share=later[0] if later else None, started_at=started, step_started_at=step_started,
                        deadline=deadline, arms=arms, test=test, confidence=cfg.confidence, verdict=verdict,
                        reason=reason)


def apply(registry: Registry, decided: CanaryReview, *, actor: str) -> None:
    """Carry a review's verdict out on the registry (a hold changes nothing).

    Each verdict is one registry move on the state it was reviewed on: a promotion makes the canary champion
    and ends its trial in one move, and a move whose champion or canary changed since the review changes
    nothing (the next look reviews the new state)."""
    try:
        if decided.verdict == "promote":
            registry.promote_canary(decided.canary, expected_champion=decided.champion, actor=actor,
                                    reason=f"canary promoted: {decided.reason}")
        elif decided.verdict == "rollback":
            registry.end_canary(actor=actor, reason=f"rolled back: {decided.reason}", version=decided.canary)
        elif decided.verdict == "step_up" and decided.next_share is not None:
            registry.promote(decided.canary, alias=CANARY_ALIAS, traffic_fraction=decided.next_share, actor=actor,
                             reason=f"step up to {decided.next_share:.0%}: {decided.reason}",
                             expected_champion=decided.champion)
    except RegistryError as exc:  # the champion or the canary moved since the review
        log.warning("event=canary_verdict_stale task=%s version=%s verdict=%s why=%r", decided.task, decided.canary,
                    decided.verdict, str(exc))
        return
    if decided.verdict != "hold":
        log.info("event=canary_%s task=%s version=%s share=%.2f reason=%r", decided.verdict, decided.task,
                 decided.canary, decided.share, decided.reason)


class NoCanaryError(LookupError):
    """A canary action on a task that runs none."""


def decide_by_hand(registry: Registry, cfg: CanarySettings, ratings: Callable[[datetime], Ratings],
                   verdict: Literal["promote", "rollback"], *, actor: str, via: str,
                   figures: VersionFigures | None = None) -> CanaryReview:
    """Promote or abort `registry`'s task's canary now, whatever its ratings say: the review as it stands, its
    verdict overruled by `actor` (through `via`: the CLI, the admin API, the console), carried out like the
    controller's. Raises NoCanaryError when the task runs none."""
    decided = review(registry, cfg, ratings, figures or {})
    if decided is None:
        raise NoCanaryError(f"task {registry.task!r} runs no canary")
    decided = decided.model_copy(update={"verdict": verdict, "reason": f"by hand ({via}); {decided.reason}"})
    apply(registry, decided, actor=actor)
    return decided


class CanaryController(threading.Thread):
    """Reviews every task's canary every `canary.check_every_s` and carries the verdicts out."""

    def __init__(self, settings: Settings, stop: threading.Event,
                 ratings: Callable[[str, datetime], Ratings], figures: Callable[[], VersionFigures],
                 fence: int | None = None) -> None:
        """`fence`: the loop lease's epoch its moves carry (refused once another keeper leads); None: unfenced."""
        super().__init__(name="canary-controller", daemon=True)
        self.settings = settings
        self.stop = stop
        self.ratings = ratings
        self.figures = figures
        self.fence = fence
        self.last_reason: dict[str, str] = {}

    def check(self) -> list[CanaryReview]:
        reviews = []
        figures = self.figures()
        for task in known_tasks(self.settings):
            registry = registry_for(self.settings, task)
            if self.fence is not None:
                registry = registry.fenced(self.fence)
            self._complete_half_done(registry)
            decided = review(registry, self.settings.canary, lambda since, t=task: self.ratings(t, since), figures)
            if decided is None:
                continue
            if self.last_reason.get(task) != decided.reason.split(":")[0]:  # say a hold once, not every round
                log.info("event=canary_review task=%s verdict=%s reason=%r", task, decided.verdict, decided.reason)
                self.last_reason[task] = decided.reason.split(":")[0]
            apply(registry, decided, actor="canary-controller")
            reviews.append(decided)
        return reviews

    @staticmethod
    def _complete_half_done(registry: Registry) -> None:
        """A canary made champion whose trial was never ended (two moves, before they were one, with a failure
        between): end it now, so nothing waits on a trial that is over."""
        aliases = registry.aliases()
        canary, champion = aliases.get(CANARY_ALIAS), aliases.get("champion")
        if canary and canary.traffic_fraction and champion and champion.version == canary.version:
            registry.end_canary(actor="canary-controller", version=canary.version,
                                reason=f"promoted to champion: completing the move left half done ({champion.reason})")
            log.warning("event=canary_move_completed task=%s version=%s", registry.task, canary.version)

    def run(self) -> None:
        log.info("event=canary_controller_started every_s=%s", self.settings.canary.check_every_s)
        while not self.stop.wait(self.settings.canary.check_every_s):
            try:
                self.check()
            except Exception:  # the controller must outlive a bad round (a registry hiccup)
                log.exception("event=canary_check_failed")
