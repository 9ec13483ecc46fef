"""The pre-fill matmul (csrc/prefill.cpp) against what it replaced and what it borders.

    .venv/bin/python benchmarks/prefill_matmul.py                  # the default model's layers
    .venv/bin/python benchmarks/prefill_matmul.py --rows 8,16,24,48,128 --repeats 7
    .venv/bin/python benchmarks/prefill_matmul.py --mistral-7b     # 7B-shaped Q4_0x8 matrices
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

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from mistral7b.bench import cpu_name
from mistral7b.quant import kernels
from mistral7b.quant.formats import FORMATS
from mistral7b.quant.modules import QuantLinear

Matrix = tuple[torch.Tensor, int, int]     # packed weight, ggml type, in features


def default_model_matrices() -> list[Matrix]:
    import mistral7b

    model = mistral7b.load(progress=False).model
    return [(m.weight, FORMATS[m.fmt].ggml_type, m.in_features) for m in model.modules()
            if isinstance(m, QuantLinear)]


def mistral_7b_matrices() -> list[Matrix]:
    """One random Q4_0 matrix of each of Mistral 7B's layer shapes (wqkv, wo, w13, w2),
    repacked eight rows at a time as loading does (Q4_0x8)."""
    from mistral7b.quant.formats import repack

    rng = np.random.default_rng(0)
    spec = FORMATS["Q4_0"]
    out = []
    for n, k in [(6144, 4096), (4096, 4096), (28672, 4096), (4096, 14336)]:
        raw = rng.integers(0, 256, (n, spec.row_bytes(k)), dtype=np.uint8)
        blocks = raw.reshape(n, -1, spec.block_bytes)
        blocks[:, :, 0:2] = np.array([1e-3], np.float16).view(np.uint8)     # sane scales
        out.append((repack(torch.from_numpy(raw), "Q4_0"), FORMATS["Q4_0x8"].ggml_type, k))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", default="8,12,16,24,32,48,64,128")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--mistral-7b", action="store_true", help="7B shapes, random Q4_0")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    ext = kernels.extension()
    if ext is None:
        sys.exit("the C++ kernels are not available on this machine")
    matrices = mistral_7b_matrices() if args.mistral_7b else default_model_matrices()
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
    header = {"cpu": cpu_name(), "threads": torch.get_num_threads(),
              "matrices": "Mistral 7B shapes, Q4_0x8" if args.mistral_7b else "default model",
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
