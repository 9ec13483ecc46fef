"""`mistral7b bench`: prefill and decode speed in the spirit of llama-bench.

pp N  pre-fill N prompt tokens into an empty cache (or one already holding `depth` tokens).
tg N  generate N tokens, one decode step at a time, for `batch` sequences at once (aggregate
      tokens/s), after `depth` tokens of context.
Timings cover the model only (no sampling, no detokenizing), like llama-bench; token ids are
random. Each test runs `repetitions` times after one warm-up; we report the median and the
spread (max - min).
"""

from __future__ import annotations

import json
import resource
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from functools import partial

import torch

from mistral7b.cache import RollingCache
from mistral7b.generate import decode_step, prefill
from mistral7b.llm import LLM


@dataclass
class BenchResult:
    test: str               # "pp128", "tg128"
    depth: int
    batch: int
    threads: int
    tokens_per_s: float     # median over repetitions (aggregate over the batch for tg)
    spread: float           # max - min over repetitions
    runs: list[float]


def _random_prompts(llm: LLM, batch: int, length: int, seed: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, llm.config.vocab_size, (batch, length), generator=g).tolist()


def _fresh_cache(llm: LLM, batch: int, depth: int) -> RollingCache:
    cache = RollingCache(llm.config, rows=batch, dtype=llm.dtype, device=llm.device)
    if depth:
        prefill(llm.model, cache, list(range(batch)), _random_prompts(llm, batch, depth, 1),
                llm.config.sliding_window or 4096)
    return cache


def time_prefill(llm: LLM, n: int, depth: int, chunk_size: int | None = None) -> float:
    cache = _fresh_cache(llm, 1, depth)
    prompt = _random_prompts(llm, 1, n, 2)
    start = time.perf_counter()
    prefill(llm.model, cache, [0], prompt, chunk_size or llm.config.sliding_window or 4096)
    return n / (time.perf_counter() - start)


def time_decode(llm: LLM, n: int, depth: int, batch: int) -> float:
    cache = _fresh_cache(llm, batch, max(depth, 1))
    rows = list(range(batch))
    tokens = [t[0] for t in _random_prompts(llm, batch, 1, 3)]
    start = time.perf_counter()
    for _ in range(n):
        logits = decode_step(llm.model, cache, rows, tokens)
        tokens = logits.argmax(-1).tolist()
    return batch * n / (time.perf_counter() - start)


def run(llm: LLM, prompt_sizes: Sequence[int], gen_sizes: Sequence[int],
        depths: Sequence[int], batches: Sequence[int], threads: Sequence[int],
        repetitions: int) -> list[BenchResult]:
    results = []
    for n_threads in threads:
        torch.set_num_threads(n_threads)
        for depth in depths:
            for n in prompt_sizes:
                runs = _repeat(partial(time_prefill, llm, n, depth), repetitions)
                results.append(_result(f"pp{n}", depth, 1, n_threads, runs))
            for n in gen_sizes:
                for batch in batches:
                    runs = _repeat(partial(time_decode, llm, n, depth, batch), repetitions)
                    results.append(_result(f"tg{n}", depth, batch, n_threads, runs))
    return results


def _repeat(fn: Callable[[], float], repetitions: int) -> list[float]:
    fn()  # warm-up (kernels built, caches allocated)
    return [fn() for _ in range(repetitions)]


def _result(test: str, depth: int, batch: int, threads: int, runs: list[float]) -> BenchResult:
    return BenchResult(test, depth, batch, threads, statistics.median(runs),
                       max(runs) - min(runs), runs)


def peak_rss_mib() -> float:
    # ru_maxrss is KiB on Linux, bytes on macOS.
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / (2**20 if sys.platform == "darwin" else 1024)


def report(llm: LLM, results: list[BenchResult], load_s: float, as_json: bool) -> str:
    weights = sum(t.nbytes for t in [*llm.model.parameters(), *llm.model.buffers()])
    header = {
        "model": llm.path.name if llm.path else "?",
        "weights_mib": round(weights / 2**20, 1),
        "params_m": round(llm.config.num_parameters() / 1e6, 1),
        "load_s": round(load_s, 2),
        "peak_rss_mib": round(peak_rss_mib(), 1),
    }
    if as_json:
        return json.dumps({**header, "results": [asdict(r) for r in results]}, indent=2)
    lines = [f"model {header['model']}: {header['params_m']} M parameters, "
             f"{header['weights_mib']} MiB of weights in memory, loaded in {load_s:.2f} s, "
             f"peak RSS {header['peak_rss_mib']} MiB", "",
             "| test | depth | batch | threads | tokens/s | spread |",
             "|---|---:|---:|---:|---:|---:|"]
    for r in results:
        lines.append(f"| {r.test} | {r.depth} | {r.batch} | {r.threads} | "
                     f"{r.tokens_per_s:.1f} | {r.spread:.1f} |")
    return "\n".join(lines)
