"""The DeepSeek-R1 answer format, shared by serving (to split answers) and training (to score them)."""

from __future__ import annotations

THINK_END = "</think>"


def split_reasoning(text: str) -> tuple[str, str]:
    """(reasoning, answer) of an R1-style completion: reasoning inside <think>…</think>, answer after.

    The generation prompt already opens `<think>`, so the completion usually starts inside it.
    A completion without `</think>` is all answer.
    """
    if THINK_END not in text:
        return "", text.replace("<think>", "").strip()
    reasoning, answer = text.split(THINK_END, 1)
    return reasoning.replace("<think>", "").strip(), answer.strip()
