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
    # Ours: formats repacked eight rows at a time (quant/repack.py); the ids are 1000 + the
    # ggml id, and mean nothing to GGUF.
    BlockFormat("Q4_0x8", 1002, 32, 18),
    BlockFormat("Q4_1x8", 1003, 32, 20),
    BlockFormat("Q8_0x8", 1008, 32, 34),
    BlockFormat("Q4_Kx8", 1012, 256, 144),
)}

# Repacking (the x8 formats above): a format's repacked name, and the bytes of each field of one
# of its blocks (scale, min, weights), which the x8 layout stores eight rows at a time.
REPACKED = {"Q4_0": "Q4_0x8", "Q4_1": "Q4_1x8", "Q8_0": "Q8_0x8", "Q4_K": "Q4_Kx8"}
BASE = {x8: base for base, x8 in REPACKED.items()}
_FIELDS = {"Q4_0": (2, 16), "Q4_1": (2, 2, 16), "Q8_0": (2, 32)}


def repack(raw: torch.Tensor, fmt: str) -> torch.Tensor:
    """(N, row_bytes) blocks of `fmt`, N a multiple of 8 -> the x8 layout: for the 32-value
    formats the same bytes in another order, for Q4_K its own (see _repack_q4_k)."""
    if fmt == "Q4_K":
        return _repack_q4_k(raw)
    n, row_bytes = raw.shape
    bb = FORMATS[fmt].block_bytes
    blocks = raw.reshape(n // 8, 8, row_bytes // bb, bb)          # (group, row, block, byte)
    fields = torch.split(blocks, list(_FIELDS[fmt]), dim=3)
    parts = [f.permute(0, 2, 1, 3).reshape(n // 8, row_bytes // bb, -1) for f in fields]
    return torch.cat(parts, dim=2).reshape(n, row_bytes).contiguous()


def unrepack(raw: torch.Tensor, fmt_x8: str) -> torch.Tensor:
    """The inverse of repack: x8 bytes -> (N, row_bytes) blocks of the base format."""
    fmt = BASE[fmt_x8]
    if fmt == "Q4_K":
        return _unrepack_q4_k(raw)
    n, row_bytes = raw.shape
    bb = FORMATS[fmt].block_bytes
    groups = raw.reshape(n // 8, row_bytes // bb, 8 * bb)          # (group, block, 8 blocks)
    sizes = [8 * size for size in _FIELDS[fmt]]
    fields = [f.reshape(n // 8, row_bytes // bb, 8, -1).permute(0, 2, 1, 3)
              for f in torch.split(groups, sizes, dim=2)]          # (group, row, block, field)
    return torch.cat(fields, dim=3).reshape(n, row_bytes).contiguous()


# Q4_Kx8 (the kernel and why: quant/csrc/qmatmul.cpp). Block b of rows 8g..8g+7 holds
#   f16 d[8] | f16 dmin[8] | scales[12][8] | 8 runs j x 8 chunks i x 16 bytes,
# scales[k][r] being byte k of row r's 12 packed scale bytes, and byte 2r + e of chunk i of run j
# holding weight 32j + 2i + e of row r in its low nibble and weight 32j + 16 + 2i + e in its high
# one. GGUF's Q4_K keeps run 2c in the low nibbles of qs[32c:32c + 32] and run 2c + 1 in the high.

def _repack_q4_k(raw: torch.Tensor) -> torch.Tensor:
    n, row_bytes = raw.shape
    g, nb = n // 8, row_bytes // 144
    blocks = raw.reshape(g, 8, nb, 144)                              # (group, row, block, byte)

    def by_block(field: torch.Tensor) -> torch.Tensor:               # (g, r, b, k) -> (g, b, k*r)
        return field.permute(0, 2, 3, 1).reshape(g, nb, -1)

    def by_row(field: torch.Tensor) -> torch.Tensor:                 # (g, r, b, k) -> (g, b, r*k)
        return field.permute(0, 2, 1, 3).reshape(g, nb, -1)

    qs = blocks[..., 16:].reshape(g, 8, nb, 4, 1, 32)
    runs = torch.cat((qs & 0x0F, qs >> 4), dim=4)                    # (g, r, b, 4, 2, 32)
    runs = runs.reshape(g, 8, nb, 8, 2, 8, 2)                        # (.., j, half, i, e)
    chunks = runs[..., 0, :, :] | (runs[..., 1, :, :] << 4)          # (g, r, b, j, i, e)
    weights = chunks.permute(0, 2, 3, 4, 1, 5).reshape(g, nb, 1024)  # (g, b, j, i, r, e)
    return torch.cat((by_row(blocks[..., 0:2]), by_row(blocks[..., 2:4]),
                      by_block(blocks[..., 4:16]), weights), dim=2).reshape(n, row_bytes)


def _unrepack_q4_k(raw: torch.Tensor) -> torch.Tensor:
    n, row_bytes = raw.shape
    g, nb = n // 8, row_bytes // 144
    grp = raw.reshape(g, nb, 1152)
    d = grp[..., 0:16].reshape(g, nb, 8, 2).permute(0, 2, 1, 3)
    dmin = grp[..., 16:32].reshape(g, nb, 8, 2).permute(0, 2, 1, 3)
    scales = grp[..., 32:128].reshape(g, nb, 12, 8).permute(0, 3, 1, 2)
    chunks = grp[..., 128:].reshape(g, nb, 8, 8, 8, 2)               # (g, b, j, i, r, e)
    chunks = chunks.permute(0, 4, 1, 2, 3, 5)                        # (g, r, b, j, i, e)
    runs = torch.stack((chunks & 0x0F, chunks >> 4), dim=4)          # (g, r, b, j, half, i, e)
    runs = runs.reshape(g, 8, nb, 4, 2, 32)                          # run j = 2c + h
    qs = (runs[..., 0, :] | (runs[..., 1, :] << 4)).reshape(g, 8, nb, 128)
    return torch.cat((d, dmin, scales, qs), dim=3).reshape(n, row_bytes).contiguous()


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
