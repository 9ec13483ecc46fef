"""Quantized matmul kernels on weights that stream from memory, as a decode step reads them.

A decode step reads every weight matrix once; by the time it comes back to a matrix, the
others have pushed it out of every cache. A benchmark that repeats one matrix measures it in
L2 instead, and hides how the kernel copes with memory latency. This one rotates over enough
distinct copies of the matrix (by default 8x the last-level cache, at least 256 MiB) that
every call reads from DRAM, and reports GB/s of weight bytes next to the machine's read
bandwidth, measured in the same run by a plain streaming read (bench.read_bandwidth_gbs).
The "hot" column repeats one matrix, for contrast.

    .venv/bin/python benchmarks/kernels.py                       # all formats, M = 1 and 4
    .venv/bin/python benchmarks/kernels.py --formats Q4_1 --prefetch 0,1024,2048,4096,8192
    .venv/bin/python benchmarks/kernels.py --json

The weights are random bytes with valid float16 scales: the kernels do the same work whatever
the values.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from mistral7b.bench import cpu_name, read_bandwidth_gbs
from mistral7b.quant import kernels
from mistral7b.quant.formats import FORMATS
from mistral7b.quant.repack import BASE, repack

# Byte offsets of the float16 scales in each block (set to a sane value; the rest is random).
SCALE_OFFSETS = {"Q8_0": (0,), "Q4_0": (0,), "Q4_1": (0, 2), "Q4_K": (0, 2), "Q5_K": (0, 2),
                 "Q6_K": (208,)}


def last_level_cache_bytes() -> int:
    sizes = []
    for index in Path("/sys/devices/system/cpu/cpu0/cache").glob("index*"):
        try:
            text = (index / "size").read_text().strip()
        except OSError:
            continue
        unit = {"K": 2**10, "M": 2**20, "G": 2**30}.get(text[-1], 1)
        sizes.append(int(text.rstrip("KMG")) * unit)
    return max(sizes, default=32 * 2**20)


def random_matrix(fmt: str, n: int, k: int, seed: int = 0) -> torch.Tensor:
    if fmt in BASE:                          # repacked 8 rows at a time, as load() does
        return repack(random_matrix(BASE[fmt], n, k, seed), BASE[fmt])
    spec = FORMATS[fmt]
    g = torch.Generator().manual_seed(seed)
    raw = torch.randint(0, 256, (n, spec.row_bytes(k)), dtype=torch.uint8, generator=g)
    scale = torch.tensor([0.01], dtype=torch.float16).view(torch.uint8)
    if fmt in ("F16", "BF16"):
        dtype = torch.float16 if fmt == "F16" else torch.bfloat16
        return torch.randn(n, k, generator=g).to(dtype).view(torch.uint8).reshape(n, -1)
    blocks = raw.view(-1, spec.block_bytes)
    for offset in SCALE_OFFSETS[fmt]:
        blocks[:, offset:offset + 2] = scale
    return raw


def stream_gbs(fmt: str, copies: list[torch.Tensor], x: torch.Tensor, passes: int) -> float:
    """Weight GB/s of M = x.shape[0] matmuls rotating over `copies` (median of passes)."""
    for w in copies:                      # warm-up: page faults, thread pool
        kernels.linear(x, w, fmt)
    rates = []
    for _ in range(passes):
        start = time.perf_counter()
        for w in copies:
            kernels.linear(x, w, fmt)
        rates.append(sum(w.numel() for w in copies) / (time.perf_counter() - start))
    return statistics.median(rates) / 1e9


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--formats", default=",".join(FORMATS))
    parser.add_argument("--shape", default="4096,4096", help="N,K of each matrix (default: "
                        "Mistral 7B's wq, 4096x4096)")
    parser.add_argument("--rows", default="1,4", help="activation rows M (default: 1,4)")
    parser.add_argument("--prefetch", default=None,
                        help="prefetch distances in bytes to compare (default: the built-in)")
    parser.add_argument("--total-mib", type=int, default=None,
                        help="bytes of distinct weights to rotate over (default: max(256 MiB, "
                             "8x the last-level cache))")
    parser.add_argument("--passes", type=int, default=5)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()

    torch.set_num_threads(args.threads)
    ext = kernels.extension()
    if ext is None:
        print("the C++ kernels are not available here", file=sys.stderr)
        return 1
    n, k = (int(v) for v in args.shape.split(","))
    llc = last_level_cache_bytes()
    total = (args.total_mib * 2**20) if args.total_mib else max(256 * 2**20, 8 * llc)
    default_distance = ext.prefetch_bytes()
    distances = ([int(v) for v in args.prefetch.split(",")] if args.prefetch
                 else [default_distance])
    bandwidth = read_bandwidth_gbs(total, repeats=5) or float("nan")
    rows = []
    for fmt in args.formats.split(","):
        one = random_matrix(fmt, n, k)
        copies = [one.clone() for _ in range(max(2, -(-total // one.numel())))]
        for m in (int(v) for v in args.rows.split(",")):
            x = torch.randn(m, k)
            hot = stream_gbs(fmt, [one] * len(copies), x, args.passes)
            for distance in distances:
                ext.set_prefetch_bytes(distance)
                cold = stream_gbs(fmt, copies, x, args.passes)
                rows.append({"format": fmt, "rows": m, "prefetch": distance,
                             "cold_gbs": round(cold, 2), "hot_gbs": round(hot, 2),
                             "of_read_bw": round(cold / bandwidth, 3)})
                if not args.json:
                    print(f"{fmt} M={m} prefetch={distance}: {cold:.2f} GB/s "
                          f"({cold / bandwidth:.0%} of read bandwidth), hot {hot:.2f}",
                          file=sys.stderr, flush=True)
        del copies
    ext.set_prefetch_bytes(default_distance)
    header = {"cpu": cpu_name(), "threads": args.threads, "shape": [n, k],
              "weights_mib": total // 2**20, "last_level_cache_mib": llc // 2**20,
              "read_bandwidth_gbs": round(bandwidth, 2), "date": time.strftime("%Y-%m-%d"),
              "torch": torch.__version__, "cores": os.cpu_count()}
    if args.json:
        print(json.dumps({**header, "results": rows}, indent=2))
        return 0
    print(f"{header['cpu']}, {args.threads} threads; {n}x{k} matrices rotating over "
          f"{header['weights_mib']} MiB (last-level cache {header['last_level_cache_mib']} MiB); "
          f"read bandwidth {bandwidth:.2f} GB/s\n")
    print("| format | M | prefetch (bytes) | GB/s from memory | of read bandwidth | GB/s hot |")
    print("|---|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['format']} | {r['rows']} | {r['prefetch']} | {r['cold_gbs']:.2f} | "
              f"{r['of_read_bw']:.0%} | {r['hot_gbs']:.2f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
