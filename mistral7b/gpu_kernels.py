"""The Triton kernels of gpu_decode.py and their launchers (see that file for why they exist).

Imported only when a CUDA decode step needs them, or by tests under TRITON_INTERPRET=1. Every
launcher takes and returns torch tensors; shapes are in each docstring. Kernels compute in
float32 and round to the tensors' dtype where the plain layers (model.py) round.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from mistral7b.gpu_decode import BLOCK_N, attention_splits, gemv_config


@triton.jit
def _rms_norm_kernel(x_ptr, res_ptr, w_ptr, out_ptr, sum_ptr, eps, D,
                     HAS_RESIDUAL: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0)
    d = tl.arange(0, BLOCK)
    inside = d < D
    x = tl.load(x_ptr + row * D + d, mask=inside, other=0.0)
    if HAS_RESIDUAL:
        r = tl.load(res_ptr + row * D + d, mask=inside, other=0.0)
        x = (x.to(tl.float32) + r.to(tl.float32)).to(x.dtype)          # rounded, as x + r is
        tl.store(sum_ptr + row * D + d, x, mask=inside)
    xf = x.to(tl.float32)
    rstd = 1.0 / tl.sqrt(tl.sum(xf * xf, axis=0) / D + eps)
    normed = (xf * rstd).to(x.dtype).to(tl.float32)
    w = tl.load(w_ptr + d, mask=inside, other=0.0).to(tl.float32)
    tl.store(out_ptr + row * D + d, (normed * w).to(out_ptr.dtype.element_ty), mask=inside)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float,
             residual: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """x, residual: (B, D). With a residual: s = x + residual, rounded to x's dtype; returns
    (rms_norm(s) * weight, s). Without: (rms_norm(x) * weight, x)."""
    B, D = x.shape
    assert x.is_contiguous() and (residual is None or residual.is_contiguous())
    out = torch.empty_like(x)
    total = torch.empty_like(x) if residual is not None else x
    block = triton.next_power_of_2(D)
    _rms_norm_kernel[(B,)](x, residual if residual is not None else x, weight, out, total, eps,
                           D, HAS_RESIDUAL=residual is not None, BLOCK=block,
                           num_warps=min(16, max(1, block // 256)))
    return out, total


@triton.jit
def _rope_store_kernel(qkv_ptr, rope_ptr, q_ptr, k_ptr, v_ptr, row_ptr, slot_ptr,
                       k_row_stride, k_head_stride, k_slot_stride,
                       H: tl.constexpr, HKV: tl.constexpr, HD: tl.constexpr):
    b = tl.program_id(0)
    j = tl.program_id(1)                   # heads 0..H-1 are q's, H..H+HKV-1 are k's (and v's)
    i = tl.arange(0, HD // 2)
    cos = tl.load(rope_ptr + b * HD + 2 * i)
    sin = tl.load(rope_ptr + b * HD + 2 * i + 1)
    src = qkv_ptr + b * (H + 2 * HKV) * HD + j * HD
    even = tl.load(src + 2 * i)
    odd = tl.load(src + 2 * i + 1)
    ef, of = even.to(tl.float32), odd.to(tl.float32)
    real = (ef * cos - of * sin).to(even.dtype)                 # (e + i o)(cos + i sin)
    imag = (ef * sin + of * cos).to(even.dtype)
    if j < H:
        dst = q_ptr + b * H * HD + j * HD
        tl.store(dst + 2 * i, real)
        tl.store(dst + 2 * i + 1, imag)
    else:
        kv = j - H
        at = (tl.load(row_ptr + b) * k_row_stride + kv * k_head_stride
              + tl.load(slot_ptr + b) * k_slot_stride)
        tl.store(k_ptr + at + 2 * i, real.to(k_ptr.dtype.element_ty))
        tl.store(k_ptr + at + 2 * i + 1, imag.to(k_ptr.dtype.element_ty))
        d = tl.arange(0, HD)
        v = tl.load(src + HKV * HD + d)                  # v's head kv sits HKV heads after k's
        tl.store(v_ptr + at + d, v.to(v_ptr.dtype.element_ty))


def rope_store(qkv: torch.Tensor, rope: torch.Tensor, cache_k: torch.Tensor,
               cache_v: torch.Tensor, write_rows: torch.Tensor, write_slots: torch.Tensor,
               n_heads: int, n_kv_heads: int, head_dim: int) -> torch.Tensor:
    """qkv: (B, (H + 2 Hkv) hd), one token per row; rope: (B, hd / 2, 2) float32 cos/sin.
    Writes the rotated k and the v of row b into cache_k/cache_v (rows, Hkv, slots, hd) at
    [write_rows[b], :, write_slots[b]]; returns the rotated q, (B, H, hd)."""
    B = qkv.shape[0]
    q = torch.empty(B, n_heads, head_dim, dtype=qkv.dtype, device=qkv.device)
    assert qkv.is_contiguous() and rope.is_contiguous()
    assert cache_k.stride() == cache_v.stride() and cache_k.stride(3) == 1
    _rope_store_kernel[(B, n_heads + n_kv_heads)](
        qkv, rope, q, cache_k, cache_v, write_rows, write_slots,
        cache_k.stride(0), cache_k.stride(1), cache_k.stride(2),
        H=n_heads, HKV=n_kv_heads, HD=head_dim, num_warps=1)
    return q


@triton.jit
def _attention_kernel(q_ptr, k_ptr, v_ptr, pos_ptr, out_ptr, part_ptr, stat_ptr,
                      k_row_stride, k_head_stride, k_slot_stride,
                      n_slots, slots, window, chunk, scale,
                      HKV: tl.constexpr, G: tl.constexpr, GP: tl.constexpr, HD: tl.constexpr,
                      BLOCK: tl.constexpr, ONE_SPLIT: tl.constexpr):
    pid = tl.program_id(0)                 # (row, kv head)
    split = tl.program_id(1)
    b = pid // HKV
    kv = pid % HKV
    g = tl.arange(0, GP)
    d = tl.arange(0, HD)
    real = g < G                           # GP >= 16 rows for tl.dot; the extra ones are zero
    q = tl.load(q_ptr + (b * HKV * G + kv * G + g)[:, None] * HD + d[None, :],
                mask=real[:, None], other=0.0)
    p = tl.load(pos_ptr + b)               # the new token's position (its k/v are written)
    base = b * k_row_stride + kv * k_head_stride
    m = tl.full((GP,), float("-inf"), tl.float32)
    total = tl.zeros((GP,), tl.float32)
    acc = tl.zeros((GP, HD), tl.float32)
    start = split * chunk
    for n0 in range(start, tl.minimum(start + chunk, n_slots), BLOCK):
        s = n0 + tl.arange(0, BLOCK)
        inside = s < n_slots
        key_pos = p - (p - s + slots) % slots      # the position slot s holds (cache.py)
        ok = inside & (key_pos >= 0) & (p - key_pos < window)
        at = base + s[:, None] * k_slot_stride + d[None, :]
        keys = tl.load(k_ptr + at, mask=inside[:, None], other=0.0)
        scores = tl.dot(q, tl.trans(keys)) * scale                     # (GP, BLOCK) float32
        scores = tl.where(ok[None, :], scores, float("-inf"))
        m_new = tl.maximum(m, tl.max(scores, axis=1))
        shift = tl.where(m_new == float("-inf"), 0.0, m_new)            # all masked so far
        alpha = tl.exp(m - shift)
        probs = tl.exp(scores - shift[:, None])
        total = total * alpha + tl.sum(probs, axis=1)
        values = tl.load(v_ptr + at, mask=inside[:, None], other=0.0)
        acc = acc * alpha[:, None] + tl.dot(probs.to(values.dtype), values)
        m = m_new
    if ONE_SPLIT:
        out = acc / total[:, None]
        tl.store(out_ptr + (b * HKV * G + kv * G + g)[:, None] * HD + d[None, :],
                 out.to(out_ptr.dtype.element_ty), mask=real[:, None])
    else:
        n_splits = tl.num_programs(1)
        at = (pid * n_splits + split) * GP
        tl.store(part_ptr + (at + g)[:, None] * HD + d[None, :], acc)
        tl.store(stat_ptr + 2 * (at + g), m)
        tl.store(stat_ptr + 2 * (at + g) + 1, total)


@triton.jit
def _merge_kernel(part_ptr, stat_ptr, out_ptr, n_splits,
                  HKV: tl.constexpr, G: tl.constexpr, GP: tl.constexpr, HD: tl.constexpr):
    pid = tl.program_id(0)
    b = pid // HKV
    kv = pid % HKV
    g = tl.arange(0, GP)
    d = tl.arange(0, HD)
    m = tl.full((GP,), float("-inf"), tl.float32)
    for split in range(0, n_splits):
        at = (pid * n_splits + split) * GP
        m = tl.maximum(m, tl.load(stat_ptr + 2 * (at + g)))
    shift = tl.where(m == float("-inf"), 0.0, m)
    total = tl.zeros((GP,), tl.float32)
    acc = tl.zeros((GP, HD), tl.float32)
    for split in range(0, n_splits):
        at = (pid * n_splits + split) * GP
        weight = tl.exp(tl.load(stat_ptr + 2 * (at + g)) - shift)
        total += weight * tl.load(stat_ptr + 2 * (at + g) + 1)
        acc += weight[:, None] * tl.load(part_ptr + (at + g)[:, None] * HD + d[None, :])
    out = acc / total[:, None]
    tl.store(out_ptr + (b * HKV * G + kv * G + g)[:, None] * HD + d[None, :],
             out.to(out_ptr.dtype.element_ty), mask=(g < G)[:, None])


def attention(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor,
              positions: torch.Tensor, n_slots: int, window: int | None) -> torch.Tensor:
    """q: (B, H, hd), one query per row, at positions[b] (whose k/v are already in the cache);
    keys, values: (B, Hkv, slots, hd), the rows' rolling buffers. Attends over slots
    0..n_slots-1, masking the empty ones and those that fell out of the window. Returns
    (B, H * hd) in q's dtype."""
    B, H, hd = q.shape
    Hkv, slots = keys.shape[1], keys.shape[2]
    assert q.is_contiguous() and positions.is_contiguous()
    assert keys.stride() == values.stride() and keys.stride(3) == 1
    G = H // Hkv
    GP = max(16, triton.next_power_of_2(G))
    out = torch.empty(B, H * hd, dtype=q.dtype, device=q.device)
    splits, chunk = attention_splits(B, Hkv, n_slots)
    one = splits == 1
    part = out if one else torch.empty(B * Hkv * splits * GP, hd, dtype=torch.float32,
                                       device=q.device)
    stat = out if one else torch.empty(B * Hkv * splits * GP, 2, dtype=torch.float32,
                                       device=q.device)
    _attention_kernel[(B * Hkv, splits)](
        q, keys, values, positions, out, part, stat,
        keys.stride(0), keys.stride(1), keys.stride(2),
        n_slots, slots, window if window is not None else 2**62, chunk, hd ** -0.5,
        HKV=Hkv, G=G, GP=GP, HD=hd, BLOCK=BLOCK_N, ONE_SPLIT=one, num_warps=4)
    if not one:
        _merge_kernel[(B * Hkv,)](part, stat, out, splits, HKV=Hkv, G=G, GP=GP, HD=hd,
                                  num_warps=4)
    return out


