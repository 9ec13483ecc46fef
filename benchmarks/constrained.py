"""Constrained decoding: grammar libraries compared on the default model's tokenizer, and what a
JSON-schema constraint costs the engine.

    python benchmarks/constrained.py [--out constrained.json] [--tokens 128] [--repetitions 5]

Libraries (each optional; a missing one is reported, not fatal):
- llguidance (what mistral7b uses) and outlines-core: the time to prepare the tokenizer's
  vocabulary, to compile a typical schema (nested objects, arrays, enums, required fields) and
  JSON mode, and the time to compute one token's mask, stepping through a valid document's
  tokens (median and worst).
Engine: sampled decode tok/s of the default model at batch 1 and 16 with that schema against no
constraint, in the same run and for the same number of tokens per row.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import mistral7b
from mistral7b.sampling import SamplingParams

SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {
        "name": {"type": "string"},
        "age": {"type": "integer"},
        "role": {"enum": ["admin", "user", "guest"]},
        "tags": {"type": "array", "items": {"type": "string"}},
        "address": {"type": "object",
                    "properties": {"city": {"type": "string"}, "zip": {"type": "string"}},
                    "required": ["city"]},
    },
    "required": ["name", "age", "role"],
}
DOCUMENT = ('{"name": "Ada Lovelace", "age": 36, "role": "admin", "tags": ["math", "poetry"], '
            '"address": {"city": "London", "zip": "W1"}}')


def timed(fn: Callable[[], Any]) -> tuple[Any, float]:
    start = time.perf_counter()
    value = fn()
    return value, (time.perf_counter() - start) * 1000


def mask_times(step: Callable[[int], None], tokens: Sequence[int]) -> dict[str, float]:
    """ms per token of `step` (compute the mask, then take the token) along `tokens`."""
    times = []
    for t in tokens:
        start = time.perf_counter()
        step(t)
        times.append((time.perf_counter() - start) * 1000)
    return {"mask_ms_median": round(statistics.median(times), 4),
            "mask_ms_max": round(max(times), 3)}


def bench_llguidance(llm: mistral7b.LLM, doc_tokens: list[int]) -> dict[str, Any]:
    import llguidance
    import llguidance.torch

    from mistral7b.constrained import lltokenizer

    tokenizer, setup_ms = timed(lambda: lltokenizer(llm.tokenizer, llm.config.vocab_size))
    schema = llguidance.LLMatcher.grammar_from_json_schema(SCHEMA)
    any_object = llguidance.LLMatcher.grammar_from_json_schema({"type": "object"})
    matcher, compile_ms = timed(lambda: llguidance.LLMatcher(tokenizer, schema))
    _, json_mode_ms = timed(lambda: llguidance.LLMatcher(tokenizer, any_object))
    bitmask = llguidance.torch.allocate_token_bitmask(1, llm.config.vocab_size)

    def step(token: int) -> None:
        llguidance.torch.fill_next_token_bitmask(matcher, bitmask)
        if not matcher.consume_token(token):
            raise RuntimeError(matcher.get_error())

    return {"version": llguidance.get_version() if hasattr(llguidance, "get_version") else "?",
            "setup_ms": round(setup_ms, 1), "schema_compile_ms": round(compile_ms, 2),
            "json_mode_compile_ms": round(json_mode_ms, 2), **mask_times(step, doc_tokens)}


def bench_outlines(llm: mistral7b.LLM, doc_tokens: list[int]) -> dict[str, Any]:
    import importlib.metadata

    import llguidance
    from outlines_core import Guide, Index, Vocabulary
    from outlines_core.json_schema import build_regex_from_schema

    from mistral7b.constrained import lltokenizer

    raw = lltokenizer(llm.tokenizer, llm.config.vocab_size)     # only to read token bytes
    eos = min(llm.tokenizer.eos_ids)

    def vocabulary() -> Any:
        pieces: dict[bytes, list[int]] = {}
        for i in range(llm.config.vocab_size):
            if i != eos and not raw.is_special_token(i):
                pieces.setdefault(raw.decode_bytes([i]), []).append(i)
        return Vocabulary(eos, pieces)

    vocab, setup_ms = timed(vocabulary)
    index, compile_ms = timed(lambda: Index(build_regex_from_schema(json.dumps(SCHEMA)), vocab))
    _, json_mode_ms = timed(lambda: Index(build_regex_from_schema('{"type": "object"}'), vocab))
    guide = Guide(index)
    mask = torch.zeros((llm.config.vocab_size + 31) // 32, dtype=torch.int32)

    def step(token: int) -> None:
        guide.write_mask_into(mask.data_ptr(), mask.numel(), mask.element_size())
        if token != eos:                  # its guide ends in a final state, not on EOS
            guide.advance(token, return_tokens=False)

    del llguidance
    return {"version": importlib.metadata.version("outlines-core"),
            "setup_ms": round(setup_ms, 1), "schema_compile_ms": round(compile_ms, 2),
            "json_mode_compile_ms": round(json_mode_ms, 2), **mask_times(step, doc_tokens)}


def engine_speeds(llm: mistral7b.LLM, batch: int, tokens: int, repetitions: int
                  ) -> dict[str, float]:
    """Aggregate sampled decode tok/s of `batch` chat prompts through the engine, with SCHEMA
    and then with no constraint, each row generating as many tokens as it did under the schema
    (so both runs do the same steps and only the masks differ); medians of interleaved runs."""
    from dataclasses import replace

    from mistral7b.constrained import ResponseFormat
    from mistral7b.engine.engine import run_requests

    prompts = [llm.tokenizer.encode_chat([{"role": "user", "content":
                                           f"Describe person number {i} as JSON."}])
               for i in range(batch)]

    def run(params: list[SamplingParams]) -> tuple[float, list[int]]:
        counts = [0] * batch
        start = time.perf_counter()
        for i, piece in run_requests(llm.engine(max_batch=batch), prompts, params):
            counts[i] += len(piece.token_ids)
        return sum(counts) / (time.perf_counter() - start), counts

    base = SamplingParams(max_tokens=tokens, temperature=0.7, seed=0)
    constrained = [replace(base, seed=i, response_format=ResponseFormat.json_schema(SCHEMA))
                   for i in range(batch)]
    _, counts = run(constrained)                      # warm-up; seeded, so the same each time
    free = [replace(base, seed=i, max_tokens=n, ignore_eos=True) for i, n in enumerate(counts)]
    schema_runs, free_runs = [], []
    for _ in range(repetitions):                      # interleaved: a noisy machine hits both
        schema_runs.append(run(constrained)[0])
        free_runs.append(run(free)[0])
    schema_tok_s, free_tok_s = statistics.median(schema_runs), statistics.median(free_runs)
    return {"none_tok_s": round(free_tok_s, 1), "schema_tok_s": round(schema_tok_s, 1),
            "slowdown_pct": round(100 * (1 - schema_tok_s / free_tok_s), 1),
            "tokens": sum(counts), "repetitions": repetitions}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("constrained.json"))
    parser.add_argument("--tokens", type=int, default=128, help="max tokens per answer")
    parser.add_argument("--repetitions", type=int, default=5)
    args = parser.parse_args()
    torch.manual_seed(0)
    llm = mistral7b.load(progress=False)
    doc_tokens = llm.tokenizer.encode(DOCUMENT, bos=False) + sorted(llm.tokenizer.eos_ids)[:1]
    results: dict[str, Any] = {"date": time.strftime("%Y-%m-%d"), "model": "default",
                               "document_tokens": len(doc_tokens)}
    for name, fn in (("llguidance", bench_llguidance), ("outlines_core", bench_outlines)):
        try:
            results[name] = fn(llm, doc_tokens)
        except ImportError as e:
            results[name] = {"skipped": str(e)}
        except Exception as e:                        # one library failing: report it, go on
            results[name] = {"error": f"{type(e).__name__}: {e}"}
        print(f"{name}: {results[name]}", file=sys.stderr)
    for batch in (1, 16):
        results[f"engine_b{batch}"] = engine_speeds(llm, batch, args.tokens,
                                                    args.repetitions)
        print(f"batch {batch}: {results[f'engine_b{batch}']}", file=sys.stderr)
    args.out.write_text(json.dumps(results, indent=2))
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
