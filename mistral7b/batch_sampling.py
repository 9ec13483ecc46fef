"""Sampling a whole batch at once, on the logits' device: one step's (B, vocab) logits in, B
tokens out, with one copy to the host.

Each row has its own parameters, held as one tensor per parameter:

    logits -> + logit_bias -> repetition penalty -> presence/frequency penalties
           -> rows under a grammar: -inf for the tokens it forbids (constrained.py)
           -> greedy rows: argmax
           -> sampled rows: / temperature -> top-k -> top-p -> min-p -> inverse-CDF draw

These are the rules of sampling.py, whose per-sequence `Sampler` is the plain reference the tests
hold this module to. Top-k and top-p run on each row's logits sorted once (only when a row of the
batch asks for one of them). Min-p compares logits, log p - log p_max >= log(min_p), so it needs
no normalising sum. The draw itself runs in token-id order. So a row's token depends on its own
logits, parameters and random number only, never on which other rows share the batch.

The random numbers come from one CPU `torch.Generator` per row, seeded from its `seed`, one
uniform number per step: a seeded request draws the same numbers on every device and in any
batch, and the same tokens as the per-sequence Sampler.

Penalties need each row's token history: `seen` (prompt and generated ids) and `counts`
(generated ids), kept as (rows, vocab) tensors indexed by cache row and allocated on first use.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from mistral7b.constrained import allowed_tokens
from mistral7b.sampling import SampleResult, SamplingParams, resolve_seed, seeded_generator
from mistral7b.transfer import HostCopy, to_device, upload


@dataclass
class _Row:
    params: SamplingParams
    generator: torch.Generator


# Rows under a grammar: their indices in the batch, and their bitmasks of allowed tokens.
Masks = tuple[Sequence[int], torch.Tensor]


class PendingSample:
    """A batch's sampled tokens, on the device and on their way to the host."""

    def __init__(self, tokens: torch.Tensor, table: HostCopy, params: list[SamplingParams],
                 n_top: int) -> None:
        self.tokens = tokens           # (B,) int64 on the sampler's device
        self._table, self._params, self._n_top = table, params, n_top

    def results(self) -> list[SampleResult]:
        """Wait for the copy and read each row's token (and logprobs when it asked)."""
        table = self._table.tolist()
        results = []
        for line, p in zip(table, self._params, strict=True):
            k = self._n_top
            top = [(int(line[2 + k + j]), line[2 + j]) for j in range(min(p.top_logprobs, k))]
            results.append(SampleResult(int(line[0]), line[1] if len(line) > 1 else 0.0, top))
        return results