@triton.jit
def _silu_mul_kernel(gu_ptr, out_ptr, F, BLOCK: tl.constexpr):
    b = tl.program_id(0)
    f = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    inside = f < F
    gate = tl.load(gu_ptr + b * 2 * F + f, mask=inside, other=0.0)
    up = tl.load(gu_ptr + b * 2 * F + F + f, mask=inside, other=0.0)
    gf = gate.to(tl.float32)
    silu = (gf / (1.0 + tl.exp(-gf))).to(gate.dtype)               # rounded, as F.silu is
    tl.store(out_ptr + b * F + f, (silu.to(tl.float32) * up.to(tl.float32)).to(gate.dtype),
             mask=inside)


def silu_mul(gate_up: torch.Tensor) -> torch.Tensor:
    """gate_up: (B, 2F), gate then up (the fused w1/w3 output); returns silu(gate) * up, (B, F)."""
    B, F2 = gate_up.shape
    assert gate_up.is_contiguous()
    F = F2 // 2
    out = torch.empty(B, F, dtype=gate_up.dtype, device=gate_up.device)
    block = 1024
    _silu_mul_kernel[(B, triton.cdiv(F, block))](gate_up, out, F, BLOCK=block, num_warps=4)
    return out


@triton.jit
def _gemv_kernel(x_ptr, w_ptr, y_ptr, N, K, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """y[n] = sum_k w[n, k] * x[k] for this program's BLOCK_N rows: float32 partial sums over
    BLOCK_K-wide slices, reduced and rounded to y's dtype once at the end. Each weight is read
    once, so the loads ask the cache to evict them first."""
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < N
    acc = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
    for k in range(0, K, BLOCK_K):
        cols = k + tl.arange(0, BLOCK_K)
        col_ok = cols < K
        w = tl.load(w_ptr + rows[:, None].to(tl.int64) * K + cols[None, :],
                    mask=row_ok[:, None] & col_ok[None, :], other=0.0,
                    eviction_policy="evict_first")
        x = tl.load(x_ptr + cols, mask=col_ok, other=0.0)
        acc += w.to(tl.float32) * x.to(tl.float32)[None, :]
    tl.store(y_ptr + rows, tl.sum(acc, axis=1).to(y_ptr.dtype.element_ty), mask=row_ok)


def gemv(x: torch.Tensor, weight: torch.Tensor,
         config: tuple[int, int, int] | None = None) -> torch.Tensor:
    """x (1, K) @ weight (N, K).T -> (1, N), as F.linear for one row. config: (rows per
    program, K slice, warps); default gemv_config's choice for the shape."""
    N, K = weight.shape
    assert x.shape == (1, K) and x.is_contiguous() and weight.is_contiguous()
    block_n, block_k, warps = config or gemv_config(N, K)
    y = torch.empty(1, N, dtype=x.dtype, device=x.device)
    _gemv_kernel[(triton.cdiv(N, block_n),)](x, weight, y, N, K, BLOCK_N=block_n,
                                             BLOCK_K=block_k, num_warps=warps)
    return y
