"""Is the canary's verdict right, and how many ratings does it take? A simulation with correlated raters.

Each simulated user has a personal bias (some rate everything high), keeps their arm (the canary's share is
sticky per user) and rates many answers; ratings arrive interleaved, as the controller sees them, and the
trial is followed rating by rating, its first crossing ending it (`flywheel.canary.sequential_trial`).

- A/A trials (no true difference): the share that ends in a verdict, which must stay within alpha, with its
  exact (Clopper-Pearson) confidence interval; beside it the same streams with every rating counted as an
  independent rater, which is what one mean per rater prevents.
- Trials with a true difference (+0.3 points by default): the share that reaches a verdict within the
  budget, and the ratings per arm it took (median, 90th percentile).
- The same streams through savvi's anytime-valid linear-regression t-test (Lindon et al. 2024), a published
  implementation of an always-valid test of a difference in means, updated rating by rating: on streams of
  independent raters both tests must hold alpha and find the difference; on correlated raters savvi, which
  assumes independent observations, is fooled, and ours is not.
"""

from __future__ import annotations

import math
import random
import statistics
from collections.abc import Iterator

from pydantic import BaseModel, Field

from flywheel.canary import SequentialResult, sequential_trial
from flywheel.config import CanarySettings

Stream = list[tuple[bool, float, str | None]]
"""(in the canary's arm?, rating 1-5, rater) in arrival order: what `sequential_trial` follows."""


class Population(BaseModel):
    """The simulated users of one trial."""

    raters: int = Field(400, description="Users who rate; each keeps their arm.")
    rater_sd: float = Field(0.7, description="Spread of the users' personal biases (points).")
    noise_sd: float = Field(0.8, description="Spread of one user's ratings around their own mean.")
    share: float = Field(0.5, description="The canary's share of users.")
    mean: float = Field(3.0, description="The champion's mean rating before rounding to 1-5.")
    ratings: int = Field(3000, description="Ratings per trial at most (the budget).")


def rater_stream(rng: random.Random, population: Population, difference: float, *, independent: bool = False
                 ) -> Stream:
    """One trial's ratings. `difference`: the canary's shift in points (before rounding). `independent`: every
    rating by a user of its own (no personal bias, no rater id), the case every test's textbook assumes."""
    bias = [rng.gauss(0, population.rater_sd) for _ in range(population.raters)]
    on_canary = [rng.random() < population.share for _ in range(population.raters)]
    stream: Stream = []
    for _ in range(population.ratings):
        if independent:
            in_b, shift, rater = rng.random() < population.share, 0.0, None
        else:
            user = rng.randrange(population.raters)
            in_b, shift, rater = on_canary[user], bias[user], f"user-{user}"
        value = population.mean + shift + (difference if in_b else 0.0) + rng.gauss(0, population.noise_sd)
        stream.append((in_b, float(min(5, max(1, round(value)))), rater))
    return stream


def decided(result: SequentialResult) -> bool:
    return result.low is not None and result.high is not None and (result.low > 0 or result.high < 0)


def ours(stream: Stream, cfg: CanarySettings) -> tuple[bool, float]:
    """(a verdict?, ratings per arm when the trial ended) with the canary's own test."""
    result = sequential_trial(stream, alpha=1 - cfg.confidence, effect_sd=cfg.effect_sd, min_ratings=cfg.min_ratings,
                              min_raters=cfg.min_raters)
    return decided(result), (result.n_a + result.n_b) / 2


def savvi_trial(stream: Stream, cfg: CanarySettings, *, look_every: int = 10, phi: float = 1.0) -> tuple[bool, float]:
    """(a verdict?, ratings per arm at it) with savvi's anytime-valid t-test of the canary coefficient in
    rating ~ 1 + canary, updated with every rating and looked at every `look_every` (its p-value the running
    minimum, as savvi keeps it) once both arms have `min_ratings`."""
    import numpy as np
    from savvi.linear_regression import LinearRegression

    model = LinearRegression(alpha=1 - cfg.confidence, p=2, phi=phi)
    counts = [0, 0]
    with np.errstate(divide="ignore", invalid="ignore"):  # its interval is infinite until it has data enough
        for i, (in_b, value, _rater) in enumerate(stream, start=1):
            model.update(np.array([value, 1.0, float(in_b)]))
            counts[in_b] += 1
            if min(counts) >= cfg.min_ratings and i % look_every == 0:
                model.infer()
                if model.p_value[1] <= 1 - cfg.confidence:
                    return True, i / 2
    return False, len(stream) / 2


def exact_interval(successes: int, trials: int, confidence: float = 0.95) -> tuple[float, float]:
    from scipy.stats import binomtest

    ci = binomtest(successes, trials).proportion_ci(confidence_level=confidence, method="exact")
    return ci.low, ci.high


class Share(BaseModel):
    """How many of `trials` ended in a verdict, with the exact 95 % interval of that share."""

    verdicts: int
    trials: int
    share: float
    low: float
    high: float

    @classmethod
    def of(cls, outcomes: list[bool]) -> Share:
        low, high = exact_interval(sum(outcomes), len(outcomes))
        return cls(verdicts=sum(outcomes), trials=len(outcomes), share=sum(outcomes) / len(outcomes), low=low,
                   high=high)

    def text(self) -> str:
        return f"{self.share:.1%} ({self.verdicts}/{self.trials}, 95% CI {self.low:.1%}..{self.high:.1%})"


