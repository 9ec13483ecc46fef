"""The tokenizer a GGUF file describes in its metadata, rebuilt with Hugging Face `tokenizers`.

A GGUF carries no tokenizer.json: it stores the vocabulary under llama.cpp's keys
(`tokenizer.ggml.*`). Two kinds are supported, named by `tokenizer.ggml.model`:

* ``"llama"``: a SentencePiece vocabulary (pieces, scores, token types, ``<0x0A>`` byte pieces).
  llama.cpp encodes every such file with SentencePiece's BPE procedure: repeatedly merge the
  adjacent pair whose concatenation is a piece with the highest score, leftmost first on ties.
  That is a `tokenizers` BPE whose merge ranks follow the scores, so the merges are derived from
  the vocabulary (``a + b == piece``, ranked by the piece's score). Mistral's tokenizer.model.v1
  is such a SentencePiece BPE model, and for it this gives SentencePiece's own ids.
  Whitespace follows SentencePiece and llama.cpp: spaces become ``▁`` and, when
  `tokenizer.ggml.add_space_prefix` says so (the default), one ``▁`` is prepended to the text,
  and to each run of text after a special token, as llama.cpp does.
* ``"gpt2"``: a byte-level BPE with its merges listed in the file. How the text is split before
  BPE comes from `tokenizer.ggml.pre` (see `PRE_TOKENIZERS`); an unknown name falls back to GPT-2's
  split with a logged warning, which is right for most and wrong only around digits and
  punctuation runs.

Tokens the file marks as control (type 3) become special added tokens and user-defined ones
(type 4) plain added tokens, as transformers does, so a rendered chat template containing
``<|im_start|>`` encodes it as one id. `decode` skips the special ones.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from mistral7b.errors import TokenizerError
from mistral7b.tokenizer import BackendTokenizer

log = logging.getLogger(__name__)

# llama.cpp's token types (`tokenizer.ggml.token_type`).
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6

SUPPORTED_MODELS = ("llama", "gpt2")
# What llama.cpp writes for a model file without a vocabulary: such a file runs on token ids.
NO_VOCABULARY = ("none", "no_vocab")

# How a byte-level vocabulary splits text before BPE, by `tokenizer.ggml.pre`: a split pattern,
# or GPT-2's own split (built into `tokenizers`' ByteLevel pre-tokenizer), possibly after cutting
# out every digit. The patterns are the ones the models' tokenizer.json files (and llama.cpp) use.
_LLAMA3 = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
           r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_QWEN2 = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
          r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_TEKKEN = (r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+"
           r"|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*"
           r"|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_GPT2 = "gpt2"
_GPT2_DIGITS = "gpt2 with single digits"

PRE_TOKENIZERS: dict[str, str] = {
    "default": _GPT2,
    "gpt2": _GPT2,
    "mpt": _GPT2,
    "olmo": _GPT2,
    "jais": _GPT2,
    # SmolLM, StarCoder and kin: every digit on its own, then GPT-2's split (as llama.cpp does,
    # and as SmolLM2's tokenizer.json does with a Digits pre-tokenizer).
    "smollm": _GPT2_DIGITS,
    "starcoder": _GPT2_DIGITS,
    "refact": _GPT2_DIGITS,
    "command-r": _GPT2_DIGITS,
    "codeshell": _GPT2_DIGITS,
    "exaone": _GPT2_DIGITS,
    "llama-bpe": _LLAMA3,
    "llama3": _LLAMA3,
    "llama-v3": _LLAMA3,
    "qwen2": _QWEN2,
    "tekken": _TEKKEN,  # Mistral NeMo and later; the pattern of mistral-common's tekken.json
}
DEFAULT_PRE = "default"


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's spelling of bytes as printable characters, the alphabet of byte-level vocabularies.

    Printable Latin-1 bytes stand for themselves; the other 68 get U+0100 onwards, in byte order.
    """
    printable = [*range(0x21, 0x7F), *range(0xA1, 0xAD), *range(0xAE, 0x100)]
    spelling = {b: chr(b) for b in printable}
    extra = 0
    for b in range(256):
        if b not in spelling:
            spelling[b] = chr(0x100 + extra)
            extra += 1
    return spelling


def _require(metadata: dict[str, Any], key: str, source: str) -> Any:
    if key not in metadata:
        raise TokenizerError(f"{source}: GGUF metadata has no `{key}`, so the tokenizer cannot be "
                             "built; the file is incomplete (re-convert it with llama.cpp)")
    return metadata[key]


def _list(metadata: dict[str, Any], key: str, source: str, n: int | None = None) -> list[Any]:
    value = _require(metadata, key, source)
    if not isinstance(value, (list, tuple)) or (n is not None and len(value) != n):
        want = f"a list of {n} values" if n is not None else "a list"
        got = f"{len(value)} values" if isinstance(value, (list, tuple)) else type(value).__name__
        raise TokenizerError(f"{source}: GGUF metadata `{key}` should be {want}, got {got}")
    return list(value)


