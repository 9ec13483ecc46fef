"""The Python API's edges: empty batches, text or ids everywhere, streaming chat, logit bias,
undecodable text and device names (issue 11)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import mistral7b
from mistral7b.guardrails.safety import SAFETY_PROMPT, with_safety_prompt
from mistral7b.text import clean_bytes, clean_text


@pytest.fixture(scope="module")
def v1(native_v1_dir: Path) -> mistral7b.LLM:
    """A tiny Mistral with mistral-common's v1 tokenizer."""
    return mistral7b.load(native_v1_dir)


@pytest.fixture(scope="module")
def smol() -> mistral7b.LLM:
    """The default model: a GGUF vocabulary through `tokenizers`, with a Jinja chat template."""
    return mistral7b.load()


def test_clean_text_replaces_what_is_not_unicode() -> None:
    assert clean_text("plain é ✓") == "plain é ✓"
    assert clean_text("Hello \udcff\udcfe") == "Hello \ufffd\ufffd"     # argv's escaped bytes
    assert clean_text("caf\udcc3\udca9") == "café"                    # escaped valid UTF-8
    assert clean_text("a \ud800 b \udfff") == "a \ufffd b \ufffd"        # other lone surrogates
    assert clean_bytes(b"ok \xff\xfe") == "ok \ufffd\ufffd"


@pytest.mark.parametrize("which", ["v1", "smol"])
def test_lone_surrogates_generate_as_replacement_characters(which: str,
                                                            request: pytest.FixtureRequest
                                                            ) -> None:
    llm: mistral7b.LLM = request.getfixturevalue(which)
    bad = llm.generate("Hi \udc80 there", max_tokens=3, temperature=0)
    good = llm.generate("Hi \ufffd there", max_tokens=3, temperature=0)
    assert bad.token_ids == good.token_ids and bad.prompt_tokens == good.prompt_tokens
    chat = llm.chat([{"role": "user", "content": "Hi \udc80"}], max_tokens=2, temperature=0)
    assert chat.token_ids == llm.chat([{"role": "user", "content": "Hi \ufffd"}], max_tokens=2,
                                      temperature=0).token_ids


def test_generate_batch_of_nothing_is_nothing(v1: mistral7b.LLM) -> None:
    assert v1.generate_batch([]) == []
    assert v1.generate_batch([], max_tokens=3) == []
    with pytest.raises(mistral7b.InvalidArgumentError, match="2 SamplingParams for 1 prompts"):
        v1.generate_batch(["a"], [mistral7b.SamplingParams()] * 2)


def test_logits_take_text_or_ids_and_name_a_wrong_type(v1: mistral7b.LLM) -> None:
    text = "Hello world"
    assert torch.equal(v1.logits(text), v1.logits(v1.tokenizer.encode(text)))
    with pytest.raises(mistral7b.Mistral7BError, match="bytes"):
        v1.logits(b"Hello")  # type: ignore[arg-type]
    with pytest.raises(mistral7b.Mistral7BError, match=r"prompt\[1\].*float"):
        v1.logits([1, 2.5])  # type: ignore[list-item]


def test_invalid_sampling_param_is_exported(v1: mistral7b.LLM) -> None:
    assert "InvalidSamplingParam" in mistral7b.__all__
    with pytest.raises(mistral7b.InvalidSamplingParam, match="top_p"):
        v1.generate("Hi", top_p=0)
    assert issubclass(mistral7b.InvalidSamplingParam, mistral7b.Mistral7BError)


def test_stream_chat_streams_what_chat_answers(smol: mistral7b.LLM) -> None:
    messages = [{"role": "developer", "content": "Answer briefly."},
                {"role": "user", "content": "What is the capital of France?"}]
    whole = smol.chat(messages, max_tokens=12, temperature=0)
    pieces = list(smol.stream_chat(messages, max_tokens=12, temperature=0))
    assert "".join(p.text for p in pieces) == whole.text
    assert [t for p in pieces for t in p.token_ids] == whole.token_ids
    assert pieces[-1].finish_reason == whole.finish_reason
    system = [{"role": "system", "content": "Answer briefly."}, messages[1]]
    assert smol.chat(system, max_tokens=12, temperature=0).text == whole.text


@pytest.mark.parametrize("which", ["v1", "smol"])
def test_the_safety_prompt_joins_a_developer_message_as_the_system_one(
        which: str, request: pytest.FixtureRequest) -> None:
    llm: mistral7b.LLM = request.getfixturevalue(which)

    def ids(role: str) -> tuple[int, list[int]]:
        r = llm.chat([{"role": role, "content": "Answer briefly."},
                      {"role": "user", "content": "Hi"}], max_tokens=1, temperature=0,
                     safe_prompt=True)
        return r.prompt_tokens, r.token_ids

    assert ids("developer") == ids("system")

    joined = with_safety_prompt([{"role": "developer", "content": "Be brief."}])
    assert joined == [{"role": "system", "content": f"{SAFETY_PROMPT}\n\nBe brief."}]


def test_logit_bias_in_the_python_api(v1: mistral7b.LLM) -> None:
    plain = v1.generate("1 2 3", max_tokens=4, temperature=0, ignore_eos=True)
    first = plain.token_ids[0]
    banned = v1.generate("1 2 3", max_tokens=4, temperature=0, ignore_eos=True,
                         logit_bias={first: -100})
    assert banned.token_ids[0] != first
    forced = v1.generate("1 2 3", max_tokens=4, temperature=0.8, seed=1, ignore_eos=True,
                         logit_bias={"7": 100})          # JSON-style string keys too
    assert forced.token_ids == [7, 7, 7, 7]
    with pytest.raises(mistral7b.InvalidSamplingParam, match=r"logit_bias\[7\]"):
        mistral7b.SamplingParams(logit_bias={7: 101})
    with pytest.raises(mistral7b.InvalidArgumentError, match="outside the vocabulary"):
        v1.generate("1 2 3", logit_bias={10**6: 1})


@pytest.mark.parametrize("device", ["banana", "cuda:7" if torch.cuda.is_available() else "cuda"])
def test_a_device_that_is_not_here_is_named_with_the_ones_that_are(device: str) -> None:
    with pytest.raises(mistral7b.InvalidArgumentError) as caught:
        mistral7b.load(device=device)
    message = str(caught.value)
    assert repr(device) in message and "available here: cpu" in message
