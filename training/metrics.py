"""The metrics a task's evaluation and gate use: per-example scores, reports, and paired statistics.

Text is compared after one normalisation (`normalize_text`) and split by one tokenizer
(`metric_tokens`) that gives every CJK character its own token, so Chinese and Japanese answers
score as fairly as English ones (the usual ROUGE tokenizer keeps only [a-z0-9] and scores them 0).
Everything here runs in time linear in the text, or is capped, so a runaway generation cannot stall
an evaluation.

Candidate and champion are scored on the same examples, so comparisons are paired and one-sided: the exact
McNemar test for 0/1 metrics, a paired permutation test of the gated statistic itself (mean or macro-F1)
otherwise, each with a bootstrap interval of the gain.
"""

from __future__ import annotations

import unicodedata
import warnings
from collections import Counter
from collections.abc import Callable
from functools import cache
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from pydantic import BaseModel, Field

if TYPE_CHECKING:
    from sacrebleu.metrics import CHRF

UNMATCHED = "(none)"
"""The confusion matrix's last column: answers that named no label, or more than one."""

MAX_LCS_TOKENS = 5000
"""ROUGE-L looks at no more than this many tokens of each side; beyond it the score is of the prefixes."""

# Characters stripped from both ends by `normalize_text` besides Unicode punctuation (category P*):
# the backtick and other quote-like symbols that models wrap answers in.
_EXTRA_STRIP = frozenset("`´^~|*")

# Scripts written without spaces: each character is a token. Half-width Katakana becomes full width
# under NFKC, so it needs no range of its own.
_CJK_RANGES = (
    (0x1100, 0x11FF),  # Hangul Jamo
    (0x3005, 0x3007),  # 々 〆 〇
    (0x3040, 0x309F),  # Hiragana
    (0x30A0, 0x30FF),  # Katakana
    (0x3130, 0x318F),  # Hangul Compatibility Jamo
    (0x31F0, 0x31FF),  # Katakana Phonetic Extensions
    (0x3400, 0x4DBF),  # CJK Unified Ideographs Extension A
    (0x4E00, 0x9FFF),  # CJK Unified Ideographs
    (0xA960, 0xA97F),  # Hangul Jamo Extended-A
    (0xAC00, 0xD7AF),  # Hangul Syllables
    (0xD7B0, 0xD7FF),  # Hangul Jamo Extended-B
    (0xF900, 0xFAFF),  # CJK Compatibility Ideographs
    (0x20000, 0x3FFFF),  # CJK Unified Ideographs Extensions B and later
)


def _is_cjk(ch: str) -> bool:
    code = ord(ch)
    return any(lo <= code <= hi for lo, hi in _CJK_RANGES)


def _is_strippable(ch: str) -> bool:
    return ch.isspace() or ch in _EXTRA_STRIP or unicodedata.category(ch).startswith("P")


def normalize_text(text: str) -> str:
    """NFKC, casefolded, whitespace collapsed, surrounding punctuation and quotes removed.

    Full-width forms become ASCII (NFKC), so `ＰＯＳＩＴＩＶＥ！` and `positive` compare equal; CJK
    punctuation such as 。「」 is Unicode punctuation and is stripped from the ends too. Punctuation
    inside the text is kept. Linear time: no regular expressions.
    """
    text = " ".join(unicodedata.normalize("NFKC", text).casefold().split())
    start, end = 0, len(text)
    while start < end and _is_strippable(text[start]):
        start += 1
    while end > start and _is_strippable(text[end - 1]):
        end -= 1
    return text[start:end]


def metric_tokens(text: str) -> list[str]:
    """Tokens for overlap metrics: each CJK character alone, other words as runs of letters and digits.

    Works on `normalize_text(text)`, so tokens are casefolded. Combining marks stay in their word
    (Devanagari, Thai, accents left decomposed by NFKC); everything else separates words.
    """
    tokens: list[str] = []
    word: list[str] = []
    for ch in normalize_text(text):
        if _is_cjk(ch):
            if word:
                tokens.append("".join(word))
                word = []
            tokens.append(ch)
        elif ch.isalnum() or (word and unicodedata.category(ch).startswith("M")):
            word.append(ch)
        elif word:
            tokens.append("".join(word))
            word = []
    if word:
        tokens.append("".join(word))
    return tokens


