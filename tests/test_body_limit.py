"""The gateway's body cap: a body over it is refused before it is buffered, declared or chunked."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import AsyncIterator

import httpx
import pytest
import uvicorn

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


def test_a_server_refusing_a_streamed_body_hangs_up_instead_of_reading_the_rest(unused_tcp_port: int) -> None:
    """Through a real HTTP server: after the 413 the connection closes, so the client cannot make the replica
    read (and drop) the other gigabytes it meant to send."""
    server = uvicorn.Server(uvicorn.Config(api, host="127.0.0.1", port=unused_tcp_port, log_level="warning"))
    threading.Thread(target=server.run, daemon=True).start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert time.monotonic() < deadline
        time.sleep(0.05)
    try:
        with socket.create_connection(("127.0.0.1", unused_tcp_port), timeout=10) as client:
            client.sendall(b"POST /feedback HTTP/1.1\r\nHost: gateway\r\nTransfer-Encoding: chunked\r\n"
                           b"Content-Type: application/json\r\n\r\n")
            chunk = b"%x\r\n%s\r\n" % (len(CHUNK), CHUNK)
            # The cap, then one byte past it, then listen. The server has read everything sent, so it closes
            # cleanly and the answer arrives whole (unread bytes would turn its close into a reset).
            for _ in range(MAX_BODY_BYTES // len(CHUNK)):
                client.sendall(chunk)
            past_the_cap = b" " * (MAX_BODY_BYTES % len(CHUNK) + 1)
            client.sendall(b"%x\r\n%s\r\n" % (len(past_the_cap), past_the_cap))
            answer = b""
            while part := client.recv(65536):  # b"" once the server has closed its side
                answer += part
            assert answer.startswith(b"HTTP/1.1 413") and b"connection: close" in answer.lower()
            sent = 0
            with pytest.raises(OSError):  # broken pipe or reset: nobody reads the rest
                while sent < 200 * 2**20:  # a server that drains would take all of it
                    client.sendall(chunk)
                    sent += len(CHUNK)
            assert sent < 50 * 2**20
    finally:
        server.should_exit = True
