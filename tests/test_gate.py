"""The gate's statistics on fabricated paired scores: which test, how small a hold-out, calibration, rows."""

from __future__ import annotations

import asyncio
import random

import pytest

from flywheel.config import Settings
from flywheel.tasks import TaskSpec
from services.engines.protocol import AdapterHandle, ChatMessage, Generation, PromptTooLongError, SamplingOptions
from training.evaluate import EvalExample, SliceScores, evaluate, parity
from training.gate import (
    decide,
    decide_confirmed,
    exact_loss_bound,
    first_champion,
    min_holdout,
    min_noninferiority_rows,
    small_data_problem,
)

POLICY = Settings().retrain.gate
ALPHA = POLICY.significance_alpha
GOLDEN = [1.0, 0.0] * 40


def scores(per_example: list[float], metric: str = "token_f1", *, too_long: int = 0,
           predicted: list[str | None] | None = None, expected: list[str] | None = None) -> SliceScores:
    n = len(per_example)
    return SliceScores(n=n, metric=metric, score=sum(per_example) / n if n else 0.0, per_example=per_example,
                       predicted_labels=predicted or [], expected_labels=expected or [], format_validity=1.0,
                       too_long=too_long, mean_latency_ms=10.0)


def labelled(predicted: list[str | None], expected: list[str], labels: list[str]) -> SliceScores:
    """A classification slice scored by macro-F1, as `score_slice` builds it."""
    from training.metrics import classification_report

    report = classification_report(predicted, expected, labels)
    per_example = [float(p == e) for p, e in zip(predicted, expected, strict=True)]
    return scores(per_example, "macro_f1", predicted=predicted, expected=expected).model_copy(
        update={"score": report.macro_f1})


def judge(champion: SliceScores, candidate: SliceScores, spec: TaskSpec, golden: tuple[SliceScores, SliceScores]
          | None = None):
    golden = golden or (scores(GOLDEN, candidate.metric), scores(GOLDEN, candidate.metric))
    if spec.gate_metric == "macro_f1":
        golden = (labelled(["a", "b"] * 40, ["a", "b"] * 40, spec.labels),) * 2
    return decide({"new": champion, "golden": golden[0]}, {"new": candidate, "golden": golden[1]}, spec=spec,
                  new_slice="new", golden_slice="golden", parity=None, policy=POLICY)


MACRO_F1 = TaskSpec(name="tickets", kind="classification", labels=["a", "b"], metric="macro_f1")


def test_a_macro_f1_gate_tests_macro_f1_not_accuracy() -> None:
    """The candidate finds the rare label at the cost of some common ones: accuracy is level (McNemar on it
    sees nothing), macro-F1 rises by 0.32, and the paired permutation test of macro-F1 sees that."""
    expected = ["a"] * 40 + ["b"] * 10
    champion = labelled(["a"] * 50, expected, MACRO_F1.labels)
    candidate = labelled(["a"] * 30 + ["b"] * 20, expected, MACRO_F1.labels)
    assert champion.per_example.count(1.0) == candidate.per_example.count(1.0)  # the same accuracy
    report = judge(champion, candidate, MACRO_F1)
    assert report.verdict == "passed", report
    significance = next(c for c in report.checks if c.name == "significance")
    assert "permutation" in significance.detail and significance.value <= ALPHA


@pytest.mark.parametrize("spec", [
    TaskSpec(name="labels", kind="classification", labels=["a", "b"]),  # accuracy: exact McNemar
    MACRO_F1,
    TaskSpec(name="faq", metric="token_f1"),
], ids=["accuracy", "macro_f1", "token_f1"])
def test_the_smallest_hold_out_is_sized_by_the_test_the_gate_runs(spec: TaskSpec) -> None:
    """One-sided at alpha 0.05 every test first reaches it at 5 pairs all one way (0.5**5 = 0.031); below that
    the verdict is insufficient data, at it a clear win passes (the old gate rejected a 5-example macro-F1
    hold-out with a two-sided McNemar test it had not sized for)."""
    needed = min_holdout(spec, ALPHA)
    assert needed == 5

    def hold_out(n: int) -> tuple[SliceScores, SliceScores]:
        if spec.gate_metric == "macro_f1":
            return labelled([None] * n, ["a"] * n, spec.labels), labelled(["a"] * n, ["a"] * n, spec.labels)
        return scores([0.0] * n, spec.gate_metric), scores([1.0] * n, spec.gate_metric)

    assert judge(*hold_out(needed - 1), spec).verdict == "insufficient_data"
    assert judge(*hold_out(needed), spec).verdict == "passed"


