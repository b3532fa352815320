"""The evaluation gate: only a candidate that is better where it should be, and no worse elsewhere, ships.

Candidate and champion are scored on the same examples by the engine that serves them, so results
are paired: significance is McNemar's exact test on the discordant pairs.
"""

from __future__ import annotations

import math

from pydantic import BaseModel, Field

from flywheel.config import GateSettings


class SliceScores(BaseModel):
    """One adapter on one evaluation slice."""

    n: int
    accuracy: float
    format_validity: float
    perplexity: float | None = None
    mean_latency_ms: float
    correct: list[bool] = Field(description="Per example, in slice order: the pairing for significance.")


class GateCheck(BaseModel):
    name: str
    passed: bool
    value: float | None
    threshold: float
    detail: str


class GateReport(BaseModel):
    passed: bool
    checks: list[GateCheck]

    def failures(self) -> list[str]:
        return [f"{c.name}: {c.detail}" for c in self.checks if not c.passed]


def mcnemar_p(champion: list[bool], candidate: list[bool]) -> float:
    """Two-sided exact McNemar p-value for paired correctness (1.0 when nothing differs)."""
    if len(champion) != len(candidate):
        raise ValueError("paired results must have the same length")
    only_candidate = sum(1 for a, b in zip(champion, candidate, strict=True) if b and not a)
    only_champion = sum(1 for a, b in zip(champion, candidate, strict=True) if a and not b)
    n = only_candidate + only_champion
    if n == 0:
        return 1.0
    k = min(only_candidate, only_champion)
    tail = sum(math.comb(n, i) for i in range(k + 1)) / 2**n
    return min(1.0, 2 * tail)


def decide(
    champion: dict[str, SliceScores],
    candidate: dict[str, SliceScores],
    *,
    new_slice: str,
    golden_slice: str,
    parity: float | None,
    policy: GateSettings,
) -> GateReport:
    """Apply `policy` to paired scores of the two adapters."""
    new_c, new_k = candidate[new_slice], champion[new_slice]
    gold_c, gold_k = candidate[golden_slice], champion[golden_slice]
    gain = new_c.accuracy - new_k.accuracy
    drop = gold_k.accuracy - gold_c.accuracy
    p = mcnemar_p(new_k.correct, new_c.correct)
    validity = min(new_c.format_validity, gold_c.format_validity)
    latency_ratio = new_c.mean_latency_ms / max(new_k.mean_latency_ms, 1e-6)
    checks = [
        GateCheck(name="improvement", passed=gain >= policy.min_improvement, value=gain,
                  threshold=policy.min_improvement,
                  detail=f"{new_slice} accuracy {new_k.accuracy:.3f} -> {new_c.accuracy:.3f} ({gain:+.3f})"),
        GateCheck(name="significance", passed=gain > 0 and p <= policy.significance_alpha, value=p,
                  threshold=policy.significance_alpha, detail=f"McNemar p={p:.4f} on {new_c.n} paired examples"),
        GateCheck(name="golden_regression", passed=drop <= policy.max_golden_regression, value=drop,
                  threshold=policy.max_golden_regression,
                  detail=f"{golden_slice} accuracy {gold_k.accuracy:.3f} -> {gold_c.accuracy:.3f}"),
        GateCheck(name="format_validity", passed=validity >= policy.min_format_validity, value=validity,
                  threshold=policy.min_format_validity, detail=f"worst slice validity {validity:.3f}"),
        GateCheck(name="latency", passed=latency_ratio <= policy.max_latency_ratio, value=latency_ratio,
                  threshold=policy.max_latency_ratio, detail=f"mean latency ratio {latency_ratio:.2f}"),
    ]
    if parity is not None:
        checks.append(GateCheck(name="engine_parity", passed=parity >= policy.min_parity, value=parity,
                                threshold=policy.min_parity,
                                detail=f"serving engine agrees with the PEFT reference on {parity:.0%}"))
    return GateReport(passed=all(c.passed for c in checks), checks=checks)
