"""Mask personal data before anything is stored: the seeds' finance and medical texts carry it.

Masks emails, Chinese resident ID numbers, mainland mobile numbers and bank card numbers, in that
order, so that a longer identifier is replaced whole before a shorter pattern could bite into it (an
ID number is never half-masked as a card, an email holding a phone number becomes `[EMAIL]`). Ordinary
numbers survive: prices, years, percentages and decimals do not match, an 18-digit run is only an ID
number when its check digit and birth date are valid (`stdnum.cn.ric`), and a digit run is only a card
when it has 13..19 digits, starts like a card (3-6) and passes the Luhn check.

Every step is linear in the text's length, whatever its shape: a 64 000-character run of letters, dots
or digits must not hold a request (or a training run) for seconds.

`mask_event` applies it to every text of an event, and turns a `user_id`/`tenant_id` that is an email
or a phone number into a stable pseudonym (one person still counts as one person, unnamed).
"""

from __future__ import annotations

import datetime
import functools
import hashlib
import re
import string
from itertools import accumulate

from stdnum.cn import ric
from stdnum.exceptions import ValidationError

from feedback.schemas import FeedbackEvent, PredictionEvent

EMAIL_TOKEN, ID_TOKEN, PHONE_TOKEN, CARD_TOKEN = "[EMAIL]", "[ID]", "[PHONE]", "[CARD]"

# An email is `local@domain`; the domain is matched from a known '@', never searched for (see _mask_emails).
_EMAIL_LOCAL_CHARS = frozenset(string.ascii_letters + string.digits + "._%+-")
_EMAIL_DOMAIN = re.compile(r"[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*\.[A-Za-z]{2,}")
# 6-digit region, birth date YYYYMMDD (1800..2099), 3-digit sequence, check digit or X.
_RESIDENT_ID = re.compile(
    r"(?<!\d)[1-9]\d{5}(?:18|19|20)\d{2}(?:0[1-9]|1[0-2])(?:0[1-9]|[12]\d|3[01])\d{3}[\dXx](?!\d)"
)
# 1[3-9]x xxxx xxxx, optionally +86 / 0086 / 86 in front, optionally split by spaces or dashes.
_PHONE = re.compile(r"(?<![\d+])(?:(?:\+|00)?86[ -]?)?1[3-9]\d(?:[ -]?\d{4}){2}(?!\d)")
# Digit groups separated by single spaces or dashes, not part of a decimal or a 1,000-style number.
_DIGIT_RUN = re.compile(r"(?<![\d.,])\d+(?:[ -]\d+)*(?!\d|[.,]\d)")
_DIGITS = re.compile(r"\d+")


MIN_CARD_DIGITS, MAX_CARD_DIGITS = 13, 19
_LUHN_DOUBLED = (0, 2, 4, 6, 8, 1, 3, 5, 7, 9)  # a digit doubled, its two digits summed


def _luhn_prefix_sums(digits: str) -> tuple[list[int], list[int]]:
    """`sums[p][i]`: the Luhn sum of `digits[:i]` when the digits at even (p=0) or odd (p=1) positions are doubled.

    Luhn doubles every second digit counting from the check digit, so a stretch `digits[a:b]` doubles
    the positions of parity `b % 2`, and its sum is `sums[b % 2][b] - sums[b % 2][a]`: one subtraction
    per candidate card instead of a pass over its digits.
    """
    values = [int(char) for char in digits]

    def summed(doubled_parity: int) -> list[int]:
        return list(accumulate((_LUHN_DOUBLED[v] if i % 2 == doubled_parity else v for i, v in enumerate(values)),
                               initial=0))

    return summed(0), summed(1)


def _longest_card_end(start: int, digit_offsets: list[int], digits: str, luhn_sums: tuple[list[int], list[int]]
                      ) -> int | None:
    """The end (exclusive, in groups) of the longest card made of whole groups from group `start`, if any."""
    first = digit_offsets[start]
    if digits[first] not in "3456":
        return None
    longest = None
    for end in range(start + 1, len(digit_offsets)):
        last = digit_offsets[end]
        if last - first > MAX_CARD_DIGITS:
            break
        sums = luhn_sums[last % 2]
        if last - first >= MIN_CARD_DIGITS and (sums[last] - sums[first]) % 10 == 0:
            longest = end
    return longest


