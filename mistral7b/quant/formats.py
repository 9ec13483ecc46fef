"""GGUF block formats: how many values a block holds, how many bytes it takes, and how to turn
blocks back into floats with plain PyTorch (the portable path, and the reference the fast
kernels are tested against together with `gguf.quants.dequantize`)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch


@dataclass(frozen=True)
class BlockFormat:
    name: str
    ggml_type: int      # the id GGUF files store
    block_size: int     # values per block
    block_bytes: int

    def row_bytes(self, n: int) -> int:
        if n % self.block_size:
            raise ValueError(f"{self.name}: a row of {n} values is not whole blocks of "
                             f"{self.block_size}")
        return n // self.block_size * self.block_bytes


FORMATS = {f.name: f for f in (
    BlockFormat("Q8_0", 8, 32, 34),
    BlockFormat("Q4_0", 2, 32, 18),
    BlockFormat("Q4_1", 3, 32, 20),
    BlockFormat("Q4_K", 12, 256, 144),
    BlockFormat("Q5_K", 13, 256, 176),
    BlockFormat("Q6_K", 14, 256, 210),
    # 16-bit floats, kept as their bytes so they travel the same way as the blocks above.
    BlockFormat("F16", 1, 1, 2),
    BlockFormat("BF16", 30, 1, 2),
    # Ours: the 32-value formats repacked eight rows at a time (quant/repack.py); the ids are
    # 1000 + the ggml id, and mean nothing to GGUF.
    BlockFormat("Q4_0x8", 1002, 32, 18),
    BlockFormat("Q4_1x8", 1003, 32, 20),
    BlockFormat("Q8_0x8", 1008, 32, 34),
)}

# Repacking (the x8 formats above): a format's repacked name, and the bytes of each field of one
# of its blocks (scale, min, weights), which the x8 layout stores eight rows at a time.
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


HALF_DTYPES = {"F16": torch.float16, "BF16": torch.bfloat16}


def _f16(blocks: torch.Tensor, offset: int) -> torch.Tensor:
    """The float16 at byte `offset` of every block, as float32 (n_blocks, 1)."""
    return blocks[:, offset:offset + 2].contiguous().view(torch.float16).float()


def _nibbles(qs: torch.Tensor) -> torch.Tensor:
    """(n, 16) bytes -> (n, 32) values: the low nibbles, then the high nibbles."""
    return torch.cat((qs & 0x0F, qs >> 4), dim=1).float()


def dequantize(raw: torch.Tensor, fmt: str) -> torch.Tensor:
    """Rows of blocks (N, row_bytes) uint8 -> (N, K) float32."""
    if fmt in BASE:                      # repacked 8 rows at a time: back to the GGUF order
        return dequantize(unrepack(raw, fmt), BASE[fmt])
    spec = FORMATS[fmt]
    rows = raw.shape[0]
    if fmt in HALF_DTYPES:
        return raw.contiguous().view(HALF_DTYPES[fmt]).float()
    blocks = raw.reshape(-1, spec.block_bytes)
    if fmt == "Q8_0":
        values = _f16(blocks, 0) * blocks[:, 2:].contiguous().view(torch.int8).float()
    elif fmt == "Q4_0":
        values = _f16(blocks, 0) * (_nibbles(blocks[:, 2:]) - 8)
    elif fmt == "Q4_1":
        values = _f16(blocks, 0) * _nibbles(blocks[:, 4:]) + _f16(blocks, 2)
    else:  # K-quants: the gguf package's NumPy code (correct, not fast)
        from gguf import GGMLQuantizationType
        from gguf.quants import dequantize as np_dequantize

        flat = np_dequantize(raw.cpu().numpy(), GGMLQuantizationType[fmt])
        return torch.from_numpy(np.ascontiguousarray(flat, dtype=np.float32)).reshape(rows, -1)
    return values.reshape(rows, -1)
