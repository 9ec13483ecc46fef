"""GGUF block formats: how many values a block holds, how many bytes it takes, and how to turn
blocks back into floats with plain PyTorch (the portable path, and the reference the fast
kernels are tested against together with `gguf.quants.dequantize`)."""

from __future__ import annotations

import itertools
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
    BlockFormat("Q5_Kx8", 1013, 256, 176),
    BlockFormat("Q6_Kx8", 1014, 256, 210),
)}

# Repacking (the x8 formats above): a format's repacked name, and the bytes of each field of one
# of its blocks (scale, min, weights), which the x8 layout stores eight rows at a time. Block b
# of rows 8g..8g+7 holds
#   Q8_0x8: f16 d[8] | weights (256 bytes)
#   Q4_0x8: f16 d[8] | nibbles (128 bytes)
#   Q4_1x8: f16 d[8] | f16 m[8] | nibbles (128 bytes)
# the weights with the eight rows in vector lanes, as the K-quants' (below): chunk i of 16
# bytes (0..15 for Q8_0, 0..7 for the 4-bit formats), whose byte 2r + e is row r's GGUF weight
# byte 2i + e (Q8_0: weight 2i + e; 4-bit: weight 2i + e in its low nibble, weight 16 + 2i + e
# in its high one).
REPACKED = {"Q4_0": "Q4_0x8", "Q4_1": "Q4_1x8", "Q8_0": "Q8_0x8", "Q4_K": "Q4_Kx8",
            "Q5_K": "Q5_Kx8", "Q6_K": "Q6_Kx8"}
BASE = {x8: base for base, x8 in REPACKED.items()}
_FIELDS = {"Q4_0": (2, 16), "Q4_1": (2, 2, 16), "Q8_0": (2, 32)}


def repack(raw: torch.Tensor, fmt: str) -> torch.Tensor:
    """(N, row_bytes) blocks of `fmt`, N a multiple of 8 -> the x8 layout: for the 32-value
    formats the same bytes in another order, for the K-quants their own (above _k_values)."""
    if fmt in _K_HEADER:
        return _repack_k(raw, fmt)
    n, row_bytes = raw.shape
    bb = FORMATS[fmt].block_bytes
    g, nb = n // 8, row_bytes // bb
    blocks = raw.reshape(g, 8, nb, bb)                             # (group, row, block, byte)
    *heads, weights = torch.split(blocks, list(_FIELDS[fmt]), dim=3)
    parts = [f.permute(0, 2, 1, 3).reshape(g, nb, -1) for f in heads]
    # the weights to (g, b, chunk i, r, e)
    parts.append(weights.reshape(g, 8, nb, -1, 2).permute(0, 2, 3, 1, 4).reshape(g, nb, -1))
    return torch.cat(parts, dim=2).reshape(n, row_bytes).contiguous()


def unrepack(raw: torch.Tensor, fmt_x8: str) -> torch.Tensor:
    """The inverse of repack: x8 bytes -> (N, row_bytes) blocks of the base format."""
    fmt = BASE[fmt_x8]
    if fmt in _K_HEADER:
        return _unrepack_k(raw, fmt)
    n, row_bytes = raw.shape
    bb = FORMATS[fmt].block_bytes
    g, nb = n // 8, row_bytes // bb
    groups = raw.reshape(g, nb, 8 * bb)                            # (group, block, 8 blocks)
    *heads, weights = torch.split(groups, [8 * size for size in _FIELDS[fmt]], dim=2)
    fields = [f.reshape(g, nb, 8, -1).permute(0, 2, 1, 3) for f in heads]  # (g, r, b, field)
    # the weights from (g, b, chunk i, r, e)
    fields.append(weights.reshape(g, nb, -1, 8, 2).permute(0, 3, 1, 2, 4).reshape(g, 8, nb, -1))
    return torch.cat(fields, dim=3).reshape(n, row_bytes).contiguous()


