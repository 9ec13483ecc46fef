"""Tool calling: OpenAI-style `tools` in the model's own chat format, the calls parsed out of its
answer, and tool_choice "required" or a named function enforced by a grammar (constrained.py).

How a format shows tools (`tool_format`):

    mistral   mistral-common tokenizers v2 and later (SentencePiece v2/v3/v7, tekken). The tools
              go in [AVAILABLE_TOOLS], the model answers `[TOOL_CALLS][{"name": ..., "arguments":
              {...}}, ...]`, results come back in [TOOL_RESULTS]; mistral-common renders all of
              it (the reference).
    jinja     a Hugging Face / GGUF chat template that reads a `tools` variable: the template
              renders them; calls are read from `<tool_call>{...}</tool_call>` blocks (the
              common Hermes/Qwen convention).
    generic   a format without tools (Mistral 7B v0.1's instruct format, templates that ignore
              `tools`). tool_choice "auto" (or "none") renders no tools and the model answers
              in text;
              "required" or a named function describes the tools in the system message and
              constrains the answer to a JSON array of calls, `[{"name": ..., "arguments":
              {...}}]`. Tool calls and results in the history are written as text.

With "required" or a named function the answer is constrained to valid calls in every format:
names from `tools` (or the one named) and arguments that follow each tool's JSON schema. With
"auto" the model chooses; "none" renders the tools but never constrains or parses calls.
"""

from __future__ import annotations

import hashlib
import json
import re
import secrets
import string
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any, Literal, TypeVar

from mistral7b.constrained import JSON_OPTIONS, ResponseFormat
from mistral7b.errors import InvalidArgumentError
from mistral7b.sampling import SamplingParams

Format = Literal["mistral", "jinja", "generic"]
_Reason = TypeVar("_Reason", str, str | None)
CALL_OPEN, CALL_CLOSE = "<tool_call>", "</tool_call>"      # a Jinja template's call blocks
_ID_CHARS = string.ascii_letters + string.digits


@dataclass
class ToolCall:
    """One call the model made: `arguments` is JSON text, as in OpenAI's API."""

    id: str
    name: str
    arguments: str


def new_call_id() -> str:
    """Nine letters and digits: the ids Mistral's formats require (and OpenAI clients accept)."""
    return "".join(secrets.choice(_ID_CHARS) for _ in range(9))


def mistral_call_id(call_id: str) -> str:
    """A client's call id (e.g. OpenAI's "call_..."), as the nine letters and digits Mistral's
    formats require; the same id always maps to the same one."""
    if re.fullmatch(r"[A-Za-z0-9]{9}", call_id):
        return call_id
    digest = hashlib.sha256(call_id.encode()).digest()
    return "".join(_ID_CHARS[b % len(_ID_CHARS)] for b in digest[:9])


# ---- checking what the caller sends -------------------------------------------------------


def check_tools(tools: Any) -> list[dict[str, Any]]:
    """OpenAI's `tools`: [{"type": "function", "function": {"name", "description"?,
    "parameters"?}}], checked; returned as that shape with `parameters` filled in."""
    if not isinstance(tools, list) or not tools:
        raise InvalidArgumentError("tools: expected a non-empty list of tools")
    out, names = [], set()
    for i, tool in enumerate(tools):
        function = tool.get("function") if isinstance(tool, dict) else None
        if not isinstance(tool, dict) or tool.get("type", "function") != "function" or \
                not isinstance(function, dict):
            raise InvalidArgumentError(f"tools[{i}]: expected {{\"type\": \"function\", "
                                       "\"function\": {\"name\": ...}}")
        name = function.get("name")
        if not isinstance(name, str) or not re.fullmatch(r"[A-Za-z0-9_.-]{1,64}", name):
            raise InvalidArgumentError(f"tools[{i}].function.name: expected 1-64 letters, "
                                       "digits, _ . or -")
        if name in names:
            raise InvalidArgumentError(f"tools[{i}].function.name: {name!r} is defined twice")
        names.add(name)
        parameters = function.get("parameters", {"type": "object", "properties": {}})
        if not isinstance(parameters, dict):
            raise InvalidArgumentError(f"tools[{i}].function.parameters: expected a JSON "
                                       "schema object")
        description = function.get("description", "")
        if not isinstance(description, str):
            raise InvalidArgumentError(f"tools[{i}].function.description: expected a string")
        out.append({"type": "function", "function": {"name": name, "description": description,
                                                     "parameters": parameters}})
    return out


