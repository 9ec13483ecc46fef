"""The continuous-batching engine alone, without HTTP: outputs equal to generating alone,
scheduling order, cancellation, slot reuse, queue limits, draining and failure isolation."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator, Sequence

import pytest

import mistral7b
from mistral7b.engine import Engine, EngineClosedError, EngineOutput, EngineStats, QueueFullError
from mistral7b.errors import ContextLengthError, InvalidArgumentError
from mistral7b.sampling import SamplingParams
from tests.conftest import wait_until

GREEDY = SamplingParams(max_tokens=20, temperature=0, ignore_eos=True)
PROMPTS = ["The capital of France is", "def fibonacci(n):", "Once upon a time",
           "Mistral 7B uses sliding window attention because",
           "List three colours:", "The year 1969 is remembered for",
           "To make bread you need", "In Python, a list comprehension"]


@pytest.fixture(scope="module")
def llm() -> mistral7b.LLM:
    return mistral7b.load()


@pytest.fixture
def engine(llm: mistral7b.LLM) -> Iterator[Engine]:
    eng = Engine(llm.model, llm.tokenizer, max_batch=4, max_queue=16, prefill_chunk=32)
    eng.start()
    yield eng
    eng.stop()


class Collector:
    """Gathers one request's outputs; `done` is set by its final output."""

    def __init__(self, name: str = "", starts: list[str] | None = None) -> None:
        self.outputs: list[EngineOutput] = []
        self.done = threading.Event()
        self.finished_at = 0.0
        self.name, self.starts = name, starts   # starts: where to note our first output

    def __call__(self, out: EngineOutput) -> None:
        if not self.outputs and self.starts is not None:
            self.starts.append(self.name)
        self.outputs.append(out)
        if out.finished:
            self.finished_at = time.monotonic()
            self.done.set()

    def wait(self) -> Collector:
        assert self.done.wait(60), "request did not finish"
        return self

    @property
    def tokens(self) -> list[int]:
        return [t for o in self.outputs if o.piece for t in o.piece.token_ids]

    @property
    def text(self) -> str:
        return "".join(o.piece.text for o in self.outputs if o.piece)


def submit_all(engine: Engine, prompts: Sequence[list[int]], params: SamplingParams
               ) -> list[Collector]:
    collectors = [Collector() for _ in prompts]
    for ids, c in zip(prompts, collectors, strict=True):
        engine.submit(ids, params, c)
    return [c.wait() for c in collectors]


def test_each_request_gets_what_it_gets_alone(llm: mistral7b.LLM, engine: Engine) -> None:
    # A prompt longer than prefill_chunk (pre-filled in 3 chunks while others decode), and more
    # requests than rows (some wait for a free row).
    long_prompt = llm.tokenizer.encode(" ".join(PROMPTS) * 2)
    assert len(long_prompt) > 2 * engine.prefill_chunk
    prompts = [llm.tokenizer.encode(p) for p in PROMPTS] + [long_prompt]
    together = submit_all(engine, prompts, GREEDY)
    for ids, got in zip(prompts, together, strict=True):
        alone = llm.generate(ids, GREEDY, chunk_size=engine.prefill_chunk)
        assert got.tokens == alone.token_ids
        assert got.text == alone.text
        final = got.outputs[-1]
        assert (final.finish_reason, final.prompt_tokens, final.completion_tokens) == (
            "length", len(ids), GREEDY.max_tokens)
    assert wait_until(lambda: engine.stats().free_rows == engine.max_batch)


def test_requests_start_in_arrival_order(llm: mistral7b.LLM) -> None:
    eng = Engine(llm.model, llm.tokenizer, max_batch=1)
    firsts: list[str] = []
    collectors = {name: Collector(name, firsts) for name in "ABC"}
    for name, c in collectors.items():      # all queued before the engine runs
        eng.submit(llm.tokenizer.encode(f"Request {name}"), GREEDY, c)
    eng.start()
    try:
        for c in collectors.values():
            c.wait()
    finally:
        eng.stop()
    assert firsts == ["A", "B", "C"]
    # One row: B starts only after A has finished.
    assert collectors["A"].finished_at <= collectors["B"].finished_at <= \
        collectors["C"].finished_at


def test_cancel_frees_the_row_at_once(llm: mistral7b.LLM, engine: Engine) -> None:
    c = Collector()
    long = SamplingParams(max_tokens=2000, temperature=0, ignore_eos=True)
    request_id = engine.submit(llm.tokenizer.encode("Count to a million:"), long, c)
    assert wait_until(lambda: len(c.outputs) >= 3)
    assert engine.stats().running == 1
    engine.cancel(request_id)
    c.wait()
    assert c.outputs[-1].finish_reason == "cancelled"
    assert len(c.outputs) < 100
    assert wait_until(lambda: engine.stats().free_rows == engine.max_batch, timeout=1.0)


