"""Refuses a request body over the limit before it is read into memory.

A request that declares its length is judged by that header alone (the server reads
no more than it declares); only a body sent with a transfer encoding is counted as it
arrives. Any other request passes through unwrapped: an SSE response sends for
minutes, and a wrapper around each of its sends costs the gateway CPU per subscriber
and event."""

from __future__ import annotations

import json

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from contracts.errors import BodyTooLarge


class _TooLarge(BaseException):
    """Not an Exception, so that no handler on the way turns it into a 400."""


class BodyLimit:
    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        transfer_encoded = False
        for name, value in scope["headers"]:
            if name == b"content-length" and value.isdigit() and int(value) > self.max_bytes:
                await self._refuse(send)
                return
            transfer_encoded = transfer_encoded or name == b"transfer-encoding"
        if not transfer_encoded:
            await self.app(scope, receive, send)
            return
        received = 0
        started = False

        async def counting_receive() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_bytes:
                    raise _TooLarge()
            return message

        async def tracking_send(message: Message) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, counting_receive, tracking_send)
        except _TooLarge:
            if not started:
                await self._refuse(send)

    async def _refuse(self, send: Send) -> None:
        body = json.dumps(
            {
                "type": f"/problems/{BodyTooLarge.slug}",
                "title": BodyTooLarge.title,
                "status": 413,
                "detail": f"the request body is over the limit of {self.max_bytes} bytes",
                "max_bytes": self.max_bytes,
            }
        ).encode()
        await send(
            {
                "type": "http.response.start",
                "status": 413,
                "headers": [
                    (b"content-type", b"application/problem+json"),
                    (b"content-length", str(len(body)).encode()),
                    (b"connection", b"close"),
                ],
            }
        )
        await send({"type": "http.response.body", "body": body})