def check_tool_choice(choice: Any, tools: Sequence[dict[str, Any]]) -> str:
    """"auto" (default), "none", "required", or the name of the one function to call (OpenAI's
    {"type": "function", "function": {"name": ...}})."""
    if choice is None:
        return "auto"
    if choice in ("auto", "none", "required"):
        return str(choice)
    function = choice.get("function") if isinstance(choice, dict) else None
    name = function.get("name") if isinstance(function, dict) else None
    if not isinstance(name, str):
        raise InvalidArgumentError("tool_choice: expected \"auto\", \"none\", \"required\" or "
                                   "{\"type\": \"function\", \"function\": {\"name\": ...}}")
    if name not in {t["function"]["name"] for t in tools}:
        raise InvalidArgumentError(f"tool_choice: no tool is named {name!r}")
    return name


# ---- formats ------------------------------------------------------------------------------


def tool_format(tokenizer: Any) -> Format:
    """How `tokenizer`'s chat format shows tools (see the module docstring)."""
    raw = getattr(tokenizer, "_raw", None)
    if raw is not None:                                   # mistral-common
        return "generic" if str(raw.version).lower().endswith("v1") else "mistral"
    template = getattr(tokenizer, "chat_template", None)
    if template and not getattr(tokenizer, "mistral_v1_chat", False) and "tools" in template:
        return "jinja"
    return "generic"


# Calls in one forced answer at most: a small model at temperature 0 otherwise repeats the same
# call until max_tokens (repeated identical calls are also dropped when parsed).
MAX_PARALLEL_CALLS = 4


def _named(choice: str) -> bool:
    return choice not in ("auto", "required", "none")


def call_schema(tools: Sequence[dict[str, Any]], choice: str) -> dict[str, Any]:
    """The JSON schema of one call, {"name": ..., "arguments": {...}}, to one of `tools` (only
    `choice` when it names one)."""
    allowed = [t["function"] for t in tools
               if not _named(choice) or t["function"]["name"] == choice]
    calls = [{"type": "object", "additionalProperties": False, "required": ["name", "arguments"],
              "properties": {"name": {"const": f["name"]}, "arguments": f["parameters"]}}
             for f in allowed]
    return calls[0] if len(calls) == 1 else {"anyOf": calls}


def calls_schema(tools: Sequence[dict[str, Any]], choice: str) -> dict[str, Any]:
    """The JSON schema of a non-empty array of calls to `tools`, at most MAX_PARALLEL_CALLS
    (only `choice` when it names one, and then exactly one call)."""
    return {"type": "array", "minItems": 1,
            "maxItems": 1 if _named(choice) else MAX_PARALLEL_CALLS,
            "items": call_schema(tools, choice)}


def tool_calls_token(tokenizer: Any) -> int:
    """The id of Mistral's [TOOL_CALLS] control token."""
    raw = tokenizer._raw
    return int(raw.get_special_token("[TOOL_CALLS]"))


def answer_format(tokenizer: Any, tools: Sequence[dict[str, Any]], choice: str
                  ) -> ResponseFormat | None:
    """The grammar that makes the answer valid calls in the format's own shape, for "required"
    or a named function: Mistral's `[TOOL_CALLS]` + a JSON array, a Jinja template's
    `<tool_call>` blocks, or (generic) a JSON array."""
    if choice in ("auto", "none"):
        return None
    kind = tool_format(tokenizer)
    if kind == "generic":
        return ResponseFormat.json_schema(calls_schema(tools, choice), origin="tools")
    # Lark's %json takes llguidance's options inside the schema: bounded whitespace, as in
    # JSON mode.
    if kind == "mistral":
        array = json.dumps({**calls_schema(tools, choice), "x-guidance": JSON_OPTIONS})
        return ResponseFormat.lark(f"start: <[{tool_calls_token(tokenizer)}]> calls\n"
                                   f"calls: %json {array}", origin="tools")
    one = json.dumps({**call_schema(tools, choice), "x-guidance": JSON_OPTIONS})
    opening, closing = json.dumps(CALL_OPEN + "\n"), json.dumps("\n" + CALL_CLOSE)
    newline = json.dumps("\n")
    more = "" if _named(choice) else f" ({newline} call){{0,{MAX_PARALLEL_CALLS - 1}}}"
    return ResponseFormat.lark(f"start: call{more}\ncall: {opening} %json {one} {closing}",
                               origin="tools")


