"""Load test of `mistral7b serve`: N concurrent streaming clients, each sending requests back to
back until the run's request budget is spent; reports requests/s, aggregate generated tokens/s,
time to first token (TTFT) and time per output token (TPOT) percentiles, and failures.

    .venv/bin/python benchmarks/serve_load.py [--url http://127.0.0.1:8000] \
        [-c 1,4,16,64] [--requests-per-client 4] [--max-tokens 64] [--max-batch 16]

Without --url it starts `mistral7b serve` on a free port with the default model (and
--max-batch), waits for /health, and stops it (SIGTERM) at the end.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field

import httpx

QUESTIONS = ["What is the capital of France?", "Explain what a CPU cache is.",
             "Write a haiku about the sea.", "What is 17 times 23?",
             "Give three tips for learning Python.", "Why is the sky blue?",
             "Summarise the plot of Hamlet.", "What does HTTP stand for?"]


@dataclass
class Result:
    ok: bool
    ttft: float = 0.0
    tpot: float = 0.0
    tokens: int = 0
    error: str = ""


@dataclass
class Level:
    clients: int
    seconds: float
    results: list[Result] = field(default_factory=list)


async def one_request(client: httpx.AsyncClient, url: str, question: str, max_tokens: int
                      ) -> Result:
    body = {"model": "m", "messages": [{"role": "user", "content": question}],
            "max_tokens": max_tokens, "temperature": 0.7, "ignore_eos": True, "stream": True,
            "stream_options": {"include_usage": True}}
    start = time.perf_counter()
    first: float | None = None
    tokens = 0
    try:
        async with client.stream("POST", f"{url}/v1/chat/completions", json=body) as r:
            if r.status_code != 200:
                return Result(False, error=f"HTTP {r.status_code}: {(await r.aread())[:200]!r}")
            async for line in r.aiter_lines():
                if not line.startswith("data: {"):
                    continue
                chunk = json.loads(line[6:])
                if "error" in chunk:
                    return Result(False, error=chunk["error"]["message"])
                if chunk.get("usage"):
                    tokens = chunk["usage"]["completion_tokens"]
                elif first is None and chunk["choices"][0]["delta"].get("content"):
                    first = time.perf_counter()
    except httpx.HTTPError as e:
        return Result(False, error=f"{type(e).__name__}: {e}")
    end = time.perf_counter()
    if first is None or tokens == 0:
        return Result(False, error="no tokens received")
    return Result(True, first - start, (end - first) / max(tokens - 1, 1), tokens)


async def run_level(url: str, clients: int, per_client: int, max_tokens: int) -> Level:
    limits = httpx.Limits(max_connections=clients + 4)
    async with httpx.AsyncClient(timeout=600, limits=limits) as client:
        async def worker(w: int) -> list[Result]:
            return [await one_request(client, url, QUESTIONS[(w + i) % len(QUESTIONS)],
                                      max_tokens) for i in range(per_client)]

        start = time.perf_counter()
        per_worker = await asyncio.gather(*(worker(w) for w in range(clients)))
        level = Level(clients, time.perf_counter() - start)
    level.results = [r for rs in per_worker for r in rs]
    return level


def percentile(values: list[float], p: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(p / 100 * (len(ordered) - 1)))]


def report(levels: list[Level], max_tokens: int) -> str:
    lines = [f"streaming chat requests, {max_tokens} generated tokens each (ignore_eos)\n",
             "| clients | requests | failures | requests/s | tokens/s | TTFT p50 / p90 / p99 (s) "
             "| TPOT p50 / p90 / p99 (ms) |", "|---:|---:|---:|---:|---:|---|---|"]
    for lv in levels:
        ok = [r for r in lv.results if r.ok]
        ttft = [r.ttft for r in ok]
        tpot = [r.tpot * 1000 for r in ok]
        lines.append(
            f"| {lv.clients} | {len(lv.results)} | {len(lv.results) - len(ok)} | "
            f"{len(ok) / lv.seconds:.2f} | {sum(r.tokens for r in ok) / lv.seconds:.1f} | "
            f"{percentile(ttft, 50):.2f} / {percentile(ttft, 90):.2f} / "
            f"{percentile(ttft, 99):.2f} | {percentile(tpot, 50):.1f} / "
            f"{percentile(tpot, 90):.1f} / {percentile(tpot, 99):.1f} |")
    failures = [r.error for lv in levels for r in lv.results if not r.ok]
    if failures:
        lines.append(f"\nfirst failure: {failures[0]}")
    return "\n".join(lines)


def start_server(max_batch: int) -> tuple[subprocess.Popen[str], str]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([sys.executable, "-m", "mistral7b", "serve", "--port", str(port),
                             "--max-batch", str(max_batch)], text=True,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"})
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                return proc, url
        except httpx.HTTPError:
            pass
        if proc.poll() is not None:
            raise SystemExit(f"the server exited with status {proc.returncode}")
        time.sleep(0.2)
    proc.kill()
    raise SystemExit("the server did not become healthy within 300 s")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--url", default=None, help="a running server (default: start one)")
    parser.add_argument("-c", "--clients", default="1,4,16,64",
                        help="concurrency levels (default: 1,4,16,64)")
    parser.add_argument("--requests-per-client", type=int, default=4)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--max-batch", type=int, default=16,
                        help="--max-batch of the server this script starts (default: 16)")
    args = parser.parse_args()
    proc, url = (None, args.url) if args.url else start_server(args.max_batch)
    try:
        asyncio.run(run_level(url, 1, 1, 8))                              # warm-up
        levels = []
        for clients in (int(c) for c in args.clients.split(",")):
            levels.append(asyncio.run(run_level(url, clients, args.requests_per_client,
                                                args.max_tokens)))
            print(f"{clients} clients: done in {levels[-1].seconds:.1f} s", file=sys.stderr)
        print(report(levels, args.max_tokens))
        print(f"\nmedian TTFT at 1 client: "
              f"{statistics.median([r.ttft for r in levels[0].results if r.ok] or [0]):.3f} s",
              file=sys.stderr)
    finally:
        if proc is not None:
            proc.send_signal(signal.SIGTERM)
            proc.wait(timeout=120)


if __name__ == "__main__":
    main()
