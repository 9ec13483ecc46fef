from __future__ import annotations

import os
import random
from collections.abc import Callable
from typing import Any

import mistral_common
import pytest
from mistral_common.tokens.tokenizers.mistral import MistralTokenizer

from mistral7b.detokenizer import StreamDecoder

DATA_DIR = os.path.join(os.path.dirname(mistral_common.__file__), "data")
TOKENIZER_FILES = {
    "sentencepiece_v1": "tokenizer.model.v1",
    "tekken": "tekken_240911.json",
}

TEXTS = [
    "Hello world",
    " leading space and trailing space ",
    "   three leading spaces",
    "Accents: café, naïve, résumé, Ångström, señor, Øre, Çà et là.",
    "CJK: 日本語のテキストと中文文本，还有한국어 텍스트。",
    "Emoji: 😀🦜👩‍👩‍👧‍👦 🇫🇷 ok 👍🏽!",
    "Rare characters via byte fallback: 𝔘𝔫𝔦 ꙮ 𓂀 𝄞",
    "Line one\nLine two\n\n\tIndented\r\nWindows line\n",
    "Digits 1234567890 and 3.14159, -42, 1e-9, 0x1F.",
    "Mixed: «quotes» — dashes… ∑∫√ ≠ ≤ ≥ ½ ¼ ©®™ ﬁ",
    "def f(x):\n    return x ** 2  # comment\n",
]


@pytest.fixture(scope="module", params=sorted(TOKENIZER_FILES))
def tok(request: pytest.FixtureRequest) -> Any:
    path = os.path.join(DATA_DIR, TOKENIZER_FILES[request.param])
    return MistralTokenizer.from_file(path).instruct_tokenizer.tokenizer


@pytest.fixture(scope="module")
def sp_tok() -> Any:
    path = os.path.join(DATA_DIR, TOKENIZER_FILES["sentencepiece_v1"])
    return MistralTokenizer.from_file(path).instruct_tokenizer.tokenizer


def encode(tok: Any, text: str) -> list[int]:
    return list(tok.encode(text, bos=False, eos=False))


def stream(
    decode: Callable[[list[int]], str], ids: list[int], stop: tuple[str, ...] = ()
) -> tuple[StreamDecoder, list[str], str]:
    decoder = StreamDecoder(decode, stop=stop)
    pieces = [decoder.push(i) for i in ids]
    tail = decoder.flush()
    return decoder, pieces, tail


def byte_decode(ids: list[int]) -> str:
    """A byte-level "tokenizer": every id is one byte."""
    return bytes(ids).decode("utf-8", errors="replace")


def char_decode(ids: list[int]) -> str:
    return "".join(chr(i) for i in ids)


# ---------------------------------------------------------------------------
# real tokenizers: streaming equals full decode
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("text", TEXTS)
def test_stream_equals_full_decode(tok: Any, text: str) -> None:
    ids = encode(tok, text)
    full = tok.decode(ids)
    decoder, pieces, tail = stream(tok.decode, ids)
    assert "".join(pieces) + tail == full
    assert decoder.text == full
    assert not decoder.stopped
    for piece in [*pieces, tail]:
        assert "\ufffd" not in piece


def test_long_mixed_text_streams_exactly(tok: Any) -> None:
    text = "\n".join(TEXTS) * 3
    ids = encode(tok, text)
    _, pieces, tail = stream(tok.decode, ids)
    assert "".join(pieces) + tail == tok.decode(ids)
    assert all("\ufffd" not in p for p in pieces)


def test_sentencepiece_leading_spaces_need_context(sp_tok: Any) -> None:
    text = "The cat sat on the mat"
    ids = encode(sp_tok, text)
    naive = "".join(sp_tok.decode([i]) for i in ids)
    assert naive != sp_tok.decode(ids)  # single-id decoding drops the spaces
    _, pieces, tail = stream(sp_tok.decode, ids)
    assert "".join(pieces) + tail == sp_tok.decode(ids) == text
    assert pieces[1].startswith(" ")