def generic_messages(messages: Sequence[dict[str, Any]], tools: Sequence[dict[str, Any]] | None
                     ) -> list[dict[str, Any]]:
    """A conversation with tools as plain system/user/assistant text, for formats without
    tools: the tools (when given) in the system message with how to call them, calls as their
    JSON array, results as user messages."""
    out: list[dict[str, Any]] = []
    for m in messages:
        if m["role"] == "tool":
            text = f"Result of tool call {m['tool_call_id']}: {m['content']}"
            out.append({"role": "user", "content": text})
        elif m["role"] == "assistant" and m.get("tool_calls"):
            calls = [{"name": c["name"], "arguments": json.loads(c["arguments"] or "{}")}
                     for c in m["tool_calls"]]
            content = (m["content"] + "\n" if m["content"] else "") + json.dumps(calls)
            out.append({"role": "assistant", "content": content})
        else:
            out.append({"role": m["role"], "content": m["content"]})
    if tools:
        note = ("You can call these tools. To call them, answer with only a JSON array of "
                "calls, [{\"name\": ..., \"arguments\": {...}}]:\n"
                + "\n".join(json.dumps(t["function"]) for t in tools))
        if out and out[0]["role"] == "system":
            out[0] = {"role": "system", "content": f"{out[0]['content']}\n\n{note}"}
        else:
            out.insert(0, {"role": "system", "content": note})
    return out


@dataclass
class ToolPlan:
    """What a chat request with tools needs: the tools its prompt shows (None: none), and the
    sampling changes that enforce tool_choice."""

    tools: list[dict[str, Any]]
    choice: str
    shown: list[dict[str, Any]] | None
    grammar: ResponseFormat | None          # forced calls
    banned: int | None                      # a token the answer may not contain ("none")

    @property
    def parses_calls(self) -> bool:
        """Whether the answer may hold calls: the prompt showed the tools and tool_choice is
        not "none" (a generic format's "auto" shows none, so its answer is text)."""
        return self.shown is not None and self.choice != "none"

    def sampling(self, params: SamplingParams) -> SamplingParams:
        if self.grammar is not None:
            if params.response_format is not None:
                raise InvalidArgumentError("response_format: cannot be combined with a "
                                           "tool_choice that forces a call")
            return replace(params, response_format=self.grammar)
        if self.banned is not None:
            return replace(params, logit_bias=(*params.logit_bias, (self.banned, -100.0)))
        return params


def plan_tools(tokenizer: Any, tools: Any, tool_choice: Any) -> ToolPlan | None:
    """Check `tools` and `tool_choice` and decide how `tokenizer`'s format shows and enforces
    them (see the module docstring); None without tools (then tool_choice must be absent)."""
    if tools is None:
        if tool_choice is not None:
            raise InvalidArgumentError("tool_choice: needs tools")
        return None
    spec = check_tools(tools)
    choice = check_tool_choice(tool_choice, spec)
    kind = tool_format(tokenizer)
    shown = None if kind == "generic" and choice in ("auto", "none") else spec
    banned = tool_calls_token(tokenizer) if kind == "mistral" and choice == "none" else None
    return ToolPlan(spec, choice, shown, answer_format(tokenizer, spec, choice), banned)


# ---- reading the answer -------------------------------------------------------------------


def parse_calls(tokenizer: Any, token_ids: Sequence[int], text: str) -> list[ToolCall]:
    """The calls in an answer ([] when it is plain text, or its calls do not parse)."""
    kind = tool_format(tokenizer)
    if kind == "mistral":
        if not token_ids or token_ids[0] != tool_calls_token(tokenizer):
            return []
        return _calls_from_json(tokenizer.decode(list(token_ids[1:])))
    if kind == "jinja":
        backend = getattr(tokenizer, "backend", None)
        full = (backend.decode(list(token_ids), skip_special_tokens=False)
                if backend is not None else text)
        blocks = re.findall(rf"{CALL_OPEN}\s*(.*?)\s*{CALL_CLOSE}", full, flags=re.S)
        if blocks:
            return [c for block in blocks for c in _calls_from_json(block)]
    return _calls_from_json(text) if text.lstrip().startswith("[") else []


