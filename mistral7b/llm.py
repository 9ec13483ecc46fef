"""LLM: a loaded model with its tokenizer — the object the public Python API hands out."""

from __future__ import annotations

import sys
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch

from mistral7b import tensor_parallel as tp
from mistral7b.config import ModelConfig
from mistral7b.default_model import default_model_path
from mistral7b.device import resolve_device
from mistral7b.engine.engine import Engine, run_requests, score_prompts
from mistral7b.errors import InvalidArgumentError
from mistral7b.generate import (
    GenerationResult,
    StreamPiece,
    all_logits,
    check_prompt,
    default_chunk_size,
)
from mistral7b.guardrails.moderation import ModerationResult, Moderator, Role
from mistral7b.guardrails.safety import SAFETY_PROMPT, with_safety_prompt
from mistral7b.loading import load_checkpoint
from mistral7b.loading.checkpoint import parse_dtype
from mistral7b.model import Transformer
from mistral7b.quant.hugepages import move_packed_weights
from mistral7b.quant.repack import repack_linears
from mistral7b.sampling import SamplingParams
from mistral7b.tokenizer import Message, MissingTokenizer, Tokenizer
from mistral7b.tools import CallStream, plan_tools, split_answer, with_calls

Prompt = str | Sequence[int]


class LLM:
    def __init__(self, model: Transformer, tokenizer: Tokenizer, dtype: torch.dtype,
                 path: Path | None = None, cache_dtype: torch.dtype | None = None,
                 compile: bool = False) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.dtype = dtype
        self.cache_dtype = cache_dtype or dtype     # of the rolling KV cache
        self.path = path
        self.compile = compile                      # torch.compile the GPU decode steps
        self._moderator: Moderator | None = None

    @property
    def config(self) -> ModelConfig:
        return self.model.config

    @property
    def device(self) -> torch.device:
        return self.model.device

    # ---- scoring --------------------------------------------------------------------------

    def logits(self, prompt: Prompt, chunk_size: int | None = None) -> torch.Tensor:
        """(T, vocab) float32 logits for every position of a text (encoded with BOS, as
        generate does) or of token ids, pre-filled in chunks (default: the sliding window).
        Chunked, one-shot and token-by-token give the same numbers."""
        ids = self.encode_prompt(prompt)
        check_prompt(self.config, ids)
        return all_logits(self.model, ids, self._chunk(chunk_size), self.cache_dtype)

    # ---- generation -----------------------------------------------------------------------

    def encode_prompt(self, prompt: Prompt) -> list[int]:
        """Text gets the tokenizer's BOS; a list of ids is used as given."""
        if isinstance(prompt, str):
            return self.tokenizer.encode(prompt, bos=True)
        if isinstance(prompt, (bytes, bytearray)) or not isinstance(prompt, Sequence):
            raise InvalidArgumentError(f"prompt: expected a str or a sequence of token ids "
                                       f"(got {type(prompt).__name__})")
        ids = []
        for i, t in enumerate(prompt):
            if isinstance(t, bool) or not isinstance(t, (int, torch.Tensor)):
                raise InvalidArgumentError(f"prompt[{i}]: token ids must be integers (got "
                                           f"{type(t).__name__})")
            ids.append(int(t))
        return ids

    def stream_generate(self, prompt: Prompt, params: SamplingParams | None = None,
                        chunk_size: int | None = None, safe_prompt: bool = False,
                        **sampling: Any) -> Iterator[StreamPiece]:
        """Yield pieces of text (with their token ids) as they are generated. Keyword arguments
        are SamplingParams fields: max_tokens, temperature, top_k, top_p, min_p,
        repetition_penalty, presence_penalty, frequency_penalty, seed, stop, stop_token_ids,
        ignore_eos, logprobs, top_logprobs, logit_bias. safe_prompt=True puts the paper's
        guardrail prompt and a blank line in front of a text prompt."""
        params = _params(params, sampling)
        ids = self.encode_prompt(_safe_text(prompt) if safe_prompt else prompt)
        for _, piece in self._stream([ids], [params], chunk_size):
            yield piece

    def generate(self, prompt: Prompt, params: SamplingParams | None = None,
                 chunk_size: int | None = None, safe_prompt: bool = False,
                 **sampling: Any) -> GenerationResult:
        """Complete a text (or token ids). safe_prompt=True puts the paper's guardrail prompt
        and a blank line in front of a text prompt (for chat models, prefer `chat`)."""
        return self.generate_batch([_safe_text(prompt) if safe_prompt else prompt], params,
                                   chunk_size, **sampling)[0]

    def generate_batch(self, prompts: Sequence[Prompt],
                       params: SamplingParams | Sequence[SamplingParams] | None = None,
                       chunk_size: int | None = None, **sampling: Any) -> list[GenerationResult]:
        """Generate for many prompts at once in one batch; each result is what the prompt gets
        alone (same greedy text, same seeded samples)."""
        if isinstance(params, SamplingParams) or params is None:
            per_prompt = [_params(params, sampling)] * len(prompts)
        else:
            per_prompt = list(params)
            if len(per_prompt) != len(prompts):
                raise InvalidArgumentError(f"params: {len(per_prompt)} SamplingParams for "
                                           f"{len(prompts)} prompts")
        if not prompts:
            return []
        ids = [self.encode_prompt(p) for p in prompts]
        parts: list[list[StreamPiece]] = [[] for _ in prompts]
        for i, piece in self._stream(ids, per_prompt, chunk_size):
            parts[i].append(piece)
        results = []
        for i, pieces in enumerate(parts):
            wanted = per_prompt[i].logprobs or per_prompt[i].top_logprobs > 0
            results.append(GenerationResult(
                text="".join(p.text for p in pieces),
                token_ids=[t for p in pieces for t in p.token_ids],
                finish_reason=pieces[-1].finish_reason or "length",
                prompt_tokens=len(ids[i]),
                logprobs=[lp for p in pieces for lp in p.logprobs] if wanted else None,
                top_logprobs=([tl for p in pieces for tl in p.top_logprobs]
                              if per_prompt[i].top_logprobs else None),
                prompt_logprobs=next((p.prompt_logprobs for p in pieces
                                      if p.prompt_logprobs is not None), None)))
        return results

    def chat(self, messages: Sequence[Message], params: SamplingParams | None = None,
             chunk_size: int | None = None, safe_prompt: bool = False,
             tools: Sequence[dict[str, Any]] | None = None, tool_choice: Any = None,
             **sampling: Any) -> GenerationResult:
        """Answer an OpenAI-style conversation ([{"role": ..., "content": ...}, ...]) in the
        model's chat format. safe_prompt=True makes the paper's guardrail prompt the system
        message, in front of the conversation's own system message if it has one.

        tools: OpenAI's function tools; tool_choice: "auto" (default), "none", "required" or
        {"type": "function", "function": {"name": ...}}. The calls the model makes are in
        result.tool_calls (finish_reason "tool_calls"); see tools.py for each format."""
        plan = plan_tools(self.tokenizer, None if tools is None else list(tools), tool_choice)
        if plan is None:
            return self.generate(self._chat_prompt(messages, safe_prompt), params, chunk_size,
                                 **sampling)
        prompt = self._chat_prompt(messages, safe_prompt, plan.shown)
        result = self.generate(prompt, plan.sampling(_params(params, sampling)), chunk_size)
        calls = split_answer(self.tokenizer, plan, result.token_ids, result.text)[1]
        if calls:
            result.tool_calls = calls
            result.finish_reason = with_calls(result.finish_reason, calls)
        return result

    def stream_chat(self, messages: Sequence[Message], params: SamplingParams | None = None,
                    chunk_size: int | None = None, safe_prompt: bool = False,
                    tools: Sequence[dict[str, Any]] | None = None, tool_choice: Any = None,
                    **sampling: Any) -> Iterator[StreamPiece]:
        """`chat`, streamed: yields pieces of the answer as they are generated (see
        stream_generate). With tools, text streams as it comes and the calls arrive on the last
        piece (`piece.tool_calls`, finish_reason "tool_calls"); the text of calls is not shown
        (tools.CallStream)."""
        plan = plan_tools(self.tokenizer, None if tools is None else list(tools), tool_choice)
        if plan is None:
            yield from self.stream_generate(self._chat_prompt(messages, safe_prompt), params,
                                            chunk_size, **sampling)
            return
        prompt = self._chat_prompt(messages, safe_prompt, plan.shown)
        split = CallStream(self.tokenizer, plan)
        for piece in self.stream_generate(prompt, plan.sampling(_params(params, sampling)),
                                          chunk_size):
            text = split.feed(piece.token_ids, piece.text)
            if piece.finish_reason is not None:
                rest, calls = split.finish()
                text += rest
                if calls:
                    piece.tool_calls = calls
                    piece.finish_reason = with_calls(piece.finish_reason, calls)
            piece.text = text
            yield piece

    def _chat_prompt(self, messages: Sequence[Message], safe_prompt: bool,
                     tools: Sequence[dict[str, Any]] | None = None) -> list[int]:
        if safe_prompt:
            messages = with_safety_prompt(messages)
        return self.tokenizer.encode_chat(messages, tools)

    def next_token_logprobs(self, prompts: Sequence[Sequence[int]],
                            chunk_size: int | None = None) -> list[torch.Tensor]:
        """The float32 (vocab,) log-probabilities of the token after each prompt (token ids),
        pre-filled through the engine like a generation (what moderation scores with)."""
        if not prompts:
            return []
        engine = self.engine(max_batch=len(prompts), max_queue=len(prompts),
                             prefill_chunk=self._chunk(chunk_size))
        try:
            return score_prompts(engine, prompts)
        finally:
            engine.stop()

    @property
    def moderator(self) -> Moderator:
        """This model's self-reflection classifier, made on first use."""
        if self._moderator is None:
            self._moderator = Moderator(self)
        return self._moderator

    def moderate(self, text: str, role: Role = "user", threshold: float | None = None
                 ) -> ModerationResult:
        """Self-reflection moderation (paper §5.2): the model labels `text` (a user prompt, or an
        assistant answer with role="assistant") as acceptable or one of the paper's categories;
        see guardrails/moderation.py."""
        return self.moderator.classify([text], role, threshold)[0]

    def _stream(self, prompts: list[list[int]], params: list[SamplingParams],
                chunk_size: int | None) -> Iterator[tuple[int, StreamPiece]]:
        has_text = not isinstance(self.tokenizer, MissingTokenizer)
        if not has_text and any(p.stop for p in params):
            self.tokenizer.decode([])  # raises the tokenizer's explanation
        if not prompts:
            return
        # One engine per call, sized for its prompts and driven from this thread: the same
        # scheduler as the server, so a prompt gets the same tokens here, batched with others,
        # and there.
        engine = self.engine(max_batch=len(prompts), max_queue=len(prompts),
                             prefill_chunk=self._chunk(chunk_size))
        try:
            yield from run_requests(engine, prompts, params)
        finally:
            engine.stop()

    def engine(self, max_batch: int = 16, max_queue: int = 256, prefill_chunk: int = 256
               ) -> Engine:
        """A continuous-batching engine over this model (not started: call start() to run it
        in a thread, or let run_requests drive it); CUDA-graph decode steps on a GPU."""
        return Engine(self.model, self.tokenizer, max_batch, max_queue, prefill_chunk,
                      self.cache_dtype, compile=self.compile)

    def _chunk(self, chunk_size: int | None) -> int:
        if chunk_size is not None and chunk_size < 1:
            raise InvalidArgumentError(f"chunk_size must be >= 1 (got {chunk_size})")
        return chunk_size if chunk_size is not None else default_chunk_size(self.config)


