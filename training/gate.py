"""The evaluation gate: only a candidate that is better where it should be, and no worse elsewhere, ships.

Candidate and champion are scored on the same examples by the engine that serves them, with the task's
own metric, so results are paired: McNemar's exact test for 0/1 scores (accuracy, exact match,
contains), a seeded paired bootstrap for continuous ones (token-F1, ROUGE-L, chrF). A hold-out too small
for the test to ever reach the configured alpha gives `insufficient_data`, never a rejection.

The small-data policy (`decide_confirmed`) judges a batch of corrections users confirmed by repeating
them: the candidate must give those answers on their own prompts, and regress nothing on the golden set.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel

from flywheel.config import GateSettings
from flywheel.tasks import TaskSpec
from training.evaluate import SliceScores
from training.metrics import mcnemar_p, min_pairs_for_alpha, paired_bootstrap

Verdict = Literal["passed", "rejected", "insufficient_data"]


class GateCheck(BaseModel):
    name: str
    passed: bool
    value: float | None
    threshold: float
    detail: str


class GateReport(BaseModel):
    verdict: Verdict
    metric: str
    checks: list[GateCheck]
    message: str = ""

    @property
    def passed(self) -> bool:
        return self.verdict == "passed"

    def failures(self) -> list[str]:
        return [f"{c.name}: {c.detail}" for c in self.checks if not c.passed]


def significance(champion: SliceScores, candidate: SliceScores, spec: TaskSpec, alpha: float) -> tuple[float, str]:
    """(p-value that the candidate is better, how it was computed) on paired per-example scores."""
    if spec.binary_metric or spec.kind == "classification":
        p = mcnemar_p([v >= 0.5 for v in champion.per_example], [v >= 0.5 for v in candidate.per_example])
        return p, f"McNemar p={p:.4f} on {candidate.n} paired examples"
    result = paired_bootstrap(champion.per_example, candidate.per_example)
    return result.p_value, (f"paired bootstrap p={result.p_value:.4f} on {result.n} pairs, mean difference "
                            f"{result.mean_diff:+.3f} (95% CI {result.ci_low:+.3f}..{result.ci_high:+.3f})")


def golden_check(champion: SliceScores | None, candidate: SliceScores | None, policy: GateSettings) -> GateCheck:
    if champion is None or candidate is None or candidate.n == 0:
        return GateCheck(name="golden_regression", passed=True, value=None, threshold=policy.max_golden_regression,
                         detail="the task has no golden set yet")
    drop = champion.score - candidate.score
    return GateCheck(name="golden_regression", passed=drop <= policy.max_golden_regression, value=drop,
                     threshold=policy.max_golden_regression,
                     detail=f"golden {candidate.metric} {champion.score:.3f} -> {candidate.score:.3f}")


def _serving_checks(
    candidate: dict[str, SliceScores], new_c: SliceScores, new_k: SliceScores, parity: float | None,
    policy: GateSettings,
) -> list[GateCheck]:
    """What every policy asks of a candidate besides quality: well-formed answers, speed, engine parity."""
    validity = min(s.format_validity for s in candidate.values() if s.n)
    latency_ratio = new_c.mean_latency_ms / max(new_k.mean_latency_ms, 1e-6)
    checks = [
        GateCheck(name="format_validity", passed=validity >= policy.min_format_validity, value=validity,
                  threshold=policy.min_format_validity, detail=f"worst slice validity {validity:.3f}"),
        GateCheck(name="latency", passed=latency_ratio <= policy.max_latency_ratio, value=latency_ratio,
                  threshold=policy.max_latency_ratio, detail=f"mean latency ratio {latency_ratio:.2f}"),
    ]
    if parity is not None:
        checks.append(GateCheck(name="engine_parity", passed=parity >= policy.min_parity, value=parity,
                                threshold=policy.min_parity,
                                detail=f"serving engine agrees with the PEFT reference on {parity:.0%}"))
    return checks


def _report(metric: str, checks: list[GateCheck]) -> GateReport:
    passed = all(c.passed for c in checks)
    return GateReport(verdict="passed" if passed else "rejected", metric=metric, checks=checks,
                      message=checks[0].detail if passed else "; ".join(f"{c.name}: {c.detail}"
                                                                        for c in checks if not c.passed))


def decide(
    champion: dict[str, SliceScores],
    candidate: dict[str, SliceScores],
    *,
    spec: TaskSpec,
    new_slice: str,
    golden_slice: str,
    parity: float | None,
    policy: GateSettings,
) -> GateReport:
    """Apply `policy` to paired scores of the two adapters on the task's metric."""
    new_c, new_k = candidate[new_slice], champion[new_slice]
    metric = spec.gate_metric
    needed = min_pairs_for_alpha(policy.significance_alpha, binary=spec.binary_metric)
    if new_c.n < needed:
        return GateReport(
            verdict="insufficient_data", metric=metric, checks=[],
            message=f"{new_c.n} held-out examples; a paired test at alpha={policy.significance_alpha} needs at "
                    f"least {needed} to ever be significant",
        )
    gain = new_c.score - new_k.score
    p, how = significance(new_k, new_c, spec, policy.significance_alpha)
    checks = [
        GateCheck(name="improvement", passed=gain >= policy.min_improvement, value=gain,
                  threshold=policy.min_improvement,
                  detail=f"{new_slice} {metric} {new_k.score:.3f} -> {new_c.score:.3f} ({gain:+.3f})"),
        GateCheck(name="significance", passed=gain > 0 and p <= policy.significance_alpha, value=p,
                  threshold=policy.significance_alpha, detail=how),
        golden_check(champion.get(golden_slice), candidate.get(golden_slice), policy),
    ]
    return _report(metric, checks + _serving_checks(candidate, new_c, new_k, parity, policy))


def decide_confirmed(
    champion: dict[str, SliceScores],
    candidate: dict[str, SliceScores],
    *,
    spec: TaskSpec,
    new_slice: str,
    golden_slice: str,
    parity: float | None,
    policy: GateSettings,
) -> GateReport:
    """The small-data policy: `new_slice` holds the confirmed corrections (trained on, by design)."""
    new_c, new_k = candidate[new_slice], champion[new_slice]
    metric = spec.gate_metric
    checks = [
        GateCheck(name="confirmed_corrections", passed=new_c.score >= policy.min_confirmed_score, value=new_c.score,
                  threshold=policy.min_confirmed_score,
                  detail=f"{new_c.n} confirmed corrections honoured on their own prompts: {metric} "
                         f"{new_k.score:.3f} -> {new_c.score:.3f}"),
        golden_check(champion.get(golden_slice), candidate.get(golden_slice), policy),
    ]
    return _report(metric, checks + _serving_checks(candidate, new_c, new_k, parity, policy))