def _calls_from_json(text: str) -> list[ToolCall]:
    try:
        value = json.loads(text)
    except ValueError:
        return []
    items = value if isinstance(value, list) else [value]
    calls: list[ToolCall] = []
    for item in items:
        if not isinstance(item, dict) or not isinstance(item.get("name"), str):
            return []
        arguments = item.get("arguments", {})
        text = arguments if isinstance(arguments, str) else json.dumps(arguments)
        if not any(c.name == item["name"] and c.arguments == text for c in calls):
            calls.append(ToolCall(new_call_id(), item["name"], text))
    return calls


class CallStream:
    """An answer read piece by piece, split into the text to show now and the calls found when
    it ends, so that answers with tools stream token by token:

        forced calls ("required", named)   nothing is text: the calls come at the end
        Mistral's format, "auto"           the first token decides: [TOOL_CALLS] starts calls,
                                           anything else makes the answer text, shown as it comes
        a Jinja template, "auto"           text is shown until a `<tool_call>` block starts (the
                                           last few characters are held back while they could
                                           be its start); from there on the answer is calls
        no tools shown, or "none"          all text

    If what was held as calls does not parse (an answer cut by max_tokens), it is shown as
    text at the end."""

    def __init__(self, tokenizer: Any, plan: ToolPlan) -> None:
        self.tokenizer = tokenizer
        self.kind = tool_format(tokenizer)
        self.state = ("text" if not plan.parses_calls else
                      "calls" if plan.grammar is not None else "watch")
        self.ids: list[int] = []
        self.text = ""
        self.shown = 0                     # characters of self.text already handed out
        lookup = getattr(getattr(tokenizer, "backend", None), "token_to_id", None)
        self.opener_id: int | None = lookup(CALL_OPEN) if lookup is not None else None

    def feed(self, token_ids: Sequence[int], text: str) -> str:
        """Take one piece of the answer; the text to show now."""
        before = len(self.text)
        self.ids.extend(token_ids)
        self.text += text
        if self.state == "watch":
            if self.kind == "mistral" and self.ids:
                self.state = "calls" if self.ids[0] == tool_calls_token(self.tokenizer) \
                    else "text"
            elif self.kind == "jinja":
                return self._watch_for_blocks(token_ids, before)
        if self.state == "text":
            return self._show(len(self.text))
        return ""

    def _watch_for_blocks(self, token_ids: Sequence[int], before: int) -> str:
        if self.opener_id is not None and self.opener_id in token_ids:
            self.state = "calls"           # a special token, which decoded text leaves out
            return self._show(before)
        at = self.text.find(CALL_OPEN, self.shown)
        if at >= 0:
            self.state = "calls"
            return self._show(at)
        held = next((n for n in range(len(CALL_OPEN) - 1, 0, -1)
                     if self.text.endswith(CALL_OPEN[:n])), 0)
        return self._show(len(self.text) - held)

    def _show(self, end: int) -> str:
        out = self.text[self.shown:max(end, self.shown)]
        self.shown = max(end, self.shown)
        return out

    def finish(self) -> tuple[str, list[ToolCall]]:
        """At the end of the answer: the text still to show, and the calls."""
        calls = [] if self.state == "text" else parse_calls(self.tokenizer, self.ids,
                                                            self.text)
        return ("" if calls else self._show(len(self.text))), calls


def with_calls(finish_reason: _Reason, calls: Sequence[ToolCall]) -> _Reason:
    """An answer that ended on its own ("stop") with calls ends with "tool_calls", as in
    OpenAI's API; one cut by max_tokens stays "length"."""
    return "tool_calls" if calls and finish_reason == "stop" else finish_reason


def split_answer(tokenizer: Any, plan: ToolPlan, token_ids: Sequence[int], text: str
                 ) -> tuple[str, list[ToolCall]]:
    """A whole answer's text (what is not calls) and calls, as CallStream reads them."""
    stream = CallStream(tokenizer, plan)
    shown = stream.feed(token_ids, text)
    rest, calls = stream.finish()
    return shown + rest, calls
