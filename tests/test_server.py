"""The OpenAI-compatible server on 127.0.0.1 with the default model, driven by the real `openai`
client and by raw HTTP for the error cases."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import httpx
import openai
import pytest
import uvicorn

import mistral7b
from mistral7b.engine import Engine
from mistral7b.server.serve import DrainingServer
from mistral7b.server.state import ServerState
from tests.conftest import wait_until
from tests.serving import CHUNK, MODEL, Running, free_port, serve_app, start_server, stop_server

QUESTIONS = ["What is the capital of France?", "Name a prime number.", "What is 2 + 2?",
             "Say hello in Spanish.", "What colour is the sky?", "Name a planet.",
             "What is Python?", "Give me a fruit.", "What is a cat?", "Count to three.",
             "Name an ocean.", "What is ice?", "Who wrote Hamlet?", "What is a verb?",
             "Name a metal.", "What do bees make?"]


@pytest.fixture(scope="module")
def llm() -> mistral7b.LLM:
    return mistral7b.load()


@pytest.fixture(scope="module")
def srv(llm: mistral7b.LLM) -> Iterator[Running]:
    running, server, thread = start_server(llm)
    yield running
    stop_server(server, thread, running.engine)


def alone_chat(llm: mistral7b.LLM, question: str, max_tokens: int) -> str:
    """What the model answers with greedy decoding, computed without the server."""
    return llm.chat([{"role": "user", "content": question}], temperature=0,
                    max_tokens=max_tokens, chunk_size=CHUNK).text


# ---- the openai client --------------------------------------------------------------------

def test_chat_completion(srv: Running, llm: mistral7b.LLM) -> None:
    messages = [{"role": "system", "content": "Answer briefly."},
                {"role": "user", "content": "What is the capital of France?"}]
    r = srv.client().chat.completions.create(model="smollm2-test", messages=messages,
                                             temperature=0, max_tokens=24)
    expected = llm.chat(messages, temperature=0, max_tokens=24, chunk_size=CHUNK)
    assert r.choices[0].message.content == expected.text
    assert r.choices[0].message.role == "assistant"
    assert r.choices[0].finish_reason == expected.finish_reason
    assert r.usage is not None
    assert r.usage.prompt_tokens == len(llm.tokenizer.encode_chat(messages))
    assert r.usage.completion_tokens == len(expected.token_ids)
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens
    assert r.object == "chat.completion" and r.id.startswith("chatcmpl-")


def test_chat_stream_equals_non_stream(srv: Running) -> None:
    kwargs = dict(model=MODEL, temperature=0, max_tokens=32,
                  messages=[{"role": "user", "content": "Tell me about the Moon."}])
    whole = srv.client().chat.completions.create(**kwargs)  # type: ignore[call-overload]
    chunks = list(srv.client().chat.completions.create(
        stream=True, stream_options={"include_usage": True}, **kwargs))  # type: ignore
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content
    assert chunks[0].choices[0].delta.role == "assistant"
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices]
    assert finishes[-1] == whole.choices[0].finish_reason and set(finishes[:-1]) == {None}
    assert chunks[-1].choices == [] and chunks[-1].usage is not None
    assert chunks[-1].usage.completion_tokens == whole.usage.completion_tokens  # type: ignore


def test_completion_with_logprobs_and_echo(srv: Running, llm: mistral7b.LLM) -> None:
    prompt = "The three primary colours are"
    r = srv.client().completions.create(model=MODEL, prompt=prompt, temperature=0, max_tokens=12,
                                        logprobs=3, echo=True,
                                        extra_body={"ignore_eos": True})
    choice = r.choices[0]
    expected = llm.generate(prompt, temperature=0, max_tokens=12, ignore_eos=True,
                            chunk_size=CHUNK)
    assert choice.text == llm.tokenizer.decode(llm.tokenizer.encode(prompt)) + expected.text
    assert r.usage is not None and r.usage.completion_tokens == 12
    assert r.usage.prompt_tokens == len(llm.tokenizer.encode(prompt))
    lp = choice.logprobs
    assert lp is not None and lp.token_logprobs is not None and lp.top_logprobs is not None
    # echo: the prompt's tokens first (the first has no logprob), then the 12 generated
    n_prompt = len(llm.tokenizer.encode(prompt))
    assert len(lp.token_logprobs) == n_prompt + 12 and lp.token_logprobs[0] is None
    assert lp.top_logprobs[0] is None and all(len(t) == 3 for t in lp.top_logprobs[1:])
    for chosen, tops in zip(lp.token_logprobs[n_prompt:], lp.top_logprobs[n_prompt:],
                            strict=True):
        assert chosen <= 0 and abs(chosen - max(tops.values())) < 1e-5   # greedy: the best


def test_prompt_logprobs_with_echo_and_max_tokens_0(srv: Running, llm: mistral7b.LLM) -> None:
    """What lm-eval's local-completions sends to score a continuation: the prompt's own
    logprobs in OpenAI's legacy shape, streamed or not."""
    prompt = "The capital of France is Paris"
    ids = llm.tokenizer.encode(prompt)
    body = {"model": MODEL, "prompt": prompt, "max_tokens": 0, "echo": True, "logprobs": 2}
    r = httpx.post(f"{srv.url}/v1/completions", json=body, timeout=60).json()
    choice = r["choices"][0]
    assert choice["text"] == llm.tokenizer.decode(ids) and choice["finish_reason"] == "length"
    assert r["usage"]["completion_tokens"] == 0
    lp = choice["logprobs"]
    expected = llm.generate(ids, max_tokens=0, prompt_logprobs=2, chunk_size=CHUNK)
    assert expected.prompt_logprobs is not None
    assert lp["tokens"] == [llm.tokenizer.decode([t]) for t in ids]
    assert lp["token_logprobs"][0] is None and lp["top_logprobs"][0] is None
    assert lp["token_logprobs"][1:] == pytest.approx(
        [t.logprob for t in expected.prompt_logprobs[1:]], abs=1e-5)
    assert [len(t) for t in lp["top_logprobs"][1:]] == [2] * (len(ids) - 1)
    assert lp["text_offset"][0] == 0 and lp["text_offset"] == sorted(lp["text_offset"])
    streamed = [json.loads(line[6:]) for line in httpx.post(
        f"{srv.url}/v1/completions", json={**body, "stream": True}, timeout=60
    ).text.splitlines() if line.startswith("data: {")]
    assert "".join(c["choices"][0]["text"] for c in streamed if c["choices"]) == choice["text"]
    assert [c["choices"][0]["logprobs"] for c in streamed if c["choices"]] == [lp]
    bad = httpx.post(f"{srv.url}/v1/completions", json={**body, "echo": False}, timeout=60)
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "max_tokens"
    too_long = httpx.post(f"{srv.url}/v1/completions", timeout=60,
                          json={**body, "prompt": [1] * (llm.config.max_seq_len + 1)})
    assert too_long.status_code == 400, too_long.text
    assert too_long.json()["error"]["code"] == "context_length_exceeded"


