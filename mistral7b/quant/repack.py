"""The 32-value formats repacked eight rows at a time, for the decode kernels.

A GGUF matrix stores each row's blocks one after the other: [d, (m,) qs] [d, (m,) qs] ...
Repacked ("x8"), rows 8g..8g+7 form group g, and block b of the group holds the eight rows'
block b field by field: the eight scales, the eight mins (Q4_1), then the eight rows' weights,

    Q4_1 rows r0..r7, block b:  d[r0..r7] (8 f16) | m[r0..r7] (8 f16) | qs[r0] .. qs[r7] (8 x 16 B)

the same bytes in another order (the layout and why are in quant/csrc/qmatmul.cpp). Matrices
are repacked once at load, when the C++ kernels are there and the rows come in eights. The C++
kernels read both layouts (matmul and dequantize); the portable path un-repacks a copy.
"""

from __future__ import annotations

import os

import torch
from torch import nn

from mistral7b.quant.formats import FORMATS

# format -> its repacked name, and the bytes of each field of one block (scales, mins, weights)
REPACKED = {"Q4_0": "Q4_0x8", "Q4_1": "Q4_1x8", "Q8_0": "Q8_0x8"}
BASE = {x8: base for base, x8 in REPACKED.items()}
_FIELDS = {"Q4_0": (2, 16), "Q4_1": (2, 2, 16), "Q8_0": (2, 32)}


def repack(raw: torch.Tensor, fmt: str) -> torch.Tensor:
    """(N, row_bytes) blocks of `fmt`, N a multiple of 8 -> the same bytes in x8 order."""
    n, row_bytes = raw.shape
    bb = FORMATS[fmt].block_bytes
    blocks = raw.reshape(n // 8, 8, row_bytes // bb, bb)          # (group, row, block, byte)
    fields = torch.split(blocks, list(_FIELDS[fmt]), dim=3)
    parts = [f.permute(0, 2, 1, 3).reshape(n // 8, row_bytes // bb, -1) for f in fields]
    return torch.cat(parts, dim=2).reshape(n, row_bytes).contiguous()


def unrepack(raw: torch.Tensor, fmt_x8: str) -> torch.Tensor:
    """The inverse of repack: x8 bytes -> (N, row_bytes) blocks of the base format."""
    fmt = BASE[fmt_x8]
    n, row_bytes = raw.shape
    bb = FORMATS[fmt].block_bytes
    groups = raw.reshape(n // 8, row_bytes // bb, 8 * bb)          # (group, block, 8 blocks)
    sizes = [8 * size for size in _FIELDS[fmt]]
    fields = [f.reshape(n // 8, row_bytes // bb, 8, -1).permute(0, 2, 1, 3)
              for f in torch.split(groups, sizes, dim=2)]          # (group, row, block, field)
    return torch.cat(fields, dim=3).reshape(n, row_bytes).contiguous()


def repack_linears(model: nn.Module) -> int:
    """Repack every packed linear layer that can be (a 32-value format, rows in eights) when the
    C++ kernels are available; returns how many were. MISTRAL7B_REPACK=0 keeps the GGUF order
    (to measure the difference)."""
    from mistral7b.quant import kernels
    from mistral7b.quant.modules import QuantLinear

    if os.environ.get("MISTRAL7B_REPACK") == "0" or kernels.extension() is None:
        return 0
    count = 0
    for module in model.modules():
        if (isinstance(module, QuantLinear) and module.fmt in REPACKED
                and module.out_features % 8 == 0 and module.weight.device.type == "cpu"):
            module.weight = repack(module.weight, module.fmt)
            module.fmt = REPACKED[module.fmt]
            count += 1
    return count
