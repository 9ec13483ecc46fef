"""Relaying engine outputs to HTTP clients: the bridge from the engine thread into a request's
event loop (Choices), waiting for whole answers (collect), server-sent events as tokens come
(stream_events), and finished answers as JSON or as a replayed stream (reply).

A client that goes away cancels its engine requests: streams notice at their next send or
within `disconnect_poll` seconds, whichever comes first; their cache rows are freed at the next
engine step.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

from fastapi import Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from mistral7b.engine import Engine, EngineOutput
from mistral7b.generate import StreamPiece
from mistral7b.sampling import SamplingParams
from mistral7b.server import responses
from mistral7b.server.middleware import report_usage
from mistral7b.server.schemas import SamplingFields
from mistral7b.server.state import ServerState
from mistral7b.tools import CallStream, with_calls

# (text, finish_reason, logprobs, tool calls in OpenAI's shape or None)
Answer = tuple[str, str | None, dict[str, Any] | None, list[dict[str, Any]] | None]


class Choices:
    """The engine requests of one HTTP request (one per choice), bridged from the engine
    thread into this request's event loop."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self.loop = asyncio.get_running_loop()
        self.queue: asyncio.Queue[tuple[int, EngineOutput]] = asyncio.Queue()
        self.ids: list[str] = []
        self.open: set[int] = set()

    def submit(self, requests: list[tuple[list[int], SamplingParams]]) -> None:
        try:
            for index, (prompt, params) in enumerate(requests):
                self.ids.append(self.engine.submit(prompt, params, self._callback(index)))
                self.open.add(index)
        except Exception:
            self.cancel()
            raise

    def _callback(self, index: int) -> Any:
        def on_output(out: EngineOutput) -> None:
            self.loop.call_soon_threadsafe(self.queue.put_nowait, (index, out))
        return on_output

    async def next(self, timeout: float) -> tuple[int, EngineOutput] | None:
        try:
            index, out = await asyncio.wait_for(self.queue.get(), timeout)
        except TimeoutError:
            return None
        if out.finished:
            self.open.discard(index)
        return index, out

    def cancel(self) -> None:
        for request_id in self.ids:
            self.engine.cancel(request_id)


async def collect(state: ServerState, request: Request, choices: Choices, n: int
                   ) -> tuple[dict[int, list[StreamPiece]], dict[int, EngineOutput],
                              float | None] | None:
    """Every choice's pieces and final output; None (and the requests cancelled) when the
    client goes away first."""
    pieces: dict[int, list[StreamPiece]] = {i: [] for i in range(n)}
    finals: dict[int, EngineOutput] = {}
    first_token: float | None = None
    last_check = time.monotonic()
    try:
        while choices.open:
            item = await choices.next(state.disconnect_poll)
            if time.monotonic() - last_check >= state.disconnect_poll:
                last_check = time.monotonic()
                if await request.is_disconnected():
                    choices.cancel()
                    return None
            if item is None:
                continue
            index, out = item
            if out.piece is not None:
                first_token = first_token or time.monotonic()
                pieces[index].append(out.piece)
            if out.finished:
                finals[index] = out
    except asyncio.CancelledError:
        choices.cancel()
        raise
    return pieces, finals, first_token


