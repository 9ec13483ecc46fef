"""mistral7b against transformers on one GPU, on Mistral 7B's exact shapes in bfloat16.

    python benchmarks/gpu.py [--model HF_DIR] [--out gpu.json] [--compile]
    python benchmarks/gpu.py --dry-run          # tiny shapes on the CPU: checks the script

Without --model it writes a checkpoint of Mistral 7B's shapes with random bf16 weights (14.5 GB)
as a Hugging Face directory, with transformers itself, then measures in one run:

- the device's copy bandwidth, and the decode ceiling it sets (weight bytes / bandwidth);
- transformers (eager, its default cache): batch-1 and 16-stream greedy decode;
- mistral7b: load time and peak memory during the load, pre-fill of one long prompt, and greedy
  decode at 1, 16 and 64 streams through the serving engine (CUDA-graph decode steps), plus
  batch 1 without them (the plain step) for comparison;
- where a decode step's time goes: the graph step alone (no engine) at 1 and 16 rows and at a
  4096-token context, and the eager batch-1 step's kernels by device time (matmuls against the
  rest, kernels per step);
- the decode step's Triton kernels (gpu_decode.py) against the plain layers: the largest logit
  difference over 32 teacher-forced steps in bfloat16, and the same speeds with the plain layers
  (`model.fused_decode = False`), in the same run;
- batch 1 with its projections through cuBLAS instead of the Triton GEMV (`decode_b1_cublas_gemv`,
  `step_breakdown_cublas_gemv`), in the same run;
- decode at 1 and 16 streams with sampling (temperature, top-k, top-p, min-p and the three
  penalties, on the device), against greedy;
- the calls that make the host wait for the device while the engine decodes (there should be
  none but the wait for each step's tokens: the engine queues the next step before it waits);
- ratios, and the % of the ceiling batch-1 decode reaches.

It writes the JSON after every section (a run cut short keeps what it measured) and prints a
table at the end. It needs only torch, transformers and safetensors beside the package, so it
runs on a bare GPU machine with `PYTHONPATH=.`.
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import replace
from functools import partial
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import mistral7b
from mistral7b.bench import time_decode, time_prefill
from mistral7b.cache import RollingCache
from mistral7b.engine import Engine, EngineOutput
from mistral7b.sampling import SamplingParams

MISTRAL_7B = dict(vocab_size=32000, hidden_size=4096, intermediate_size=14336,
                  num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8,
                  sliding_window=4096, max_position_embeddings=32768, rms_norm_eps=1e-5,
                  rope_theta=10000.0)
TINY = dict(vocab_size=1000, hidden_size=256, intermediate_size=512, num_hidden_layers=2,
            num_attention_heads=8, num_key_value_heads=2, sliding_window=64,
            max_position_embeddings=1024, rms_norm_eps=1e-5, rope_theta=10000.0)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def copy_bandwidth(device: torch.device, nbytes: int) -> float:
    """GB/s of a large device-to-device copy, counting the bytes read and written."""
    src = torch.empty(nbytes // 4, dtype=torch.float32, device=device).fill_(1.0)
    dst = torch.empty_like(src)
    times = []
    for _ in range(6):
        sync(device)
        start = time.perf_counter()
        dst.copy_(src)
        sync(device)
        times.append(time.perf_counter() - start)
    del src, dst
    return 2 * nbytes / min(times[1:]) / 1e9


def write_checkpoint(shapes: dict, dtype: torch.dtype, device: torch.device, directory: Path
                     ) -> torch.nn.Module:
    """A MistralForCausalLM of `shapes` with random weights, saved as an HF directory; returns
    the model (on `device`) for the transformers measurements."""
    from transformers import MistralConfig, MistralForCausalLM

    torch.manual_seed(0)
    config = MistralConfig(**shapes, attn_implementation="sdpa")
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)            # build in bf16 directly: no float32 copy
    try:
        with torch.device(device):
            model = MistralForCausalLM(config)
    finally:
        torch.set_default_dtype(previous)
    model = model.to(dtype).eval()
    model.save_pretrained(directory, max_shard_size="5GB")
    return model


def time_transformers(model: torch.nn.Module, device: torch.device, batch: int,
                      prompt_len: int, new: int) -> float:
    """Greedy decode tok/s (aggregate over the batch) of transformers' generate: the time of
    `new` tokens minus the time of one (the pre-fill), per decoded token."""
    ids = torch.randint(3, 1000, (batch, prompt_len), device=device)

    def run(n: int) -> float:
        sync(device)
        start = time.perf_counter()
        with torch.inference_mode():
            model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n,
                           min_new_tokens=n, do_sample=False, pad_token_id=0)
        sync(device)
        return time.perf_counter() - start

    run(4)                                     # warm-up
    one, full = run(1), run(new)
    return batch * (new - 1) / (full - one)


# Sampling as a chat client might ask for it: every rule of the batched device sampler at work.
SAMPLED = dict(temperature=0.8, top_k=50, top_p=0.95, min_p=0.02, repetition_penalty=1.1,
               presence_penalty=0.2, frequency_penalty=0.2)


def request_params(new: int, sampled: bool) -> SamplingParams:
    """`new` tokens per request, ignoring EOS: greedy, or with SAMPLED's parameters."""
    return SamplingParams(max_tokens=new, ignore_eos=True,
                          **(SAMPLED if sampled else {"temperature": 0}))


