"""RollingCache: the paper's rolling-buffer key/value cache, one row per sequence.

Each row (sequence) of the cache has S slots per layer. With a sliding window W, S = W; without a
window, S = the model's context length. The keys and values of position i live in slot i mod S,
so once a sequence passes S positions each new token overwrites the one S positions older and the
memory stops growing. Rows grow lazily up to S (doubling), so a short sequence does not pay for a
full window.

Worked example, W = S = 4, a prompt of 6 tokens pre-filled in chunks of 3, then one decode step:

    chunk 1: positions 0 1 2 -> slots 0 1 2        buffer [p0 p1 p2 --]
    chunk 2: positions 3 4 5 -> slots 3 0 1        writing first would overwrite p0 and p1,
             which query p3 still needs, so attend first over buffer ++ chunk:
             keys [p0 p1 p2 --] ++ [p3 p4 p5]; query p5 may see 5 - 4 < j <= 5: p2 p3 p4 p5
             then write:                          buffer [p4 p5 p2 p3]
    decode:  position 6 -> slot 6 mod 4 = 2        write first (p2 is outside 6's window):
                                                   buffer [p4 p5 p6 p3], keys p3 p4 p5 p6

Which position sits in slot s of a row that has seen `end` positions? The newest position
congruent to s modulo S: pos(s) = end - 1 - ((end - 1 - s) mod S); the slot is empty when that
is negative. With end = 7 and S = 4: slots 0 1 2 3 hold 4 5 6 3. The attention mask is built from
these positions, so the buffer never needs to be re-ordered ("unrotated") in time order: softmax
does not care about the order of its keys, only about which keys are allowed.

A step either writes the new keys first and attends over the buffer (decode, or any chunk that
overwrites nothing still needed), or attends over buffer ++ chunk and writes afterwards (a chunk
that wraps around the buffer during chunked pre-fill).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from mistral7b.config import ModelConfig
from mistral7b.errors import ContextLengthError

_INITIAL_SLOTS = 256


@dataclass
class CacheStep:
    """Index arithmetic for one forward pass over `rows`, shared by every layer."""

    rows: torch.Tensor          # (B,) cache rows taking part
    first_row: int
    contiguous: bool            # rows == start..start+B-1: read the buffer as a view, no gather
    positions: torch.Tensor     # (B, T) absolute position of each new token (padding included)
    n_new: list[int]            # valid new tokens per row; the rest of T is padding
    write_first: bool           # write new k/v before attending (see module docstring)
    n_slots: int                # leading slots that can hold a position yet (the rest is empty)
    mask: torch.Tensor          # (B, 1, T, keys) bool, True where a query may attend a key
    write_b: torch.Tensor       # (N,) batch index of each (row, token) to store
    write_t: torch.Tensor       # (N,) token index within the chunk
    write_row: torch.Tensor     # (N,) its cache row
    write_slot: torch.Tensor    # (N,) destination slot
    # True when `mask` is plain causal over keys 0..T-1 (every row starts empty, no padding, no
    # window cut): attention may then skip the mask and use a flash kernel.
    causal: bool = False
    _biases: dict[tuple[int, int, torch.dtype], torch.Tensor] = field(default_factory=dict)

    def attention_bias(self, n_kv: int, group: int, dtype: torch.dtype) -> torch.Tensor:
        """The mask of a one-token step as an additive bias (0 or -inf) for a (B * n_kv,
        group, keys) score tensor; built once per step and shared by every layer."""
        key = (n_kv, group, dtype)
        if key not in self._biases:
            B, keys = self.mask.shape[0], self.mask.shape[-1]
            bias = torch.zeros(self.mask.shape, dtype=dtype, device=self.mask.device)
            bias.masked_fill_(self.mask.logical_not(), float("-inf"))         # (B, 1, 1, keys)
            self._biases[key] = bias.expand(B, n_kv, group, keys).reshape(B * n_kv, group, keys)
        return self._biases[key]


class RollingCache:
    """Key/value buffers of shape (n_layers, rows, n_kv_heads, slots, head_dim): each head's keys
    are one contiguous (slots, head_dim) matrix, which is what attention multiplies with."""

    def __init__(self, config: ModelConfig, rows: int = 1, dtype: torch.dtype = torch.float32,
                 device: torch.device | str = "cpu", max_slots: int | None = None,
                 initial_slots: int = _INITIAL_SLOTS) -> None:
        self.config = config
        self.window = config.sliding_window
        # Without a window the cache must hold the whole sequence, so its size is the limit.
        self.max_slots = max_slots or config.cache_size
        if self.window is not None:
            self.max_slots = min(self.max_slots, self.window)
        self.lengths = [0] * rows  # positions seen by each row
        slots = max(1, min(initial_slots, self.max_slots))
        shape = (config.n_layers, rows, config.n_kv_heads, slots, config.head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)

    @property
    def rows(self) -> int:
        return self.k.shape[1]

    @property
    def slots(self) -> int:
        return self.k.shape[3]

    @property
    def nbytes(self) -> int:
        return self.k.nbytes + self.v.nbytes

    def skip_to(self, row: int, length: int) -> None:
        """Benchmarks only: declare that `row` has processed `length` positions, whatever its
        buffer holds, so that attention at that depth can be timed without computing it."""
        if self.window is None and length > self.max_slots:
            raise ContextLengthError(f"{length} positions exceed the cache's {self.max_slots}")
        self._grow(length)
        self.lengths[row] = length

    def reserve(self, length: int) -> None:
        """Grow the buffers now so that every row can hold `length` positions (decode steps of
        fixed shape do this on the host before the step, which then allocates nothing)."""
        self._grow(length)

    def reset(self, row: int) -> None:
        """Make a row empty for a new sequence. Old contents stay but are masked out: a slot is
        only visible at a position the new sequence has written."""
        self.lengths[row] = 0

    # ---- one forward pass ---------------------------------------------------------------

    def begin(self, rows: list[int], n_new: list[int]) -> CacheStep:
        """Plan a forward pass that appends n_new[b] tokens to row rows[b]."""
        starts = self._make_room(rows, n_new)
        ends = [p + n for p, n in zip(starts, n_new, strict=True)]
        S, T, W = self.slots, max(n_new), self.window
        device = self.k.device
        B = len(rows)

        p = torch.tensor(starts, device=device)[:, None]                 # (B, 1)
        n = torch.tensor(n_new, device=device)[:, None]                  # (B, 1)
        t = torch.arange(T, device=device)[None, :]                      # (1, T)
        positions = p + t                                                # (B, T)
        is_pad = t >= n                                                  # (B, T)

        # Write-first is safe unless a chunk overwrites a slot that one of its own queries still
        # needs, which can only happen for a multi-token chunk once the buffer wraps.
        write_first = T == 1 or max(ends) <= S
        # Slots at or past the longest row's end have never been written: attention skips
        # them, so its cost follows the context, not the buffer's capacity.
        n_slots = min(S, max(ends) if write_first else max(starts))
        if write_first:
            key_pos = _slot_positions(p + n, S)[:, :n_slots]            # (B, n_slots)
            key_ok = key_pos >= 0
        else:
            cached = _slot_positions(p, S)[:, :n_slots]
            key_pos = torch.cat((cached, positions), dim=1)              # (B, n_slots + T)
            key_ok = torch.cat((cached >= 0, ~is_pad), dim=1)
        q = positions[:, :, None]                                        # (B, T, 1)
        k = key_pos[:, None, :]                                          # (B, 1, keys)
        mask = key_ok[:, None, :] & (k <= q)
        if W is not None:
            mask &= q - k < W
        # Padding queries get every key: their output is ignored, but a fully masked row would
        # turn into NaN inside the attention kernel.
        mask |= is_pad[:, :, None]

        # Only the last S valid tokens of a row survive in its buffer.
        keep = ~is_pad & (t >= n - S)
        write_b, write_t = keep.nonzero(as_tuple=True)
        write_slot = positions[write_b, write_t] % S
        rows_t = torch.tensor(rows, device=device)
        causal = (max(starts) == 0 and min(n_new) == T and T > 1 and write_first
                  and (W is None or T <= W))
        return CacheStep(
            rows=rows_t, first_row=rows[0], contiguous=rows == list(range(rows[0], rows[0] + B)),
            positions=positions, n_new=list(n_new), write_first=write_first, n_slots=n_slots,
            mask=mask[:, None], write_b=write_b, write_t=write_t, write_row=rows_t[write_b],
            write_slot=write_slot, causal=causal)

    def begin_decode(self, rows: list[int], n_new: list[int]) -> list[int]:
        """The host's half of a one-token step that the C++ decode step plans itself (it
        computes `begin`'s slots and mask from these lengths): checks that the tokens fit,
        grows the buffers, returns the positions each row has seen. `advance` ends the step."""
        return self._make_room(rows, n_new)

    def advance(self, rows: list[int], n_new: list[int]) -> None:
        for r, n in zip(rows, n_new, strict=True):
            self.lengths[r] += n

    def decode_plan(self, positions: torch.Tensor, write_rows: torch.Tensor) -> CacheStep:
        """A one-token step over rows 0..R-1, built on the device from tensors alone: no host
        data, no sync and shapes that depend only on (R, slots), which is what CUDA graphs and
        torch.compile need. Row b appends the token at positions[b] (its length before the
        step); write_rows[b] is b, or a spare row for a row that only pads the batch (its keys
        land there and its output is ignored). Attention reads every slot of the buffer, the
        unwritten and out-of-window ones masked. The caller advances `lengths` afterwards.

        Same arithmetic as `begin` for n_new = 1: with S = 4 and positions[b] = 6, the step
        writes slot 6 mod 4 = 2 and the slots hold positions 4 5 6 3, all visible."""
        R, S = positions.shape[0], self.slots
        p = positions[:, None]                                           # (R, 1)
        key_pos = _slot_positions(p + 1, S)                              # (R, S)
        mask = key_pos >= 0
        if self.window is not None:
            mask &= p - key_pos < self.window
        batch = torch.arange(R, device=positions.device)
        return CacheStep(
            rows=batch, first_row=0, contiguous=True, positions=p, n_new=[1] * R,
            write_first=True, n_slots=S, mask=mask[:, None, None, :], write_b=batch,
            write_t=torch.zeros_like(batch), write_row=write_rows, write_slot=positions % S)

    def update(self, layer: int, step: CacheStep, k_new: torch.Tensor, v_new: torch.Tensor
               ) -> tuple[torch.Tensor, torch.Tensor]:
        """Store this layer's new keys/values (B, n_kv, T, head_dim) and return the keys and
        values the chunk attends to, (B, n_kv, keys, head_dim), in the order `step.mask`
        describes."""
        if step.write_first:
            self._write(layer, step, k_new, v_new)
            return self._read(layer, step)
        k_old, v_old = self._read(layer, step)
        keys = torch.cat((k_old, k_new.to(k_old.dtype)), dim=2)          # (B, n_kv, S + T, hd)
        values = torch.cat((v_old, v_new.to(v_old.dtype)), dim=2)
        self._write(layer, step, k_new, v_new)
        return keys, values

    def end(self, step: CacheStep) -> None:
        self.advance(step.rows.tolist(), step.n_new)

    # ---- internals ----------------------------------------------------------------------

    def _read(self, layer: int, step: CacheStep) -> tuple[torch.Tensor, torch.Tensor]:
        used = slice(0, step.n_slots)
        if step.contiguous:
            span = slice(step.first_row, step.first_row + len(step.n_new))
            return self.k[layer, span, :, used], self.v[layer, span, :, used]
        return self.k[layer, step.rows, :, used], self.v[layer, step.rows, :, used]

    def _write(self, layer: int, step: CacheStep, k_new: torch.Tensor, v_new: torch.Tensor
               ) -> None:
        # (N, n_kv, head_dim) values into [row, :, slot] for each of the N (row, token) pairs.
        where = (step.write_row, slice(None), step.write_slot)
        if k_new.shape[2] == 1 and step.write_b.shape[0] == k_new.shape[0]:
            # One token per row and every row writes it (decode): no gather needed.
            self.k[layer][where] = k_new[:, :, 0].to(self.k.dtype)
            self.v[layer][where] = v_new[:, :, 0].to(self.v.dtype)
            return
        self.k[layer][where] = k_new[step.write_b, :, step.write_t].to(self.k.dtype)
        self.v[layer][where] = v_new[step.write_b, :, step.write_t].to(self.v.dtype)

    def _make_room(self, rows: list[int], n_new: list[int]) -> list[int]:
        """Check that row rows[b] can take n_new[b] more tokens and grow the buffers for them;
        the positions each row has seen so far."""
        starts = [self.lengths[r] for r in rows]
        ends = [p + n for p, n in zip(starts, n_new, strict=True)]
        if self.window is None and max(ends) > self.max_slots:
            worst = max(range(len(rows)), key=lambda b: ends[b])
            raise ContextLengthError(
                f"sequence of {ends[worst]} tokens ({starts[worst]} already processed + "
                f"{n_new[worst]} new) exceeds the context length of {self.max_slots} tokens "
                "(this model has no sliding window, so it cannot attend past its context)")
        self._grow(max(ends))
        return starts

    def _grow(self, needed: int) -> None:
        """Enlarge every row's buffer before any row wraps, so slot = position still holds."""
        if needed <= self.slots or self.slots >= self.max_slots:
            return
        new_slots = min(self.max_slots, max(needed, 2 * self.slots))
        shape = (*self.k.shape[:3], new_slots, self.k.shape[4])
        for name in ("k", "v"):
            old = getattr(self, name)
            new = torch.zeros(shape, dtype=old.dtype, device=old.device)
            new[:, :, :, : old.shape[3]] = old
            setattr(self, name, new)


def _slot_positions(end: torch.Tensor, slots: int) -> torch.Tensor:
    """Position held by each slot of rows that have seen `end` (B, 1) positions; -1 or less when
    the slot is still empty. See the worked example in the module docstring."""
    s = torch.arange(slots, device=end.device)[None, :]
    return end - 1 - torch.remainder(end - 1 - s, slots)
