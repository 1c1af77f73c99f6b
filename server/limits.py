"""Request limits: API keys, body size, header count, and the admission queue."""

from __future__ import annotations

import asyncio
import hmac
from collections.abc import Callable
from dataclasses import dataclass, field

from starlette.exceptions import HTTPException

from server.errors import APIError, error_response

# A refused body is read to its end (up to this much) before the 413, so the
# client can read the answer: closing a socket with unread data resets it.
DRAIN_LIMIT_BYTES = 128 << 20


def check_api_key(authorization: str | None, api_keys: tuple[str, ...]) -> None:
    if not api_keys:
        return
    scheme, _, token = (authorization or "").partition(" ")
    if scheme.lower() != "bearer" or not token:
        raise APIError(401, "missing API key: send 'Authorization: Bearer <key>'", code="invalid_api_key")
    # Header values arrive as latin-1 text and may hold any byte: compare bytes.
    sent = token.strip().encode("latin-1")
    if not any(hmac.compare_digest(sent, key.encode()) for key in api_keys):
        raise APIError(401, "incorrect API key", code="invalid_api_key")


class RequestLimits:
    """ASGI middleware: 413 for a body over max_body_bytes (declared or
    streamed), 431 for more than max_headers headers or max_header_bytes of
    them. (A head that arrives in pieces is bounded earlier, while it is
    read: server/http_protocol.py.) on_rejected(status) counts the refusals
    made here."""

    def __init__(self, app, max_body_bytes: int, max_header_bytes: int, max_headers: int,
                 on_rejected: Callable[[int], None]) -> None:
        self.app = app
        self.max_body_bytes = max_body_bytes
        self.max_header_bytes = max_header_bytes
        self.max_headers = max_headers
        self.on_rejected = on_rejected

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = scope.get("headers", [])
        if len(headers) > self.max_headers:
            return await self._reject(431, f"more than {self.max_headers} request headers", "too_many_headers",
                                      scope, receive, send)
        if sum(len(name) + len(value) for name, value in headers) > self.max_header_bytes:
            return await self._reject(431, headers_too_large(self.max_header_bytes), "headers_too_large",
                                      scope, receive, send)
        declared = dict(headers).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_body_bytes:
            if (b"expect", b"100-continue") not in headers:  # such a client waits, sending nothing
                await _drain(receive, {"more_body": True})
            return await self._reject(413, BodyTooLarge.describe(self.max_body_bytes), BodyTooLarge.code,
                                      scope, receive, send)
        seen = 0

        async def limited_receive():
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.max_body_bytes:
                    await _drain(receive, message)
                    raise BodyTooLarge(self.max_body_bytes)  # answered by the app's error handler
            return message

        await self.app(scope, limited_receive, send)

    async def _reject(self, status: int, message: str, code: str, scope, receive, send):
        self.on_rejected(status)
        await error_response(status, message, code=code)(scope, receive, send)


def headers_too_large(max_bytes: int) -> str:
    return f"request headers exceed {max_bytes} bytes"


class BodyTooLarge(HTTPException):
    """An HTTPException, so that the framework's body parsing passes it on."""

    code = "request_too_large"

    def __init__(self, max_bytes: int) -> None:
        super().__init__(413, self.describe(max_bytes))

    @staticmethod
    def describe(max_bytes: int) -> str:
        return f"request body exceeds {max_bytes} bytes"


async def _drain(receive, message: dict) -> None:
    """Read (and drop) the rest of a refused body, up to DRAIN_LIMIT_BYTES."""
    received = 0
    while message.get("more_body", False) and received <= DRAIN_LIMIT_BYTES:
        message = await receive()
        if message["type"] != "http.request":
            return
        received += len(message.get("body", b""))


SHUTTING_DOWN = "the server is shutting down"


@dataclass(slots=True)
class Admission:
    """At most max_running requests generate at once; up to max_waiting wait
    for a turn; beyond that, 429 at once rather than an unbounded queue.
    close() refuses new and waiting requests (503) while running ones go on."""

    max_running: int
    max_waiting: int
    running: int = 0
    waiting: int = 0
    is_closed: bool = False
    _turn: asyncio.Condition = field(default_factory=asyncio.Condition, init=False)

    async def acquire(self) -> None:
        self._check_open()
        if self.running >= self.max_running and self.waiting >= self.max_waiting:
            raise APIError(429, f"server busy: {self.running} requests running and {self.waiting} waiting; retry later",
                           code="queue_full")
        async with self._turn:
            self.waiting += 1
            try:
                await self._turn.wait_for(lambda: self.running < self.max_running or self.is_closed)
            finally:
                self.waiting -= 1
            self._check_open()
            self.running += 1

    async def release(self) -> None:
        async with self._turn:
            self.running -= 1
            self._turn.notify()

    async def close(self) -> None:
        async with self._turn:
            self.is_closed = True
            self._turn.notify_all()

    def _check_open(self) -> None:
        if self.is_closed:
            raise APIError(503, f"{SHUTTING_DOWN}; retry on another replica", code="shutting_down")
