"""The DeepSeek-R1 answer format, shared by serving (to split answers) and training (to score them)."""

from __future__ import annotations

from typing import NamedTuple

THINK, THINK_END = "<think>", "</think>"


class SplitCompletion(NamedTuple):
    reasoning: str
    answer: str
    truncated: bool  # the completion stopped inside its thinking: there is no answer to use


def split_completion(text: str, *, opened_think: bool = False) -> SplitCompletion:
    """Reasoning inside <think>…</think> and the answer after it.

    R1's generation prompt opens `<think>` (`opened_think`), so the completion usually starts inside
    it; without a `</think>` such a completion (or one that opens `<think>` itself) was cut off while
    thinking, and is reported truncated with no answer, never scored as one. A completion of a model
    that does not think (no `<think>` anywhere) is all answer.
    """
    if THINK_END in text:
        reasoning, answer = text.split(THINK_END, 1)
        return SplitCompletion(reasoning.replace(THINK, "").strip(), answer.strip(), False)
    if opened_think or text.lstrip().startswith(THINK):
        return SplitCompletion(text.replace(THINK, "").strip(), "", True)
    return SplitCompletion("", text.strip(), False)


def split_reasoning(text: str, *, opened_think: bool = False) -> tuple[str, str]:
    """(reasoning, answer) of a completion; see `split_completion`."""
    reasoning, answer, _ = split_completion(text, opened_think=opened_think)
    return reasoning, answer
