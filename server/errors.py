"""OpenAI-style errors: {"error": {"message", "type", "param", "code"}} with the right status."""

from __future__ import annotations

import json
import logging
from collections.abc import Callable

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from compute.types import Failure, FailureCode, RequestError
from server.protocol import (
    ChatCompletionRequest,
    ChatMessage,
    CompletionRequest,
    ErrorInfo,
    ErrorResponse,
    StreamOptions,
)

log = logging.getLogger(__name__)

ERROR_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    404: "not_found_error",
    405: "invalid_request_error",
    413: "invalid_request_error",
    429: "rate_limit_error",
    431: "invalid_request_error",
    500: "internal_error",
    503: "service_unavailable",
}

# How an engine failure reaches the client: the one table from code to status.
FAILURE_STATUS = {
    FailureCode.BAD_REQUEST: 400,
    FailureCode.KV_CACHE_FULL: 429,
    FailureCode.STAGE_DOWN: 503,
    FailureCode.STALLED: 503,
    FailureCode.SHUTTING_DOWN: 503,
    FailureCode.LOAD_FAILED: 503,
    FailureCode.STAGE_ERROR: 500,
    FailureCode.INTERNAL: 500,
}


class APIError(Exception):
    """is_rejection: refused before generation started (counted in
    pipeinfer:request_rejected); a failure during generation is not."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 is_rejection: bool = True) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code
        self.is_rejection = is_rejection

    @classmethod
    def of(cls, failure: Failure) -> APIError:
        status = FAILURE_STATUS[failure.code]
        prefix = {400: "", 429: "server busy: "}.get(status, "generation failed: ")
        return cls(status, prefix + failure.message, param=failure.param, code=failure.code.value,
                   is_rejection=False)


class SafeJSONResponse(JSONResponse):
    """ASCII JSON: a message that quotes the client's input stays encodable
    even when that input holds a lone surrogate ("\\ud800")."""

    def render(self, content) -> bytes:
        return json.dumps(content, separators=(",", ":")).encode("ascii")


def error_body(status: int, message: str, param: str | None = None, code: str | int | None = None) -> dict:
    return ErrorResponse(error=ErrorInfo(message=message, type=ERROR_TYPES.get(status, "invalid_request_error"),
                                         param=param, code=code)).model_dump()


def error_response(status: int, message: str, param: str | None = None, code: str | None = None,
                   headers: dict[str, str] | None = None) -> JSONResponse:
    return SafeJSONResponse(error_body(status, message, param, code), status_code=status, headers=headers)


def error_event(exc: APIError) -> dict:
    """The same body, for an error that happens after a stream has started."""
    return error_body(exc.status, exc.message, exc.param, exc.code or exc.status)


# Statuses each endpoint may answer with, documented in the OpenAPI schema.
ERROR_RESPONSES = {status: {"model": ErrorResponse, "description": kind}
                   for status, kind in ERROR_TYPES.items() if status not in (405, 431, 500)}


# Names a location may hold; anything else in it is a union member's tag.
_FIELD_NAMES = {name for model in (CompletionRequest, ChatCompletionRequest, ChatMessage, StreamOptions)
                for name in model.model_fields}


def _describe_validation_error(exc: RequestValidationError) -> tuple[str, str | None]:
    errors = exc.errors()
    # A union reports every member's failure: the member whose JSON type
    # matched (an error past the type check) says what is wrong.
    first = next((e for e in errors if not e.get("type", "").endswith("_type")), errors[0])
    if first.get("type") == "json_invalid":
        return "the request body is not valid JSON", None
    loc = [part for part in first.get("loc", ()) if part != "body"]
    is_unknown_key = first.get("type") == "extra_forbidden"
    location = [str(part) for i, part in enumerate(loc)
                if isinstance(part, int) or part in _FIELD_NAMES or (is_unknown_key and i == len(loc) - 1)]
    param = ".".join(location) or None
    message = first.get("msg", "invalid value").removeprefix("Value error, ")
    if first.get("type") == "missing":
        return f"missing required parameter: {param}", param
    return f"invalid value for {param}: {message}" if param else f"invalid request body: {message}", param


def install_error_handlers(app: FastAPI, on_rejected: Callable[[int], None]) -> None:
    """on_rejected(status) counts each request refused before generation."""

    @app.exception_handler(APIError)
    async def _api_error(request: Request, exc: APIError):
        if exc.is_rejection:
            on_rejected(exc.status)
        return error_response(exc.status, exc.message, exc.param, exc.code)

    @app.exception_handler(RequestError)
    async def _request_error(request: Request, exc: RequestError):
        on_rejected(400)
        return error_response(400, str(exc), exc.param, exc.code or FailureCode.BAD_REQUEST.value)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, exc: RequestValidationError):
        message, param = _describe_validation_error(exc)
        on_rejected(400)
        return error_response(400, message, param)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException):
        message = f"no route {request.method} {request.url.path}" if exc.status_code in (404, 405) else str(exc.detail)
        on_rejected(exc.status_code)
        return error_response(exc.status_code, message, code=getattr(exc, "code", None),
                              headers=getattr(exc, "headers", None))

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception):
        log.exception("unhandled error on %s %s", request.method, request.url.path)
        return error_response(500, f"internal error: {type(exc).__name__}")