class Power(BaseModel):
    found: Share
    ratings_per_arm_median: float | None
    ratings_per_arm_p90: float | None

    @classmethod
    def of(cls, outcomes: list[tuple[bool, float]]) -> Power:
        needed = sorted(n for found, n in outcomes if found)
        return cls(found=Share.of([found for found, _ in outcomes]),
                   ratings_per_arm_median=statistics.median(needed) if needed else None,
                   ratings_per_arm_p90=needed[math.ceil(0.9 * len(needed)) - 1] if needed else None)

    def text(self) -> str:
        return (f"found in {self.found.text()}; ratings per arm to a verdict: median {self.ratings_per_arm_median}, "
                f"p90 {self.ratings_per_arm_p90}")


class Comparison(BaseModel):
    """savvi's test beside ours on the same streams: correlated raters, then independent ones."""

    trials: int
    savvi_aa: Share = Field(description="Correlated A/A streams: savvi, which takes every rating as independent.")
    savvi_power: Power
    independent_ours_aa: Share = Field(description="Streams of independent raters: both tests are valid here.")
    independent_savvi_aa: Share
    independent_ours_power: Power
    independent_savvi_power: Power


class CanaryBenchReport(BaseModel):
    confidence: float
    effect_sd: float
    min_ratings: int
    min_raters: int = 2
    population: Population
    difference: float
    false_verdicts: Share = Field(description="A/A trials, correlated raters, one mean per rater (ours).")
    false_verdicts_within_alpha: bool = Field(description="The observed share is at most alpha.")
    false_verdicts_per_rating: Share = Field(description="The same A/A streams, every rating its own rater.")
    power: Power = Field(description="Trials with the true difference, correlated raters (ours).")
    savvi: Comparison | None = None

    def lines(self) -> list[str]:
        alpha = 1 - self.confidence
        p = self.population
        lines = [
            f"{p.raters} raters (bias sd {p.rater_sd}, own sd {p.noise_sd}), canary share {p.share:.0%}, up to "
            f"{p.ratings} ratings a trial, alpha {alpha:.2f}, effect_sd {self.effect_sd}, min {self.min_ratings} "
            f"ratings from {self.min_raters} raters per arm",
            f"A/A: a verdict in {self.false_verdicts.text()} of trials, "
            f"{'within' if self.false_verdicts_within_alpha else 'OVER'} alpha {alpha:.0%}; counting every rating "
            f"as a rater of its own: {self.false_verdicts_per_rating.text()}",
            f"{self.difference:+.1f} points: {self.power.text()}",
        ]
        if c := self.savvi:
            lines += [
                f"savvi on the first {c.trials} of the same streams (every rating independent): A/A "
                f"{c.savvi_aa.text()}; {self.difference:+.1f} points: {c.savvi_power.text()}",
                f"independent raters, ours | savvi: A/A {c.independent_ours_aa.text()} | "
                f"{c.independent_savvi_aa.text()}; {self.difference:+.1f} points: {c.independent_ours_power.text()} | "
                f"{c.independent_savvi_power.text()}",
            ]
        return lines


def _streams(seed: int, population: Population, difference: float, trials: int, *, independent: bool = False
             ) -> Iterator[Stream]:
    rng = random.Random(seed)
    for _ in range(trials):
        yield rater_stream(rng, population, difference, independent=independent)


def run_canary_bench(cfg: CanarySettings, *, difference: float = 0.3, trials: int = 1000,
                     population: Population | None = None, compare_trials: int = 0, seed: int = 0
                     ) -> CanaryBenchReport:
    """`trials` A/A trials and as many with `difference`; savvi on the first `compare_trials` (0: not compared)."""
    population = population or Population()
    aa = list(_streams(seed, population, 0.0, trials))
    shifted = list(_streams(seed + 1, population, difference, trials))
    report = CanaryBenchReport(
        confidence=cfg.confidence, effect_sd=cfg.effect_sd, min_ratings=cfg.min_ratings, min_raters=cfg.min_raters,
        population=population, difference=difference,
        false_verdicts=(false := Share.of([ours(s, cfg)[0] for s in aa])),
        false_verdicts_within_alpha=false.share <= 1 - cfg.confidence,
        false_verdicts_per_rating=Share.of([ours([(b, v, None) for b, v, _ in s], cfg)[0] for s in aa]),
        power=Power.of([ours(s, cfg) for s in shifted]),
    )
    if compare_trials:
        n = min(compare_trials, trials)
        independent_aa = list(_streams(seed + 2, population, 0.0, n, independent=True))
        independent_shifted = list(_streams(seed + 3, population, difference, n, independent=True))
        report.savvi = Comparison(
            trials=n,
            savvi_aa=Share.of([savvi_trial(s, cfg)[0] for s in aa[:n]]),
            savvi_power=Power.of([savvi_trial(s, cfg) for s in shifted[:n]]),
            independent_ours_aa=Share.of([ours(s, cfg)[0] for s in independent_aa]),
            independent_savvi_aa=Share.of([savvi_trial(s, cfg)[0] for s in independent_aa]),
            independent_ours_power=Power.of([ours(s, cfg) for s in independent_shifted]),
            independent_savvi_power=Power.of([savvi_trial(s, cfg) for s in independent_shifted]),
        )
    return report
