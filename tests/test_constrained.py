"""Constrained decoding (constrained.py): answers that follow JSON, a JSON schema, a Lark grammar
or a regex; the token masks against llguidance's own matcher; every tokenizer kind we load."""

from __future__ import annotations

import json
import os
from pathlib import Path

import jsonschema
import llguidance
import pytest
import torch

import mistral7b
from mistral7b.constrained import (
    Constraint,
    ResponseFormat,
    _ByteVocabulary,
    allowed_tokens,
    lltokenizer,
    token_bytes,
)
from mistral7b.errors import InvalidArgumentError
from mistral7b.sampling import SamplingParams
from mistral7b.tokenizer import MissingTokenizer, MistralCommonTokenizer

SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 24},
        "age": {"type": "integer", "minimum": 0},
        "color": {"enum": ["black", "white", "orange"]},
        "toys": {"type": "array", "items": {"type": "string", "maxLength": 12}, "maxItems": 3},
        "owner": {"type": "object",
                  "properties": {"name": {"type": "string", "maxLength": 16},
                                 "city": {"type": "string", "maxLength": 16}},
                  "required": ["name"], "additionalProperties": False},
    },
    "required": ["name", "age", "color", "owner"],
    "additionalProperties": False,
}
ASK = [{"role": "user", "content": "Describe a cat as a JSON object."}]


@pytest.fixture(scope="module")
def llm() -> mistral7b.LLM:
    return mistral7b.load(progress=False)            # the default model


def mistral_common_tokenizer(name: str) -> MistralCommonTokenizer:
    import mistral_common

    return MistralCommonTokenizer(Path(os.path.dirname(mistral_common.__file__)) / "data" / name)


def sampled_answers(llm: mistral7b.LLM, fmt: ResponseFormat, max_tokens: int, seeds: int = 20,
                    ask: list[dict[str, str]] = ASK) -> list[tuple[str, str | None]]:
    prompt = llm.tokenizer.encode_chat(ask)
    params = [SamplingParams(max_tokens=max_tokens, temperature=1.0, seed=s,
                             response_format=fmt) for s in range(seeds)]
    return [(r.text, r.finish_reason) for r in llm.generate_batch([prompt] * seeds, params)]


def test_json_mode_answers_parse(llm: mistral7b.LLM) -> None:
    """All 20 sampled answers end and parse when the prompt says what the object holds (as
    OpenAI's docs ask of JSON mode). JSON mode itself bounds nothing: asked only for "a JSON
    object", the 135M model at temperature 1.0 writes an endless one for a few seeds."""
    ask = [{"role": "user", "content": "Describe a cat as a JSON object with the keys name, "
                                       "age and color."}]
    answers = sampled_answers(llm, ResponseFormat.json_object(), max_tokens=400, ask=ask)
    assert all(reason == "stop" for _, reason in answers), answers
    for text, _ in answers:
        assert isinstance(json.loads(text), dict), text
    assert len({text for text, _ in answers}) > 10


def test_json_schema_answers_always_validate(llm: mistral7b.LLM) -> None:
    """A schema that bounds its strings and arrays: all 20 sampled answers end and validate."""
    answers = sampled_answers(llm, ResponseFormat.json_schema(SCHEMA), max_tokens=400)
    assert all(reason == "stop" for _, reason in answers), answers
    for text, _ in answers:
        jsonschema.validate(json.loads(text), SCHEMA)
    assert len({text for text, _ in answers}) > 10   # sampled, not one answer forced 20 times


def test_lark_and_regex_grammars(llm: mistral7b.LLM) -> None:
    answer = llm.generate("Is the sky blue? Answer:", grammar='start: " yes" | " no"',
                          temperature=0)
    assert answer.text in (" yes", " no") and answer.finish_reason == "stop"
    date = llm.generate("Today's date:", temperature=0,
                        response_format=ResponseFormat.regex(r" \d{4}-\d\d-\d\d"))
    assert date.finish_reason == "stop"
    assert len(date.text) == 11 and date.text[5] == "-" and date.text[1:5].isdigit()


def test_an_answer_cut_by_max_tokens_ends_with_length(llm: mistral7b.LLM) -> None:
    result = llm.chat(ASK, max_tokens=5, temperature=0, response_format={"type": "json_object"})
    assert result.finish_reason == "length"
    assert result.text.lstrip().startswith("{")


def test_constrained_and_free_rows_in_one_batch_equal_their_solo_runs(llm: mistral7b.LLM
                                                                      ) -> None:
    prompt = llm.tokenizer.encode_chat(ASK)
    params = [SamplingParams(max_tokens=40, temperature=0.8, seed=1,
                             response_format=ResponseFormat.json_schema(SCHEMA)),
              SamplingParams(max_tokens=20, temperature=0.8, seed=2),
              SamplingParams(max_tokens=40, temperature=0, response_format={"type":
                                                                            "json_object"})]
    together = llm.generate_batch([prompt] * 3, params)
    alone = [llm.generate_batch([prompt], [p])[0] for p in params]
    assert [r.token_ids for r in together] == [r.token_ids for r in alone]


@pytest.mark.parametrize("fmt, problem", [
    ({"type": "json_schema", "json_schema": {"schema": {"type": "objekt"}}}, "objekt"),
    ({"type": "json_schema", "json_schema": {"schema": {"type": "string", "format": "nope"}}},
     "nope"),
    ({"type": "json_schema", "json_schema": {"schema": {"type": "object",
                                                        "dependentSchemas": {}}}},
     "dependentSchemas"),                            # unsupported keywords are named
    ({"type": "xml"}, "response_format.type"),
    ({"type": "json_schema"}, "json_schema.schema"),
])
def test_bad_formats_are_refused_naming_the_problem(llm: mistral7b.LLM, fmt: dict,
                                                    problem: str) -> None:
    with pytest.raises(InvalidArgumentError, match=problem):
        llm.chat(ASK, response_format=fmt)