def test_continuous_p_values_are_calibrated_on_small_hold_outs() -> None:
    """A candidate no better than the champion passes the significance check at most alpha of the time, with
    8 pairs (5.3 % here); the share of bootstrap means <= 0 passed it 12 % of the time."""
    rng = random.Random(3)
    spec = TaskSpec(name="faq", metric="token_f1")
    trials, significant = 300, 0
    for _ in range(trials):
        champion = [rng.random() for _ in range(8)]
        candidate = [min(1.0, max(0.0, c + rng.gauss(0, 0.2))) for c in champion]
        report = judge(scores(champion), scores(candidate), spec)
        significant += next(c for c in report.checks if c.name == "significance").passed
    assert significant / trials <= ALPHA + 0.02, significant


def test_every_check_says_how_many_rows_it_rests_on_and_the_gain_has_an_interval() -> None:
    spec = TaskSpec(name="faq", metric="token_f1")
    report = judge(scores([0.2, 0.3] * 10), scores([0.9, 0.8] * 10), spec)
    assert report.verdict == "passed", report
    rows = {c.name: c.rows for c in report.checks}
    assert rows == {"improvement": 20, "significance": 20, "golden_regression": 80, "format_validity": 100,
                    "latency": 20}
    gain = next(c for c in report.checks if c.name == "improvement")
    assert gain.ci_low is not None and gain.ci_high is not None and gain.ci_low <= gain.value <= gain.ci_high
    assert "CI" in gain.detail


def test_a_check_scored_on_no_rows_is_insufficient_data() -> None:
    spec = TaskSpec(name="faq", metric="token_f1")
    better = (scores([0.2] * 20), scores([0.9] * 20))
    no_golden = judge(*better, spec, golden=(scores([]), scores([])))
    assert no_golden.verdict == "insufficient_data" and "golden_regression" in no_golden.message, no_golden
    never_answered = judge(better[0], scores([0.9] * 20, too_long=20), spec)  # no latency measured at all
    assert never_answered.verdict == "insufficient_data" and "latency" in never_answered.message, never_answered
    latency = next(c for c in never_answered.checks if c.name == "latency")
    assert (latency.outcome, latency.rows, latency.value) == ("insufficient_data", 0, None)


class DriftingEngine:
    """Every request takes longer than the one before (a box warming up, a neighbour starting): the same adapter
    asked later looks slower."""

    base_model = "fake"

    def __init__(self) -> None:
        self.calls: list[str] = []

    async def generate(self, messages: list[ChatMessage], options: SamplingOptions, adapter: AdapterHandle,
                       request_id: str) -> Generation:
        self.calls.append(f"{adapter.name}{' warm-up' if 'warmup' in request_id else ''}")
        await asyncio.sleep(0.004 * len(self.calls))
        return Generation(text="thinking</think>the answer", prompt_tokens=1, completion_tokens=1)

    async def completion_logprob(self, messages: list[ChatMessage], completion: str,
                                 adapter: AdapterHandle) -> tuple[float, int]:
        return -1.0, 1


