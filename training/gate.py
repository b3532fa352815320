"""The evaluation gate: only a candidate that is better where it should be, and no worse elsewhere, ships.

Candidate and champion are scored on the same examples by the engine that serves them, with the task's
own metric, so results are paired, and the test is of the gated metric itself: exact McNemar for 0/1
scores (accuracy, exact match, contains), a paired permutation test for macro-F1 and for continuous
scores (token-F1, ROUGE-L, chrF). Every test is one-sided (is the candidate better?) at the configured
alpha, and every gain comes with a bootstrap interval. A hold-out too small for the test to ever reach
alpha, or any check with no rows to score, gives `insufficient_data`, never a pass or a rejection.

The small-data policy (`decide_confirmed`) judges a batch of corrections users confirmed by repeating
them. It needs at least `retrain.min_confirmed_prompts` of them and a golden set; the candidate must give
those answers on their own prompts, and be non-inferior to the champion within `noninferiority_margin` (the
upper end of the drop's one-sided 1 - alpha bound, exact for 0/1 metrics) on the golden set and on the answers
of the champion that users rated well (it still gives them). A set the champion scores 0.000 on proves nothing: it is
`insufficient_data`, never a pass.

Both policies judge the golden set alike (`golden_check`, the same non-inferiority check): a golden set too
small to show non-inferiority is held to no loss, and one the champion scores 0.000 on is `insufficient_data`.

`first_champion` is the same test for a task's first adapter against the bare base on the test split.
"""

from __future__ import annotations

import math
from typing import Literal

from pydantic import BaseModel, Field, computed_field

from flywheel.config import GateSettings
from flywheel.tasks import TaskSpec
from training.evaluate import SliceScores
from training.metrics import PairedTest, macro_f1_test, mcnemar_test, mean_gain_test

Verdict = Literal["passed", "rejected", "insufficient_data"]
Outcome = Literal["passed", "failed", "insufficient_data"]
MAX_MIN_HOLDOUT = 64
"""`min_holdout` looks no further: an alpha no hold-out this size can reach is a configuration error."""


class GateCheck(BaseModel):
    name: str
    outcome: Outcome = Field(description="insufficient_data when the check had no rows to score.")
    value: float | None
    threshold: float
    rows: int = Field(description="How many rows the value rests on: examples, pairs or answered requests.")
    detail: str
    ci_low: float | None = Field(None, description="Interval of `value`, where it is an estimated gain or drop.")
    ci_high: float | None = None

    @computed_field  # type: ignore[prop-decorator]
    @property
    def passed(self) -> bool:
        return self.outcome == "passed"


def _check(name: str, *, ok: bool, value: float | None, threshold: float, rows: int, detail: str,
           interval: tuple[float | None, float | None] = (None, None)) -> GateCheck:
    outcome: Outcome = "insufficient_data" if rows == 0 else "passed" if ok else "failed"
    return GateCheck(name=name, outcome=outcome, value=value if rows else None, threshold=threshold, rows=rows,
                     detail=detail, ci_low=interval[0], ci_high=interval[1])


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


def paired_test(champion: SliceScores, candidate: SliceScores, spec: TaskSpec, alpha: float) -> PairedTest:
    """The one-sided test at `alpha` that the candidate is better on the gated metric itself, with the gain's
    interval at 1 - 2 alpha (its lower end is the one-sided bound the test matches)."""
    confidence = 1 - 2 * alpha
    if spec.gate_metric == "macro_f1":
        if not len(champion.predicted_labels) == len(candidate.predicted_labels) == candidate.n:
            raise ValueError("a macro-F1 test needs every example's predicted and expected labels")
        return macro_f1_test(champion.predicted_labels, candidate.predicted_labels, candidate.expected_labels,
                             spec.labels, confidence=confidence)
    if spec.binary_metric:
        return mcnemar_test([v >= 0.5 for v in champion.per_example], [v >= 0.5 for v in candidate.per_example],
                            confidence=confidence)
    return mean_gain_test(champion.per_example, candidate.per_example, confidence=confidence)


def _most_favourable(spec: TaskSpec, n: int) -> tuple[SliceScores, SliceScores]:
    """(champion, candidate) on `n` examples that only the candidate gets right."""
    label = spec.labels[0] if spec.labels else ""

    def arm(right: bool) -> SliceScores:
        return SliceScores(n=n, metric=spec.gate_metric, score=float(right), per_example=[float(right)] * n,
                           predicted_labels=[label if right else None] * n, expected_labels=[label] * n,
                           format_validity=1.0, mean_latency_ms=0.0)

    return arm(False), arm(True)