def test_completion_stream_and_stop_string(srv: Running, llm: mistral7b.LLM) -> None:
    prompt = "Once upon a time"
    full = llm.generate(prompt, temperature=0, max_tokens=30, ignore_eos=True,
                        chunk_size=CHUNK).text
    word = full.split()[4]
    chunks = list(srv.client().completions.create(model=MODEL, prompt=prompt, temperature=0,
                                                  max_tokens=30, stop=[word], stream=True,
                                                  extra_body={"ignore_eos": True}))
    text = "".join(c.choices[0].text for c in chunks)
    assert text == full[: full.index(word)]
    assert chunks[-1].choices[0].finish_reason == "stop"


def test_several_prompts_in_one_completion_request(srv: Running, llm: mistral7b.LLM) -> None:
    prompts = ["The capital of France is", "Once upon a time"]
    r = srv.client().completions.create(model=MODEL, prompt=prompts, n=2, temperature=0,
                                        max_tokens=8, extra_body={"ignore_eos": True})
    assert [c.index for c in r.choices] == [0, 1, 2, 3]        # prompt k // n, choice k % n
    for k, choice in enumerate(r.choices):
        expected = llm.generate(prompts[k // 2], temperature=0, max_tokens=8, ignore_eos=True,
                                chunk_size=CHUNK)
        assert choice.text == expected.text
    assert r.usage is not None
    assert r.usage.prompt_tokens == sum(len(llm.tokenizer.encode(p)) for p in prompts)
    assert r.usage.completion_tokens == 4 * 8
    bad = httpx.post(f"{srv.url}/v1/completions", json={"prompt": ["a", ""], "max_tokens": 2})
    assert bad.status_code == 400 and bad.json()["error"]["message"].startswith("prompt[1]")


def test_n_choices_and_chat_logprobs(srv: Running) -> None:
    r = srv.client().chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "Write a word."}], n=2,
        temperature=1.0, seed=7, max_tokens=8, logprobs=True, top_logprobs=2)
    assert [c.index for c in r.choices] == [0, 1]
    assert r.usage is not None
    counts = [len(c.logprobs.content or []) for c in r.choices]   # type: ignore[union-attr]
    assert r.usage.completion_tokens == sum(counts) and all(0 < n <= 8 for n in counts)
    for c in r.choices:
        for item in c.logprobs.content or []:                        # type: ignore[union-attr]
            assert item.logprob <= 0 and len(item.top_logprobs) == 2
    again = srv.client().chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "Write a word."}], n=2,
        temperature=1.0, seed=7, max_tokens=8)
    assert [c.message.content for c in again.choices] == [c.message.content for c in r.choices]


def test_sixteen_concurrent_streams_get_their_solo_text(srv: Running,
                                                        llm: mistral7b.LLM) -> None:
    def ask(question: str) -> str:
        stream = srv.client().chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": question}], temperature=0,
            max_tokens=40, stream=True)
        return "".join(c.choices[0].delta.content or "" for c in stream if c.choices)

    alone = [alone_chat(llm, q, 40) for q in QUESTIONS]
    with ThreadPoolExecutor(len(QUESTIONS)) as pool:
        together = list(pool.map(ask, QUESTIONS))
    assert together == alone
    assert wait_until(lambda: srv.engine.stats().running == 0, 30)


# ---- status routes ------------------------------------------------------------------------

