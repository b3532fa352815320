"""The metrics a task's evaluation and gate use: per-example scores, reports, and paired statistics.

Text is compared after one normalisation (`normalize_text`) and split by one tokenizer
(`metric_tokens`) that gives every CJK character its own token, so Chinese and Japanese answers
score as fairly as English ones (the usual ROUGE tokenizer keeps only [a-z0-9] and scores them 0).
Everything here runs in time linear in the text, or is capped, so a runaway generation cannot stall
an evaluation.

Candidate and champion are scored on the same examples, so comparisons are paired: McNemar's exact
test for 0/1 metrics, a paired bootstrap for continuous ones.
"""

from __future__ import annotations

import math
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


def mcnemar_p(champion: list[bool], candidate: list[bool]) -> float:
    """Two-sided exact McNemar p-value for paired correctness (1.0 when nothing differs).

    The binomial test on the discordant pairs: 2 * P(X <= min(b, c)) with X ~ Bin(b + c, 1/2), capped at 1.
    """
    if len(champion) != len(candidate):
        raise ValueError("paired results must have the same length")
    only_candidate = sum(1 for a, b in zip(champion, candidate, strict=True) if b and not a)
    only_champion = sum(1 for a, b in zip(champion, candidate, strict=True) if a and not b)
    n = only_candidate + only_champion
    if n == 0:
        return 1.0
    k = min(only_candidate, only_champion)
    term, tail = 1, 1  # comb(n, 0); exact integers, then one division
    for i in range(k):
        term = term * (n - i) // (i + 1)
        tail += term
    return min(1.0, 2 * tail / 2**n)


class BootstrapResult(BaseModel):
    """A paired bootstrap of candidate minus champion on the same examples."""

    n: int
    mean_champion: float
    mean_candidate: float
    mean_diff: float = Field(description="mean_candidate - mean_champion.")
    ci_low: float = Field(description="2.5th percentile of the resampled mean difference.")
    ci_high: float = Field(description="97.5th percentile of the resampled mean difference.")
    p_value: float = Field(
        description="One-sided: (resamples with mean difference <= 0, + 1) / (resamples + 1). Small means the "
        "candidate is better."
    )
    resamples: int
    seed: int


# Indices drawn per chunk of resamples: bounds memory (8 bytes each) whatever n is.
_BOOTSTRAP_CHUNK = 2_000_000


def paired_bootstrap(
    champion: list[float], candidate: list[float], *, resamples: int = 1000, seed: int = 0
) -> BootstrapResult:
    """Resample example indices with replacement and look at the candidate's mean advantage.

    Deterministic for a given seed. Vectorized in chunks: 1000 resamples of 10 000 pairs take a
    fraction of a second. With no pairs, p is 1.0 and the interval is [0, 0].
    """
    if len(champion) != len(candidate):
        raise ValueError("paired results must have the same length")
    if resamples < 1:
        raise ValueError("resamples must be at least 1")
    n = len(champion)
    if n == 0:
        return BootstrapResult(n=0, mean_champion=0.0, mean_candidate=0.0, mean_diff=0.0, ci_low=0.0,
                               ci_high=0.0, p_value=1.0, resamples=resamples, seed=seed)
    base = np.asarray(champion, dtype=np.float64)
    cand = np.asarray(candidate, dtype=np.float64)
    diff = cand - base
    rng = np.random.default_rng(seed)
    per_chunk = max(1, _BOOTSTRAP_CHUNK // n)
    means = np.empty(resamples, dtype=np.float64)
    for start in range(0, resamples, per_chunk):
        stop = min(resamples, start + per_chunk)
        idx = rng.integers(0, n, size=(stop - start, n))
        means[start:stop] = diff[idx].mean(axis=1)
    ci_low, ci_high = np.percentile(means, [2.5, 97.5])
    at_most_zero = int(np.count_nonzero(means <= 0))
    return BootstrapResult(
        n=n,
        mean_champion=float(base.mean()),
        mean_candidate=float(cand.mean()),
        mean_diff=float(diff.mean()),
        ci_low=float(ci_low),
        ci_high=float(ci_high),
        p_value=(at_most_zero + 1) / (resamples + 1),
        resamples=resamples,
        seed=seed,
    )


def min_pairs_for_alpha(alpha: float, *, binary: bool, resamples: int = 1000) -> int:
    """The fewest paired examples at which the gate's test could reach p <= alpha at all.

    Below it no result can be significant, so the gate reports "insufficient data" rather than a
    rejection that only reflects a tiny hold-out.

    - binary (McNemar): the smallest n with 2 * 0.5**n <= alpha: n discordant pairs all favouring the
      candidate, the most extreme outcome (6 at alpha 0.05, since 2 * 0.5**5 = 0.0625).
    - continuous (paired bootstrap): the smallest n with 0.5**n <= alpha, the floor of a one-sided
      sign test. The bootstrap alone has no such floor: when every difference favours the candidate,
      no resample has a mean <= 0 and p is 1 / (resamples + 1) even for one pair. The sign-test rule
      asks for at least as many pairs as an exact test would need (5 at alpha 0.05). The bootstrap's own
      floor must also reach alpha; when 1 / (resamples + 1) > alpha no n suffices and this raises.
    """
    if not 0 < alpha < 1:
        raise ValueError(f"alpha must be in (0, 1), got {alpha}")
    if not binary and 1 / (resamples + 1) > alpha:
        raise ValueError(f"{resamples} bootstrap resamples cannot give p <= {alpha}; use at least "
                         f"{math.ceil(1 / alpha) - 1}")
    factor = 2.0 if binary else 1.0
    n = 1
    while factor * 0.5**n > alpha:
        n += 1
    return n
