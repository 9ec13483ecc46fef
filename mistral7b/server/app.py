"""The OpenAI-compatible HTTP API: thin FastAPI routes over the engine (engine/engine.py).

Routes validate the body (schemas.py), turn it into prompt tokens and SamplingParams, submit
one engine request per choice, and relay the engine's outputs as one JSON response or as
server-sent events. Errors use OpenAI's shape, {"error": {"message", "type", "param", "code"}}:
400 for a bad field or a prompt that does not fit, 401 without the API key, 429 when the queue
is full, 503 while loading or draining, 500 when the engine fails a request (the server lives).

A client that goes away cancels its engine requests: streams notice at their next send or
within `disconnect_poll` seconds, whichever comes first; their cache rows are freed at the next
engine step.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import threading
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any, Literal

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse

from mistral7b.engine import Engine, EngineClosedError, EngineOutput, QueueFullError
from mistral7b.errors import ContextLengthError, Mistral7BError
from mistral7b.generate import StreamPiece
from mistral7b.guardrails.moderation import (
    CATEGORIES,
    LABELS,
    ModerationResult,
    Role,
    moderate,
    refusal_message,
)
from mistral7b.guardrails.safety import with_safety_prompt
from mistral7b.llm import LLM
from mistral7b.sampling import SamplingParams
from mistral7b.server import responses
from mistral7b.server.metrics import Metrics
from mistral7b.server.schemas import (
    MAX_CHOICES,
    MAX_STOP,
    ChatCompletionRequest,
    CompletionRequest,
    DetokenizeRequest,
    ModerationRequest,
    SamplingFields,
    TokenizeRequest,
)

log = logging.getLogger("mistral7b")

Status = Literal["loading", "ok", "draining", "failed"]
_ROUTES = {"/health", "/v1/models", "/v1/chat/completions", "/v1/completions", "/v1/moderations",
           "/tokenize", "/detokenize"}


@dataclass
class ServerState:
    """What the routes share. `llm` and `engine` are set once the model has loaded."""

    model_name: str
    api_key: str | None = None
    keepalive: float = 5.0               # seconds between SSE comments while nothing is sent
    disconnect_poll: float = 0.25
    status: Status = "loading"
    safe_prompt: bool = False            # every chat gets the guardrail prompt (--safe-prompt)
    moderate: str | None = None          # "input" | "output" | "both" (--moderate)
    moderation_lock: threading.Lock = field(default_factory=threading.Lock)
    llm: LLM | None = None
    engine: Engine | None = None
    metrics: Metrics = field(default_factory=Metrics)

    def attach(self, llm: LLM, engine: Engine) -> None:
        self.llm, self.engine = llm, engine
        self.metrics.track_engine(lambda: engine.stats().waiting,
                                  lambda: engine.stats().running)
        self.status = "ok"


class APIError(Exception):
    def __init__(self, status: int, message: str, kind: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.kind, self.param, self.code = (status, message, kind,
                                                                       param, code)


def _error(status: int, message: str, kind: str = "invalid_request_error",
           param: str | None = None, code: str | None = None) -> JSONResponse:
    return JSONResponse(responses.error_body(message, kind, param, code), status_code=status)


def _field_name(loc: tuple[Any, ...]) -> str:
    """("body", "messages", 0, "role") -> "messages[0].role"."""
    name = ""
    for part in loc[1:] if loc and loc[0] == "body" else loc:
        if isinstance(part, int):
            name += f"[{part}]"
        elif not str(part).startswith(("function-", "str", "list[", "int", "float", "bool",
                                       "literal[")):
            name += f".{part}" if name else str(part)
    return name or "body"


def create_app(state: ServerState) -> FastAPI:
    app = FastAPI(title="mistral7b", docs_url=None, redoc_url=None)
    app.state.server = state

    # ---- errors ---------------------------------------------------------------------------

    @app.exception_handler(RequestValidationError)
    async def invalid_body(_: Request, exc: RequestValidationError) -> JSONResponse:
        first = exc.errors()[0]
        name = _field_name(tuple(first.get("loc", ())))
        if first.get("type") == "json_invalid":
            return _error(400, "the request body is not valid JSON", param="body")
        return _error(400, f"{name}: {first.get('msg', 'invalid value')}", param=name)

    @app.exception_handler(APIError)
    async def api_error(_: Request, exc: APIError) -> JSONResponse:
        return _error(exc.status, exc.message, exc.kind, exc.param, exc.code)

    @app.exception_handler(Mistral7BError)
    async def user_error(_: Request, exc: Mistral7BError) -> JSONResponse:
        if isinstance(exc, QueueFullError):
            return _error(429, str(exc), "rate_limit_error", code="queue_full")
        if isinstance(exc, EngineClosedError):
            return _error(503, str(exc), "service_unavailable", code="draining")
        message = str(exc)
        param = message.split(":", 1)[0] if ":" in message[:40] else None
        code = "context_length_exceeded" if isinstance(exc, ContextLengthError) else None
        return _error(400, message, param=param, code=code)

    @app.exception_handler(Exception)
    async def internal_error(_: Request, exc: Exception) -> JSONResponse:
        log.exception("request failed")
        return _error(500, f"internal server error: {type(exc).__name__}: {exc}",
                      "server_error")

    # ---- middleware: API key and request counts -------------------------------------------

    @app.middleware("http")
    async def auth_and_count(request: Request, call_next: Any) -> Response:
        path = request.url.path
        route = path if path in _ROUTES else "other"     # bounded label values
        protected = path.startswith("/v1/") or path in ("/tokenize", "/detokenize")
        if protected and state.api_key is not None:
            sent = request.headers.get("authorization", "")
            if not hmac.compare_digest(sent.encode(), f"Bearer {state.api_key}".encode()):
                response: Response = _error(
                    401, "missing or wrong API key: send the header `Authorization: Bearer "
                    "<key>` with the key given to `mistral7b serve --api-key`",
                    "authentication_error", code="invalid_api_key")
                state.metrics.requests.labels(route, "401").inc()
                return response
        response = await call_next(request)
        if path != "/metrics":
            state.metrics.requests.labels(route, str(response.status_code)).inc()
        return response

    # ---- status ---------------------------------------------------------------------------

    @app.get("/health")
    async def health() -> JSONResponse:
        return JSONResponse({"status": state.status},
                            status_code=200 if state.status == "ok" else 503)

    @app.get("/metrics")
    async def metrics() -> Response:
        return Response(state.metrics.render(), media_type="text/plain; version=0.0.4")

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        return {"object": "list", "data": [{"id": state.model_name, "object": "model",
                                            "created": 0, "owned_by": "mistral7b"}]}

    # ---- tokens ---------------------------------------------------------------------------

    @app.post("/tokenize")
    async def tokenize(body: TokenizeRequest) -> dict[str, Any]:
        llm = _ready(state)[0]
        if (body.prompt is None) == (body.messages is None):
            raise APIError(400, "give exactly one of `prompt` and `messages`", param="prompt")
        if body.messages is not None:
            ids = llm.tokenizer.encode_chat([{"role": m.role, "content": m.text()}
                                             for m in body.messages])
        else:
            assert body.prompt is not None
            ids = llm.tokenizer.encode(body.prompt, bos=body.add_special_tokens)
        return {"tokens": ids, "count": len(ids), "max_model_len": llm.config.max_seq_len}

    @app.post("/detokenize")
    async def detokenize(body: DetokenizeRequest) -> dict[str, Any]:
        llm = _ready(state)[0]
        bad = [t for t in body.tokens if not 0 <= t < llm.config.vocab_size]
        if bad:
            raise APIError(400, f"tokens: id {bad[0]} is outside the vocabulary "
                           f"(0..{llm.config.vocab_size - 1})", param="tokens")
        return {"prompt": llm.tokenizer.decode(body.tokens)}

    # ---- generation -----------------------------------------------------------------------

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatCompletionRequest, request: Request) -> Response:
        llm, _ = _ready(state)
        messages = [{"role": m.role, "content": m.text()} for m in body.messages]
        if body.safe_prompt or state.safe_prompt:
            messages = with_safety_prompt(messages)
        prompt = llm.tokenizer.encode_chat(messages)
        top = body.top_logprobs or 0
        if top and not body.logprobs:
            raise APIError(400, "top_logprobs: needs logprobs=true", param="top_logprobs")
        if state.moderate in ("input", "both"):
            last_user = next((m["content"] for m in reversed(messages) if m["role"] == "user"),
                             "")
            verdict = (await _moderate(state, [last_user], "user"))[0]
            if verdict.flagged:
                envelope = responses.Envelope("chat", body.model or state.model_name)
                refusal = (refusal_message(verdict), "content_filter", None)
                return _reply(envelope, body, [refusal] * body.n, responses.usage(len(prompt), 0))
        return await _generate(state, request, "chat", body, [prompt], body.logprobs, top,
                               moderate_output=state.moderate in ("output", "both"))

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, request: Request) -> Response:
        llm, _ = _ready(state)
        if body.safe_prompt:
            raise APIError(400, "safe_prompt: only for /v1/chat/completions (a plain completion "
                           "has no system prompt)", param="safe_prompt")
        prompts = _completion_prompts(llm, body.prompt)
        if len(prompts) * body.n > MAX_CHOICES:
            raise APIError(400, f"prompt: {len(prompts)} prompts x n={body.n} choices is more "
                           f"than {MAX_CHOICES}", param="prompt")
        wanted = body.logprobs is not None
        return await _generate(state, request, "text", body, prompts, wanted, body.logprobs or 0)

    @app.post("/v1/moderations")
    async def moderations(body: ModerationRequest) -> dict[str, Any]:
        _ready(state)
        texts = [body.input] if isinstance(body.input, str) else list(body.input)
        if any(not t.strip() for t in texts):
            raise APIError(400, "input: empty text", param="input")
        results = await _moderate(state, texts, body.role)
        return {"id": responses.new_id("modr"), "model": body.model or state.model_name,
                "results": [{"flagged": r.flagged,
                             "categories": {c: r.label == c for c in CATEGORIES},
                             "category_scores": {c: r.probabilities[c] for c in CATEGORIES},
                             "label": r.label, "role": r.role,
                             "probabilities": r.probabilities} for r in results]}

    return app


def _completion_prompts(llm: LLM, prompt: str | list[int] | list[str] | list[list[int]]
                        ) -> list[list[int]]:
    """/v1/completions' `prompt`: a text, token ids, or a list of either (one per prompt)."""
    items: list[str | list[int]]
    if isinstance(prompt, str) or all(isinstance(t, int) for t in prompt):
        items = [prompt]  # type: ignore[list-item]
    else:
        items = list(prompt)  # type: ignore[arg-type]
    out = []
    for i, item in enumerate(items):
        ids = llm.tokenizer.encode(item) if isinstance(item, str) else list(item)
        if not ids:
            raise APIError(400, f"prompt[{i}]: empty", param="prompt")
        out.append(ids)
    return out