def test_models_health_metrics_tokenize(srv: Running, llm: mistral7b.LLM) -> None:
    assert [m.id for m in srv.client().models.list()] == ["smollm2-test"]
    assert httpx.get(f"{srv.url}/health").json() == {"status": "ok"}
    ids = httpx.post(f"{srv.url}/tokenize", json={"prompt": "Hello world"}).json()
    assert ids["tokens"] == llm.tokenizer.encode("Hello world")
    assert ids["count"] == len(ids["tokens"]) and ids["max_model_len"] == 8192
    text = httpx.post(f"{srv.url}/detokenize", json={"tokens": ids["tokens"]}).json()
    assert text == {"prompt": llm.tokenizer.decode(ids["tokens"])}
    chat = httpx.post(f"{srv.url}/tokenize",
                      json={"messages": [{"role": "user", "content": "Hi"}]}).json()
    assert chat["tokens"] == llm.tokenizer.encode_chat([{"role": "user", "content": "Hi"}])
    bad = httpx.post(f"{srv.url}/detokenize", json={"tokens": [10**9]})
    assert bad.status_code == 400 and "outside the vocabulary" in bad.json()["error"]["message"]
    srv.client().completions.create(model=MODEL, prompt="Hi", max_tokens=3, temperature=0)
    metrics = httpx.get(f"{srv.url}/metrics").text
    assert 'mistral7b_requests_total{route="/v1/completions",status="200"}' in metrics
    for name in ("mistral7b_prompt_tokens_total", "mistral7b_generation_tokens_total",
                 "mistral7b_time_to_first_token_seconds_count",
                 "mistral7b_time_per_output_token_seconds_count", "mistral7b_queue_depth",
                 "mistral7b_running_sequences"):
        line = next(x for x in metrics.splitlines() if x.startswith(name))
        assert float(line.split()[-1]) >= 0
    generated = next(x for x in metrics.splitlines()
                     if x.startswith("mistral7b_generation_tokens_total"))
    assert float(generated.split()[-1]) >= 3


# ---- bad input ----------------------------------------------------------------------------

@pytest.mark.parametrize(("body", "param", "words"), [
    ({"max_tokens": -1}, "max_tokens", "greater than or equal to 1"),
    ({"temperature": 500}, "temperature", "less than or equal to 100"),
    ({"temperature": "hot"}, "temperature", "number"),
    ({"messages": []}, "messages", "at least 1"),
    ({"messages": [{"role": "wizard", "content": "hi"}]}, "messages[0].role", "system"),
    ({"messages": [{"role": "user"}]}, "messages[0].content", "required"),
    ({"n": 0}, "n", "greater than or equal to 1"),
    ({"top_p": 0}, "top_p", "greater than 0"),
    ({"stop": ""}, "stop", "empty"),
    ({"top_logprobs": 2}, "top_logprobs", "logprobs"),
    ({"response_format": {"type": "xml"}}, "response_format.type", "json_object"),
    ({"tools": [{"type": "function", "function": {"name": "a b"}}]}, "tools[0].function.name",
     "letters"),
    ({"tool_choice": "required"}, "tool_choice", "needs tools"),
    ({"messages": [{"role": "tool", "content": "x"}]}, "messages[0].tool_call_id", "id"),
    ({"response_format": {"type": "json_schema", "json_schema": {"schema": {"type": "objekt"}}}},
     "response_format", "objekt"),
])
def test_invalid_fields_get_400_naming_the_field(srv: Running, body: dict, param: str,
                                                 words: str) -> None:
    request = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], **body}
    r = httpx.post(f"{srv.url}/v1/chat/completions", json=request)
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["param"] == param and error["type"] == "invalid_request_error"
    assert error["message"].startswith(param) and words in error["message"]


PERSON = {"type": "object", "additionalProperties": False, "required": ["name", "age"],
          "properties": {"name": {"type": "string", "maxLength": 20},
                         "age": {"type": "integer", "minimum": 0, "maximum": 150}}}


def test_structured_output_through_the_openai_client(srv: Running) -> None:
    """response_format json_schema on chat (streamed and not) and json_object on completions."""
    import jsonschema

    client = srv.client()
    fmt = {"type": "json_schema", "json_schema": {"name": "person", "schema": PERSON,
                                                  "strict": True}}
    ask = [{"role": "user", "content": "Invent a person; answer in JSON."}]
    answer = client.chat.completions.create(model=MODEL, messages=ask, max_tokens=80,
                                            temperature=0, response_format=fmt)  # type: ignore
    text = answer.choices[0].message.content or ""
    assert answer.choices[0].finish_reason == "stop"
    jsonschema.validate(json.loads(text), PERSON)
    streamed = client.chat.completions.create(model=MODEL, messages=ask, max_tokens=80,
                                              temperature=0, response_format=fmt,  # type: ignore
                                              stream=True)
    assert "".join(c.choices[0].delta.content or "" for c in streamed if c.choices) == text
    completion = client.completions.create(
        model=MODEL, prompt="A JSON object describing a dog:", max_tokens=120, temperature=0,
        extra_body={"response_format": {"type": "json_object"}})
    assert completion.choices[0].finish_reason == "stop"
    assert isinstance(json.loads(completion.choices[0].text), dict)


WEATHER_TOOL = {"type": "function", "function": {
    "name": "get_weather", "description": "Current weather in a city",
    "parameters": {"type": "object", "additionalProperties": False, "required": ["city"],
                   "properties": {"city": {"type": "string", "maxLength": 30}}}}}