def _optional_id(metadata: dict[str, Any], key: str, n_tokens: int, source: str) -> int | None:
    value = metadata.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < n_tokens:
        raise TokenizerError(f"{source}: GGUF metadata `{key}` = {value!r} is not a token id "
                             f"(the vocabulary has {n_tokens} tokens)")
    return value


def spm_merges(tokens: Sequence[str], scores: Sequence[float],
               types: Sequence[int]) -> list[tuple[str, str]]:
    """BPE merges equivalent to SentencePiece's BPE over these pieces and scores.

    SentencePiece merges the adjacent pair whose concatenation is the highest-scoring piece; a
    `tokenizers` BPE merges the pair listed first. So every split of a piece into two pieces
    becomes a merge, ranked by the piece's score. Only normal and user-defined pieces take part,
    the ones SentencePiece looks up while merging (control, unknown and byte pieces are not).

    Ties need an order too: Mistral's whitespace-run pieces (▁▁ ... ▁×16) all score -1e9, and
    SentencePiece then merges the leftmost pair, which grows a run from its left end. Ranking a
    longer result, then a longer left part, first reproduces that. Unused pieces (type 5), which
    SentencePiece merges into and splits back at the end, are left out: a file with any may
    differ from SentencePiece where one would have been formed.
    """
    pieces: dict[str, int] = {}
    for i, (token, kind) in enumerate(zip(tokens, types, strict=True)):
        if kind in (NORMAL, USER_DEFINED):
            pieces[token] = i
    ranked: list[tuple[float, int, int, int, str, str]] = []
    for piece, i in pieces.items():
        if len(piece) < 2:
            continue
        score = -float(scores[i])
        for cut in range(1, len(piece)):
            left, right = piece[:cut], piece[cut:]
            if left in pieces and right in pieces:
                ranked.append((score, -len(piece), -cut, i, left, right))
    ranked.sort()
    return [(left, right) for *_, left, right in ranked]


def tokenizer_from_gguf(metadata: dict[str, Any], source: str) -> BackendTokenizer:
    """Build the tokenizer described by a GGUF file's metadata.

    `metadata` maps GGUF keys to plain values, e.g.
    ``{k: f.contents() for k, f in gguf.GGUFReader(path).fields.items()}``; `source` names the
    file in error messages. Raises `TokenizerError` for a missing or malformed key and for a
    `tokenizer.ggml.model` other than "llama" or "gpt2".
    """
    from tokenizers import AddedToken

    model = _require(metadata, "tokenizer.ggml.model", source)
    if model not in SUPPORTED_MODELS:
        raise TokenizerError(f"{source}: GGUF metadata `tokenizer.ggml.model` = {model!r} is not "
                             f"supported; supported: {', '.join(SUPPORTED_MODELS)}")
    tokens = _list(metadata, "tokenizer.ggml.tokens", source)
    if not tokens or not all(isinstance(t, str) for t in tokens):
        raise TokenizerError(f"{source}: GGUF metadata `tokenizer.ggml.tokens` should be a "
                             "non-empty list of strings")
    n = len(tokens)
    if "tokenizer.ggml.token_type" in metadata:
        types = [int(t) for t in _list(metadata, "tokenizer.ggml.token_type", source, n)]
    else:
        types = [NORMAL] * n

    if model == "llama":
        backend, detail = _spm_backend(metadata, tokens, types, source)
        add_bos_default = True
    else:
        backend, detail = _byte_level_backend(metadata, tokens, types, source)
        add_bos_default = False

    # Control tokens, and the unknown token, are special: matched whole in the text (as
    # transformers and llama.cpp do), skipped by decode. User-defined ones are matched whole and
    # kept by decode. All of them are already in the vocabulary, so they keep their ids.
    added = [AddedToken(t, special=kind != USER_DEFINED, normalized=False)
             for t, kind in zip(tokens, types, strict=True)
             if kind in (CONTROL, UNKNOWN, USER_DEFINED)]
    if added:
        backend.add_tokens(added)

    bos_id = _optional_id(metadata, "tokenizer.ggml.bos_token_id", n, source)
    eos_id = _optional_id(metadata, "tokenizer.ggml.eos_token_id", n, source)
    eos_ids = {i for key in ("eos", "eot", "eom")
               if (i := _optional_id(metadata, f"tokenizer.ggml.{key}_token_id", n, source))
               is not None}
    template = metadata.get("tokenizer.chat_template")
    return BackendTokenizer(
        name=f"gguf {Path(source).name} ({detail})",
        backend=backend,
        vocab_size=n,
        bos_id=bos_id,
        eos_id=eos_id,
        eos_ids=frozenset(eos_ids),
        add_bos=bool(metadata.get("tokenizer.ggml.add_bos_token", add_bos_default)),
        add_eos=bool(metadata.get("tokenizer.ggml.add_eos_token", False)),
        bos_token=tokens[bos_id] if bos_id is not None else None,
        eos_token=tokens[eos_id] if eos_id is not None else None,
        chat_template=template if isinstance(template, str) else None,
    )


