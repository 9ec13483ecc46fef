"""Mistral's real v1 tokenizer (from mistral-common) and the paper's instruct format."""

from __future__ import annotations

from pathlib import Path

import pytest
import sentencepiece

import mistral7b
from mistral7b.errors import InvalidArgumentError
from mistral7b.tokenizer import MistralCommonTokenizer
from tests.conftest import MISTRAL_V1_TOKENIZER

TEXTS = ["Hello world", "  leading spaces", "naïve café — 東京 🚀", "line\nbreaks\n\n", "12345 67"]


@pytest.fixture(scope="module")
def v1() -> MistralCommonTokenizer:
    return MistralCommonTokenizer(MISTRAL_V1_TOKENIZER)


@pytest.fixture(scope="module")
def spm() -> sentencepiece.SentencePieceProcessor:
    return sentencepiece.SentencePieceProcessor(model_file=str(MISTRAL_V1_TOKENIZER))


def test_v1_round_trip_and_sentencepiece_agreement(v1, spm) -> None:
    assert v1.vocab_size == 32000 and v1.bos_id == 1 and v1.eos_ids == {2}
    for text in TEXTS:
        ids = v1.encode(text, bos=True)
        assert ids == [1, *spm.encode(text)]
        assert v1.decode(ids) == spm.decode(spm.encode(text))
    assert v1.decode(v1.encode("Hello world")) == "Hello world"


def test_v1_two_turn_chat_with_system_prompt(v1, spm) -> None:
    """mistral-common's encoding and the paper's format written out by hand agree: the system
    prompt is prepended to the first user message with a blank line."""
    messages = [
        {"role": "system", "content": "Answer briefly."},
        {"role": "user", "content": "What is the capital of France?"},
        {"role": "assistant", "content": "Paris."},
        {"role": "user", "content": "And of Italy?"},
    ]
    from mistral_common.protocol.instruct.messages import (
        AssistantMessage,
        SystemMessage,
        UserMessage,
    )
    from mistral_common.protocol.instruct.request import ChatCompletionRequest
    from mistral_common.tokens.tokenizers.mistral import MistralTokenizer

    reference = MistralTokenizer.from_file(str(MISTRAL_V1_TOKENIZER)).encode_chat_completion(
        ChatCompletionRequest(messages=[SystemMessage(content="Answer briefly."),
                                        UserMessage(content="What is the capital of France?"),
                                        AssistantMessage(content="Paris."),
                                        UserMessage(content="And of Italy?")])).tokens
    ours = v1.encode_chat(messages)
    assert ours == reference
    # <s>[INST] {system}\n\n{user} [/INST]{assistant}</s>[INST] {user} [/INST]
    by_hand = [1, *spm.encode("[INST] Answer briefly.\n\nWhat is the capital of France? [/INST]"),
               *spm.encode("Paris."), 2, *spm.encode("[INST] And of Italy? [/INST]")]
    assert ours == by_hand


@pytest.mark.parametrize(("messages", "field"), [
    ([], "empty"),
    ([{"role": "robot", "content": "hi"}], "unknown role"),
    ([{"role": "user"}], "messages\\[0\\]"),
    ([{"role": "assistant", "content": "a"}, {"role": "assistant", "content": "b"}], "messages"),
    # mistral-common itself would join these; the v1 format has no such conversation.
    ([{"role": "user", "content": "a"}, {"role": "user", "content": "b"}],
     r"messages\[1\]\.role: expected assistant"),
    ([{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"},
      {"role": "system", "content": "c"}, {"role": "user", "content": "d"}],
     r"messages\[2\]: a system message must be the first"),
])
def test_bad_conversations_are_clear_errors(v1, messages, field: str) -> None:
    with pytest.raises(InvalidArgumentError, match=field):
        v1.encode_chat(messages)


def test_tokenizer_is_found_next_to_native_weights(native_v1_dir: Path) -> None:
    llm = mistral7b.load(native_v1_dir)
    assert "tokenizer.model.v1" in llm.tokenizer.name
    assert llm.tokenizer.encode("Hello", bos=True)[0] == 1