def min_holdout(spec: TaskSpec, alpha: float) -> int:
    """The fewest held-out examples at which the gate's test could reach p <= alpha at all, found by running
    that test (`paired_test`) on the most favourable hold-out of each size. Below it no result can be
    significant, so the gate says `insufficient_data` rather than reject a candidate for a tiny hold-out."""
    if not 0 < alpha < 0.5:
        raise ValueError(f"alpha must be in (0, 0.5), got {alpha}")
    for n in range(1, MAX_MIN_HOLDOUT + 1):
        if paired_test(*_most_favourable(spec, n), spec, alpha).p_value <= alpha:
            return n
    raise ValueError(f"no hold-out of up to {MAX_MIN_HOLDOUT} examples can reach alpha={alpha} with the "
                     f"{spec.gate_metric} test")


def golden_check(champion: SliceScores | None, candidate: SliceScores | None, spec: TaskSpec,
                 policy: GateSettings) -> GateCheck:
    """The golden set's non-regression, judged alike by both policies (`noninferiority_check`)."""
    return noninferiority_check("golden_regression", "golden", champion, candidate, spec, policy,
                                missing=_no_golden(spec))


def _interval_text(interval: tuple[float | None, float | None], confidence: float) -> str:
    low, high = interval
    return "no interval" if low is None or high is None else f"{confidence:.0%} CI {low:+.3f}..{high:+.3f}"


def _serving_checks(
    candidate: dict[str, SliceScores], new_c: SliceScores, new_k: SliceScores, parity: float | None,
    policy: GateSettings,
) -> list[GateCheck]:
    """What every policy asks of a candidate besides quality: well-formed answers, speed, engine parity."""
    scored = [s for s in candidate.values() if s.n > s.too_long]  # validity is a share of the answered prompts
    validity = min((s.format_validity for s in scored), default=0.0)
    too_long = sum(s.too_long for s in candidate.values())
    answered = min(new_c.n - new_c.too_long, new_k.n - new_k.too_long)
    latency_ratio = new_c.mean_latency_ms / max(new_k.mean_latency_ms, 1e-6)
    checks = [
        _check("format_validity", ok=validity >= policy.min_format_validity, value=validity,
               threshold=policy.min_format_validity, rows=sum(s.n - s.too_long for s in scored),
               detail=f"worst slice validity {validity:.3f} of answered prompts"
                      + (f"; {too_long} prompts too long for the context, left out (scored 0 for both arms)"
                         if too_long else "")),
        _check("latency", ok=latency_ratio <= policy.max_latency_ratio, value=latency_ratio,
               threshold=policy.max_latency_ratio, rows=answered,
               detail=f"mean latency ratio {latency_ratio:.2f} over {answered} answers per arm"),
    ]
    if parity is not None:
        probed = min(policy.parity_prompts, answered)  # the pipeline probes the new slice's first prompts that fit
        checks.append(_check("engine_parity", ok=parity >= policy.min_parity, value=parity,
                             threshold=policy.min_parity, rows=probed,
                             detail=f"serving engine agrees with the PEFT reference on {parity:.0%} of {probed}"))
    return checks


def _report(metric: str, checks: list[GateCheck]) -> GateReport:
    """Rejected when a check failed on rows; else insufficient data when one had none; else passed."""
    failed = [c for c in checks if c.outcome == "failed"]
    unscored = [c for c in checks if c.outcome == "insufficient_data"]
    if failed:
        return GateReport(verdict="rejected", metric=metric, checks=checks,
                          message="; ".join(f"{c.name}: {c.detail}" for c in failed))
    if unscored:
        return GateReport(verdict="insufficient_data", metric=metric, checks=checks,
                          message="; ".join(f"{c.name}: no rows to judge ({c.detail})" for c in unscored))
    return GateReport(verdict="passed", metric=metric, checks=checks, message=checks[0].detail)


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
    alpha = policy.significance_alpha
    needed = min_holdout(spec, alpha)
    if new_c.n < needed:
        return GateReport(
            verdict="insufficient_data", metric=metric, checks=[],
            message=f"{new_c.n} held-out examples; the {metric} test at alpha={alpha} needs at least {needed} to "
                    f"ever be significant",
        )
    test = paired_test(new_k, new_c, spec, alpha)
    interval = (test.ci_low, test.ci_high)
    checks = [
        _check("improvement", ok=test.gain >= policy.min_improvement, value=test.gain,
               threshold=policy.min_improvement, rows=test.n, interval=interval,
               detail=f"{new_slice} {metric} {test.champion:.3f} -> {test.candidate:.3f} on {test.n} examples "
                      f"({test.gain:+.3f}, {_interval_text(interval, test.confidence)})"),
        _check("significance", ok=test.gain > 0 and test.p_value <= alpha, value=test.p_value, threshold=alpha,
               rows=test.n, detail=test.describe()),
        golden_check(champion.get(golden_slice), candidate.get(golden_slice), spec, policy),
    ]
    return _report(metric, checks + _serving_checks(candidate, new_c, new_k, parity, policy))


