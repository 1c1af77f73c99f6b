"""Request limits: API keys, body size, and the admission queue."""

from __future__ import annotations

import asyncio
import hmac
from dataclasses import dataclass, field

from server.errors import APIError, error_response


def check_api_key(authorization: str | None, api_keys: tuple[str, ...]) -> None:
    if not api_keys:
        return
    scheme, _, token = (authorization or "").partition(" ")
    if scheme.lower() != "bearer" or not token:
        raise APIError(401, "missing API key: send 'Authorization: Bearer <key>'", code="invalid_api_key")
    if not any(hmac.compare_digest(token.strip(), key) for key in api_keys):
        raise APIError(401, "incorrect API key", code="invalid_api_key")


class BodySizeLimit:
    """ASGI middleware: 413 for a body over max_bytes (declared or streamed)."""

    def __init__(self, app, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = dict(scope.get("headers", [])).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_bytes:
            return await self._reject(scope, receive, send)
        seen = 0

        async def limited_receive():
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.max_bytes:
                    raise _BodyTooLarge()
            return message

        try:
            await self.app(scope, limited_receive, send)
        except _BodyTooLarge:
            await self._reject(scope, receive, send)

    async def _reject(self, scope, receive, send):
        response = error_response(413, f"request body exceeds {self.max_bytes} bytes", code="request_too_large")
        await response(scope, receive, send)


class _BodyTooLarge(Exception):
    pass


@dataclass(slots=True)
class Admission:
    """At most max_running requests generate at once; up to max_waiting wait
    for a turn; beyond that, 429 at once rather than an unbounded queue."""

    max_running: int
    max_waiting: int
    running: int = 0
    waiting: int = 0
    _turn: asyncio.Condition = field(default_factory=asyncio.Condition, init=False)

    async def acquire(self) -> None:
        if self.running >= self.max_running and self.waiting >= self.max_waiting:
            raise APIError(429, f"server busy: {self.running} requests running and {self.waiting} waiting; retry later",
                           code="queue_full")
        async with self._turn:
            self.waiting += 1
            try:
                await self._turn.wait_for(lambda: self.running < self.max_running)
            finally:
                self.waiting -= 1
            self.running += 1

    async def release(self) -> None:
        async with self._turn:
            self.running -= 1
            self._turn.notify()