def _ready(state: ServerState) -> tuple[LLM, Engine]:
    if state.status != "ok" or state.llm is None or state.engine is None:
        message = {"loading": "the model is still loading; retry shortly",
                   "draining": "the server is shutting down",
                   "failed": "the model failed to load; see the server log"}.get(
                       state.status, "not ready")
        raise APIError(503, message, "service_unavailable", code=state.status)
    return state.llm, state.engine


def sampling_params(body: SamplingFields, limit: int | None, prompt_len: int, context: int,
                    logprobs: bool, top_logprobs: int, choice: int) -> SamplingParams:
    """The engine's parameters for one choice. Without a token limit, generation may fill the
    rest of the model's context."""
    if limit is None:
        limit = context - prompt_len
        if limit < 1:
            raise ContextLengthError(
                f"prompt of {prompt_len} tokens fills the model's context length of {context} "
                "tokens, leaving no room to generate; shorten the prompt")
    stops = body.stop_list()
    if len(stops) > MAX_STOP:
        raise APIError(400, f"stop: at most {MAX_STOP} stop strings (got {len(stops)})",
                       param="stop")
    if any(s == "" for s in stops):
        raise APIError(400, "stop: stop strings must not be empty", param="stop")
    return SamplingParams(
        max_tokens=limit, temperature=body.temperature, top_k=max(body.top_k, 0),
        top_p=body.top_p, min_p=body.min_p, repetition_penalty=body.repetition_penalty,
        presence_penalty=body.presence_penalty, frequency_penalty=body.frequency_penalty,
        seed=None if body.seed is None else body.seed + choice, stop=tuple(stops),
        ignore_eos=body.ignore_eos, logprobs=logprobs, top_logprobs=top_logprobs)


