"""The OpenAI-compatible HTTP API: thin FastAPI routes over the engine (engine/engine.py).

Routes validate the body (schemas.py), turn it into prompt tokens and SamplingParams, submit
one engine request per choice, and hand the engine's outputs to streaming.py, which relays them
as one JSON response or as server-sent events. Errors (errors.py) use OpenAI's shape; every
request passes through middleware.py (body size limit, access log).
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import time
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from mistral7b.errors import ContextLengthError
from mistral7b.guardrails.moderation import (
    CATEGORIES,
    LABELS,
    ModerationResult,
    Role,
    refusal_message,
)
from mistral7b.guardrails.safety import with_safety_prompt
from mistral7b.llm import LLM
from mistral7b.sampling import SamplingParams
from mistral7b.server import errors, responses
from mistral7b.server.errors import APIError
from mistral7b.server.middleware import RequestMiddleware, report_usage
from mistral7b.server.schemas import (
    MAX_CHOICES,
    ChatCompletionRequest,
    ChatMessage,
    CompletionRequest,
    DetokenizeRequest,
    ModerationRequest,
    SamplingFields,
    TokenizeRequest,
    as_messages,
)
from mistral7b.server.state import ServerState, ready
from mistral7b.server.streaming import Answer, Choices, collect, reply, stream_events
from mistral7b.tools import CallStream, ToolPlan, plan_tools, split_answer, with_calls

log = logging.getLogger("mistral7b")

_ROUTES = {"/health", "/v1/models", "/v1/chat/completions", "/v1/completions", "/v1/moderations",
           "/tokenize", "/detokenize"}


def create_app(state: ServerState) -> FastAPI:
    app = FastAPI(title="mistral7b", docs_url=None, redoc_url=None)
    app.state.server = state

    errors.install(app)

    # ---- middleware: API key and request counts -------------------------------------------

    @app.middleware("http")
    async def auth_and_count(request: Request, call_next: Any) -> Response:
        path = request.url.path
        route = path if path in _ROUTES else "other"     # bounded label values
        protected = path.startswith("/v1/") or path in ("/tokenize", "/detokenize")
        if protected and state.api_key is not None:
            sent = request.headers.get("authorization", "")
            if not hmac.compare_digest(sent.encode(), f"Bearer {state.api_key}".encode()):
                response: Response = errors.error_response(
                    401, "missing or wrong API key: send the header `Authorization: Bearer "
                    "<key>` with the server's key (`mistral7b serve --api-key`, or "
                    "MISTRAL7B_API_KEY)",
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
        return {"object": "list", "data": [_model_card(name) for name in state.model_names]}

    @app.get("/v1/models/{model:path}")
    async def model(model: str) -> dict[str, Any]:
        _check_model(state, model)
        return _model_card(model)

    # ---- tokens ---------------------------------------------------------------------------

    @app.post("/tokenize")
    async def tokenize(body: TokenizeRequest) -> dict[str, Any]:
        llm = ready(state)[0]
        _check_model(state, body.model)
        if (body.prompt is None) == (body.messages is None):
            raise APIError(400, "give exactly one of `prompt` and `messages`", param="prompt")
        if body.messages is not None:
            ids = await asyncio.to_thread(llm.tokenizer.encode_chat, _messages(body.messages))
        else:
            assert body.prompt is not None
            ids = await asyncio.to_thread(llm.tokenizer.encode, body.prompt,
                                          body.add_special_tokens)
        return {"tokens": ids, "count": len(ids), "max_model_len": llm.config.max_seq_len}

    @app.post("/detokenize")
    async def detokenize(body: DetokenizeRequest) -> dict[str, Any]:
        llm = ready(state)[0]
        _check_model(state, body.model)
        bad = [t for t in body.tokens if not 0 <= t < llm.config.vocab_size]
        if bad:
            raise APIError(400, f"tokens: id {bad[0]} is outside the vocabulary "
                           f"(0..{llm.config.vocab_size - 1})", param="tokens")
        return {"prompt": await asyncio.to_thread(llm.tokenizer.decode, body.tokens)}

    # ---- generation -----------------------------------------------------------------------

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatCompletionRequest, request: Request) -> Response:
        llm, _ = ready(state)
        _check_model(state, body.model)
        plan = plan_tools(llm.tokenizer, body.tools, body.tool_choice)
        messages = _messages(body.messages)
        if body.safe_prompt or state.safe_prompt:
            messages = with_safety_prompt(messages)
        # Tokenizing a large conversation takes a while: off the event loop, which keeps
        # answering /health and the other streams meanwhile.
        prompt = await asyncio.to_thread(llm.tokenizer.encode_chat, messages,
                                         plan.shown if plan else None)
        top = body.top_logprobs or 0
        if top and not body.logprobs:
            raise APIError(400, "top_logprobs: needs logprobs=true", param="top_logprobs")
        if state.moderate in ("input", "both"):
            last_user = next((m["content"] for m in reversed(messages) if m["role"] == "user"),
                             "")
            verdict = (await _moderate(state, [last_user], "user"))[0]
            if verdict.flagged:
                envelope = responses.Envelope("chat", body.model or state.model_name)
                refusal = (refusal_message(verdict), "content_filter", None, None)
                report_usage(request, len(prompt), 0)
                return reply(envelope, body, [refusal] * body.n,
                             responses.usage(len(prompt), 0))
        return await _generate(state, request, "chat", body, [prompt], body.logprobs, top,
                               moderate_output=state.moderate in ("output", "both"),
                               tools=plan)

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, request: Request) -> Response:
        llm, _ = ready(state)
        _check_model(state, body.model)
        if body.safe_prompt:
            raise APIError(400, "safe_prompt: only for /v1/chat/completions (a plain completion "
                           "has no system prompt)", param="safe_prompt")
        if body.suffix:
            raise APIError(400, "suffix: not supported (text after the insertion point needs a "
                           "fill-in-the-middle model)", param="suffix")
        if body.best_of is not None and body.best_of != body.n:
            raise APIError(400, f"best_of: not supported (generating {body.best_of} candidates "
                           "and returning the best is not implemented); use n", param="best_of")
        prompts = await asyncio.to_thread(_completion_prompts, llm, body.prompt)
        if len(prompts) * body.n > MAX_CHOICES:
            raise APIError(400, f"prompt: {len(prompts)} prompts x n={body.n} choices is more "
                           f"than {MAX_CHOICES}", param="prompt")
        if body.token_limit() == 0 and not body.echo:
            raise APIError(400, "max_tokens: 0 generates nothing; it is for scoring a prompt "
                           "with echo=true (and logprobs)", param="max_tokens")
        wanted = body.logprobs is not None
        return await _generate(state, request, "text", body, prompts, wanted, body.logprobs or 0,
                               echo=body.echo)

    @app.post("/v1/moderations")
    async def moderations(body: ModerationRequest) -> dict[str, Any]:
        ready(state)
        _check_model(state, body.model)
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

    # Outermost, so that it sees every request and the end of every response.
    app.add_middleware(RequestMiddleware, max_bytes=state.max_request_bytes,
                       log_requests=state.access_log)
    return app


def _messages(messages: list[ChatMessage]) -> list[dict[str, Any]]:
    try:
        return as_messages(messages)
    except ValueError as e:
        raise APIError(400, str(e), param=str(e).split(":", 1)[0]) from None


def _model_card(name: str) -> dict[str, Any]:
    return {"id": name, "object": "model", "created": 0, "owned_by": "mistral7b"}


def _check_model(state: ServerState, requested: str | None) -> None:
    """A request's `model` must be a name this server serves (or be left out): answering
    another model's name with this one would mislead the client."""
    if requested is None or requested in state.model_names:
        return
    served = ", ".join(repr(n) for n in state.model_names)
    raise APIError(404, f"model {requested!r} does not exist on this server; it serves "
                   f"{served} (mistral7b serve --served-model-name adds names)", param="model",
                   code="model_not_found")


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


