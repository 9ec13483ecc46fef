"""Constrained decoding: answers that follow JSON, a JSON schema, a Lark grammar or a regex,
by masking before each sampling step every token that would break the grammar (llguidance).

    ResponseFormat   what the request asks for (OpenAI's `response_format`, or a grammar)
      -> Constraint  one per request: compiled when the request is submitted (a bad schema or
                     grammar fails there, naming the problem), then, before each step, the
                     bitmask of the tokens allowed next, and after it, the token sampled
      -> the batch sampler sets the logits of the tokens a row's bitmask forbids to -inf
         (batch_sampling.py); rows without a constraint pay nothing.

llguidance sees tokens as byte strings. Tokenizers built on Hugging Face `tokenizers` (HF
checkpoints and GGUF files) are handed over as their JSON, which llguidance reads itself (byte
level BPE, SentencePiece-style pieces with byte fallback). mistral-common's SentencePiece and
tekken tokenizers are handed over as each id's bytes (`token_bytes`): "▁" is a space, a
`<0x41>` piece is the byte 0x41, and control tokens are marked special (0xFF first, which no
text contains) so that a grammar never produces them.
"""

from __future__ import annotations

import json
import threading
import weakref
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

import torch

from mistral7b.errors import InvalidArgumentError, Mistral7BError

if TYPE_CHECKING:
    from llguidance._lib import JsonCompileOptions

Kind = Literal["json_object", "json_schema", "lark", "regex"]

# JSON answers may be laid out freely, but each run of whitespace is bounded: unbounded, a small
# model at a high temperature can spend its whole max_tokens on blank lines inside a valid
# document. Unsupported schema keywords are an error (llguidance's `lenient` stays off).
JSON_OPTIONS: JsonCompileOptions = {"whitespace_pattern": r"[\x20\x0A\x0D\x09]{0,20}"}


@dataclass(frozen=True)
class ResponseFormat:
    """What a constrained answer must match. `source` is the JSON schema (as JSON text) for
    json_schema, the grammar for lark and the pattern for regex; json_object takes any JSON
    object."""

    kind: Kind
    source: str = ""
    origin: str = ""        # where it came from, for error messages (e.g. "--json-schema F")

    @classmethod
    def json_object(cls) -> ResponseFormat:
        return cls("json_object")

    @classmethod
    def json_schema(cls, schema: dict[str, Any] | str, origin: str = "") -> ResponseFormat:
        where = origin or "json_schema"
        if isinstance(schema, str):
            try:
                schema = json.loads(schema)
            except ValueError as e:
                raise InvalidArgumentError(f"{where}: not valid JSON ({e})") from None
        if not isinstance(schema, dict):
            raise InvalidArgumentError(f"{where}: a schema is a JSON object")
        return cls("json_schema", json.dumps(schema), origin)

    @classmethod
    def lark(cls, grammar: str, origin: str = "") -> ResponseFormat:
        return cls("lark", grammar, origin)

    @classmethod
    def regex(cls, pattern: str) -> ResponseFormat:
        return cls("regex", pattern)

    @classmethod
    def parse(cls, value: Any) -> ResponseFormat | None:
        """OpenAI's `response_format`: {"type": "text"} (None: no constraint), {"type":
        "json_object"} or {"type": "json_schema", "json_schema": {"name": ..., "schema": {...},
        "strict": ...}}; a ResponseFormat passes through."""
        if value is None or isinstance(value, ResponseFormat):
            return value
        if not isinstance(value, dict) or "type" not in value:
            raise InvalidArgumentError("response_format: expected an object with a `type` "
                                       "(text, json_object or json_schema)")
        kind = value["type"]
        if kind == "text":
            return None
        if kind == "json_object":
            return cls.json_object()
        if kind == "json_schema":
            spec = value.get("json_schema")
            if not isinstance(spec, dict) or not isinstance(spec.get("schema"), dict):
                raise InvalidArgumentError("response_format.json_schema.schema: expected a "
                                           "JSON schema object")
            return cls.json_schema(spec["schema"])
        raise InvalidArgumentError(f"response_format.type: unknown type {kind!r}; expected "
                                   "text, json_object or json_schema")

    def grammar(self) -> str:
        """The grammar in llguidance's form."""
        from llguidance import LLMatcher

        if self.kind == "json_object":
            return str(LLMatcher.grammar_from_json_schema({"type": "object"}, JSON_OPTIONS))
        if self.kind == "json_schema":
            return str(LLMatcher.grammar_from_json_schema(self.source, JSON_OPTIONS))
        if self.kind == "lark":
            return str(LLMatcher.grammar_from_lark(self.source))
        return str(LLMatcher.grammar_from_regex(self.source))


