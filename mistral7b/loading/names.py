"""Weight-name maps: every checkpoint format onto this package's (Mistral native) names.

Each map is data: a list of (regex, replacement) pairs applied with `re.fullmatch`. A name that
no pair matches and that is not in the format's ignore list is an unexpected tensor, reported by
the loader. Native checkpoints already use our names.
"""

from __future__ import annotations

import re

NameMap = list[tuple[str, str]]

NATIVE: NameMap = [(r"(.+)", r"\1")]

HF: NameMap = [
    (r"model\.embed_tokens\.weight", "tok_embeddings.weight"),
    (r"model\.norm\.weight", "norm.weight"),
    (r"lm_head\.weight", "output.weight"),
    (r"model\.layers\.(\d+)\.self_attn\.q_proj\.weight", r"layers.\1.attention.wq.weight"),
    (r"model\.layers\.(\d+)\.self_attn\.k_proj\.weight", r"layers.\1.attention.wk.weight"),
    (r"model\.layers\.(\d+)\.self_attn\.v_proj\.weight", r"layers.\1.attention.wv.weight"),
    (r"model\.layers\.(\d+)\.self_attn\.o_proj\.weight", r"layers.\1.attention.wo.weight"),
    (r"model\.layers\.(\d+)\.mlp\.gate_proj\.weight", r"layers.\1.feed_forward.w1.weight"),
    (r"model\.layers\.(\d+)\.mlp\.down_proj\.weight", r"layers.\1.feed_forward.w2.weight"),
    (r"model\.layers\.(\d+)\.mlp\.up_proj\.weight", r"layers.\1.feed_forward.w3.weight"),
    (r"model\.layers\.(\d+)\.input_layernorm\.weight", r"layers.\1.attention_norm.weight"),
    (r"model\.layers\.(\d+)\.post_attention_layernorm\.weight", r"layers.\1.ffn_norm.weight"),
]

# GGUF (llama.cpp) names. GGUF's q/k rows are interleaved, like Mistral's native layout.
GGUF: NameMap = [
    (r"token_embd\.weight", "tok_embeddings.weight"),
    (r"output_norm\.weight", "norm.weight"),
    (r"output\.weight", "output.weight"),
    (r"blk\.(\d+)\.attn_q\.weight", r"layers.\1.attention.wq.weight"),
    (r"blk\.(\d+)\.attn_k\.weight", r"layers.\1.attention.wk.weight"),
    (r"blk\.(\d+)\.attn_v\.weight", r"layers.\1.attention.wv.weight"),
    (r"blk\.(\d+)\.attn_output\.weight", r"layers.\1.attention.wo.weight"),
    (r"blk\.(\d+)\.ffn_gate\.weight", r"layers.\1.feed_forward.w1.weight"),
    (r"blk\.(\d+)\.ffn_down\.weight", r"layers.\1.feed_forward.w2.weight"),
    (r"blk\.(\d+)\.ffn_up\.weight", r"layers.\1.feed_forward.w3.weight"),
    (r"blk\.(\d+)\.attn_norm\.weight", r"layers.\1.attention_norm.weight"),
    (r"blk\.(\d+)\.ffn_norm\.weight", r"layers.\1.ffn_norm.weight"),
]

# Tensors some writers include that carry no weights (recomputed RoPE frequencies).
IGNORED: list[str] = [r".*rotary_emb\.inv_freq"]

# Our names of the projections whose rows are ordered by RoPE layout, with the attribute of
# ModelConfig giving their number of heads.
ROPE_ROWS: NameMap = [
    (r"layers\.\d+\.attention\.wq\.weight", "n_heads"),
    (r"layers\.\d+\.attention\.wk\.weight", "n_kv_heads"),
]


def rename(name: str, name_map: NameMap) -> str | None:
    """Our name for a checkpoint tensor, None when the map does not know it."""
    for pattern, replacement in name_map:
        match = re.fullmatch(pattern, name)
        if match:
            return match.expand(replacement)
    return None


def is_ignored(name: str) -> bool:
    return any(re.fullmatch(pattern, name) for pattern in IGNORED)


def rope_heads_attr(name: str) -> str | None:
    """For a q/k projection (our name), the config attribute holding its head count."""
    return rename(name, ROPE_ROWS)