# --- per-example generation scores, each in [0, 1] ---------------------------------------------------


def exact_match(pred: str, ref: str) -> float:
    """1.0 when the normalized texts are equal."""
    return float(normalize_text(pred) == normalize_text(ref))


def contains(pred: str, ref: str) -> float:
    """1.0 when the normalized reference occurs in the normalized prediction; an empty reference never does."""
    needle = normalize_text(ref)
    return float(bool(needle) and needle in normalize_text(pred))


def _f_measure(overlap: int, n_pred: int, n_ref: int) -> float:
    if overlap == 0:
        return 0.0
    precision, recall = overlap / n_pred, overlap / n_ref
    return 2 * precision * recall / (precision + recall)


def token_f1(pred: str, ref: str) -> float:
    """SQuAD-style F1 of the bags of `metric_tokens`; two empty texts agree (1.0), one empty scores 0."""
    pred_tokens, ref_tokens = metric_tokens(pred), metric_tokens(ref)
    if not pred_tokens or not ref_tokens:
        return float(pred_tokens == ref_tokens)
    overlap = sum((Counter(pred_tokens) & Counter(ref_tokens)).values())
    return _f_measure(overlap, len(pred_tokens), len(ref_tokens))


def lcs_length(a: list[str], b: list[str]) -> int:
    """Length of the longest common subsequence of two token lists.

    Bit-parallel dynamic programming (Hyyrö 2004): one row of the classic O(n*m) table is an
    integer's bits, so each token of `b` costs a few big-integer operations instead of a Python loop
    over `a`. The result is exactly the classic DP's.
    """
    if not a or not b:
        return 0
    masks: dict[str, int] = {}
    for i, token in enumerate(a):
        masks[token] = masks.get(token, 0) | (1 << i)
    full = (1 << len(a)) - 1
    row = full
    for token in b:
        matched = row & masks.get(token, 0)
        row = ((row + matched) | (row - matched)) & full
    return len(a) - row.bit_count()


def rouge_l(pred: str, ref: str) -> float:
    """ROUGE-L F-measure (LCS over `metric_tokens`), each side capped at `MAX_LCS_TOKENS` tokens.

    On ASCII text it equals `rouge_score`'s rougeL without stemming; unlike it, CJK text scores.
    Two empty texts agree (1.0), one empty scores 0.
    """
    pred_tokens, ref_tokens = metric_tokens(pred)[:MAX_LCS_TOKENS], metric_tokens(ref)[:MAX_LCS_TOKENS]
    if not pred_tokens or not ref_tokens:
        return float(pred_tokens == ref_tokens)
    return _f_measure(lcs_length(pred_tokens, ref_tokens), len(pred_tokens), len(ref_tokens))


@cache
def _chrf_metric() -> CHRF:
    from sacrebleu.metrics import CHRF

    return CHRF()


def chrf(pred: str, ref: str) -> float:
    """Sentence-level chrF (sacrebleu's defaults: character 6-grams, beta 2) scaled to [0, 1]."""
    score = _chrf_metric().sentence_score(pred, [ref]).score / 100
    return min(1.0, max(0.0, score))


GENERATION_SCORERS: dict[str, Callable[[str, str], float]] = {
    "exact_match": exact_match,
    "contains": contains,
    "token_f1": token_f1,
    "rouge_l": rouge_l,
    "chrf": chrf,
}
"""Per-example scorers by the metric names of `flywheel.tasks.GENERATION_METRICS`: (prediction, reference)."""


def score_generation(metric: str, predictions: list[str], references: list[str]) -> list[float]:
    """`metric` for each (prediction, reference) pair, in order."""
    if metric not in GENERATION_SCORERS:
        raise ValueError(f"unknown generation metric {metric!r}; expected one of {', '.join(GENERATION_SCORERS)}")
    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions for {len(references)} references")
    scorer = GENERATION_SCORERS[metric]
    return [scorer(p, r) for p, r in zip(predictions, references, strict=True)]


