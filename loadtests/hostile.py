"""What a hostile-but-valid client sends: the shapes the hostile soak and the masking tests share.

Each shape is a unit repeated to any length. They are the inputs that made a regex search from every
start position (an e-mail local part, digit groups, phone prefixes) cost quadratic time or worse.
"""

from __future__ import annotations

ADVERSARIAL_UNITS = (
    "a", "a.", "a@", "a@a.", "a-", "a_", "1-", "1 ", "@a.",  # emails: a local part searched from every start
    "1", "11010519900307123 ", "110105199003071234", "11010519900307128X ",  # resident IDs (the last valid)
    "86 ", "+86-", "138 ", "0086",  # mobile numbers
    "4 ", "4-", "44 ", "1.", "1,",  # digit runs and cards: thousands of short groups
    " ",
)


def repeated(unit: str, length: int) -> str:
    """`unit` repeated to exactly `length` characters."""
    return (unit * (length // len(unit) + 1))[:length]