async def test_latency_is_compared_on_warmed_adapters_asked_in_turns() -> None:
    engine = DriftingEngine()
    adapters = {v: AdapterHandle(name=v, int_id=i + 1, path="/nowhere") for i, v in enumerate(("k", "c"))}
    examples = [EvalExample.of(f"question {i}", "the answer") for i in range(10)]
    spec = TaskSpec(name="faq", metric="token_f1")
    scores = await evaluate(engine, adapters, {"new": examples}, spec, concurrency=1)  # type: ignore[arg-type]
    assert engine.calls == ["k warm-up", "c warm-up", *["k", "c"] * 10]
    ratio = scores["c"]["new"].mean_latency_ms / scores["k"]["new"].mean_latency_ms
    assert ratio < 1.2, ratio  # asked all champion first, then all candidate, the candidate looked 2.8x slower


class KnowingEngine:
    """Answers `right` to every prompt for the adapter named `candidate`, something else for the others; a prompt
    holding LONG does not fit the context."""

    base_model = "fake"

    async def generate(self, messages: list[ChatMessage], options: SamplingOptions, adapter: AdapterHandle | None,
                       request_id: str) -> Generation:
        if "LONG" in messages[-1].content:
            raise PromptTooLongError("does not fit")
        answer = "right" if adapter is not None and adapter.name == "candidate" else "wrong"
        await asyncio.sleep(0.02)  # both alike: the latency check has something to compare besides noise
        return Generation(text=f"thinking</think>{answer}", prompt_tokens=1, completion_tokens=1)

    async def completion_logprob(self, messages: list[ChatMessage], completion: str,
                                 adapter: AdapterHandle | None) -> tuple[float, int]:
        return -1.0, 1


async def test_prompts_too_long_for_the_context_are_reported_apart_not_held_against_validity() -> None:
    """A fifth of the hold-out does not fit the context: those prompts are left out of format validity (which the
    old gate counted as malformed answers, rejecting every candidate beyond 10 % of them) and reported apart."""
    engine = KnowingEngine()
    adapters = {v: AdapterHandle(name=v, int_id=i + 1, path="/nowhere") for i, v in enumerate(("champion",
                                                                                               "candidate"))}
    examples = [EvalExample.of(f"question {i}" + (" LONG" if i % 5 == 0 else ""), "right") for i in range(20)]
    spec = TaskSpec(name="faq", metric="exact_match")
    scored = await evaluate(engine, adapters, {"new": examples, "golden": examples}, spec,  # type: ignore[arg-type]
                            concurrency=4)
    assert scored["candidate"]["new"].too_long == 4 and scored["candidate"]["new"].format_validity == 1.0
    # the engine-parity probe skips them too (it used to fail the run when one was among its first prompts)
    agreement = await parity(engine, engine, adapters["candidate"], examples, spec,  # type: ignore[arg-type]
                             limit=POLICY.parity_prompts)
    report = decide(scored["champion"], scored["candidate"], spec=spec, new_slice="new", golden_slice="golden",
                    parity=agreement, policy=POLICY)
    validity = next(c for c in report.checks if c.name == "format_validity")
    assert validity.passed and validity.rows == 2 * 16 and "8 prompts too long" in validity.detail, validity
    probe = next(c for c in report.checks if c.name == "engine_parity")
    assert (probe.value, probe.rows) == (1.0, POLICY.parity_prompts), probe
    # nothing failed; the golden set here is the hold-out, which the champion scores 0.000 on: it proves nothing
    assert report.verdict == "insufficient_data" and report.failures() == [
        f"golden_regression: {next(c for c in report.checks if c.name == 'golden_regression').detail}"], report


def confirmed(champion: dict[str, SliceScores], candidate: dict[str, SliceScores], spec: TaskSpec | None = None,
              min_prompts: int = 3):
    return decide_confirmed(champion, candidate, spec=spec or TaskSpec(name="faq", metric="exact_match"),
                            new_slice="new", golden_slice="golden", rated_slice="rated", parity=None, policy=POLICY,
                            min_prompts=min_prompts)


def binary(right: int, n: int) -> SliceScores:
    return scores([1.0] * right + [0.0] * (n - right), "exact_match")


