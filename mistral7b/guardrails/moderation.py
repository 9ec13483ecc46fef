"""Self-reflection moderation (paper §5.2): the model classifies a text itself.

The paper does not print its classifier prompt; this one is ours. It shows the model the
categories as lettered options, the text to judge (a user's prompt or an assistant's answer),
and asks for one letter. The answer is never parsed from generated text: each label is scored by
the model's log-probability of that label's tokens right after the prompt (a constrained
choice).

Small models favour some letters whatever the text (the first option, mostly), so the scores are
calibrated (contextual calibration, Zhao et al. 2021): the log-probabilities the same prompt
gets for a content-free text ("N/A") are subtracted, so that text scores every label equally.
The probabilities are then

    P(label) = softmax over labels of (logprob(label | text) - logprob(label | "N/A"))

The label is the most likely one. With a threshold t instead, a text is flagged when
P(acceptable) < t and labelled with its most likely unacceptable category.
On the default 135M model calibration lifts the category accuracy on unacceptable prompts from
0.31 to 0.42 and moves acceptable-prompt recall from 1.00 (nothing flagged) to ~0.80 on a
96-prompt sample of our evaluation set (BENCHMARKS.md has the whole-set numbers).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

import torch

from mistral7b.errors import InvalidArgumentError
from mistral7b.generate import check_prompt
from mistral7b.tokenizer import Message

if TYPE_CHECKING:
    from mistral7b.llm import LLM

Role = Literal["user", "assistant"]

# label -> (letter the model answers with, what the option says)
LABELS: dict[str, tuple[str, str]] = {
    "acceptable": ("A", "acceptable: an ordinary request or answer. General information about "
                        "law, medicine, money, history or security is acceptable, and so are "
                        "harmless uses of violent-sounding words (kill a process, shoot a "
                        "photo)."),
    "illegal": ("B", "illegal activities: helping to commit a crime, such as terrorism, child "
                     "abuse, fraud, theft, hacking into systems, or making weapons or drugs."),
    "hateful": ("C", "hateful, harassing or violent content: attacking people for who they are, "
                     "threats, bullying, encouraging violence or self-harm."),
    "unqualified_advice": ("D", "unqualified advice: deciding a person's own legal, medical or "
                                "financial matter in place of a qualified professional (a "
                                "dose, a diagnosis, a court defence, where to put all their "
                                "savings)."),
}
CATEGORIES = [label for label in LABELS if label != "acceptable"]
MAX_TEXT_CHARS = 8000


@dataclass
class ModerationResult:
    text: str
    role: Role
    label: str                        # "acceptable" or one of CATEGORIES
    flagged: bool
    probabilities: dict[str, float]   # over LABELS, summing to 1
    logprobs: dict[str, float]        # the model's raw log-probability of each label's tokens

    def to_dict(self) -> dict[str, object]:
        return {"text": self.text, "role": self.role, "label": self.label,
                "flagged": self.flagged,
                "probabilities": {k: round(v, 6) for k, v in self.probabilities.items()}}


def classifier_messages(text: str, role: Role) -> list[Message]:
    """Our classifier prompt as a conversation; the chat format of the model renders it."""
    if role not in ("user", "assistant"):
        raise InvalidArgumentError(f"role: expected 'user' or 'assistant' (got {role!r})")
    if not text.strip():
        raise InvalidArgumentError("text: nothing to moderate (empty)")
    if len(text) > MAX_TEXT_CHARS:
        raise InvalidArgumentError(f"text: {len(text)} characters; at most {MAX_TEXT_CHARS} "
                                   "can be moderated at once")
    what = "a user's message to an AI assistant" if role == "user" else \
        "an AI assistant's answer"
    options = "\n".join(f"{letter}) {description}" for letter, description in LABELS.values())
    letters = ", ".join(letter for letter, _ in LABELS.values())
    return [
        {"role": "system", "content": "You are a careful content moderator. You classify "
                                      "texts; you never answer them."},
        {"role": "user", "content": f"Classify {what} into exactly one category.\n\n{options}\n"
                                    f"\nThe text:\n\"\"\"\n{text.strip()}\n\"\"\"\n\n"
                                    f"Reply with one letter: {letters}."},
    ]


def label_token_ids(llm: LLM) -> dict[str, list[int]]:
    """The tokens each label's letter is, as the first word of the assistant's reply."""
    out = {}
    for label, (letter, _) in LABELS.items():
        ids = llm.tokenizer.encode(letter, bos=False)
        if not ids:
            raise InvalidArgumentError(f"the tokenizer encodes the label {letter!r} as nothing")
        out[label] = ids
    return out


CONTENT_FREE = "N/A"


Scorer = Callable[[list[list[int]]], list[torch.Tensor]]
"""Maps prompts (token ids) to the (vocab,) log-probabilities of the token after each."""


class Moderator:
    """Classifies texts with `llm`; the calibration scores are computed once per role.

    Every prompt is scored by `scorer`: by default `llm.next_token_logprobs` (an engine of its
    own, driven in the caller's thread); the server passes its running engine's, so moderation
    is scheduled with the generations instead of running the model beside them."""

    def __init__(self, llm: LLM, calibrate: bool = True, batch_size: int = 8,
                 scorer: Scorer | None = None) -> None:
        self.llm, self.calibrate, self.batch_size = llm, calibrate, max(1, batch_size)
        self.labels = label_token_ids(llm)
        self.scorer: Scorer = scorer if scorer is not None else llm.next_token_logprobs
        self._baseline: dict[str, dict[str, float]] = {}

    def baseline(self, role: Role) -> dict[str, float]:
        """Label log-probabilities for the content-free text (all zero without calibration)."""
        if not self.calibrate:
            return dict.fromkeys(LABELS, 0.0)
        if role not in self._baseline:
            self._baseline[role] = self._logprobs([CONTENT_FREE], role)[0]
        return self._baseline[role]

    def classify(self, texts: Sequence[str], role: Role = "user",
                 threshold: float | None = None) -> list[ModerationResult]:
        if threshold is not None and not 0.0 <= threshold <= 1.0:
            raise InvalidArgumentError(f"threshold must be in [0, 1] (got {threshold})")
        base = self.baseline(role)
        return [_result(text, role, logprobs, base, threshold)
                for text, logprobs in zip(texts, self._logprobs(texts, role), strict=True)]

    def _logprobs(self, texts: Sequence[str], role: Role) -> list[dict[str, float]]:
        prompts = [self.llm.tokenizer.encode_chat(classifier_messages(t, role)) for t in texts]
        for p in prompts:
            check_prompt(self.llm.config, p, 1)
        out: list[dict[str, float]] = []
        for start in range(0, len(prompts), self.batch_size):
            out += self._label_logprobs(prompts[start:start + self.batch_size])
        return out

    def _label_logprobs(self, prompts: list[list[int]]) -> list[dict[str, float]]:
        """log P(label tokens | prompt) for every prompt and label. A label of several tokens
        is teacher-forced: prompt + its first k tokens is scored for token k."""
        index: dict[tuple[int, tuple[int, ...]], int] = {}     # (prompt, forced) -> score
        for b in range(len(prompts)):
            for ids in self.labels.values():
                for k in range(len(ids)):
                    index.setdefault((b, tuple(ids[:k])), len(index))
        scores = self.scorer([prompts[b] + list(forced) for b, forced in index])
        return [{label: sum(float(scores[index[(b, tuple(ids[:k]))]][t])
                            for k, t in enumerate(ids))
                 for label, ids in self.labels.items()}
                for b in range(len(prompts))]


def moderate(llm: LLM, texts: Sequence[str], role: Role = "user",
             threshold: float | None = None) -> list[ModerationResult]:
    """Classify each text with the LLM's Moderator (its calibration is computed once)."""
    return llm.moderator.classify(texts, role, threshold)


def _result(text: str, role: Role, logprobs: dict[str, float], baseline: dict[str, float],
            threshold: float | None) -> ModerationResult:
    calibrated = {k: v - baseline[k] for k, v in logprobs.items()}
    top = max(calibrated.values())
    weights = {k: math.exp(v - top) for k, v in calibrated.items()}
    total = sum(weights.values())
    probabilities = {k: w / total for k, w in weights.items()}
    if threshold is None:
        label = max(probabilities, key=lambda k: probabilities[k])
    else:
        flagged = probabilities["acceptable"] < threshold
        label = max(CATEGORIES, key=lambda c: probabilities[c]) if flagged else "acceptable"
    return ModerationResult(text, role, label, label != "acceptable", probabilities, logprobs)


SHORT_NAMES = {"illegal": "illegal activities",
               "hateful": "hateful, harassing or violent content",
               "unqualified_advice": "unqualified legal, medical or financial advice"}


def refusal_message(result: ModerationResult) -> str:
    """What a chat answers instead, when moderation flags the request or the answer."""
    what = "this request" if result.role == "user" else "that answer"
    return (f"Sorry, I can't help with {what}: the model's self-moderation classified it as "
            f"{SHORT_NAMES.get(result.label, result.label)}.")
