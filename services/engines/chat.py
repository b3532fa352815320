"""Prompt rendering shared by the engines: the model's own chat template, token-budget checks."""

from __future__ import annotations

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


def render_prompt_ids(
    tokenizer: Any, messages: list[ChatMessage], max_tokens: int, max_model_len: int
) -> list[int]:
    """Token ids of the chat prompt with the generation prompt appended, checked against the context."""
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