def kernel_times(prof: Any, device: torch.device, steps: int) -> tuple[dict[str, float], int]:
    """ms per step of each profiled op or kernel with time of its own (device time on a GPU,
    CPU time elsewhere), and the number of such events per step."""
    times: dict[str, float] = {}
    events = 0
    for event in prof.key_averages():
        us = getattr(event, "self_device_time_total", 0.0) or 0.0
        if device.type != "cuda":
            us = event.self_cpu_time_total
        if us > 0 and not event.key.startswith("ProfilerStep"):
            times[event.key] = us / steps / 1000
            events += event.count
    return times, round(events / steps)


def host_waits(fn: Callable[[], Any]) -> dict[str, int]:
    """Where fn() made the host wait for the device (torch's sync debug mode), file:line ->
    count. Waits on events, the engine's one intended wait per step, are not counted."""
    import warnings

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            fn()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    places: dict[str, int] = {}
    for w in caught:
        if "synchroniz" in str(w.message):
            where = f"{Path(w.filename).name}:{w.lineno}"
            places[where] = places.get(where, 0) + 1
    return places


def time_engine(llm: mistral7b.LLM, streams: int, prompt_len: int, new: int,
                static: bool, compile: bool = False, sampled: bool = False) -> dict[str, float]:
    """Generation for `streams` requests at once through the serving engine, greedy or with
    SAMPLED's parameters. decode tok/s counts the tokens produced after every stream has its
    first one, over that time; total tok/s is every generated token over the whole wall time
    (pre-fill included)."""
    engine = Engine(llm.model, llm.tokenizer, max_batch=streams, max_queue=streams,
                    prefill_chunk=prompt_len, dtype=llm.cache_dtype, static_decode=static,
                    compile=compile)
    engine.start()
    params = request_params(new, sampled)
    try:
        engine_round(engine, streams, prompt_len, params)          # warm-up: graphs captured
        return engine_round(engine, streams, prompt_len, params)
    finally:
        engine.stop()


