"""Sampling a whole batch at once, on the logits' device: one step's (B, vocab) logits in, B
tokens out, with one copy to the host.

Each row has its own parameters, held as one tensor per parameter:

    logits -> + logit_bias -> repetition penalty -> presence/frequency penalties
           -> rows under a grammar: -inf for the tokens it forbids (constrained.py)
           -> greedy rows: argmax
           -> sampled rows: / temperature -> top-k -> top-p -> min-p -> inverse-CDF draw

These are the rules of sampling.py, whose per-sequence `Sampler` is the plain reference the tests
hold this module to. Top-k and top-p run on each row's logits in descending order, ties in id
order (only when a row of the batch asks for one of them): on the CPU, a row with a top-k of at
most 1024 takes its 1024 best ids from one torch.topk on a 64-bit key that breaks ties by id
(`_stable_top`); other rows, and every row on a GPU, sort the whole vocabulary. Min-p compares
logits, log p - log p_max >= log(min_p), so it needs no normalising sum. The draw itself runs in
token-id order. So a row's token depends on its own logits, parameters and random number only,
never on which other rows share the batch.

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

# Benchmarks switch these off to compare (benchmarks/gpu.py): top-k rows take their candidates
# from torch.topk instead of a sort of the whole vocabulary; parameter columns are uploaded once
# per batch composition instead of every step.
TOPK_CANDIDATES = True
CACHE_CONSTANTS = True
CANDIDATES = 1024              # ids a top-k row looks at (rows with a larger k sort everything)
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
            filtered = filtered.masked_fill(~keep, float("-inf"))
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
    """Which ids survive top-k and then top-p, per row, in descending order with ties in id
    order (as the reference's stable sort). k = 0 and p = 1 keep everything. const: how the
    per-row columns reach the device (default: a fresh copy).

    Rows with 0 < k <= CANDIDATES look only at their CANDIDATES best ids (one torch.topk);
    the others sort the whole vocabulary. Which of the two a row takes depends on its own k
    alone, and each runs row by row at a fixed width, so a row's result never depends on the
    other rows of the batch."""
    V = scaled.shape[1]
    device = scaled.device
    if const is None:
        def const(values: Sequence[float], dtype: torch.dtype) -> torch.Tensor:
            return to_device(list(values), device, dtype)
    ks = [k if 0 < k < V else V for k in top_k]
    # On a GPU the sort is cheap (H100, 32000 ids: sort 46 us, topk of 1024 94 us), so only the
    # CPU takes candidates.
    topk = TOPK_CANDIDATES and device.type == "cpu"
    narrow = [b for b, k in enumerate(ks) if topk and k <= CANDIDATES < V]   # others: sort
    if len(narrow) in (0, len(ks)):
        return _filter(scaled, ks, top_p, const, CANDIDATES if narrow else V)
    wide = [b for b in range(len(ks)) if b not in narrow]
    keep = torch.empty(scaled.shape, dtype=torch.bool, device=device)
    for group, width in ((narrow, CANDIDATES), (wide, V)):
        index = const(group, torch.int64)
        keep.index_copy_(0, index, _filter(scaled.index_select(0, index), [ks[b] for b in group],
                                           [top_p[b] for b in group], const, width))
    return keep


def _filter(scaled: torch.Tensor, ks: list[int], top_p: list[float], const: Const,
            width: int) -> torch.Tensor:
    """_top_k_top_p's rule over each row's `width` best ids (width >= every k)."""
    V = scaled.shape[1]
    if width < V:
        order = _stable_top(scaled, width)
        values = scaled.gather(1, order)
    else:
        values, order = torch.sort(scaled, dim=-1, descending=True, stable=True)
    ranks = torch.arange(width, device=scaled.device)[None, :]
    keep = ranks < const(ks, torch.int64)[:, None]
    probs = torch.softmax(values.masked_fill(~keep, float("-inf")), dim=-1)
    before = probs.cumsum(dim=-1) - probs              # mass of the strictly better ids
    p = const(top_p, torch.float32)[:, None]
    keep &= (before < p) | (p >= 1.0) | (ranks == 0)
    return torch.zeros(scaled.shape, dtype=torch.bool, device=scaled.device).scatter(
        -1, order, keep)


def _stable_top(x: torch.Tensor, k: int) -> torch.Tensor:
    """The ids of each row's k largest values, largest first and ties in id order: the first
    k of a stable descending sort, from one torch.topk over distinct 64-bit keys. The high word
    is the float32's bits made order-preserving (a negative float's bits, read as an integer,
    order backwards, so all but the sign bit are flipped); the low word is V - 1 - id, so of two
    equal values the lower id has the larger key.

        1.0 -> 0x3F800000,  -1.0 -> 0xBF800000 ^ 0x7FFFFFFF = 0xC07FFFFF (int32 -1065353217),
        -2.0 -> 0xC0000000 ^ 0x7FFFFFFF = 0xBFFFFFFF (int32 -1073741825 < -1.0's)
    """
    V = x.shape[1]
    bits = (x.float() + 0.0).contiguous().view(torch.int32).to(torch.int64)  # + 0.0: -0.0 -> 0.0
    ordered = torch.where(bits < 0, bits ^ 0x7FFFFFFF, bits)
    ids = torch.arange(V, device=x.device)
    return (ordered * 2**32 + (V - 1 - ids)).topk(k, dim=-1).indices
