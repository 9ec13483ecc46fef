"""Token sampling: validated parameters, logits processors and a per-sequence sampler.

The pipeline applied to the logits of one sequence at each step is, in order:

1. repetition penalty (CTRL / Hugging Face style) over prompt and generated tokens;
2. presence and frequency penalties (OpenAI style) over generated tokens only;
3. greedy argmax when ``temperature == 0``; otherwise temperature scaling,
   top-k, top-p and min-p filtering, then a draw from the softmax using a
   ``torch.Generator`` owned by the sampler.

All logits math is done in float32.  Per-token state (which ids have been seen,
how often each id was generated) is kept in vocabulary-sized tensors that are
updated incrementally, so one step costs a handful of vectorised O(vocab)
operations, independent of the history length.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from mistral7b.constrained import ResponseFormat
from mistral7b.errors import InvalidArgumentError

__all__ = [
    "RANGES",
    "InvalidSamplingParam",
    "LogitsProcessor",
    "Range",
    "SampleFn",
    "SampleResult",
    "Sampler",
    "SamplingParams",
    "TokenHistory",
    "apply_min_p",
    "apply_presence_frequency_penalty",
    "apply_repetition_penalty",
    "apply_temperature",
    "apply_top_k",
    "apply_top_p",
    "make_logits_processors",
    "make_sampler",
]

MAX_TEMPERATURE = 100.0
MAX_TOP_LOGPROBS = 20
MAX_LOGIT_BIAS = 100.0        # OpenAI's range for a logit_bias value: [-100, 100]
MAX_REPETITION_PENALTY = 100.0
MAX_STOP = 16                 # stop strings per request
_SEED_MASK = (1 << 64) - 1


class InvalidSamplingParam(InvalidArgumentError):
    """A sampling parameter is outside its allowed range or has the wrong type.

    A ``ValueError`` (through :class:`~mistral7b.errors.InvalidArgumentError`), so
    the CLI reports it as a user error.
    """


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _require_int(name: str, value: object) -> int:
    if not _is_int(value):
        raise InvalidSamplingParam(f"{name} must be an integer (got {value!r})")
    assert isinstance(value, int)
    return value


def _require_number(name: str, value: object) -> float:
    if not _is_number(value):
        raise InvalidSamplingParam(f"{name} must be a number (got {value!r})")
    assert isinstance(value, (int, float))
    number = float(value)
    if math.isnan(number):
        raise InvalidSamplingParam(f"{name} must not be NaN (got {value!r})")
    return number


def _require_bool(name: str, value: object) -> None:
    if not isinstance(value, bool):
        raise InvalidSamplingParam(f"{name} must be a bool (got {value!r})")


def _check_range(
    name: str,
    value: float,
    low: float | None = None,
    high: float | None = None,
    *,
    low_inclusive: bool = True,
    high_inclusive: bool = True,
) -> None:
    """Raise :class:`InvalidSamplingParam` naming ``name`` and its range."""
    ok = True
    if low is not None:
        ok = ok and (value >= low if low_inclusive else value > low)
    if high is not None:
        ok = ok and (value <= high if high_inclusive else value < high)
    if ok:
        return

    def fmt(x: float) -> str:
        return str(int(x)) if float(x).is_integer() else str(x)

    if low is not None and high is not None:
        left = "[" if low_inclusive else "("
        right = "]" if high_inclusive else ")"
        allowed = f"in {left}{fmt(low)}, {fmt(high)}{right}"
    elif low is not None:
        allowed = f"{'>=' if low_inclusive else '>'} {fmt(low)}"
    else:
        assert high is not None
        allowed = f"{'<=' if high_inclusive else '<'} {fmt(high)}"
    raise InvalidSamplingParam(f"{name} must be {allowed} (got {value!r})")


@dataclass(frozen=True)
class Range:
    """The values one numeric sampling parameter accepts."""

    low: float | None = None
    high: float | None = None
    low_inclusive: bool = True
    high_inclusive: bool = True
    integer: bool = False

    def check(self, name: str, value: object) -> float:
        """`value` as a number, or an InvalidSamplingParam naming `name` and this range."""
        number = (_require_int(name, value) if self.integer
                  else _require_number(name, value))
        _check_range(name, number, self.low, self.high, low_inclusive=self.low_inclusive,
                     high_inclusive=self.high_inclusive)
        return number

    def bounds(self) -> dict[str, float]:
        """The range as pydantic Field keywords (ge/gt/le/lt), for the server's schemas."""
        out: dict[str, float] = {}
        if self.low is not None:
            out["ge" if self.low_inclusive else "gt"] = self.low
        if self.high is not None:
            out["le" if self.high_inclusive else "lt"] = self.high
        return out