def small_data(**arms: tuple[SliceScores, SliceScores]) -> tuple[dict[str, SliceScores], dict[str, SliceScores]]:
    """(champion, candidate): three confirmed corrections the candidate learned, a golden set and well-rated
    answers on which both are alike, unless `arms` says otherwise."""
    slices = {"new": (binary(0, 3), binary(3, 3)), "golden": (binary(70, 100), binary(70, 100)),
              "rated": (binary(90, 100), binary(90, 100)), **arms}
    return ({k: v[0] for k, v in slices.items()}, {k: v[1] for k, v in slices.items()})


def test_the_small_data_policy_passes_a_candidate_that_learned_and_lost_nothing() -> None:
    report = confirmed(*small_data())
    assert report.verdict == "passed", report
    checks = {c.name: c for c in report.checks}
    assert {n: c.rows for n, c in checks.items()} == {"confirmed_corrections": 3, "golden_regression": 100,
                                                      "well_rated_answers": 100, "format_validity": 203,
                                                      "latency": 3}
    golden = checks["golden_regression"]
    assert golden.threshold == POLICY.noninferiority_margin and "non-inferiority margin" in golden.detail


def test_the_small_data_policy_rejects_a_candidate_that_does_not_give_the_confirmed_answers() -> None:
    report = confirmed(*small_data(new=(binary(0, 3), binary(1, 3))))
    assert report.verdict == "rejected" and "confirmed_corrections" in report.message, report
    assert next(c for c in report.checks if c.name == "confirmed_corrections").rows == 3


def test_the_held_out_policy_rejects_a_golden_regression_however_good_the_new_slice() -> None:
    spec = TaskSpec(name="faq", metric="exact_match")
    better = (binary(4, 20), binary(18, 20))
    report = judge(*better, spec, golden=(binary(90, 100), binary(50, 100)))
    assert report.verdict == "rejected" and "golden_regression" in report.message, report
    golden = next(c for c in report.checks if c.name == "golden_regression")
    assert golden.rows == 100 and golden.value == pytest.approx(0.4)
    assert judge(*better, spec, golden=(binary(90, 100), binary(90, 100))).verdict == "passed"


def test_the_small_data_policy_needs_enough_confirmed_prompts() -> None:
    """One prompt, however often confirmed, used to be enough to retrain and promote."""
    champion, candidate = small_data(new=(binary(0, 2), binary(2, 2)))
    report = confirmed(champion, candidate, min_prompts=3)
    assert report.verdict == "insufficient_data" and "retrain.min_confirmed_prompts" in report.message, report
    assert confirmed(champion, candidate, min_prompts=2).verdict == "passed"


def test_the_small_data_policy_without_a_golden_set_is_insufficient_data_with_a_hint() -> None:
    champion, candidate = small_data()
    del champion["golden"], candidate["golden"]
    report = confirmed(champion, candidate)
    assert report.verdict == "insufficient_data" and "--eval-file" in report.message, report
    empty = confirmed(*small_data(golden=(scores([], "exact_match"), scores([], "exact_match"))))
    assert empty.verdict == "insufficient_data" and "no golden set" in empty.message, empty


def test_a_retrain_asks_before_it_trains_whether_the_small_data_policy_could_judge() -> None:
    spec = TaskSpec(name="faq")
    assert small_data_problem(spec, confirmed=3, golden=20, well_rated=5, min_prompts=3) is None
    nothing = small_data_problem(spec, confirmed=1, golden=0, well_rated=0, min_prompts=3)
    assert nothing is not None
    assert all(why in nothing for why in ("retrain.min_confirmed_prompts", "--eval-file", "rated well")), nothing


def test_a_golden_set_the_champion_scores_zero_on_proves_nothing() -> None:
    report = confirmed(*small_data(golden=(binary(0, 20), binary(0, 20))))
    assert report.verdict == "insufficient_data", report
    golden = next(c for c in report.checks if c.name == "golden_regression")
    assert golden.outcome == "insufficient_data" and golden.rows == 20 and "prove nothing" in golden.detail


