"""Chat formats: Hugging Face Jinja chat templates (rendered in a sandbox, since a template is
untrusted input) and Mistral 7B v0.1's instruct format for tokenizers that are not mistral-common's.
"""

from __future__ import annotations

import functools
import json
import re
from collections.abc import Callable, Sequence
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from mistral7b.errors import InvalidArgumentError, TokenizerError
from mistral7b.tokenizer import Message, normalize_messages

if TYPE_CHECKING:
    import jinja2

CHAT_TEMPLATE_FILE = "chat_template.jinja"
TOKENIZER_CONFIG_FILE = "tokenizer_config.json"

# Jinja releases before 3.1.6 have known sandbox escapes (CVE-2024-56201, CVE-2024-56326,
# CVE-2025-27516); a chat template from a downloaded checkpoint is untrusted code.
_MIN_JINJA = (3, 1, 6)


# --- Jinja chat templates ---------------------------------------------------------------------

def _hf_message(m: Message) -> Message:
    """A copy of a message as Hugging Face chat templates read it: calls with `function` and
    their arguments as an object."""
    if not m.get("tool_calls"):
        return dict(m)
    calls = [{"id": c["id"], "type": "function",
              "function": {"name": c["name"], "arguments": json.loads(c["arguments"] or "{}")}}
             for c in m["tool_calls"]]
    return {**m, "tool_calls": calls}


def render_chat_template(template: str, messages: Sequence[Message], *, bos_token: str | None,
                         eos_token: str | None, add_generation_prompt: bool = True,
                         **extra: Any) -> str:
    """The text a Hugging Face chat template makes of `messages`, rendered as transformers does.

    The template sees `messages`, `bos_token`, `eos_token` (undefined when None),
    `add_generation_prompt`, and `extra` (`tools` and `documents` are None unless given, as in
    transformers, so that templates testing `tools is not none` behave the same). Tool calls
    in the messages are in Hugging Face's shape: `function` with `name` and `arguments` as an
    object.

    Raises InvalidArgumentError when the template rejects the conversation with
    `raise_exception`, TokenizerError when the template itself is broken or reaches for Python
    internals.
    """
    messages = normalize_messages(messages)
    compiled = _compile(template)  # first: says so if jinja2 is missing
    from jinja2.exceptions import SecurityError, TemplateError

    context: dict[str, Any] = {"tools": None, "documents": None, **extra}
    context["messages"] = [_hf_message(m) for m in messages]  # copies: the caller's dicts
    #                                                           stay out of reach
    context["add_generation_prompt"] = add_generation_prompt
    # A token the tokenizer does not have stays undefined (renders as ""), as in transformers,
    # rather than rendering as "None".
    for name, token in (("bos_token", bos_token), ("eos_token", eos_token)):
        if token is not None:
            context[name] = token
    try:
        return compiled.render(**context)
    except _TemplateRejected as e:
        raise InvalidArgumentError("messages: the model's chat template rejected this "
                                   f"conversation: {e.message}") from None
    except SecurityError as e:
        raise TokenizerError("the chat template tried to access Python internals and was "
                             f"refused ({e}); the template is unsafe, use another one") from None
    except TemplateError as e:
        raise TokenizerError(f"the chat template failed: {e}") from None
    except (ArithmeticError, LookupError, TypeError, ValueError, RecursionError) as e:
        # The template's own bugs (a missing key, `1 / 0`, adding a string to a number, ...)
        raise TokenizerError(f"the chat template failed: {type(e).__name__}: {e}") from None


class _TemplateRejected(Exception):
    """Raised by a template's `raise_exception(msg)`: the conversation, not the template, is wrong.

    Not a jinja2 TemplateError, so that it cannot be mistaken for the template's own failures.
    """

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


def _raise_exception(message: Any) -> None:
    raise _TemplateRejected(str(message))


def _tojson(value: Any, ensure_ascii: bool = False, indent: int | str | None = None,
            separators: tuple[str, str] | None = None, sort_keys: bool = False) -> str:
    # Unlike Jinja's own `tojson`, no HTML escaping (a prompt is not HTML) and non-ASCII is kept.
    try:
        return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators,
                          sort_keys=sort_keys)
    except (TypeError, ValueError) as e:
        raise TokenizerError(f"the chat template failed: tojson: {e}") from None


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


def _jinja_version(text: str) -> tuple[int, ...]:
    match = re.match(r"(\d+)\.(\d+)(?:\.(\d+))?", text)
    return tuple(int(g or 0) for g in match.groups()) if match else (0,)


@functools.lru_cache(maxsize=1)
def _environment() -> jinja2.sandbox.ImmutableSandboxedEnvironment:
    try:
        import jinja2
        import jinja2.ext
        import jinja2.sandbox
    except ImportError:
        raise TokenizerError("chat templates need the jinja2 package: pip install "
                             "'jinja2>=3.1.6'") from None
    if _jinja_version(jinja2.__version__) < _MIN_JINJA:
        raise TokenizerError(f"jinja2 {jinja2.__version__} has known sandbox escapes and cannot "
                             "render untrusted chat templates: pip install -U 'jinja2>=3.1.6'")

    class RefusingUndefined(jinja2.Undefined):
        """Jinja's lenient Undefined, except for what the sandbox refused: `{{ x.__class__ }}`
        would otherwise print nothing and carry on; here any use of it is an error."""

        __slots__ = ()

        def _refuse(self) -> None:
            if self._undefined_exception is jinja2.exceptions.SecurityError:
                self._fail_with_undefined_error()

        def __str__(self) -> str:
            self._refuse()
            return super().__str__()

        def __iter__(self) -> Any:
            self._refuse()
            return super().__iter__()

        def __bool__(self) -> bool:
            self._refuse()
            return super().__bool__()

        def __len__(self) -> int:
            self._refuse()
            return super().__len__()

        def __eq__(self, other: object) -> bool:
            self._refuse()
            return super().__eq__(other)

        def __ne__(self, other: object) -> bool:
            self._refuse()
            return super().__ne__(other)

        def __hash__(self) -> int:
            self._refuse()
            return super().__hash__()

    env = jinja2.sandbox.ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols],
        undefined=RefusingUndefined)
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    return env


