"""mistral7b as an EleutherAI lm-evaluation-harness model, registered as "mistral7b".

    import mistral7b.lm_eval_model          # registers the model
    lm_eval.simple_evaluate(model="mistral7b", model_args="path=model.gguf,batch_size=8", ...)

or `mistral7b eval`, which wraps this. Every request runs through the engine in batches:

    loglikelihood           context + continuation pre-filled as one prompt that keeps its own
                            log-probabilities (SamplingParams.prompt_logprobs, max_tokens=0); the
                            continuation's are summed, and it is greedy if each of its tokens was
                            the likeliest at its place
    loglikelihood_rolling   lm-eval's rolling windows, `max_length` tokens each: the model's
                            sliding window W when it has one (no token is scored against keys its
                            position can no longer see), else its context length
    generate_until          generation with the task's stop strings and token limit

Tokenization follows lm-eval's own (`TemplateLM`): a context's trailing spaces move to the
continuation, and the continuation's tokens are those of context + continuation past the
context's, so the numbers match lm-eval's `hf` model on the same weights and tokenizer.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator, Sequence
from typing import Any

import lm_eval.models  # noqa: F401  (first: lm-eval registers its own models only into an
import torch

#                                      empty registry, and ours would make it non-empty)
from lm_eval.api.instance import Instance
from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model
from lm_eval.utils import get_rolling_token_windows, make_disjoint_window
from tqdm import tqdm

from mistral7b.chat import render_chat_template
from mistral7b.engine.engine import Engine, run_requests, score_prompts
from mistral7b.errors import InvalidArgumentError
from mistral7b.generate import PromptToken
from mistral7b.llm import LLM, load
from mistral7b.sampling import SamplingParams

log = logging.getLogger("mistral7b")

# (context, continuation) as text, then their tokens
TokenRequest = tuple[tuple[str, str], list[int], list[int]]
# A prompt scored token by token, with the likeliest token at each place (is it greedy?).
_SCORE_PROMPT = SamplingParams(max_tokens=0, prompt_logprobs=1)


@register_model("mistral7b")
class Mistral7BLM(TemplateLM):
    """lm-eval's model interface over a loaded mistral7b model (or one it loads from `path`)."""

    def __init__(self, path: str | None = None, dtype: str = "float32", device: str = "cpu",
                 batch_size: int | str = 8, max_length: int | None = None,
                 llm: LLM | None = None, **unused: Any) -> None:
        super().__init__()
        if str(device).startswith("cuda") and not torch.cuda.is_available():
            # lm-eval's command line passes its default device, "cuda:0", to every model
            log.warning("device %s is not available here: running on the CPU", device)
            device = "cpu"
        self.llm = llm if llm is not None else load(path, dtype=dtype, device=device,
                                                    progress=False)
        size = str(batch_size)
        self.batch_size = 8 if size.startswith("auto") else int(size)  # "auto": lm-eval's probe
        if self.batch_size < 1:
            raise InvalidArgumentError(f"batch_size must be >= 1 (got {batch_size})")
        config = self.llm.config
        self._max_length = int(max_length) if max_length is not None else (
            config.sliding_window or config.max_seq_len)
        self._name = str(path or (self.llm.path.name if self.llm.path else "mistral7b"))

    # ---- what lm-eval asks of a model ---------------------------------------------------

    @property
    def eot_token_id(self) -> int:
        return min(self.llm.tokenizer.eos_ids)

    @property
    def prefix_token_id(self) -> int:
        """What an empty context is: BOS (EOS for a tokenizer without one), as lm-eval's hf."""
        bos = self.llm.tokenizer.bos_id
        return bos if bos is not None else self.eot_token_id

    @property
    def max_length(self) -> int:
        return self._max_length

    @property
    def tokenizer_name(self) -> str:
        return self._name

    def tok_encode(self, string: str, add_special_tokens: bool | None = None,
                   **kwargs: Any) -> list[int]:
        """The tokenizer's own BOS rule unless told (lm-eval's hf does the same)."""
        return self.llm.tokenizer.encode(string, bos=add_special_tokens is not False)

    def chat_template(self, chat_template: bool | str = False) -> str | None:
        return getattr(self.llm.tokenizer, "chat_template", None) if chat_template else None

    def apply_chat_template(self, chat_history: list[dict[str, str]],
                            add_generation_prompt: bool = True) -> str:
        """The conversation as text in the model's Jinja chat template (what lm-eval then
        tokenizes); Mistral's own formats are tokens, not text, and are refused."""
        template = getattr(self.llm.tokenizer, "chat_template", None)
        if not template:
            raise InvalidArgumentError(f"--apply-chat-template: {self._name} has no Jinja chat "
                                       "template to render conversations as text")
        tokenizer: Any = self.llm.tokenizer
        return render_chat_template(template, chat_history, bos_token=tokenizer.bos_token,
                                    eos_token=tokenizer.eos_token,
                                    add_generation_prompt=add_generation_prompt)

    def _loglikelihood_tokens(self, requests: list[TokenRequest], disable_tqdm: bool = False,
                              **kwargs: Any) -> list[tuple[float, bool]]:
        """Each continuation's summed log-probability and whether greedy decoding gives it.
        One-token continuations of the same context (a multiple-choice question's choices)
        share one pass over the context, whose next-token distribution scores them all (as
        lm-eval's hf model does)."""
        out: list[tuple[float, bool]] = [(0.0, False)] * len(requests)
        by_context: dict[tuple[int, ...], list[int]] = {}
        longer: list[int] = []
        for i, (_, context, continuation) in enumerate(requests):
            if len(continuation) == 1 and context:
                by_context.setdefault(tuple(self._fit(context, room=1)), []).append(i)
            else:
                longer.append(i)
        with self._engine(len(requests)) as engine, \
                tqdm(total=len(requests), desc="loglikelihood", disable=disable_tqdm) as bar:
            keys = list(by_context)
            for key, dist in zip(keys, score_prompts(engine, keys), strict=True):
                best = int(dist.argmax())
                for i in by_context[key]:
                    token = requests[i][2][0]
                    out[i] = (float(dist[token]), token == best)
                bar.update(len(by_context[key]))
            prompts = [self._fit(requests[i][1] + requests[i][2]) for i in longer]
            scored = self._collect(engine, prompts, [_SCORE_PROMPT] * len(prompts), bar)
            for i, (_, tokens) in zip(longer, scored, strict=True):
                tail = tokens[len(tokens) - len(requests[i][2]):]
                out[i] = (sum(t.logprob for t in tail if t.logprob is not None),
                          all(t.top and t.top[0][0] == t.token_id for t in tail))
        return out

    def loglikelihood_rolling(self, requests: list[Instance], disable_tqdm: bool = False
                              ) -> list[float]:
        """A whole text's log-probability, over lm-eval's rolling windows of max_length."""
        windows: list[TokenRequest] = []
        owners = []
        for i, request in enumerate(requests):
            (text,) = request.args
            for pair in get_rolling_token_windows(self.tok_encode(text), self.prefix_token_id,
                                                  self.max_length, context_len=1):
                context, continuation = make_disjoint_window(pair)
                windows.append((("", ""), context, continuation))
                owners.append(i)
        totals = [0.0] * len(requests)
        for owner, (logprob, _) in zip(owners, self._loglikelihood_tokens(windows, disable_tqdm),
                                       strict=True):
            totals[owner] += logprob
        return totals

    def generate_until(self, requests: list[Instance], disable_tqdm: bool = False
                       ) -> list[str]:
        prompts, params = [], []
        for request in requests:
            context, options = request.args
            options = dict(options or {})
            until = options.pop("until", None) or []
            until = [until] if isinstance(until, str) else list(until)
            limit = int(options.pop("max_gen_toks", 256))
            sample = bool(options.pop("do_sample", False))
            temperature = float(options.pop("temperature", 0.0)) if sample else 0.0
            prompts.append(self._fit(self.tok_encode(context), room=limit))
            params.append(SamplingParams(max_tokens=limit, temperature=temperature,
                                         stop=tuple(s for s in until if s)))
        return [text for text, _ in self._run(prompts, params, "generate_until", disable_tqdm)]

    # ---- running requests through the engine --------------------------------------------

    def _fit(self, ids: list[int], room: int = 0) -> list[int]:
        """A model without a sliding window keeps the last tokens that fit its context (as
        lm-eval's hf does); with a window any length runs."""
        config = self.llm.config
        if config.sliding_window is None and len(ids) + room > config.max_seq_len:
            return ids[-(config.max_seq_len - room):]
        return ids

    @contextlib.contextmanager
    def _engine(self, n: int) -> Iterator[Engine]:
        """An engine for n requests, batch_size at a time, driven from this thread."""
        engine = self.llm.engine(max_batch=self.batch_size, max_queue=max(n, 1),
                                 prefill_chunk=min(self.max_length, 512))
        try:
            yield engine
        finally:
            engine.stop()

    def _run(self, prompts: Sequence[list[int]], params: Sequence[SamplingParams], what: str,
             disable_tqdm: bool) -> list[tuple[str, list[PromptToken]]]:
        with self._engine(len(prompts)) as engine, \
                tqdm(total=len(prompts), desc=what, disable=disable_tqdm) as bar:
            return self._collect(engine, prompts, params, bar)

    @staticmethod
    def _collect(engine: Engine, prompts: Sequence[list[int]],
                 params: Sequence[SamplingParams], bar: tqdm
                 ) -> list[tuple[str, list[PromptToken]]]:
        """Each prompt's generated text and scored prompt tokens."""
        texts = [""] * len(prompts)
        scores: list[list[PromptToken]] = [[] for _ in prompts]
        if not prompts:
            return []
        for i, piece in run_requests(engine, prompts, params):
            texts[i] += piece.text
            if piece.prompt_logprobs is not None:
                scores[i] = piece.prompt_logprobs
            if piece.finish_reason is not None:
                bar.update(1)
        return list(zip(texts, scores, strict=True))


if __name__ == "__main__":
    # lm-eval's own command line with this model registered (lm-eval 0.4 loads no plugins):
    #   python -m mistral7b.lm_eval_model run --model mistral7b --model_args path=M --tasks T
    #       --batch_size 8
    from lm_eval.__main__ import cli_evaluate

    cli_evaluate()
