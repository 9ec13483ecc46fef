"""Prometheus metrics of the server, in a registry of its own (several apps can live in one
process, as the tests do)."""

from __future__ import annotations

from collections.abc import Callable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

# Latency buckets from a few ms (a decode step) to minutes (a long pre-fill behind a queue).
_TTFT_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)
_TPOT_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1)


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("mistral7b_requests", "HTTP requests by route and status code",
                                ["route", "status"], registry=r)
        self.prompt_tokens = Counter("mistral7b_prompt_tokens", "Prompt tokens processed",
                                     registry=r)
        self.generation_tokens = Counter("mistral7b_generation_tokens", "Tokens generated",
                                         registry=r)
        self.ttft = Histogram("mistral7b_time_to_first_token_seconds",
                              "From the request's arrival to its first generated token",
                              buckets=_TTFT_BUCKETS, registry=r)
        self.tpot = Histogram("mistral7b_time_per_output_token_seconds",
                              "Mean time between generated tokens, per request",
                              buckets=_TPOT_BUCKETS, registry=r)
        self.queue_depth = Gauge("mistral7b_queue_depth", "Requests waiting for a free row",
                                 registry=r)
        self.running = Gauge("mistral7b_running_sequences",
                             "Sequences holding a cache row (pre-filling or decoding)",
                             registry=r)

    def track_engine(self, waiting: Callable[[], float], running: Callable[[], float]) -> None:
        """Read the engine's queue and batch sizes at each scrape."""
        self.queue_depth.set_function(waiting)
        self.running.set_function(running)

    def render(self) -> bytes:
        return generate_latest(self.registry)

    def observe_request(self, arrived: float, first_token: float | None, finished: float,
                        prompt_tokens: int, completion_tokens: int) -> None:
        self.prompt_tokens.inc(prompt_tokens)
        self.generation_tokens.inc(completion_tokens)
        if first_token is not None:
            self.ttft.observe(first_token - arrived)
            if completion_tokens > 1:
                self.tpot.observe((finished - first_token) / (completion_tokens - 1))