def test_tool_calls_through_the_openai_client(srv: Running) -> None:
    """tools + required: calls whose arguments validate, content null, finish_reason
    "tool_calls"; streamed deltas reassemble to the same calls; a tool result is answered."""
    import jsonschema

    client = srv.client()
    ask = [{"role": "user", "content": "What is the weather in Paris?"}]
    answer = client.chat.completions.create(
        model=MODEL, messages=ask, tools=[WEATHER_TOOL], tool_choice="required",  # type: ignore
        temperature=0, max_tokens=150)
    choice = answer.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content is None
    calls = choice.message.tool_calls or []
    assert calls and all(c.function.name == "get_weather" for c in calls)
    for call in calls:
        jsonschema.validate(json.loads(call.function.arguments),
                            WEATHER_TOOL["function"]["parameters"])  # type: ignore[index]
    stream = client.chat.completions.create(
        model=MODEL, messages=ask, tools=[WEATHER_TOOL], tool_choice="required",  # type: ignore
        temperature=0, max_tokens=150, stream=True)
    parts: dict[int, dict[str, str]] = {}
    reasons = []
    for chunk in stream:
        for c in chunk.choices:
            reasons.append(c.finish_reason)
            for delta in c.delta.tool_calls or []:
                part = parts.setdefault(delta.index, {"name": "", "arguments": ""})
                part["name"] += (delta.function.name or "") if delta.function else ""
                part["arguments"] += (delta.function.arguments or "") if delta.function else ""
    assert "tool_calls" in reasons
    assert [(p["name"], p["arguments"]) for _, p in sorted(parts.items())] == \
        [(c.function.name, c.function.arguments) for c in calls]
    follow = [*ask, {"role": "assistant", "content": None,
                     "tool_calls": [{**calls[0].model_dump(), "id": "call_1"}]},  # fixed:
              {"role": "tool", "tool_call_id": "call_1", "content": '{"temp": 21}'}]  # ids vary
    reply = client.chat.completions.create(model=MODEL, messages=follow,  # type: ignore
                                           tools=[WEATHER_TOOL], temperature=0, max_tokens=20)
    assert reply.choices[0].message.content and not reply.choices[0].message.tool_calls
    # With tools, a text answer still streams token by token.
    chunks = [c.choices[0].delta.content for c in client.chat.completions.create(
        model=MODEL, messages=follow, tools=[WEATHER_TOOL], temperature=0,  # type: ignore
        max_tokens=20, stream=True) if c.choices and c.choices[0].delta.content]
    assert len(chunks) > 3 and "".join(chunks) == reply.choices[0].message.content


def test_langchain_structured_output_and_bind_tools(srv: Running) -> None:
    """What agent frameworks do: langchain-openai's with_structured_output (a JSON-schema
    response_format) and bind_tools (tools, here with a forced call)."""
    from langchain_openai import ChatOpenAI
    from pydantic import BaseModel, Field

    class Person(BaseModel):
        name: str = Field(max_length=20)
        age: int = Field(ge=0, le=150)

    chat = ChatOpenAI(base_url=f"{srv.url}/v1", api_key="unused", model=MODEL,  # type: ignore
                      temperature=0, max_tokens=80, max_retries=0)
    person = chat.with_structured_output(Person).invoke("Invent a person.")
    assert isinstance(person, Person)
    answer = chat.bind_tools([WEATHER_TOOL], tool_choice="get_weather").invoke(
        "What is the weather in Paris?")
    assert [c["name"] for c in answer.tool_calls] == ["get_weather"]  # type: ignore[attr-defined]
    assert isinstance(answer.tool_calls[0]["args"]["city"], str)  # type: ignore[attr-defined]


def test_null_fields_take_their_defaults(srv: Running) -> None:
    request = {"model": None, "messages": [{"role": "user", "content": "hi", "name": None}],
               "temperature": None, "top_p": None, "stop": None, "seed": None, "n": None,
               "max_tokens": 3, "stream": None, "logprobs": None, "stream_options": None}
    r = httpx.post(f"{srv.url}/v1/chat/completions", json=request, timeout=60)
    assert r.status_code == 200, r.text
    assert len(r.json()["choices"]) == 1


def test_invalid_json_and_prompt_too_long(srv: Running) -> None:
    r = httpx.post(f"{srv.url}/v1/completions", content=b"{not json",
                   headers={"content-type": "application/json"})
    assert r.status_code == 400 and "JSON" in r.json()["error"]["message"]
    r = httpx.post(f"{srv.url}/v1/completions",
                   json={"prompt": [1] * 8000, "max_tokens": 500})
    assert r.status_code == 400
    error = r.json()["error"]
    assert error["code"] == "context_length_exceeded"
    assert "8000" in error["message"] and "500" in error["message"] and "8192" in error["message"]
    r = httpx.post(f"{srv.url}/v1/completions", json={"prompt": [1] * 8192})
    assert r.status_code == 400 and "8192" in r.json()["error"]["message"]


