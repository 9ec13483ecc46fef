"""A decode step's small operations as four Triton kernels, for float models on CUDA.

At batch 1 a GPU decode step of Mistral 7B reads 14.2 GB of weights in ~5.3 ms of cuBLAS GEMVs,
but the plain layers (model.py) add ~22 small kernels per layer around them (norms, RoPE, cache
writes, masks, softmax, residual adds, SiLU): ~700 launches and ~1.3 ms a step, even inside a
CUDA graph. Here each layer is the four matmuls plus:

    rms_norm      residual add + RMSNorm + weight, one kernel (the add of the previous sub-layer
                  is folded into the next norm, so a layer has two of these)
    rope_store    RoPE on q and k, straight from the fused qkv projection, and the new k/v
                  written into the rolling cache at each row's slot
    attention     one query per row over the rolling buffer, the mask computed in the kernel
                  from the row's position (the formula of RollingCache._slot_positions); the
                  buffer's slots are split among programs so that a few rows still fill the GPU,
                  and a second small kernel merges the splits (flash-decoding)
    silu_mul      silu(gate) * up from the fused w1/w3 projection
    gemv          at batch 1, the four projections themselves: each program reduces a few
                  weight rows over K, in float32, with no split-K reduction kernel after it
                  (cuBLAS's batch-1 kernels split K for wo and w2 and add a reduction kernel)

Each kernel rounds where the plain layers round (the residual sum, the normalised vector before
the weight, RoPE's output, silu's output), so outputs match them to a few units in the last
place of bfloat16. Attention keeps its scores and probabilities in float32, as flash attention
does, where the plain path rounds them to the model's dtype.

`Transformer.run_layers` calls decode_layers for one-token steps when `can_run` says so
(CUDA, bfloat16/float16 weights, fused projections, a contiguous span of cache rows); otherwise
the plain layers run. Tests run these kernels on the CPU through Triton's interpreter
(TRITON_INTERPRET=1).
"""

from __future__ import annotations

import functools
import importlib.util
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

if TYPE_CHECKING:
    from mistral7b.cache import CacheStep, RollingCache
    from mistral7b.model import Transformer

HALF_DTYPES = (torch.bfloat16, torch.float16)
BLOCK_N = 64            # cache slots per attention block
TARGET_PROGRAMS = 128   # attention programs to aim for (an H100 has 132 multiprocessors)
DEVICE_TYPES = ("cuda",)  # tests add "cpu", where Triton's interpreter runs the kernels
TRITON_GEMV = True      # batch-1 projections through gpu_kernels.gemv (False: cuBLAS)


def gemv_config(n: int, k: int) -> tuple[int, int, int]:
    """(rows per program, K slice, warps) for gpu_kernels.gemv on an (n, k) weight. Chosen from
    benchmarks/gpu_gemv.py's sweep on an H200 (weights read from memory): two rows per program
    and 1024-wide slices came within 1-3% of each shape's best; a long K wants more warps."""
    return 2, 1024 if k >= 1024 else max(16, 1 << (k - 1).bit_length()), 4 if k <= 8192 else 8


def available() -> bool:
    return importlib.util.find_spec("triton") is not None


@functools.cache
def _kernels() -> Any:
    """Compile-on-first-use: importing triton costs ~1 s, and only CUDA decode needs it."""
    from mistral7b import gpu_kernels
    return gpu_kernels


def can_run(model: Transformer, cache: RollingCache, step: CacheStep, h: torch.Tensor) -> bool:
    """Whether decode_layers can run this one-token step. Checked every step of the plain
    path (a loop over the layers' module types, microseconds); a CUDA graph checks it once, at
    capture."""
    from mistral7b.model import Block

    if not (h.device.type in DEVICE_TYPES and h.dtype in HALF_DTYPES and model.fused_decode
            and available()):
        return False
    if not (step.contiguous and step.write_first and cache.k.dtype == h.dtype
            and cache.k.is_contiguous() and cache.v.is_contiguous()):
        return False
    if step.write_b.shape[0] != h.shape[0]:       # a row without a new token (padding)
        return False
    hd = model.config.head_dim                    # tl.dot and tl.arange: a power of 2, >= 16
    if hd < 16 or hd & (hd - 1) or model.config.n_heads % model.config.n_kv_heads:
        return False
    for layer in model.layers:
        assert isinstance(layer, Block)
        attn, ffn = layer.attention, layer.feed_forward
        if attn.reduce is not None or ffn.reduce is not None:
            return False
        if not all(type(m) is nn.Linear for m in (attn.wqkv, attn.wo, ffn.w13, ffn.w2)):
            return False
    return True


def decode_layers(model: Transformer, h: torch.Tensor, cache: RollingCache, step: CacheStep,
                  rotations: torch.Tensor) -> torch.Tensor:
    """Every layer for h (B, 1, dim), one new token per row; returns (B, 1, dim), the hidden
    states before the final norm, as the plain layers do."""
    from mistral7b.model import Block

    k = _kernels()
    cfg = model.config
    B = h.shape[0]
    rope = torch.view_as_real(rotations.reshape(B, -1)).contiguous()   # (B, hd / 2, 2) float32
    positions = step.positions.reshape(B)
    rows = slice(step.first_row, step.first_row + B)
    layers = [layer for layer in model.layers if isinstance(layer, Block)]
    x = h.reshape(B, -1)
    normed, _ = k.rms_norm(x, layers[0].attention_norm.weight, cfg.norm_eps)
    for i, layer in enumerate(layers):
        attn, ffn = layer.attention, layer.feed_forward
        qkv = project(k, normed, attn.wqkv)
        q = k.rope_store(qkv, rope, cache.k[i], cache.v[i], step.write_row, step.write_slot,
                         cfg.n_heads, cfg.n_kv_heads, cfg.head_dim)
        out = k.attention(q, cache.k[i, rows], cache.v[i, rows], positions, step.n_slots,
                          cache.window)
        normed, x = k.rms_norm(project(k, out, attn.wo), layer.ffn_norm.weight, cfg.norm_eps,
                               residual=x)
        down = project(k, k.silu_mul(project(k, normed, ffn.w13)), ffn.w2)
        if i + 1 < len(layers):
            normed, x = k.rms_norm(down, layers[i + 1].attention_norm.weight, cfg.norm_eps,
                                   residual=x)
        else:
            x = x + down
    return x[:, None]


def project(k: Any, x: torch.Tensor, linear: Any) -> torch.Tensor:
    """linear(x) for x (B, K): one row through the Triton GEMV, more through cuBLAS."""
    if TRITON_GEMV and x.shape[0] == 1:
        return k.gemv(x, linear.weight)
    return linear(x)


def attention_splits(rows: int, kv_heads: int, slots: int) -> tuple[int, int]:
    """(splits, slots per split) for decode attention: enough programs to fill the GPU, each
    a whole number of BLOCK_N-slot blocks. With 8 kv heads and 256 slots: 1 row -> 4 splits of
    64 slots (32 programs); 16 rows -> 1 split of 256 (128 programs)."""
    blocks = -(-slots // BLOCK_N)
    splits = max(1, min(blocks, -(-TARGET_PROGRAMS // (rows * kv_heads))))
    chunk = -(-blocks // splits) * BLOCK_N
    return -(-slots // chunk), chunk