def engine_round(engine: Engine, streams: int, prompt_len: int, params: SamplingParams
                 ) -> dict[str, float]:
    lock = threading.Lock()
    done = threading.Event()
    events: list[tuple[float, str, int]] = []      # (time, request, tokens in the output)
    finished: list[str] = []
    errors: list[str] = []

    def on_output(out: EngineOutput) -> None:
        now = time.perf_counter()
        with lock:
            events.append((now, out.request_id, len(out.piece.token_ids) if out.piece else 0))
            if out.error:
                errors.append(out.error)
            if out.finished:
                finished.append(out.request_id)
                if len(finished) == streams:
                    done.set()

    start = time.perf_counter()
    for _ in range(streams):
        engine.submit(torch.randint(3, 1000, (prompt_len,)).tolist(), params, on_output)
    if not done.wait(timeout=600):
        raise TimeoutError("the engine did not finish in 600 s")
    if errors:
        raise RuntimeError(errors[0])
    end = max(t for t, _, _ in events)
    first: dict[str, float] = {}
    for t, request, _ in events:
        first.setdefault(request, t)
    all_started = max(first.values())
    after = sum(n for t, _, n in events if t > all_started)
    total = sum(n for _, _, n in events)
    return {"decode_tok_s": round(after / (end - all_started), 1) if end > all_started else 0.0,
            "total_tok_s": round(total / (end - start), 1), "tokens": total}


def step_breakdown(llm: mistral7b.LLM, context: int, steps: int = 16) -> dict[str, Any]:
    """Where a batch-1 decode step's time goes: the CUDA-graph step alone in a tight loop (no
    engine, argmax feedback), and the kernels of the same step run eagerly, by total device
    time (torch.profiler), grouped into matmuls and everything else."""
    from torch.profiler import ProfilerActivity, profile

    from mistral7b.static_decode import StaticDecoder

    graph_tok_s = time_decode(llm, 64, context, 1)
    graph_b16_tok_s = time_decode(llm, 32, context, 16)
    graph_long_tok_s = time_decode(llm, 32, 4096, 1)
    cache = RollingCache(llm.config, rows=2, dtype=llm.cache_dtype, device=llm.device)
    decoder = StaticDecoder(llm.model, cache, cuda_graphs=False)    # eager: kernels visible
    decoder.step([0], [1])
    activities = [ProfilerActivity.CPU]
    if llm.device.type == "cuda":
        activities.append(ProfilerActivity.CUDA)
    with profile(activities=activities) as prof:
        for _ in range(steps):
            decoder.step([0], [1])
        sync(llm.device)
    kernels, launches = kernel_times(prof, llm.device, steps)
    top = sorted(kernels.items(), key=lambda kv: -kv[1])[:15]
    matmul = sum(ms for name, ms in kernels.items()
                 if any(w in name.lower() for w in ("gemm", "gemv", "mm", "matmul", "cublas")))
    return {"graph_step_tok_s": round(graph_tok_s, 1),
            "graph_step_ms": round(1000 / graph_tok_s, 3),
            "graph_step_b16_tok_s": round(graph_b16_tok_s, 1),
            "graph_step_b16_ms": round(16000 / graph_b16_tok_s, 3),
            "graph_step_context_4096_tok_s": round(graph_long_tok_s, 1),
            "eager_device_ms_per_step": round(sum(kernels.values()), 3),
            "eager_matmul_ms_per_step": round(matmul, 3),
            "eager_kernels_per_step": launches,
            "top_kernels_ms": {name[:80]: round(ms, 4) for name, ms in top}}


def teacher_forced(llm: mistral7b.LLM, prompt: list[int], steps: int,
                   forced: list[int] | None = None) -> tuple[torch.Tensor, list[int]]:
    """(steps, vocab) float32 logits of graph decode steps after `prompt`, each step fed
    forced[i] (default: the previous step's greedy token); returns the tokens fed too."""
    from mistral7b.generate import prefill
    from mistral7b.static_decode import StaticDecoder

    cache = RollingCache(llm.config, rows=2, dtype=llm.cache_dtype, device=llm.device)
    decoder = StaticDecoder(llm.model, cache)
    token = int(prefill(llm.model, cache, [0], [prompt], len(prompt))[0].argmax())
    fed: list[int] = []
    logits = []
    for i in range(steps):
        fed.append(forced[i] if forced is not None else token)
        logits.append(decoder.step([0], [fed[-1]])[0].float().cpu())
        token = int(logits[-1].argmax())
    return torch.stack(logits), fed


