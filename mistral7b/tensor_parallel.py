"""Tensor parallelism over torch.distributed (Megatron-style, as in mistral-inference).

Started by torchrun, every rank loads only its slice of each weight matrix:

    column-parallel  wq wk wv (fused wqkv), w1 w3 (fused w13): rank r holds output rows
                     [r * n / N, (r + 1) * n / N), i.e. its n_heads / N query heads,
                     n_kv_heads / N kv heads and hidden_dim / N feed-forward units
    row-parallel     wo, w2: the matching input columns; each rank's partial product is
                     summed over the ranks by one all-reduce (one per attention, one per FFN)
    replicated       embedding, norms, output head: every rank holds them whole (only the
                     leader runs the head: vocab-parallel would need one more collective)

Each rank's rolling cache holds its own kv heads only: the cache memory per rank is 1/N.

Rank 0 (the leader) runs everything else: tokenizer, engine, sampling, CLI or HTTP. Before
each forward pass it broadcasts the pass (`Leader.announce`): the cache it runs on, the rows,
their token counts and cache lengths, and the tokens. The other ranks (followers, `follow`)
run the same pass on their own shard and cache, meeting the leader in the all-reduces; they
skip the output head, whose logits only the leader reads. While idle, the leader sends a
heartbeat, so that a follower can tell a quiet leader from a dead one: every collective has a
timeout, and a rank that loses the others prints one line and exits with status 1.
"""

from __future__ import annotations

import atexit
import contextlib
import datetime
import os
import re
import signal
import sys
import threading
import time
import weakref
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal, NoReturn

import torch

from mistral7b.config import ModelConfig
from mistral7b.errors import InvalidArgumentError

if TYPE_CHECKING:
    from mistral7b.cache import RollingCache
    from mistral7b.model import Transformer

Split = Literal["column", "row"]

# The weights each rank holds a slice of (names as in model.py), and along which dimension.
SPLITS: dict[str, Split] = {"wq": "column", "wk": "column", "wv": "column", "w1": "column",
                            "w3": "column", "wo": "row", "w2": "row"}

TIMEOUT_S = 60.0          # a collective that waits longer means a rank is gone
HEARTBEAT_S = 10.0        # an idle leader says it is alive this often

# Header of a broadcast: [op, cache id, cache rows, cache slots, cache dtype, batch, tokens per
# row]; the payload that follows holds rows, n_new, lengths and the (B, T) tokens.
_HEADER = 7
_RUN, _STOP, _ALIVE = 1, 2, 3
_DTYPES = [torch.float32, torch.bfloat16, torch.float16]


@dataclass(frozen=True)
class Shard:
    """This process's place in the group."""

    rank: int
    world: int

    @property
    def is_leader(self) -> bool:
        return self.rank == 0

    def span(self, n: int) -> tuple[int, int]:
        """This rank's [start, stop) of n rows or columns."""
        part = n // self.world
        return self.rank * part, (self.rank + 1) * part


