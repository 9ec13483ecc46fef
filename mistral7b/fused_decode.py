"""A decode step in one C++ call (quant/csrc/decode.cpp), from token ids to logits, instead of
~15 PyTorch ops per layer and ~40 more around the layers.

`Transformer.forward` uses it for one new token per sequence when every projection is packed in
a format the compiled kernels know, the embedding and the output head are packed or float32,
the norms are float32 and the cache is float32 or float16 on the CPU; otherwise it runs the
Python layers. Both compute the same thing (tests compare them). The host keeps the cache's
book-keeping (which positions each row has seen, growing the buffers); the C++ step plans the
slots and the mask from those lengths with RollingCache.begin's arithmetic.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from mistral7b.quant import kernels
from mistral7b.quant.formats import FORMATS
from mistral7b.quant.modules import QuantEmbedding, QuantLinear
from mistral7b.rope import rope_rotations

if TYPE_CHECKING:
    from mistral7b.cache import RollingCache
    from mistral7b.model import Transformer

F32 = 0  # ggml's type id for float32: an embedding or head the loader left unpacked


# Positions RoPE's table holds at most (16 MiB at head_dim 64): a longer sequence (a windowed
# model may decode without end) gets its step's rows computed instead.
ROPE_TABLE_POSITIONS = 1 << 16


@dataclass
class DecodeWeights:
    """A model's weights held by the C++ step (`ext.DecodeModel`, checked once when built), and
    RoPE's table: (positions, head_dim / 2, 2) float32, the (cos, sin) of every angle of
    positions 0, 1, ..., the very values rope_rotations gives each position; grown by
    doubling up to ROPE_TABLE_POSITIONS."""

    model: Any
    head_dim: int
    rope_theta: float
    rope: torch.Tensor = field(default_factory=lambda: torch.empty(0, 0, 2))

    def rope_rows(self, positions: list[int]) -> tuple[torch.Tensor, list[int]]:
        """A table holding RoPE's (cos, sin) of `positions`, and the row of each in it."""
        last = max(positions)
        if last >= ROPE_TABLE_POSITIONS:
            return self._rotations(torch.tensor(positions)), list(range(len(positions)))
        if last >= self.rope.shape[0]:
            n = min(ROPE_TABLE_POSITIONS, max(1024, 2 * self.rope.shape[0], last + 1))
            self.rope = self._rotations(torch.arange(n))
        return self.rope, positions

    def _rotations(self, positions: torch.Tensor) -> torch.Tensor:
        angles = rope_rotations(positions[:, None], self.head_dim, self.rope_theta)
        return torch.view_as_real(angles[:, 0, 0]).contiguous()


def _matrix(module: nn.Module | None) -> tuple[torch.Tensor, int] | None:
    """A projection's or embedding's weight as decode_step takes it: packed rows with their
    ggml type, or a float32 matrix (type F32); None for anything else."""
    if isinstance(module, (QuantLinear, QuantEmbedding)):
        if module.fmt not in kernels.FAST_FORMATS:
            return None
        if isinstance(module, QuantEmbedding) and module.dtype != torch.float32:
            return None
        return module.weight.contiguous(), FORMATS[module.fmt].ggml_type
    if isinstance(module, (nn.Linear, nn.Embedding)) and module.weight.dtype == torch.float32:
        if isinstance(module, nn.Linear) and module.bias is not None:
            return None
        return module.weight.detach().contiguous(), F32
    return None


def gather(model: Transformer) -> DecodeWeights | None:
    """The model's weights in decode_step's order; None when the fused step cannot run it."""
    from mistral7b.model import Block  # here, not at the top: model.py imports this module

    ext = kernels.extension()
    if model.device.type != "cpu" or ext is None:
        return None
    # Per layer its two norm weights and its four packed projections (wqkv, wo, w13, w2), then
    # the embedding table, the final norm and the output head (a tied model's head is its
    # embedding table). A projection whose parts the model could not stack into one matrix
    # (wq, wk, wv or w1, w3 in different formats: Q4_K_M files have wv in Q6_K on half of the
    # layers) is passed as its parts, which the step stacks by rows.
    norms: list[torch.Tensor] = []
    matrices: list[torch.Tensor] = []
    types: list[int] = []
    parts: list[int] = []
    for layer in model.layers:
        assert isinstance(layer, Block)
        attn, ffn = layer.attention, layer.feed_forward
        projections = [[attn.wqkv] if attn.wqkv is not None else [attn.wq, attn.wk, attn.wv],
                       [attn.wo],
                       [ffn.w13] if ffn.w13 is not None else [ffn.w1, ffn.w3],
                       [ffn.w2]]
        packed = [[_matrix(p) for p in projection] for projection in projections]
        # Packed projections only: float models keep the Python layers.
        if any(p is None or p[1] == F32 for projection in packed for p in projection):
            return None
        for norm in (layer.attention_norm, layer.ffn_norm):
            if norm.weight.dtype != torch.float32:
                return None
            norms.append(norm.weight.detach().contiguous())
        for projection in packed:
            parts.append(len(projection))
            for weight, ggml_type in filter(None, projection):
                matrices.append(weight)
                types.append(ggml_type)
    embedding = _matrix(model.tok_embeddings)
    head = _matrix(model.output if model.output is not None else model.tok_embeddings)
    if embedding is None or head is None or model.norm.weight.dtype != torch.float32:
        return None
    cfg = model.config
    # One matrix per projection: the arguments of every build (benchmarks/ab_builds.py loads
    # older ones); parts only where a projection is stacked.
    stacked = {"parts": parts} if any(n > 1 for n in parts) else {}
    step = ext.DecodeModel(norms, matrices, types, *embedding,
                           model.norm.weight.detach().contiguous(), *head, cfg.n_heads,
                           cfg.n_kv_heads, cfg.head_dim, cfg.norm_eps, **stacked)
    return DecodeWeights(step, cfg.head_dim, cfg.rope_theta)


def can_run(cache: RollingCache, n_new: list[int]) -> bool:
    return (cache.k.dtype in (torch.float32, torch.float16) and cache.k.device.type == "cpu"
            and cache.k.is_contiguous() and cache.v.is_contiguous()
            and all(n in (0, 1) for n in n_new))


def decode_step(model: Transformer, plan: DecodeWeights, tokens: torch.Tensor,
                cache: RollingCache, rows: list[int], n_new: list[int]) -> torch.Tensor:
    """Append tokens (B, 1) to cache rows `rows` (n_new[b] = 1, or 0 for a row that only pads
    the batch); (B, vocab) float32 logits."""
    starts = cache.begin_decode(rows, n_new)
    logits = plan.model.step(tokens, rows, starts, n_new, cache.window or 0,
                             *plan.rope_rows(starts), cache.k, cache.v)
    cache.advance(rows, n_new)
    return logits
