"""Mistral 7B's exact shapes with random quantized weights: peak memory, decode and pre-fill speed.

    .venv/bin/python benchmarks/mistral_7b_shapes.py [--tokens 16] [--context 0] [--json]
        [--no-fused] [--prefill 128] [--format Q4_0|Q4_1|Q8_0|Q4_K|Q5_K|Q6_K] [--gguf-order]
    .venv/bin/torchrun --nproc-per-node 2 benchmarks/mistral_7b_shapes.py ...   # split in 2

Under torchrun each rank builds only its share of the model (tensor_parallel.py) and rank 0
reports, with the time the all-reduces took per token. --no-fused runs one process's decode
step layer by layer, as a split model must (without it one C++ call runs the whole step).

The real weights (14 GB in bf16) are not available here, so this builds the 7B model's modules
on the meta device and gives every linear layer and the embedding random blocks of --format
directly (Q4_0: 3.8 GiB; no float32 copy of any matrix ever exists), repacks the linear layers
eight rows at a time as load() does (--gguf-order keeps the file's block order), then decodes
with the same kernels and rolling cache as a real GGUF would. The text is meaningless; the memory
and speed are real.
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import time
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from mistral7b import tensor_parallel as tp
from mistral7b.bench import cpu_name, time_decode_at, time_prefill
from mistral7b.config import ModelConfig
from mistral7b.llm import LLM
from mistral7b.model import Transformer
from mistral7b.quant.formats import FORMATS
from mistral7b.quant.modules import QuantEmbedding, QuantLinear
from mistral7b.quant.repack import repack_linears
from mistral7b.tensor_parallel import local_config, world_from_env
from mistral7b.tokenizer import MissingTokenizer

sys.path.insert(0, str(Path(__file__).resolve().parent))

from kernels import SCALE_OFFSETS  # benchmarks/kernels.py: where each format's scales lie

MISTRAL_7B = {"dim": 4096, "n_layers": 32, "head_dim": 128, "hidden_dim": 14336, "n_heads": 32,
              "n_kv_heads": 8, "norm_eps": 1e-05, "sliding_window": 4096, "vocab_size": 32000}


def random_blocks(fmt: str, rows: int, cols: int, generator: torch.Generator) -> torch.Tensor:
    """Random blocks of `fmt`: random bytes, and a small float16 in each scale's two bytes
    (random bytes there could be NaN)."""
    spec = FORMATS[fmt]
    blocks = torch.randint(0, 256, (rows * cols // spec.block_size, spec.block_bytes),
                           dtype=torch.uint8, generator=generator)
    scale = torch.tensor([0.002], dtype=torch.float16).view(torch.uint8)
    for offset in SCALE_OFFSETS[fmt]:
        blocks[:, offset:offset + 2] = scale
    return blocks.view(rows, spec.row_bytes(cols))


def build(cache_dtype: torch.dtype = torch.float32, seed: int = 0, world: int = 1,
          fmt: str = "Q4_0", gguf_order: bool = False) -> LLM:
    """The model, or with world > 1 one rank's share of it."""
    config = local_config(ModelConfig.from_params(MISTRAL_7B, source="Mistral 7B shapes, "
                                                  f"random {fmt}"), world)
    generator = torch.Generator().manual_seed(seed)
    with torch.device("meta"):
        model = Transformer(config)
    model.fuse()  # stack q/k/v and gate/up while still on meta: no copies later
    for name, module in list(model.named_modules()):
        parent_name, _, attr = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        if isinstance(module, nn.Linear):
            packed: nn.Module = QuantLinear(module.in_features, module.out_features, fmt)
            packed.weight = random_blocks(fmt, module.out_features, module.in_features, generator)
            setattr(parent, attr, packed)
        elif isinstance(module, nn.Embedding):
            embedding = QuantEmbedding(module.num_embeddings, module.embedding_dim, fmt)
            embedding.weight = random_blocks(fmt, module.num_embeddings, module.embedding_dim,
                                             generator)
            setattr(parent, attr, embedding)
    for module in model.modules():  # the norms: float32 ones
        if hasattr(module, "eps") and isinstance(getattr(module, "weight", None), nn.Parameter):
            module.weight = nn.Parameter(torch.ones(config.dim), requires_grad=False)
    if not gguf_order:
        repack_linears(model)
    return LLM(model.eval(), MissingTokenizer(Path("."), config.vocab_size), torch.float32,
               cache_dtype=cache_dtype)


