"""Generation's building blocks, layered as in mlx-lm: `prefill`/`decode_step` turn tokens into
logits and fill the cache; `SequenceState` turns one sequence's logits into tokens and text
pieces. The engine (engine/engine.py) drives them for every caller: `LLM.generate`,
`stream_generate`, `generate_batch`, `chat`, the CLI and the server.

A batch is one RollingCache with a row per sequence. Prompts of unequal lengths can be
pre-filled together in chunks (each row carries its own count of real tokens, the rest is padding
that the cache masks out); every unfinished row decodes one token per step.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

from mistral7b.cache import RollingCache
from mistral7b.config import ModelConfig
from mistral7b.constrained import Constraint
from mistral7b.detokenizer import StreamDecoder
from mistral7b.errors import ContextLengthError, InvalidArgumentError
from mistral7b.model import Transformer
from mistral7b.sampling import SampleResult, SamplingParams
from mistral7b.tools import ToolCall


@dataclass
class PromptToken:
    """One prompt token scored by the model (SamplingParams.prompt_logprobs)."""

    token_id: int
    logprob: float | None                   # None for the first token: nothing precedes it
    top: list[tuple[int, float]] = field(default_factory=list)  # the k likeliest at its place


@dataclass
class StreamPiece:
    """What one step adds to one sequence."""

    text: str                               # complete UTF-8, never part of a stop string
    token_ids: list[int]                    # tokens generated at this step (empty at the end)
    logprobs: list[float] = field(default_factory=list)
    top_logprobs: list[list[tuple[int, float]]] = field(default_factory=list)
    finish_reason: str | None = None        # "stop" | "length" | "tool_calls" on the last piece
    tool_calls: list[ToolCall] | None = None  # stream_chat(tools=...): on the last piece
    prompt_logprobs: list[PromptToken] | None = None  # when asked for: on the first piece


@dataclass
class GenerationResult:
    text: str
    token_ids: list[int]
    finish_reason: str           # "stop" (EOS, stop string or stop token) | "length" | "tool_calls"
    prompt_tokens: int
    logprobs: list[float] | None = None     # per generated token, when asked for
    top_logprobs: list[list[tuple[int, float]]] | None = None
    tool_calls: list[ToolCall] | None = None  # LLM.chat(tools=...): the calls it made
    prompt_logprobs: list[PromptToken] | None = None  # prompt_logprobs=k: the prompt's tokens


def default_chunk_size(config: ModelConfig) -> int:
    """The paper pre-fills in chunks of the window size; models without one use 4096 tokens."""
    return config.sliding_window or 4096


def check_prompt(config: ModelConfig, prompt: Sequence[int], max_tokens: int = 0,
                 logit_bias: Sequence[tuple[int, float]] = ()) -> None:
    """Refuse what the model cannot run, before any work: never truncate silently."""
    if len(prompt) == 0:
        raise InvalidArgumentError("prompt: empty (no tokens to condition on)")
    bad = [t for t in prompt if not 0 <= t < config.vocab_size]
    if bad:
        raise InvalidArgumentError(f"prompt: token id {bad[0]} is outside the vocabulary "
                                   f"(0..{config.vocab_size - 1})")
    bad = [t for t, _ in logit_bias if not 0 <= t < config.vocab_size]
    if bad:
        raise InvalidArgumentError(f"logit_bias: token id {bad[0]} is outside the vocabulary "
                                   f"(0..{config.vocab_size - 1})")
    if config.sliding_window is None and len(prompt) + max_tokens > config.max_seq_len:
        raise ContextLengthError(
            f"prompt of {len(prompt)} tokens + max_tokens {max_tokens} = "
            f"{len(prompt) + max_tokens} exceeds the model's context length of "
            f"{config.max_seq_len} tokens; shorten the prompt or lower max_tokens")


@torch.inference_mode()
def prefill(model: Transformer, cache: RollingCache, rows: list[int],
            prompts: Sequence[Sequence[int]], chunk_size: int) -> torch.Tensor:
    """Run prompts of any lengths through the model in chunks; (B, vocab) logits of each
    prompt's last token."""
    if chunk_size < 1:
        raise InvalidArgumentError(f"chunk_size must be >= 1 (got {chunk_size})")
    device = model.device
    last = torch.empty(len(rows), model.config.vocab_size)
    longest = max(len(p) for p in prompts)
    for start in range(0, longest, chunk_size):
        live = [b for b, p in enumerate(prompts) if len(p) > start]
        chunks = [list(prompts[b][start:start + chunk_size]) for b in live]
        width = max(len(c) for c in chunks)
        tokens = torch.tensor([c + [0] * (width - len(c)) for c in chunks], device=device)
        logits = model(tokens, cache, rows=[rows[b] for b in live],
                       n_new=[len(c) for c in chunks], last_only=True)
        last[live] = logits.cpu()
    return last