class GenerationReport(BaseModel):
    """A generation task's evaluation: every metric's mean (for display) and the gate metric per example."""

    n: int
    metric: str = Field(description="The metric `values` holds: the task's gate metric.")
    means: dict[str, float] = Field(description="Mean of every generation metric, by name (0.0 when n is 0).")
    values: list[float] = Field(description="Per example, in order: `metric`'s score, the pairing for the gate.")


def generation_report(metric: str, predictions: list[str], references: list[str]) -> GenerationReport:
    """Score every generation metric; keep the per-example values of `metric`."""
    per_metric = {name: score_generation(name, predictions, references) for name in GENERATION_SCORERS}
    if metric not in per_metric:
        raise ValueError(f"unknown generation metric {metric!r}; expected one of {', '.join(GENERATION_SCORERS)}")
    n = len(predictions)
    means = {name: (sum(values) / n if n else 0.0) for name, values in per_metric.items()}
    return GenerationReport(n=n, metric=metric, means=means, values=per_metric[metric])


# --- classification ----------------------------------------------------------------------------------


def _occurrences(haystack: list[str], needle: list[str]) -> list[int]:
    """Start indices where `needle` occurs as a contiguous run of `haystack`."""
    size, first = len(needle), needle[0]
    return [i for i in range(len(haystack) - size + 1) if haystack[i] == first and haystack[i : i + size] == needle]


def match_label(answer: str, labels: list[str]) -> str | None:
    """The label an answer names, or None when it names none or several (scored as wrong).

    First a normalized exact match. Otherwise a label is named when its `metric_tokens` occur as a
    contiguous run of the answer's, i.e. as whole words, or as a substring of CJK text, since each
    CJK character is a token. A mention inside a longer label's mention does not count, so with labels
    `positive` and `very positive`, "very positive" names only the latter and "not toxic" is not
    also "toxic" when "not toxic" is a label. Exactly one named label is the answer.
    """
    normalized = normalize_text(answer)
    for label in labels:
        if normalize_text(label) == normalized:
            return label
    answer_tokens = metric_tokens(answer)
    starts: dict[str, set[int]] = {}
    size: dict[str, int] = {}
    for label in labels:
        label_tokens = metric_tokens(label)
        if label_tokens and (found := _occurrences(answer_tokens, label_tokens)):
            starts[label], size[label] = set(found), len(label_tokens)

    def inside_longer(label: str, start: int) -> bool:
        end = start + size[label]
        return any(
            size[other] > size[label] and any(s in starts[other] for s in range(end - size[other], start + 1))
            for other in starts
        )

    named = [label for label in starts if any(not inside_longer(label, s) for s in starts[label])]
    return named[0] if len(named) == 1 else None


class LabelScores(BaseModel):
    precision: float
    recall: float
    f1: float
    support: int = Field(description="How many examples expect this label.")


class ClassificationReport(BaseModel):
    """A classification task's evaluation. Zero divisions (a label never predicted or expected) count as 0."""

    n: int
    accuracy: float
    macro_f1: float = Field(description="Mean F1 over the labels that occur in the expected or predicted answers.")
    labels: list[str]
    per_label: dict[str, LabelScores]
    confusion: list[list[int]] = Field(
        description="Rows: expected label, in `labels` order. Columns: predicted label, then a last "
        f"column {UNMATCHED!r} for answers that named no label or several."
    )

    @property
    def columns(self) -> list[str]:
        """The confusion matrix's column names."""
        return [*self.labels, UNMATCHED]


def _ratio(num: int, den: int) -> float:
    return num / den if den else 0.0