def test_api_key(llm: mistral7b.LLM) -> None:
    running, server, thread = start_server(llm)
    running.state.api_key = "sekrit"
    try:
        with pytest.raises(openai.AuthenticationError):
            running.client("wrong").models.list()
        r = httpx.post(f"{running.url}/v1/completions", json={"prompt": "hi"})
        assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
        assert httpx.get(f"{running.url}/health").status_code == 200    # probes need no key
        assert [m.id for m in running.client("sekrit").models.list()] == ["smollm2-test"]
    finally:
        stop_server(server, thread, running.engine)


def test_queue_full_gets_429(llm: mistral7b.LLM) -> None:
    # The engine is not started: the first request waits in the queue, the second finds it full.
    running, server, thread = start_server(llm, start_engine=False, max_batch=1, max_queue=1)
    try:
        with ThreadPoolExecutor(1) as pool:
            waiting = pool.submit(httpx.post, f"{running.url}/v1/completions",
                                  json={"prompt": "hi", "max_tokens": 2}, timeout=60)
            assert wait_until(lambda: running.engine.stats().waiting == 1, 10)
            r = httpx.post(f"{running.url}/v1/completions", json={"prompt": "hi"})
            assert r.status_code == 429 and r.json()["error"]["code"] == "queue_full"
            running.engine.start()
            assert waiting.result().status_code == 200
    finally:
        stop_server(server, thread, running.engine)


def test_not_ready_is_503(llm: mistral7b.LLM) -> None:
    state = ServerState(model_name="x")          # never attached: still "loading"
    url, server, thread = serve_app(state)
    try:
        r = httpx.get(f"{url}/health")
        assert r.status_code == 503 and r.json() == {"status": "loading"}
        r = httpx.post(f"{url}/v1/completions", json={"prompt": "hi"})
        assert r.status_code == 503 and "loading" in r.json()["error"]["message"]
    finally:
        server.should_exit = True
        thread.join(timeout=30)


