"""Perplexity of a text under a model, over sliding windows (`mistral7b perplexity`).

The text's tokens are cut into windows of `context` tokens that start every `stride` tokens.
Each token is scored once, in the first window that holds it at a position past the previous
window's end, so every token but the first windows' sees at least `context - stride` tokens
before it (Hugging Face's recipe for fixed-length models):

    tokens   0 1 2 3 4 5 6 7 8 9          context 6, stride 3
    window 1 [0 1 2 3 4 5]                scores 1..5 (token 0 has nothing before it)
    window 2       [3 4 5 6 7 8]          scores 6..8
    window 3             [6 7 8 9]        scores 9

Windows are independent prompts: the engine pre-fills them in batches, in chunks, keeping the
log-probabilities of their own tokens (SamplingParams.prompt_logprobs) and generating nothing.
For a model with a sliding window W the default context is W, so that no token is scored
against keys its position can no longer see. Reported: tokens scored, mean negative
log-likelihood (nats), perplexity = exp(mean NLL), and bits per byte of the text (total NLL
in bits over its UTF-8 bytes: comparable across tokenizers).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

from mistral7b.engine.engine import run_requests
from mistral7b.errors import InvalidArgumentError
from mistral7b.llm import LLM
from mistral7b.sampling import SamplingParams

DEFAULT_CONTEXT = 2048       # at most: a windowed model uses its window if smaller


@dataclass
class PerplexityResult:
    tokens: int              # tokens scored (all but the first)
    bytes: int               # UTF-8 bytes of the text
    mean_nll: float          # nats per scored token
    perplexity: float
    bits_per_byte: float
    windows: int
    context: int
    stride: int


def windows(n_tokens: int, context: int, stride: int) -> list[tuple[int, int, int]]:
    """(start, end, first scored) of each window over n_tokens tokens (see the module)."""
    out = []
    scored_to = 1                    # token 0 is never scored
    for start in range(0, n_tokens, stride):
        end = min(start + context, n_tokens)
        if end > scored_to:
            out.append((start, end, scored_to))
            scored_to = end
        if end == n_tokens:
            break
    return out


def default_context(llm: LLM) -> int:
    config = llm.config
    return min(config.sliding_window or config.max_seq_len, DEFAULT_CONTEXT)


def perplexity(llm: LLM, text: str, context: int | None = None, stride: int | None = None,
               batch: int = 4, progress: Callable[[int, int], None] | None = None
               ) -> PerplexityResult:
    """`text`'s perplexity under `llm`; progress(windows done, windows) after each window."""
    context = default_context(llm) if context is None else context
    stride = max(context // 2, 1) if stride is None else stride
    if context < 2:
        raise InvalidArgumentError(f"context must be >= 2 tokens (got {context})")
    if not 1 <= stride <= context:
        raise InvalidArgumentError(f"stride must be between 1 and the context, {context} "
                                   f"(got {stride})")
    limit = llm.config.max_seq_len if llm.config.sliding_window is None else None
    if limit is not None and context > limit:
        raise InvalidArgumentError(f"context {context} exceeds the model's context length of "
                                   f"{limit} tokens")
    if not text.strip():
        raise InvalidArgumentError("the text is empty")
    ids = llm.tokenizer.encode(text)
    if len(ids) < 2:
        raise InvalidArgumentError(f"the text has {len(ids)} token; perplexity needs at "
                                   "least 2")
    spans = windows(len(ids), context, stride)
    params = SamplingParams(max_tokens=0, prompt_logprobs=0)
    engine = llm.engine(max_batch=batch, max_queue=len(spans),
                        prefill_chunk=min(context, 512))
    total, done = 0.0, 0
    try:
        prompts = [ids[start:end] for start, end, _ in spans]
        for i, piece in run_requests(engine, prompts, [params] * len(spans)):
            if piece.prompt_logprobs is None:
                continue
            start, _, first = spans[i]
            total -= sum(t.logprob for t in piece.prompt_logprobs[first - start:]
                         if t.logprob is not None)
            done += 1
            if progress is not None:
                progress(done, len(spans))
    finally:
        engine.stop()
    scored = len(ids) - 1
    n_bytes = len(text.encode("utf-8"))
    mean = total / scored
    return PerplexityResult(tokens=scored, bytes=n_bytes, mean_nll=mean,
                            perplexity=math.exp(mean),
                            bits_per_byte=total / math.log(2) / n_bytes,
                            windows=len(spans), context=context, stride=stride)