# The one table of sampling limits: SamplingParams checks every value against it, and the
# server's request schemas and the CLI (through SamplingParams) accept exactly these ranges.
RANGES: dict[str, Range] = {
    "max_tokens": Range(1, integer=True),       # 0 only to score a prompt (prompt_logprobs)
    "temperature": Range(0.0, MAX_TEMPERATURE),
    "top_k": Range(-1, integer=True),                       # 0 and -1 (vLLM's) turn it off
    "top_p": Range(0.0, 1.0, low_inclusive=False),
    "min_p": Range(0.0, 1.0),
    "repetition_penalty": Range(0.0, MAX_REPETITION_PENALTY, low_inclusive=False),
    "presence_penalty": Range(-2.0, 2.0),
    "frequency_penalty": Range(-2.0, 2.0),
    "top_logprobs": Range(0, MAX_TOP_LOGPROBS, integer=True),
    "logit_bias": Range(-MAX_LOGIT_BIAS, MAX_LOGIT_BIAS),   # each value
}


@dataclass(frozen=True)
class SamplingParams:
    """Validated, immutable sampling settings for one request.

    ``top_k == 0`` disables top-k, ``top_p == 1`` disables top-p and
    ``min_p == 0`` disables min-p.  ``temperature == 0`` means greedy decoding.
    ``stop`` accepts a single string or any iterable of strings and
    ``stop_token_ids`` an int or any iterable of ints; both are stored as tuples.
    ``logit_bias`` maps token ids to a value in [-100, 100] added to their logits before any
    other processing (OpenAI's field: -100 bans a token, 100 all but forces it); a dict (ids
    may be ints or digit strings, as JSON sends them) is stored as sorted (id, bias) pairs.
    """

    max_tokens: int = 256
    temperature: float = 0.7
    top_k: int = 0
    top_p: float = 1.0
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False
    logprobs: bool = False
    top_logprobs: int = 0
    # The prompt's own log-probabilities: each prompt token's (the first has none) and its k
    # most likely alternatives (0: none); None: not computed. With max_tokens=0 a request only
    # scores its prompt (what lm-eval and perplexity need).
    prompt_logprobs: int | None = None
    # given as {id: bias} (ids may be digit strings) or (id, bias) pairs; stored as sorted pairs
    logit_bias: Any = ()
    # Constrained decoding (constrained.py): a ResponseFormat, or OpenAI's response_format
    # object ({"type": "json_object"}, {"type": "json_schema", "json_schema": {...}}); grammar
    # is a Lark grammar, stored as response_format.
    response_format: Any = None
    grammar: str | None = None

    def __post_init__(self) -> None:
        scoring = self.prompt_logprobs is not None
        for name, limits in RANGES.items():
            if name == "logit_bias" or (name == "max_tokens" and scoring and
                                        self.max_tokens == 0):    # a prompt scored alone
                continue
            limits.check(name, getattr(self, name))
        if scoring:
            RANGES["top_logprobs"].check("prompt_logprobs", self.prompt_logprobs)
        if self.top_k == -1:
            object.__setattr__(self, "top_k", 0)            # off, as 0 is
        if self.seed is not None:
            _require_int("seed", self.seed)

        object.__setattr__(self, "stop", self._normalise_stop(self.stop))
        object.__setattr__(
            self, "stop_token_ids", self._normalise_stop_token_ids(self.stop_token_ids)
        )

        _require_bool("ignore_eos", self.ignore_eos)
        _require_bool("logprobs", self.logprobs)

        object.__setattr__(self, "logit_bias", self._normalise_logit_bias(self.logit_bias))
        fmt = ResponseFormat.parse(self.response_format)
        if self.grammar is not None:
            if not isinstance(self.grammar, str):
                raise InvalidSamplingParam("grammar must be a string (a Lark grammar)")
            from_grammar = ResponseFormat.lark(self.grammar)
            # dataclasses.replace() passes back the format made from the grammar: not a second
            if fmt is not None and fmt != from_grammar:
                raise InvalidSamplingParam("pass either grammar or response_format, not both")
            fmt = from_grammar
        object.__setattr__(self, "response_format", fmt)

    @staticmethod
    def _normalise_stop(value: object) -> tuple[str, ...]:
        if value is None:
            return ()
        if isinstance(value, str):
            items: tuple[Any, ...] = (value,)
        elif isinstance(value, Iterable):
            items = tuple(value)
        else:
            raise InvalidSamplingParam(
                f"stop must be a string or a sequence of strings (got {value!r})"
            )
        if len(items) > MAX_STOP:
            raise InvalidSamplingParam(f"stop must hold at most {MAX_STOP} strings (got "
                                       f"{len(items)})")
        for item in items:
            if not isinstance(item, str):
                raise InvalidSamplingParam(f"stop entries must be strings (got {item!r})")
            if not item:
                raise InvalidSamplingParam("stop must not hold empty strings (got '')")
        return items

    @staticmethod
    def _normalise_stop_token_ids(value: object) -> tuple[int, ...]:
        if value is None:
            return ()
        if _is_int(value):
            items: tuple[Any, ...] = (value,)
        elif isinstance(value, Iterable) and not isinstance(value, (str, bytes)):
            items = tuple(value)
        else:
            raise InvalidSamplingParam(
                f"stop_token_ids must be an int or a sequence of ints (got {value!r})"
            )
        for item in items:
            if not _is_int(item) or item < 0:
                raise InvalidSamplingParam(
                    f"stop_token_ids entries must be integers >= 0 (got {item!r})"
                )
        return items

    @staticmethod
    def _normalise_logit_bias(value: object) -> tuple[tuple[int, float], ...]:
        if value is None:
            return ()
        if isinstance(value, dict):
            items: list[Any] = list(value.items())
        elif isinstance(value, Iterable) and not isinstance(value, (str, bytes)):
            items = list(value)
        else:
            raise InvalidSamplingParam(
                f"logit_bias: must map token ids to numbers (got {value!r})"
            )
        pairs: dict[int, float] = {}
        for item in items:
            if not isinstance(item, tuple) or len(item) != 2:
                raise InvalidSamplingParam(f"logit_bias: entries must be (token id, bias) "
                                           f"pairs (got {item!r})")
            key, bias = item
            if isinstance(key, str) and key.strip().isdigit():
                key = int(key)
            if not _is_int(key) or key < 0:
                raise InvalidSamplingParam(
                    f"logit_bias: keys must be token ids >= 0 (got {key!r})"
                )
            pairs[key] = RANGES["logit_bias"].check(f"logit_bias[{key}]", bias)
        return tuple(sorted(pairs.items()))

    @property
    def greedy(self) -> bool:
        """True when decoding is deterministic argmax (``temperature == 0``)."""
        return self.temperature == 0