@torch.inference_mode()
def prefill_every_position(model: Transformer, cache: RollingCache, rows: list[int],
                           chunks: Sequence[Sequence[int]]) -> tuple[torch.Tensor, torch.Tensor]:
    """One chunk of each row's prompt (any lengths), keeping every position's logits: the
    (B, vocab) logits of each chunk's last token on the host, and (B, T, vocab) of all of
    them on the model's device (a prompt's own log-probabilities need them)."""
    width = max(len(c) for c in chunks)
    tokens = torch.tensor([list(c) + [0] * (width - len(c)) for c in chunks],
                          device=model.device)
    every = model(tokens, cache, rows=rows, n_new=[len(c) for c in chunks])
    last = torch.tensor([len(c) - 1 for c in chunks], device=every.device)
    return every[torch.arange(len(chunks), device=every.device), last].cpu(), every


def score_positions(logits: torch.Tensor, following: Sequence[int], top: int
                    ) -> list[PromptToken]:
    """The log-probability of each token in `following` under the (n, vocab) logits of the
    positions before it, with the `top` likeliest tokens at each."""
    n = len(following)
    if n == 0:
        return []
    lp = torch.log_softmax(logits[:n].float(), dim=-1)
    ids = torch.tensor(list(following), device=lp.device)
    chosen = lp.gather(1, ids[:, None])[:, 0].tolist()
    best: list[list[tuple[int, float]]] = [[] for _ in range(n)]
    if top:
        values, indices = lp.topk(top, dim=-1)
        best = [list(zip(i, v, strict=True))
                for i, v in zip(indices.tolist(), values.tolist(), strict=True)]
    return [PromptToken(t, c, b) for t, c, b in zip(following, chosen, best, strict=True)]


@torch.inference_mode()
def decode_step(model: Transformer, cache: RollingCache, rows: list[int], tokens: list[int]
                ) -> torch.Tensor:
    """One new token for each row; (B, vocab) logits."""
    device = model.device
    return model(torch.tensor(tokens, device=device)[:, None], cache, rows=rows,
                 last_only=True).cpu()


@torch.inference_mode()
def all_logits(model: Transformer, prompt: Sequence[int], chunk_size: int,
               dtype: torch.dtype) -> torch.Tensor:
    """(T, vocab) float32 logits of every position of one sequence, pre-filled in chunks."""
    device = model.device
    cache = RollingCache(model.config, rows=1, dtype=dtype, device=device)
    out = []
    for start in range(0, len(prompt), chunk_size):
        tokens = torch.tensor([list(prompt[start:start + chunk_size])], device=device)
        out.append(model(tokens, cache)[0].cpu())
    return torch.cat(out)


class SequenceState:
    """Book-keeping of one generated sequence: its streaming detokenizer and its stop conditions
    (the engine keeps one per request; its tokens come from the engine's BatchSampler)."""

    def __init__(self, params: SamplingParams, decode: Callable[[list[int]], str],
                 eos_ids: frozenset[int], constraint: Constraint | None = None) -> None:
        self.params = params
        self.constraint = constraint   # the grammar the answer follows, if it has one
        self.decoder = StreamDecoder(decode, params.stop)
        self.stop_ids = set(params.stop_token_ids) | (set() if params.ignore_eos else eos_ids)
        self.n_generated = 0
        self.finish_reason: str | None = None

    def add_token(self, result: SampleResult) -> StreamPiece:
        """Take the sampled token (batch_sampling.py chose it) and say what it adds."""
        self.n_generated += 1
        wanted = self.params.logprobs or self.params.top_logprobs > 0
        piece = StreamPiece(text="", token_ids=[result.token_id],
                            logprobs=[result.logprob] if wanted else [],
                            top_logprobs=[result.top_logprobs] if self.params.top_logprobs else [])
        if result.token_id in self.stop_ids:
            # EOS or a stop token: it ends the text and is not part of it.
            self.finish_reason = "stop"
            piece.text = self.decoder.flush()
            return piece
        piece.text = self.decoder.push(result.token_id)
        if self.constraint is not None:
            self.constraint.accept(result.token_id)
        if self.decoder.stopped:
            self.finish_reason = "stop"
        elif self.constraint is not None and self.constraint.finished:
            self.finish_reason = "stop"           # the grammar is complete
            piece.text += self.decoder.flush()
        elif self.n_generated >= self.params.max_tokens:
            self.finish_reason = "length"
            piece.text += self.decoder.flush()
        return piece
