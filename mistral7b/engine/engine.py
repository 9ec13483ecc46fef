"""Continuous batching: many requests share one model and join or leave it between steps.

    submit() -> waiting (FIFO, at most max_queue) -> a free cache row -> pre-fill, in chunks
                                                                      -> decode, a token a step
                                                                      -> done: the row is free

The server runs the loop in one engine thread (start()); the Python API drives it from the
caller's thread instead (run_requests, run_once). Each iteration

  1. drops cancelled requests (their rows are free at once),
  2. gives free rows to waiting requests, oldest first,
  3. runs one pre-fill chunk (at most `prefill_chunk` tokens) of the oldest request that is
     still pre-filling (on a GPU, of the oldest ones, up to `prefill_budget` tokens in one
     forward),
  4. runs one decode step for every request that is generating,

so a long prompt costs the running streams one chunk's time per token, never the whole prompt.

With a fixed-shape decoder (static_decode.py, the GPU default) step 4 runs one step ahead: while
the batch stays the same, it queues decode step N+1 on step N's sampled tokens where they are,
on the device, and only then reads step N's tokens and sends them out. The host's part of a
step (detokenizing, stop strings, callbacks) then runs while the device computes the next one,
instead of leaving it idle. When the batch changes (a request ends, is cancelled or joins after
its pre-fill), the engine reads the step in flight first and goes on from the host's tokens. A
request that ends thus gets one more step computed for it, whose token nobody reads; its row
may already belong to a new request by then, which is safe: the device runs the steps in order,
and the new request's pre-fill writes every slot it will see.

Each request owns one row of a single RollingCache of `max_batch` rows (the bounded pool). A
row handed to a new request is reset: the cache masks every slot the new sequence has not
written, so nothing of the previous sequence is visible.

On the CPU a request's numbers do not depend on the others: its pre-fill runs alone in chunks of
the same size whatever the load, and the decode kernels compute each row of a batch in the same
order (tests/test_quant.py checks that bit for bit), so batching changes no output. On a GPU
pre-fill chunks of several requests share a forward (prefill_budget), for throughput; cuBLAS may
then round a request's numbers differently with the batch.

Outputs go to the callback given at submit(), called from the loop's thread: one
EngineOutput per generated piece, the last one with `finished` set (or `error` when the request
failed). Consumers in another thread or event loop hand them over themselves.
"""

from __future__ import annotations

import functools
import itertools
import logging
import queue
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field

import torch

from mistral7b.batch_sampling import BatchSampler, Masks, PendingSample
from mistral7b.cache import RollingCache
from mistral7b.constrained import Constraint
from mistral7b.errors import Mistral7BError
from mistral7b.generate import (
    PromptToken,
    SequenceState,
    StreamPiece,
    check_prompt,
    decode_step,
    prefill,
    prefill_every_position,
    score_positions,
)
from mistral7b.model import Transformer
from mistral7b.sampling import SampleResult, SamplingParams
from mistral7b.static_decode import StaticDecoder
from mistral7b.tokenizer import MissingTokenizer, Tokenizer

log = logging.getLogger("mistral7b")


class QueueFullError(Mistral7BError):
    """The waiting queue holds max_queue requests already (the server answers 429)."""


class EngineClosedError(Mistral7BError):
    """The engine is draining or stopped and takes no new requests (the server answers 503)."""


@dataclass
class EngineOutput:
    """What one engine step adds to one request."""

    request_id: str
    piece: StreamPiece | None            # None for the final event of a failed/cancelled request
    finished: bool = False
    finish_reason: str | None = None     # "stop" | "length" | "cancelled" | "error"
    error: str | None = None             # why the request failed, when it did
    prompt_tokens: int = 0
    completion_tokens: int = 0
    # A scoring request's answer: the float32 (vocab,) log-probabilities of the token after the
    # prompt, on the CPU (moderation reads its label tokens from it).
    next_logprobs: torch.Tensor | None = None


OutputCallback = Callable[[EngineOutput], None]