def allreduce_latency_us(dim: int, repeats: int = 200) -> float:
    """Median µs of one decode step's all-reduce (dim floats) with every rank ready: the cost
    of the communication alone, without waiting for a slower rank's matmuls."""
    import torch.distributed as dist

    x = torch.ones(dim)
    times = []
    for _ in range(repeats):
        dist.barrier()
        start = time.perf_counter()
        dist.all_reduce(x)
        times.append(time.perf_counter() - start)
    return round(sorted(times)[len(times) // 2] * 1e6, 1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=16, help="decode steps to time")
    parser.add_argument("--context", type=int, default=0, help="positions already cached")
    parser.add_argument("--kv-cache-dtype", choices=["float32", "float16"], default="float32")
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--prefill", type=int, default=0,
                        help="also time the pre-fill of this many tokens")
    parser.add_argument("--format", choices=sorted(SCALE_OFFSETS), default="Q4_0",
                        help="the weights' block format")
    parser.add_argument("--gguf-order", action="store_true",
                        help="keep the GGUF block order (do not repack eight rows at a time)")
    parser.add_argument("--no-fused", action="store_true",
                        help="one process: decode layer by layer (as a split model does)")
    args = parser.parse_args()

    world = world_from_env()
    shard = tp.init(torch.device("cpu")) if world > 1 else None
    start = time.perf_counter()
    llm = build(getattr(torch, args.kv_cache_dtype), seed=shard.rank if shard else 0,
                world=world, fmt=args.format, gguf_order=args.gguf_order)
    build_s = time.perf_counter() - start
    latency_us = None
    if shard is not None:
        latency_us = allreduce_latency_us(llm.config.dim)
        tp.attach(llm.model, shard)
        if not shard.is_leader:
            tp.follow(llm.model, shard)
            return
    llm.model.fused_decode = not args.no_fused and shard is None
    weights = sum(t.nbytes for t in [*llm.model.parameters(), *llm.model.buffers()])
    reduce = llm.model.tensor_parallel.reduce if llm.model.tensor_parallel else None
    before = reduce.seconds if reduce else 0.0
    speed, cache_bytes = time_decode_at(llm, args.context, args.tokens)
    prefill = round(time_prefill(llm, args.prefill, 0), 2) if args.prefill else None
    allreduce_s = (reduce.seconds - before) if reduce else 0.0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20   # KiB -> GiB
    formats = sorted({m.fmt for m in llm.model.modules() if isinstance(m, QuantLinear)})
    result = {"world_size": world, "fused_decode": llm.model.fused_decode,
              "linear_formats": ",".join(formats),
              "parameters_b_per_rank": round(llm.config.num_parameters() / 1e9, 2),
              "weights_gib_per_rank": round(weights / 2**30, 2), "build_s": round(build_s, 1),
              "context": args.context, "kv_cache_dtype": args.kv_cache_dtype,
              "decode_tokens_per_s": round(speed, 2),
              "prefill_tokens": args.prefill, "prefill_tokens_per_s": prefill,
              # all-reduces of the timed steps and the warm-up step
              "allreduce_ms_per_token": round(allreduce_s * 1e3 / (args.tokens + 1), 2),
              "allreduce_calls_per_token": 2 * llm.config.n_layers if shard else 0,
              "allreduce_alone_us": latency_us,
              "kv_cache_mib_per_rank": round(cache_bytes / 2**20, 1),
              "peak_rss_gib_rank0": round(peak, 2),
              "threads_per_rank": torch.get_num_threads(), "cpu": cpu_name()}
    print(json.dumps(result, indent=2) if args.json else "\n".join(
        f"{k:>20}: {v}" for k, v in result.items()))


if __name__ == "__main__":
    main()
