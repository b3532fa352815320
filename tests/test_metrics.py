"""Metrics for task evaluation and the gate: worked examples with exact numbers, CJK text, speed guards."""

from __future__ import annotations

import math
import random
from pathlib import Path

import pytest
from rouge_score import rouge_scorer

from flywheel.tasks import DEMO_TASK, GENERATION_METRICS
from tests.timing import fastest_run_s
from training.metrics import (
    GENERATION_SCORERS,
    UNMATCHED,
    ClassificationReport,
    chrf,
    classification_report,
    confusion_png,
    contains,
    exact_match,
    generation_report,
    lcs_length,
    match_label,
    mcnemar_p,
    metric_tokens,
    min_pairs_for_alpha,
    normalize_text,
    paired_bootstrap,
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


def _exact_binomial_two_sided(champion: list[bool], candidate: list[bool]) -> float:
    """Reference: total probability of discordant splits no likelier than the observed one, under Bin(n, 1/2)."""
    b = sum(1 for x, y in zip(champion, candidate, strict=True) if y and not x)
    n = b + sum(1 for x, y in zip(champion, candidate, strict=True) if x and not y)
    observed = math.comb(n, b)
    return sum(math.comb(n, i) for i in range(n + 1) if math.comb(n, i) <= observed) / 2**n


def test_mcnemar_p() -> None:
    assert mcnemar_p([False] * 6, [True] * 6) == pytest.approx(0.03125)  # 2 * 0.5**6
    assert mcnemar_p([True] * 6, [False] * 6) == pytest.approx(0.03125)  # two-sided
    assert mcnemar_p([True, False], [True, False]) == 1.0  # no discordant pairs
    # 10 discordant pairs, 8 one way: 2 * (1 + 10 + 45) / 1024.
    champion = [True] * 2 + [False] * 8 + [True] * 5
    candidate = [False] * 2 + [True] * 8 + [True] * 5
    assert mcnemar_p(champion, candidate) == pytest.approx(112 / 1024)
    rng = random.Random(1)
    for _ in range(50):
        a = [rng.random() < 0.5 for _ in range(40)]
        b = [rng.random() < 0.6 for _ in range(40)]
        assert mcnemar_p(a, b) == pytest.approx(_exact_binomial_two_sided(a, b))
    with pytest.raises(ValueError):
        mcnemar_p([True], [])


def test_paired_bootstrap_detects_a_clear_improvement_and_is_deterministic() -> None:
    rng = random.Random(0)
    champion = [rng.random() * 0.6 for _ in range(200)]
    candidate = [x + 0.1 + rng.gauss(0, 0.05) for x in champion]
    result = paired_bootstrap(champion, candidate, seed=3)
    assert result.n == 200
    assert result.mean_diff == pytest.approx(result.mean_candidate - result.mean_champion)
    assert 0.08 < result.mean_diff < 0.12
    assert result.p_value < 0.01
    assert result.p_value == pytest.approx(1 / 1001)  # no resample at or below 0
    assert 0 < result.ci_low < result.mean_diff < result.ci_high
    assert paired_bootstrap(champion, candidate, seed=3) == result


def test_paired_bootstrap_null() -> None:
    rng = random.Random(2)
    champion = [rng.random() for _ in range(300)]
    candidate = [rng.random() for _ in range(300)]  # same distribution, no pairing effect
    result = paired_bootstrap(champion, candidate, seed=0)
    assert result.p_value > 0.2
    assert result.ci_low < 0 < result.ci_high
    identical = paired_bootstrap(champion, champion)
    assert identical.p_value == 1.0
    assert (identical.ci_low, identical.ci_high) == (0.0, 0.0)
    assert paired_bootstrap([], []).p_value == 1.0


def test_paired_bootstrap_is_fast() -> None:
    rng = random.Random(0)
    champion = [rng.random() for _ in range(10_000)]
    candidate = [rng.random() for _ in range(10_000)]
    assert fastest_run_s(lambda: paired_bootstrap(champion, candidate, resamples=1000)) < 2.0


def test_min_pairs_for_alpha() -> None:
    assert min_pairs_for_alpha(0.05, binary=True) == 6
    assert min_pairs_for_alpha(0.01, binary=True) == 8  # 2 * 0.5**7 = 0.0156 > 0.01 >= 2 * 0.5**8
    assert min_pairs_for_alpha(0.05, binary=False) == 5
    # The rule is exact for McNemar: at the minimum all-one-way reaches alpha, one pair fewer cannot.
    n = min_pairs_for_alpha(0.05, binary=True)
    assert mcnemar_p([False] * n, [True] * n) <= 0.05 < mcnemar_p([False] * (n - 1), [True] * (n - 1))
    with pytest.raises(ValueError, match="resamples"):
        min_pairs_for_alpha(0.001, binary=False, resamples=100)
    with pytest.raises(ValueError):
        min_pairs_for_alpha(0.0, binary=True)


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