def test_golden_non_regression_is_judged_on_the_interval_not_the_point_estimate() -> None:
    """The candidate gets 4 golden answers wrong that the champion got right, and 4 others right: level on
    average (the old check passed a drop of 0.000), but the drop's upper bound is above the margin."""
    golden = (scores([1.0] * 4 + [0.0] * 4 + [1.0] * 92, "exact_match"),
              scores([0.0] * 4 + [1.0] * 4 + [1.0] * 92, "exact_match"))
    report = confirmed(*small_data(golden=golden))
    assert report.verdict == "rejected" and "golden_regression" in report.message, report
    check = next(c for c in report.checks if c.name == "golden_regression")
    assert check.value == 0.0 and check.ci_high is not None and check.ci_high > POLICY.noninferiority_margin


def test_the_small_data_policy_rejects_a_candidate_that_loses_well_rated_answers() -> None:
    """The candidate learned its three corrections, holds the golden set, but no longer gives 30 of the 100
    answers users rated well: it is rejected (the old policy never looked at them)."""
    report = confirmed(*small_data(rated=(binary(90, 100), binary(60, 100))))
    assert report.verdict == "rejected" and "well_rated_answers" in report.message, report
    rated = next(c for c in report.checks if c.name == "well_rated_answers")
    assert rated.rows == 100 and rated.value == pytest.approx(0.3)
    unrated = confirmed(*small_data(rated=(scores([], "exact_match"), scores([], "exact_match"))))
    assert unrated.verdict == "insufficient_data" and "well_rated_answers" in unrated.message, unrated


def test_the_small_data_policy_judges_a_macro_f1_task_by_macro_f1() -> None:
    labels = MACRO_F1.labels
    golden = labelled(["a", "b"] * 40, ["a", "b"] * 40, labels)
    rated = labelled(["a"] * 60, ["a"] * 60, labels)
    slices = {"new": (labelled(["a"] * 3, ["b"] * 3, labels), labelled(["b"] * 3, ["b"] * 3, labels)),
              "golden": (golden, golden), "rated": (rated, rated)}
    report = confirmed({k: v[0] for k, v in slices.items()}, {k: v[1] for k, v in slices.items()}, MACRO_F1)
    assert report.verdict == "passed", report
    worse = labelled(["a", "a"] * 40, ["a", "b"] * 40, labels)  # never says b any more: macro-F1 halves
    slices["golden"] = (golden, worse)
    report = confirmed({k: v[0] for k, v in slices.items()}, {k: v[1] for k, v in slices.items()}, MACRO_F1)
    assert report.verdict == "rejected" and "golden macro_f1 1.000 -> 0.333" in report.message, report


def test_a_first_adapter_serves_only_when_it_beats_the_bare_base() -> None:
    """The trial a user ran: an adapter at 0.000 on its test split, against a base at 0.000, became champion."""
    spec = TaskSpec(name="labels", kind="classification", labels=["a", "b"])
    nothing = first_champion(binary(0, 20), binary(0, 20), spec, POLICY)
    assert nothing.outcome == "failed" and nothing.rows == 20 and "base 0.000 -> adapter 0.000" in nothing.detail
    assert first_champion(binary(5, 20), binary(17, 20), spec, POLICY).passed
    tiny = first_champion(binary(0, 3), binary(3, 3), spec, POLICY)
    assert tiny.outcome == "insufficient_data" and "at least 5" in tiny.detail


@pytest.mark.parametrize("kept", [2, 3, 5])
def test_a_few_well_rated_answers_are_held_to_no_loss_and_the_report_says_why(kept: int) -> None:
    """With a handful of answers, the bootstrap interval of the drop collapsed to [0, 0] and a candidate that lost
    one could pass. Too few for the exact bound to fit the margin (59 for 5 %): held to no loss at all, and the
    report says the set was too small to show the margin and what it would take."""
    report = confirmed(*small_data(rated=(binary(kept, kept), binary(kept, kept))))
    assert report.verdict == "passed", report
    rated = next(c for c in report.checks if c.name == "well_rated_answers")
    assert rated.passed and rated.rows == kept
    assert "too few to show a drop within the margin" in rated.detail and "it takes 59" in rated.detail
    assert f"held to no loss: 0 of {kept} scored lower" in rated.detail, rated.detail
    one_lost = confirmed(*small_data(rated=(binary(kept, kept), binary(kept - 1, kept))))
    assert one_lost.verdict == "rejected" and "well_rated_answers" in one_lost.message, one_lost
    lost = next(c for c in one_lost.checks if c.name == "well_rated_answers")
    assert f"1 of {kept} scored lower" in lost.detail


