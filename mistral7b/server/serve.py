"""`mistral7b serve`: uvicorn running the API of app.py, with the model loading in the
background (GET /health says 503 until it is ready) and a draining shutdown on SIGTERM/SIGINT:
stop taking requests, let running ones finish (at most `drain_timeout` seconds), exit 0."""

from __future__ import annotations

import logging
import socket
import sys
import threading
from collections.abc import Callable
from dataclasses import dataclass
from types import FrameType

import uvicorn

from mistral7b.engine import Engine
from mistral7b.errors import InvalidArgumentError, Mistral7BError
from mistral7b.llm import LLM
from mistral7b.server.app import ServerState, create_app

log = logging.getLogger("mistral7b")


@dataclass
class ServeOptions:
    host: str = "127.0.0.1"
    port: int = 8000
    api_key: str | None = None
    max_batch: int = 16
    max_queue: int = 256
    prefill_chunk: int = 256
    drain_timeout: float = 30.0
    keepalive: float = 5.0
    safe_prompt: bool = False            # the guardrail prompt in every chat
    moderate: str | None = None          # "input" | "output" | "both"


class _DrainingServer(uvicorn.Server):
    """uvicorn's server, which on a shutdown signal first tells the API it is draining."""

    def __init__(self, config: uvicorn.Config, state: ServerState) -> None:
        super().__init__(config)
        self.state = state

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        if self.state.status in ("ok", "loading"):
            print("mistral7b: shutting down: finishing running requests "
                  f"(at most {self.config.timeout_graceful_shutdown} s)", file=sys.stderr,
                  flush=True)
        self.state.status = "draining"
        if self.state.engine is not None:
            self.state.engine.close()
        super().handle_exit(sig, frame)
        # uvicorn re-raises the signal after its shutdown, so the process would die of it;
        # a drained shutdown is a normal exit (status 0).
        self._captured_signals.clear()


def _check_port(host: str, port: int) -> None:
    """Fail with a one-line message, before loading anything, if the address is taken."""
    if not 0 <= port <= 65535:
        raise InvalidArgumentError(f"--port must be in 0..65535 (got {port})")
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror as e:
        raise InvalidArgumentError(f"--host {host!r}: cannot resolve ({e.strerror})") from None
    family, kind, proto, _, address = infos[0]
    with socket.socket(family, kind, proto) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind(address)
        except OSError as e:
            raise InvalidArgumentError(f"cannot listen on {host}:{port}: {e.strerror}") from None


def serve(load: Callable[[], LLM], model_name: str, options: ServeOptions) -> int:
    """Run the server until a shutdown signal; returns the process exit status."""
    if options.max_batch < 1 or options.max_queue < 0 or options.prefill_chunk < 1:
        raise InvalidArgumentError("--max-batch and --prefill-chunk must be >= 1, --max-queue "
                                   ">= 0")
    _check_port(options.host, options.port)
    state = ServerState(model_name=model_name, api_key=options.api_key,
                        keepalive=options.keepalive, safe_prompt=options.safe_prompt,
                        moderate=options.moderate)
    app = create_app(state)
    config = uvicorn.Config(app, host=options.host, port=options.port, log_level="warning",
                            access_log=False, timeout_graceful_shutdown=int(options.drain_timeout),
                            timeout_keep_alive=5)
    server = _DrainingServer(config, state)
    failure: list[str] = []

    def load_model() -> None:
        try:
            llm = load()
            engine = Engine(llm.model, llm.tokenizer, options.max_batch, options.max_queue,
                            options.prefill_chunk, llm.cache_dtype)
            engine.start()
            if state.status == "draining":     # a signal arrived while loading
                engine.stop()
                return
            state.attach(llm, engine)
            print(f"mistral7b: {model_name} ready (max batch {options.max_batch}, queue "
                  f"{options.max_queue})", file=sys.stderr, flush=True)
        except Mistral7BError as e:
            failure.append(str(e))
            state.status = "failed"
            server.should_exit = True
        except Exception as e:  # a bug: keep its traceback in the log
            log.exception("loading the model failed")
            failure.append(f"loading the model failed: {e}")
            state.status = "failed"
            server.should_exit = True

    base = f"http://{options.host}:{options.port}"
    print(f"mistral7b: serving {model_name} at {base}/v1 (OpenAI API; health: {base}/health, "
          f"metrics: {base}/metrics); loading the model...", file=sys.stderr, flush=True)
    loader = threading.Thread(target=load_model, name="mistral7b-load", daemon=True)
    loader.start()
    server.run()
    loader.join(timeout=5)
    if state.engine is not None:
        state.engine.stop()
    if failure:
        print(f"mistral7b: error: {failure[0]}", file=sys.stderr)
        return 2
    print("mistral7b: stopped", file=sys.stderr, flush=True)
    return 0
