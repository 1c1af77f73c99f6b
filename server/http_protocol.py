"""The HTTP/1.1 protocol the gateway runs on: uvicorn's h11 implementation
with a bound on the request head (request line + headers; uvicorn's
`h11_max_incomplete_event_size`), answering an oversized head with 431 and a
malformed one with 400, as OpenAI error bodies.

httptools, which uvicorn prefers when it is installed, takes headers of any
size (a 100 MB header was parsed, then answered 200, stalling the server).
"""

from __future__ import annotations

from collections.abc import Callable
from http import HTTPStatus

from uvicorn.protocols.http.h11_impl import H11Protocol

from server.errors import SafeJSONResponse, error_body
from server.limits import DRAIN_LIMIT_BYTES, headers_too_large

DRAIN_TIMEOUT_S = 10.0


def limited_h11(on_rejected: Callable[[int], None]) -> type[H11Protocol]:
    """The protocol class for uvicorn's `http=`; on_rejected(status) counts refusals."""

    class LimitedH11Protocol(H11Protocol):
        _discard_left: int | None = None  # bytes still to read and drop after a refusal

        def send_400_response(self, msg: str) -> None:
            """uvicorn calls this when h11 cannot parse the request head."""
            buffered = len(self.conn.trailing_data[0])
            if buffered > self.config.h11_max_incomplete_event_size:
                status, message, code = 431, headers_too_large(self.config.h11_max_incomplete_event_size), \
                    "headers_too_large"
            else:
                status, message, code = 400, "invalid HTTP request", "invalid_http"
            on_rejected(status)
            body = SafeJSONResponse(error_body(status, message, code=code)).body
            self.transport.write(
                f"HTTP/1.1 {status} {HTTPStatus(status).phrase}\r\n".encode()
                + b"content-type: application/json\r\nconnection: close\r\n"
                + f"content-length: {len(body)}\r\n\r\n".encode() + body)
            # Read what the client is still sending before closing (closing
            # with unread data resets the connection, and the answer is lost).
            self._discard_left = DRAIN_LIMIT_BYTES
            self.loop.call_later(DRAIN_TIMEOUT_S, self.transport.close)

        def data_received(self, data: bytes) -> None:
            if self._discard_left is None:
                return super().data_received(data)
            self._discard_left -= len(data)
            if self._discard_left < 0:
                self.transport.close()

        def eof_received(self) -> None:
            if self._discard_left is not None:
                self.transport.close()
                return None
            return super().eof_received()

    return LimitedH11Protocol