# The K-quants' x8 layouts (the kernel, and why: quant/csrc/qmatmul.cpp). Block b of rows
# 8g..8g+7 holds
#   Q4_Kx8: f16 d[8] | f16 dmin[8] | scales[12][8] | nibbles (1024 bytes)
#   Q5_Kx8: f16 d[8] | f16 dmin[8] | scales[12][8] | nibbles (1024 bytes) | high bits (256 bytes)
#   Q6_Kx8: f16 d[8] | int8 scales[16][8] | nibbles (1024 bytes) | high bits (512 bytes)
# scales[k][r] being byte k of row r's scale bytes. Nibbles: for run j (32 weights) and chunk i
# (0..7), 16 bytes whose byte 2r + e holds the low 4 bits of weight 32j + 2i + e of row r in its
# low nibble and of weight 32j + 16 + 2i + e in its high nibble. High bits, W a weight (Q5_K 1,
# Q6_K 2): for run j and each C = 4 / W chunks (i // C the same), 16 bytes; byte L (lane
# L = 2r + e) keeps the high bits of chunk i's first weight at bit 2W (i % C) and of its second
# at bit 2W (i % C) + W.

def _k_values(blocks: torch.Tensor, fmt: str) -> torch.Tensor:
    """(..., block_bytes) GGUF K-quant blocks -> (..., 256) unsigned integer weights."""
    lead = blocks.shape[:-1]
    if fmt in ("Q4_K", "Q5_K"):  # run 2c: low nibbles of qs[32c:32c + 32]; 2c + 1: the high
        qs = blocks[..., -128:].reshape(*lead, 4, 1, 32)
        low = torch.cat((qs & 0x0F, qs >> 4), dim=-2).reshape(*lead, 8, 32)
        if fmt == "Q4_K":
            return low.reshape(*lead, 256)
        qh = blocks[..., 16:48].reshape(*lead, 1, 32)    # bit j of qh[i]: weight 32j + i's fifth
        return (low | torch.cat([qh >> j & 1 for j in range(8)], dim=-2) << 4).reshape(*lead, 256)
    # Q6_K, weight 128h + 32k + i: nibble k // 2 of ql[64h + 32 (k % 2) + i], bits 2k, 2k + 1
    # of qh[32h + i]
    ql = blocks[..., :128].reshape(*lead, 2, 1, 2, 32)
    qh = blocks[..., 128:192].reshape(*lead, 2, 1, 32)
    low = torch.cat((ql & 0x0F, ql >> 4), dim=-3).reshape(*lead, 2, 4, 32)
    high = torch.cat([qh >> 2 * k & 3 for k in range(4)], dim=-2)
    return (low | high << 4).reshape(*lead, 256)


def _k_weight_bytes(values: torch.Tensor, fmt: str) -> torch.Tensor:
    """The inverse of _k_values: (..., 256) weights -> the blocks' weight bytes."""
    lead = values.shape[:-1]
    if fmt in ("Q4_K", "Q5_K"):
        runs = values.reshape(*lead, 4, 2, 32) & 0x0F
        qs = (runs[..., 0, :] | runs[..., 1, :] << 4).reshape(*lead, 128)
        if fmt == "Q4_K":
            return qs
        fifth = (values.reshape(*lead, 8, 32) >> 4).to(torch.int32)
        qh = (fifth << torch.arange(8, dtype=torch.int32).reshape(8, 1)).sum(dim=-2)
        return torch.cat((qh.to(torch.uint8), qs), dim=-1)
    v = values.reshape(*lead, 2, 4, 32)
    low, high = v & 0x0F, v >> 4
    ql = torch.stack((low[..., 0, :] | low[..., 2, :] << 4, low[..., 1, :] | low[..., 3, :] << 4),
                     dim=-2)
    qh = high[..., 0, :] | high[..., 1, :] << 2 | high[..., 2, :] << 4 | high[..., 3, :] << 6
    return torch.cat((ql.reshape(*lead, 128), qh.reshape(*lead, 64)), dim=-1)


# Each K-quant's header fields (byte range in a block), in x8 order: stored row by row (the
# 16-bit floats) or byte by byte (the scale bytes, transposed).
_K_HEADER = {"Q4_K": [((0, 2), "rows"), ((2, 4), "rows"), ((4, 16), "bytes")],
             "Q5_K": [((0, 2), "rows"), ((2, 4), "rows"), ((4, 16), "bytes")],
             "Q6_K": [((208, 210), "rows"), ((192, 208), "bytes")]}
