"""The gateway's body cap: a body over it is refused before it is buffered, declared or chunked."""

from __future__ import annotations

from collections.abc import AsyncIterator

import httpx
import pytest

from services.gateway import MAX_BODY_BYTES, api

CHUNK = b" " * 64 * 1024


async def post_to_gateway(path: str, **kwargs: object) -> httpx.Response:
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=api), base_url="http://gateway") as client:
        return await client.post(path, **kwargs)  # type: ignore[arg-type]


@pytest.mark.parametrize("path", ["/feedback", "/v1/chat/completions"])
async def test_a_chunked_body_over_the_cap_is_refused_before_it_is_all_read(path: str) -> None:
    total_chunks = 4 * MAX_BODY_BYTES // len(CHUNK)
    sent = 0

    async def endless_body() -> AsyncIterator[bytes]:  # no Content-Length: sent chunked
        nonlocal sent
        for _ in range(total_chunks):
            sent += 1
            yield CHUNK

    response = await post_to_gateway(path, content=endless_body(), headers={"content-type": "application/json"})
    assert response.status_code == 413 and "bytes" in response.text
    assert sent <= MAX_BODY_BYTES // len(CHUNK) + 2 < total_chunks  # read up to the cap, not to the end


async def test_a_declared_length_over_the_cap_is_refused_unread() -> None:
    response = await post_to_gateway("/feedback", content=b" " * (MAX_BODY_BYTES + 1),
                                     headers={"content-type": "application/json"})
    assert response.status_code == 413 and response.json() == {"error": f"the request body is over {MAX_BODY_BYTES} "
                                                                        "bytes"}


async def test_a_chunked_body_under_the_cap_reaches_the_route() -> None:
    async def small_body() -> AsyncIterator[bytes]:
        yield b"{not json"

    response = await post_to_gateway("/feedback", content=small_body(), headers={"content-type": "application/json"})
    assert response.status_code == 422 and "json_invalid" in response.text