def test_bad_grammars_are_refused() -> None:
    with pytest.raises(InvalidArgumentError, match="lark grammar"):
        mistral7b.load(progress=False).generate("x", grammar="start: foo(")
    with pytest.raises(InvalidArgumentError, match="not both"):
        SamplingParams(grammar='start: "a"', response_format={"type": "json_object"})
    assert SamplingParams(response_format={"type": "text"}).response_format is None
    # The format made from a grammar survives dataclasses.replace (as LLM.chat's tools do).
    from dataclasses import replace

    lark = SamplingParams(grammar='start: "a"')
    assert replace(lark, temperature=0).response_format == lark.response_format


def test_a_model_without_a_tokenizer_cannot_be_constrained(llm: mistral7b.LLM) -> None:
    with pytest.raises(InvalidArgumentError, match="needs a tokenizer"):
        Constraint(ResponseFormat.json_object(), MissingTokenizer(Path("w"), 100), 100)


@pytest.mark.parametrize("tokenizer", ["default", "tokenizer.model.v1", "tekken_240911.json"])
def test_masks_equal_the_matchers_own_answers(llm: mistral7b.LLM, tokenizer: str) -> None:
    """Along a valid document, for each tokenizer kind (HF tokenizers: the default model's GGUF
    vocabulary; SentencePiece with byte fallback; tekken): the tokens our bitmask allows are
    exactly those llguidance's own byte-per-token mask allows, none of them is one its matcher
    refuses, and the document's next token is among them."""
    tok = llm.tokenizer if tokenizer == "default" else mistral_common_tokenizer(tokenizer)
    vocab = llm.config.vocab_size if tokenizer == "default" else tok.vocab_size
    fmt = ResponseFormat.json_schema(SCHEMA)
    constraint = Constraint(fmt, tok, vocab)
    reference = llguidance.LLMatcher(lltokenizer(tok, vocab), fmt.grammar())
    document = '{"name": "Tom", "age": 3, "color": "black", "owner": {"name": "Ann"}}'
    # Tokens that spell the document exactly (SentencePiece's own encoding adds a space).
    tokens = lltokenizer(tok, vocab).tokenize_str(document)
    assert b"".join(token_bytes_of(tok, vocab, tokens)) == document.encode()
    for token in [*tokens[:12], None]:
        bits = torch.empty(1, Constraint.mask_words(vocab), dtype=torch.int32)
        constraint.fill(bits[0])
        allowed = allowed_tokens(bits, vocab)[0]
        bias = torch.frombuffer(bytearray(reference.compute_logit_bias()), dtype=torch.uint8)
        assert torch.equal(allowed, bias[:vocab] > 0)
        for t in allowed.nonzero()[:300, 0].tolist():
            assert reference.validate_tokens([t]) == 1, t
        if token is not None:
            assert allowed[token]
            constraint.accept(token)
            assert reference.consume_token(token)


def token_bytes_of(tok: object, vocab: int, ids: list[int]) -> list[bytes]:
    raw = lltokenizer(tok, vocab)
    return [raw.decode_bytes([i]) for i in ids]


def test_sentencepiece_token_bytes() -> None:
    """Byte-fallback pieces are their byte, "▁" is a space, control tokens are special, and the
    pieces of a text join to the text."""
    tok = mistral_common_tokenizer("tokenizer.model.v1")
    pieces = token_bytes(tok, tok.vocab_size + 3)
    assert len(pieces) == tok.vocab_size + 3 and pieces[-1] == b""
    assert pieces[tok.vocab_size - 3:tok.vocab_size] != [b"", b"", b""]
    assert pieces[3 + 0x41] == b"A"                   # <0x41>, after <unk> <s> </s>
    assert pieces[1].startswith(b"\xff") and pieces[2].startswith(b"\xff")
    text = "Grüße, 世界 — naïve café"
    ids = tok.encode(text, bos=False)
    assert b"".join(pieces[i] for i in ids).decode().strip() == text
    # What llguidance tokenizes with must spell its input exactly, with no dummy-prefix space.
    encoder = _ByteVocabulary(tok, tok.vocab_size)
    for sample in ("{", '{"name"', " x", "\n\n  }", text):
        assert b"".join(pieces[i] for i in encoder(sample)) == sample.encode()


def test_tekken_token_bytes() -> None:
    tok = mistral_common_tokenizer("tekken_240911.json")
    pieces = token_bytes(tok, tok.vocab_size)
    assert all(p.startswith(b"\xff") for p in pieces[:1000])      # the special tokens
    text = "Grüße, 世界 — naïve café"
    assert b"".join(pieces[i] for i in tok.encode(text, bos=False)).decode() == text


def test_a_bad_grammar_in_a_batch_leaves_nothing_queued(llm: mistral7b.LLM) -> None:
    """run_requests compiles each request's grammar as it submits it: when a later one fails,
    those already submitted are cancelled, not left in the engine's queue."""
    from mistral7b.engine.engine import run_requests

    engine = llm.engine(max_batch=2)
    good = SamplingParams(max_tokens=4, response_format={"type": "json_object"})
    bad = SamplingParams(max_tokens=4, response_format={
        "type": "json_schema", "json_schema": {"schema": {"type": "objekt"}}})
    with pytest.raises(InvalidArgumentError, match="objekt"):
        list(run_requests(engine, [[1, 2], [1, 2]], [good, bad]))
    engine.run_once()                                # drops what was cancelled
    assert engine.stats().waiting == 0 and engine.stats().running == 0