def test_engine_failure_is_a_500_for_that_request_only(srv: Running,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    from mistral7b.generate import SequenceState

    real_add = SequenceState.add_token

    def add(self: SequenceState, result: object) -> object:
        if self.params.seed == 666:
            raise RuntimeError("the sampler exploded")
        return real_add(self, result)  # type: ignore[arg-type]

    monkeypatch.setattr(SequenceState, "add_token", add)
    r = httpx.post(f"{srv.url}/v1/completions", json={"prompt": "hi", "seed": 666},
                   timeout=60)
    assert r.status_code == 500 and "sampler exploded" in r.json()["error"]["message"]
    ok = httpx.post(f"{srv.url}/v1/completions", json={"prompt": "hi", "max_tokens": 4},
                    timeout=60)
    assert ok.status_code == 200


# ---- disconnects, keep-alive, shutdown ----------------------------------------------------

def test_client_disconnect_frees_the_row(srv: Running, monkeypatch: pytest.MonkeyPatch) -> None:
    reasons: list[str | None] = []      # how the engine ends the request
    real_submit = srv.engine.submit

    def submit(prompt: Any, params: Any, on_output: Any, *args: Any, **kwargs: Any) -> str:
        def spy(out: Any) -> None:
            if out.finished:
                reasons.append(out.finish_reason)
            on_output(out)
        return real_submit(prompt, params, spy, *args, **kwargs)

    monkeypatch.setattr(srv.engine, "submit", submit)
    body = {"prompt": "Count:", "max_tokens": 4000, "ignore_eos": True, "stream": True}
    with httpx.stream("POST", f"{srv.url}/v1/completions", json=body, timeout=60) as r:
        lines = r.iter_lines()
        for line in lines:
            if line.startswith("data: ") and '"text"' in line:
                break
        assert srv.engine.stats().running == 1
    # The connection is closed: the server cancels the request at its next send, and the engine
    # drops the sequence (not after its 4000 tokens: the cancel is what ends it). The bound is
    # generous, for slow shared CI machines.
    assert wait_until(lambda: srv.engine.stats().running == 0 and bool(reasons), 30.0)
    assert reasons == ["cancelled"]
    assert srv.engine.stats().free_rows == srv.engine.max_batch


def test_keepalive_comments_during_a_long_prefill(srv: Running, llm: mistral7b.LLM) -> None:
    prompt = llm.tokenizer.encode(" ".join(QUESTIONS) * 12)          # ~40 pre-fill chunks
    body = {"prompt": prompt, "max_tokens": 2, "stream": True}
    seen: list[str] = []
    with httpx.stream("POST", f"{srv.url}/v1/completions", json=body, timeout=120) as r:
        for line in r.iter_lines():
            if line:
                seen.append(line)
    first_data = next(i for i, x in enumerate(seen) if x.startswith("data: {"))
    assert ": keep-alive" in seen[:first_data]
    assert seen[-1] == "data: [DONE]"


def test_sigterm_drains_running_requests_and_exits_0(tmp_path: object) -> None:
    # A generous drain timeout and a short answer: the outcome must not depend on how fast
    # (or loaded) the machine is.
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "mistral7b", "serve", "--port", str(port), "--max-batch", "2",
         "--drain-timeout", "300"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"})
    url = f"http://127.0.0.1:{port}"
    try:
        def healthy() -> bool:
            try:
                return httpx.get(f"{url}/health", timeout=1).status_code == 200
            except httpx.HTTPError:
                return False

        assert wait_until(healthy, 120), "server did not become healthy"
        # Counted in `usage`, not in chunks: a sampled token may add no text (and no chunk).
        body = {"prompt": "Count:", "max_tokens": 16, "ignore_eos": True, "stream": True,
                "stream_options": {"include_usage": True}}
        chunks: list[dict] = []
        with httpx.stream("POST", f"{url}/v1/completions", json=body, timeout=120) as r:
            for line in r.iter_lines():
                if not line.startswith("data: {"):
                    continue
                if not chunks:
                    proc.send_signal(signal.SIGTERM)        # mid-stream
                chunks.append(json.loads(line[6:]))
        finish = [c["choices"][0]["finish_reason"] for c in chunks if c["choices"]]
        assert finish[-1] == "length" and chunks[-1]["usage"]["completion_tokens"] == 16
        assert proc.wait(timeout=120) == 0
        assert "shutting down" in (proc.stderr.read() if proc.stderr else "")
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def _gate_engine(engine: Engine, monkeypatch: pytest.MonkeyPatch) -> threading.Event:
    """Hold the engine's steps until the returned event is set: requests stay running for as
    long as a test needs, however fast the machine."""
    gate = threading.Event()
    real_step = engine._step

    def step(running: list) -> None:
        if gate.is_set():
            real_step(running)
        else:
            time.sleep(0.01)

    monkeypatch.setattr(engine, "_step", step)
    return gate


def _stream_events(url: str, body: dict) -> list[str]:
    with httpx.stream("POST", f"{url}/v1/completions", json=body, timeout=120) as r:
        return [line for line in r.iter_lines() if line.startswith("data: ")]


def test_drain_keeps_the_listener_open_with_503_and_finishes_running_streams(
        llm: mistral7b.LLM, monkeypatch: pytest.MonkeyPatch) -> None:
    running, server, thread = start_server(
        llm, make_server=lambda config, state: DrainingServer(config, state, 300))
    gate = _gate_engine(running.engine, monkeypatch)
    try:
        with ThreadPoolExecutor(1) as pool:
            stream = pool.submit(_stream_events, running.url,
                                 {"prompt": "Count:", "max_tokens": 5, "ignore_eos": True,
                                  "stream": True})
            assert wait_until(lambda: running.engine.stats().running == 1, 60)
            assert isinstance(server, DrainingServer)
            server.begin_drain()
            # New connections are still accepted, and told to go elsewhere.
            r = httpx.get(f"{running.url}/health", timeout=30)
            assert r.status_code == 503 and r.json() == {"status": "draining"}
            r = httpx.post(f"{running.url}/v1/completions", json={"prompt": "hi"}, timeout=30)
            assert r.status_code == 503 and r.json()["error"]["code"] == "draining"
            gate.set()
            events = stream.result(timeout=120)
        chunks = [json.loads(e[6:]) for e in events if e != "data: [DONE]"]
        assert chunks[-1]["choices"][0]["finish_reason"] == "length"
        assert events[-1] == "data: [DONE]"
        thread.join(timeout=60)
        assert not thread.is_alive(), "the server did not stop after the drain"
    finally:
        gate.set()
        stop_server(server, thread, running.engine)


def test_a_drain_that_times_out_ends_streams_with_an_error_event(
        llm: mistral7b.LLM, monkeypatch: pytest.MonkeyPatch) -> None:
    running, server, thread = start_server(
        llm, make_server=lambda config, state: DrainingServer(config, state, 0.5))
    gate = _gate_engine(running.engine, monkeypatch)     # never opens: the drain times out
    try:
        with ThreadPoolExecutor(1) as pool:
            stream = pool.submit(_stream_events, running.url,
                                 {"prompt": "Count:", "max_tokens": 5, "stream": True})
            assert wait_until(lambda: running.engine.stats().running == 1, 60)
            assert isinstance(server, DrainingServer)
            server.begin_drain()
            events = stream.result(timeout=120)
        assert events[-1] == "data: [DONE]"
        error = json.loads(events[-2][6:])["error"]
        assert error["type"] == "server_error" and "shut down" in error["message"]
        thread.join(timeout=60)
        assert not thread.is_alive()
    finally:
        gate.set()
        stop_server(server, thread, running.engine)


# ---- error shapes, models, roles and fields ------------------------------------------------

def _error_of(r: httpx.Response, status: int) -> dict:
    assert r.status_code == status, r.text
    body = r.json()
    assert set(body) == {"error"}, body                    # OpenAI's shape, never {"detail"}
    assert set(body["error"]) == {"message", "type", "param", "code"}
    return dict(body["error"])


def test_unknown_route_method_and_bad_bodies_answer_in_openai_shape(srv: Running) -> None:
    error = _error_of(httpx.get(f"{srv.url}/v1/nothing"), 404)
    assert "/v1/nothing" in error["message"] and error["code"] == "not_found"
    r = httpx.get(f"{srv.url}/v1/chat/completions")
    error = _error_of(r, 405)
    assert "GET" in error["message"] and "POST" in r.headers.get("allow", "")
    chat = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}]}
    error = _error_of(httpx.post(f"{srv.url}/v1/chat/completions",
                                 json={**chat, "stream": "yes"}), 400)
    assert error["param"] == "stream"                      # not "body": "stream" starts with "str"
    error = _error_of(httpx.post(f"{srv.url}/v1/chat/completions",
                                 json={**chat, "stream_options": {"include_usage": "x"}}), 400)
    assert error["param"] == "stream_options.include_usage"