def test_sentencepiece_byte_fallback_is_held_until_complete(sp_tok: Any) -> None:
    ids = encode(sp_tok, "x 𝔘 y")
    # The rare character is made of several byte-fallback pieces.
    assert len(ids) >= 6
    _, pieces, tail = stream(sp_tok.decode, ids)
    assert "𝔘" in pieces
    assert "".join(pieces) + tail == "x 𝔘 y"


def test_ignored_special_tokens_do_not_break_spacing(sp_tok: Any) -> None:
    ids = encode(sp_tok, "Hello there")
    bos = sp_tok.bos_id
    with_specials = [ids[0], bos, bos, *ids[1:], bos]
    _, pieces, tail = stream(sp_tok.decode, with_specials)
    assert "".join(pieces) + tail == sp_tok.decode(with_specials) == "Hello there"


def test_decode_cost_is_bounded(tok: Any) -> None:
    ids = encode(tok, "\n".join(TEXTS) * 10)
    assert len(ids) > 1000
    lengths: list[int] = []

    def counting_decode(window: list[int]) -> str:
        lengths.append(len(window))
        return str(tok.decode(window))

    _, pieces, tail = stream(counting_decode, ids)
    assert "".join(pieces) + tail == tok.decode(ids)
    assert max(lengths) <= 24
    assert len(lengths) <= 2 * len(ids) + 2


# ---------------------------------------------------------------------------
# real tokenizers: stop strings
# ---------------------------------------------------------------------------

STOP_TEXT = "The quick brown fox jumps over the lazy dog. 日本語 😀 café!\nUser: hi\n### END\nmore"


def check_stop(decode: Callable[[list[int]], str], ids: list[int], stops: tuple[str, ...]) -> None:
    full = decode(ids)
    cuts = [full.find(s) for s in stops if s in full]
    assert cuts, "test bug: stop string not in text"
    expected = full[: min(cuts)]

    decoder = StreamDecoder(decode, stop=stops)
    emitted = ""
    for i in ids:
        piece = decoder.push(i)
        emitted += piece
        # Nothing from the matched stop string (or beyond) is ever emitted.
        assert expected.startswith(emitted), (emitted, expected)
        if decoder.stopped:
            break
    assert decoder.stopped
    assert emitted == expected == decoder.text
    assert decoder.push(ids[-1]) == ""
    assert decoder.flush() == ""
    assert decoder.text == expected


@pytest.mark.parametrize(
    "stop",
    [
        "over the lazy",
        "jumps over",
        "lazy dog.",
        "語 😀",
        "😀 ca",
        "\nUser:",
        "###",
        "fé!\nU",
        "The",
        "more",
    ],
)
def test_stop_string_is_cut_exactly(tok: Any, stop: str) -> None:
    check_stop(tok.decode, encode(tok, STOP_TEXT), (stop,))


def test_stop_string_spans_several_tokens(tok: Any) -> None:
    ids = encode(tok, STOP_TEXT)
    stop = "over the lazy"
    # Make sure the test really covers a stop string spread over several ids.
    _, pieces, _ = stream(tok.decode, ids)
    assert not any(stop in p for p in pieces)
    check_stop(tok.decode, ids, (stop,))


def test_every_substring_as_stop(tok: Any) -> None:
    ids = encode(tok, STOP_TEXT)
    full = tok.decode(ids)
    rng = random.Random(0)
    for _ in range(150):
        start = rng.randrange(len(full) - 1)
        length = rng.randint(1, 8)
        stop = full[start : start + length]
        if stop.strip() == "" and len(stop) == 1:
            continue
        check_stop(tok.decode, ids, (stop,))


def test_earliest_of_several_stops_wins(tok: Any) -> None:
    ids = encode(tok, STOP_TEXT)
    check_stop(tok.decode, ids, ("### END", "lazy", "never appears"))
    check_stop(tok.decode, ids, ("never appears", "fox jumps over the lazy dog", "quick"))


def test_unfinished_stop_string_is_flushed(tok: Any) -> None:
    text = "Result: 42 ###"
    ids = encode(tok, text)
    decoder = StreamDecoder(tok.decode, stop=("### done", "<|end|>"))
    pushed = "".join(decoder.push(i) for i in ids)
    assert not pushed.endswith("#")  # a possible stop start is held back
    tail = decoder.flush()
    assert tail == "###"
    assert pushed + tail == tok.decode(ids)
    assert not decoder.stopped
    assert decoder.text == tok.decode(ids)