_HIGH_WIDTH = {"Q5_K": 1, "Q6_K": 2}       # bits above the nibble, per weight


def _repack_k(raw: torch.Tensor, fmt: str) -> torch.Tensor:
    n, row_bytes = raw.shape
    bb = FORMATS[fmt].block_bytes
    g, nb = n // 8, row_bytes // bb
    blocks = raw.reshape(g, 8, nb, bb)                               # (group, row, block, byte)
    parts = []
    for (start, end), order in _K_HEADER[fmt]:
        field = blocks[..., start:end]
        dims = (0, 2, 1, 3) if order == "rows" else (0, 2, 3, 1)
        parts.append(field.permute(*dims).reshape(g, nb, -1))
    v = _k_values(blocks, fmt).reshape(g, 8, nb, 8, 2, 8, 2)         # (g, r, b, j, half, i, e)
    nibbles = (v[..., 0, :, :] & 0x0F) | (v[..., 1, :, :] & 0x0F) << 4
    parts.append(nibbles.permute(0, 2, 3, 4, 1, 5).reshape(g, nb, 1024))   # (g, b, j, i, r, e)
    if fmt in _HIGH_WIDTH:
        w = _HIGH_WIDTH[fmt]
        c = 4 // w
        high = (v >> 4).permute(0, 2, 3, 5, 1, 6, 4)                 # (g, b, j, i, r, e, half)
        high = high.reshape(g, nb, 8, 8 // c, c, 16, 2)              # (.., i // C, i % C, L, half)
        byte = torch.zeros_like(high[..., 0, :, 0])
        for i, half in itertools.product(range(c), (0, 1)):
            byte |= high[..., i, :, half] << 2 * w * i + w * half
        parts.append(byte.reshape(g, nb, -1))
    return torch.cat(parts, dim=2).reshape(n, row_bytes)


def _unrepack_k(raw: torch.Tensor, fmt: str) -> torch.Tensor:
    n, row_bytes = raw.shape
    bb = FORMATS[fmt].block_bytes
    g, nb = n // 8, row_bytes // bb
    grp = raw.reshape(g, nb, 8 * bb)
    fields, at = {}, 0
    for (start, end), order in _K_HEADER[fmt]:
        size = 8 * (end - start)
        field = grp[..., at:at + size]
        shape, dims = ((8, -1), (0, 2, 1, 3)) if order == "rows" else ((-1, 8), (0, 3, 1, 2))
        fields[start] = field.reshape(g, nb, *shape).permute(*dims)  # (g, r, b, bytes)
        at += size
    chunks = grp[..., at:at + 1024].reshape(g, nb, 8, 8, 8, 2)       # (g, b, j, i, r, e)
    v = torch.stack((chunks & 0x0F, chunks >> 4), dim=4)             # (g, b, j, i, half, r, e)
    if fmt in _HIGH_WIDTH:
        w = _HIGH_WIDTH[fmt]
        c = 4 // w
        high = grp[..., at + 1024:].reshape(g, nb, 8, 8 // c, 1, 16, 1)  # (.., i // C, -, L, -)
        high = torch.cat([torch.cat([high >> 2 * w * i + w * half & (1 << w) - 1
                                     for half in (0, 1)], dim=6)
                          for i in range(c)], dim=4)                 # (.., i // C, i % C, L, half)
        high = high.reshape(g, nb, 8, 8, 8, 2, 2).permute(0, 1, 2, 3, 6, 4, 5)  # lane 2r + e
        v = v | high << 4
    values = v.permute(0, 5, 1, 2, 4, 3, 6).reshape(g, 8, nb, 256)  # (g, r, b, j, half, i, e)
    weights = _k_weight_bytes(values, fmt)
    if fmt != "Q6_K":
        block = [fields[0], fields[2], fields[4], weights]
    else:
        block = [weights, fields[192], fields[208]]
    return torch.cat(block, dim=3).reshape(n, row_bytes).contiguous()


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
