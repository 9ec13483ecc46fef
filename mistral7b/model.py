"""The Mistral 7B transformer (Jiang et al., 2023): GQA + sliding-window attention.

Parameter names follow Mistral's native checkpoints (`layers.0.attention.wq.weight`, ...);
`loading/names.py` maps every other format onto them. Every forward pass goes through a
RollingCache, which also decides which keys each query may see (the window, causality, padding).

    h   = x + attention(attention_norm(x))
    out = h + feed_forward(ffn_norm(h))
    logits = output(norm(out))
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from mistral7b.cache import CacheStep, RollingCache
from mistral7b.config import ModelConfig
from mistral7b.quant.modules import QuantEmbedding
from mistral7b.rope import apply_rope, rope_cos_sin


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Normalise in float32 whatever the weights' dtype, as the reference does.
        xf = x.float()
        normed = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return normed.type_as(x) * self.weight


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
        self.wq = nn.Linear(cfg.dim, cfg.n_heads * cfg.head_dim, bias=False)
        self.wk = nn.Linear(cfg.dim, cfg.n_kv_heads * cfg.head_dim, bias=False)
        self.wv = nn.Linear(cfg.dim, cfg.n_kv_heads * cfg.head_dim, bias=False)
        self.wo = nn.Linear(cfg.n_heads * cfg.head_dim, cfg.dim, bias=False)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                cache: RollingCache, layer: int, step: CacheStep) -> torch.Tensor:
        B, T, _ = x.shape
        q = self.wq(x).view(B, T, self.n_heads, self.head_dim)          # (B, T, H, hd)
        k = self.wk(x).view(B, T, self.n_kv_heads, self.head_dim)       # (B, T, Hkv, hd)
        v = self.wv(x).view(B, T, self.n_kv_heads, self.head_dim)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        keys, values = cache.update(layer, step, k, v)                  # (B, K, Hkv, hd)
        # Query head h reads kv head h // (H / Hkv); enable_gqa shares K/V across the group
        # instead of the caller materialising repeated copies.
        out = F.scaled_dot_product_attention(
            q.transpose(1, 2), keys.transpose(1, 2).to(q.dtype), values.transpose(1, 2).to(q.dtype),
            attn_mask=step.mask, enable_gqa=self.n_heads != self.n_kv_heads)  # (B, H, T, hd)
        return self.wo(out.transpose(1, 2).reshape(B, T, self.n_heads * self.head_dim))


class FeedForward(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.w1 = nn.Linear(cfg.dim, cfg.hidden_dim, bias=False)   # gate
        self.w2 = nn.Linear(cfg.hidden_dim, cfg.dim, bias=False)   # down
        self.w3 = nn.Linear(cfg.dim, cfg.hidden_dim, bias=False)   # up

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.attention = Attention(cfg)
        self.feed_forward = FeedForward(cfg)
        self.attention_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.ffn_norm = RMSNorm(cfg.dim, cfg.norm_eps)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                cache: RollingCache, layer: int, step: CacheStep) -> torch.Tensor:
        h = x + self.attention(self.attention_norm(x), cos, sin, cache, layer, step)
        return h + self.feed_forward(self.ffn_norm(h))


class Transformer(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.config = cfg
        self.tok_embeddings: nn.Module = nn.Embedding(cfg.vocab_size, cfg.dim)
        self.layers = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layers))
        self.norm = RMSNorm(cfg.dim, cfg.norm_eps)
        # Tied models (many Llama-family ones) reuse the embedding matrix as the output head.
        self.output: nn.Module | None = (
            None if cfg.tie_embeddings else nn.Linear(cfg.dim, cfg.vocab_size, bias=False))

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
        step = cache.begin(rows, n_new)
        cos, sin = rope_cos_sin(step.positions, self.config.head_dim, self.config.rope_theta)
        h = self.tok_embeddings(tokens)                                  # (B, T, dim)
        for i, layer in enumerate(self.layers):
            h = layer(h, cos, sin, cache, i, step)
        cache.end(step)
        if last_only:
            last = torch.tensor(n_new, device=h.device) - 1
            h = h[torch.arange(B, device=h.device), last.clamp(min=0)]   # (B, dim)
        return self.head(self.norm(h)).float()

    def head(self, h: torch.Tensor) -> torch.Tensor:
        """The output projection; a tied model reuses the embedding matrix (packed or not)."""
        if self.output is not None:
            return self.output(h)
        embedding = self.tok_embeddings
        if isinstance(embedding, QuantEmbedding):
            return embedding.linear(h)
        assert isinstance(embedding, nn.Embedding)
        return F.linear(h, embedding.weight)
