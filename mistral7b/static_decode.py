"""Decode steps of fixed shape, for GPUs: captured once per shape as a CUDA graph (and
optionally compiled with torch.compile), then replayed with no host work inside the step.

A plain decode step launches ~30 small kernels per layer and builds its index tensors on the
host; on a GPU the launches, not the weights, then set the speed. Here one step is a pure
function of three device tensors of length R (token ids, positions, the cache row each row
writes), so it has the same shape every time:

    rows 0..R-1 of the cache take part, R = the smallest bucket (1, 2, 4, 8, ...) holding every
    decoding row; a row of the bucket that is not decoding pads the batch and writes its keys
    into the cache's spare last row, never into a row that belongs to a request;
    attention reads all of the buffer's slots, masked (RollingCache.decode_plan).

A graph is kept per (R, slots) and dropped when the cache grows (its buffers move).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from typing import Any

import torch

from mistral7b.cache import RollingCache
from mistral7b.model import Transformer
from mistral7b.quant.modules import QuantEmbedding, QuantLinear
from mistral7b.transfer import upload

log = logging.getLogger("mistral7b")

BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)

StepFn = Callable[[torch.Tensor], torch.Tensor]


class StaticDecoder:
    """Runs decode steps for the rows of `cache` (all but its last row, kept spare).

    cuda_graphs: capture each shape as a CUDA graph (CUDA only). compile: run the step through
    torch.compile (inductor) first, which fuses the small element-wise kernels."""

    def __init__(self, model: Transformer, cache: RollingCache, cuda_graphs: bool = True,
                 compile: bool = False) -> None:
        if cache.rows < 2:
            raise ValueError("a static decoder needs a cache with a spare last row")
        if any(isinstance(m, (QuantLinear, QuantEmbedding)) for m in model.modules()):
            raise ValueError("fixed-shape decode steps run float weights; packed (GGUF) "
                             "weights on the CPU use the C++ decode step")
        self.model, self.cache = model, cache
        self.device = model.device
        self.spare_row = cache.rows - 1
        self.cuda_graphs = cuda_graphs and self.device.type == "cuda"
        self._step: StepFn = self._forward
        if compile:
            # Dynamic dimensions after the first recompile: one compilation then serves every
            # (rows, slots) shape instead of one per bucket.
            self._step = torch.compile(self._forward)
        self._graphs: dict[tuple[int, int], tuple[torch.cuda.CUDAGraph, torch.Tensor,
                                                  torch.Tensor]] = {}
        self._graph_buffers = 0                 # data_ptr of the cache the graphs were made on
        self._pool: Any = None                  # the memory pool all graphs share
        self._logged = False

    def bucket(self, n_rows: int) -> int:
        """The batch size a step over rows 0..n_rows-1 runs at."""
        limit = self.cache.rows - 1
        if n_rows > limit:
            raise ValueError(f"row {n_rows - 1} is outside the cache's {limit} rows")
        return min(next((b for b in BUCKETS if b >= n_rows), limit), limit)

    @torch.inference_mode()
    def step(self, rows: Sequence[int], tokens: Sequence[int] | torch.Tensor) -> torch.Tensor:
        """Append tokens[i] to cache row rows[i]; (len(rows), vocab) float32 logits on the
        model's device, in the order of `rows`. tokens: ids on the host, or an int64 tensor on
        the model's device (the previous step's sampled ids, which then never visit the host).
        Nothing here waits for the device."""
        cache = self.cache
        R = self.bucket(max(rows) + 1)
        cache.reserve(max(cache.lengths[r] for r in rows) + 1)
        host = torch.zeros(3, R, dtype=torch.int64)   # token ids, positions, rows written
        host[2] = self.spare_row
        index = torch.tensor(rows, dtype=torch.int64)
        if not isinstance(tokens, torch.Tensor):
            host[0, index] = torch.tensor(tokens, dtype=torch.int64)
        host[1, index] = torch.tensor([cache.lengths[r] for r in rows], dtype=torch.int64)
        host[2, index] = index
        inputs = upload(host, self.device)
        leading = list(rows) == list(range(len(rows)))
        where = slice(0, len(rows)) if leading else upload(index, self.device)
        if isinstance(tokens, torch.Tensor):
            inputs[0, where] = tokens
        logits = self._run(R, inputs)
        for r in rows:
            cache.lengths[r] += 1
        return logits if leading and len(rows) == R else logits[where]

    def _run(self, R: int, inputs: torch.Tensor) -> torch.Tensor:
        if not self.cuda_graphs:
            return self._step(inputs)
        try:
            graph, static_inputs, logits = self._graph(R)
        except RuntimeError as e:   # an op this torch cannot capture: slower, but still right
            log.warning("CUDA graph capture failed (%s); decode steps run without graphs", e)
            self.cuda_graphs = False
            self._graphs.clear()
            return self._step(inputs)
        static_inputs.copy_(inputs)
        graph.replay()
        return logits

    def _forward(self, inputs: torch.Tensor) -> torch.Tensor:
        """(3, R) int64 device tensor -> (R, vocab) float32 logits; no host sync inside."""
        model = self.model
        step = self.cache.decode_plan(inputs[1], inputs[2])
        h = model.run_layers(inputs[0][:, None], self.cache, step)      # (R, 1, dim)
        return model.head(model.norm(h[:, 0])).float()

    def _graph(self, R: int) -> tuple[torch.cuda.CUDAGraph, torch.Tensor, torch.Tensor]:
        buffers = self.cache.k.data_ptr()
        if buffers != self._graph_buffers:      # the cache grew: old graphs read freed memory
            self._graphs.clear()
            self._graph_buffers = buffers
        key = (R, self.cache.slots)
        if key not in self._graphs:
            if not self._logged:
                log.info("capturing CUDA graphs for decode steps (once per batch bucket)")
                self._logged = True
            inputs = torch.zeros(3, R, dtype=torch.int64, device=self.device)
            inputs[2] = self.spare_row            # warm-up steps write only to the spare row
            side = torch.cuda.Stream(self.device)
            side.wait_stream(torch.cuda.current_stream(self.device))
            with torch.cuda.stream(side):
                for _ in range(2):               # kernels chosen, workspaces allocated
                    self._step(inputs)
            torch.cuda.current_stream(self.device).wait_stream(side)
            if self._pool is None:
                self._pool = torch.cuda.graph_pool_handle()
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=self._pool):
                logits = self._step(inputs)
            self._graphs[key] = (graph, inputs, logits)
        return self._graphs[key]
