"""One Tokenizer interface over mistral-common (tokenizer.model.v*, tekken.json) and Hugging Face
`tokenizers` (tokenizer.json), plus the stand-in used when a checkpoint ships none."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Protocol

from mistral7b.errors import InvalidArgumentError, TokenizerError
from mistral7b.text import clean_text

Message = dict[str, Any]

# Looked for next to the weights, first match wins. Mistral's own formats come first: mistral-common
# is the reference for their chat encodings.
MISTRAL_TOKENIZER_FILES = ("tekken.json", "tokenizer.model.v3", "tokenizer.model.v2",
                           "tokenizer.model.v1")
HF_TOKENIZER_FILE = "tokenizer.json"


class Tokenizer(Protocol):
    name: str
    vocab_size: int
    bos_id: int | None
    eos_ids: frozenset[int]

    def encode(self, text: str, bos: bool = True, eos: bool = False) -> list[int]: ...
    def decode(self, ids: Sequence[int]) -> str: ...
    def encode_chat(self, messages: Sequence[Message],
                    tools: Sequence[dict[str, Any]] | None = None) -> list[int]: ...


# OpenAI's newer clients send the system prompt with role "developer".
ROLE_ALIASES = {"developer": "system"}


def normalize_messages(messages: Sequence[Message]) -> list[Message]:
    """The OpenAI-style shape every chat format needs, checked (roles order is checked by the
    format), with role aliases resolved and text cleaned of lone surrogates (text.py).

    Tool calling (tools.py) adds two shapes: an assistant message may carry `tool_calls`
    (OpenAI's [{"id", "type": "function", "function": {"name", "arguments"}}]; its content may
    then be null), normalized to [{"id", "name", "arguments"}] with arguments as JSON text; and
    a {"role": "tool", "tool_call_id", "content"} message holds a call's result."""
    if not messages:
        raise InvalidArgumentError("messages: the conversation is empty")
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or "role" not in m or (
                "content" not in m and not m.get("tool_calls")):
            raise InvalidArgumentError(f"messages[{i}]: expected an object with `role` and "
                                       "`content`")
        role = ROLE_ALIASES.get(m["role"], m["role"])
        if role not in ("system", "user", "assistant", "tool"):
            raise InvalidArgumentError(f"messages[{i}].role: unknown role {m['role']!r}; "
                                       "expected system (or developer), user, assistant or tool")
        content = m.get("content")
        if content is None and role == "assistant" and m.get("tool_calls"):
            content = ""
        if not isinstance(content, str):
            raise InvalidArgumentError(f"messages[{i}].content: expected a string")
        message: Message = {**m, "role": role, "content": clean_text(content)}
        if role == "tool" and not isinstance(m.get("tool_call_id"), str):
            raise InvalidArgumentError(f"messages[{i}].tool_call_id: a tool message needs the "
                                       "id of the call it answers")
        if m.get("tool_calls") is not None:
            if role != "assistant":
                raise InvalidArgumentError(f"messages[{i}].tool_calls: only assistant messages "
                                           "make tool calls")
            message["tool_calls"] = _tool_calls(m["tool_calls"], f"messages[{i}].tool_calls")
        out.append(message)
    return out


def _tool_calls(calls: Any, where: str) -> list[dict[str, str]]:
    """OpenAI's tool_calls (or ours, already flat) as [{"id", "name", "arguments"}]."""
    if not isinstance(calls, list):
        raise InvalidArgumentError(f"{where}: expected a list of calls")
    out = []
    for j, call in enumerate(calls):
        flat = call.get("function", call) if isinstance(call, dict) else None
        if not isinstance(flat, dict) or not isinstance(flat.get("name"), str):
            raise InvalidArgumentError(f"{where}[{j}]: expected {{\"id\", \"function\": "
                                       "{\"name\", \"arguments\"}}")
        arguments = flat.get("arguments", "{}")
        if not isinstance(arguments, str):
            arguments = json.dumps(arguments)
        try:
            json.loads(arguments or "{}")
        except ValueError:
            raise InvalidArgumentError(f"{where}[{j}].function.arguments: not valid "
                                       "JSON") from None
        call_id = call.get("id") if isinstance(call, dict) else None
        out.append({"id": call_id if isinstance(call_id, str) else f"call{j}",
                    "name": flat["name"], "arguments": arguments})
    return out