def world_from_env() -> int:
    """The number of ranks torchrun started (1 without torchrun)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def check_split(config: ModelConfig, world: int, packed_block: int | None = None) -> None:
    """Refuse a world size that does not divide the model, before anything is loaded.
    packed_block: the block size of packed weights, whose row-parallel split must fall on
    block boundaries."""
    counts = {"n_heads": config.n_heads, "n_kv_heads": config.n_kv_heads,
              "hidden_dim": config.hidden_dim}
    for name, value in counts.items():
        if value % world:
            raise InvalidArgumentError(f"tensor parallel: {name} {value} is not divisible by "
                                       f"{world} (the number of ranks)")
    if packed_block is not None:
        for name, columns in (("wo", config.n_heads * config.head_dim),
                              ("w2", config.hidden_dim)):
            part = columns // world
            if part % packed_block:
                raise InvalidArgumentError(
                    f"tensor parallel: {name}'s {columns} input columns split over {world} "
                    f"ranks give {part} each, which cuts a {packed_block}-value block of the "
                    "packed weights; use a world size whose share is whole blocks")


def local_config(config: ModelConfig, world: int) -> ModelConfig:
    """The shapes one rank holds."""
    return config.replace(n_heads=config.n_heads // world,
                          n_kv_heads=config.n_kv_heads // world,
                          hidden_dim=config.hidden_dim // world)


def split_of(name: str) -> Split | None:
    """How the weight `name` (e.g. "layers.3.attention.wq.weight") is split, if it is."""
    parts = name.split(".")
    return SPLITS.get(parts[-2]) if len(parts) >= 2 and parts[-1] == "weight" else None


# ---- the process group --------------------------------------------------------------------


def init(device: torch.device) -> Shard:
    """Join the process group torchrun describes (or the one already initialised): gloo on
    the CPU, nccl on CUDA, each rank on the device of its local rank."""
    import torch.distributed as dist

    if not dist.is_initialized():
        if "RANK" not in os.environ:
            raise InvalidArgumentError(
                "tensor parallel needs several processes: start them with torchrun, e.g. "
                "`torchrun --nproc-per-node 2 -m mistral7b generate ...`")
        backend = "nccl" if device.type == "cuda" else "gloo"
        dist.init_process_group(backend, timeout=datetime.timedelta(seconds=TIMEOUT_S))
    return Shard(dist.get_rank(), dist.get_world_size())


def local_device(device: torch.device) -> torch.device:
    """On CUDA, each rank uses the GPU of its local rank."""
    if device.type == "cuda" and device.index is None:
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return device


def _lost(shard: Shard, error: BaseException) -> NoReturn:
    # gloo's messages start with its source location and go on with advice: keep the fact.
    text = re.sub(r"^\[[^\]]*\]\s*", "", str(error).strip())
    first = text.split(". ")[0].splitlines()[0] if text else type(error).__name__
    print(f"mistral7b: rank {shard.rank} of {shard.world}: lost contact with the other ranks "
          f"({first}); exiting", file=sys.stderr, flush=True)
    os._exit(1)


class AllReduce:
    """Sums a row-parallel layer's partial outputs over the ranks (in place), counting the
    calls and the seconds they take (benchmarks report the communication per step)."""

    def __init__(self, shard: Shard) -> None:
        self.shard = shard
        self.calls = 0
        self.seconds = 0.0

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        import torch.distributed as dist

        start = time.perf_counter()
        try:
            dist.all_reduce(x)
        except (RuntimeError, ValueError) as e:     # gloo/nccl: a peer closed or timed out
            _lost(self.shard, e)
        self.calls += 1
        self.seconds += time.perf_counter() - start
        return x


def attach(model: Transformer, shard: Shard) -> None:
    """Make `model` (this rank's shard) sum its row-parallel outputs over the group, and
    (on the leader) announce each forward pass to the followers."""
    from mistral7b.model import Block

    reduce = AllReduce(shard)
    for layer in model.layers:
        assert isinstance(layer, Block)
        layer.attention.reduce = reduce
        layer.feed_forward.reduce = reduce
    model.fused_decode = False    # the one-call C++ decode step has no place for all-reduces
    model.tensor_parallel = Leader(model, shard, reduce) if shard.is_leader else None


# ---- the leader ---------------------------------------------------------------------------


class Leader:
    """Rank 0's side: broadcasts every forward pass before running it, a heartbeat while idle,
    and the end when the process exits."""

    def __init__(self, model: Transformer, shard: Shard, reduce: AllReduce) -> None:
        self.shard = shard
        self.reduce = reduce
        self.device = model.device
        self._lock = threading.Lock()
        self._caches: weakref.WeakKeyDictionary[RollingCache, int] = weakref.WeakKeyDictionary()
        self._next_id = 0
        self._last = time.monotonic()
        self._stopped = False
        threading.Thread(target=self._heartbeat, name="tensor-parallel-heartbeat",
                         daemon=True).start()
        atexit.register(self.stop)

    def _send(self, header: list[int], payload: torch.Tensor | None = None) -> None:
        import torch.distributed as dist

        try:
            dist.broadcast(torch.tensor(header, dtype=torch.int64, device=self.device), 0)
            if payload is not None:
                dist.broadcast(payload, 0)
        except (RuntimeError, ValueError) as e:
            _lost(self.shard, e)
        self._last = time.monotonic()

    @contextlib.contextmanager
    def announce(self, tokens: torch.Tensor, cache: RollingCache, rows: list[int],
                 n_new: list[int]) -> Iterator[None]:
        """Tell the followers to run the layers of Transformer.forward(tokens, cache, rows,
        n_new) on their shard, their cache's rows starting at this cache's lengths; the leader
        runs the same pass inside the `with` (nothing else may use the group meanwhile: the
        pass's all-reduces must meet the followers' in order)."""
        with self._lock:
            if self._stopped:
                raise RuntimeError("tensor parallel: the group has stopped")
            cache_id = self._caches.get(cache)
            if cache_id is None:
                cache_id = self._caches[cache] = self._next_id
                self._next_id += 1
            B, T = tokens.shape
            header = [_RUN, cache_id, cache.rows, cache.max_slots,
                      _DTYPES.index(cache.k.dtype), B, T]
            plan = torch.tensor([*rows, *n_new, *(cache.lengths[r] for r in rows)],
                                dtype=torch.int64, device=self.device)
            self._send(header, torch.cat([plan, tokens.reshape(-1).to(torch.int64)]))
            try:
                yield
            finally:
                self._last = time.monotonic()

    def _heartbeat(self) -> None:
        while True:
            time.sleep(HEARTBEAT_S / 4)
            with self._lock:
                if self._stopped:
                    return
                if time.monotonic() - self._last >= HEARTBEAT_S:
                    self._send([_ALIVE] + [0] * (_HEADER - 1))

    def stop(self) -> None:
        """Let the followers exit, and leave the group (at the leader's exit)."""
        with self._lock:
            if not self._stopped:
                self._stopped = True
                self._send([_STOP] + [0] * (_HEADER - 1))
                _leave()


def _leave() -> None:
    """Destroy the process group: left to the interpreter's exit, its threads abort it."""
    import torch.distributed as dist

    if dist.is_initialized():
        dist.destroy_process_group()


# ---- the followers ------------------------------------------------------------------------


def follow(model: Transformer, shard: Shard) -> None:
    """A follower's life: run every forward pass the leader announces, on this rank's shard
    and its own caches, until the leader stops."""
    import torch.distributed as dist

    from mistral7b.cache import RollingCache

    if threading.current_thread() is threading.main_thread():
        # A signal to the group (Ctrl-C, or torchrun passing on SIGTERM) is for the leader,
        # which drains its work and then stops the followers; a follower that died at once
        # would cut the leader's passes short.
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
    device = model.device
    caches: dict[int, RollingCache] = {}
    header = torch.empty(_HEADER, dtype=torch.int64, device=device)
    while True:
        try:
            dist.broadcast(header, 0)
            op, cache_id, cache_rows, slots, dtype, B, T = header.tolist()
            if op == _STOP:
                _leave()
                return
            if op != _RUN:
                continue
            payload = torch.empty(3 * B + B * T, dtype=torch.int64, device=device)
            dist.broadcast(payload, 0)
        except (RuntimeError, ValueError) as e:
            _lost(shard, e)
        plan = payload[: 3 * B].tolist()
        rows, n_new, lengths = plan[:B], plan[B:2 * B], plan[2 * B:]
        cache = caches.get(cache_id)
        if cache is None:
            cache = caches[cache_id] = RollingCache(model.config, rows=cache_rows,
                                                    dtype=_DTYPES[dtype], device=device,
                                                    max_slots=slots)
        for row, length in zip(rows, lengths, strict=True):
            cache.lengths[row] = length
        tokens = payload[3 * B:].view(B, T)
        with torch.inference_mode():   # the layers only: a follower's logits would be dropped
            step = cache.begin(rows, n_new)
            model.run_layers(tokens, cache, step)
            cache.end(step)


def world_of(model: Transformer) -> int:
    """The number of ranks `model` is split over (1 in one process)."""
    leader = model.tensor_parallel
    return leader.shard.world if leader is not None else 1
