"""Metrics for task evaluation and the gate: worked examples with exact numbers, CJK text, speed guards."""

from __future__ import annotations

import itertools
import random
from pathlib import Path

import numpy as np
import pytest
from rouge_score import rouge_scorer

from flywheel.tasks import DEMO_TASK, GENERATION_METRICS
from tests.timing import fastest_run_s
from training.metrics import (
    GENERATION_SCORERS,
    PERMUTATIONS,
    UNMATCHED,
    ClassificationReport,
    chrf,
    classification_report,
    confusion_png,
    contains,
    exact_match,
    generation_report,
    lcs_length,
    macro_f1_of,
    macro_f1_test,
    match_label,
    mcnemar_test,
    mean_gain_test,
    metric_tokens,
    normalize_text,
    rouge_l,
    score_generation,
    token_f1,
)

ZH_PRED = "今天天气很好"
ZH_REF = "今天天气不错"


def test_normalize_text() -> None:
    assert normalize_text('  "Hello,   World!"  ') == "hello, world"
    assert normalize_text("「你好」。") == "你好"
    assert normalize_text("ＰＯＳＩＴＩＶＥ！") == "positive"  # full width -> ASCII (NFKC), then stripped
    assert normalize_text("`Straße`\n") == "strasse"  # casefold, not lower
    assert normalize_text("?!。") == ""


def test_metric_tokens_split_cjk_per_character_and_keep_words() -> None:
    assert metric_tokens("今天 Apple股价涨了3.5%！") == ["今", "天", "apple", "股", "价", "涨", "了", "3", "5"]
    assert metric_tokens("カタカナ、ひらがな、한국어") == [*"カタカナ", *"ひらがな", *"한국어"]
    assert metric_tokens("Crème brûlée, naïve") == ["crème", "brûlée", "naïve"]


def test_overlap_metrics_score_chinese_where_rouge_score_gives_zero() -> None:
    # Bags: 今 天 天 气 shared (4 of 6 each side); the LCS is 今天天气 (4).
    assert token_f1(ZH_PRED, ZH_REF) == pytest.approx(2 / 3)
    assert rouge_l(ZH_PRED, ZH_REF) == pytest.approx(2 / 3)
    # The usual tokenizer keeps only [a-z0-9]: the same pair scores 0 there.
    theirs = rouge_scorer.RougeScorer(["rougeL"]).score(ZH_REF, ZH_PRED)["rougeL"].fmeasure
    assert theirs == 0.0
    assert rouge_l(ZH_PRED, ZH_REF) > theirs


def test_token_f1_english_worked_examples() -> None:
    # Shared: quick, brown. P = 2/4, R = 2/5, F1 = 2PR/(P+R) = 4/9.
    assert token_f1("The quick brown fox", "a quick brown dog jumps.") == pytest.approx(4 / 9)
    # Bags clip repeats: shared a:1, b:1. P = 2/4, R = 2/3, F1 = 4/7.
    assert token_f1("a a a b", "a b b") == pytest.approx(4 / 7)
    assert token_f1("Paris", "paris.") == 1.0
    assert token_f1("", "") == 1.0
    assert token_f1("something", "") == 0.0
    assert token_f1("x y", "z") == 0.0


def test_rouge_l_matches_rouge_score_on_english() -> None:
    scorer = rouge_scorer.RougeScorer(["rougeL"])
    pairs = [
        ("police killed the gunman", "police kill the gunman"),
        ("the cat was found under the bed", "the cat was under the bed"),
        ("a b c d e f", "f e d c b a"),
        ("Revenue rose 12% in Q3.", "Q3 revenue rose by 12 percent"),
    ]
    assert rouge_l(*pairs[0]) == pytest.approx(0.75)
    for pred, ref in pairs:
        assert rouge_l(pred, ref) == pytest.approx(scorer.score(ref, pred)["rougeL"].fmeasure)


def _lcs_table(a: list[str], b: list[str]) -> int:
    row = [0] * (len(b) + 1)
    for x in a:
        prev_diag, row[0] = 0, 0
        for j, y in enumerate(b, start=1):
            prev_diag, row[j] = row[j], prev_diag + 1 if x == y else max(row[j], row[j - 1])
    return row[-1]


def test_lcs_length_equals_the_classic_table() -> None:
    rng = random.Random(0)
    for _ in range(300):
        a = [rng.choice("abcd") for _ in range(rng.randint(0, 30))]
        b = [rng.choice("abcd") for _ in range(rng.randint(0, 30))]
        assert lcs_length(a, b) == _lcs_table(a, b)


def test_exact_match_and_contains() -> None:
    assert exact_match(" Paris. ", "paris") == 1.0
    assert exact_match("Paris, France", "paris") == 0.0
    assert contains("The capital is Paris.", "PARIS") == 1.0
    assert contains("答案是北京。", "「北京」") == 1.0
    assert contains("The capital is Lyon.", "Paris") == 0.0
    assert contains("anything", "  ") == 0.0


