"""OpenAI's response shapes, built from engine outputs. Nothing here touches HTTP or the engine:
routes hand in finished texts, pieces and token counts."""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from typing import Any

from mistral7b.generate import PromptToken, StreamPiece
from mistral7b.tools import ToolCall

TokenText = Callable[[int], str]


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


def error_body(message: str, kind: str = "invalid_request_error", param: str | None = None,
               code: str | None = None) -> dict[str, Any]:
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def _tokens(pieces: Sequence[StreamPiece]
            ) -> Iterator[tuple[int, float, list[tuple[int, float]]]]:
    """(token id, its logprob, the top alternatives) of every generated token."""
    for piece in pieces:
        for i, (token_id, logprob) in enumerate(zip(piece.token_ids, piece.logprobs,
                                                    strict=False)):
            yield token_id, logprob, piece.top_logprobs[i] if i < len(piece.top_logprobs) else []


def chat_logprobs(pieces: Sequence[StreamPiece], token_text: TokenText) -> dict[str, Any]:
    """Chat API logprobs: {"content": [{token, logprob, bytes, top_logprobs: [...]}, ...]}."""
    def entry(token_id: int, logprob: float) -> dict[str, Any]:
        text = token_text(token_id)
        return {"token": text, "logprob": logprob, "bytes": list(text.encode())}

    return {"content": [entry(token_id, logprob) | {"top_logprobs": [entry(t, lp)
                                                                     for t, lp in tops]}
                        for token_id, logprob, tops in _tokens(pieces)]}


def completion_logprobs(pieces: Sequence[StreamPiece], token_text: TokenText,
                        text_offset: int = 0, prompt: Sequence[PromptToken] = ()
                        ) -> dict[str, Any]:
    """Legacy completions logprobs: parallel lists of tokens, their logprobs, the top
    alternatives as {token: logprob} and each token's offset in the text. `prompt` (echo):
    the prompt's tokens go first; the first has no logprob and no alternatives (null)."""
    tokens: list[str] = []
    token_logprobs: list[float | None] = []
    top: list[dict[str, float] | None] = []
    offsets: list[int] = []
    offset = text_offset
    scored = [(t.token_id, t.logprob, t.top) for t in prompt]
    for i, (token_id, logprob, tops) in enumerate([*scored, *_tokens(pieces)]):
        text = token_text(token_id)
        tokens.append(text)
        token_logprobs.append(logprob)
        top.append(None if i == 0 and scored else {token_text(t): lp for t, lp in tops})
        offsets.append(offset)
        offset += len(text)
    return {"tokens": tokens, "token_logprobs": token_logprobs, "top_logprobs": top,
            "text_offset": offsets}


class Envelope:
    """The fields every response and chunk of one request shares."""

    def __init__(self, kind: str, model: str) -> None:
        self.kind = kind                                   # "chat" | "text"
        self.id = new_id("chatcmpl" if kind == "chat" else "cmpl")
        self.created = int(time.time())
        self.model = model

    def response(self, choices: list[dict[str, Any]], usage_: dict[str, int]) -> dict[str, Any]:
        return {"id": self.id, "object": "chat.completion" if self.kind == "chat"
                else "text_completion", "created": self.created, "model": self.model,
                "choices": choices, "usage": usage_, "system_fingerprint": None}

    def chunk(self, choices: list[dict[str, Any]], usage_: dict[str, int] | None = None
              ) -> dict[str, Any]:
        body: dict[str, Any] = {
            "id": self.id, "object": "chat.completion.chunk" if self.kind == "chat"
            else "text_completion", "created": self.created, "model": self.model,
            "choices": choices, "system_fingerprint": None}
        if usage_ is not None:
            body["usage"] = usage_
        return body

    def choice(self, index: int, text: str, finish_reason: str | None,
               logprobs: dict[str, Any] | None, *, delta: bool = False,
               role: bool = False, tool_calls: list[dict[str, Any]] | None = None
               ) -> dict[str, Any]:
        """One choice: a whole message, or (delta=True) the piece a stream chunk adds. An
        answer with tool calls has them beside its text (content null when there is none, as
        OpenAI); a stream chunk carries either text or calls."""
        if self.kind == "text":
            return {"index": index, "text": text, "logprobs": logprobs,
                    "finish_reason": finish_reason}
        if delta:
            message: dict[str, Any] = {"role": "assistant"} if role else {}
            if tool_calls:
                message["tool_calls"] = [{"index": k, **c} for k, c in enumerate(tool_calls)]
            elif text or role:
                message["content"] = text
            return {"index": index, "delta": message, "logprobs": logprobs,
                    "finish_reason": finish_reason}
        whole: dict[str, Any] = {"role": "assistant",
                                 "content": (text or None) if tool_calls else text}
        if tool_calls:
            whole["tool_calls"] = tool_calls
        return {"index": index, "message": whole, "logprobs": logprobs,
                "finish_reason": finish_reason}


def tool_call(call: ToolCall) -> dict[str, Any]:
    """A call in OpenAI's shape."""
    return {"id": call.id, "type": "function",
            "function": {"name": call.name, "arguments": call.arguments}}
