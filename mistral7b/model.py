"""The Mistral 7B transformer (Jiang et al., 2023): GQA + sliding-window attention.

Parameter names follow Mistral's native checkpoints (`layers.0.attention.wq.weight`, ...);
`loading/names.py` maps every other format onto them. Every forward pass goes through a
RollingCache, which also decides which keys each query may see (the window, causality, padding).

    h   = x + attention(attention_norm(x))
    out = h + feed_forward(ffn_norm(h))
    logits = output(norm(out))
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, cast

import torch
import torch.nn.functional as F
from torch import nn

from mistral7b import fused_decode, gpu_decode
from mistral7b.cache import CacheStep, RollingCache
from mistral7b.config import ModelConfig
from mistral7b.quant.modules import QuantEmbedding, QuantLinear
from mistral7b.rope import apply_rope, rope_rotations

if TYPE_CHECKING:
    from mistral7b.tensor_parallel import Leader

# Under tensor parallelism (tensor_parallel.py) a row-parallel layer's output is a partial sum:
# `reduce` adds up the ranks' parts (an all-reduce). None in one process.
Reduce = Callable[[torch.Tensor], torch.Tensor]


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype == torch.float32 and self.weight.dtype == torch.float32:
            return F.rms_norm(x, (x.shape[-1],), self.weight, self.eps)  # one fused op
        # Normalised in float32 and rounded to x's dtype before the weight multiplies, as the
        # reference does (rms_norm computes in float32 for half inputs: one kernel, no copies).
        return F.rms_norm(x, (x.shape[-1],), eps=self.eps) * self.weight


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
        self.wq = nn.Linear(cfg.dim, cfg.n_heads * cfg.head_dim, bias=False)
        self.wk = nn.Linear(cfg.dim, cfg.n_kv_heads * cfg.head_dim, bias=False)
        self.wv = nn.Linear(cfg.dim, cfg.n_kv_heads * cfg.head_dim, bias=False)
        self.wo = nn.Linear(cfg.n_heads * cfg.head_dim, cfg.dim, bias=False)
        self.wqkv: nn.Module | None = None  # wq, wk, wv as one matrix, after fuse()
        self.reduce: Reduce | None = None

    def fuse(self) -> None:
        """Replace wq, wk, wv by one projection (one matmul instead of three per token)."""
        fused = fuse_linears([self.wq, self.wk, self.wv])
        if fused is not None:
            self.wqkv = fused
            del self.wq, self.wk, self.wv

    def forward(self, x: torch.Tensor, rotations: torch.Tensor,
                cache: RollingCache, layer: int, step: CacheStep) -> torch.Tensor:
        B, T, _ = x.shape
        H, Hkv, hd = self.n_heads, self.n_kv_heads, self.head_dim
        if self.wqkv is not None:
            qkv = self.wqkv(x).view(B, T, H + 2 * Hkv, hd)
            qk = apply_rope(qkv[:, :, : H + Hkv], rotations)            # one rotation for both
            q, k, v = qk[:, :, :H], qk[:, :, H:], qkv[:, :, H + Hkv:]
        else:
            q = apply_rope(self.wq(x).view(B, T, H, hd), rotations)     # (B, T, H, hd)
            k = apply_rope(self.wk(x).view(B, T, Hkv, hd), rotations)   # (B, T, Hkv, hd)
            v = self.wv(x).view(B, T, Hkv, hd)
        keys, values = cache.update(layer, step, k.transpose(1, 2), v.transpose(1, 2))
        keys, values = keys.to(q.dtype), values.to(q.dtype)            # (B, Hkv, K, hd)
        if T == 1:
            out = self._decode_attention(q, keys, values, step)         # (B, 1, H, hd)
        else:
            # Query head h reads kv head h // (H / Hkv); enable_gqa shares K/V across the
            # group instead of materialising repeated copies.
            out = F.scaled_dot_product_attention(
                q.transpose(1, 2), keys, values,
                attn_mask=None if step.causal else step.mask, is_causal=step.causal,
                enable_gqa=self.n_heads != self.n_kv_heads).transpose(1, 2)  # (B, T, H, hd)
        out = self.wo(out.reshape(B, T, self.n_heads * self.head_dim))
        return out if self.reduce is None else self.reduce(out)

    def _decode_attention(self, q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor,
                          step: CacheStep) -> torch.Tensor:
        """One query per sequence: plain batched matmuls, cheaper than the fused kernel's
        set-up at this size. The G = H / Hkv query heads sharing a kv head are one (G, hd)
        matrix against its (keys, hd) keys; the mask enters as an additive bias inside the
        first matmul (three kernels in all, which matters on a GPU where a decode step's small
        kernels cost as much as its weight reads)."""
        B, _, H, D = q.shape
        Hkv, K = self.n_kv_heads, keys.shape[2]
        G = H // Hkv
        bias = step.attention_bias(Hkv, G, q.dtype)                         # (B * Hkv, G, K)
        scores = torch.baddbmm(bias, q.reshape(B * Hkv, G, D),
                               keys.reshape(B * Hkv, K, D).transpose(1, 2), alpha=D**-0.5)
        probs = torch.softmax(scores, dim=-1)        # accumulates in float32 for half inputs
        return torch.bmm(probs, values.reshape(B * Hkv, K, D)).view(B, 1, H, D)


class FeedForward(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.w1 = nn.Linear(cfg.dim, cfg.hidden_dim, bias=False)   # gate
        self.w2 = nn.Linear(cfg.hidden_dim, cfg.dim, bias=False)   # down
        self.w3 = nn.Linear(cfg.dim, cfg.hidden_dim, bias=False)   # up
        self.w13: nn.Module | None = None  # w1 and w3 as one matrix, after fuse()
        self.reduce: Reduce | None = None

    def fuse(self) -> None:
        fused = fuse_linears([self.w1, self.w3])
        if fused is not None:
            self.w13 = fused
            del self.w1, self.w3

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.w13 is not None:
            gate, up = self.w13(x).chunk(2, dim=-1)
            out = self.w2(F.silu(gate) * up)
        else:
            out = self.w2(F.silu(self.w1(x)) * self.w3(x))
        return out if self.reduce is None else self.reduce(out)


def fuse_linears(layers: list[nn.Module]) -> nn.Module | None:
    """One layer computing the concatenated outputs of `layers` (same input, same weight
    format); None when they cannot be stacked (e.g. mixed quantization types)."""
    if all(isinstance(lay, QuantLinear) for lay in layers):
        packed = cast(list[QuantLinear], layers)
        if len({lay.fmt for lay in packed}) != 1:
            return None
        fused = QuantLinear(packed[0].in_features, sum(lay.out_features for lay in packed),
                            packed[0].fmt, device="meta")
        fused.weight = torch.cat([lay.weight for lay in packed])
        return fused
    if not all(type(lay) is nn.Linear for lay in layers):
        return None
    weights = [cast(nn.Linear, lay).weight for lay in layers]
    if len({w.dtype for w in weights}) != 1:
        return None
    linear = nn.Linear(weights[0].shape[1], sum(w.shape[0] for w in weights), bias=False,
                       device="meta")
    linear.weight = nn.Parameter(torch.cat(weights), requires_grad=False)
    return linear


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.attention = Attention(cfg)
        self.feed_forward = FeedForward(cfg)
        self.attention_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.ffn_norm = RMSNorm(cfg.dim, cfg.norm_eps)

    def forward(self, x: torch.Tensor, rotations: torch.Tensor,
                cache: RollingCache, layer: int, step: CacheStep) -> torch.Tensor:
        h = x + self.attention(self.attention_norm(x), rotations, cache, layer, step)
        return h + self.feed_forward(self.ffn_norm(h))


class Transformer(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.config = cfg
        # Weights come from a checkpoint: the embedding is left uninitialised (its random
        # initialisation costs ~1 s when building on the meta device, for nothing).
        self.tok_embeddings: nn.Module = nn.Embedding(
            cfg.vocab_size, cfg.dim, _weight=torch.empty(cfg.vocab_size, cfg.dim))
        self.layers = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layers))
        self.norm = RMSNorm(cfg.dim, cfg.norm_eps)
        # Tied models (many Llama-family ones) reuse the embedding matrix as the output head.
        self.output: nn.Module | None = (
            None if cfg.tie_embeddings else nn.Linear(cfg.dim, cfg.vocab_size, bias=False))
        # Decode steps run fused: packed models on the CPU as one C++ call from token ids to
        # logits (fused_decode.py), half-precision models on CUDA through a few Triton kernels
        # (gpu_decode.py). False forces the Python layers (benchmarks and tests compare them).
        self.fused_decode = True
        self._decode_weights: fused_decode.DecodeWeights | None = None
        self._decode_weights_known = False
        # Rank 0 of a tensor-parallel group: announces each forward pass to the other ranks.
        self.tensor_parallel: Leader | None = None

    def fuse(self) -> None:
        """Stack the projections that share an input (q/k/v, gate/up) into one matmul each;
        done once after loading."""
        for layer in self.layers:
            assert isinstance(layer, Block)
            layer.attention.fuse()
            layer.feed_forward.fuse()
        self._decode_weights_known = False

    def set_prefill_dtype(self, dtype: torch.dtype) -> None:
        """The matmul dtype of packed (quantized) layers for many-token pre-fill chunks:
        float32 (default) or bfloat16, ~2.5x faster on CPUs with AVX512-BF16/AMX but moves
        logits by ~0.5 (of ~40) on the default model. Decode is not affected."""
        if dtype not in (torch.float32, torch.bfloat16):
            raise ValueError(f"prefill dtype must be float32 or bfloat16, not {dtype}")
        for module in self.modules():
            if isinstance(module, QuantLinear):
                module.prefill_dtype = dtype

    @property
    def device(self) -> torch.device:
        return self.norm.weight.device

    def forward(self, tokens: torch.Tensor, cache: RollingCache, rows: list[int] | None = None,
                n_new: list[int] | None = None, last_only: bool = False) -> torch.Tensor:
        """Run new tokens through the model, appending them to the cache.

        tokens: (B, T) ids; row b holds n_new[b] real tokens followed by padding (any id).
        rows:   cache row of each batch entry (default 0..B-1).
        Returns float32 logits, (B, T, vocab), or (B, vocab) for each row's last real token
        when last_only (what generation needs: it skips the output head for the other tokens).
        """
        B, T = tokens.shape
        rows = list(range(B)) if rows is None else rows
        n_new = [T] * B if n_new is None else n_new
        if self.tensor_parallel is not None:
            with self.tensor_parallel.announce(tokens, cache, rows, n_new):
                return self._forward(tokens, cache, rows, n_new, last_only)
        return self._forward(tokens, cache, rows, n_new, last_only)

    def _forward(self, tokens: torch.Tensor, cache: RollingCache, rows: list[int],
                 n_new: list[int], last_only: bool) -> torch.Tensor:
        B = tokens.shape[0]
        if tokens.shape[1] == 1:
            plan = self._fused_decode_plan()
            if plan is not None and fused_decode.can_run(cache, n_new):
                logits = fused_decode.decode_step(self, plan, tokens, cache, rows, n_new)
                return logits if last_only else logits[:, None]
        step = cache.begin(rows, n_new)
        h = self.run_layers(tokens, cache, step)
        cache.end(step)
        if last_only:
            last = torch.tensor(n_new, device=h.device) - 1
            h = h[torch.arange(B, device=h.device), last.clamp(min=0)]   # (B, dim)
        return self.head(self.norm(h)).float()

    def run_layers(self, tokens: torch.Tensor, cache: RollingCache, step: CacheStep
                   ) -> torch.Tensor:
        """Embed (B, T) tokens and run every layer over a planned cache step; (B, T, dim)
        hidden states before the final norm. `forward` plans the step on the host;
        static_decode.py plans it on the device."""
        rotations = rope_rotations(step.positions, self.config.head_dim, self.config.rope_theta)
        h = self.tok_embeddings(tokens)                                  # (B, T, dim)
        if tokens.shape[1] == 1 and gpu_decode.can_run(self, cache, step, h):
            return gpu_decode.decode_layers(self, h, cache, step, rotations)
        for i, layer in enumerate(self.layers):
            h = layer(h, rotations, cache, i, step)
        return h

    def _fused_decode_plan(self) -> fused_decode.DecodeWeights | None:
        if not self.fused_decode:
            return None
        if not self._decode_weights_known:
            self._decode_weights = fused_decode.gather(self)
            self._decode_weights_known = True
        return self._decode_weights

    def head(self, h: torch.Tensor) -> torch.Tensor:
        """The output projection; a tied model reuses the embedding matrix (packed or not)."""
        if self.output is not None:
            return self.output(h)
        embedding = self.tok_embeddings
        if isinstance(embedding, QuantEmbedding):
            return embedding.linear(h)
        assert isinstance(embedding, nn.Embedding)
        return F.linear(h, embedding.weight)