@functools.lru_cache(maxsize=32)
def _compile(template: str) -> jinja2.Template:
    if not isinstance(template, str):
        raise TokenizerError(f"chat template: expected a string, got {type(template).__name__}")
    env = _environment()
    from jinja2.exceptions import TemplateSyntaxError

    try:
        return env.from_string(template)
    except TemplateSyntaxError as e:
        raise TokenizerError(f"chat template: syntax error on line {e.lineno}: {e.message}") \
            from None


def find_chat_template(directory: Path) -> str | None:
    """The chat template shipped with a checkpoint, or None when there is none.

    `chat_template.jinja` (what recent transformers saves) comes first, as in transformers; then
    `tokenizer_config.json`'s `chat_template`, a string or a list of `{"name", "template"}` (the
    one named "default" is used).
    """
    jinja_path = directory / CHAT_TEMPLATE_FILE
    if jinja_path.is_file():
        try:
            return jinja_path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as e:
            raise TokenizerError(f"{jinja_path}: cannot read the chat template ({e})") from None
    config_path = directory / TOKENIZER_CONFIG_FILE
    if not config_path.is_file():
        return None
    try:
        config = json.loads(config_path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError) as e:
        raise TokenizerError(f"{config_path}: cannot read the file ({e})") from None
    except ValueError as e:
        raise TokenizerError(f"{config_path}: not valid JSON ({e}); fix or remove the file") \
            from None
    if not isinstance(config, dict):
        raise TokenizerError(f"{config_path}: expected a JSON object, got "
                             f"{type(config).__name__}")
    template = config.get("chat_template")
    if template is None or isinstance(template, str):
        return template
    if isinstance(template, list):
        names = []
        for entry in template:
            if not (isinstance(entry, dict) and isinstance(entry.get("name"), str)
                    and isinstance(entry.get("template"), str)):
                raise TokenizerError(f"{config_path}: chat_template: expected a list of "
                                     '{"name": ..., "template": ...} objects')
            if entry["name"] == "default":
                return str(entry["template"])
            names.append(entry["name"])
        raise TokenizerError(f"{config_path}: chat_template has templates named "
                             f"{', '.join(names) or '(none)'} but none named 'default'")
    raise TokenizerError(f"{config_path}: chat_template: expected a string or a list of "
                         f"templates, got {type(template).__name__}")


# --- Mistral 7B v0.1 instruct format ----------------------------------------------------------

def split_instruct_turns(messages: Sequence[Message]) -> tuple[str | None, list[Message]]:
    """The rules of Mistral's v1 instruct format: an optional system message first, then turns
    alternating user/assistant, starting and ending with user. Returns (system, turns); a
    conversation breaking a rule is an InvalidArgumentError naming the message."""
    messages = normalize_messages(messages)
    system: str | None = None
    turns = list(messages)
    if turns[0]["role"] == "system":
        system = turns.pop(0)["content"]
    offset = len(messages) - len(turns)
    for j, m in enumerate(turns):
        if m["role"] == "system":
            raise InvalidArgumentError(f"messages[{j + offset}]: a system message must be the "
                                       "first message of the conversation")
        expected = "user" if j % 2 == 0 else "assistant"
        if m["role"] != expected:
            raise InvalidArgumentError(
                f"messages[{j + offset}].role: expected {expected}, got {m['role']}; roles must "
                "alternate user/assistant, starting with user")
    if not turns:
        raise InvalidArgumentError("messages: the conversation has no user message")
    if turns[-1]["role"] != "user":
        raise InvalidArgumentError(f"messages[{len(messages) - 1}].role: the conversation must "
                                   "end with a user message, for the assistant to answer")
    return system, turns


def encode_mistral_v1_chat(messages: Sequence[Message], encode: Callable[[str], list[int]],
                           bos_id: int, eos_id: int) -> list[int]:
    """`<s>[INST] {user} [/INST]{assistant}</s>[INST] {user} [/INST]`, token for token as
    mistral-common's v1 instruct tokenizer makes it, for other SentencePiece vocabularies.

    `encode(text)` is a plain SentencePiece encode (dummy prefix on, no BOS/EOS). Each user turn is
    `encode("[INST] " + content + " [/INST]")`, each assistant turn `encode(content) + [eos_id]`.
    v1 has no system role: a system message (first only) is prepended to the first user message
    with a blank line, as mistral-common does (and skipped when empty, as it does too).
    """
    system, turns = split_instruct_turns(messages)
    tokens = [bos_id]
    if turns[0]["role"] == "system":
        system = turns.pop(0)["content"]
    tokens = [bos_id]
    for j, m in enumerate(turns):
        if m["role"] == "user":
            content = m["content"]
            if j == 0 and system:
                content = f"{system}\n\n{content}"
            tokens += encode(f"[INST] {content} [/INST]")
        else:
            tokens += encode(m["content"])
            tokens.append(eos_id)
    return tokens
