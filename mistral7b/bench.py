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
import platform
import resource
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from functools import partial
from pathlib import Path

import torch

from mistral7b.batch_sampling import greedy_ids
from mistral7b.cache import RollingCache
from mistral7b.generate import decode_step, default_chunk_size, prefill
from mistral7b.llm import LLM
from mistral7b.quant import kernels
from mistral7b.static_decode import StaticDecoder
from mistral7b.tensor_parallel import world_of


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
    cache = RollingCache(llm.config, rows=batch, dtype=llm.cache_dtype, device=llm.device)
    if depth:
        prefill(llm.model, cache, list(range(batch)), _random_prompts(llm, batch, depth, 1),
                default_chunk_size(llm.config))
    return cache


def time_prefill(llm: LLM, n: int, depth: int, chunk_size: int | None = None) -> float:
    cache = _fresh_cache(llm, 1, depth)
    prompt = _random_prompts(llm, 1, n, 2)
    start = time.perf_counter()
    prefill(llm.model, cache, [0], prompt, chunk_size or default_chunk_size(llm.config))
    return n / (time.perf_counter() - start)


def time_decode(llm: LLM, n: int, depth: int, batch: int) -> float:
    """Decode tok/s of `batch` rows, with the step the engine runs: on a GPU the fixed-shape
    one replayed as CUDA graphs (captured before the clock starts), else the plain step."""
    static = llm.device.type == "cuda"
    # A static decoder pads its batches with a spare last row.
    cache = _fresh_cache(llm, batch + int(static), max(depth, 1))
    rows = list(range(batch))
    tokens = [t[0] for t in _random_prompts(llm, batch, 1, 3)]
    if static:
        decoder = StaticDecoder(llm.model, cache, compile=llm.compile)
        step: Callable[[list[int]], torch.Tensor] = partial(decoder.step, rows)
        tokens = greedy_ids(step(tokens)).tolist()            # captures the graph
    else:
        step = partial(decode_step, llm.model, cache, rows)
    start = time.perf_counter()
    for _ in range(n):
        tokens = greedy_ids(step(tokens)).tolist()
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


def weight_bytes_per_token(llm: LLM) -> int:
    """Bytes of weights one decode step reads: everything but the embedding table, of which a
    step reads one row per token (a tied table is read whole, as the output head)."""
    model = llm.model
    total = sum(t.nbytes for t in [*model.parameters(), *model.buffers()])
    embedding = model.tok_embeddings
    table = next(iter([*embedding.parameters(), *embedding.buffers()]), None)
    return total if llm.config.tie_embeddings or table is None else total - table.nbytes


def read_bandwidth_gbs(nbytes: int = 256 * 2**20, repeats: int = 3) -> float | None:
    """The machine's read bandwidth with the current threads (best of `repeats` streaming reads
    of a buffer larger than the caches); None without the C++ kernels."""
    ext = kernels.extension()
    if ext is None:
        return None
    buf = torch.ones(nbytes, dtype=torch.uint8)
    ext.stream_read(buf)
    best = 0.0
    for _ in range(repeats):
        start = time.perf_counter()
        ext.stream_read(buf)
        best = max(best, nbytes / (time.perf_counter() - start))
    return best / 1e9


def report(llm: LLM, results: list[BenchResult], load_s: float, as_json: bool) -> str:
    weights = sum(t.nbytes for t in [*llm.model.parameters(), *llm.model.buffers()])
    per_token = weight_bytes_per_token(llm)
    bandwidth = read_bandwidth_gbs() if llm.device.type == "cpu" else None
    world = world_of(llm.model)
    header = {
        "model": llm.path.name if llm.path else "?",
        "weights_mib": round(weights / 2**20, 1),
        "params_m": round(llm.config.num_parameters() / 1e6, 1),
        "load_s": round(load_s, 2),
        "peak_rss_mib": round(peak_rss_mib(), 1),
        "cpu": cpu_name(),
        "read_bandwidth_gbs": None if bandwidth is None else round(bandwidth, 2),
        "world_size": world,        # ranks under torchrun; the weights are rank 0's
    }

    def weights_gbs(r: BenchResult) -> float | None:   # decode reads the weights once a step
        return per_token * r.tokens_per_s / r.batch / 1e9 if r.test.startswith("tg") else None

    if as_json:
        rows = [{**asdict(r), "weights_gbs": weights_gbs(r)} for r in results]
        return json.dumps({**header, "results": rows}, indent=2)
    lines = [f"model {header['model']}: {header['params_m']} M parameters, "
             f"{header['weights_mib']} MiB of weights in memory, loaded in {load_s:.2f} s, "
             f"peak RSS {header['peak_rss_mib']} MiB",
             f"cpu {header['cpu']}" + (f", read bandwidth {bandwidth:.1f} GB/s (measured now)"
                                      if bandwidth else ""),
             *([f"tensor parallel over {world} ranks (torchrun): the weights above are rank "
                "0's share"] if world > 1 else []), "",
             "| test | depth | batch | threads | tokens/s | spread | weights GB/s |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    for r in results:
        gbs = weights_gbs(r)
        share = f" ({gbs / bandwidth:.0%})" if gbs is not None and bandwidth else ""
        lines.append(f"| {r.test} | {r.depth} | {r.batch} | {r.threads} | "
                     f"{r.tokens_per_s:.1f} | {r.spread:.1f} | "
                     f"{'' if gbs is None else f'{gbs:.1f}'}{share} |")
    return "\n".join(lines)


def cpu_name() -> str:
    """The CPU's model string (/proc/cpuinfo), for every benchmark table."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


# ---- the paper's long-context claims ----------------------------------------------------------

LONG_CONTEXTS = (1024, 2048, 4096, 8192, 16384, 32768)


@dataclass
class LongContextRow:
    context: int
    cache_mib_window: float
    cache_mib_full: float
    tokens_per_s_window: float
    tokens_per_s_full: float
    mistral_7b_fp16_cache_mib_window: float   # the same arithmetic at Mistral 7B's size
    mistral_7b_fp16_cache_mib_full: float


def long_context_model(window: int | None, max_seq_len: int, n_layers: int = 4,
                       seed: int = 0) -> LLM:
    """Random weights with Mistral 7B's attention geometry (32 query heads, 8 kv heads of 128,
    W = 4096) and a narrow residual stream (dim 1024), so that attention dominates the cost."""
    from mistral7b.config import ModelConfig
    from mistral7b.model import Transformer
    from mistral7b.tokenizer import MissingTokenizer

    torch.manual_seed(seed)
    config = ModelConfig(dim=1024, n_layers=n_layers, n_heads=32, n_kv_heads=8, head_dim=128,
                         hidden_dim=2048, vocab_size=1024, sliding_window=window,
                         max_seq_len=max_seq_len, source="random (bench --long)")
    model = Transformer(config).eval().requires_grad_(False)
    assert isinstance(model.tok_embeddings, torch.nn.Embedding)
    torch.nn.init.normal_(model.tok_embeddings.weight)
    return LLM(model, MissingTokenizer(Path("."), config.vocab_size), torch.float32)


def time_decode_at(llm: LLM, context: int, n: int) -> tuple[float, int]:
    """Decode tokens/s for one sequence whose cache already holds `context` positions, and the
    cache's bytes."""
    # Start from one slot so that after skip_to the buffer holds exactly the positions needed.
    cache = RollingCache(llm.config, rows=1, dtype=llm.cache_dtype, device=llm.device,
                         initial_slots=1)
    cache.skip_to(0, context)
    nbytes = cache.nbytes  # before decoding past `context` doubles a growing buffer
    token = [1]
    decode_step(llm.model, cache, [0], token)  # warm-up
    start = time.perf_counter()
    for _ in range(n):
        decode_step(llm.model, cache, [0], token)
    return n / (time.perf_counter() - start), nbytes


