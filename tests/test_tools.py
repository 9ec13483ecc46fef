"""Tool calling in the Python API (tools.py): conversations with tools encode as mistral-common
encodes them; forced calls are well-formed on every format, even from the 135M default model."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import jsonschema
import pytest

import mistral7b
from mistral7b.errors import InvalidArgumentError
from mistral7b.tokenizer import MistralCommonTokenizer
from mistral7b.tools import (
    CallStream,
    check_tools,
    mistral_call_id,
    plan_tools,
    tool_calls_token,
    tool_format,
)
from tests.conftest import make_hf_mistral, save_native

WEATHER = {"type": "object", "additionalProperties": False, "required": ["city"],
           "properties": {"city": {"type": "string", "maxLength": 30},
                          "unit": {"enum": ["C", "F"]}}}
ADD = {"type": "object", "additionalProperties": False, "required": ["a", "b"],
       "properties": {"a": {"type": "integer"}, "b": {"type": "integer"}}}
TOOLS = [{"type": "function", "function": {"name": "get_weather", "parameters": WEATHER,
                                           "description": "Current weather in a city"}},
         {"type": "function", "function": {"name": "add", "parameters": ADD,
                                           "description": "Add two integers"}}]
SCHEMAS = {"get_weather": WEATHER, "add": ADD}
ASK = [{"role": "user", "content": "What is the weather in Paris?"}]
CALLED = [*ASK,                                      # ... a call, and its result
          {"role": "assistant", "content": None, "tool_calls": [
              {"id": "call_1", "type": "function",
               "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}]},
          {"role": "tool", "tool_call_id": "call_1", "content": '{"temp": 21}'}]
# A ChatML template with tools in the Hermes/Qwen convention (<tool_call> blocks).
CHATML_TOOLS = (Path(__file__).parent / "data" / "chatml_tools.jinja").read_text()


def data_file(name: str) -> Path:
    import mistral_common

    return Path(os.path.dirname(mistral_common.__file__)) / "data" / name


@pytest.fixture(scope="module")
def llm() -> mistral7b.LLM:
    return mistral7b.load(progress=False)            # the default model: a generic format


@pytest.fixture(scope="module")
def mistral_v3(tmp_path_factory: pytest.TempPathFactory) -> mistral7b.LLM:
    """A tiny random model with Mistral's v3 tokenizer: the [TOOL_CALLS] format."""
    directory = save_native(make_hf_mistral(vocab=32768, seed=4),
                            tmp_path_factory.mktemp("native_v3"))
    shutil.copy(data_file("mistral_instruct_tokenizer_240323.model.v3"),
                directory / "tokenizer.model.v3")
    return mistral7b.load(directory, progress=False)


@pytest.fixture(scope="module")
def chatml() -> mistral7b.LLM:
    """The default model with a chat template that reads `tools`: the Jinja format."""
    model = mistral7b.load(progress=False)
    model.tokenizer.chat_template = CHATML_TOOLS  # type: ignore[attr-defined]
    return model


def assert_valid_calls(result: mistral7b.GenerationResult, names: set[str]) -> None:
    assert result.finish_reason == "tool_calls" and result.tool_calls, result
    for call in result.tool_calls:
        assert call.name in names and len(call.id) == 9
        jsonschema.validate(json.loads(call.arguments), SCHEMAS[call.name])


@pytest.mark.parametrize("name", ["mistral_instruct_tokenizer_240323.model.v3",
                                  "tekken_240911.json",
                                  "mistral_instruct_tokenizer_241114.model.v7"])