async def stream_events(state: ServerState, request: Request, choices: Choices,
                  envelope: responses.Envelope, body: SamplingFields, total: int,
                  prompt_tokens: int, logprobs: bool, token_text: responses.TokenText,
                  arrived: float, splitter: Callable[[], CallStream | None] = lambda: None,
                  echoed: list[str] | None = None) -> AsyncIterator[str]:
    """Server-sent events of `total` choices as the engine produces them. With tools, each
    choice's text streams as it comes and its calls follow as tool-call deltas once they are
    whole (`splitter` makes each choice's tools.CallStream). echoed: each choice's prompt
    text, sent (with the prompt's logprobs) in its first chunk."""
    splits = {i: splitter() for i in range(total)}
    echo = dict(enumerate(echoed or []))
    completion_tokens = 0
    first_token: float | None = None
    last_sent = time.monotonic()
    offsets = dict.fromkeys(range(total), 0)
    try:
        if envelope.kind == "chat":
            yield sse(envelope.chunk([envelope.choice(i, "", None, None, delta=True, role=True)
                                       for i in range(total)]))
        last_check = time.monotonic()
        while choices.open:
            item = await choices.next(state.disconnect_poll)
            now = time.monotonic()
            if now - last_check >= state.disconnect_poll:
                # Checked even while tokens flow: a server may drop sends to a gone client
                # silently, and the stream would otherwise run to max_tokens.
                last_check = now
                if await request.is_disconnected():
                    return
            if item is None:
                if now - last_sent >= state.keepalive:
                    yield ": keep-alive\n\n"            # an SSE comment: clients ignore it
                    last_sent = now
                continue
            index, out = item
            if out.finish_reason == "error":
                yield sse(responses.error_body(f"generation failed: {out.error}",
                                                "server_error"))
                break
            if out.finished:
                completion_tokens += out.completion_tokens
            piece = out.piece
            if piece is None:
                continue
            first_token = first_token or time.monotonic()
            text, reason, calls = piece.text, out.finish_reason, None
            split = splits[index]
            if split is not None:
                text = split.feed(piece.token_ids, piece.text)
                if out.finished:
                    rest, found = split.finish()
                    text += rest
                    calls = [responses.tool_call(c) for c in found] or None
                    reason = with_calls(reason, found)
            prompt = echo.pop(index, "")
            text = prompt + text
            lp: dict[str, Any] | None = None
            if logprobs and (piece.token_ids or piece.prompt_logprobs):
                lp = (responses.chat_logprobs([piece], token_text) if envelope.kind == "chat"
                      else responses.completion_logprobs([piece], token_text, offsets[index],
                                                         prompt=piece.prompt_logprobs or []))
            offsets[index] += len(prompt) + len(piece.text)
            if calls:
                if text or lp:
                    yield sse(envelope.chunk([envelope.choice(index, text, None, lp,
                                                               delta=True)]))
                yield sse(envelope.chunk([envelope.choice(index, "", reason, None, delta=True,
                                                           tool_calls=calls)]))
                last_sent = time.monotonic()
            elif text or lp or out.finished:
                yield sse(envelope.chunk([envelope.choice(index, text, reason, lp,
                                                           delta=True)]))
                last_sent = time.monotonic()
        else:
            state.metrics.observe_request(arrived, first_token, time.monotonic(), prompt_tokens,
                                          completion_tokens)
            report_usage(request, prompt_tokens, completion_tokens)
            if body.include_usage():
                yield sse(envelope.chunk([], responses.usage(prompt_tokens, completion_tokens)))
        yield sse("[DONE]")
    finally:
        if choices.open:           # the client left (or the stream broke): stop generating
            choices.cancel()


def reply(envelope: responses.Envelope, body: SamplingFields,
           out: list[Answer], usage: dict[str, int]
           ) -> Response:
    """Finished choices as one JSON response, or replayed as a stream (each choice's text in
    one chunk) when the client asked for a stream but the text had to be complete first."""
    if not body.stream:
        return JSONResponse(envelope.response(
            [envelope.choice(i, text, reason, lp, tool_calls=calls)
             for i, (text, reason, lp, calls) in enumerate(out)],
            usage))

    def events() -> list[str]:
        chunks = []
        if envelope.kind == "chat":
            chunks.append(sse(envelope.chunk([envelope.choice(i, "", None, None, delta=True,
                                                               role=True)
                                               for i in range(len(out))])))
        for i, (text, reason, lp, calls) in enumerate(out):
            chunks.append(sse(envelope.chunk([envelope.choice(i, text, reason, lp, delta=True,
                                                               tool_calls=calls)])))
        if body.include_usage():
            chunks.append(sse(envelope.chunk([], usage)))
        chunks.append(sse("[DONE]"))
        return chunks

    return StreamingResponse(iter(events()), media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache"})


def sse(data: dict[str, Any] | str) -> str:
    return f"data: {data if isinstance(data, str) else json.dumps(data)}\n\n"