class TokenHistory:
    """Vocabulary-sized record of the tokens a sequence has seen.

    ``seen`` is a bool mask of every id in the prompt or generated so far (used by
    the repetition penalty); ``counts`` holds, as float32, how many times each id
    was *generated* (used by presence and frequency penalties).  Both are updated
    in O(1) per added token.
    """

    def __init__(
        self,
        vocab_size: int,
        prompt_ids: Sequence[int] = (),
        device: torch.device | str | None = None,
    ) -> None:
        if vocab_size <= 0:
            raise ValueError(f"vocab_size must be > 0 (got {vocab_size})")
        self.vocab_size = vocab_size
        self.seen = torch.zeros(vocab_size, dtype=torch.bool, device=device)
        self.counts = torch.zeros(vocab_size, dtype=torch.float32, device=device)
        self.num_generated = 0
        if len(prompt_ids) > 0:
            ids = torch.as_tensor(list(prompt_ids), dtype=torch.long)
            if int(ids.min()) < 0 or int(ids.max()) >= vocab_size:
                raise ValueError(
                    f"prompt token ids must be in [0, {vocab_size}) "
                    f"(got min {int(ids.min())}, max {int(ids.max())})"
                )
            self.seen[ids.to(self.seen.device)] = True

    def add(self, token_id: int) -> None:
        """Record one generated token."""
        if not 0 <= token_id < self.vocab_size:
            raise ValueError(f"token id must be in [0, {self.vocab_size}) (got {token_id})")
        self.seen[token_id] = True
        self.counts[token_id] += 1.0
        self.num_generated += 1


