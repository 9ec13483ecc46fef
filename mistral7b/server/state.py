"""What the routes share: the served model's names, the loaded model and engine, the server's
status and settings."""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from typing import Literal

from mistral7b.engine import Engine
from mistral7b.engine.engine import score_prompts
from mistral7b.guardrails.moderation import Moderator
from mistral7b.llm import LLM
from mistral7b.server.errors import APIError
from mistral7b.server.metrics import Metrics

Status = Literal["loading", "ok", "draining", "failed"]
DEFAULT_MAX_REQUEST_BYTES = 4 * 2**20


@dataclass
class ServerState:
    """What the routes share. `llm` and `engine` are set once the model has loaded."""

    model_name: str                      # the id /v1/models reports
    aliases: tuple[str, ...] = ()        # other names a request's `model` may use
    api_key: str | None = None
    keepalive: float = 5.0               # seconds between SSE comments while nothing is sent
    disconnect_poll: float = 0.25
    status: Status = "loading"
    safe_prompt: bool = False            # every chat gets the guardrail prompt (--safe-prompt)
    moderate: str | None = None          # "input" | "output" | "both" (--moderate)
    llm: LLM | None = None
    engine: Engine | None = None
    moderator: Moderator | None = None   # scores through `engine`, like every request
    metrics: Metrics = field(default_factory=Metrics)
    max_request_bytes: int = DEFAULT_MAX_REQUEST_BYTES
    access_log: bool = False             # one log line per request (serve turns it on)

    @property
    def model_names(self) -> tuple[str, ...]:
        return (self.model_name, *self.aliases)

    def attach(self, llm: LLM, engine: Engine) -> None:
        self.llm, self.engine = llm, engine
        self.moderator = Moderator(llm, scorer=functools.partial(score_prompts, engine))
        self.metrics.track_engine(lambda: engine.stats().waiting,
                                  lambda: engine.stats().running)
        self.status = "ok"


def ready(state: ServerState) -> tuple[LLM, Engine]:
    if state.status != "ok" or state.llm is None or state.engine is None:
        message = {"loading": "the model is still loading; retry shortly",
                   "draining": "the server is shutting down",
                   "failed": "the model failed to load; see the server log"}.get(
                       state.status, "not ready")
        raise APIError(503, message, "service_unavailable", code=state.status)
    return state.llm, state.engine
