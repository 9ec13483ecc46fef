"""Sampling a whole batch at once, on the logits' device: one step's (B, vocab) logits in, B
tokens out, with one copy to the host.

Each row has its own parameters, held as one tensor per parameter:

    logits -> + logit_bias -> repetition penalty -> presence/frequency penalties
           -> rows under a grammar: -inf for the tokens it forbids (constrained.py)
           -> greedy rows: argmax
           -> sampled rows: / temperature -> top-k -> top-p -> min-p -> inverse-CDF draw

These are the rules of sampling.py, whose per-sequence `Sampler` is the plain reference the tests
hold this module to. Top-k and top-p run on each row's logits in descending order, ties in id
order (only when a row of the batch asks for one of them): on the CPU each such row sorts only
its candidates, the ids near its best logit (`_row_keep`); on a GPU every row sorts the whole
vocabulary. Min-p compares logits, log p - log p_max >= log(min_p), so it needs no normalising
sum. The draw itself runs in token-id order. So a row's token depends on its own logits,
parameters and random number only, never on which other rows share the batch.

The random numbers come from one CPU `torch.Generator` per row, seeded from its `seed`, one
uniform number per step: a seeded request draws the same numbers on every device and in any
batch, and the same tokens as the per-sequence Sampler.

The per-row parameters (temperatures, k, p, penalties, row indices) change only when the batch
does, so each distinct column is uploaded once and kept (`BatchSampler._const`) instead of being
copied to the device every step.

Penalties need each row's token history: `seen` (prompt and generated ids) and `counts`
(generated ids), kept as (rows, vocab) tensors indexed by cache row and allocated on first use.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
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
# A small host list as a tensor on the sampler's device: (values, dtype) -> tensor.
Const = Callable[[Sequence[float], torch.dtype], torch.Tensor]

# Benchmarks switch these off to compare (benchmarks/gpu.py): top-k/top-p rows on the CPU look
# at their candidates only instead of sorting the whole vocabulary; parameter columns are
# uploaded once per batch composition instead of every step.
TOPK_CANDIDATES = True
CACHE_CONSTANTS = True
_CONSTANTS_KEPT = 256          # distinct columns kept before the cache starts over


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
        self._constants: dict[tuple[torch.dtype, tuple[float, ...]], torch.Tensor] = {}

    def _const(self, values: Sequence[float], dtype: torch.dtype) -> torch.Tensor:
        """`values` on the device; the same values come back as the same (never modified)
        tensor, with no new upload."""
        if not CACHE_CONSTANTS:
            return to_device(list(values), self.device, dtype)
        key = (dtype, tuple(values))
        tensor = self._constants.get(key)
        if tensor is None:
            if len(self._constants) >= _CONSTANTS_KEPT:
                self._constants.clear()
            tensor = self._constants[key] = to_device(list(values), self.device, dtype)
        return tensor

    def start(self, row: int, params: SamplingParams, prompt: Sequence[int]) -> None:
        """A new sequence in `row`: its own random generator, and (when it has penalties) a
        history holding its prompt."""
        self._rows[row] = _Row(params, seeded_generator(resolve_seed(params.seed)))
        if _has_penalties(params):
            seen, counts = self._history()
            seen[row] = False
            counts[row] = 0.0
            if prompt:
                ids = to_device(list(prompt), self.device)
                seen[row].index_put_((ids,), self._true())

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
                chosen = self._const(index, torch.int64)
                processed = processed.index_copy(
                    0, chosen, processed.index_select(0, chosen).masked_fill(forbidden,
                                                                             float("-inf")))

        sampled = [b for b, p in enumerate(params) if not p.greedy]
        if not sampled:
            tokens = greedy_ids(processed)
        else:
            every = len(sampled) == len(params)
            where = None if every else self._const(sampled, torch.int64)
            picks = self._draw(processed if where is None else processed.index_select(0, where),
                               [params[b] for b in sampled], [states[b] for b in sampled])
            if where is None:
                tokens = picks
            else:                                     # greedy rows: the argmax
                tokens = greedy_ids(processed).index_put((where,), picks)

        # Everything the host needs in one tensor, one copy: ids, then logprobs when asked
        # (as float64, which holds both exactly); without logprobs the ids alone, as they are.
        n_top = min(max(p.top_logprobs for p in params), V)
        if any(p.logprobs or p.top_logprobs for p in params):
            logprobs = torch.log_softmax(raw, dim=-1)
            columns = [tokens.double()[:, None], logprobs.gather(1, tokens[:, None]).double()]
            if n_top:
                values, ids = torch.topk(logprobs, n_top, dim=-1)
                columns += [values.double(), ids.double()]
            table = torch.cat(columns, dim=1)
        else:
            table = tokens[:, None]
        self._record(rows, params, tokens)
        return PendingSample(tokens, HostCopy(table), params, n_top)

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
            which = self._const([rows[b] for b in penalised], torch.int64)
            every = len(penalised) == len(params)            # no gather and scatter needed
            chosen = self._const(penalised, torch.int64)
            # index_select: whole rows, several times faster than tensor[index] on the CPU
            # (AMD EPYC, 16 rows of 32000 float32: 64-89 against 392-433 us).
            logits = out if every else out.index_select(0, chosen)
            rep = self._column([params[b].repetition_penalty for b in penalised])
            pres = self._column([params[b].presence_penalty for b in penalised])
            freq = self._column([params[b].frequency_penalty for b in penalised])
            hit = torch.where(logits > 0, logits / rep, logits * rep)
            logits = torch.where(seen.index_select(0, which), hit, logits)
            count = counts.index_select(0, which)
            logits = logits - pres * (count > 0).float() - freq * count
            out = logits if every else out.index_copy(0, chosen, logits)
        return out

    def _draw(self, logits: torch.Tensor, params: list[SamplingParams],
              states: Sequence[_Row | None]) -> torch.Tensor:
        """One token per row, sampled from its filtered, temperature-scaled distribution."""
        device = logits.device
        V = logits.shape[1]
        filtered = logits / self._column([p.temperature for p in params])
        if any(p.top_k > 0 or p.top_p < 1.0 for p in params):
            keep = _top_k_top_p(filtered, [p.top_k for p in params], [p.top_p for p in params],
                                self._const)
            filtered = torch.where(keep, filtered, float("-inf"))   # 3x masked_fill(~keep) on CPU
        if any(p.min_p > 0 for p in params):
            # p / p_max < min_p  <=>  logit - max logit < log(min_p)
            floor = self._column([math.log(p.min_p) if p.min_p > 0 else -math.inf
                                  for p in params])
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
        which = self._const([rows[b] for b in penalised], torch.int64)
        ids = tokens[self._const(penalised, torch.int64)]
        seen.index_put_((which, ids), self._true())
        counts[which, ids] += 1.0

    def _true(self) -> torch.Tensor:
        """True as a tensor on the device. `seen[i] = True` would copy a host scalar to the
        device, a copy that waits for every queued kernel (it stopped the engine's one-step-
        ahead decode at every sampled step: H100, 130.8 against 167.3 tok/s greedy)."""
        return self._const([True], torch.bool)[0]

    def _column(self, values: list[float]) -> torch.Tensor:
        return self._const(values, torch.float32)[:, None]

    def _history(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self._seen is None or self._counts is None:
            shape = (len(self._rows), self.vocab_size)
            self._seen = torch.zeros(shape, dtype=torch.bool, device=self.device)
            self._counts = torch.zeros(shape, dtype=torch.float32, device=self.device)
        return self._seen, self._counts


def greedy_ids(logits: torch.Tensor) -> torch.Tensor:
    """Each row's argmax (the lowest id on ties), as torch.argmax. On the CPU through NumPy,
    whose vectorised argmax is 10x faster than torch's there (49152 ids: 12 against 126 us on
    the AMD EPYC, ~1% of a default-model decode step)."""
    if logits.device.type == "cpu" and logits.dtype == torch.float32:
        return torch.from_numpy(np.argmax(logits.numpy(), axis=-1))
    return logits.argmax(dim=-1)


def _has_penalties(p: SamplingParams) -> bool:
    return p.repetition_penalty != 1.0 or p.presence_penalty != 0.0 or p.frequency_penalty != 0.0


def _top_k_top_p(scaled: torch.Tensor, top_k: list[int], top_p: list[float],
                 const: Const | None = None) -> torch.Tensor:
    """Which ids survive top-k and then top-p, per row: the reference's rules (sampling.py's
    apply_top_k, then apply_top_p over the softmax of what top-k kept), with ids in descending
    order and ties in id order. k = 0 and p = 1 keep everything. const: how the per-row columns
    reach the device (default: a fresh copy).

    On the CPU each row looks only at its candidates (`_row_keep`): a sort of the whole
    vocabulary costs 3-7 ms a row there, ~the whole decode step of the default model. On a GPU,
    where that sort is cheap (H100, 32000 ids: 46 us), every row of the batch is sorted at
    once (`_sorted_keep`). Both give the same ids (tested), and each row's result depends on
    its own logits and parameters only."""
    V = scaled.shape[1]
    ks = [k if 0 < k < V else V for k in top_k]
    if TOPK_CANDIDATES and scaled.device.type == "cpu":
        return torch.stack([_row_keep(scaled[b], ks[b], top_p[b]) for b in range(len(ks))])
    if const is None:
        device = scaled.device

        def const(values: Sequence[float], dtype: torch.dtype) -> torch.Tensor:
            return to_device(list(values), device, dtype)
    return _sorted_keep(scaled, ks, top_p, const)


def _sorted_keep(scaled: torch.Tensor, ks: list[int], top_p: list[float], const: Const
                 ) -> torch.Tensor:
    """_top_k_top_p for every row at once, through a stable sort of the whole vocabulary."""
    V = scaled.shape[1]
    order = torch.sort(scaled, dim=-1, descending=True, stable=True).indices
    ranks = torch.arange(V, device=scaled.device)[None, :]
    keep = ranks < const(ks, torch.int64)[:, None]
    in_top_k = torch.zeros_like(keep).scatter(-1, order, keep)
    probs = torch.softmax(scaled.masked_fill(~in_top_k, float("-inf")), dim=-1)
    ranked = probs.gather(1, order)
    before = ranked.cumsum(dim=-1) - ranked             # mass of the strictly better ids
    p = const(top_p, torch.float32)[:, None]
    keep &= (before < p) | (p >= 1.0) | (ranks == 0)
    return torch.zeros_like(keep).scatter(-1, order, keep)


# A top-p row's candidates must hold at least p + this of the mass: then every id outside them
# has at least p of strictly better mass before it, whatever the rounding of the cumulative
# sums, and is dropped as the whole sort would drop it.
_MASS_MARGIN = 1e-4


def _row_keep(x: torch.Tensor, k: int, p: float) -> torch.Tensor:
    """_top_k_top_p for one CPU row x (V,) without sorting the vocabulary.

    Top-k: the k-th largest value (a partition) bounds the kept set; among ids tied at it the
    lowest win (apply_top_k's rule). Top-p: the candidates are the m best ids (and any tied with
    the m-th), m growing 8x at a time from 64 until they hold p + _MASS_MARGIN of the mass (or
    are every id); only they are sorted (stable, so ties stay in id order, as in the whole
    sort). The probabilities come from the same softmax over the row in id order as
    `_sorted_keep`'s, and the cumulative sum runs in rank order one id at a time on the CPU, so
    the candidates' sums are the first terms of the whole sort's and every decision is the
    same. The masks are NumPy operations: PyTorch's CPU comparisons and masked_fill cost 60-140
    us each on 49152 ids (AMD EPYC), 5-10x NumPy's."""
    V = x.shape[0]
    a = x.numpy()
    if k < V:
        kth = np.partition(a, V - k)[V - k]                     # the k-th largest value
        above, at = a > kth, a == kth
        room = k - int(np.count_nonzero(above))
        kept = above | (at & (np.cumsum(at) <= room))
    else:
        kept = np.ones(V, dtype=bool)
    if p >= 1.0:
        return torch.from_numpy(kept)
    logits = np.where(kept, a, np.float32("-inf"))
    probs = torch.softmax(torch.from_numpy(logits), dim=0)
    finite = int(np.count_nonzero(logits > -np.inf))
    m = 64
    while True:
        # The m best logits and any tied with the m-th, ascending (ties in id order), then
        # ranked by a stable sort; 8x more while they hold too little of the mass.
        if m < finite:
            ids = np.flatnonzero(logits >= np.partition(logits, V - m)[V - m])
        else:
            ids = np.flatnonzero(logits > -np.inf)
        ids = ids[np.argsort(-logits[ids], kind="stable")]
        ranked = probs[torch.from_numpy(ids)]
        total = ranked.cumsum(dim=0)
        if m >= finite or total[-1].item() >= p + _MASS_MARGIN:
            break
        m *= 8
    keep_ranked = ((total - ranked) < p).numpy()
    keep_ranked[0] = True
    out = np.zeros(V, dtype=bool)
    out[ids[keep_ranked]] = True
    return torch.from_numpy(out)