def _mask_cards(match: re.Match[str]) -> str:
    """Within one run of digit groups, replace each longest stretch of whole groups that is a card.

    A card has at most 19 digits, so from each group only the next few groups are candidates, each
    checked in constant time: the scan is linear in the run's length, whatever shape (thousands of
    one-digit groups) the run takes.
    """
    run = match.group()
    if len(run) < MIN_CARD_DIGITS:  # most runs (years, prices, counts): skip the bookkeeping
        return run
    spans = [g.span() for g in _DIGITS.finditer(run)]
    digits = "".join(run[a:b] for a, b in spans)
    digit_offsets = list(accumulate((b - a for a, b in spans), initial=0))  # digits before each group
    luhn_sums = _luhn_prefix_sums(digits)
    pieces: list[str] = []
    copied = start = 0
    while start < len(spans):
        end = _longest_card_end(start, digit_offsets, digits, luhn_sums)
        if end is None:
            start += 1
            continue
        pieces += [run[copied:spans[start][0]], CARD_TOKEN]
        copied, start = spans[end - 1][1], end
    return "".join(pieces) + run[copied:]


def _mask_emails(text: str) -> str:
    """`text` with each `local@domain` replaced, the local part as long as it runs before the '@'.

    A regex searching for `[local chars]+@` would start at every character of a long run and rescan
    the run from each (quadratic: seconds on 64 000 letters). Scanning out from each '@' instead reads
    every character at most twice: back to the previous '@' or email, and forward over one domain.
    """
    pieces: list[str] = []
    copied = 0
    at = text.find("@")
    while at != -1:
        start = at
        while start > copied and text[start - 1] in _EMAIL_LOCAL_CHARS:
            start -= 1
        domain = _EMAIL_DOMAIN.match(text, at + 1) if start < at else None
        if domain:
            pieces += [text[copied:start], EMAIL_TOKEN]
            copied = domain.end()
        at = text.find("@", max(at + 1, copied))
    return "".join(pieces) + text[copied:]


def _is_resident_id(number: str) -> bool:
    """`ric.is_valid(number)` for a number of `_RESIDENT_ID`'s shape, the cheap checks first: the check digit
    (ISO 7064 mod 11-2), then the birth date, then the place of birth, looked up once per region and year.

    `ric.is_valid` cleans the number four times and searches its region database for every one: ~30 µs
    an ID, so text made of thousands of valid IDs took over 100 ms.
    """
    number = number.upper()
    if number[-1] != ric.calc_check_digit(number):
        return False
    try:
        datetime.date(int(number[6:10]), int(number[10:12]), int(number[12:14]))
    except ValueError:
        return False
    return _born_in_a_known_place(number[:6], number[6:10])


@functools.lru_cache(maxsize=1 << 14)
def _born_in_a_known_place(region: str, year: str) -> bool:
    """Whether `region` was a county in `year` (`ric.get_birth_place` reads only those two of a number).

    A region its database knows only as a province (110001) makes it raise KeyError, not a ValidationError
    (python-stdnum 2.x), which `ric.is_valid` lets through: that names no county either.
    """
    try:
        ric.get_birth_place(f"{region}{year}0101000X")
    except (ValidationError, KeyError):
        return False
    return True


def _mask_resident_id(match: re.Match[str]) -> str:
    # The shape alone also fits order and tracking numbers: only a valid check digit makes it an ID.
    return ID_TOKEN if _is_resident_id(match.group()) else match.group()


def mask_pii(text: str) -> str:
    """`text` with emails, resident IDs, mobile numbers and bank cards replaced by tokens."""
    text = _mask_emails(text)
    text = _RESIDENT_ID.sub(_mask_resident_id, text)
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
