"""Write a GGUF file with Mistral 7B's shapes and random quantized blocks, for timing only.

    .venv/bin/python benchmarks/random_gguf.py /tmp/m7b-q4k.gguf [--format Q4_K]
        [--output-format Q6_K] [--k-m] [--tiny]
    .venv/bin/python benchmarks/compare_llama_cpp.py --model /tmp/m7b-q4k.gguf \\
        --llama-python /path/to/python-with-llama_cpp -p 32 -n 32

Real Mistral 7B weights are not available here, but speed does not depend on the values: this
writes every matrix as random blocks of --format (with small float16 scales, so nothing is NaN),
the output matrix in --output-format (Q6_K, as Q4_K_M files have it), and float32 norms; --k-m
also puts attn_v and ffn_down in Q6_K on the layers where Q4_K_M files have them so. The
file has no vocabulary: `tokenizer.ggml.model` is "none", which llama.cpp needs in order to load
it and mistral7b reads as "run on token ids". Both programs then time the same bytes side by
side. The text is meaningless; the speed is real. --tiny writes a small model of the same kind
(a few MB) to try the command quickly.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch
from gguf import GGMLQuantizationType, GGUFWriter

sys.path.insert(0, str(Path(__file__).resolve().parent))

from mistral_7b_shapes import MISTRAL_7B, SCALE_OFFSETS, random_blocks  # the same blocks

TINY = {"dim": 512, "n_layers": 2, "hidden_dim": 1024, "n_heads": 8, "n_kv_heads": 2,
        "vocab_size": 1000}


def more_bits(layer: int, n_layers: int) -> bool:
    """The layers whose attn_v and ffn_down llama.cpp's Q4_K_M (and Q5_K_M) quantizes to Q6_K:
    the first and last eighth, and every third layer between them."""
    eighth = n_layers // 8
    return layer < eighth or layer >= 7 * n_layers // 8 or (layer - eighth) % 3 == 2


def write(path: Path, shapes: dict[str, float], fmt: str, output_fmt: str, seed: int = 0,
          k_m_mix: bool = False) -> None:
    dim, hidden, vocab = int(shapes["dim"]), int(shapes["hidden_dim"]), int(shapes["vocab_size"])
    heads, kv_heads = int(shapes["n_heads"]), int(shapes["n_kv_heads"])
    head_dim = dim // heads
    generator = torch.Generator().manual_seed(seed)
    writer = GGUFWriter(str(path), "llama")
    writer.add_context_length(4096)
    writer.add_embedding_length(dim)
    writer.add_block_count(int(shapes["n_layers"]))
    writer.add_feed_forward_length(hidden)
    writer.add_head_count(heads)
    writer.add_head_count_kv(kv_heads)
    writer.add_rope_dimension_count(head_dim)
    writer.add_rope_freq_base(10000.0)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_vocab_size(vocab)
    writer.add_string("tokenizer.ggml.model", "none")

    def matrix(name: str, rows: int, cols: int, kind: str = fmt) -> None:
        writer.add_tensor(name, random_blocks(kind, rows, cols, generator).numpy(),
                          raw_dtype=GGMLQuantizationType[kind])

    ones = np.ones(dim, dtype=np.float32)
    matrix("token_embd.weight", vocab, dim)
    writer.add_tensor("output_norm.weight", ones)
    matrix("output.weight", vocab, dim, output_fmt)
    n_layers = int(shapes["n_layers"])
    for layer in range(n_layers):
        prefix = f"blk.{layer}."
        more = "Q6_K" if k_m_mix and more_bits(layer, n_layers) else fmt
        writer.add_tensor(prefix + "attn_norm.weight", ones)
        writer.add_tensor(prefix + "ffn_norm.weight", ones)
        matrix(prefix + "attn_q.weight", dim, dim)
        matrix(prefix + "attn_k.weight", kv_heads * head_dim, dim)
        matrix(prefix + "attn_v.weight", kv_heads * head_dim, dim, more)
        matrix(prefix + "attn_output.weight", dim, dim)
        matrix(prefix + "ffn_gate.weight", hidden, dim)
        matrix(prefix + "ffn_up.weight", hidden, dim)
        matrix(prefix + "ffn_down.weight", dim, hidden, more)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("path", type=Path, help="the .gguf file to write")
    parser.add_argument("--format", choices=sorted(SCALE_OFFSETS), default="Q4_K")
    parser.add_argument("--output-format", choices=sorted(SCALE_OFFSETS), default="Q6_K")
    parser.add_argument("--tiny", action="store_true", help="a few-MB model of the same kind")
    parser.add_argument("--k-m", action="store_true",
                        help="as a Q4_K_M file: attn_v and ffn_down in Q6_K on the layers "
                             "llama.cpp's mix gives more bits (half of Mistral 7B's 32)")
    args = parser.parse_args()
    write(args.path, TINY if args.tiny else MISTRAL_7B, args.format, args.output_format,
          k_m_mix=args.k_m)
    print(f"wrote {args.path} ({args.path.stat().st_size / 2**30:.2f} GiB)")


if __name__ == "__main__":
    main()