LogitsProcessor = Callable[[torch.Tensor, TokenHistory], torch.Tensor]
"""Maps (float32 logits of shape (vocab,), history) to new logits."""

SampleFn = Callable[[torch.Tensor, torch.Generator], int]
"""Maps (processed float32 logits of shape (vocab,), generator) to a token id."""


# ---------------------------------------------------------------------------
# Penalties
# ---------------------------------------------------------------------------


def apply_repetition_penalty(
    logits: torch.Tensor, seen: torch.Tensor, penalty: float
) -> torch.Tensor:
    """CTRL-style penalty: for ids in ``seen``, positive logits are divided by
    ``penalty`` and negative ones multiplied by it."""
    if penalty == 1.0:
        return logits
    penalised = torch.where(logits > 0, logits / penalty, logits * penalty)
    return torch.where(seen, penalised, logits)


def apply_presence_frequency_penalty(
    logits: torch.Tensor, counts: torch.Tensor, presence: float, frequency: float
) -> torch.Tensor:
    """OpenAI-style penalty: ``logit -= presence * (count > 0) + frequency * count``."""
    if presence == 0.0 and frequency == 0.0:
        return logits
    out = logits
    if presence != 0.0:
        out = out - presence * (counts > 0).to(logits.dtype)
    if frequency != 0.0:
        out = out - frequency * counts.to(logits.dtype)
    return out


# ---------------------------------------------------------------------------
# Warpers / filters (operate on temperature-scaled logits; removed = -inf)
# ---------------------------------------------------------------------------


