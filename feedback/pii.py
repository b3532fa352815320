"""Mask personal data before anything is stored: the seeds' finance and medical texts carry it.

Masks emails, Chinese resident ID numbers, mainland mobile numbers and bank card numbers, in that
order, so that a longer identifier is replaced whole before a shorter pattern could bite into it (an
ID number is never half-masked as a card, an email holding a phone number becomes `[EMAIL]`). Ordinary
numbers survive: prices, years, percentages and decimals do not match, and a digit run is only a card
when it has 13..19 digits, starts like a card (3-6) and passes the Luhn check.

`mask_event` applies it to every text of an event, and turns a `user_id`/`tenant_id` that is an email
or a phone number into a stable pseudonym (one person still counts as one person, unnamed).
"""

from __future__ import annotations

import hashlib
import re

from feedback.schemas import FeedbackEvent, PredictionEvent

EMAIL_TOKEN, ID_TOKEN, PHONE_TOKEN, CARD_TOKEN = "[EMAIL]", "[ID]", "[PHONE]", "[CARD]"

_EMAIL = re.compile(r"[A-Za-z0-9._%+-]+@[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*\.[A-Za-z]{2,}")
# 6-digit region, birth date YYYYMMDD (1800..2099), 3-digit sequence, check digit or X.
_RESIDENT_ID = re.compile(
    r"(?<!\d)[1-9]\d{5}(?:18|19|20)\d{2}(?:0[1-9]|1[0-2])(?:0[1-9]|[12]\d|3[01])\d{3}[\dXx](?!\d)"
)
# 1[3-9]x xxxx xxxx, optionally +86 / 0086 / 86 in front, optionally split by spaces or dashes.
_PHONE = re.compile(r"(?<![\d+])(?:(?:\+|00)?86[ -]?)?1[3-9]\d(?:[ -]?\d{4}){2}(?!\d)")
# Digit groups separated by single spaces or dashes, not part of a decimal or a 1,000-style number.
_DIGIT_RUN = re.compile(r"(?<![\d.,])\d+(?:[ -]\d+)*(?!\d|[.,]\d)")
_DIGITS = re.compile(r"\d+")


MAX_CARD_DIGITS = 19


def _luhn_ok(digits: str) -> bool:
    total = 0
    for i, char in enumerate(reversed(digits)):
        value = int(char) * (2 if i % 2 else 1)
        total += value - 9 if value > 9 else value
    return total % 10 == 0


def _is_card(digits: str) -> bool:
    return 13 <= len(digits) <= MAX_CARD_DIGITS and digits[0] in "3456" and _luhn_ok(digits)


def _mask_cards(match: re.Match[str]) -> str:
    """Within one run of digit groups, replace each longest stretch of whole groups that is a card.

    A card has at most 19 digits, so from each group only the next few groups are candidates: the scan
    is linear in the run's length, whatever shape (thousands of one-digit groups) the run takes.
    """
    run = match.group()
    groups = [g.group() for g in _DIGITS.finditer(run)]
    spans = [g.span() for g in _DIGITS.finditer(run)]
    pieces: list[str] = []
    copied = start = 0
    while start < len(groups):
        candidates, digits = [], ""
        for end in range(start, len(groups)):
            digits += groups[end]
            if len(digits) > MAX_CARD_DIGITS:
                break
            candidates.append((end + 1, digits))
        end = next((e for e, d in reversed(candidates) if _is_card(d)), None)
        if end is None:
            start += 1
            continue
        pieces += [run[copied:spans[start][0]], CARD_TOKEN]
        copied, start = spans[end - 1][1], end
    return "".join(pieces) + run[copied:]


def mask_pii(text: str) -> str:
    """`text` with emails, resident IDs, mobile numbers and bank cards replaced by tokens."""
    text = _EMAIL.sub(EMAIL_TOKEN, text)
    text = _RESIDENT_ID.sub(ID_TOKEN, text)
    text = _PHONE.sub(PHONE_TOKEN, text)
    return _DIGIT_RUN.sub(_mask_cards, text)


def pseudonym(identity: str | None) -> str | None:
    """An id holding personal data becomes `pii-<hash>`: the same person maps to the same pseudonym."""
    if identity is None or mask_pii(identity) == identity:
        return identity
    return f"pii-{hashlib.sha256(identity.encode()).hexdigest()[:16]}"


def mask_event(event: PredictionEvent | FeedbackEvent) -> PredictionEvent | FeedbackEvent:
    """`event` with its texts masked and personal ids pseudonymised; applying it twice changes nothing."""
    if isinstance(event, FeedbackEvent):
        return event.model_copy(update={
            "user_id": pseudonym(event.user_id),
            "tenant_id": pseudonym(event.tenant_id),
            "correction": event.correction and mask_pii(event.correction),
            "comment": event.comment and mask_pii(event.comment),
        })
    messages = event.messages and [m.model_copy(update={"content": mask_pii(m.content)}) for m in event.messages]
    return event.model_copy(update={
        "prompt": event.prompt and mask_pii(event.prompt),
        "messages": messages,
        "answer": mask_pii(event.answer),
        "reasoning": mask_pii(event.reasoning),
    })