def test_raw_invalid_utf8_and_lone_surrogates_become_replacement_characters(
        srv: Running, llm: mistral7b.LLM) -> None:
    body = b'{"model": "smollm2-test", "max_tokens": 2, "temperature": 0, "messages": ' \
           b'[{"role": "user", "content": "Hi \xff\xfe there"}]}'
    r = httpx.post(f"{srv.url}/v1/chat/completions", content=body,
                   headers={"content-type": "application/json"}, timeout=60)
    assert r.status_code == 200, r.text
    expected = llm.tokenizer.encode_chat([{"role": "user", "content": "Hi \ufffd\ufffd there"}])
    assert r.json()["usage"]["prompt_tokens"] == len(expected)
    # A JSON string may carry a lone surrogate escape: the same rule applies.
    r = httpx.post(f"{srv.url}/v1/chat/completions", timeout=60,
                   content=b'{"max_tokens": 2, "messages": [{"role": "user", '
                           b'"content": "Hi \\udc80 there"}]}',
                   headers={"content-type": "application/json"})
    assert r.status_code == 200, r.text
    r = httpx.post(f"{srv.url}/tokenize", content=b'{"prompt": "Hi \\udc80"}',
                   headers={"content-type": "application/json"})
    assert r.json()["tokens"] == llm.tokenizer.encode("Hi \ufffd")


def test_unknown_model_is_404_and_models_can_be_retrieved(srv: Running) -> None:
    chat = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 1}
    error = _error_of(httpx.post(f"{srv.url}/v1/chat/completions",
                                 json={**chat, "model": "gpt-4o"}), 404)
    assert error["code"] == "model_not_found" and error["param"] == "model"
    assert "gpt-4o" in error["message"] and MODEL in error["message"]
    error = _error_of(httpx.post(f"{srv.url}/v1/completions",
                                 json={"prompt": "hi", "model": "gpt-4o"}), 404)
    assert error["code"] == "model_not_found"
    assert srv.client().models.retrieve(MODEL).id == MODEL
    with pytest.raises(openai.NotFoundError):
        srv.client().models.retrieve("gpt-4o")
    # Leaving `model` out is allowed: there is one model.
    assert httpx.post(f"{srv.url}/v1/chat/completions", json=chat,
                      timeout=60).status_code == 200


def test_served_model_name_aliases(llm: mistral7b.LLM) -> None:
    running, server, thread = start_server(llm, state_args={"aliases": ("gpt-4o", "org/m")})
    try:
        client = running.client()
        assert [m.id for m in client.models.list()] == [MODEL, "gpt-4o", "org/m"]
        assert client.models.retrieve("org/m").id == "org/m"
        r = client.completions.create(model="gpt-4o", prompt="Hi", max_tokens=1)
        assert r.model == "gpt-4o"
    finally:
        stop_server(server, thread, running.engine)


def test_developer_role_is_the_system_role(srv: Running, llm: mistral7b.LLM) -> None:
    def messages(role: str) -> list[dict[str, str]]:
        return [{"role": role, "content": "Answer in French."},
                {"role": "user", "content": "What is the capital of Spain?"}]

    r = srv.client().chat.completions.create(model=MODEL, messages=messages("developer"),
                                             temperature=0, max_tokens=8)  # type: ignore
    expected = llm.chat(messages("system"), temperature=0, max_tokens=8, chunk_size=CHUNK)
    assert r.choices[0].message.content == expected.text
    assert r.usage is not None
    assert r.usage.prompt_tokens == len(llm.tokenizer.encode_chat(messages("system")))
    assert llm.tokenizer.encode_chat(messages("developer")) == \
        llm.tokenizer.encode_chat(messages("system"))       # the Python API agrees


def test_assistant_content_may_be_null_but_user_content_may_not(srv: Running) -> None:
    turns = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": None},
             {"role": "user", "content": "Hello?"}]
    r = httpx.post(f"{srv.url}/v1/chat/completions", timeout=60,
                   json={"model": MODEL, "messages": turns, "max_tokens": 2})
    assert r.status_code == 200, r.text
    turns[0]["content"] = None
    error = _error_of(httpx.post(f"{srv.url}/v1/chat/completions",
                                 json={"model": MODEL, "messages": turns}), 400)
    assert error["param"] == "messages[0].content" and "only assistant" in error["message"]


def test_logit_bias_bans_and_forces_tokens(srv: Running, llm: mistral7b.LLM) -> None:
    prompt = "The capital of France is"
    plain = srv.client().completions.create(model=MODEL, prompt=prompt, max_tokens=4,
                                            temperature=0)
    first = llm.tokenizer.encode(plain.choices[0].text, bos=False)[0]
    banned = srv.client().completions.create(model=MODEL, prompt=prompt, max_tokens=4,
                                             temperature=0, logit_bias={str(first): -100})
    assert llm.tokenizer.encode(banned.choices[0].text, bos=False)[0] != first
    forced_id = llm.tokenizer.encode(" banana", bos=False)[0]
    forced = srv.client().chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "Hi"}], max_tokens=3,
        temperature=0, logit_bias={str(forced_id): 100}, logprobs=True)
    assert forced.choices[0].logprobs is not None
    tokens = [t.token for t in forced.choices[0].logprobs.content or []]
    assert tokens == [llm.tokenizer.decode([forced_id])] * 3
    for bias, words in [({"1": 500}, "logit_bias[1]"), ({"x": 1}, "token ids"),
                        ({str(10**9): 1}, "outside the vocabulary")]:
        error = _error_of(httpx.post(f"{srv.url}/v1/completions",
                                     json={"prompt": "hi", "logit_bias": bias}), 400)
        assert words in error["message"] and error["param"].startswith("logit_bias"), error