def apply_temperature(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """Divide logits by a positive temperature."""
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0 for scaling (got {temperature})")
    if temperature == 1.0:
        return logits
    return logits / temperature


def apply_top_k(logits: torch.Tensor, k: int) -> torch.Tensor:
    """Keep exactly the ``k`` largest logits (ties broken towards lower ids)."""
    vocab = logits.shape[-1]
    if k <= 0 or k >= vocab:
        return logits
    kth = torch.topk(logits, k, sorted=False).values.min()
    above = logits > kth
    at = logits == kth
    # Among the ids tied at the k-th value keep only as many (lowest ids first)
    # as are needed to reach exactly k.
    room = k - int(above.sum())
    keep = above | (at & (torch.cumsum(at.to(torch.int64), dim=-1) <= room))
    return logits.masked_fill(~keep, float("-inf"))


def apply_top_p(logits: torch.Tensor, top_p: float) -> torch.Tensor:
    """Nucleus filter: keep the smallest set of most-probable ids whose total
    probability is >= ``top_p`` (always at least one id)."""
    if top_p >= 1.0:
        return logits
    probs = torch.softmax(logits, dim=-1)
    sorted_probs, order = torch.sort(probs, descending=True, stable=True)
    cumulative = torch.cumsum(sorted_probs, dim=-1)
    # Keep an id if the mass of strictly-more-probable ids is still below top_p.
    keep_sorted = (cumulative - sorted_probs) < top_p
    keep_sorted[0] = True
    keep = torch.zeros_like(keep_sorted).scatter(-1, order, keep_sorted)
    return logits.masked_fill(~keep, float("-inf"))


def apply_min_p(logits: torch.Tensor, min_p: float) -> torch.Tensor:
    """Drop ids whose probability is below ``min_p`` times the top probability."""
    if min_p <= 0.0:
        return logits
    probs = torch.softmax(logits, dim=-1)
    threshold = probs.max() * min_p
    return logits.masked_fill(probs < threshold, float("-inf"))


# ---------------------------------------------------------------------------
# Factories
# ---------------------------------------------------------------------------


def make_logits_processors(params: SamplingParams) -> list[LogitsProcessor]:
    """Return the active processors for ``params`` (logit bias, then penalties), in
    application order."""
    processors: list[LogitsProcessor] = []
    if params.logit_bias:
        ids = torch.tensor([token for token, _ in params.logit_bias], dtype=torch.long)
        biases = torch.tensor([bias for _, bias in params.logit_bias], dtype=torch.float32)

        def logit_bias(logits: torch.Tensor, history: TokenHistory) -> torch.Tensor:
            # ids were checked against the vocabulary when the request was accepted
            return logits.index_add(-1, ids.to(logits.device), biases.to(logits.device))

        processors.append(logit_bias)
    if params.repetition_penalty != 1.0:
        penalty = params.repetition_penalty

        def repetition(logits: torch.Tensor, history: TokenHistory) -> torch.Tensor:
            return apply_repetition_penalty(logits, history.seen, penalty)

        processors.append(repetition)
    if params.presence_penalty != 0.0 or params.frequency_penalty != 0.0:
        presence = params.presence_penalty
        frequency = params.frequency_penalty

        def presence_frequency(logits: torch.Tensor, history: TokenHistory) -> torch.Tensor:
            return apply_presence_frequency_penalty(logits, history.counts, presence, frequency)

        processors.append(presence_frequency)
    return processors


def make_sampler(params: SamplingParams) -> SampleFn:
    """Return a function choosing one token id from processed logits.

    Greedy (``temperature == 0``) returns ``torch.argmax`` (lowest id on ties).
    Otherwise logits are temperature-scaled, filtered by top-k, top-p and min-p,
    and a token is drawn from the resulting softmax with the given generator.
    """
    if params.greedy:

        def greedy(logits: torch.Tensor, generator: torch.Generator) -> int:
            del generator
            return int(torch.argmax(logits))

        return greedy

    temperature = params.temperature
    top_k = params.top_k
    top_p = params.top_p
    min_p = params.min_p

    def categorical(logits: torch.Tensor, generator: torch.Generator) -> int:
        scaled = apply_temperature(logits, temperature)
        scaled = apply_top_k(scaled, top_k)
        scaled = apply_top_p(scaled, top_p)
        scaled = apply_min_p(scaled, min_p)
        probs = torch.softmax(scaled, dim=-1)
        # Inverse-CDF draw: one uniform number against the cumulative distribution. Exact, like
        # torch.multinomial, and ~15x faster on CPU for a 50K vocabulary (~0.06 vs ~0.9 ms).
        cdf = torch.cumsum(probs, dim=-1)
        u = torch.rand((1,), generator=generator, dtype=cdf.dtype) * cdf[-1]
        return min(int(torch.searchsorted(cdf, u, right=True)), probs.shape[-1] - 1)

    return categorical


# ---------------------------------------------------------------------------
# Per-sequence sampler
# ---------------------------------------------------------------------------


def resolve_seed(seed: int | None) -> int:
    """A request's seed, or fresh OS entropy when it gave none."""
    return random.SystemRandom().getrandbits(63) if seed is None else seed


def seeded_generator(seed: int, device: torch.device | str = "cpu") -> torch.Generator:
    """The random stream of one sequence: the same seed gives the same numbers."""
    return torch.Generator(device=device).manual_seed(seed & _SEED_MASK)


@dataclass(frozen=True)
class SampleResult:
    """One sampled token.

    ``logprob`` and ``top_logprobs`` come from the log-softmax of the *raw*
    logits (before penalties, temperature and filtering).  ``top_logprobs``
    holds ``params.top_logprobs`` ``(token_id, logprob)`` pairs, best first.
    """

    token_id: int
    logprob: float
    top_logprobs: list[tuple[int, float]] = field(default_factory=list)


class Sampler:
    """Samples the tokens of one sequence and tracks its history.

    The sampler owns a ``torch.Generator`` seeded from ``params.seed`` (or from
    OS entropy when the seed is ``None``), so the same seed and the same
    sequence of logits always give the same tokens, whatever other samplers or
    the global RNG do.
    """

    def __init__(self, params: SamplingParams, prompt_ids: Sequence[int] = ()) -> None:
        self.params = params
        self.prompt_ids: tuple[int, ...] = tuple(int(t) for t in prompt_ids)
        self.seed: int = resolve_seed(params.seed)
        self._generated: list[int] = []
        self._history: TokenHistory | None = None
        self._generator: torch.Generator | None = None
        self._processors = make_logits_processors(params)
        self._sample_fn = make_sampler(params)

    @property
    def generated(self) -> tuple[int, ...]:
        """Token ids sampled or accepted so far (prompt excluded)."""
        return tuple(self._generated)

    def accept(self, token_id: int) -> None:
        """Record ``token_id`` as generated (sampled here or forced by the caller)."""
        token_id = int(token_id)
        if token_id < 0:
            raise ValueError(f"token id must be >= 0 (got {token_id})")
        if self._history is not None:
            self._history.add(token_id)
        self._generated.append(token_id)

    def _ensure_state(self, logits: torch.Tensor) -> TokenHistory:
        vocab = logits.shape[0]
        if self._history is None:
            history = TokenHistory(vocab, self.prompt_ids, device=logits.device)
            for token_id in self._generated:
                history.add(token_id)
            self._history = history
        elif self._history.vocab_size != vocab:
            raise ValueError(
                f"logits vocabulary size changed from {self._history.vocab_size} to {vocab}"
            )
        if self._generator is None:
            self._generator = seeded_generator(self.seed, logits.device)
        return self._history

    def sample(self, logits: torch.Tensor) -> SampleResult:
        """Pick the next token from ``logits`` (shape ``(vocab,)``) and record it."""
        if logits.dim() != 1:
            raise ValueError(f"logits must be 1-D (vocab,), got shape {tuple(logits.shape)}")
        raw = logits.detach().to(torch.float32)
        history = self._ensure_state(raw)
        assert self._generator is not None

        processed = raw
        for processor in self._processors:
            processed = processor(processed, history)
        token_id = self._sample_fn(processed, self._generator)

        raw_logprobs = torch.log_softmax(raw, dim=-1)
        logprob = float(raw_logprobs[token_id])
        top: list[tuple[int, float]] = []
        n_top = min(self.params.top_logprobs, raw.shape[0])
        if n_top > 0:
            values, indices = torch.topk(raw_logprobs, n_top)
            top = [
                (int(i), float(v)) for i, v in zip(indices.tolist(), values.tolist(), strict=True)
            ]

        self.accept(token_id)
        return SampleResult(token_id=token_id, logprob=logprob, top_logprobs=top)