def test_a_conversation_with_tools_encodes_as_mistral_common_does(name: str) -> None:
    from mistral_common.protocol.instruct.messages import (
        AssistantMessage,
        ToolMessage,
        UserMessage,
    )
    from mistral_common.protocol.instruct.request import ChatCompletionRequest
    from mistral_common.protocol.instruct.tool_calls import Function, FunctionCall, Tool, ToolCall
    from mistral_common.tokens.tokenizers.mistral import MistralTokenizer

    ours = MistralCommonTokenizer(data_file(name))
    assert tool_format(ours) == "mistral"
    call_id = "call_0001"                     # OpenAI-style: mapped to Mistral's 9 characters
    messages = [*ASK,
                {"role": "assistant", "content": None, "tool_calls": [
                    {"id": call_id, "type": "function",
                     "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}]},
                {"role": "tool", "tool_call_id": call_id, "content": '{"temp": 21}'},
                {"role": "assistant", "content": "It is 21 degrees."},
                {"role": "user", "content": "And 2 + 3?"}]
    mapped = mistral_call_id(call_id)
    reference = MistralTokenizer.from_file(str(data_file(name))).encode_chat_completion(
        ChatCompletionRequest(
            tools=[Tool(function=Function(**t["function"])) for t in TOOLS],
            messages=[UserMessage(content=ASK[0]["content"]),
                      AssistantMessage(content=None, tool_calls=[ToolCall(
                          id=mapped, function=FunctionCall(name="get_weather",
                                                           arguments='{"city": "Paris"}'))]),
                      ToolMessage(content='{"temp": 21}', tool_call_id=mapped),
                      AssistantMessage(content="It is 21 degrees."),
                      UserMessage(content="And 2 + 3?")])).tokens
    assert ours.encode_chat(messages, TOOLS) == list(reference)


def test_required_calls_from_the_default_model_are_well_formed(llm: mistral7b.LLM) -> None:
    assert tool_format(llm.tokenizer) == "generic"
    for seed in range(8):
        result = llm.chat(ASK, tools=TOOLS, tool_choice="required", temperature=1.0, seed=seed,
                          max_tokens=200)
        assert_valid_calls(result, {"get_weather", "add"})


def test_a_named_function_gets_exactly_one_call(llm: mistral7b.LLM) -> None:
    result = llm.chat(ASK, tools=TOOLS, temperature=0, max_tokens=100,
                      tool_choice={"type": "function", "function": {"name": "add"}})
    assert_valid_calls(result, {"add"})
    assert len(result.tool_calls or []) == 1


def test_auto_on_a_format_without_tools_answers_in_text(llm: mistral7b.LLM) -> None:
    plain = llm.chat(ASK, temperature=0, max_tokens=20)
    auto = llm.chat(ASK, tools=TOOLS, temperature=0, max_tokens=20)
    assert auto.text == plain.text and auto.tool_calls is None


def test_a_tool_result_is_answered_in_text(llm: mistral7b.LLM) -> None:
    call = llm.chat(ASK, tools=TOOLS, tool_choice="required", temperature=0,
                    max_tokens=200).tool_calls
    assert call
    # A fixed id: the call's own id is random, and the prompt (so the answer) would vary.
    follow = [*ASK,
              {"role": "assistant", "content": None, "tool_calls": [
                  {"id": "call_1", "type": "function",
                   "function": {"name": call[0].name, "arguments": call[0].arguments}}]},
              {"role": "tool", "tool_call_id": "call_1", "content": '{"temp": 21}'}]
    prompt = llm.tokenizer.decode(llm.tokenizer.encode_chat(follow))
    assert "call_1" in prompt and '{"temp": 21}' in prompt
    answer = llm.chat(follow, tools=TOOLS, temperature=0, max_tokens=30)
    assert answer.text and answer.tool_calls is None


def test_mistral_format_calls_start_with_the_tool_calls_token(mistral_v3: mistral7b.LLM
                                                              ) -> None:
    marker = tool_calls_token(mistral_v3.tokenizer)
    result = mistral_v3.chat(ASK, tools=TOOLS, tool_choice="required", temperature=0.8, seed=1,
                             max_tokens=300)
    assert result.token_ids[0] == marker
    assert_valid_calls(result, {"get_weather", "add"})
    # "none": the tools are shown, but [TOOL_CALLS] is never sampled.
    for seed in range(3):
        none = mistral_v3.chat(ASK, tools=TOOLS, tool_choice="none", temperature=1.0,
                               seed=seed, max_tokens=5,
                               logit_bias={marker: 100})   # even when pushed towards it
        assert marker not in none.token_ids and none.tool_calls is None


@pytest.mark.parametrize(("tools", "choice", "message"), [
    ([], None, "tools: expected a non-empty list"),
    ([{"type": "function", "function": {"name": "bad name"}}], None, "tools[0].function.name"),
    ([TOOLS[0], TOOLS[0]], None, "defined twice"),
    (TOOLS, {"type": "function", "function": {"name": "nope"}}, "no tool is named 'nope'"),
    (TOOLS, "sometimes", "tool_choice"),
    (None, "required", "tool_choice: needs tools"),
])
def test_bad_tools_are_refused_naming_the_field(llm: mistral7b.LLM, tools: object,
                                                choice: object, message: str) -> None:
    with pytest.raises(InvalidArgumentError, match=message.replace("[", r"\[")):
        llm.chat(ASK, tools=tools, tool_choice=choice)  # type: ignore[arg-type]


def test_bad_tool_messages_are_refused(llm: mistral7b.LLM) -> None:
    with pytest.raises(InvalidArgumentError, match="tool_call_id"):
        llm.chat([*ASK, {"role": "tool", "content": "x"}])
    with pytest.raises(InvalidArgumentError, match="not valid JSON"):
        llm.chat([*ASK, {"role": "assistant", "content": None, "tool_calls": [
            {"id": "a", "function": {"name": "f", "arguments": "{oops"}}]}])
    with pytest.raises(InvalidArgumentError, match="cannot be combined"):
        llm.chat(ASK, tools=TOOLS, tool_choice="required",
                 response_format={"type": "json_object"})


# ---- a Jinja template that reads `tools` ----------------------------------------------------


def test_a_jinja_tool_template_renders_as_transformers_renders_it(chatml: mistral7b.LLM
                                                                  ) -> None:
    from transformers.utils.chat_template_utils import render_jinja_template

    tokenizer: Any = chatml.tokenizer
    assert tool_format(tokenizer) == "jinja"
    spec = check_tools(TOOLS)
    hf_messages = [*CALLED[:1],                  # Hugging Face's shape: arguments as an object
                   {**CALLED[1], "tool_calls": [{**CALLED[1]["tool_calls"][0], "function": {
                       "name": "get_weather", "arguments": {"city": "Paris"}}}]},
                   CALLED[2]]
    result: Any = render_jinja_template(
        conversations=[hf_messages], tools=spec, chat_template=CHATML_TOOLS,
        add_generation_prompt=True, bos_token=tokenizer.bos_token,
        eos_token=tokenizer.eos_token)
    expected = result[0][0]
    assert "<tools>\n" in expected and '"arguments": {"city": "Paris"}' in expected
    assert tokenizer.encode_chat(CALLED, spec) == tokenizer.encode(expected, bos=False)


def test_forced_calls_come_in_the_templates_tool_call_blocks(chatml: mistral7b.LLM) -> None:
    for seed in range(4):
        result = chatml.chat(ASK, tools=TOOLS, tool_choice="required", temperature=1.0,
                             seed=seed, max_tokens=200)
        assert result.text.startswith("<tool_call>\n"), result.text
        assert_valid_calls(result, {"get_weather", "add"})
    named = chatml.chat(ASK, tools=TOOLS, temperature=0, max_tokens=100,
                        tool_choice={"type": "function", "function": {"name": "add"}})
    assert_valid_calls(named, {"add"})
    assert len(named.tool_calls or []) == 1 and named.text.count("<tool_call>") == 1


@pytest.mark.parametrize("choice", ["auto", "required"])
def test_a_streamed_answer_with_tools_equals_the_whole_one(chatml: mistral7b.LLM,
                                                           choice: str) -> None:
    """Text streams token by token; calls come whole on the last piece."""
    whole = chatml.chat(CALLED if choice == "auto" else ASK, tools=TOOLS, tool_choice=choice,
                        temperature=0, max_tokens=60)
    pieces = list(chatml.stream_chat(CALLED if choice == "auto" else ASK, tools=TOOLS,
                                     tool_choice=choice, temperature=0, max_tokens=60))
    last = pieces[-1]
    assert last.finish_reason == whole.finish_reason
    assert [(c.name, c.arguments) for c in last.tool_calls or []] == \
        [(c.name, c.arguments) for c in whole.tool_calls or []]
    shown = [p.text for p in pieces if p.text]
    if choice == "auto":                       # the follow-up is answered in text
        assert whole.tool_calls is None and "".join(shown) == whole.text and len(shown) > 5
    else:
        assert whole.tool_calls and shown == []


def feed(stream: CallStream, tokenizer: Any, parts: list[str]) -> list[str]:
    return [stream.feed(tokenizer.encode(part, bos=False), part) for part in parts]


def test_text_is_shown_until_a_tool_call_block_starts(chatml: mistral7b.LLM) -> None:
    tokenizer: Any = chatml.tokenizer
    stream = CallStream(tokenizer, plan_tools(tokenizer, TOOLS, "auto"))
    parts = ["Let me ", "check. <tool", '_call>\n{"name": "add", ',
             '"arguments": {"a": 1, "b": 2}}\n</tool_call>']
    assert feed(stream, tokenizer, parts) == ["Let me ", "check. ", "", ""]
    rest, calls = stream.finish()
    assert rest == "" and [(c.name, json.loads(c.arguments)) for c in calls] == \
        [("add", {"a": 1, "b": 2})]
    # "<" that starts no block is held only until it is known not to.
    stream = CallStream(tokenizer, plan_tools(tokenizer, TOOLS, "auto"))
    assert feed(stream, tokenizer, ["1 <", " 2"]) == ["1 ", "< 2"]
    assert stream.finish() == ("", [])


def test_a_call_that_does_not_parse_is_shown_as_text(chatml: mistral7b.LLM) -> None:
    tokenizer: Any = chatml.tokenizer
    stream = CallStream(tokenizer, plan_tools(tokenizer, TOOLS, "required"))
    cut = '<tool_call>\n{"name": "add", "argu'          # max_tokens came first
    assert feed(stream, tokenizer, [cut]) == [""]
    assert stream.finish() == (cut, [])


def test_mistral_format_streams_text_unless_the_first_token_is_tool_calls(
        mistral_v3: mistral7b.LLM) -> None:
    tokenizer: Any = mistral_v3.tokenizer
    plan = plan_tools(tokenizer, TOOLS, "auto")
    text = CallStream(tokenizer, plan)
    assert feed(text, tokenizer, ["It is", " sunny."]) == ["It is", " sunny."]
    assert text.finish() == ("", [])
    calls = CallStream(tokenizer, plan)
    array = '[{"name": "add", "arguments": {"a": 1, "b": 2}}]'
    assert calls.feed([tool_calls_token(tokenizer)], "") == ""
    assert calls.feed(tokenizer.encode(array, bos=False), array) == ""
    rest, found = calls.finish()
    assert rest == "" and [(c.name, c.arguments) for c in found] == [("add", '{"a": 1, "b": 2}')]
