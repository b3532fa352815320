"""Prompt rendering shared by the engines: the model's own chat template, token-budget checks."""

from __future__ import annotations

import asyncio
import functools
from typing import Any

from transformers import AutoTokenizer

from flywheel.r1 import THINK
from services.engines.protocol import ChatMessage, PromptTooLongError


def load_tokenizer(model: str) -> Any:
    tokenizer = AutoTokenizer.from_pretrained(model)
    if tokenizer.chat_template is None:
        raise ValueError(f"{model} has no chat template; flywheel serves chat models only")
    return tokenizer


def opens_think(tokenizer: Any) -> bool:
    """Whether the model's generation prompt opens a think block (R1's does: `<｜Assistant｜><think>\\n`)."""
    text = tokenizer.apply_chat_template(
        [{"role": "user", "content": "x"}], add_generation_prompt=True, tokenize=False
    )
    return str(text).rstrip().endswith(THINK)


# Tokenizing takes ~1-4 ms per 1 000 characters: a prompt longer than this is rendered off the event loop,
# so one long R1 context does not stall every other request on the replica.
OFF_LOOP_CHARS = 8_000


@functools.cache
def longest_token_chars(tokenizer: Any) -> int:
    """The most characters one token can stand for: the longest entry of the vocabulary (byte-level and
    SentencePiece vocabularies spell each token with at least as many characters as its text has)."""
    return max((len(token) for token in tokenizer.get_vocab()), default=1)


def render_prompt_ids(
    tokenizer: Any, messages: list[ChatMessage], max_tokens: int, max_model_len: int
) -> list[int]:
    """Token ids of the chat prompt with the generation prompt appended, checked against the context.

    A prompt with more characters than the context could hold even at the vocabulary's longest tokens is
    refused before tokenizing it: a 64 000-character prompt to a 512-token model costs nothing.
    """
    chars = sum(len(m.content) for m in messages)
    if chars > (max_model_len - max_tokens) * longest_token_chars(tokenizer):
        raise PromptTooLongError(
            f"prompt is {chars} characters, more than {max_model_len - max_tokens} tokens can hold (the "
            f"model's context of {max_model_len} tokens, less max_tokens={max_tokens})"
        )
    ids = tokenizer.apply_chat_template(
        [m.model_dump() for m in messages], add_generation_prompt=True, tokenize=True, return_dict=False
    )
    if hasattr(ids, "keys"):  # some tokenizers return a BatchEncoding even with return_dict=False
        ids = ids["input_ids"]
    ids = list(ids)
    if len(ids) + max_tokens > max_model_len:
        raise PromptTooLongError(
            f"prompt is {len(ids)} tokens; with max_tokens={max_tokens} that exceeds the model's "
            f"context of {max_model_len} tokens"
        )
    return ids


async def tokenized_prompt(
    tokenizer: Any, messages: list[ChatMessage], max_tokens: int, max_model_len: int
) -> list[int]:
    """`render_prompt_ids` for an engine's event loop: a long prompt is tokenized in a worker thread."""
    if sum(len(m.content) for m in messages) < OFF_LOOP_CHARS:
        return render_prompt_ids(tokenizer, messages, max_tokens, max_model_len)
    return await asyncio.to_thread(render_prompt_ids, tokenizer, messages, max_tokens, max_model_len)
