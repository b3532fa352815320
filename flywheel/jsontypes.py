"""Field types for request bodies that mean what their JSON Schema says, no more and no less.

Request models are strict (a JSON `false` is not a temperature, `"5"` is not a token count), but JSON
Schema counts `5.0` as an integer, so whole numbers written as floats are accepted as integers.
"""

from __future__ import annotations

from typing import Annotated

from pydantic import BeforeValidator, Field


def whole_number(value: object) -> object:
    """`5.0` -> 5; strings and booleans are refused (pydantic's strict int refuses the rest)."""
    if isinstance(value, bool | str):
        raise ValueError("must be a JSON integer")
    if isinstance(value, float) and value.is_integer():
        return int(value)
    return value


# The constraint sits before the validator, so the document shows it as `minimum` (and it is checked).
PositiveInt = Annotated[int, Field(ge=1), BeforeValidator(whole_number)]
NonNegativeInt = Annotated[int, Field(ge=0), BeforeValidator(whole_number)]
# A sampling seed: the engines hold 64 bits, but past 2**53 a JSON number is not exact in most clients (nor in
# validators that compare as floats, where 2**63 + 191 passes a maximum of 2**63 - 1): the largest exact one.
Seed = Annotated[int, Field(ge=0, le=2**53 - 1), BeforeValidator(whole_number)]
