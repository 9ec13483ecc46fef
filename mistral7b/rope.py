"""Rotary position embeddings (RoPE), and the one place that converts between q/k row layouts.

Inside this package every q/k projection uses Mistral's native *interleaved* layout: within a
head, dimensions (2i, 2i+1) form the pair rotated by angle pos * theta^(-2i/head_dim).
Mistral's native checkpoints and GGUF files store q/k rows that way. Hugging Face checkpoints
store the *half-split* layout instead: the pair is (i, i + head_dim/2). `permute_rope_rows` moves
rows between the two; loaders call it and nothing else does.
"""

from __future__ import annotations

from typing import Literal

import torch


def rope_rotations(positions: torch.Tensor, head_dim: int, theta: float) -> torch.Tensor:
    """The unit complex number cos(a) + i sin(a) for every (position, pair) angle
    a = position * theta^(-2i/head_dim).

    positions: (B, T) absolute token positions. Returns complex64 (B, T, 1, head_dim/2), ready to
    broadcast over heads.
    """
    exponents = torch.arange(0, head_dim, 2, dtype=torch.int64, device=positions.device).float()
    inv_freq = 1.0 / (theta ** (exponents / head_dim))                  # (head_dim/2,)
    angles = positions.float()[..., None] * inv_freq                    # (B, T, head_dim/2)
    return torch.complex(angles.cos(), angles.sin())[:, :, None, :]


def apply_rope(x: torch.Tensor, rotations: torch.Tensor) -> torch.Tensor:
    """Rotate the interleaved pairs (2i, 2i+1) of x: (B, T, H, head_dim), read as complex
    numbers, in float32; returned in x's dtype."""
    pairs = torch.view_as_complex(x.float().unflatten(-1, (-1, 2)))     # (B, T, H, head_dim/2)
    return torch.view_as_real(pairs * rotations).flatten(-2).type_as(x)


def permute_rope_rows(weight: torch.Tensor, n_heads: int,
                      to: Literal["interleaved", "half_split"]) -> torch.Tensor:
    """Reorder the output rows of a q or k projection between the two RoPE layouts.

    weight: (n_heads * head_dim, ...) — any trailing shape, so it also moves rows of packed
    (quantized) weights whose blocks run along the input dimension.

    Example, one head of head_dim 4 (rows r0..r3):
        interleaved rows  [r0, r1, r2, r3] = [re0, im0, re1, im1]
        half-split rows   [re0, re1, im0, im1] = [r0, r2, r1, r3]
    """
    rows = weight.shape[0]
    if rows % n_heads or (rows // n_heads) % 2:
        raise ValueError(f"cannot permute {rows} rows into {n_heads} heads of even size")
    half = rows // n_heads // 2
    rest = weight.shape[1:]
    if to == "interleaved":      # (heads, 2 halves, half) -> (heads, half, 2)
        grouped = weight.reshape(n_heads, 2, half, *rest).transpose(1, 2)
    elif to == "half_split":     # (heads, half, 2) -> (heads, 2, half)
        grouped = weight.reshape(n_heads, half, 2, *rest).transpose(1, 2)
    else:
        raise ValueError(f"unknown RoPE layout {to!r}")
    return grouped.reshape(rows, *rest).contiguous()
