"""The pre-fill matmul (csrc/prefill.cpp) against what it replaced and what it borders.

    .venv/bin/python benchmarks/prefill_matmul.py                  # the default model's layers
    .venv/bin/python benchmarks/prefill_matmul.py --rows 8,16,24,48,128 --repeats 7
    .venv/bin/python benchmarks/prefill_matmul.py --mistral-7b     # 7B-shaped Q4_0x8 matrices
    .venv/bin/python benchmarks/prefill_matmul.py --mistral-7b --format Q6_K --rows 16,64,128
    .venv/bin/python benchmarks/prefill_matmul.py --json

For each row count M it times, interleaved, three ways of computing the model's matmuls for M
rows of activations: the integer kernel (what decode uses), the pre-fill kernel, and the old
pre-fill path (dequantize the whole matrix to float32, then torch's BLAS matmul). Medians in ms
for all the layer matrices of the default model (or one of each 7B shape), and GFLOP/s.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from mistral7b.bench import cpu_name
from mistral7b.quant import kernels
from mistral7b.quant.formats import FORMATS
from mistral7b.quant.modules import QuantLinear

sys.path.insert(0, str(Path(__file__).resolve().parent))
from kernels import random_matrix  # benchmarks/kernels.py

Matrix = tuple[torch.Tensor, int, int]     # packed weight, ggml type, in features


def default_model_matrices() -> list[Matrix]:
    import mistral7b

    model = mistral7b.load(progress=False).model
    return [(m.weight, FORMATS[m.fmt].ggml_type, m.in_features) for m in model.modules()
            if isinstance(m, QuantLinear)]


def mistral_7b_matrices(fmt: str) -> list[Matrix]:
    """One random matrix of each of Mistral 7B's layer shapes (wqkv, wo, w13, w2) in `fmt`, a
    GGUF format, repacked eight rows at a time as loading does where it has an x8 layout."""
    packed = fmt + "x8" if fmt + "x8" in FORMATS else fmt
    return [(random_matrix(packed, n, k), FORMATS[packed].ggml_type, k)
            for n, k in [(6144, 4096), (4096, 4096), (28672, 4096), (4096, 14336)]]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", default="8,12,16,24,32,48,64,128")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--mistral-7b", action="store_true", help="7B shapes, random weights")
    parser.add_argument("--format", default="Q4_0",
                        help="GGUF format of the --mistral-7b matrices (default: Q4_0)")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    ext = kernels.extension()
    if ext is None:
        sys.exit("the C++ kernels are not available on this machine")
    matrices = mistral_7b_matrices(args.format) if args.mistral_7b else default_model_matrices()
    ways: dict[str, Callable[[torch.Tensor, torch.Tensor, int], torch.Tensor]] = {
        "integer": ext.qmatmul,
        "prefill": ext.prefill_matmul,
        "dequantize + BLAS": lambda x, raw, ggml: F.linear(x, ext.dequantize(raw, ggml)),
    }
    results = []
    for m in map(int, args.rows.split(",")):
        inputs = [(torch.randn(m, k), raw, ggml) for raw, ggml, k in matrices]
        flops = sum(2 * x.shape[0] * x.shape[1] * raw.shape[0] for x, raw, _ in inputs)
        times: dict[str, list[float]] = {name: [] for name in ways}
        for _ in range(args.repeats):
            for name, way in ways.items():
                start = time.perf_counter()
                for x, raw, ggml in inputs:
                    way(x, raw, ggml)
                times[name].append(time.perf_counter() - start)
        row: dict[str, float] = {"rows": m}
        for name, runs in times.items():
            row[f"{name} ms"] = round(1e3 * statistics.median(runs), 1)
            row[f"{name} GFLOP/s"] = round(flops / statistics.median(runs) / 1e9, 1)
        results.append(row)
    matrix_names = f"Mistral 7B shapes, {args.format}" if args.mistral_7b else "default model"
    header = {"cpu": cpu_name(), "threads": torch.get_num_threads(), "matrices": matrix_names,
              "count": len(matrices)}
    if args.json:
        print(json.dumps({**header, "results": results}, indent=2))
        return
    print(f"{header['cpu']}, {header['threads']} threads, {header['count']} matrices "
          f"({header['matrices']}); median of {args.repeats}, ms (GFLOP/s)\n")
    print("| rows | " + " | ".join(ways) + " |")
    print("|---:|" + "---:|" * len(ways))
    for row in results:
        cells = [f"{row[f'{n} ms']} ({row[f'{n} GFLOP/s']})" for n in ways]
        print(f"| {row['rows']} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
