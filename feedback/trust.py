"""How much each curated verdict is worth: its trust level, and why one waits for review.

Trust, highest first: `reviewed` (an admin approved it) > `agreed` (at least `confirm_raters` distinct
authenticated raters gave the prompt the same correction, with a `majority` of those who corrected it)
> `single` (one authenticated rater) > `anonymous` (no key: open mode). Raters are counted, never rows:
one rater has one verdict per answer, and asking the same prompt ten times is still one rater.

A correction is held for review, whatever its trust short of `reviewed`, when raters disagree on the
prompt without a clear majority (for classification tasks, weighed by each rater's agreement with the others:
Dawid-Skene), or when it brings what the task's own data never had: a URL, an email
address, a phone, card, account or ID number, or words asking for credentials (masked PII shows up as
its token, `[EMAIL]`, and counts the same). The screens are plain linear-time patterns.
"""

from __future__ import annotations

import re
from collections import defaultdict
from collections.abc import Iterable, Sequence
from typing import Literal

import pandas as pd
from crowdkit.aggregation import DawidSkene
from pydantic import BaseModel

from feedback.pii import CARD_TOKEN, EMAIL_TOKEN, ID_TOKEN, PHONE_TOKEN
from feedback.review import Judgement
from feedback.schemas import CuratedExample

Trust = Literal["reviewed", "agreed", "single", "anonymous"]
TRUST_ORDER: tuple[Trust, ...] = ("anonymous", "single", "agreed", "reviewed")

# What a correction may not bring unless the task's own answers already have it: each linear in the text.
SCREENS: dict[str, re.Pattern[str]] = {
    "a URL": re.compile(r"\b(?:https?://|www\.)|\b[a-z0-9-]{1,63}\.(?:com|net|org|io|ru|cn|xyz|top|info|biz)\b",
                        re.IGNORECASE),
    "an email address": re.compile(rf"{re.escape(EMAIL_TOKEN)}|[^\s@]{{1,64}}@[^\s@]{{1,255}}\.[a-z]{{2,24}}",
                                   re.IGNORECASE),
    "a phone, card, account or ID number": re.compile(
        rf"{re.escape(PHONE_TOKEN)}|{re.escape(CARD_TOKEN)}|{re.escape(ID_TOKEN)}|\d(?:[ -]?\d){{7,}}"),
    "a request for credentials": re.compile(
        r"\b(?:password|passcode|passwd|pin code|one[- ]time code|otp|verification code|login details|credentials|"
        r"security code|cvv|seed phrase)\b|密码|验证码|口令", re.IGNORECASE),
}


def at_least(trust: Trust, floor: Trust) -> bool:
    return TRUST_ORDER.index(trust) >= TRUST_ORDER.index(floor)


def normalized(text: str) -> str:
    """Corrections that differ only in spacing or case are the same correction."""
    return " ".join(text.split()).casefold()


def rater_of(row: CuratedExample) -> str:
    """The row's rater; rows from before identities each stand alone."""
    return row.rater or f"event:{row.event_id}"


def prompt_key(row: CuratedExample) -> str:
    return f"{row.task}\n{row.prompt_kind}\n{row.prompt}"


def screen(correction: str, task_answers: Iterable[str]) -> str | None:
    """Why a correction must be reviewed before it trains (None: nothing suspicious): it brings something the
    task's own answers never had."""
    found = [what for what, pattern in SCREENS.items() if pattern.search(correction)]
    if not found:
        return None
    known = [what for what in found if any(SCREENS[what].search(answer) for answer in task_answers)]
    new = [what for what in found if what not in known]
    return f"brings {' and '.join(new)}, which the task's own data never had" if new else None


class Assessed(BaseModel):
    """One curated row, as a retrain and the review queue see it."""

    row: CuratedExample
    trust: Trust
    raters: int = 1  # distinct raters who gave this row's correction (1 for ratings)
    held: str | None = None  # why it waits for review (None: it may train, at its trust)
    decision: Literal["approve", "reject"] | None = None


def _consensus(by_prompt: dict[str, dict[str, set[str]]], labelled: bool) -> dict[str, tuple[str, float]]:
    """Prompt -> (the winning correction, its support). Support is the winner's share of the prompt's raters; for a
    labelled task (classification) whose raters disagree somewhere, it is Dawid-Skene's posterior (crowd-kit),
    which weighs each rater by how often they agree with the others across the task's prompts."""
    consensus = {key: max(((len(r) / len(set().union(*answers.values())), c) for c, r in answers.items()))[::-1]
                 for key, answers in by_prompt.items()}
    if not labelled or all(len(answers) == 1 for answers in by_prompt.values()):
        return consensus
    votes = pd.DataFrame([(key, rater, label) for key, answers in by_prompt.items() for label, raters in
                          answers.items() for rater in raters], columns=["task", "worker", "label"])
    posterior = DawidSkene(n_iter=100).fit_predict_proba(votes)
    for key, answers in by_prompt.items():
        if len(answers) > 1:
            label = str(posterior.loc[key].idxmax())
            consensus[key] = (label, float(posterior.loc[key, label]))
    return consensus


def assess(rows: Sequence[CuratedExample], decisions: dict[str, Judgement], *, confirm_raters: int,
           majority: float, task_answers: Sequence[str] = (), labelled: bool = False) -> list[Assessed]:
    """Every row's trust and hold; retracted rows are left out (they are tombstones). `labelled`: the task's
    corrections are labels (classification), so disagreeing raters are weighed by agreement (Dawid-Skene)."""
    rows = [r for r in rows if decisions.get(r.event_id) is None or decisions[r.event_id].action != "retract"]
    by_prompt: dict[str, dict[str, set[str]]] = defaultdict(lambda: defaultdict(set))
    for row in rows:
        if row.correction and row.authenticated:
            by_prompt[prompt_key(row)][normalized(row.correction)].add(rater_of(row))
    consensus = _consensus(by_prompt, labelled)
    out = []
    for row in rows:
        decision = decisions.get(row.event_id)
        verdict = decision.action if decision and decision.action in ("approve", "reject") else None
        trust: Trust = "single" if row.authenticated else "anonymous"
        raters, held = 1, None
        if row.correction:
            corrections = by_prompt.get(prompt_key(row), {})
            mine = len(corrections.get(normalized(row.correction), ()))
            everyone = len(set().union(*corrections.values())) if corrections else 0
            winner, support = consensus.get(prompt_key(row), ("", 0.0))
            raters = max(mine, 1)
            if row.authenticated and normalized(row.correction) == winner and support >= majority:
                trust = "agreed" if mine >= confirm_raters else trust
            elif corrections and (len(corrections) > 1 or normalized(row.correction) != winner):
                held = f"raters disagree on this prompt ({everyone} raters, {len(corrections)} corrections)"
            held = held or screen(row.correction, task_answers)
        if verdict == "approve":
            trust, held = "reviewed", None
        out.append(Assessed(row=row, trust=trust, raters=raters, held=held, decision=verdict))
    return out


def trainable(item: Assessed, *, min_trust: Trust, min_rating_trust: Trust) -> bool:
    """Whether the row may train: not rejected, not held, and trusted enough for its kind."""
    if item.decision == "reject" or item.held:
        return False
    return at_least(item.trust, min_trust if item.row.correction else min_rating_trust)


def pending_review(items: Sequence[Assessed], *, min_trust: Trust) -> list[Assessed]:
    """Corrections waiting for an admin: held, or below `min_trust`, and not judged yet."""
    return [i for i in items if i.row.correction and i.decision is None
            and (i.held or not at_least(i.trust, min_trust))]