def test_chrf_in_unit_interval() -> None:
    assert chrf("the quick brown fox", "the quick brown fox") == pytest.approx(1.0)
    partial = chrf("the quick brown fox", "the quick red fox")
    assert 0.0 < partial < 1.0
    assert chrf("xyz", "the quick brown fox") < partial
    assert 0.0 < chrf(ZH_PRED, ZH_REF) < 1.0


def test_generation_scorers_cover_the_task_metrics() -> None:
    assert set(GENERATION_SCORERS) == set(GENERATION_METRICS)
    assert score_generation("exact_match", ["a", "b"], ["a", "c"]) == [1.0, 0.0]
    with pytest.raises(ValueError, match="unknown generation metric"):
        score_generation("bleu", ["a"], ["a"])
    with pytest.raises(ValueError):
        score_generation("token_f1", ["a"], [])


def test_generation_report() -> None:
    report = generation_report("token_f1", ["The quick brown fox", "Paris"], ["a quick brown dog jumps", "paris"])
    assert report.n == 2
    assert report.values == pytest.approx([4 / 9, 1.0])
    assert set(report.means) == set(GENERATION_METRICS)
    assert report.means["token_f1"] == pytest.approx((4 / 9 + 1.0) / 2)
    assert report.means["exact_match"] == pytest.approx(0.5)
    assert generation_report("chrf", [], []).means["chrf"] == 0.0


def test_match_label() -> None:
    labels = ["positive", "negative", "neutral"]
    assert match_label("  Positive. ", labels) == "positive"
    assert match_label("ＮＥＧＡＴＩＶＥ", labels) == "negative"
    assert match_label("The sentiment is clearly negative.", labels) == "negative"
    assert match_label("It is positive or negative, hard to say", labels) is None
    assert match_label("I cannot tell", labels) is None
    assert match_label("The outlook is positively bright", labels) is None  # whole words only
    assert match_label("这条新闻的情绪是消极的。", DEMO_TASK.labels) == "消极"
    assert match_label("「积极」", DEMO_TASK.labels) == "积极"
    assert match_label("积极还是消极？", DEMO_TASK.labels) is None


def test_match_label_prefers_the_longer_label_it_names() -> None:
    labels = ["toxic", "not toxic"]
    assert match_label("This comment is not toxic.", labels) == "not toxic"
    assert match_label("This comment is toxic.", labels) == "toxic"
    assert match_label("toxic? no: not toxic", labels) is None  # a separate mention of each


def test_classification_report_worked_example() -> None:
    labels = ["pos", "neg", "neu", "mixed"]
    expected = ["pos", "pos", "neg", "neg", "neu", "pos"]
    predicted: list[str | None] = ["pos", "neg", "neg", None, "neu", "pos"]
    report = classification_report(predicted, expected, labels)
    assert report.n == 6
    assert report.accuracy == pytest.approx(4 / 6)
    pos, neg, neu = report.per_label["pos"], report.per_label["neg"], report.per_label["neu"]
    assert (pos.precision, pos.recall, pos.f1, pos.support) == pytest.approx((1.0, 2 / 3, 0.8, 3))
    assert (neg.precision, neg.recall, neg.f1, neg.support) == pytest.approx((0.5, 0.5, 0.5, 2))
    assert (neu.precision, neu.recall, neu.f1, neu.support) == pytest.approx((1.0, 1.0, 1.0, 1))
    assert report.per_label["mixed"].f1 == 0.0
    # "mixed" occurs nowhere, so it does not drag the macro average down.
    assert report.macro_f1 == pytest.approx((0.8 + 0.5 + 1.0) / 3)
    assert report.columns == [*labels, UNMATCHED]
    assert report.confusion == [
        [2, 1, 0, 0, 0],
        [0, 1, 0, 0, 1],
        [0, 0, 1, 0, 0],
        [0, 0, 0, 0, 0],
    ]
    assert ClassificationReport.model_validate(report.model_dump()) == report  # stored in run reports


def test_classification_report_edges() -> None:
    empty = classification_report([], [], ["a", "b"])
    assert (empty.n, empty.accuracy, empty.macro_f1) == (0, 0.0, 0.0)
    # A label only ever predicted counts in macro-F1 with F1 0.
    report = classification_report(["b", "a"], ["a", "a"], ["a", "b"])
    assert report.per_label["a"].f1 == pytest.approx(2 / 3)
    assert report.macro_f1 == pytest.approx((2 / 3 + 0.0) / 2)
    with pytest.raises(ValueError, match="not in the task's labels"):
        classification_report(["c"], ["a"], ["a", "b"])


def test_confusion_png_with_cjk_labels(tmp_path: Path) -> None:
    expected = ["积极", "消极", "中性", "积极", "positive"]
    predicted: list[str | None] = ["积极", "中性", "中性", None, "positive"]
    report = classification_report(predicted, expected, DEMO_TASK.labels)
    path = confusion_png(report, tmp_path / "plots" / "confusion.png", "demo 情绪 v2")
    data = path.read_bytes()
    assert data.startswith(b"\x89PNG\r\n\x1a\n")
    assert len(data) > 1000