def test_many_well_rated_answers_all_kept_pass() -> None:
    report = confirmed(*small_data(rated=(binary(200, 200), binary(200, 200))))
    assert report.verdict == "passed", report
    rated = next(c for c in report.checks if c.name == "well_rated_answers")
    assert rated.passed and rated.ci_high == pytest.approx(1 - ALPHA ** (1 / 200))  # the rule of three, exact


def test_the_exact_loss_bound_is_clopper_pearson() -> None:
    """Our use of scipy's binomtest against known Clopper-Pearson bounds: none of 3 lost, 1 - 0.05**(1/3); 4 of
    100 lost, 0.0892 (one-sided 95 %); and the fewest examples a 5 % margin needs, 59."""
    assert exact_loss_bound(0, 3, 0.05) == pytest.approx(1 - 0.05 ** (1 / 3))
    assert exact_loss_bound(4, 100, 0.05) == pytest.approx(0.0892, abs=1e-4)
    assert min_noninferiority_rows(0.05, 0.05) == 59 and exact_loss_bound(0, 58, 0.05) > 0.05


def test_the_held_out_policy_judges_the_golden_set_by_non_inferiority_not_the_point_estimate() -> None:
    """The held-out policy passed a golden set on the point estimate of the drop: 4 answers lost and 4 gained of
    100 is a drop of 0.000, but its exact bound (0.089) is above the margin; and 20 golden examples all kept cannot
    show non-inferiority within 5 % at all. Both policies judge the golden set alike."""
    spec = TaskSpec(name="faq", metric="exact_match")
    better = (binary(4, 20), binary(18, 20))
    level = (scores([1.0] * 4 + [0.0] * 4 + [1.0] * 92, "exact_match"),
             scores([0.0] * 4 + [1.0] * 4 + [1.0] * 92, "exact_match"))
    report = judge(*better, spec, golden=level)
    assert report.verdict == "rejected" and "golden_regression" in report.message, report
    golden = next(c for c in report.checks if c.name == "golden_regression")
    assert golden.value == 0.0 and golden.ci_high == pytest.approx(exact_loss_bound(4, 100, ALPHA))
    assert golden.threshold == POLICY.noninferiority_margin and "non-inferiority margin" in golden.detail
    few = judge(*better, spec, golden=(binary(20, 20), binary(20, 20)))  # too few for the margin: no loss passes
    assert few.verdict == "passed", few
    assert "held to no loss: 0 of 20" in next(c for c in few.checks if c.name == "golden_regression").detail
    swapped = judge(*better, spec, golden=(binary(19, 20), scores([0.0] + [1.0] * 19, "exact_match")))
    assert swapped.verdict == "rejected" and "golden_regression" in swapped.message, swapped


def test_the_held_out_policy_says_a_golden_set_the_champion_scores_zero_on_proves_nothing() -> None:
    spec = TaskSpec(name="faq", metric="exact_match")
    report = judge(binary(4, 20), binary(18, 20), spec, golden=(binary(0, 100), binary(0, 100)))
    assert report.verdict == "insufficient_data", report
    golden = next(c for c in report.checks if c.name == "golden_regression")
    assert golden.outcome == "insufficient_data" and golden.rows == 100 and "prove nothing" in golden.detail


def test_the_retired_golden_setting_is_refused_with_its_replacement() -> None:
    from pydantic import ValidationError

    from flywheel.config import GateSettings

    with pytest.raises(ValidationError, match="noninferiority_margin"):
        GateSettings(max_golden_regression=0.02)  # type: ignore[call-arg]
