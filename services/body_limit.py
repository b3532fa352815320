"""Refuse a request body over a byte cap before it is buffered: the ASGI middleware in front of the gateway.

A body with a Content-Length over the cap is refused before a byte is read (the server holds a body
to its declared length). A chunked body declares nothing: its bytes are counted as the route reads
them, and the read stops with 413 at the cap, so a client cannot make a replica hold an endless body.

The cap lives here rather than at the ingress: Ray Serve writes its HAProxy config from a fixed
template (ray/serve/_private/haproxy_templates.py) with no place for a body-size rule.
"""

from __future__ import annotations

from starlette.datastructures import Headers
from starlette.exceptions import HTTPException
from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send

# The answer closes the connection: otherwise the server reads (and drops) the rest of the refused body to
# keep the connection alive, and a client streaming gigabytes keeps the replica busy reading them.
CLOSE = {"Connection": "close"}


class BodySizeLimit:
    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes
        self.message = f"the request body is over {max_bytes} bytes"

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = Headers(scope=scope).get("content-length")
        if declared is None:
            await self.app(scope, self._counted(receive), send)
        elif declared.isdigit() and int(declared) > self.max_bytes:
            await JSONResponse(status_code=413, content={"error": self.message}, headers=CLOSE)(scope, receive, send)
        else:
            await self.app(scope, receive, send)

    def _counted(self, receive: Receive) -> Receive:
        received = 0

        async def receive_within_cap() -> Message:
            nonlocal received
            message = await receive()
            received += len(message.get("body", b""))
            if received > self.max_bytes:
                # Raised inside the route's body read: FastAPI passes an HTTPException on to the app's handlers.
                raise HTTPException(status_code=413, detail=self.message, headers=CLOSE)
            return message

        return receive_within_cap