def exact_loss_bound(lost: int, n: int, alpha: float) -> float:
    """The one-sided 1 - alpha upper bound of the share of examples lost (`lost` of `n`), exact (Clopper-Pearson,
    scipy.stats.binomtest): however few the examples, it never collapses to what they happened to show."""
    from scipy.stats import binomtest

    return float(binomtest(lost, n, alternative="less").proportion_ci(confidence_level=1 - alpha,
                                                                       method="exact").high)


def min_noninferiority_rows(alpha: float, margin: float) -> int | None:
    """The fewest examples whose exact bound could be within `margin` at all: none lost, 1 - alpha**(1/n) <= margin
    (the closed form of `exact_loss_bound(0, n, alpha)`). None when no number of examples can (margin 0)."""
    if margin <= 0:
        return None
    n = max(1, math.ceil(math.log(alpha) / math.log1p(-margin)))
    while exact_loss_bound(0, n, alpha) > margin:  # the closed form's rounding, at most a step
        n += 1
    return n


def noninferiority_check(name: str, what: str, champion: SliceScores | None, candidate: SliceScores | None,
                         spec: TaskSpec, policy: GateSettings, *, missing: str) -> GateCheck:
    """Whether the candidate is no worse than the champion on `what` by more than `policy.noninferiority_margin`:
    the upper end of the drop's one-sided 1 - alpha bound must be within it. Both policies judge the golden set with
    it, and the small-data policy the answers users rated well.

    For 0/1 metrics the bound is exact: the drop is at most the share of examples the candidate lost (gains do not
    buy losses back), bounded by Clopper-Pearson. For continuous metrics and macro-F1 it is the bootstrap interval's
    upper end. A set too small for the bound to be within the margin even with none lost (3 answers all kept bound
    a loss of 63 % at alpha 0.05; it takes 59 for a 5 % margin) is held to no loss at all instead: the candidate
    passes only if it scores no example lower than the champion, and the report says the set was too small to
    show the margin and how many it would take (a user's golden set of 20 questions must still let a correction
    through, and "lost none of 20" is what an operator can defend). No rows, or a champion at 0.000 (no drop could
    show), is `insufficient_data`: it proves nothing either way."""
    margin, alpha = policy.noninferiority_margin, policy.significance_alpha
    if champion is None or candidate is None or candidate.n == 0:
        return _check(name, ok=False, value=None, threshold=margin, rows=0, detail=missing)
    test = paired_test(champion, candidate, spec, alpha)
    drop = -test.gain
    lost = sum(c < k for k, c in zip(champion.per_example, candidate.per_example, strict=True))
    if spec.binary_metric:
        interval: tuple[float | None, float | None] = (None, exact_loss_bound(lost, test.n, alpha))
        bound = f"{lost} of {test.n} lost, exact one-sided {1 - alpha:.0%} bound {interval[1]:+.3f}"
    else:
        interval = (None, None) if test.ci_low is None or test.ci_high is None else (-test.ci_high, -test.ci_low)
        bound = _interval_text(interval, test.confidence)
    figures = (f"{what} {candidate.metric} {test.champion:.3f} -> {test.candidate:.3f} on {test.n} examples (drop "
               f"{drop:+.3f}, {bound}; non-inferiority margin {margin:.3f})")
    needed = min_noninferiority_rows(alpha, margin)
    if test.champion == 0.0:
        return GateCheck(name=name, outcome="insufficient_data", value=drop, threshold=margin, rows=test.n,
                         detail=f"{figures}: the champion scores 0.000 on them, so no regression could show: they "
                                "prove nothing", ci_low=interval[0], ci_high=interval[1])
    if needed is None or test.n < needed or interval[1] is None:
        too_few = (f"{test.n} examples are too few to show a drop within the margin (with none lost the exact bound "
                   f"is {exact_loss_bound(0, test.n, alpha):.3f}; it takes {needed})" if needed else
                   "a margin of 0 can never be shown")
        return _check(name, ok=lost == 0, value=drop, threshold=margin, rows=test.n, interval=interval,
                      detail=f"{figures}: {too_few}, so they are held to no loss: {lost} of {test.n} scored lower")
    return _check(name, ok=interval[1] <= margin, value=drop, threshold=margin, rows=test.n, interval=interval,
                  detail=figures)


