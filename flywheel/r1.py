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


def _partial_tail(text: str, token: str) -> int:
    """Length of the longest end of `text` that is the start of `token` (it may complete in the next piece)."""
    return next((k for k in range(min(len(token) - 1, len(text)), 0, -1) if text.endswith(token[:k])), 0)


class StreamSplitter:
    """Splits a completion streamed in pieces into reasoning and answer deltas, as `split_completion` would.

    Joined, the deltas equal `split_completion`'s reasoning and answer for the whole text, however it was
    chunked: a tail that may be the start of `</think>` waits for the next piece, and whitespace at either
    end of the reasoning or the answer is held back (and dropped) exactly as `strip()` drops it. A stream
    knows it is thinking only when the prompt opened `<think>` or the completion opens it (R1 does one).
    """

    def __init__(self, *, opened_think: bool) -> None:
        self.in_think = opened_think
        self.decided = opened_think
        self.buffer = ""
        self._started = {"reasoning": False, "answer": False}
        self._pending = {"reasoning": "", "answer": ""}

    def feed(self, text: str) -> tuple[str, str]:
        """(reasoning delta, answer delta) for the next piece of the completion."""
        self.buffer += text
        if not self.decided:
            head = self.buffer.lstrip()
            if len(head) < len(THINK) and THINK.startswith(head):
                return "", ""  # may still open a think block
            if head.startswith(THINK):
                self.in_think, self.buffer = True, head[len(THINK):]
            self.decided = True
        reasoning = ""
        if self.in_think:
            end = self.buffer.find(THINK_END)
            if end < 0:
                keep = max(_partial_tail(self.buffer, THINK_END), _partial_tail(self.buffer, THINK))
                reasoning = self._emit("reasoning", self.buffer[: len(self.buffer) - keep])
                self.buffer = self.buffer[len(self.buffer) - keep:]
                return reasoning, ""
            reasoning = self._emit("reasoning", self.buffer[:end])
            self.buffer, self.in_think = self.buffer[end + len(THINK_END):], False
        answer, self.buffer = self._emit("answer", self.buffer), ""
        return reasoning, answer

    def finish(self) -> tuple[str, str, bool]:
        """The last deltas, and whether the completion was cut off while thinking."""
        if not self.decided:  # a tiny completion that only looked like the start of <think>
            self.decided = True
            return "", self._emit("answer", self.buffer), False
        if self.in_think:
            return self._emit("reasoning", self.buffer), "", True
        return "", self._emit("answer", self.buffer), False

    def _emit(self, channel: str, text: str) -> str:
        if channel == "reasoning":
            text = text.replace(THINK, "")
        if not self._started[channel]:
            text = text.lstrip()
            if not text:
                return ""
            self._started[channel] = True
        text = self._pending[channel] + text
        kept = text.rstrip()
        self._pending[channel] = text[len(kept):]
        return kept