class BatchSampler:
    """Samples the next token of many sequences at once. Sequences are named by a row index
    in 0..rows-1 (the engine uses cache rows); `start` a row before sampling it."""

    def __init__(self, rows: int, vocab_size: int, device: torch.device | str = "cpu") -> None:
        self.vocab_size = vocab_size
        self.device = torch.device(device)
        self._rows: list[_Row | None] = [None] * rows
        self._seen: torch.Tensor | None = None        # (rows, vocab) bool, on first penalty
        self._counts: torch.Tensor | None = None      # (rows, vocab) float32

    def start(self, row: int, params: SamplingParams, prompt: Sequence[int]) -> None:
        """A new sequence in `row`: its own random generator, and (when it has penalties) a
        history holding its prompt."""
        self._rows[row] = _Row(params, seeded_generator(resolve_seed(params.seed)))
        if _has_penalties(params):
            seen, counts = self._history()
            seen[row] = False
            counts[row] = 0.0
            if prompt:
                seen[row, to_device(list(prompt), self.device)] = True

    def sample(self, rows: Sequence[int], logits: torch.Tensor, masks: Masks | None = None
               ) -> list[SampleResult]:
        """The next token of each row from its (len(rows), vocab) logits, with logprobs and top
        logprobs for the rows that ask (from the raw logits, as the reference does). masks:
        the batch indices of the rows under a grammar and their (n, words) int32 bitmasks on
        the host (constrained.py); the tokens a bitmask forbids get -inf."""
        return self.launch(rows, logits, masks).results()

    def launch(self, rows: Sequence[int], logits: torch.Tensor, masks: Masks | None = None
               ) -> PendingSample:
        """Queue `sample`'s work on the device and start its one copy to the host, without
        waiting for either: the tokens stay on the device (PendingSample.tokens, which the next
        decode step may take as its input) until results() reads them."""
        states = [self._rows[r] for r in rows]
        if any(s is None for s in states):
            raise ValueError("sample() of a row that was not start()ed")
        params = [s.params for s in states if s is not None]
        raw = logits.detach().to(self.device, torch.float32)
        V = raw.shape[1]
        device = raw.device
        processed = self._processed(rows, params, raw)
        if masks is not None:
            index, bits = masks
            forbidden = ~allowed_tokens(upload(bits, device), V)
            if len(index) == len(rows):               # every row: no gather and scatter
                processed = processed.masked_fill(forbidden, float("-inf"))
            else:
                chosen = to_device(list(index), device)
                processed = processed.index_put(
                    (chosen,), processed[chosen].masked_fill(forbidden, float("-inf")))

        sampled = [b for b, p in enumerate(params) if not p.greedy]
        if not sampled:
            tokens = processed.argmax(dim=-1)
        else:
            picks = self._draw(processed if len(sampled) == len(params) else processed[sampled],
                               [params[b] for b in sampled], [states[b] for b in sampled])
            if len(sampled) == len(params):
                tokens = picks
            else:                                     # greedy rows: the argmax
                tokens = processed.argmax(dim=-1).index_put(
                    (to_device(sampled, device),), picks)

        # Everything the host needs in one tensor, one copy: ids, then logprobs when asked.
        columns = [tokens.double()[:, None]]
        n_top = min(max(p.top_logprobs for p in params), V)
        if any(p.logprobs or p.top_logprobs for p in params):
            logprobs = torch.log_softmax(raw, dim=-1)
            columns.append(logprobs.gather(1, tokens[:, None]).double())
            if n_top:
                values, ids = torch.topk(logprobs, n_top, dim=-1)
                columns += [values.double(), ids.double()]
        self._record(rows, params, tokens)
        return PendingSample(tokens, HostCopy(torch.cat(columns, dim=1)), params, n_top)

    # ---- the steps -------------------------------------------------------------------------

    def _processed(self, rows: Sequence[int], params: list[SamplingParams], raw: torch.Tensor
                   ) -> torch.Tensor:
        """Logit bias, then the penalties, for the rows that have them."""
        out = raw
        bias = [(b, t, v) for b, p in enumerate(params) for t, v in p.logit_bias]
        if bias:
            index = to_device([(b, t) for b, t, _ in bias], raw.device).T
            values = to_device([v for _, _, v in bias], raw.device)
            out = out.index_put((index[0], index[1]), values, accumulate=True)
        penalised = [b for b, p in enumerate(params) if _has_penalties(p)]
        if penalised:
            seen, counts = self._history()
            which = to_device([rows[b] for b in penalised], raw.device)
            chosen = to_device(penalised, raw.device)
            logits = out[chosen]
            rep = _column([params[b].repetition_penalty for b in penalised], raw.device)
            pres = _column([params[b].presence_penalty for b in penalised], raw.device)
            freq = _column([params[b].frequency_penalty for b in penalised], raw.device)
            hit = torch.where(logits > 0, logits / rep, logits * rep)
            logits = torch.where(seen[which], hit, logits)
            count = counts[which]
            logits = logits - pres * (count > 0).float() - freq * count
            out = out.index_put((chosen,), logits)
        return out

    def _draw(self, logits: torch.Tensor, params: list[SamplingParams],
              states: Sequence[_Row | None]) -> torch.Tensor:
        """One token per row, sampled from its filtered, temperature-scaled distribution."""
        device = logits.device
        V = logits.shape[1]
        filtered = logits / _column([p.temperature for p in params], device)
        if any(p.top_k > 0 or p.top_p < 1.0 for p in params):
            keep = _top_k_top_p(filtered, [p.top_k for p in params], [p.top_p for p in params])
            filtered = filtered.masked_fill(~keep, float("-inf"))
        if any(p.min_p > 0 for p in params):
            # p / p_max < min_p  <=>  logit - max logit < log(min_p)
            floor = _column([math.log(p.min_p) if p.min_p > 0 else -math.inf for p in params],
                            device)
            top = filtered.max(dim=-1, keepdim=True).values
            filtered = filtered.masked_fill(filtered - top < floor, float("-inf"))
        cdf = torch.softmax(filtered, dim=-1).cumsum(dim=-1)
        u = torch.cat([torch.rand((1,), generator=s.generator) for s in states if s is not None])
        target = upload(u, device)[:, None] * cdf[:, -1:]
        return torch.searchsorted(cdf, target, right=True)[:, 0].clamp(max=V - 1)

    def _record(self, rows: Sequence[int], params: list[SamplingParams],
                tokens: torch.Tensor) -> None:
        penalised = [b for b, p in enumerate(params) if _has_penalties(p)]
        if not penalised:
            return
        seen, counts = self._history()
        which = to_device([rows[b] for b in penalised], tokens.device)
        ids = tokens[to_device(penalised, tokens.device)]
        seen[which, ids] = True
        counts[which, ids] += 1.0

    def _history(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self._seen is None or self._counts is None:
            shape = (len(self._rows), self.vocab_size)
            self._seen = torch.zeros(shape, dtype=torch.bool, device=self.device)
            self._counts = torch.zeros(shape, dtype=torch.float32, device=self.device)
        return self._seen, self._counts


def _has_penalties(p: SamplingParams) -> bool:
    return p.repetition_penalty != 1.0 or p.presence_penalty != 0.0 or p.frequency_penalty != 0.0


def _column(values: list[float], device: torch.device) -> torch.Tensor:
    return to_device(values, device, torch.float32)[:, None]


def _top_k_top_p(scaled: torch.Tensor, top_k: list[int], top_p: list[float]) -> torch.Tensor:
    """Which ids survive top-k and then top-p, per row, from one stable descending sort (ties
    keep the lower id first, as the reference does). k = 0 and p = 1 keep everything."""
    V = scaled.shape[1]
    device = scaled.device
    values, order = torch.sort(scaled, dim=-1, descending=True, stable=True)
    ranks = torch.arange(V, device=device)[None, :]
    k = to_device([k if 0 < k < V else V for k in top_k], device)[:, None]
    keep = ranks < k
    probs = torch.softmax(values.masked_fill(~keep, float("-inf")), dim=-1)
    before = probs.cumsum(dim=-1) - probs              # mass of the strictly better ids
    p = _column(top_p, device)
    keep &= (before < p) | (p >= 1.0) | (ranks == 0)
    return torch.zeros_like(keep).scatter(-1, order, keep)
