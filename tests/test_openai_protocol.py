"""The OpenAI request types as the schema documents them: what the schema allows is what is served."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from services.gateway import api
from services.openai_protocol import ChatCompletionRequest

HI = {"model": "demo", "messages": [{"role": "user", "content": "hi"}]}


def test_n_is_documented_as_one_choice_and_a_larger_n_is_refused_as_the_schema_says() -> None:
    schema = api.openapi()
    body = schema["paths"]["/v1/chat/completions"]["post"]["requestBody"]["content"]["application/json"]["schema"]
    n = schema["components"]["schemas"][body["$ref"].rsplit("/", 1)[-1]]["properties"]["n"]
    assert (n["minimum"], n["maximum"], n["default"]) == (1, 1, 1)
    assert ChatCompletionRequest.model_validate(HI | {"n": 1}).n == 1
    with pytest.raises(ValidationError) as refused:  # the gateway answers it as OpenAI's 400 with param `n`
        ChatCompletionRequest.model_validate(HI | {"n": 2})
    assert [e["loc"] for e in refused.value.errors()] == [("n",)]