def test_a_reused_row_does_not_see_the_previous_sequence(llm: mistral7b.LLM) -> None:
    eng = Engine(llm.model, llm.tokenizer, max_batch=1, prefill_chunk=32)
    eng.start()
    try:
        first = llm.tokenizer.encode("Paris Paris Paris Paris. " * 20)
        second = llm.tokenizer.encode("The capital of Italy is")
        submit_all(eng, [first], GREEDY)
        reused = submit_all(eng, [second], GREEDY)[0]
    finally:
        eng.stop()
    fresh = llm.generate(second, GREEDY, chunk_size=32)
    assert reused.tokens == fresh.token_ids


def test_queue_limit_and_bad_prompts_are_refused(llm: mistral7b.LLM) -> None:
    eng = Engine(llm.model, llm.tokenizer, max_batch=1, max_queue=2)   # not started: all wait
    ids = llm.tokenizer.encode("hello")
    eng.submit(ids, GREEDY, Collector())
    eng.submit(ids, GREEDY, Collector())
    with pytest.raises(QueueFullError, match="queue is full"):
        eng.submit(ids, GREEDY, Collector())
    with pytest.raises(ContextLengthError, match="8192"):
        eng.submit([ids[-1]] * 9000, GREEDY, Collector())
    with pytest.raises(InvalidArgumentError, match="empty"):
        eng.submit([], GREEDY, Collector())
    waiting = Collector()
    eng2 = Engine(llm.model, llm.tokenizer, max_batch=1)
    eng2.submit(ids, GREEDY, waiting)
    eng.stop()
    eng2.stop()             # never started: its waiting request still hears that it ended
    assert waiting.done.is_set() and waiting.outputs[-1].finish_reason == "cancelled"


def test_drain_finishes_accepted_requests_and_refuses_new_ones(llm: mistral7b.LLM,
                                                               engine: Engine) -> None:
    collectors = [Collector() for _ in range(6)]
    for p, c in zip(PROMPTS, collectors, strict=False):
        engine.submit(llm.tokenizer.encode(p), GREEDY, c)
    assert engine.drain(timeout=60)
    assert all(c.done.is_set() and c.outputs[-1].finish_reason == "length" for c in collectors)
    with pytest.raises(EngineClosedError):
        engine.submit(llm.tokenizer.encode("late"), GREEDY, Collector())


def test_a_failing_request_fails_alone(llm: mistral7b.LLM, engine: Engine,
                                       monkeypatch: pytest.MonkeyPatch) -> None:
    from mistral7b.generate import SequenceState

    real_add = SequenceState.add_token      # every token passes here, sampled or argmax

    def add(self: SequenceState, result: object) -> object:
        if self.params.seed == 666 and self.n_generated == 3:
            raise RuntimeError("boom")
        return real_add(self, result)  # type: ignore[arg-type]

    monkeypatch.setattr(SequenceState, "add_token", add)
    ids = [llm.tokenizer.encode(p) for p in PROMPTS[:3]]
    bad = SamplingParams(max_tokens=20, temperature=0, ignore_eos=True, seed=666)
    collectors = [Collector() for _ in ids]
    engine.submit(ids[0], GREEDY, collectors[0])
    engine.submit(ids[1], bad, collectors[1])
    engine.submit(ids[2], GREEDY, collectors[2])
    for c in collectors:
        c.wait()
    assert collectors[1].outputs[-1].finish_reason == "error"
    assert "boom" in (collectors[1].outputs[-1].error or "")
    for i in (0, 2):
        assert collectors[i].tokens == llm.generate(ids[i], GREEDY, chunk_size=32).token_ids
    assert wait_until(lambda: engine.stats().free_rows == engine.max_batch)


def test_an_unstarted_engine_is_driven_by_its_caller_and_freed_on_early_exit(
        llm: mistral7b.LLM) -> None:
    """run_requests steps an engine that has no thread (LLM.generate's synchronous front); a
    consumer that stops early cancels the rest, and the rows come back."""
    from mistral7b.engine.engine import run_requests

    engine = Engine(llm.model, llm.tokenizer, max_batch=2)
    ids = [llm.tokenizer.encode(p) for p in PROMPTS[:2]]
    stream = run_requests(engine, ids, [GREEDY, GREEDY])
    pieces = [next(stream) for _ in range(5)]
    assert {i for i, _ in pieces} == {0, 1} and not engine.started
    stream.close()
    assert engine.run_once() is False              # the cancelled requests are dropped
    assert engine.stats() == EngineStats(waiting=0, running=0, free_rows=2)
    alone = llm.generate(ids[0], GREEDY)
    assert [p.token_ids[0] for i, p in pieces if i == 0] == alone.token_ids[:3]