def fused_against_plain(llm: mistral7b.LLM, prompt_len: int, reference: Path | None,
                        steps: int = 32) -> dict[str, Any]:
    """Graph decode steps with the Triton kernels against the plain layers, fed the same tokens
    (the plain run's greedy ones): the largest logit difference, the logits' scale, and how often
    the two pick the same greedy token. With `reference` (the checkpoint), both are also measured
    against the same steps in float32 (plain layers), to tell rounding from a fault."""
    torch.manual_seed(1)
    prompt = torch.randint(3, 1000, (prompt_len,)).tolist()
    plain, forced = plain_layers(llm, lambda: teacher_forced(llm, prompt, steps))
    fused, _ = teacher_forced(llm, prompt, steps, forced)
    same = (plain.argmax(-1) == fused.argmax(-1)).float().mean().item()
    result = {"steps": steps, "max_abs_logit_diff": round((plain - fused).abs().max().item(), 4),
              "mean_abs_logit_diff": round((plain - fused).abs().mean().item(), 5),
              "max_abs_logit": round(plain.abs().max().item(), 2),
              "same_greedy_token": round(same, 3)}
    if reference is not None:
        exact = mistral7b.load(reference, dtype="float32", device=llm.device, progress=False)
        want, _ = teacher_forced(exact, prompt, steps, forced)
        del exact
        gc.collect()
        if llm.device.type == "cuda":
            torch.cuda.empty_cache()
        for name, got in (("plain", plain), ("fused", fused)):
            result[f"{name}_vs_float32_max"] = round((got - want).abs().max().item(), 4)
            result[f"{name}_vs_float32_mean"] = round((got - want).abs().mean().item(), 5)
            result[f"{name}_same_greedy_as_float32"] = round(
                (got.argmax(-1) == want.argmax(-1)).float().mean().item(), 3)
    return result


def sampling_breakdown(device: torch.device, vocab: int = 32000, steps: int = 100
                       ) -> dict[str, Any]:
    """The batched sampler alone (SAMPLED's parameters, random bf16-rounded logits of Mistral's
    vocabulary), before and after each of its two speed-ups (top-k candidates from torch.topk,
    which the sampler takes on the CPU only; parameter columns uploaded once): host ms to queue
    one step, ms per step, host waits inside a step, its top kernels; and whether every variant
    draws the same tokens from the same seeds."""
    from torch.profiler import ProfilerActivity, profile

    import mistral7b.batch_sampling as batch_sampling
    from mistral7b.batch_sampling import BatchSampler

    variants = {"before": (False, False), "topk": (True, False), "cache": (False, True),
                "both": (True, True)}
    result: dict[str, Any] = {}
    drawn: dict[str, list[list[int]]] = {}
    try:
        for name, (topk, cache) in variants.items():
            batch_sampling.TOPK_CANDIDATES, batch_sampling.CACHE_CONSTANTS = topk, cache
            for rows in (1, 16):
                params = replace(request_params(10**6, sampled=True), seed=7)
                sampler = BatchSampler(rows, vocab, device)
                for r in range(rows):
                    sampler.start(r, params, list(range(3, 131)))
                g = torch.Generator().manual_seed(0)
                logits = [(torch.randn(rows, vocab, generator=g) * 3).bfloat16().float()
                          .to(device) for _ in range(8)]
                batch = list(range(rows))
                tokens = [[r.token_id for r in sampler.sample(batch, x)] for x in logits]
                drawn[f"{name}_b{rows}"] = tokens
                sync(device)
                start = time.perf_counter()
                for i in range(steps):
                    sampler.launch(batch, logits[i % 8])
                host_ms = (time.perf_counter() - start) * 1000 / steps
                sync(device)
                wall = time.perf_counter()
                for i in range(steps):
                    sampler.launch(batch, logits[i % 8])
                sync(device)
                wall_ms = (time.perf_counter() - wall) * 1000 / steps
                waits = 0
                if device.type == "cuda":
                    waits = sum(host_waits(partial(sampler.launch, batch, logits[0])).values())
                activities = [ProfilerActivity.CPU]
                if device.type == "cuda":
                    activities.append(ProfilerActivity.CUDA)
                with profile(activities=activities) as prof:
                    for i in range(10):
                        sampler.launch(batch, logits[i % 8])
                    sync(device)
                kernels, _ = kernel_times(prof, device, 10)
                top = sorted(kernels.items(), key=lambda kv: -kv[1])[:6]
                result[f"{name}_b{rows}"] = {
                    "host_ms_per_step": round(host_ms, 3), "ms_per_step": round(wall_ms, 3),
                    "host_waits": waits,
                    "device_us_per_step": round(1000 * sum(kernels.values()), 1),
                    "top_us": {key[:60]: round(1000 * ms, 1) for key, ms in top}}
    finally:
        batch_sampling.TOPK_CANDIDATES = batch_sampling.CACHE_CONSTANTS = True
    result["same_tokens"] = all(drawn[f"{n}_b{r}"] == drawn[f"before_b{r}"]
                                for n in variants for r in (1, 16))
    return result