def sampling_params(body: SamplingFields, limit: int | None, prompt_len: int, context: int,
                    logprobs: bool, top_logprobs: int, choice: int,
                    prompt_logprobs: int | None = None) -> SamplingParams:
    """The engine's parameters for one choice. Without a token limit, generation may fill the
    rest of the model's context."""
    if limit is None:
        limit = context - prompt_len
        if limit < 1:
            raise ContextLengthError(
                f"prompt of {prompt_len} tokens fills the model's context length of {context} "
                "tokens, leaving no room to generate; shorten the prompt")
    return SamplingParams(              # checks every value against sampling.RANGES
        max_tokens=limit, temperature=body.temperature, top_k=body.top_k,
        top_p=body.top_p, min_p=body.min_p, repetition_penalty=body.repetition_penalty,
        presence_penalty=body.presence_penalty, frequency_penalty=body.frequency_penalty,
        seed=None if body.seed is None else body.seed + choice, stop=tuple(body.stop_list()),
        ignore_eos=body.ignore_eos, logprobs=logprobs, top_logprobs=top_logprobs,
        logit_bias=body.logit_bias or (), response_format=body.response_format,
        prompt_logprobs=prompt_logprobs)


async def _generate(state: ServerState, request: Request, kind: str, body: SamplingFields,
                    prompts: list[list[int]], logprobs: bool, top_logprobs: int,
                    moderate_output: bool = False, tools: ToolPlan | None = None,
                    echo: bool = False) -> Response:
    """Choice k answers prompts[k // n] (OpenAI's order for several prompts). echo: each
    text starts with its prompt, and logprobs with the prompt's tokens (a full pre-fill that
    keeps every position's logits, chunk by chunk)."""
    llm, engine = ready(state)
    arrived = time.monotonic()
    limit = body.token_limit()
    total = len(prompts) * body.n
    prompt_tokens = sum(len(p) for p in prompts)
    # (top_logprobs is 0 without logprobs: max_tokens 0 alone still scores the prompt)
    scored = top_logprobs if echo and (logprobs or limit == 0) else None
    requests = [(prompt, sampling_params(body, limit, len(prompt), llm.config.max_seq_len,
                                         logprobs, top_logprobs, j, scored))
                for prompt in prompts for j in range(body.n)]
    if tools is not None:
        requests = [(prompt, tools.sampling(params)) for prompt, params in requests]
    choices = Choices(engine)
    choices.submit(requests)
    envelope = responses.Envelope(kind, body.model or state.model_name)

    def token_text(token_id: int) -> str:
        return llm.tokenizer.decode([token_id])

    def splitter() -> CallStream | None:
        return CallStream(llm.tokenizer, tools) if tools is not None else None

    # A moderated answer is judged whole first: such streams are replayed from it.
    echoed: list[str] = []
    if echo:        # the prompts' texts, off the event loop
        texts = await asyncio.to_thread(lambda: [llm.tokenizer.decode(p) for p in prompts])
        echoed = [texts[k // body.n] for k in range(total)]

    if body.stream and not moderate_output:
        return StreamingResponse(
            stream_events(state, request, choices, envelope, body, total, prompt_tokens,
                          logprobs, token_text, arrived, splitter, echoed),
            media_type="text/event-stream",
            headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    collected = await collect(state, request, choices, total)
    if collected is None:
        return Response(status_code=499)          # nobody reads it; nginx's "client gone"
    pieces, finals, first_token = collected
    failed = [o for o in finals.values() if o.finish_reason == "error"]
    if failed:
        raise APIError(500, f"generation failed: {failed[0].error}", "server_error")
    completion_tokens = sum(o.completion_tokens for o in finals.values())
    state.metrics.observe_request(arrived, first_token, time.monotonic(), prompt_tokens,
                                  completion_tokens)
    report_usage(request, prompt_tokens, completion_tokens)
    out: list[Answer] = []
    whole = ["".join(p.text for p in pieces[i]) for i in range(total)]   # calls included
    for i in range(total):
        text = whole[i]
        lp: dict[str, Any] | None = None
        if logprobs:
            scores = next((p.prompt_logprobs for p in pieces[i] if p.prompt_logprobs), [])
            lp = (responses.chat_logprobs(pieces[i], token_text) if kind == "chat"
                  else responses.completion_logprobs(pieces[i], token_text, prompt=scores))
        reason, calls = finals[i].finish_reason, None
        if tools is not None:
            text, found = split_answer(llm.tokenizer, tools,
                                       [t for p in pieces[i] for t in p.token_ids], text)
            calls = [responses.tool_call(c) for c in found] or None
            reason = with_calls(reason, found)
        out.append((text, reason, lp, calls))
    if moderate_output:
        verdicts = await _moderate(state, whole, "assistant")
        out = [(refusal_message(v), "content_filter", None, None) if v.flagged else choice
               for v, choice in zip(verdicts, out, strict=True)]
    if echoed:
        out = [(echoed[k] + text, reason, lp, calls)
               for k, (text, reason, lp, calls) in enumerate(out)]
    return reply(envelope, body, out, responses.usage(prompt_tokens, completion_tokens))


async def _moderate(state: ServerState, texts: list[str], role: Role) -> list[ModerationResult]:
    """Self-moderation of `texts`, off the event loop; its prompts are scored by the engine,
    scheduled with the generations."""
    ready(state)
    moderator = state.moderator
    assert moderator is not None

    def run() -> list[ModerationResult]:
        real = [t for t in texts if t.strip()]       # an empty answer is acceptable as is
        judged = iter(moderator.classify(real, role) if real else [])
        return [next(judged) if t.strip() else _empty_verdict(role) for t in texts]

    return await asyncio.to_thread(run)


def _empty_verdict(role: Role) -> ModerationResult:
    return ModerationResult("", role, "acceptable", False,
                            {label: float(label == "acceptable") for label in LABELS}, {})