def _no_golden(spec: TaskSpec) -> str:
    return (f"the task has no golden set, so nothing shows the candidate regresses nowhere else: give it one "
            f"(`flywheel train --task {spec.name} --data FILE --eval-file GOLDEN.jsonl` keeps the file as the golden "
            f"set of a task that has none)")


NO_WELL_RATED = ("no recent answer of the champion was rated well (rating >= 4 or thumbs up), so nothing shows the "
                 "candidate still gives them; wait for users' ratings")


def _too_few(confirmed: int, min_prompts: int) -> str | None:
    return None if confirmed >= min_prompts else (
        f"{confirmed} distinct prompts with a confirmed correction; the small-data policy needs at least "
        f"{min_prompts} (retrain.min_confirmed_prompts)")


def small_data_problem(spec: TaskSpec, *, confirmed: int, golden: int, well_rated: int, min_prompts: int
                       ) -> str | None:
    """Why the small-data policy could not judge a candidate (None: it could): too few confirmed prompts, no golden
    set, or no answer of the champion rated well. The pipeline asks before it trains; `decide_confirmed` judges
    the same on what was scored."""
    problems = [_too_few(confirmed, min_prompts), None if golden else _no_golden(spec),
                None if well_rated else NO_WELL_RATED]
    return "; ".join(p for p in problems if p) or None


def decide_confirmed(
    champion: dict[str, SliceScores],
    candidate: dict[str, SliceScores],
    *,
    spec: TaskSpec,
    new_slice: str,
    golden_slice: str,
    rated_slice: str,
    parity: float | None,
    policy: GateSettings,
    min_prompts: int,
) -> GateReport:
    """The small-data policy: `new_slice` holds the confirmed corrections (trained on, by design), `rated_slice`
    the champion's recent answers that users rated well (the served answer is the reference), and `golden_slice`
    the task's golden set. `min_prompts` is `retrain.min_confirmed_prompts`."""
    new_c, new_k = candidate[new_slice], champion[new_slice]
    metric = spec.gate_metric
    golden = candidate.get(golden_slice)
    if too_few := _too_few(new_c.n, min_prompts):
        return GateReport(verdict="insufficient_data", metric=metric, checks=[], message=too_few)
    test = paired_test(new_k, new_c, spec, policy.significance_alpha)
    interval = (test.ci_low, test.ci_high)
    checks = [
        _check("confirmed_corrections", ok=new_c.score >= policy.min_confirmed_score, value=new_c.score,
               threshold=policy.min_confirmed_score, rows=new_c.n,
               detail=f"{new_c.n} confirmed corrections honoured on their own prompts: {metric} "
                      f"{new_k.score:.3f} -> {new_c.score:.3f} (gain {test.gain:+.3f}, "
                      f"{_interval_text(interval, test.confidence)})"),
        golden_check(champion.get(golden_slice), golden, spec, policy),
        noninferiority_check(
            "well_rated_answers", "answers users rated well", champion.get(rated_slice), candidate.get(rated_slice),
            spec, policy, missing=NO_WELL_RATED),
    ]
    return _report(metric, checks + _serving_checks(candidate, new_c, new_k, parity, policy))


def first_champion(base: SliceScores, candidate: SliceScores, spec: TaskSpec, policy: GateSettings) -> GateCheck:
    """Whether a task's first adapter may serve: it must beat the bare base on the test split by the task's gate
    test (one-sided at alpha). A test split too small to ever reach alpha is `insufficient_data`."""
    alpha = policy.significance_alpha
    if candidate.n < (needed := min_holdout(spec, alpha)):
        return GateCheck(name="beats_base", outcome="insufficient_data", value=None, threshold=alpha,
                         rows=candidate.n, detail=f"{candidate.n} test examples; the {spec.gate_metric} test at "
                                                  f"alpha={alpha} needs at least {needed} to ever be significant")
    test = paired_test(base, candidate, spec, alpha)
    return _check("beats_base", ok=test.gain > 0 and test.p_value <= alpha, value=test.p_value, threshold=alpha,
                  rows=test.n, interval=(test.ci_low, test.ci_high),
                  detail=f"test {spec.gate_metric}: base {test.champion:.3f} -> adapter {test.candidate:.3f}; "
                         f"{test.describe()}")