def plain_layers(llm: mistral7b.LLM, fn: Callable[[], Any]) -> Any:
    """fn() with the decode step's Triton kernels off (the plain PyTorch layers)."""
    llm.model.fused_decode = False
    try:
        return fn()
    finally:
        llm.model.fused_decode = True


def cublas_gemv(fn: Callable[[], Any]) -> Any:
    """fn() with the batch-1 projections through cuBLAS instead of gpu_kernels.gemv."""
    from mistral7b import gpu_decode

    gpu_decode.TRITON_GEMV = False
    try:
        return fn()
    finally:
        gpu_decode.TRITON_GEMV = True


def host_syncs(llm: mistral7b.LLM, prompt_len: int, new: int = 32, sampled: bool = False
               ) -> dict[str, Any]:
    """Calls that make the host wait for the device while two streams decode through the engine
    (torch's sync debug mode). Each iteration should have one, the wait for a step's tokens
    (an event, which the mode does not count); any other one stops the engine from queueing
    the next step before reading the last."""
    if llm.device.type != "cuda":
        return {"skipped": "not a CUDA device"}
    params = request_params(new, sampled)
    engine = Engine(llm.model, llm.tokenizer, max_batch=2, prefill_chunk=prompt_len,
                    dtype=llm.cache_dtype)
    engine.start()
    try:
        engine_round(engine, 2, prompt_len, params)            # graphs captured
        places = host_waits(lambda: engine_round(engine, 2, prompt_len, params))
    finally:
        engine.stop()
    return {"syncs": sum(places.values()), "tokens": 2 * new, "where": places}


