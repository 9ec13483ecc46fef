"""Every error the API answers, in OpenAI's shape:

    {"error": {"message": "...", "type": "invalid_request_error", "param": "n", "code": null}}

400 for a bad field (param names it: "messages[1].content", "stream"), 401 without the API key,
404 for an unknown route or model, 405 for a wrong method, 413 for a body over the size limit,
429 when the queue is full, 503 while loading or draining, 500 when a request fails inside.
Routes raise APIError (or a Mistral7BError); the handlers here turn them into responses.
"""

from __future__ import annotations

import logging
import re
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException

from mistral7b.engine import EngineClosedError, QueueFullError
from mistral7b.errors import ContextLengthError, Mistral7BError
from mistral7b.server import responses

log = logging.getLogger("mistral7b")


class APIError(Exception):
    def __init__(self, status: int, message: str, kind: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.kind, self.param, self.code = (status, message, kind,
                                                                       param, code)


def error_response(status: int, message: str, kind: str = "invalid_request_error",
                   param: str | None = None, code: str | None = None) -> JSONResponse:
    return JSONResponse(responses.error_body(message, kind, param, code), status_code=status)


def field_name(loc: tuple[Any, ...]) -> str:
    """A pydantic error location as the field a client sent:
    ("body", "messages", 0, "content", "str") -> "messages[0].content".

    pydantic puts the member of a union it tried into the location ("str", "list[TextPart]",
    "function-after[...]", a model's class name); those are dropped. Field names are
    snake_case, so they never look like a type tag."""
    name = ""
    for part in loc[1:] if loc and loc[0] == "body" else loc:
        if isinstance(part, int):
            name += f"[{part}]"
        elif _is_type_tag(str(part)):
            continue
        else:
            name += f".{part}" if name else str(part)
    return name or "body"


_SCALAR_TAGS = {"str", "int", "float", "bool", "bytes", "none", "dict", "list"}


def _is_type_tag(part: str) -> bool:
    return (part in _SCALAR_TAGS or "[" in part or "-" in part
            or part[:1].isupper())                  # a model's class name: ChatMessage


_LEADING_FIELD = re.compile(r"([a-z_][\w.\[\]]*)(?::| must )")

# Starlette's own errors (routing, body parsing): the code each status gets.
_HTTP_CODES = {404: "not_found", 405: "method_not_allowed", 400: "invalid_body"}


def install(app: FastAPI) -> None:
    """Register the handlers that give every error OpenAI's shape."""

    @app.exception_handler(RequestValidationError)
    async def invalid_body(_: Request, exc: RequestValidationError) -> JSONResponse:
        first = exc.errors()[0]
        name = field_name(tuple(first.get("loc", ())))
        if first.get("type") == "json_invalid":
            return error_response(400, "the request body is not valid JSON", param="body",
                                  code="invalid_json")
        return error_response(400, f"{name}: {first.get('msg', 'invalid value')}", param=name)

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, exc: HTTPException) -> JSONResponse:
        if exc.status_code == 404:
            message = f"{request.method} {request.url.path}: no such endpoint"
        elif exc.status_code == 405:
            message = f"{request.url.path} does not take {request.method}"
        else:
            message = str(exc.detail)
        response = error_response(exc.status_code, message, param=None,
                                  code=_HTTP_CODES.get(exc.status_code))
        for key, value in (exc.headers or {}).items():      # e.g. Allow on a 405
            response.headers[key] = value
        return response

    @app.exception_handler(APIError)
    async def api_error(_: Request, exc: APIError) -> JSONResponse:
        return error_response(exc.status, exc.message, exc.kind, exc.param, exc.code)

    @app.exception_handler(Mistral7BError)
    async def user_error(_: Request, exc: Mistral7BError) -> JSONResponse:
        if isinstance(exc, QueueFullError):
            return error_response(429, str(exc), "rate_limit_error", code="queue_full")
        if isinstance(exc, EngineClosedError):
            return error_response(503, str(exc), "service_unavailable", code="draining")
        message = str(exc)
        # Our messages start with the field they are about: "stop: ...", "top_k must be ..."
        named = _LEADING_FIELD.match(message)
        param = named.group(1) if named else None
        code = "context_length_exceeded" if isinstance(exc, ContextLengthError) else None
        return error_response(400, message, param=param, code=code)

    @app.exception_handler(Exception)
    async def internal_error(_: Request, exc: Exception) -> JSONResponse:
        log.exception("request failed")
        return error_response(500, f"internal server error: {type(exc).__name__}: {exc}",
                              "server_error")