# What a scoring request runs: its pre-fill, then one greedy token that nobody reads.
_SCORING = SamplingParams(max_tokens=1, temperature=0, ignore_eos=True)


@dataclass
class _Request:
    id: str
    prompt: list[int]
    params: SamplingParams
    on_output: OutputCallback
    state: SequenceState
    row: int = -1
    prefilled: int = 0                   # prompt tokens already in the cache
    next_token: int | None = None        # sampled, not yet fed to the model
    cancelled: bool = False
    abort_error: str | None = None       # why the engine ended it (stop(reason)), if it did
    done: bool = False                   # its final output was sent: nothing more goes out
    submitted: float = field(default_factory=time.monotonic)
    score: bool = False                  # answer with next_logprobs, after one token
    next_logprobs: torch.Tensor | None = None
    # The prompt's tokens scored so far (params.prompt_logprobs), sent with the first output.
    prompt_logprobs: list[PromptToken] | None = None


@dataclass
class _Launched:
    """A decode step queued on the device, its tokens not read yet."""

    requests: list[_Request]
    sample: PendingSample


@dataclass
class EngineStats:
    waiting: int
    running: int
    free_rows: int


class Engine:
    """Serves generation requests from a background thread with continuous batching."""

    def __init__(self, model: Transformer, tokenizer: Tokenizer, max_batch: int = 16,
                 max_queue: int = 256, prefill_chunk: int = 256,
                 dtype: torch.dtype = torch.float32, static_decode: bool | None = None,
                 compile: bool = False, prefill_budget: int | None = None) -> None:
        """static_decode: run decode steps of fixed shape (static_decode.py), as CUDA graphs on
        a GPU; default: on when the model is on CUDA. compile: also pass them through
        torch.compile. prefill_budget: tokens of pre-fill per iteration, shared by the waiting
        requests in one forward (each still in chunks of at most prefill_chunk); default on a
        GPU 8 chunks' worth. On the CPU it is prefill_chunk, one request at a time, which keeps
        each request's numbers independent of the load."""
        if max_batch < 1 or max_queue < 0 or prefill_chunk < 1:
            raise ValueError("max_batch and prefill_chunk must be >= 1, max_queue >= 0")
        self.model, self.tokenizer = model, tokenizer
        self.max_batch, self.max_queue, self.prefill_chunk = max_batch, max_queue, prefill_chunk
        if prefill_budget is None:
            prefill_budget = prefill_chunk * (8 if model.device.type == "cuda" else 1)
        self.prefill_budget = max(prefill_budget, prefill_chunk)
        if static_decode is None:
            # Not under tensor parallelism: a fixed-shape step bypasses forward(), which is
            # where the other ranks are told of each pass.
            static_decode = model.device.type == "cuda" and model.tensor_parallel is None
        # A static decoder pads its batches with a spare last row that no request gets.
        self.cache = RollingCache(model.config, rows=max_batch + int(static_decode), dtype=dtype,
                                  device=model.device)
        self.decoder = (StaticDecoder(model, self.cache, compile=compile) if static_decode
                        else None)
        self.sampler = BatchSampler(self.cache.rows, model.config.vocab_size, model.device)
        self._free_rows = list(range(max_batch))
        self._waiting: deque[_Request] = deque()
        self._running: list[_Request] = []          # rows in use, in admission order
        self._by_id: dict[str, _Request] = {}
        self._ids = itertools.count()
        self._lock = threading.Condition()
        self._accepting = True
        self._stopping = False
        self._thread: threading.Thread | None = None
        # On a fixed-shape decoder, the decode step queued on the device and not read yet.
        self._pending: _Launched | None = None

    # ---- public API (any thread) --------------------------------------------------------

    def start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._loop, name="mistral7b-engine",
                                            daemon=True)
            self._thread.start()

    @property
    def started(self) -> bool:
        """True while a background thread runs the loop (start()); otherwise the caller drives
        it with run_once()."""
        return self._thread is not None

    def submit(self, prompt: Sequence[int], params: SamplingParams,
               on_output: OutputCallback, score: bool = False) -> str:
        """Queue a request; returns its id. Raises InvalidArgumentError / ContextLengthError for
        a prompt the model cannot run, QueueFullError, or EngineClosedError. score=True: a
        scoring request, answered after its pre-fill with the next token's log-probabilities
        (EngineOutput.next_logprobs); it generates nothing."""
        if score:
            params = _SCORING
        ids = [int(t) for t in prompt]
        check_prompt(self.model.config, ids, params.max_tokens, params.logit_bias)
        decode = self.tokenizer.decode
        if isinstance(self.tokenizer, MissingTokenizer) and not params.stop:
            decode = _no_text                    # token ids only: nothing to detokenize
        constraint = None
        if params.response_format is not None:    # compiled now: a bad grammar fails here
            constraint = Constraint(params.response_format, self.tokenizer,
                                    self.model.config.vocab_size)
        state = SequenceState(params, decode, self.tokenizer.eos_ids, constraint)
        with self._lock:
            if not self._accepting:
                raise EngineClosedError("the server is shutting down and takes no new requests")
            if len(self._waiting) >= self.max_queue:
                raise QueueFullError(f"the queue is full ({self.max_queue} requests waiting); "
                                     "retry later")
            request = _Request(f"req-{next(self._ids)}", ids, params, on_output, state,
                               score=score,
                               prompt_logprobs=None if params.prompt_logprobs is None else [])
            self._waiting.append(request)
            self._by_id[request.id] = request
            self._lock.notify()
        return request.id

    def cancel(self, request_id: str) -> None:
        """Stop a request (e.g. its client went away); its row is freed at the next step."""
        with self._lock:
            request = self._by_id.get(request_id)
            if request is not None:
                request.cancelled = True
                self._lock.notify()

    def stats(self) -> EngineStats:
        with self._lock:
            return EngineStats(len(self._waiting), len(self._running), len(self._free_rows))

    def close(self) -> None:
        """Take no new requests (submit raises EngineClosedError); accepted ones go on."""
        with self._lock:
            self._accepting = False

    def drain(self, timeout: float | None = None) -> bool:
        """Stop taking requests and wait for the accepted ones to finish; True if they did."""
        deadline = None if timeout is None else time.monotonic() + timeout
        self.close()
        with self._lock:
            while self._waiting or self._running:
                left = None if deadline is None else deadline - time.monotonic()
                if left is not None and left <= 0:
                    return False
                self._lock.wait(left if left is None else min(left, 0.1))
        return True

    def stop(self, reason: str | None = None) -> None:
        """Cancel whatever is left and end the engine thread. With a reason (e.g. a drain that
        timed out), the requests cut short end as errors carrying it, not as "cancelled"."""
        with self._lock:
            self._accepting = False
            self._stopping = True
            for request in [*self._waiting, *self._running]:
                request.cancelled = True
                request.abort_error = reason
            if self._thread is None:             # never started: tell the waiting ones here
                self._drop_cancelled()
            self._lock.notify_all()
        if self._thread is not None:
            self._thread.join(timeout=30)
            self._thread = None

    # ---- the loop (engine thread) -------------------------------------------------------

    def _loop(self) -> None:
        while True:
            with self._lock:
                while not self._stopping and not self._waiting and not self._running:
                    self._lock.wait()
                self._drop_cancelled()
                if self._stopping and not self._running and not self._waiting:
                    return
            self.run_once()

    def run_once(self) -> bool:
        """One iteration of the loop (admit, one pre-fill chunk, one decode step) in the calling
        thread: the synchronous front that `LLM.generate` drives instead of start(), so its
        matmuls run on the caller's thread and its OpenMP team. False when nothing was
        waiting or running."""
        with self._lock:
            self._drop_cancelled()
            self._admit()
            running = list(self._running)
        if not running:
            return False
        try:
            self._step(running)
        except Exception:  # a bug in a step must not kill the server: fail its requests
            log.exception("engine step failed")
            for request in running:
                self._fail(request, "internal error in the engine step (see the server log)")
        with self._lock:
            self._lock.notify_all()                # wakes drain()
        return True

    def _drop_cancelled(self) -> None:
        for request in [r for r in (*self._waiting, *self._running) if r.cancelled]:
            self._release(request)
            reason = "cancelled" if request.abort_error is None else "error"
            self._finish(request, EngineOutput(request.id, None, True, reason,
                                               error=request.abort_error,
                                               prompt_tokens=len(request.prompt),
                                               completion_tokens=request.state.n_generated))

    def _admit(self) -> None:
        while self._waiting and self._free_rows:
            request = self._waiting.popleft()
            request.row = self._free_rows.pop(0)
            self.cache.reset(request.row)
            self.sampler.start(request.row, request.params, request.prompt)
            self._running.append(request)

    def _step(self, running: list[_Request]) -> None:
        filling = [r for r in running if r.prefilled < len(r.prompt)]
        if filling:
            self._prefill_chunks(filling)
        pending = self._pending
        if pending is not None and self._can_chain(pending):
            # Queue the next step on the device's own tokens, then read the last one's.
            self._pending = self._launch(pending.requests, pending.sample.tokens)
            self._deliver(pending, chained=self._pending is not None)
            return
        if pending is not None:                  # the batch changes: read it first
            self._pending = None
            self._deliver(pending, chained=False)
        decoding = [r for r in self._running_now()
                    if r.next_token is not None and not r.cancelled]
        if not decoding:
            return
        tokens = [r.next_token for r in decoding if r.next_token is not None]
        launched = self._launch(decoding, tokens)
        if launched is None:
            return
        if self.decoder is None:                 # the plain step: read it at once
            self._deliver(launched, chained=False)
        else:                                    # read it after queueing the next one
            self._pending = launched

    def _running_now(self) -> list[_Request]:
        with self._lock:
            return list(self._running)

    def _can_chain(self, pending: _Launched) -> bool:
        """Whether the next decode step is the same batch as the one in flight: every request
        of it still running, and no other request with a token to feed (e.g. one whose
        pre-fill just ended)."""
        running = self._running_now()
        if any(r.cancelled or r.done or r not in running or r.state.constraint is not None
               for r in pending.requests):     # a grammar's mask needs the host's token
            return False
        return all(r.next_token is None for r in running)

    def _launch(self, requests: list[_Request], tokens: list[int] | torch.Tensor
                ) -> _Launched | None:
        """Queue one decode step for `requests` and the sampling of its tokens; None (and the
        requests failed) if it could not be queued."""
        rows = [r.row for r in requests]
        try:
            if self.decoder is not None:
                logits = self.decoder.step(rows, tokens)
            else:
                assert not isinstance(tokens, torch.Tensor)
                logits = decode_step(self.model, self.cache, rows, tokens)
            # Grammar masks are computed on the host while the device runs the step.
            sample = self.sampler.launch(rows, logits, self._masks(requests))
        except Exception as e:
            log.exception("decode step failed")
            for request in requests:
                self._fail(request, f"decode failed: {e}")
            return None
        for request in requests:
            request.next_token = None            # fed to the model; its successor is in flight
        return _Launched(requests, sample)

    def _masks(self, requests: list[_Request]) -> Masks | None:
        """The allowed-token bitmasks of the requests under a grammar, if any is. A request
        whose grammar matcher fails fails alone (its row then samples unmasked, unread)."""
        which = [i for i, r in enumerate(requests) if r.state.constraint is not None]
        if not which:
            return None
        masks = torch.empty(len(which), Constraint.mask_words(self.model.config.vocab_size),
                            dtype=torch.int32)
        for row, i in enumerate(which):
            constraint = requests[i].state.constraint
            assert constraint is not None
            try:
                constraint.fill(masks[row])
            except Mistral7BError as e:
                masks[row] = -1
                self._fail(requests[i], str(e))
        return which, masks

    def _deliver(self, launched: _Launched, chained: bool) -> None:
        """Read a decode step's tokens and send what each request adds. chained: the next step,
        already queued, took these tokens from the device, so they are not fed again."""
        try:
            results = launched.sample.results()
        except Exception as e:
            log.exception("sampling failed")
            for request in launched.requests:
                self._fail(request, f"sampling failed: {e}")
            return
        for request, result in zip(launched.requests, results, strict=True):
            if request.done or request.cancelled:   # e.g. it finished in the step before
                continue
            self._emit(request, result)
            if chained:
                request.next_token = None

    def _prefill_chunks(self, filling: list[_Request]) -> None:
        """The next chunk of the oldest pre-filling requests, as many as prefill_budget tokens
        allow (at least one), in one forward; requests whose prompt is then complete get their
        first token."""
        batch: list[_Request] = []
        chunks: list[list[int]] = []
        budget = self.prefill_budget
        for request in filling:
            chunk = request.prompt[request.prefilled:request.prefilled + self.prefill_chunk]
            if batch and len(chunk) > budget:
                break
            batch.append(request)
            chunks.append(chunk)
            budget -= len(chunk)
        rows = [r.row for r in batch]
        scoring = [i for i, r in enumerate(batch) if r.prompt_logprobs is not None]
        try:
            if scoring:     # every position's logits: the prompt's own log-probabilities
                logits, every = prefill_every_position(self.model, self.cache, rows, chunks)
                for i in scoring:
                    self._score_prompt(batch[i], chunks[i], every[i])
                del every
            else:
                logits = prefill(self.model, self.cache, rows, chunks,
                                 max(len(c) for c in chunks))
        except Exception as e:
            log.exception("pre-fill failed")
            for request in batch:
                self._fail(request, f"pre-fill failed: {e}")
            return
        done = []
        for i, (request, chunk) in enumerate(zip(batch, chunks, strict=True)):
            request.prefilled += len(chunk)
            if request.prefilled == len(request.prompt):
                done.append(i)
        for i in [i for i in done if batch[i].params.max_tokens == 0]:
            self._end_scored(batch[i])          # scored its prompt; generates nothing
        done = [i for i in done if batch[i].params.max_tokens > 0]
        if done:                                 # their first generated tokens
            self._sample([batch[i] for i in done], logits[done])

    def _score_prompt(self, request: _Request, chunk: list[int], logits: torch.Tensor) -> None:
        """Add the log-probabilities of the prompt tokens that this chunk's positions predict
        (position t of the chunk predicts the prompt's next token, if the prompt has one)."""
        assert request.prompt_logprobs is not None and request.params.prompt_logprobs is not None
        start = request.prefilled
        if start == 0:
            request.prompt_logprobs.append(PromptToken(request.prompt[0], None))
        following = request.prompt[start + 1:start + len(chunk) + 1]
        request.prompt_logprobs.extend(score_positions(logits, following,
                                                       request.params.prompt_logprobs))

    def _end_scored(self, request: _Request) -> None:
        """A request with max_tokens=0: its answer is its prompt's log-probabilities."""
        with self._lock:
            self._release(request)
        piece = StreamPiece("", [], finish_reason="length",
                            prompt_logprobs=request.prompt_logprobs)
        self._finish(request, EngineOutput(request.id, piece, True, "length",
                                           prompt_tokens=len(request.prompt)))

    def _sample(self, requests: list[_Request], logits: torch.Tensor) -> None:
        """Sample every request's next token from its row of `logits` in one batch (one copy to
        the host) and send what each adds."""
        try:
            results = self.sampler.sample([r.row for r in requests], logits,
                                          self._masks(requests))
        except Exception as e:
            log.exception("sampling failed")
            for request in requests:
                self._fail(request, f"sampling failed: {e}")
            return
        for i, request in enumerate(requests):
            if request.score:
                request.next_logprobs = torch.log_softmax(logits[i].float(), dim=-1).cpu()
        for request, result in zip(requests, results, strict=True):
            self._emit(request, result)

    def _emit(self, request: _Request, result: SampleResult) -> None:
        """Send what the request's sampled token adds."""
        try:
            piece = request.state.add_token(result)
        except Exception as e:  # e.g. a detokenizer bug on odd ids: this request alone fails
            log.exception("sampling failed for %s", request.id)
            self._fail(request, f"sampling failed: {e}")
            return
        reason = request.state.finish_reason
        request.next_token = piece.token_ids[0] if reason is None else None
        if request.prompt_logprobs is not None:          # with the first token
            piece.prompt_logprobs, request.prompt_logprobs = request.prompt_logprobs, None
        if reason is not None:
            with self._lock:
                self._release(request)
        self._finish(request, EngineOutput(
            request.id, piece, reason is not None, reason,
            prompt_tokens=len(request.prompt), completion_tokens=request.state.n_generated,
            next_logprobs=request.next_logprobs))

    def _fail(self, request: _Request, message: str) -> None:
        with self._lock:
            self._release(request)
        self._finish(request, EngineOutput(request.id, None, True, "error", error=message,
                                           prompt_tokens=len(request.prompt),
                                           completion_tokens=request.state.n_generated))

    def _release(self, request: _Request) -> None:
        """Give the request's row back to the pool (caller holds the lock)."""
        if request in self._running:
            self._running.remove(request)
            self._free_rows.append(request.row)
            self._free_rows.sort()
        if request in self._waiting:
            self._waiting.remove(request)

    def _finish(self, request: _Request, output: EngineOutput) -> None:
        if request.done:           # e.g. a step failed after this request had finished
            return
        if output.finished:
            request.done = True
            with self._lock:
                self._by_id.pop(request.id, None)
        try:
            request.on_output(output)
        except Exception:  # a consumer's bug must not stop the engine
            log.exception("output callback failed for %s", request.id)