def test_mcnemar_is_the_one_sided_exact_binomial_test_of_discordant_pairs() -> None:
    assert mcnemar_test([False] * 5, [True] * 5).p_value == pytest.approx(0.5**5)
    assert mcnemar_test([True] * 5, [False] * 5).p_value == pytest.approx(1.0)  # one-sided: worse is never a win
    assert mcnemar_test([True, False], [True, False]).p_value == 1.0  # no discordant pairs
    # 10 discordant pairs, 8 for the candidate: P(X >= 8) for X ~ Bin(10, 1/2) = (45 + 10 + 1) / 1024.
    champion = [True] * 2 + [False] * 8 + [True] * 5
    candidate = [False] * 2 + [True] * 8 + [True] * 5
    result = mcnemar_test(champion, candidate)
    assert (result.p_value, result.n, result.differing) == (pytest.approx(56 / 1024), 15, 10)
    assert result.gain == pytest.approx(6 / 15) and result.ci_low <= result.gain <= result.ci_high
    with pytest.raises(ValueError):
        mcnemar_test([True], [])


def test_the_permutation_test_is_exact_on_few_pairs() -> None:
    """Against every sign pattern of 6 differences, counted by hand: p = patterns with a sum >= observed / 64."""
    champion = [0.1, 0.5, 0.3, 0.2, 0.6, 0.4]
    candidate = [0.4, 0.6, 0.2, 0.6, 0.9, 0.4]
    diffs = [c - k for k, c in zip(champion, candidate, strict=True)]
    observed = sum(diffs)
    at_least = sum(sum(s * d for s, d in zip(signs, diffs, strict=True)) >= observed - 1e-12
                   for signs in itertools.product((1, -1), repeat=len(diffs)))
    result = mean_gain_test(champion, candidate)
    assert result.p_value == pytest.approx(at_least / 64)
    assert result.gain == pytest.approx(observed / 6) and result.differing == 5
    assert mean_gain_test(champion, candidate) == result  # seeded
    assert mean_gain_test([], []).p_value == 1.0


def test_the_permutation_test_detects_a_clear_improvement_and_is_fast_enough() -> None:
    rng = random.Random(0)
    champion = [rng.random() * 0.6 for _ in range(200)]
    candidate = [x + 0.1 + rng.gauss(0, 0.05) for x in champion]
    result = mean_gain_test(champion, candidate)
    assert result.p_value == pytest.approx(1 / (PERMUTATIONS + 1))  # no draw reaches the observed gain
    assert 0 < result.ci_low < result.gain < result.ci_high
    null = mean_gain_test([rng.random() for _ in range(2000)], [rng.random() for _ in range(2000)])
    assert null.p_value > 0.05 and null.ci_low < 0 < null.ci_high
    assert fastest_run_s(lambda: mean_gain_test(champion * 10, candidate * 10), runs=1) < 5.0


def test_vectorized_macro_f1_is_the_reports_macro_f1() -> None:
    rng = random.Random(4)
    labels = ["a", "b", "c"]
    for _ in range(30):
        expected = [rng.choice(labels[:2]) for _ in range(12)]  # "c" expected nowhere: counts only if predicted
        predicted = [rng.choice([*labels, None]) for _ in range(12)]
        index = {label: i for i, label in enumerate(labels)}
        as_indices = np.array([3 if p is None else index[p] for p in predicted])
        assert macro_f1_of(as_indices, np.array([index[e] for e in expected]), 3) == pytest.approx(
            classification_report(predicted, expected, labels).macro_f1)


def test_the_macro_f1_test_reports_the_macro_f1_gain() -> None:
    expected = ["a"] * 40 + ["b"] * 10
    champion, candidate = ["a"] * 50, ["a"] * 30 + ["b"] * 20
    result = macro_f1_test(champion, candidate, expected, ["a", "b"])
    assert result.champion == pytest.approx(classification_report(champion, expected, ["a", "b"]).macro_f1)
    assert result.candidate == pytest.approx(classification_report(candidate, expected, ["a", "b"]).macro_f1)
    assert result.differing == 20 and result.p_value < 0.05 and result.ci_low > 0


@pytest.mark.parametrize(
    "text",
    ["1 " * 2000, "1" * 4000, "1." * 2000, "。" * 4000, "a" * 3999 + "!", "积" * 4000],
    ids=["ones-spaced", "digits", "ones-dotted", "cjk-punct", "letters", "han"],
)
def test_long_inputs_are_fast(text: str) -> None:
    for scorer in GENERATION_SCORERS.values():
        assert 0.0 <= scorer(text, text[::-1] + " 1") <= 1.0

    def score_everything() -> None:
        normalize_text(text)
        metric_tokens(text)
        for scorer in GENERATION_SCORERS.values():
            scorer(text, text[::-1] + " 1")
        match_label(text, ["1", "1 1", "positive", "积极"])

    assert fastest_run_s(score_everything) < 2.0


def test_rouge_l_long_inputs_are_capped_and_fast() -> None:
    rng = random.Random(0)
    pred = " ".join(rng.choice("abcdefgh") for _ in range(20_000))
    ref = " ".join(rng.choice("abcdefgh") for _ in range(20_000))
    assert fastest_run_s(lambda: rouge_l(pred, ref)) < 2.0
    assert 0.0 < rouge_l(pred, ref) < 1.0