class MistralCommonTokenizer:
    """Mistral's tokenizers and chat encodings, through the `mistral-common` package."""

    def __init__(self, path: Path) -> None:
        from mistral_common.tokens.tokenizers.mistral import MistralTokenizer

        try:
            self._mistral = MistralTokenizer.from_file(str(path))
        except Exception as e:  # mistral-common raises assorted types for unreadable files
            raise TokenizerError(f"{path}: cannot load tokenizer ({e})") from None
        self._raw = self._mistral.instruct_tokenizer.tokenizer
        self.name = f"mistral-common {path.name}"
        self.vocab_size = int(self._raw.n_words)
        self.bos_id: int | None = int(self._raw.bos_id)
        self.eos_ids = frozenset({int(self._raw.eos_id)})

    def encode(self, text: str, bos: bool = True, eos: bool = False) -> list[int]:
        return list(self._raw.encode(clean_text(text), bos=bos, eos=eos))

    def decode(self, ids: Sequence[int]) -> str:
        return str(self._raw.decode(list(ids)))

    def encode_chat(self, messages: Sequence[Message],
                    tools: Sequence[dict[str, Any]] | None = None) -> list[int]:
        """Tokens of a conversation ending with a user turn (or a tool result), ready for the
        assistant's answer; `tools` (tools.check_tools' shape) in [AVAILABLE_TOOLS].

        For v1 (Mistral 7B v0.1), which has no system role, mistral-common prepends the system
        prompt to the first user message with a blank line, as the paper's format does. v1 has
        no tools either: they and any calls and results are written as text
        (tools.generic_messages).
        """
        from mistral_common.protocol.instruct.messages import (
            AssistantMessage,
            SystemMessage,
            ToolMessage,
            UserMessage,
        )
        from mistral_common.protocol.instruct.request import ChatCompletionRequest
        from mistral_common.protocol.instruct.tool_calls import (
            Function,
            FunctionCall,
            Tool,
            ToolCall,
        )

        from mistral7b.tools import generic_messages, mistral_call_id

        messages = normalize_messages(messages)
        if str(self._raw.version).lower().endswith("v1"):
            if tools or any(m["role"] == "tool" or m.get("tool_calls") for m in messages):
                messages = generic_messages(messages, tools)
                tools = None
            # mistral-common's v1 encoder joins two user turns in a row and accepts roles out
            # of order; the v1 format does not allow them, and our GGUF v1 encoder refuses them.
            from mistral7b.chat import split_instruct_turns

            split_instruct_turns(messages)

        def convert(m: Message) -> Any:
            if m["role"] == "tool":
                return ToolMessage(content=m["content"],
                                   tool_call_id=mistral_call_id(m["tool_call_id"]))
            if m["role"] == "assistant" and m.get("tool_calls"):
                return AssistantMessage(content=m["content"] or None, tool_calls=[
                    ToolCall(id=mistral_call_id(c["id"]),
                             function=FunctionCall(name=c["name"], arguments=c["arguments"]))
                    for c in m["tool_calls"]])
            kinds: dict[str, Any] = {"system": SystemMessage, "user": UserMessage,
                                     "assistant": AssistantMessage}
            return kinds[m["role"]](content=m["content"])

        request = ChatCompletionRequest(
            messages=[convert(m) for m in messages],
            tools=[Tool(function=Function(**t["function"])) for t in tools] if tools else None)
        try:
            return list(self._mistral.encode_chat_completion(request).tokens)
        except Exception as e:  # mistral-common's validation errors for roles out of order
            raise InvalidArgumentError(f"messages: this conversation cannot be encoded in "
                                       f"Mistral's chat format: {e}") from None


class BackendTokenizer:
    """A Hugging Face `tokenizers.Tokenizer` (built from tokenizer.json or from GGUF metadata) with
    its checkpoint's BOS/EOS rules and chat format.

    `encode(text, bos=True)` adds BOS only when the checkpoint asks for it (`add_bos`), and
    `eos=True` adds EOS only when `add_eos`. Chat: Mistral's v1 instruct format when
    `mistral_v1_chat` (a Mistral 7B GGUF), else the checkpoint's Jinja chat template.
    """

    def __init__(self, *, name: str, backend: Any, vocab_size: int, bos_id: int | None,
                 eos_id: int | None, eos_ids: frozenset[int], add_bos: bool, add_eos: bool,
                 bos_token: str | None, eos_token: str | None, chat_template: str | None,
                 mistral_v1_chat: bool = False) -> None:
        self.name = name
        self.vocab_size = vocab_size
        self.bos_id = bos_id
        self.eos_ids = eos_ids
        self.add_bos = add_bos
        self.add_eos = add_eos
        self.bos_token = bos_token
        self.eos_token = eos_token
        self.chat_template = chat_template
        self.mistral_v1_chat = mistral_v1_chat
        self._eos_id = eos_id
        self._tok = backend

    @property
    def backend(self) -> Any:
        """The underlying `tokenizers.Tokenizer`."""
        return self._tok

    def encode(self, text: str, bos: bool = True, eos: bool = False) -> list[int]:
        ids = list(self._tok.encode(clean_text(text), add_special_tokens=False).ids)
        if bos and self.add_bos and self.bos_id is not None:
            ids.insert(0, self.bos_id)
        if eos and self.add_eos and self._eos_id is not None:
            ids.append(self._eos_id)
        return ids

    def decode(self, ids: Sequence[int]) -> str:
        return str(self._tok.decode(list(ids), skip_special_tokens=True))

    def encode_chat(self, messages: Sequence[Message],
                    tools: Sequence[dict[str, Any]] | None = None) -> list[int]:
        """The conversation in the checkpoint's chat format. A template that reads `tools`
        gets them (and calls and results in Hugging Face's message shape); other formats get
        them as text (tools.generic_messages)."""
        from mistral7b.chat import encode_mistral_v1_chat, render_chat_template
        from mistral7b.tools import generic_messages, tool_format

        messages = normalize_messages(messages)
        with_tools = bool(tools) or any(m["role"] == "tool" or m.get("tool_calls")
                                        for m in messages)
        if with_tools and tool_format(self) == "jinja" and self.chat_template is not None:
            text = render_chat_template(self.chat_template, messages,
                                        bos_token=self.bos_token, eos_token=self.eos_token,
                                        add_generation_prompt=True, tools=list(tools or []) or None)
            return self.encode(text, bos=False)
        if with_tools:
            messages = generic_messages(messages, tools)
        if self.mistral_v1_chat and self.bos_id is not None and self._eos_id is not None:
            return encode_mistral_v1_chat(messages, lambda text: self.encode(text, bos=False),
                                          self.bos_id, self._eos_id)
        if self.chat_template is None:
            raise TokenizerError(f"{self.name}: the checkpoint has no chat template; use "
                                 "generate() with a formatted prompt")
        text = render_chat_template(self.chat_template, messages, bos_token=self.bos_token,
                                    eos_token=self.eos_token, add_generation_prompt=True)
        # The template writes special tokens (BOS included) as text; encode adds none.
        return self.encode(text, bos=False)