class _Choices:
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


async def _generate(state: ServerState, request: Request, kind: str, body: SamplingFields,
                    prompts: list[list[int]], logprobs: bool, top_logprobs: int,
                    moderate_output: bool = False) -> Response:
    """Choice k answers prompts[k // n] (OpenAI's order for several prompts)."""
    llm, engine = _ready(state)
    arrived = time.monotonic()
    limit = body.token_limit()
    total = len(prompts) * body.n
    prompt_tokens = sum(len(p) for p in prompts)
    requests = [(prompt, sampling_params(body, limit, len(prompt), llm.config.max_seq_len,
                                         logprobs, top_logprobs, j))
                for prompt in prompts for j in range(body.n)]
    choices = _Choices(engine)
    choices.submit(requests)
    envelope = responses.Envelope(kind, body.model or state.model_name)

    def token_text(token_id: int) -> str:
        return llm.tokenizer.decode([token_id])

    if body.stream and not moderate_output:
        return StreamingResponse(
            _stream(state, request, choices, envelope, body, total, prompt_tokens, logprobs,
                    token_text, arrived),
            media_type="text/event-stream",
            headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    collected = await _collect(state, request, choices, total)
    if collected is None:
        return Response(status_code=499)          # nobody reads it; nginx's "client gone"
    pieces, finals, first_token = collected
    failed = [o for o in finals.values() if o.finish_reason == "error"]
    if failed:
        raise APIError(500, f"generation failed: {failed[0].error}", "server_error")
    completion_tokens = sum(o.completion_tokens for o in finals.values())
    state.metrics.observe_request(arrived, first_token, time.monotonic(), prompt_tokens,
                                  completion_tokens)
    out: list[tuple[str, str | None, dict[str, Any] | None]] = []
    for i in range(total):
        text = "".join(p.text for p in pieces[i])
        lp: dict[str, Any] | None = None
        if logprobs:
            lp = (responses.chat_logprobs(pieces[i], token_text) if kind == "chat"
                  else responses.completion_logprobs(pieces[i], token_text))
        out.append((text, finals[i].finish_reason, lp))
    if moderate_output:
        verdicts = await _moderate(state, [text for text, _, _ in out], "assistant")
        out = [(refusal_message(v), "content_filter", None) if v.flagged else choice
               for v, choice in zip(verdicts, out, strict=True)]
    if kind == "text" and getattr(body, "echo", False):
        out = [(llm.tokenizer.decode(prompts[k // body.n]) + text, reason, lp)
               for k, (text, reason, lp) in enumerate(out)]
    return _reply(envelope, body, out, responses.usage(prompt_tokens, completion_tokens))


async def _collect(state: ServerState, request: Request, choices: _Choices, n: int
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


def _reply(envelope: responses.Envelope, body: SamplingFields,
           out: list[tuple[str, str | None, dict[str, Any] | None]], usage: dict[str, int]
           ) -> Response:
    """Finished choices as one JSON response, or replayed as a stream (each choice's text in
    one chunk) when the client asked for a stream but the text had to be complete first."""
    if not body.stream:
        return JSONResponse(envelope.response(
            [envelope.choice(i, text, reason, lp) for i, (text, reason, lp) in enumerate(out)],
            usage))

    def events() -> list[str]:
        chunks = []
        if envelope.kind == "chat":
            chunks.append(_sse(envelope.chunk([envelope.choice(i, "", None, None, delta=True,
                                                               role=True)
                                               for i in range(len(out))])))
        for i, (text, reason, lp) in enumerate(out):
            chunks.append(_sse(envelope.chunk([envelope.choice(i, text, reason, lp,
                                                               delta=True)])))
        if body.include_usage():
            chunks.append(_sse(envelope.chunk([], usage)))
        chunks.append(_sse("[DONE]"))
        return chunks

    return StreamingResponse(iter(events()), media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache"})


async def _moderate(state: ServerState, texts: list[str], role: Role) -> list[ModerationResult]:
    """Self-moderation of `texts`, off the event loop; one classification at a time (it runs
    the model beside the engine)."""
    llm = _ready(state)[0]

    def run() -> list[ModerationResult]:
        real = [t for t in texts if t.strip()]       # an empty answer is acceptable as is
        with state.moderation_lock:
            judged = iter(moderate(llm, real, role) if real else [])
        return [next(judged) if t.strip() else _empty_verdict(role) for t in texts]

    return await asyncio.to_thread(run)


def _empty_verdict(role: Role) -> ModerationResult:
    return ModerationResult("", role, "acceptable", False,
                            {label: float(label == "acceptable") for label in LABELS}, {})


def _sse(data: dict[str, Any] | str) -> str:
    return f"data: {data if isinstance(data, str) else json.dumps(data)}\n\n"


async def _stream(state: ServerState, request: Request, choices: _Choices,
                  envelope: responses.Envelope, body: SamplingFields, total: int,
                  prompt_tokens: int, logprobs: bool, token_text: responses.TokenText,
                  arrived: float) -> AsyncIterator[str]:
    """Server-sent events of `total` choices as the engine produces them."""
    completion_tokens = 0
    first_token: float | None = None
    last_sent = time.monotonic()
    offsets = dict.fromkeys(range(total), 0)
    try:
        if envelope.kind == "chat":
            yield _sse(envelope.chunk([envelope.choice(i, "", None, None, delta=True, role=True)
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
                yield _sse(responses.error_body(f"generation failed: {out.error}",
                                                "server_error"))
                break
            if out.finished:
                completion_tokens += out.completion_tokens
            piece = out.piece
            if piece is None:
                continue
            first_token = first_token or time.monotonic()
            lp: dict[str, Any] | None = None
            if logprobs and piece.token_ids:
                lp = (responses.chat_logprobs([piece], token_text) if envelope.kind == "chat"
                      else responses.completion_logprobs([piece], token_text, offsets[index]))
            offsets[index] += len(piece.text)
            if piece.text or lp or out.finished:
                yield _sse(envelope.chunk([envelope.choice(index, piece.text, out.finish_reason,
                                                           lp, delta=True)]))
                last_sent = time.monotonic()
        else:
            state.metrics.observe_request(arrived, first_token, time.monotonic(), prompt_tokens,
                                          completion_tokens)
            if body.include_usage():
                yield _sse(envelope.chunk([], responses.usage(prompt_tokens, completion_tokens)))
        yield _sse("[DONE]")
    finally:
        if choices.open:           # the client left (or the stream broke): stop generating
            choices.cancel()
