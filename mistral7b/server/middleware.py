"""What every HTTP request passes through before and after its route (plain ASGI, so that it
also sees streamed responses to their last byte):

- a body size limit: a body over `max_bytes` is answered 413 before it is parsed, whether its
  Content-Length says so up front or a chunked body grows past it;
- undecodable text: a body that is not valid UTF-8 has each bad byte replaced by U+FFFD before
  the JSON parser sees it, as everywhere else in mistral7b (text.py);
- the access log: one line per request once its response has ended,

      mistral7b: 127.0.0.1 "POST /v1/chat/completions" 200 in=25 out=32 1.21s

  where in/out are the prompt and generated tokens a route reported (see `report_usage`).
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

from starlette.requests import Request

from mistral7b.server import responses
from mistral7b.text import clean_bytes

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

access_log = logging.getLogger("mistral7b.access")


def report_usage(request: Request, prompt_tokens: int, completion_tokens: int) -> None:
    """Tell the access log how many tokens the request took in and gave out."""
    request.state.usage = (prompt_tokens, completion_tokens)


class _TooLarge(Exception):
    pass


class RequestMiddleware:
    def __init__(self, app: ASGIApp, max_bytes: int, log_requests: bool) -> None:
        self.app = app
        self.max_bytes = max_bytes
        self.log_requests = log_requests

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.monotonic()
        scope.setdefault("state", {})
        status = [0]

        async def send_logged(message: Message) -> None:
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)
            if message["type"] == "http.response.body" and not message.get("more_body"):
                self._log(scope, status[0], start)

        declared = _content_length(scope)
        if declared is not None and declared > self.max_bytes:
            await self._too_large(send_logged, declared)
            return
        try:
            body = await self._read_body(receive)
        except _TooLarge:
            await self._too_large(send_logged, None)
            return
        try:
            body.decode("utf-8")
        except UnicodeDecodeError:
            body = clean_bytes(body).encode("utf-8")
        replayed = False

        async def receive_body() -> Message:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()               # then http.disconnect, when it comes

        await self.app(scope, receive_body, send_logged)

    async def _read_body(self, receive: Receive) -> bytes:
        parts: list[bytes] = []
        size = 0
        while True:
            message = await receive()
            if message["type"] != "http.request":
                break                            # the client left; the route will notice
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_bytes:
                raise _TooLarge
            parts.append(chunk)
            if not message.get("more_body"):
                break
        return b"".join(parts)

    async def _too_large(self, send: Send, size: int | None) -> None:
        got = f" ({size} bytes)" if size is not None else ""
        body = json.dumps(responses.error_body(
            f"the request body{got} is larger than the server's limit of {self.max_bytes} bytes "
            "(mistral7b serve --max-request-bytes)", param="body",
            code="request_too_large")).encode()
        await send({"type": "http.response.start", "status": 413,
                    "headers": [(b"content-type", b"application/json"),
                                (b"content-length", str(len(body)).encode()),
                                (b"connection", b"close")]})
        await send({"type": "http.response.body", "body": body})

    def _log(self, scope: Scope, status: int, start: float) -> None:
        if not self.log_requests:
            return
        client = scope.get("client") or ("-", 0)
        usage = scope["state"].get("usage")
        tokens = f" in={usage[0]} out={usage[1]}" if usage else ""
        access_log.info('%s "%s %s" %d%s %.2fs', client[0], scope["method"], scope["path"],
                        status, tokens, time.monotonic() - start)


def _content_length(scope: Scope) -> int | None:
    for key, value in scope.get("headers", []):
        if key == b"content-length":
            try:
                return int(value)
            except ValueError:
                return None
    return None
