"""Decode speed of a real model under each way of streaming its weights, interleaved in one
process so that every configuration sees the same machine state:

- the prefetch distance of the matmuls (0 = off),
- the 32-value formats in GGUF order or repacked eight rows at a time (quant/repack.py), and
- packed weights in the huge-page arena (quant/hugepages.py) or where the loader put them.

    .venv/bin/python benchmarks/decode_streaming.py [--model M] [--prefetch 0,4096] \
        [--layouts gguf,x8,x8+arena] [-n 128] [-r 5] [--json]

Reports the median tokens/s of each configuration (tg N, batch 1, like `mistral7b bench`), the
weight GB/s that makes, and the machine's read bandwidth measured in the same run.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch

import mistral7b
from mistral7b.bench import cpu_name, read_bandwidth_gbs, time_decode, weight_bytes_per_token
from mistral7b.quant import kernels


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None)
    parser.add_argument("--prefetch", default="0,4096")
    parser.add_argument("--layouts", default="gguf,x8,x8+arena",
                        help="gguf: the file's block order; x8: repacked 8 rows at a time; "
                             "+arena: in the huge-page arena")
    parser.add_argument("-n", type=int, default=128)
    parser.add_argument("-r", "--repetitions", type=int, default=5)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()

    ext = kernels.extension()
    if ext is None:
        print("the C++ kernels are not available here", file=sys.stderr)
        return 1
    models = {}
    for layout in args.layouts.split(","):
        os.environ["MISTRAL7B_REPACK"] = "1" if "x8" in layout else "0"
        os.environ["MISTRAL7B_HUGEPAGES"] = "1" if "arena" in layout else "0"
        models[layout] = mistral7b.load(args.model, progress=False)
    for name in ("MISTRAL7B_REPACK", "MISTRAL7B_HUGEPAGES"):
        del os.environ[name]
    plain = next(iter(models.values()))
    distances = [int(v) for v in args.prefetch.split(",")]
    default = ext.prefetch_bytes()
    runs: dict[tuple[str, int], list[float]] = {(m, d): [] for m in models for d in distances}
    for llm in models.values():
        time_decode(llm, 16, 0, 1)                       # warm-up
    for _ in range(args.repetitions):
        for (name, distance), rates in runs.items():
            ext.set_prefetch_bytes(distance)
            rates.append(time_decode(models[name], args.n, 0, 1))
    ext.set_prefetch_bytes(default)
    per_token = weight_bytes_per_token(plain)
    bandwidth = read_bandwidth_gbs()
    rows = [{"layout": name, "prefetch": distance, "tokens_per_s": statistics.median(rates),
             "spread": max(rates) - min(rates),
             "weights_gbs": per_token * statistics.median(rates) / 1e9}
            for (name, distance), rates in runs.items()]
    header = {"cpu": cpu_name(), "model": plain.path.name if plain.path else "?",
              "threads": torch.get_num_threads(), "read_bandwidth_gbs": bandwidth,
              "date": time.strftime("%Y-%m-%d"), "test": f"tg{args.n}"}
    if args.json:
        print(json.dumps({**header, "results": rows}, indent=2))
        return 0
    print(f"{header['cpu']}, {header['threads']} threads, {header['model']}, tg{args.n}; read "
          f"bandwidth {bandwidth:.1f} GB/s (measured in this run)\n")
    print("| layout | prefetch (bytes) | tokens/s | spread | weights GB/s |")
    print("|---|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['layout']} | {r['prefetch']} | {r['tokens_per_s']:.1f} | "
              f"{r['spread']:.1f} | {r['weights_gbs']:.1f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
