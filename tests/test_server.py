"""The OpenAI-compatible server on 127.0.0.1 with the default model, driven by the real `openai`
client and by raw HTTP for the error cases."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import httpx
import openai
import pytest

import mistral7b
from mistral7b.server.app import ServerState
from tests.conftest import wait_until
from tests.serving import CHUNK, Running, free_port, serve_app, start_server, stop_server

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
    kwargs = dict(model="m", temperature=0, max_tokens=32,
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
    r = srv.client().completions.create(model="m", prompt=prompt, temperature=0, max_tokens=12,
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
    assert len(lp.token_logprobs) == 12 and all(len(t) <= 3 for t in lp.top_logprobs)
    for chosen, tops in zip(lp.token_logprobs, lp.top_logprobs, strict=True):
        assert chosen <= 0 and abs(chosen - max(tops.values())) < 1e-5   # greedy: the best


def test_completion_stream_and_stop_string(srv: Running, llm: mistral7b.LLM) -> None:
    prompt = "Once upon a time"
    full = llm.generate(prompt, temperature=0, max_tokens=30, ignore_eos=True,
                        chunk_size=CHUNK).text
    word = full.split()[4]
    chunks = list(srv.client().completions.create(model="m", prompt=prompt, temperature=0,
                                                  max_tokens=30, stop=[word], stream=True,
                                                  extra_body={"ignore_eos": True}))
    text = "".join(c.choices[0].text for c in chunks)
    assert text == full[: full.index(word)]
    assert chunks[-1].choices[0].finish_reason == "stop"


def test_several_prompts_in_one_completion_request(srv: Running, llm: mistral7b.LLM) -> None:
    prompts = ["The capital of France is", "Once upon a time"]
    r = srv.client().completions.create(model="m", prompt=prompts, n=2, temperature=0,
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
        model="m", messages=[{"role": "user", "content": "Write a word."}], n=2,
        temperature=1.0, seed=7, max_tokens=8, logprobs=True, top_logprobs=2)
    assert [c.index for c in r.choices] == [0, 1]
    assert r.usage is not None
    counts = [len(c.logprobs.content or []) for c in r.choices]   # type: ignore[union-attr]
    assert r.usage.completion_tokens == sum(counts) and all(0 < n <= 8 for n in counts)
    for c in r.choices:
        for item in c.logprobs.content or []:                        # type: ignore[union-attr]
            assert item.logprob <= 0 and len(item.top_logprobs) == 2
    again = srv.client().chat.completions.create(
        model="m", messages=[{"role": "user", "content": "Write a word."}], n=2,
        temperature=1.0, seed=7, max_tokens=8)
    assert [c.message.content for c in again.choices] == [c.message.content for c in r.choices]


def test_sixteen_concurrent_streams_get_their_solo_text(srv: Running,
                                                        llm: mistral7b.LLM) -> None:
    def ask(question: str) -> str:
        stream = srv.client().chat.completions.create(
            model="m", messages=[{"role": "user", "content": question}], temperature=0,
            max_tokens=40, stream=True)
        return "".join(c.choices[0].delta.content or "" for c in stream if c.choices)

    alone = [alone_chat(llm, q, 40) for q in QUESTIONS]
    with ThreadPoolExecutor(len(QUESTIONS)) as pool:
        together = list(pool.map(ask, QUESTIONS))
    assert together == alone
    assert wait_until(lambda: srv.engine.stats().running == 0, 5)


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
    srv.client().completions.create(model="m", prompt="Hi", max_tokens=3, temperature=0)
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
    ({"temperature": 5}, "temperature", "less than or equal to 2"),
    ({"temperature": "hot"}, "temperature", "number"),
    ({"messages": []}, "messages", "at least 1"),
    ({"messages": [{"role": "wizard", "content": "hi"}]}, "messages[0].role", "system"),
    ({"messages": [{"role": "user"}]}, "messages[0].content", "required"),
    ({"n": 0}, "n", "greater than or equal to 1"),
    ({"top_p": 0}, "top_p", "greater than 0"),
    ({"stop": ""}, "stop", "empty"),
    ({"top_logprobs": 2}, "top_logprobs", "logprobs"),
])
def test_invalid_fields_get_400_naming_the_field(srv: Running, body: dict, param: str,
                                                 words: str) -> None:
    request = {"model": "m", "messages": [{"role": "user", "content": "hi"}], **body}
    r = httpx.post(f"{srv.url}/v1/chat/completions", json=request)
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["param"] == param and error["type"] == "invalid_request_error"
    assert error["message"].startswith(param) and words in error["message"]


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

    real_add = SequenceState.add

    def add(self: SequenceState, logits: object) -> object:
        if self.params.seed == 666:
            raise RuntimeError("the sampler exploded")
        return real_add(self, logits)  # type: ignore[arg-type]

    monkeypatch.setattr(SequenceState, "add", add)
    r = httpx.post(f"{srv.url}/v1/completions", json={"prompt": "hi", "seed": 666},
                   timeout=60)
    assert r.status_code == 500 and "sampler exploded" in r.json()["error"]["message"]
    ok = httpx.post(f"{srv.url}/v1/completions", json={"prompt": "hi", "max_tokens": 4},
                    timeout=60)
    assert ok.status_code == 200


# ---- disconnects, keep-alive, shutdown ----------------------------------------------------

def test_client_disconnect_frees_the_row(srv: Running) -> None:
    body = {"prompt": "Count:", "max_tokens": 4000, "ignore_eos": True, "stream": True}
    with httpx.stream("POST", f"{srv.url}/v1/completions", json=body, timeout=60) as r:
        lines = r.iter_lines()
        for line in lines:
            if line.startswith("data: ") and '"text"' in line:
                break
        assert srv.engine.stats().running == 1
    # The connection is closed: the engine must drop the sequence within a second.
    assert wait_until(lambda: srv.engine.stats().running == 0, 1.0)
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
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "mistral7b", "serve", "--port", str(port), "--max-batch", "2"],
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
        body = {"prompt": "Count:", "max_tokens": 200, "ignore_eos": True, "stream": True}
        texts: list[str] = []
        finish = None
        with httpx.stream("POST", f"{url}/v1/completions", json=body, timeout=120) as r:
            for line in r.iter_lines():
                if not line.startswith("data: {"):
                    continue
                chunk = json.loads(line[6:])
                if not texts:
                    proc.send_signal(signal.SIGTERM)        # mid-stream
                texts.append(chunk["choices"][0]["text"])
                finish = chunk["choices"][0]["finish_reason"] or finish
        assert finish == "length"
        with pytest.raises(httpx.HTTPError):               # no new connections are accepted
            httpx.get(f"{url}/health", timeout=2)
        assert proc.wait(timeout=60) == 0
        assert "shutting down" in (proc.stderr.read() if proc.stderr else "")
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
