"""Batch-1 decode's matmuls on a GPU, read from memory: cuBLAS against a plain Triton GEMV.

    PYTHONPATH=. python3 benchmarks/gpu_gemv.py --out gemv.json
    TRITON_INTERPRET=1 python benchmarks/gpu_gemv.py --dry-run    # tiny shapes on the CPU

A batch-1 decode step of Mistral 7B is five matrix-vector products per layer family (fused
qkv, wo, fused w1/w3, w2, the head) that together read the 14.5 GB of bf16 weights; on an H100
cuBLAS's kernels for them ran at ~91% of the device's copy bandwidth (BENCHMARKS.md, issue 13).
This script asks whether the model's own Triton GEMV reads faster, and at which blocking:

- each shape's weights are several copies that together are far larger than the L2 cache, and
  every timed call reads the next copy, as a decode step reads each matrix once;
- cuBLAS through `F.linear` (what the plain layers run);
- gpu_kernels.gemv (each program reduces BLOCK_N rows over K in BLOCK_K slices) at a sweep of
  (BLOCK_N, BLOCK_K, warps), reporting the best per shape and gpu_decode.gemv_config's choice;
- GB/s of weights read, against the device's copy bandwidth measured in the same run, and the
  largest difference of each kernel from a float32 product (bf16 output rounding only).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
import triton

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from mistral7b import gpu_kernels
from mistral7b.gpu_decode import gemv_config

sys.path.insert(0, str(Path(__file__).resolve().parent))
from gpu import copy_bandwidth, sync

SHAPES_7B = {"wqkv": (6144, 4096), "wo": (4096, 4096), "w13": (28672, 4096),
             "w2": (4096, 14336), "head": (32000, 4096)}
SHAPES_TINY = {"wqkv": (96, 64), "w2": (64, 160), "head": (100, 64)}
CONFIGS = [(bn, bk, w) for bn in (2, 4, 8, 16) for bk in (256, 512, 1024) for w in (4, 8)]
CONFIGS_TINY = [(4, 32, 4), (2, 64, 4)]


def triton_gemv(x: torch.Tensor, w: torch.Tensor, y: torch.Tensor, block_n: int, block_k: int,
                warps: int) -> None:
    N, K = w.shape
    gpu_kernels._gemv_kernel[(triton.cdiv(N, block_n),)](x, w, y, N, K, BLOCK_N=block_n,
                                                         BLOCK_K=block_k, num_warps=warps)


def time_reads(run: Callable[[int], object], copies: int, rounds: int,
               device: torch.device) -> float:
    """Seconds per call, each call on the next copy of the weights (median of `rounds` passes
    over all the copies, after one warm-up pass). On a GPU one pass is a CUDA graph, as in a
    decode step, so launch overhead does not hide the small matrices' kernels."""
    for i in range(copies):
        run(i)
    replay: Callable[[], None]
    if device.type == "cuda":
        sync(device)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            for i in range(copies):
                run(i)
        replay = graph.replay
        replay()
    else:
        def replay() -> None:
            for i in range(copies):
                run(i)
    times = []
    for _ in range(rounds):
        sync(device)
        start = time.perf_counter()
        replay()
        sync(device)
        times.append((time.perf_counter() - start) / copies)
    return sorted(times)[len(times) // 2]


def measure_shape(name: str, N: int, K: int, device: torch.device, dtype: torch.dtype,
                  footprint: int, configs: list[tuple[int, int, int]]) -> dict[str, Any]:
    nbytes = N * K * dtype.itemsize
    copies = max(2, math.ceil(footprint / nbytes))
    g = torch.Generator(device="cpu").manual_seed(0)
    w0 = (torch.randn(N, K, generator=g) / math.sqrt(K)).to(dtype)
    ws = [w0.to(device) for _ in range(copies)]
    x = torch.randn(1, K, generator=g).to(dtype).to(device)
    exact = (x.float().cpu() @ w0.float().T)[0]
    y = torch.empty(N, dtype=dtype, device=device)
    rounds = 3 if device.type == "cpu" else 10

    def gbs(seconds: float) -> float:
        return round(nbytes / seconds / 1e9, 1)

    out: dict[str, Any] = {"N": N, "K": K, "mb": round(nbytes / 1e6, 1), "copies": copies}
    cublas = time_reads(lambda i: F.linear(x, ws[i]), copies, rounds, device)
    out["cublas_linear_gbs"] = gbs(cublas)
    out["cublas_linear_us"] = round(cublas * 1e6, 1)
    out["cublas_linear_err"] = float((F.linear(x, ws[0])[0].float().cpu() - exact).abs().max())
    best: tuple[float, tuple[int, int, int]] | None = None
    sweep: dict[str, float | str] = {}
    for cfg in configs:
        def run(i: int, c: tuple[int, int, int] = cfg) -> None:
            triton_gemv(x, ws[i], y, *c)
        try:
            t = time_reads(run, copies, rounds, device)
        except Exception as e:  # a config Triton cannot compile (e.g. too many registers)
            sweep["x".join(map(str, cfg))] = f"failed: {type(e).__name__}"
            continue
        sweep["x".join(map(str, cfg))] = gbs(t)
        if best is None or t < best[0]:
            best = (t, cfg)
    out["triton_sweep_gbs"] = sweep
    default = gemv_config(N, K)
    out["triton_default_config"] = "x".join(map(str, default))
    out["triton_default_gbs"] = sweep.get(out["triton_default_config"])
    if best is not None:
        triton_gemv(x, ws[0], y, *best[1])
        out["triton_best_gbs"] = gbs(best[0])
        out["triton_best_us"] = round(best[0] * 1e6, 1)
        out["triton_best_config"] = "x".join(map(str, best[1]))
        out["triton_err"] = float((y.float().cpu() - exact).abs().max())
    print(f"{name:>5} {N}x{K}: cuBLAS {out['cublas_linear_gbs']} GB/s, Triton default "
          f"{out['triton_default_gbs']}, best {out.get('triton_best_gbs')} "
          f"({out.get('triton_best_config')})", file=sys.stderr, flush=True)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("gemv.json"))
    parser.add_argument("--footprint-gb", type=float, default=1.0,
                        help="weight bytes each shape's copies add up to (far above the L2)")
    parser.add_argument("--dry-run", action="store_true",
                        help="tiny shapes on the CPU (with TRITON_INTERPRET=1)")
    args = parser.parse_args()
    dry = args.dry_run or not torch.cuda.is_available()
    device = torch.device("cpu" if dry else "cuda")
    dtype = torch.bfloat16
    results: dict[str, Any] = {
        "date": time.strftime("%Y-%m-%d"), "torch": torch.__version__,
        "triton": triton.__version__,
        "device": torch.cuda.get_device_name(device) if not dry else "cpu (dry run)",
        "copy_bandwidth_gbs": round(copy_bandwidth(device, 2**24 if dry else 2**31), 1)}
    shapes = SHAPES_TINY if dry else SHAPES_7B
    footprint = 2**20 if dry else int(args.footprint_gb * 1e9)
    total_bytes = total_cublas = total_triton = 0.0
    for name, (N, K) in shapes.items():
        r = results[name] = measure_shape(name, N, K, device, dtype, footprint,
                                          CONFIGS_TINY if dry else CONFIGS)
        layers = 1 if name == "head" else 32
        total_bytes += layers * N * K * dtype.itemsize
        total_cublas += layers * r["cublas_linear_us"]
        total_triton += layers * r.get("triton_best_us", r["cublas_linear_us"])
        args.out.write_text(json.dumps(results, indent=2))
    results["step_matmuls_ms"] = {"cublas": round(total_cublas / 1e3, 3),
                                  "triton_best_per_shape": round(total_triton / 1e3, 3),
                                  "weights_gb": round(total_bytes / 1e9, 2)}
    args.out.write_text(json.dumps(results, indent=2))
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
