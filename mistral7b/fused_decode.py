"""A decode step in one C++ call (quant/csrc/decode.cpp) instead of ~15 PyTorch ops per layer.

`Transformer.forward` uses it for one new token per sequence when every projection is packed in
a format the compiled kernels know, the norms are float32 and the cache is float32 or float16 on
the CPU; otherwise it runs the Python layers. Both compute the same thing (tests compare them).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from mistral7b.quant import kernels
from mistral7b.quant.formats import FORMATS
from mistral7b.quant.modules import QuantLinear

if TYPE_CHECKING:
    from mistral7b.cache import CacheStep, RollingCache
    from mistral7b.model import Transformer


@dataclass
class DecodeWeights:
    """What decode_layers needs, gathered once per model: per layer its two norm weights and its
    four packed projections (wqkv, wo, w13, w2) with their ggml type ids."""

    norms: list[torch.Tensor]
    weights: list[torch.Tensor]
    types: list[int]


def gather(model: Transformer) -> DecodeWeights | None:
    """The model's weights in decode_layers' order; None when the fused step cannot run it."""
    from mistral7b.model import Block  # here, not at the top: model.py imports this module

    if model.device.type != "cpu" or kernels.extension() is None:
        return None
    norms: list[torch.Tensor] = []
    weights: list[torch.Tensor] = []
    types: list[int] = []
    for layer in model.layers:
        assert isinstance(layer, Block)
        attn, ffn = layer.attention, layer.feed_forward
        projections = [attn.wqkv, attn.wo, ffn.w13, ffn.w2]
        if not all(isinstance(p, QuantLinear) and p.fmt in kernels.FAST_FORMATS
                   for p in projections):
            return None
        for norm in (layer.attention_norm, layer.ffn_norm):
            if norm.weight.dtype != torch.float32:
                return None
            norms.append(norm.weight.detach().contiguous())
        for p in projections:
            assert isinstance(p, QuantLinear)
            weights.append(p.weight.contiguous())
            types.append(FORMATS[p.fmt].ggml_type)
    return DecodeWeights(norms, weights, types)


def can_run(cache: RollingCache, h: torch.Tensor) -> bool:
    return (cache.k.dtype in (torch.float32, torch.float16) and h.dtype == torch.float32
            and cache.k.is_contiguous() and cache.v.is_contiguous())


def decode_layers(model: Transformer, plan: DecodeWeights, h: torch.Tensor,
                  cache: RollingCache, step: CacheStep, rotations: torch.Tensor) -> torch.Tensor:
    """Every layer for h (B, 1, dim), one new token per row; returns (B, 1, dim)."""
    ext = kernels.extension()
    assert ext is not None
    B = h.shape[0]
    # Rows with no new token (padding) write nothing; the others write at their planned slot.
    write_slot = torch.full((B,), -1, dtype=torch.int64)
    write_slot[step.write_b] = step.write_slot
    mask = step.mask[:, 0, 0, : step.n_slots]                            # (B, n_slots)
    rope = torch.view_as_real(rotations[:, 0, 0])                       # (B, hd / 2, 2)
    out = ext.decode_layers(h[:, 0], plan.norms, plan.weights, plan.types, cache.k, cache.v,
                            step.rows, write_slot, mask, rope, model.config.n_heads,
                            model.config.norm_eps)
    return out[:, None]
