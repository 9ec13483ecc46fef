"""Write small Mistral-shaped GGUF files from a transformers model, for the tests.

Written independently of the package: names and the interleaved q/k layout follow llama.cpp's
converter; quantization uses the `gguf` package. K-quant types have no quantizer in `gguf`, so
their blocks are random bytes with sane scales; the transformers twin then gets the weights those
blocks dequantize to, so it stays an exact float reference.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from gguf import GGMLQuantizationType, GGUFWriter
from gguf.quants import dequantize, quantize

from tests.conftest import _to_interleaved

_LAYER = {
    "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.down_proj": "ffn_down",
    "mlp.up_proj": "ffn_up", "input_layernorm": "attn_norm",
    "post_attention_layernorm": "ffn_norm",
}
_TOP = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
        "lm_head.weight": "output.weight"}

# Byte offsets of the float16 scale fields inside one 256-value block of each K-quant type.
_K_BLOCK = {
    GGMLQuantizationType.Q4_K: (144, [0, 2]),
    GGMLQuantizationType.Q5_K: (176, [0, 2]),
    GGMLQuantizationType.Q6_K: (210, [208]),
}


def gguf_name(hf_name: str) -> str:
    if hf_name in _TOP:
        return _TOP[hf_name]
    _, _, layer, *rest = hf_name.split(".")
    return f"blk.{layer}.{_LAYER['.'.join(rest[:-1])]}.weight"


def random_k_blocks(rows: int, cols: int, qtype: GGMLQuantizationType, rng: np.random.Generator
                    ) -> np.ndarray:
    block_bytes, scale_offsets = _K_BLOCK[qtype]
    blocks = rng.integers(0, 256, size=(rows * cols // 256, block_bytes), dtype=np.uint8)
    scale = 8e-5 if qtype == GGMLQuantizationType.Q6_K else 4e-4
    for off in scale_offsets:
        values = (scale * (0.5 + rng.random(blocks.shape[0]))).astype(np.float16)
        blocks[:, off:off + 2] = values.view(np.uint8).reshape(-1, 2)
    return blocks.reshape(rows, -1)


def write_gguf(model: torch.nn.Module, path: Path, qtype: GGMLQuantizationType,
               window: int | None = None, seed: int = 0,
               strings: dict[str, str] | None = None,
               types: dict[str, GGMLQuantizationType] | None = None) -> torch.nn.Module:
    """Write `model` as a GGUF whose 2-D weights have type `qtype` (and the metadata `strings`),
    except those whose transformers name starts with a key of `types` (a mix, as Q4_K_M files
    are); returns the model with its weights replaced by what the file holds (dequantized), the
    reference for that file."""
    cfg = model.config
    rng = np.random.default_rng(seed)
    writer = GGUFWriter(str(path), "llama")
    writer.add_context_length(cfg.max_position_embeddings)
    writer.add_embedding_length(cfg.hidden_size)
    writer.add_block_count(cfg.num_hidden_layers)
    writer.add_feed_forward_length(cfg.intermediate_size)
    writer.add_head_count(cfg.num_attention_heads)
    writer.add_head_count_kv(cfg.num_key_value_heads)
    writer.add_rope_dimension_count(cfg.head_dim)
    writer.add_rope_freq_base(float(cfg.rope_parameters["rope_theta"]))
    writer.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    writer.add_vocab_size(cfg.vocab_size)
    if window:
        writer.add_sliding_window(window)
    for key, value in (strings or {}).items():
        writer.add_string(key, value)

    state = model.state_dict()
    stored = {}
    default = qtype
    for name, tensor in state.items():
        t = tensor.detach().float()
        if "q_proj" in name:
            t = _to_interleaved(t, cfg.num_attention_heads)
        elif "k_proj" in name:
            t = _to_interleaved(t, cfg.num_key_value_heads)
        array = t.numpy()
        qtype = next((kind for key, kind in (types or {}).items() if name.startswith(key)),
                     default)
        if array.ndim == 1 or qtype == GGMLQuantizationType.F32:
            data, kind = array.astype(np.float32), GGMLQuantizationType.F32
        elif qtype == GGMLQuantizationType.F16:
            data, kind = array.astype(np.float16), qtype
        elif qtype in _K_BLOCK:
            data, kind = random_k_blocks(*array.shape, qtype, rng), qtype
        else:
            data, kind = quantize(array, qtype), qtype
        writer.add_tensor(gguf_name(name), data, raw_dtype=kind)
        stored[name] = dequantize(data, kind).reshape(array.shape)

    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()

    # The reference: the same model with exactly the weights the file holds.
    with torch.no_grad():
        for name, values in stored.items():
            t = torch.from_numpy(np.ascontiguousarray(values, dtype=np.float32))
            if "q_proj" in name:
                t = _from_interleaved(t, cfg.num_attention_heads)
            elif "k_proj" in name:
                t = _from_interleaved(t, cfg.num_key_value_heads)
            state[name].copy_(t)
    return model


def _from_interleaved(w: torch.Tensor, heads: int) -> torch.Tensor:
    rows, cols = w.shape
    return w.view(heads, rows // heads // 2, 2, cols).transpose(1, 2).reshape(rows, cols)