def hf_tokenizer(directory: Path) -> BackendTokenizer:
    """`tokenizer.json`, with BOS/EOS from `tokenizer_config.json`, `config.json` and
    `generation_config.json`, and the chat template from `chat_template.jinja` or
    `tokenizer_config.json`."""
    import json

    from tokenizers import Tokenizer as HFRawTokenizer

    from mistral7b.chat import find_chat_template

    path = directory / HF_TOKENIZER_FILE
    try:
        backend = HFRawTokenizer.from_file(str(path))
    except Exception as e:  # tokenizers raises a bare Exception for bad files
        raise TokenizerError(f"{path}: cannot load tokenizer ({e})") from None
    settings: dict[str, Any] = {}
    for name in ("config.json", "generation_config.json", "tokenizer_config.json"):
        try:
            settings.update(json.loads((directory / name).read_text(encoding="utf-8")))
        except (OSError, ValueError):
            continue

    def token_text(value: Any) -> str | None:
        return value.get("content") if isinstance(value, dict) else value

    bos_token, eos_token = token_text(settings.get("bos_token")), token_text(
        settings.get("eos_token"))
    bos_id = backend.token_to_id(bos_token) if bos_token else settings.get("bos_token_id")
    eos_id = backend.token_to_id(eos_token) if eos_token else None
    configured = settings.get("eos_token_id")
    eos_ids = set(configured if isinstance(configured, list) else
                  [configured] if configured is not None else [])
    if eos_id is not None:
        eos_ids.add(eos_id)
    if eos_id is None and eos_ids:
        eos_id = min(eos_ids)
    return BackendTokenizer(
        name=f"tokenizers {path.name}", backend=backend,
        vocab_size=backend.get_vocab_size(with_added_tokens=True),
        bos_id=bos_id, eos_id=eos_id, eos_ids=frozenset(int(i) for i in eos_ids),
        add_bos=_adds_bos(backend, bos_id, settings.get("add_bos_token")),
        add_eos=bool(settings.get("add_eos_token", False)),
        bos_token=bos_token, eos_token=eos_token, chat_template=find_chat_template(directory))


def _adds_bos(backend: Any, bos_id: int | None, configured: Any) -> bool:
    """Whether a text starts with BOS: `add_bos_token` when the config says, else what the
    tokenizer.json's own post-processor does (as transformers decides)."""
    if bos_id is None:
        return False
    if configured is not None:
        return bool(configured)
    return list(backend.encode("a", add_special_tokens=True).ids[:1]) == [bos_id]


class MissingTokenizer:
    """Stands in for a checkpoint without a tokenizer: token ids work, text does not."""

    def __init__(self, directory: Path, vocab_size: int) -> None:
        self._why = (f"{directory} has no tokenizer (looked for "
                     f"{', '.join((*MISTRAL_TOKENIZER_FILES, HF_TOKENIZER_FILE))}); "
                     "pass token ids instead of text, or add a tokenizer file")
        self.name = "none"
        self.vocab_size = vocab_size
        self.bos_id: int | None = None
        self.eos_ids: frozenset[int] = frozenset()

    def encode(self, text: str, bos: bool = True, eos: bool = False) -> list[int]:
        raise TokenizerError(self._why)

    def decode(self, ids: Sequence[int]) -> str:
        raise TokenizerError(self._why)

    def encode_chat(self, messages: Sequence[Message],
                    tools: Sequence[dict[str, Any]] | None = None) -> list[int]:
        raise TokenizerError(self._why)


def find_tokenizer(directory: Path, vocab_size: int) -> Tokenizer:
    for name in MISTRAL_TOKENIZER_FILES:
        if (directory / name).is_file():
            return MistralCommonTokenizer(directory / name)
    if (directory / HF_TOKENIZER_FILE).is_file():
        return hf_tokenizer(directory)
    return MissingTokenizer(directory, vocab_size)