def test_suffix_and_best_of_are_refused_by_name(srv: Running) -> None:
    for field, value in [("suffix", " the end"), ("best_of", 3)]:
        error = _error_of(httpx.post(f"{srv.url}/v1/completions",
                                     json={"prompt": "hi", field: value}), 400)
        assert error["param"] == field and "not supported" in error["message"]
    ok = httpx.post(f"{srv.url}/v1/completions", timeout=60,
                    json={"prompt": "hi", "max_tokens": 1, "best_of": 1, "suffix": None})
    assert ok.status_code == 200, ok.text


# ---- body limit, tokenization off the event loop, access log ------------------------------

def test_a_body_over_the_limit_is_413(llm: mistral7b.LLM) -> None:
    running, server, thread = start_server(llm, state_args={"max_request_bytes": 1000})
    try:
        big = {"prompt": "x" * 2000}
        error = _error_of(httpx.post(f"{running.url}/v1/completions", json=big), 413)
        assert "1000 bytes" in error["message"] and "--max-request-bytes" in error["message"]

        def chunked() -> Iterator[bytes]:        # no Content-Length: counted as it arrives
            yield b'{"prompt": "'
            for _ in range(20):
                yield b"x" * 100
            yield b'"}'

        error = _error_of(httpx.post(f"{running.url}/v1/completions", content=chunked(),
                                     headers={"content-type": "application/json"}), 413)
        small = httpx.post(f"{running.url}/v1/completions", timeout=60,
                           json={"prompt": "hi", "max_tokens": 1})
        assert small.status_code == 200
    finally:
        stop_server(server, thread, running.engine)


def test_health_answers_while_a_prompt_is_tokenized(srv: Running, llm: mistral7b.LLM,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    import threading

    started, release = threading.Event(), threading.Event()
    real = llm.tokenizer.encode_chat

    def slow_encode_chat(messages: list[dict[str, str]], tools: object = None) -> list[int]:
        started.set()
        release.wait(60)                       # a huge conversation, as slow as we like
        return real(messages, tools)  # type: ignore[arg-type]

    monkeypatch.setattr(llm.tokenizer, "encode_chat", slow_encode_chat)
    with ThreadPoolExecutor(1) as pool:
        pending = pool.submit(httpx.post, f"{srv.url}/v1/chat/completions", timeout=120,
                              json={"messages": [{"role": "user", "content": "hi"}],
                                    "max_tokens": 1})
        assert started.wait(60)
        try:
            # The event loop is free while the tokenizer works.
            assert httpx.get(f"{srv.url}/health", timeout=30).status_code == 200
        finally:
            release.set()
        assert pending.result().status_code == 200


def test_access_log_has_one_line_per_request(llm: mistral7b.LLM,
                                             caplog: pytest.LogCaptureFixture) -> None:
    import logging

    running, server, thread = start_server(llm, state_args={"access_log": True})
    try:
        with caplog.at_level(logging.INFO, logger="mistral7b.access"):
            running.client().completions.create(model=MODEL, prompt="Hi", max_tokens=3,
                                                temperature=0, stream=False)
            list(running.client().completions.create(model=MODEL, prompt="Hi", max_tokens=2,
                                                     temperature=0, stream=True))
            httpx.get(f"{running.url}/nothing")
            assert wait_until(lambda: len(caplog.records) >= 3, 30)
        lines = [r.getMessage() for r in caplog.records if r.name == "mistral7b.access"]
        assert len(lines) == 3, lines
        assert '"POST /v1/completions" 200 in=' in lines[0] and " out=3 " in lines[0]
        assert lines[0].startswith("127.0.0.1 ") and lines[0].endswith("s")
        assert " out=2 " in lines[1]
        assert '"GET /nothing" 404' in lines[2]
    finally:
        stop_server(server, thread, running.engine)
    quiet, server, thread = start_server(llm, state_args={"access_log": False})
    try:
        caplog.clear()
        with caplog.at_level(logging.INFO, logger="mistral7b.access"):
            httpx.get(f"{quiet.url}/health")
        assert not [r for r in caplog.records if r.name == "mistral7b.access"]
    finally:
        stop_server(server, thread, quiet.engine)


def test_a_signal_while_loading_stops_at_once_with_status_0() -> None:
    state = ServerState(model_name="x")                  # never attached: still "loading"
    config = uvicorn.Config(lambda scope, receive, send: None, port=free_port())
    server = DrainingServer(config, state, 300)
    server.handle_exit(signal.SIGTERM, None)
    assert server.should_exit and state.status == "draining"
    assert server._captured_signals == []                # not re-raised: the exit status is 0