class Constraint:
    """One request's grammar state: which tokens may come next, and the tokens taken so far."""

    def __init__(self, fmt: ResponseFormat, tokenizer: Any, vocab_size: int) -> None:
        from llguidance import LLMatcher

        self.format = fmt
        self.vocab_size = vocab_size
        where = fmt.origin or ("response_format" if fmt.kind.startswith("json")
                               else f"{fmt.kind} grammar")
        try:
            grammar = fmt.grammar()
        except ValueError as e:
            raise InvalidArgumentError(f"{where}: {e}") from None
        self._matcher = LLMatcher(lltokenizer(tokenizer, vocab_size), grammar, log_level=0)
        if self._matcher.is_error():
            raise InvalidArgumentError(f"{where}: {self._matcher.get_error()}")

    @staticmethod
    def mask_words(vocab_size: int) -> int:
        """int32 words of one row's bitmask (bit i of word w: token 32 w + i is allowed)."""
        return (vocab_size + 31) // 32

    def fill(self, row: torch.Tensor) -> None:
        """Write the bitmask of the tokens allowed next into `row`, a contiguous host int32
        tensor of mask_words(vocab) words."""
        self._matcher.unsafe_compute_mask_ptr(row.data_ptr(), row.numel() * row.element_size())
        if self._matcher.is_error():     # never silently an all-but-EOS mask
            raise Mistral7BError(f"the grammar matcher failed: "
                                 f"{self._matcher.get_error().splitlines()[0]}")

    def accept(self, token: int) -> None:
        if not self._matcher.consume_token(token):
            raise Mistral7BError(f"the grammar refused token {token}: "
                                 f"{self._matcher.get_error()}")

    @property
    def finished(self) -> bool:
        """The answer is complete: the grammar allows nothing but the end of the text."""
        return bool(self._matcher.is_stopped())


def allowed_tokens(bitmask: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """(rows, words) int32 bitmasks -> (rows, vocab_size) bool, True where a token is allowed."""
    bits = torch.arange(32, dtype=torch.int32, device=bitmask.device)
    unpacked = (bitmask[:, :, None] >> bits) & 1                        # (rows, words, 32)
    return unpacked.flatten(1)[:, :vocab_size].bool()


# ---- the vocabulary, as llguidance reads it ------------------------------------------------

_tokenizers: weakref.WeakKeyDictionary[Any, Any] = weakref.WeakKeyDictionary()
_lock = threading.Lock()


def lltokenizer(tokenizer: Any, vocab_size: int) -> Any:
    """llguidance's view of `tokenizer`, built once per tokenizer (it takes ~0.1-1 s)."""
    import llguidance

    with _lock:
        cached = _tokenizers.get(tokenizer)
        if cached is not None:
            return cached
        eos = sorted(getattr(tokenizer, "eos_ids", ()))
        backend = getattr(tokenizer, "backend", None)
        if backend is not None and hasattr(backend, "to_str"):      # HF tokenizers (HF, GGUF)
            built = llguidance.LLTokenizer(backend.to_str(), n_vocab=vocab_size,
                                           eos_token=eos or None)
        else:
            built = llguidance.LLTokenizer(
                llguidance.TokenizerWrapper(_ByteVocabulary(tokenizer, vocab_size)),
                n_vocab=vocab_size, eos_token=eos or None)
        _tokenizers[tokenizer] = built
        return built


class _ByteVocabulary:
    """The shape llguidance.TokenizerWrapper reads: each id's bytes, special ids, BOS/EOS and an
    encoder whose tokens spell exactly the text given."""

    def __init__(self, tokenizer: Any, vocab_size: int) -> None:
        self.tokens = token_bytes(tokenizer, vocab_size)
        self.special_token_ids = [i for i, t in enumerate(self.tokens) if t.startswith(b"\xff")]
        self.eos_token_id = min(tokenizer.eos_ids)
        self.bos_token_id = tokenizer.bos_id
        self._tokenizer = tokenizer
        self._byte_ids: dict[int, int] = {}
        for i, piece in enumerate(self.tokens):
            if len(piece) == 1:
                self._byte_ids.setdefault(piece[0], i)

    def __call__(self, text: str | bytes) -> list[int]:
        """Tokens whose bytes join to `text`. SentencePiece puts a space in front of a text
        (its dummy prefix), so its encoding of "\n" + text is tried too, with the pieces of
        the newline dropped; failing both, one token per byte (byte fallback)."""
        data = text if isinstance(text, bytes) else text.encode()
        string = data.decode("utf-8", errors="replace")
        for prefix in (b"", b"\n"):
            ids = list(self._tokenizer.encode(prefix.decode() + string, bos=False))
            start, spelled = 0, b""
            while prefix and start < len(ids) and len(spelled.lstrip(b" ")) < len(prefix):
                spelled += self.tokens[ids[start]]
                start += 1
            if spelled.lstrip(b" ") == prefix and b"".join(
                    self.tokens[i] for i in ids[start:]) == data:
                return ids[start:]
        return [self._byte_ids[b] for b in data if b in self._byte_ids]


def token_bytes(tokenizer: Any, vocab_size: int) -> list[bytes]:
    """Each id's bytes for a mistral-common tokenizer (SentencePiece or tekken); special and
    control tokens start with 0xFF. Ids past the tokenizer's vocabulary (padding rows of the
    model's output) are empty."""
    raw = getattr(tokenizer, "_raw", None)
    if raw is None:
        raise InvalidArgumentError(f"constrained decoding needs a tokenizer ({tokenizer.name} "
                                   "has none)")
    out: list[bytes] = []
    if hasattr(raw, "id_to_byte_piece"):                                # tekken
        specials = int(raw.num_special_tokens)
        for i in range(int(raw.n_words)):
            piece = bytes(raw.id_to_byte_piece(i, "keep"))
            out.append(b"\xff" + piece if i < specials else piece)
    else:                                                               # SentencePiece
        model = raw._model
        for i in range(int(raw.n_words)):
            piece = model.id_to_piece(i)
            if model.is_byte(i):                                        # "<0x41>"
                out.append(bytes([int(piece[3:5], 16)]))
            elif model.is_control(i) or model.is_unknown(i):
                out.append(b"\xff" + piece.encode())
            else:
                out.append(piece.replace("\u2581", " ").encode())
    return out + [b""] * max(0, vocab_size - len(out))

