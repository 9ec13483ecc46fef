"""Starting and stopping the API server in-process, for the server and guardrail tests."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import openai
import uvicorn

import mistral7b
from mistral7b.engine import Engine
from mistral7b.server.app import create_app
from mistral7b.server.state import ServerState

CHUNK = 64   # the engine's pre-fill chunk in these tests
MODEL = "smollm2-test"   # the model name the test servers serve


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


ServerFactory = Callable[[uvicorn.Config, ServerState], uvicorn.Server]


def _plain_server(config: uvicorn.Config, state: ServerState) -> uvicorn.Server:
    return uvicorn.Server(config)


@dataclass
class Running:
    url: str
    state: ServerState
    engine: Engine

    def client(self, key: str = "unused") -> openai.OpenAI:
        return openai.OpenAI(base_url=f"{self.url}/v1", api_key=key, max_retries=0, timeout=120)


def start_server(llm: mistral7b.LLM, start_engine: bool = True,
                 state_args: dict[str, Any] | None = None,
                 make_server: ServerFactory | None = None, **engine_args: int
                 ) -> tuple[Running, uvicorn.Server, threading.Thread]:
    """`state_args` go to ServerState; `make_server(config, state)` builds the server (default:
    a plain uvicorn.Server)."""
    engine = Engine(llm.model, llm.tokenizer, **{"max_batch": 16, "max_queue": 64,
                                                 "prefill_chunk": CHUNK, **engine_args})
    if start_engine:
        engine.start()
    state = ServerState(**{"model_name": MODEL, "keepalive": 0.05, "disconnect_poll": 0.05,
                           **(state_args or {})})
    state.attach(llm, engine)
    url, server, thread = serve_app(state, make_server)
    return Running(url, state, engine), server, thread


def serve_app(state: ServerState, make_server: ServerFactory | None = None
              ) -> tuple[str, uvicorn.Server, threading.Thread]:
    """The API of `state` on a free local port, in a thread; returns its base URL."""
    port = free_port()
    config = uvicorn.Config(create_app(state), host="127.0.0.1", port=port, log_level="warning")
    server = (make_server or _plain_server)(config, state)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert time.monotonic() < deadline, "server did not start"
        time.sleep(0.02)
    return f"http://127.0.0.1:{port}", server, thread


def stop_server(server: uvicorn.Server, thread: threading.Thread, engine: Engine) -> None:
    engine.stop()
    server.should_exit = True
    thread.join(timeout=30)
