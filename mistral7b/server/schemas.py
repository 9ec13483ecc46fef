"""Request bodies of the OpenAI-compatible API, validated by pydantic (strict types: a string
where a number belongs is an error, not a guess). Responses are plain dicts built in
responses.py, in OpenAI's shapes."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from annotated_types import Interval
from pydantic import BaseModel, ConfigDict, Field, model_validator

from mistral7b.sampling import RANGES


def limits(name: str) -> Interval:
    """The range sampling.RANGES gives `name`, as a constraint pydantic checks."""
    return Interval(**RANGES[name].bounds())

MAX_N = 16
MAX_CHOICES = 64      # prompts x n in one /v1/completions request


class _Body(BaseModel):
    # Unknown fields are ignored, as OpenAI-compatible servers do for fields of newer API
    # versions; known ones are checked strictly. A field sent as null means "not set" (several
    # clients send every field, null when unset): it takes its default.
    model_config = ConfigDict(strict=True, extra="ignore")

    @model_validator(mode="before")
    @classmethod
    def _null_means_unset(cls, data: Any) -> Any:
        if isinstance(data, dict):
            return {k: v for k, v in data.items() if v is not None}
        return data


class TextPart(_Body):
    type: Literal["text"]
    text: str


class FunctionCall(_Body):
    name: str
    arguments: str                      # JSON text, as OpenAI sends it


class ToolCall(_Body):
    id: str
    type: Literal["function"] = "function"
    function: FunctionCall


class ChatMessage(_Body):
    # "developer" is how OpenAI's newer clients send the system prompt; it is the system role.
    role: Literal["system", "developer", "user", "assistant", "tool"]
    # null (or absent) only in an assistant message: OpenAI allows it there, e.g. next to
    # tool calls; it reads as an empty answer. The routes refuse it elsewhere (as_messages).
    content: str | list[TextPart] | None = None
    name: str | None = None
    tool_calls: list[ToolCall] | None = None    # an assistant's calls (tools.py)
    tool_call_id: str | None = None             # a tool message: the call it answers

    def text(self) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "".join(part.text for part in self.content)

    def as_message(self) -> dict[str, Any]:
        # "developer" stays as sent: the tokenizers resolve role aliases (tokenizer.ROLE_ALIASES)
        message: dict[str, Any] = {"role": self.role, "content": self.text()}
        if self.tool_calls:
            message["tool_calls"] = [c.model_dump() for c in self.tool_calls]
        if self.tool_call_id is not None:
            message["tool_call_id"] = self.tool_call_id
        return message


def as_messages(messages: list[ChatMessage]) -> list[dict[str, Any]]:
    """The conversation as the tokenizers take it; ValueError naming the field of a non-assistant
    message without content."""
    for i, m in enumerate(messages):
        if m.content is None and m.role != "assistant":
            raise ValueError(f"messages[{i}].content: Field required (only assistant messages "
                             "may have no content)")
    return [m.as_message() for m in messages]


class StreamOptions(_Body):
    include_usage: bool = False


class SamplingFields(_Body):
    """Fields shared by /v1/chat/completions and /v1/completions."""

    model: str | None = None
    # Ranges from sampling.RANGES, the one table the API and the CLI use too.
    max_tokens: Annotated[int, limits("max_tokens")] | None = None
    temperature: Annotated[float, limits("temperature")] = 1.0
    top_p: Annotated[float, limits("top_p")] = 1.0
    top_k: Annotated[int, limits("top_k")] = 0             # 0 or -1: off (vLLM uses -1)
    min_p: Annotated[float, limits("min_p")] = 0.0
    stop: str | list[str] | None = None
    seed: int | None = None
    presence_penalty: Annotated[float, limits("presence_penalty")] = 0.0
    frequency_penalty: Annotated[float, limits("frequency_penalty")] = 0.0
    repetition_penalty: Annotated[float, limits("repetition_penalty")] = 1.0
    n: int = Field(1, ge=1, le=MAX_N)
    user: str | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    # Mistral's API field: put the paper's guardrail system prompt in front of the chat.
    safe_prompt: bool = False
    ignore_eos: bool = False
    # token id (a string, as JSON keys are) -> bias in [-100, 100] added to its logit
    logit_bias: dict[str, float] | None = None
    # {"type": "text" | "json_object" | "json_schema", "json_schema": {"name", "schema",
    # "strict"}}: checked and compiled by constrained.py (a bad schema is a 400 naming it)
    response_format: dict[str, Any] | None = None

    def token_limit(self) -> int | None:
        return self.max_tokens

    def stop_list(self) -> list[str]:
        stops = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        return stops

    def include_usage(self) -> bool:
        return self.stream_options is not None and self.stream_options.include_usage


class ChatCompletionRequest(SamplingFields):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: Annotated[int, limits("max_tokens")] | None = None
    logprobs: bool = False
    top_logprobs: Annotated[int, limits("top_logprobs")] | None = None
    # OpenAI's function tools and "auto" | "none" | "required" | {"type": "function",
    # "function": {"name": ...}}; checked by tools.check_tools / check_tool_choice.
    tools: list[dict[str, Any]] | None = None
    tool_choice: str | dict[str, Any] | None = None

    def token_limit(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None \
            else self.max_tokens


class CompletionRequest(SamplingFields):
    prompt: str | list[int] | list[str] | list[list[int]] = Field(min_length=1)
    # 0 as well: with echo, the prompt and its logprobs alone (how lm-eval scores); the route
    # refuses 0 without echo
    max_tokens: Annotated[int, Field(ge=0)] | None = None
    # legacy API: how many top tokens
    logprobs: Annotated[int, limits("top_logprobs")] | None = None
    echo: bool = False
    # Legacy fields we do not implement: refused by name (routes), never silently ignored.
    suffix: str | None = None
    best_of: int | None = None


class TokenizeRequest(_Body):
    model: str | None = None
    prompt: str | None = None
    messages: list[ChatMessage] | None = None
    add_special_tokens: bool = True


class DetokenizeRequest(_Body):
    model: str | None = None
    tokens: list[int]


class ModerationRequest(_Body):
    model: str | None = None
    input: str | list[str] = Field(min_length=1)
    role: Literal["user", "assistant"] = "user"   # ours: what the texts are