# ---------------------------------------------------------------------------
# byte-level fake tokenizer: UTF-8 handling
# ---------------------------------------------------------------------------


def test_split_utf8_character_waits_for_completion() -> None:
    decoder = StreamDecoder(byte_decode)
    emoji = "😀".encode()
    assert len(emoji) == 4
    assert decoder.push(ord("a")) == "a"
    assert [decoder.push(b) for b in emoji] == ["", "", "", "😀"]
    assert decoder.flush() == ""
    assert decoder.text == "a😀"


def test_invalid_bytes_do_not_stall_the_stream() -> None:
    decoder = StreamDecoder(byte_decode)
    ids = [0xFF] * 12
    pieces = [decoder.push(b) for b in ids]
    first = next(i for i, p in enumerate(pieces) if p)
    assert first <= 5  # given up after more than 4 extra held ids
    assert "".join(pieces) + decoder.flush() == byte_decode(ids)


def test_truncated_sequence_at_end_is_flushed() -> None:
    ids = [ord("A"), 0xF0, 0x9F]
    decoder = StreamDecoder(byte_decode)
    assert [decoder.push(b) for b in ids] == ["A", "", ""]
    assert decoder.flush() == "\ufffd"
    assert decoder.text == byte_decode(ids)


@pytest.mark.parametrize("seed", range(5))
def test_random_utf8_text_streams_exactly(seed: int) -> None:
    rng = random.Random(seed)
    alphabet = "ab é中😀\n𝔘ßж" + "".join(chr(c) for c in range(0x3040, 0x3060))
    text = "".join(rng.choice(alphabet) for _ in range(300))
    ids = list(text.encode())
    _, pieces, tail = stream(byte_decode, ids)
    assert "".join(pieces) + tail == text
    assert all("\ufffd" not in p for p in pieces)


def test_stop_string_with_multibyte_characters_bytewise() -> None:
    text = "abc 日本語 😀😀 end"
    ids = list(text.encode())
    check_stop(byte_decode, ids, ("😀 e",))
    check_stop(byte_decode, ids, ("本語",))


# ---------------------------------------------------------------------------
# character-level fake tokenizer: stop-string hold-back edge cases
# ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "stop", "expected"),
    [
        ("aaab", "aab", "a"),
        ("abcabd", "abd", "abc"),
        ("STOPxx", "STOP", ""),
        ("xxababaca", "ababaca", "xx"),
        ("a<|e<|end|>", "<|end|>", "a<|e"),
    ],
)
def test_overlapping_stop_prefixes(text: str, stop: str, expected: str) -> None:
    ids = [ord(c) for c in text]
    check_stop(char_decode, ids, (stop,))
    _, pieces, tail = stream(char_decode, ids, (stop,))
    assert "".join(pieces) + tail == expected


def test_text_is_released_as_soon_as_it_cannot_start_a_stop() -> None:
    decoder = StreamDecoder(char_decode, stop=("END",))
    assert decoder.push(ord("x")) == "x"
    assert decoder.push(ord("E")) == ""
    assert decoder.push(ord("N")) == ""
    assert decoder.push(ord("x")) == "ENx"
    assert decoder.push(ord("E")) == ""
    assert decoder.push(ord("N")) == ""
    assert decoder.push(ord("D")) == ""
    assert decoder.stopped
    assert decoder.text == "xENx"


def test_empty_stop_string_is_rejected() -> None:
    with pytest.raises(ValueError):
        StreamDecoder(char_decode, stop=("ok", ""))


def test_earliest_stop_wins_when_several_complete_in_one_step() -> None:
    words = ["xx ", "hello world ", "again"]

    def word_decode(ids: list[int]) -> str:
        return "".join(words[i] for i in ids)

    decoder = StreamDecoder(word_decode, stop=("world", "hello", "llo w"))
    assert decoder.push(0) == "xx "
    assert decoder.push(1) == ""
    assert decoder.stopped
    assert decoder.text == "xx "