def _no_text(ids: Sequence[int]) -> str:
    return ""


def run_requests(engine: Engine, prompts: Sequence[Sequence[int]],
                 params: Sequence[SamplingParams]) -> Iterator[tuple[int, StreamPiece]]:
    """Submit every prompt and yield (prompt index, piece) as pieces arrive; the last piece of
    each prompt has its finish_reason set. An engine that was not start()ed is driven here, in
    the caller's thread (run_once between pieces). Every prompt is checked before any is
    submitted. A consumer that stops early cancels what is left; a request that fails raises
    Mistral7BError with the engine's reason."""
    for i, out in _outputs(engine, prompts, params, score=False):
        if out.piece is not None:
            out.piece.finish_reason = out.finish_reason if out.finished else None
            yield i, out.piece


def score_prompts(engine: Engine, prompts: Sequence[Sequence[int]]) -> list[torch.Tensor]:
    """The float32 (vocab,) log-probabilities of the token after each prompt, through the
    engine's scheduler (driven here if it was not start()ed, like run_requests)."""
    scores: list[torch.Tensor | None] = [None] * len(prompts)
    for i, out in _outputs(engine, prompts, [_SCORING] * len(prompts), score=True):
        if out.next_logprobs is not None:
            scores[i] = out.next_logprobs
    return [s for s in scores if s is not None]


def _outputs(engine: Engine, prompts: Sequence[Sequence[int]], params: Sequence[SamplingParams],
             score: bool) -> Iterator[tuple[int, EngineOutput]]:
    for prompt, p in zip(prompts, params, strict=True):
        check_prompt(engine.model.config, prompt, p.max_tokens, p.logit_bias)
    arrived: queue.Queue[tuple[int, EngineOutput]] = queue.Queue()
    ids: list[str] = []
    try:
        # Inside the try: a submit that fails (e.g. a bad grammar) cancels those before it.
        for i, (prompt, p) in enumerate(zip(prompts, params, strict=True)):
            ids.append(engine.submit(prompt, p, functools.partial(_put, arrived, i),
                                     score=score))
        left = len(ids)
        while left:
            while not engine.started and arrived.empty():
                engine.run_once()
            i, out = arrived.get()
            if out.error is not None:
                raise Mistral7BError(out.error)
            if out.finished:
                left -= 1
            yield i, out
    finally:
        for request_id in ids:
            engine.cancel(request_id)


def _put(arrived: queue.Queue[tuple[int, EngineOutput]], index: int, out: EngineOutput) -> None:
    arrived.put((index, out))