def run_long(contexts: Sequence[int] = LONG_CONTEXTS, n: int = 16, window: int = 4096,
             progress: Callable[[str], None] | None = None) -> list[LongContextRow]:
    from mistral7b.config import ModelConfig

    longest = max(contexts) + n + 1
    windowed, full = long_context_model(window, longest), long_context_model(None, longest)
    mistral = ModelConfig.from_params({"dim": 4096, "n_layers": 32, "head_dim": 128,
                                       "hidden_dim": 14336, "n_heads": 32, "n_kv_heads": 8,
                                       "norm_eps": 1e-5, "vocab_size": 32000})
    per_token_7b = mistral.kv_bytes_per_token(2) / 2**20
    rows = []
    for context in contexts:
        speed_w, bytes_w = time_decode_at(windowed, context, n)
        speed_f, bytes_f = time_decode_at(full, context, n)
        rows.append(LongContextRow(context, bytes_w / 2**20, bytes_f / 2**20, speed_w, speed_f,
                                   per_token_7b * min(context, window), per_token_7b * context))
        if progress:
            progress(f"context {context}: {speed_w:.1f} vs {speed_f:.1f} tokens/s")
    return rows


def long_report(rows: Sequence[LongContextRow], window: int = 4096) -> str:
    lines = [f"Decode at a given context, sliding window W = {window} vs full attention "
             "(random weights, Mistral 7B attention geometry, 4 layers, fp32):", "",
             "| context | cache MiB, W | cache MiB, full | memory saving | tokens/s, W | "
             "tokens/s, full | speed-up | Mistral 7B fp16 cache, W / full (MiB) |",
             "|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(
            f"| {r.context} | {r.cache_mib_window:.0f} | {r.cache_mib_full:.0f} | "
            f"{r.cache_mib_full / r.cache_mib_window:.1f}x | {r.tokens_per_s_window:.1f} | "
            f"{r.tokens_per_s_full:.1f} | {r.tokens_per_s_window / r.tokens_per_s_full:.2f}x | "
            f"{r.mistral_7b_fp16_cache_mib_window:.0f} / {r.mistral_7b_fp16_cache_mib_full:.0f} |")
    return "\n".join(lines)


def long_plot(rows: Sequence[LongContextRow], path: Path, window: int = 4096) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    contexts = [r.context for r in rows]
    fig, (mem, speed) = plt.subplots(1, 2, figsize=(11, 4.2))
    mem.plot(contexts, [r.cache_mib_full for r in rows], "o-", label="full attention")
    mem.plot(contexts, [r.cache_mib_window for r in rows], "o-", label=f"rolling cache, W={window}")
    mem.set(xscale="log", yscale="log", xlabel="context (tokens)", ylabel="KV cache (MiB)",
            title="KV cache per sequence")
    speed.plot(contexts, [r.tokens_per_s_full for r in rows], "o-", label="full attention")
    speed.plot(contexts, [r.tokens_per_s_window for r in rows], "o-",
               label=f"sliding window, W={window}")
    speed.set(xscale="log", xlabel="context (tokens)", ylabel="decode tokens/s",
              title="Decode speed (4 layers, Mistral attention shapes)")
    for ax in (mem, speed):
        ax.grid(True, which="both", alpha=0.3)
        ax.legend()
        ax.set_xticks(contexts, [f"{c // 1024}K" for c in contexts])
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
