"""Matrices repacked eight rows at a time, for the decode kernels.

A GGUF matrix stores each row's blocks one after the other: [d, (m,) qs] [d, (m,) qs] ...
Repacked ("x8"), rows 8g..8g+7 form group g, and block b of the group holds the eight rows'
block b field by field: the eight scales, the eight mins (Q4_1), then the eight rows' weights,

    Q4_1 rows r0..r7, block b:  d[r0..r7] (8 f16) | m[r0..r7] (8 f16) | nibbles (128 B)

For the 32-value formats these are the same bytes in another order (the byte permutation is
formats.repack, beside the formats). Every format interleaves the eight rows' weights, two
bytes of each row per 16-byte chunk, so that the kernel finds row r's weights in vector lanes
2r, 2r + 1 (the layouts are beside REPACKED and above _k_values in formats.py; why they are
faster is in quant/csrc/qmatmul.cpp). Matrices are repacked once at load, when the C++
kernels are there and the rows come in eights. The C++ kernels read both layouts (matmul and
dequantize); the portable path un-repacks a copy.
"""

from __future__ import annotations

import os

from torch import nn

from mistral7b.quant import kernels
from mistral7b.quant.formats import BASE, FORMATS, REPACKED, repack, unrepack
from mistral7b.quant.modules import QuantLinear

__all__ = ["BASE", "REPACKED", "repack", "repack_linears", "unrepack"]

def repack_linears(model: nn.Module) -> int:
    """Repack every packed linear layer that can be (a format of REPACKED, rows in eights)
    when the C++ kernels are available; returns how many were. MISTRAL7B_REPACK=0 keeps the GGUF
    order (to measure the difference)."""
    candidates = [m for m in model.modules()
                  if isinstance(m, QuantLinear) and m.fmt in REPACKED
                  and m.out_features % 8 == 0 and m.weight.device.type == "cpu"]
    # Checked in this order so that a float model never builds the kernels.
    if (not candidates or os.environ.get("MISTRAL7B_REPACK") == "0"
            or (ext := kernels.extension()) is None):
        return 0
    for module in candidates:
        spec = FORMATS[module.fmt]
        if spec.block_size == 256:   # the K-quants: formats.repack's bytes, in C++ (~40x faster)
            module.weight = ext.repack_k(module.weight.contiguous(), spec.ggml_type)
        else:
            module.weight = repack(module.weight, module.fmt)
        module.fmt = REPACKED[module.fmt]
    return len(candidates)