def classification_report(
    predicted: list[str | None], expected: list[str], labels: list[str]
) -> ClassificationReport:
    """Accuracy, macro-F1, per-label scores and the confusion matrix of `predicted` against `expected`.

    `predicted` holds `match_label`'s results: None is an unmatched answer, wrong for every label.
    """
    if len(predicted) != len(expected):
        raise ValueError(f"{len(predicted)} predictions for {len(expected)} expected labels")
    index = {label: i for i, label in enumerate(labels)}
    if len(index) != len(labels):
        raise ValueError("labels must be distinct")
    unknown = {x for x in (*expected, *predicted) if x is not None and x not in index}
    if unknown:
        raise ValueError(f"labels not in the task's labels: {sorted(unknown)}")
    confusion = [[0] * (len(labels) + 1) for _ in labels]
    for want, got in zip(expected, predicted, strict=True):
        confusion[index[want]][len(labels) if got is None else index[got]] += 1
    per_label: dict[str, LabelScores] = {}
    for i, label in enumerate(labels):
        tp = confusion[i][i]
        support = sum(confusion[i])
        predicted_as = sum(row[i] for row in confusion)
        precision, recall = _ratio(tp, predicted_as), _ratio(tp, support)
        f1 = _ratio(2 * tp, support + predicted_as)  # = 2PR/(P+R), 0 when either is 0
        per_label[label] = LabelScores(precision=precision, recall=recall, f1=f1, support=support)
    present = set(expected) | {p for p in predicted if p is not None}
    f1s = [per_label[label].f1 for label in labels if label in present]
    n = len(expected)
    correct = sum(confusion[i][i] for i in range(len(labels)))
    return ClassificationReport(
        n=n,
        accuracy=_ratio(correct, n),
        macro_f1=sum(f1s) / len(f1s) if f1s else 0.0,
        labels=list(labels),
        per_label=per_label,
        confusion=confusion,
    )


# Fonts with CJK glyphs, tried in order when installed; DejaVu Sans (bundled) draws the rest.
_CJK_FONTS = ("Noto Sans CJK SC", "Noto Sans CJK JP", "Noto Sans SC", "WenQuanYi Zen Hei", "WenQuanYi Micro Hei",
              "Source Han Sans SC", "SimHei", "Microsoft YaHei", "PingFang SC", "AR PL UMing CN")


def confusion_png(report: ClassificationReport, path: Path, title: str) -> Path:
    """Write the confusion matrix as an annotated heatmap PNG; returns `path`.

    Uses the Agg canvas directly (no pyplot, no global backend switch), so it works headless and in
    threads. CJK labels use an installed CJK font when there is one; without, their glyphs are drawn
    as boxes and matplotlib's missing-glyph warnings are silenced.
    """
    from matplotlib import font_manager
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    installed = {f.name for f in font_manager.fontManager.ttflist}
    families = [name for name in _CJK_FONTS if name in installed] + ["DejaVu Sans"]

    def short(label: str) -> str:
        return label if len(label) <= 24 else label[:23] + "…"

    matrix = np.asarray(report.confusion, dtype=int).reshape(len(report.labels), len(report.labels) + 1)
    rows, cols = [short(x) for x in report.labels], [short(x) for x in report.columns]
    side = max(4.0, 0.8 * len(cols) + 2.5)
    fig = Figure(figsize=(side + 1.0, max(3.5, 0.8 * len(rows) + 2.0)), layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    image = ax.imshow(matrix, cmap="Blues", vmin=0, vmax=max(1, int(matrix.max(initial=0))), aspect="auto")
    fig.colorbar(image, ax=ax, label="examples")
    ax.set_xticks(range(len(cols)), labels=cols, rotation=45, ha="right", rotation_mode="anchor", family=families)
    ax.set_yticks(range(len(rows)), labels=rows, family=families)
    ax.set_xlabel("predicted")
    ax.set_ylabel("expected")
    ax.set_title(f"{title}\nn={report.n} accuracy={report.accuracy:.3f} macro-F1={report.macro_f1:.3f}",
                 family=families)
    threshold = matrix.max(initial=0) / 2
    for (i, j), count in np.ndenumerate(matrix):
        ax.text(j, i, str(count), ha="center", va="center", color="white" if count > threshold else "black")
    path.parent.mkdir(parents=True, exist_ok=True)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r".*[Gg]lyph .* missing from")
        warnings.filterwarnings("ignore", message=r".*[Mm]atplotlib currently does not support")
        fig.savefig(path, format="png", dpi=100)
    return path


# --- paired statistics -------------------------------------------------------------------------------
# Candidate and champion answer the same examples, so every test here is paired and one-sided (is the
# candidate better?). The tests are scipy's; what is ours is which statistic each one is handed.