def section(results: dict[str, Any], out: Path, name: str, fn: Callable[[], Any]) -> Any:
    """Run one measurement; a failure is recorded under errors and the run goes on."""
    start = time.perf_counter()
    try:
        value = fn()
    except Exception as e:
        results.setdefault("errors", {})[name] = f"{type(e).__name__}: {e}"
        print(f"  {name}: FAILED {type(e).__name__}: {e}", file=sys.stderr)
        value = None
    else:
        measured = isinstance(value, (int, float, str, dict))   # not a model or an LLM
        if measured:
            results[name] = value
        print(f"  {name}: {value if measured else 'ok'} "
              f"({time.perf_counter() - start:.1f} s)", file=sys.stderr)
    out.write_text(json.dumps(results, indent=2))
    return value


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, help="an HF directory (default: write one of "
                        "Mistral 7B's shapes with random weights)")
    parser.add_argument("--out", type=Path, default=Path("gpu.json"))
    parser.add_argument("--streams", default="1,16,64")
    parser.add_argument("--prompt", type=int, default=128, help="prompt tokens per stream")
    parser.add_argument("--new", type=int, default=128, help="generated tokens per stream")
    parser.add_argument("--prefill", type=int, default=4096, help="tokens of the long prompt")
    parser.add_argument("--compile", action="store_true",
                        help="also time decode with torch.compile'd steps (compiles for "
                        "about a minute)")
    parser.add_argument("--no-transformers", action="store_true")
    parser.add_argument("--float32-reference", action="store_true",
                        help="also load the checkpoint in float32 (twice the weights' memory) "
                        "and measure both bfloat16 decode paths against it")
    parser.add_argument("--time-limit", type=float, default=300,
                        help="start no compiled measurement after this many seconds")
    parser.add_argument("--sampling-only", action="store_true",
                        help="measure only the batched sampler (no model; seconds)")
    parser.add_argument("--dry-run", action="store_true",
                        help="tiny shapes on the CPU, to check the script")
    args = parser.parse_args()

    dry = args.dry_run
    device = torch.device("cpu" if dry or not torch.cuda.is_available() else "cuda")
    dtype = torch.bfloat16
    streams = [int(s) for s in args.streams.split(",")]
    prompt_len, new, prefill_len = ((16, 16, 256) if dry else (args.prompt, args.new,
                                                               args.prefill))
    results: dict[str, Any] = {
        "date": time.strftime("%Y-%m-%d"), "torch": torch.__version__,
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "dtype": "bfloat16", "prompt_tokens": prompt_len, "new_tokens": new,
        "shapes": "tiny (dry run)" if dry else "Mistral 7B"}
    out = args.out
    started = time.perf_counter()

    if args.sampling_only:
        section(results, out, "sampling_breakdown", lambda: sampling_breakdown(device))
        print(json.dumps(results, indent=2))
        return
    bandwidth = section(results, out, "copy_bandwidth_gbs",
                        lambda: round(copy_bandwidth(device, 2**26 if dry else 2**31), 1))
    workdir = tempfile.TemporaryDirectory()
    path = args.model
    hf_model = None
    if path is None:
        path = Path(workdir.name) / "mistral-7b-shapes"
        hf_model = section(results, out, "write_checkpoint",
                           lambda: write_checkpoint(TINY if dry else MISTRAL_7B, dtype, device,
                                                    path))
    if hf_model is not None and not args.no_transformers:
        for b in (1, 16):
            section(results, out, f"transformers_decode_b{b}_tok_s", lambda b=b, m=hf_model:
                    round(time_transformers(m, device, b, prompt_len, new), 1))
    hf_model = None                            # free its GPU memory before loading ours
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    before = torch.cuda.memory_allocated(device) if device.type == "cuda" else 0

    load_start = time.perf_counter()
    llm = section(results, out, "load", lambda: mistral7b.load(path, dtype="bfloat16",
                                                                device=device, progress=False))
    if llm is None:
        return
    results["load_s"] = round(time.perf_counter() - load_start, 2)
    weights = sum(t.nbytes for t in [*llm.model.parameters(), *llm.model.buffers()])
    results["weights_gb"] = round(weights / 1e9, 2)
    if device.type == "cuda":
        results["load_peak_gb"] = round((torch.cuda.max_memory_allocated(device) - before) / 1e9,
                                        2)
    if bandwidth:
        results["ceiling_b1_tok_s"] = round(bandwidth * 1e9 / weights, 1)
    section(results, out, f"prefill_{prefill_len}_tok_s",
            lambda: round(statistics.median(
                [time_prefill(llm, prefill_len, 0) for _ in range(4)][1:]), 0))
    section(results, out, "fused_against_plain", lambda: fused_against_plain(
        llm, prompt_len, path if args.float32_reference else None))
    section(results, out, "step_breakdown", lambda: step_breakdown(llm, prompt_len))
    section(results, out, "step_breakdown_plain_layers", lambda: plain_layers(
        llm, lambda: step_breakdown(llm, prompt_len)))
    section(results, out, "step_breakdown_cublas_gemv", lambda: cublas_gemv(
        lambda: step_breakdown(llm, prompt_len)))
    section(results, out, "host_syncs", lambda: host_syncs(llm, prompt_len))
    section(results, out, "host_syncs_sampled", lambda: host_syncs(llm, prompt_len,
                                                                   sampled=True))
    section(results, out, "decode_b1_plain_step", lambda: time_engine(
        llm, 1, prompt_len, new, static=False))
    for b in streams:
        section(results, out, f"decode_b{b}", lambda b=b: time_engine(
            llm, b, prompt_len, new, static=True))
    for b in [b for b in streams if b <= 16]:
        section(results, out, f"decode_b{b}_sampled", lambda b=b: time_engine(
            llm, b, prompt_len, new, static=True, sampled=True))
    if 1 in streams:
        section(results, out, "decode_b1_cublas_gemv", lambda: cublas_gemv(
            lambda: time_engine(llm, 1, prompt_len, new, static=True)))
    for b in [b for b in streams if b <= 16]:
        section(results, out, f"decode_b{b}_plain_layers", lambda b=b: plain_layers(
            llm, lambda: time_engine(llm, b, prompt_len, new, static=True)))
    for b in streams if args.compile else []:
        if time.perf_counter() - started > args.time_limit:
            results.setdefault("skipped", []).append(f"decode_b{b}_compiled (time limit)")
            continue
        section(results, out, f"decode_b{b}_compiled", lambda b=b: time_engine(
            llm, b, prompt_len, new, static=True, compile=True))
    if device.type == "cuda":
        results["peak_gb"] = round(torch.cuda.max_memory_allocated(device) / 1e9, 2)
    summarise(results, streams)
    out.write_text(json.dumps(results, indent=2))
    print(json.dumps(results, indent=2))


