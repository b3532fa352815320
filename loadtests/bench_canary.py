"""How many ratings the canary's sequential test needs, and how often it is fooled, on simulated raters.

Raters give 1-5 (a normal around each arm's mean, sd 1, rounded and clipped); the controller looks after
every `batch` new ratings per arm, as it would every few seconds. Reported: ratings per arm until a
verdict for a 0.5-point difference (median, 90th percentile, share found within the budget), and the
share of equal-arm runs where it ever declared a winner (should stay near 1 - confidence).
"""

from __future__ import annotations

import random
import statistics

from pydantic import BaseModel

from flywheel.canary import sequential_difference
from flywheel.config import CanarySettings


class CanaryBenchReport(BaseModel):
    difference: float
    confidence: float
    effect_sd: float
    runs: int
    found_share: float
    ratings_per_arm_median: float | None
    ratings_per_arm_p90: float | None
    false_verdict_share: float
    fixed_n_false_verdict_share: float

    def lines(self) -> list[str]:
        return [
            f"{self.difference:+.1f}-point difference found in {self.found_share:.0%} of {self.runs} runs; ratings per "
            f"arm to a verdict: median {self.ratings_per_arm_median}, p90 {self.ratings_per_arm_p90}",
            f"no difference: a verdict in {self.false_verdict_share:.1%} of runs (sequential test, looked at every "
            f"batch) vs {self.fixed_n_false_verdict_share:.1%} for a fixed-n z-test looked at as often",
        ]


def _ratings(rng: random.Random, mean: float, n: int) -> list[float]:
    return [float(min(5, max(1, round(rng.gauss(mean, 1.0))))) for _ in range(n)]


def _z_significant(a: list[float], b: list[float], z: float) -> bool:
    se = (statistics.variance(a) / len(a) + statistics.variance(b) / len(b)) ** 0.5
    return se > 0 and abs(statistics.fmean(b) - statistics.fmean(a)) / se > z


def run_canary_bench(cfg: CanarySettings, *, difference: float = 0.5, runs: int = 400, batch: int = 10,
                     max_per_arm: int = 1000, seed: int = 0) -> CanaryBenchReport:
    rng = random.Random(seed)
    alpha = 1 - cfg.confidence
    z = statistics.NormalDist().inv_cdf(1 - alpha / 2)

    def run(delta: float) -> tuple[int | None, bool]:
        a: list[float] = []
        b: list[float] = []
        naive = False
        while len(a) < max_per_arm:
            a += _ratings(rng, 3.0, batch)
            b += _ratings(rng, 3.0 + delta, batch)
            naive = naive or (len(a) >= cfg.min_ratings and _z_significant(a, b, z))
            result = sequential_difference(a, b, alpha=alpha, effect_sd=cfg.effect_sd)
            if len(a) >= cfg.min_ratings and (result.low > 0 or result.high < 0):
                return len(a), naive
        return None, naive

    found = [run(difference)[0] for _ in range(runs)]
    null = [run(0.0) for _ in range(runs)]
    needed = sorted(n for n in found if n is not None)
    return CanaryBenchReport(
        difference=difference, confidence=cfg.confidence, effect_sd=cfg.effect_sd, runs=runs,
        found_share=len(needed) / runs,
        ratings_per_arm_median=statistics.median(needed) if needed else None,
        ratings_per_arm_p90=needed[int(0.9 * (len(needed) - 1))] if needed else None,
        false_verdict_share=sum(n is not None for n, _ in null) / runs,
        fixed_n_false_verdict_share=sum(naive for _, naive in null) / runs,
    )