PERMUTATIONS = 1999
"""Sign patterns the permutation test draws; up to 10 pairs (2**10 <= 1999) it enumerates all of them."""
BOOTSTRAP_RESAMPLES = 2000
"""Resamples of the gain's bootstrap interval."""
# Values a resampling batch may hold (8 bytes each): bounds memory whatever the number of pairs.
_BATCH_VALUES = 2_000_000


class PairedTest(BaseModel):
    """The candidate against the champion on the same examples: the gain in one metric and a test of it."""

    method: str = Field(description="'exact McNemar' (0/1 scores) or 'paired permutation' (any statistic).")
    n: int = Field(description="Paired examples the figures rest on.")
    differing: int = Field(description="Pairs the two adapters scored differently: the only ones that move the test.")
    champion: float
    candidate: float
    gain: float = Field(description="candidate - champion.")
    p_value: float = Field(description="One-sided: the chance of a gain at least this large when neither adapter is "
                           "better. Small means the candidate is better.")
    confidence: float
    ci_low: float | None = Field(description="Percentile bootstrap interval of the gain at `confidence` (None below "
                                 "two pairs).")
    ci_high: float | None

    def describe(self) -> str:
        interval = ("no interval" if self.ci_low is None or self.ci_high is None
                    else f"{self.confidence:.0%} CI {self.ci_low:+.3f}..{self.ci_high:+.3f}")
        return (f"{self.method} p={self.p_value:.4f} (one-sided) on {self.n} pairs, {self.differing} differing; "
                f"gain {self.gain:+.3f} ({interval})")


Statistic = Callable[..., np.ndarray]
"""A vectorized statistic of paired samples (champion, candidate, …) along `axis`."""