def summarise(results: dict[str, Any], streams: list[int]) -> None:
    """Ratios to transformers and to the bandwidth ceiling, and a table on stderr."""
    b1 = (results.get("decode_b1") or {}).get("decode_tok_s")
    ceiling = results.get("ceiling_b1_tok_s")
    hf1 = results.get("transformers_decode_b1_tok_s")
    if b1 and ceiling:
        results["b1_percent_of_ceiling"] = round(100 * b1 / ceiling, 1)
    if b1 and hf1:
        results["b1_vs_transformers"] = round(b1 / hf1, 2)
    hf16 = results.get("transformers_decode_b16_tok_s")
    b16 = (results.get("decode_b16") or {}).get("decode_tok_s")
    if b16 and hf16:
        results["b16_vs_transformers"] = round(b16 / hf16, 2)
    rows = [("load (s)", results.get("load_s")), ("load peak (GB)", results.get("load_peak_gb")),
            ("weights (GB)", results.get("weights_gb")),
            ("ceiling b1 (tok/s)", ceiling)]
    for key, value in results.items():
        if key.startswith("prefill_"):
            rows.append((key, value))
    for b in streams:
        entry = results.get(f"decode_b{b}") or {}
        rows.append((f"decode {b} streams (tok/s)", entry.get("decode_tok_s")))
    for suffix, label in (("compiled", "compiled"), ("sampled", "sampled"),
                          ("cublas_gemv", "cuBLAS GEMV"),
                          ("plain_layers", "plain layers")):
        for b in streams:
            entry = results.get(f"decode_b{b}_{suffix}") or {}
            if entry:
                rows.append((f"{label}, {b} streams (tok/s)", entry.get("decode_tok_s")))
    plain = results.get("decode_b1_plain_step") or {}
    rows.append(("decode b1, plain step", plain.get("decode_tok_s")))
    rows += [("transformers b1", hf1), ("transformers b16", hf16),
             ("b1 % of ceiling", results.get("b1_percent_of_ceiling"))]
    for name, value in rows:
        shown = f"{value:.1f}" if isinstance(value, float) else str(value)
        print(f"{name:>32}  {shown}", file=sys.stderr)


if __name__ == "__main__":
    main()
