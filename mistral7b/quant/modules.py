"""nn.Linear and nn.Embedding whose weight stays in a GGUF block format.

The packed weight is a uint8 buffer named `weight` of shape (out_features, row_bytes), so a
state dict loads into these modules with the same names and a strict check, like float ones.
"""

from __future__ import annotations

import torch
from torch import nn

from mistral7b.quant import kernels
from mistral7b.quant.formats import FORMATS


def one_token_per_row(x: torch.Tensor) -> bool:
    """Whether activations (B, dim) or (B, T, dim) hold one token per sequence: a decode step,
    or the last positions' head after a pre-fill."""
    return x.dim() < 3 or x.shape[-2] == 1


class QuantLinear(nn.Module):
    weight: torch.Tensor

    def __init__(self, in_features: int, out_features: int, fmt: str,
                 device: torch.device | str | None = None) -> None:
        super().__init__()
        self.in_features, self.out_features, self.fmt = in_features, out_features, fmt
        # dtype of the pre-fill matmul (many rows): float32, or bfloat16 (faster, less exact)
        self.prefill_dtype = torch.float32
        row_bytes = FORMATS[fmt].row_bytes(in_features)
        self.register_buffer("weight", torch.empty(out_features, row_bytes, dtype=torch.uint8,
                                                   device=device))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, self.in_features)
        y = kernels.linear(flat if flat.dtype == torch.float32 else flat.float(), self.weight,
                           self.fmt, self.prefill_dtype, decode=one_token_per_row(x))
        y = y.view(*x.shape[:-1], self.out_features)
        return y if x.dtype == torch.float32 else y.to(x.dtype)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, {self.fmt}"


class QuantEmbedding(nn.Module):
    """Looks up rows by dequantizing only the rows asked for; also serves as a tied output head
    through `linear`."""

    weight: torch.Tensor

    def __init__(self, num_embeddings: int, embedding_dim: int, fmt: str,
                 dtype: torch.dtype = torch.float32,
                 device: torch.device | str | None = None) -> None:
        super().__init__()
        self.num_embeddings, self.embedding_dim, self.fmt = num_embeddings, embedding_dim, fmt
        self.dtype = dtype
        row_bytes = FORMATS[fmt].row_bytes(embedding_dim)
        self.register_buffer("weight", torch.empty(num_embeddings, row_bytes, dtype=torch.uint8,
                                                   device=device))

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        rows = kernels.dequantize_rows(self.weight[ids.reshape(-1)], self.fmt)
        return rows.reshape(*ids.shape, self.embedding_dim).to(self.dtype)

    def linear(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, self.embedding_dim).float()
        y = kernels.linear(flat, self.weight, self.fmt, decode=one_token_per_row(x))
        return y.reshape(*x.shape[:-1], self.num_embeddings)

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}, {self.fmt}"