def _batch(n: int) -> int:
    return max(1, _BATCH_VALUES // max(n, 1))


def _mean_gain(champion: np.ndarray, candidate: np.ndarray, axis: int = -1) -> np.ndarray:
    return np.mean(candidate - champion, axis=axis)


def _interval(
    statistic: Statistic, samples: tuple[np.ndarray, ...], confidence: float, seed: int
) -> tuple[float | None, float | None]:
    """A percentile bootstrap interval, resampling whole pairs (scipy.stats.bootstrap, paired)."""
    n = len(samples[0])
    if n < 2:
        return None, None
    from scipy.stats import bootstrap

    result = bootstrap(samples, statistic, paired=True, vectorized=True, method="percentile",
                       confidence_level=confidence, n_resamples=BOOTSTRAP_RESAMPLES, batch=_batch(n),
                       rng=np.random.default_rng(seed))
    return float(result.confidence_interval.low), float(result.confidence_interval.high)


def _permutation_p(statistic: Statistic, champion: np.ndarray, candidate: np.ndarray, seed: int) -> float:
    """One-sided p of a paired permutation test: each pair's two results swap arms at random (exact when
    2**n <= PERMUTATIONS); scipy counts the observed arrangement among the draws, so p never reaches 0."""
    if len(champion) < 2:  # scipy needs two pairs; one pair's p is at least 1/2 anyway
        return 1.0
    from scipy.stats import permutation_test

    result = permutation_test((champion, candidate), statistic, permutation_type="samples", vectorized=True,
                              alternative="greater", n_resamples=PERMUTATIONS, batch=_batch(len(champion)),
                              rng=np.random.default_rng(seed))
    return float(result.pvalue)


def _paired(champion: list, candidate: list) -> tuple[np.ndarray, np.ndarray]:
    if len(champion) != len(candidate):
        raise ValueError("paired results must have the same length")
    return np.asarray(champion, dtype=np.float64), np.asarray(candidate, dtype=np.float64)


def mcnemar_test(
    champion: list[bool], candidate: list[bool], *, confidence: float = 0.9, seed: int = 0
) -> PairedTest:
    """Exact McNemar on paired correctness: the one-sided binomial test (scipy.stats.binomtest) that, of the
    pairs only one adapter got right, more than half are the candidate's. Exact however few they are."""
    from scipy.stats import binomtest

    base, cand = _paired(champion, candidate)
    only_candidate = int(np.count_nonzero(cand > base))
    differing = only_candidate + int(np.count_nonzero(base > cand))
    p = binomtest(only_candidate, differing, 0.5, alternative="greater").pvalue if differing else 1.0
    low, high = _interval(_mean_gain, (base, cand), confidence, seed)
    n = len(base)
    return PairedTest(method="exact McNemar", n=n, differing=differing,
                      champion=float(base.mean()) if n else 0.0, candidate=float(cand.mean()) if n else 0.0,
                      gain=float(_mean_gain(base, cand)) if n else 0.0, p_value=float(p), confidence=confidence,
                      ci_low=low, ci_high=high)


def mean_gain_test(
    champion: list[float], candidate: list[float], *, confidence: float = 0.9, seed: int = 0
) -> PairedTest:
    """The paired permutation (sign-flip) test of the mean per-example gain, for continuous scores."""
    base, cand = _paired(champion, candidate)
    n = len(base)
    if n == 0:
        return PairedTest(method="paired permutation", n=0, differing=0, champion=0.0, candidate=0.0, gain=0.0,
                          p_value=1.0, confidence=confidence, ci_low=None, ci_high=None)
    low, high = _interval(_mean_gain, (base, cand), confidence, seed)
    return PairedTest(method="paired permutation", n=n, differing=int(np.count_nonzero(base != cand)),
                      champion=float(base.mean()), candidate=float(cand.mean()), gain=float(_mean_gain(base, cand)),
                      p_value=_permutation_p(_mean_gain, base, cand, seed), confidence=confidence, ci_low=low,
                      ci_high=high)


def macro_f1_of(predicted: np.ndarray, expected: np.ndarray, n_labels: int) -> np.ndarray:
    """`classification_report`'s macro-F1, vectorized over leading axes: label indices, `n_labels` for
    an unmatched answer. A label counts when it is expected or predicted."""
    total = np.zeros(np.broadcast_shapes(predicted.shape, expected.shape)[:-1])
    present = np.zeros_like(total)
    for label in range(n_labels):
        said, wanted = predicted == label, expected == label
        both = np.count_nonzero(said & wanted, axis=-1)
        seen = np.count_nonzero(said, axis=-1) + np.count_nonzero(wanted, axis=-1)
        total += np.where(seen > 0, 2 * both / np.maximum(seen, 1), 0.0)
        present += seen > 0
    return np.where(present > 0, total / np.maximum(present, 1), 0.0)


def macro_f1_test(
    champion: list[str | None], candidate: list[str | None], expected: list[str], labels: list[str], *,
    confidence: float = 0.9, seed: int = 0,
) -> PairedTest:
    """The paired permutation test of the macro-F1 gain: each example's two predicted labels swap arms at
    random and macro-F1 is recomputed; the interval resamples (champion, candidate, expected) triples."""
    if not len(champion) == len(candidate) == len(expected):
        raise ValueError("paired results must have the same length")
    index = {label: i for i, label in enumerate(labels)}

    def indices(values: list[str | None]) -> np.ndarray:
        return np.array([len(labels) if v is None else index[v] for v in values], dtype=np.int64)

    base, cand, want = indices(champion), indices(candidate), indices(list(expected))

    def gain(k: np.ndarray, c: np.ndarray, axis: int = -1) -> np.ndarray:
        k, c = np.moveaxis(k, axis, -1), np.moveaxis(c, axis, -1)
        return macro_f1_of(c, want, len(labels)) - macro_f1_of(k, want, len(labels))

    def resampled_gain(k: np.ndarray, c: np.ndarray, w: np.ndarray, axis: int = -1) -> np.ndarray:
        k, c, w = (np.moveaxis(a, axis, -1) for a in (k, c, w))
        return macro_f1_of(c, w, len(labels)) - macro_f1_of(k, w, len(labels))

    n = len(base)
    before, after = (float(macro_f1_of(a, want, len(labels))) if n else 0.0 for a in (base, cand))
    low, high = _interval(resampled_gain, (base, cand, want), confidence, seed)
    return PairedTest(method="paired permutation", n=n, differing=int(np.count_nonzero(base != cand)),
                      champion=before, candidate=after, gain=after - before,
                      p_value=_permutation_p(gain, base, cand, seed), confidence=confidence,
                      ci_low=low, ci_high=high)