def _params(params: SamplingParams | None, overrides: dict[str, Any]) -> SamplingParams:
    if params is None:
        return SamplingParams(**overrides)
    if overrides:
        raise TypeError("pass either a SamplingParams or keyword arguments, not both")
    return params


def _safe_text(prompt: Prompt) -> str:
    if not isinstance(prompt, str):
        raise InvalidArgumentError("safe_prompt: needs a text prompt (token ids are used as "
                                   "given); for chat models use chat(..., safe_prompt=True)")
    return f"{SAFETY_PROMPT}\n\n{prompt}"


def load(path: str | Path | None = None, dtype: str | torch.dtype = "float32",
         device: str | torch.device = "cpu", progress: bool = True,
         sliding_window: int | None = None, dequantize: bool = False,
         quantize: str | None = None, prefill_dtype: str | torch.dtype = "float32",
         kv_cache_dtype: str | torch.dtype | None = None, compile: bool = False,
         tensor_parallel: bool = False) -> LLM:
    """Load a Mistral-family model: a .gguf file, a Mistral native or a Hugging Face directory;
    without a path, the embedded default model (SmolLM2-135M-Instruct).

    sliding_window: None keeps the checkpoint's (Mistral 7B v0.1 GGUFs, which carry no window
    key, get W = 4096); N > 0 forces a window of N tokens; 0 forces full attention.
    Quantized GGUF weights stay packed in memory (Q8_0/Q4_0/Q4_1 run on AVX2 kernels) unless
    dequantize=True, which expands them to `dtype` at load. quantize="q8_0" | "q4_0" | "q4_1"
    packs the float weights of a native or Hugging Face checkpoint at load.
    prefill_dtype="bfloat16" runs the pre-fill matmuls of packed weights in bfloat16: ~2.5x
    faster pre-fill on CPUs with AVX512-BF16 or AMX, but logits move by ~0.5 (see README).
    kv_cache_dtype: dtype of the rolling KV cache (default: `dtype`); "float16" halves its
    memory and the bytes attention reads per token.
    compile: on a GPU, pass the decode steps through torch.compile before capturing them as
    CUDA graphs (a minute or more of compiling; measured no faster, see BENCHMARKS.md).
    tensor_parallel: split the model over the processes torchrun started (tensor_parallel.py;
    joins the process group, or uses the one already initialised). Each rank reads only its
    slices. On every rank but 0 load() does not return: the process follows rank 0's forward
    passes and exits when rank 0's process does, so the code after load() runs on rank 0.
    """
    shard = None
    if tensor_parallel:
        device = tp.local_device(resolve_device(device))
        shard = tp.init(device)
        progress = progress and shard.is_leader
    device = resolve_device(device)
    torch_dtype = parse_dtype(dtype)
    resolved = Path(path) if path is not None else default_model_path()
    fill_dtype = parse_dtype(prefill_dtype)
    if fill_dtype not in (torch.float32, torch.bfloat16):
        raise InvalidArgumentError(f"prefill_dtype must be float32 or bfloat16 (got "
                                   f"{prefill_dtype!r})")
    if device.type != "cpu":
        if quantize is not None:
            raise InvalidArgumentError(f"quantize={quantize!r}: packed weights run on the CPU "
                                       f"only; on {device} load float weights")
        if resolved.suffix == ".gguf" and not dequantize:
            # The block-format kernels are CPU code: on a GPU the matrices become floats.
            dequantize = True
            if progress:
                print(f"mistral7b: dequantizing {resolved.name} to {torch_dtype} for {device} "
                      "(quantized GGUF matrices run on the CPU only)", file=sys.stderr)
    _, model, tokenizer = load_checkpoint(resolved, torch_dtype, device, progress, sliding_window,
                                        dequantize, quantize, shard)
    repack_linears(model)           # 8 rows at a time: fewer instructions per block in decode
    move_packed_weights(model)      # into huge pages: fewer TLB misses while decode streams them
    model.set_prefill_dtype(fill_dtype)
    if shard is not None:
        tp.attach(model, shard)
        if not shard.is_leader:
            tp.follow(model, shard)
            sys.exit(0)
    cache_dtype = None if kv_cache_dtype is None else parse_dtype(kv_cache_dtype)
    return LLM(model, tokenizer, torch_dtype, resolved, cache_dtype, compile)