def _vocab(tokens: Sequence[str], source: str) -> dict[str, int]:
    """Token -> id. A token listed twice keeps its last id, as in llama.cpp; the other id can still
    be generated by the model but is never produced by encode."""
    vocab = {token: i for i, token in enumerate(tokens)}
    if len(vocab) != len(tokens):
        log.debug("%s: %d duplicate entries in `tokenizer.ggml.tokens`", source,
                  len(tokens) - len(vocab))
    return vocab


def _merges(metadata: dict[str, Any], source: str) -> list[tuple[str, str]]:
    """`tokenizer.ggml.merges` as pairs: "a b" strings, or [a, b] lists in newer files."""
    merges: list[tuple[str, str]] = []
    for entry in _list(metadata, "tokenizer.ggml.merges", source):
        pair = entry.split(" ") if isinstance(entry, str) else entry
        if not isinstance(pair, (list, tuple)) or len(pair) != 2:
            raise TokenizerError(f"{source}: GGUF metadata `tokenizer.ggml.merges` holds "
                                 f"{entry!r}, which is not a pair of tokens")
        merges.append((str(pair[0]), str(pair[1])))
    return merges


def _spm_backend(metadata: dict[str, Any], tokens: list[str], types: list[int],
                 source: str) -> tuple[Any, str]:
    from tokenizers import Tokenizer, decoders, models, normalizers

    vocab = _vocab(tokens, source)
    if "tokenizer.ggml.merges" in metadata:
        merges = _merges(metadata, source)
    else:
        scores = _list(metadata, "tokenizer.ggml.scores", source, len(tokens))
        merges = spm_merges(tokens, scores, types)
    unk_id = metadata.get("tokenizer.ggml.unknown_token_id")
    if not isinstance(unk_id, int) or not 0 <= unk_id < len(tokens):
        unk_id = next((i for i, kind in enumerate(types) if kind == UNKNOWN), None)
    unk = tokens[unk_id] if unk_id is not None else None
    byte_fallback = any(kind == BYTE for kind in types) or "<0x0A>" in vocab
    backend = Tokenizer(models.BPE(vocab=vocab, merges=merges, unk_token=unk, fuse_unk=True,
                                   byte_fallback=byte_fallback))
    prefix = bool(metadata.get("tokenizer.ggml.add_space_prefix", True))
    # A normalizer, not a Metaspace pre-tokenizer: SentencePiece prepends "▁" even to text that
    # starts with a space ("  hi" is "▁▁▁hi"), and this runs on each piece of text between
    # special tokens, which is where llama.cpp adds the prefix too.
    steps: list[Any] = [normalizers.Replace(" ", "▁")]
    if prefix:
        steps.insert(0, normalizers.Prepend("▁"))
    backend.normalizer = normalizers.Sequence(steps)
    chain: list[Any] = [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()]
    if prefix:
        chain.append(decoders.Strip(content=" ", left=1, right=0))
    backend.decoder = decoders.Sequence(chain)
    return backend, "sentencepiece"


def _byte_level_backend(metadata: dict[str, Any], tokens: list[str], types: list[int],
                        source: str) -> tuple[Any, str]:
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers

    # Vocabulary entries are spelled in the byte alphabet. A normal token spelled otherwise (a
    # converter slip) is respelled; control, unknown and user-defined ones keep their spelling,
    # which is how they are matched in the text (and added tokens bypass the decoder).
    spelling = _bytes_to_unicode()
    alphabet = set(spelling.values())
    spelled = [t if kind in (CONTROL, UNKNOWN, USER_DEFINED) or set(t) <= alphabet
               else "".join(spelling[b] for b in t.encode("utf-8"))
               for t, kind in zip(tokens, types, strict=True)]
    vocab = _vocab(spelled, source)
    merges = _merges(metadata, source)
    backend = Tokenizer(models.BPE(vocab=vocab, merges=merges))

    pre = metadata.get("tokenizer.ggml.pre", DEFAULT_PRE)
    split = PRE_TOKENIZERS.get(pre) if isinstance(pre, str) else None
    if split is None:
        log.warning("%s: unknown `tokenizer.ggml.pre` = %r; splitting text as GPT-2 does, which "
                    "may tokenize digits and punctuation differently from the model's own "
                    "tokenizer (known: %s)", source, pre, ", ".join(sorted(PRE_TOKENIZERS)))
        split = _GPT2
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=split in (_GPT2,
                                                                                    _GPT2_DIGITS))
    if split == _GPT2:
        backend.pre_tokenizer = byte_level
    elif split == _GPT2_DIGITS:
        backend.pre_tokenizer = pre_tokenizers.Sequence(
            [pre_tokenizers.Digits(individual_digits=True), byte_level])
    else:
        backend.pre_tokenizer = pre_tokenizers.Sequence(
            [pre_tokenizers.Split(Regex(split), behavior="isolated"), byte_level])
    backend.decoder = decoders.ByteLevel()
    return backend, f"byte-level BPE, pre {pre}"
