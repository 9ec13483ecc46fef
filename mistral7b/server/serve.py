"""`mistral7b serve`: uvicorn running the API of app.py, with the model loading in the
background (GET /health says 503 until it is ready) and a draining shutdown on SIGTERM/SIGINT:

1. the listener stays open: /health answers 503 {"status": "draining"} and new generation
   requests get 503, so a load balancer takes this replica out while it finishes;
2. running requests finish, for at most `drain_timeout` seconds; those still running then end
   with an error (a stream gets an error event and [DONE], never a cut connection);
3. the server closes its listener and exits 0. A second signal exits at once."""

from __future__ import annotations

import logging
import socket
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from types import FrameType

import uvicorn

from mistral7b.errors import InvalidArgumentError, Mistral7BError
from mistral7b.llm import LLM
from mistral7b.server.app import create_app
from mistral7b.server.state import DEFAULT_MAX_REQUEST_BYTES, ServerState

log = logging.getLogger("mistral7b")


# After the drain, how long uvicorn may take to send what the last responses still hold.
FLUSH_SECONDS = 5


@dataclass
class ServeOptions:
    host: str = "127.0.0.1"
    port: int = 8000
    # The first is the id /v1/models reports; the others are aliases a request may use.
    served_model_names: list[str] = field(default_factory=lambda: ["mistral7b"])
    api_key: str | None = None
    max_batch: int = 16
    max_queue: int = 256
    prefill_chunk: int = 256
    drain_timeout: float = 30.0
    keepalive: float = 5.0
    safe_prompt: bool = False            # the guardrail prompt in every chat
    moderate: str | None = None          # "input" | "output" | "both"
    max_request_bytes: int = DEFAULT_MAX_REQUEST_BYTES   # larger bodies get 413
    access_log: bool = True              # one line per request on stderr (--quiet: off)


class DrainingServer(uvicorn.Server):
    """uvicorn's server, which on a shutdown signal drains before it stops listening."""

    def __init__(self, config: uvicorn.Config, state: ServerState, drain_timeout: float
                 ) -> None:
        super().__init__(config)
        self.state = state
        self.drain_timeout = drain_timeout
        self._drainer: threading.Thread | None = None

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        if self._drainer is not None or self.state.engine is None:  # a second signal, or loading
            self.state.status = "draining"
            super().handle_exit(sig, frame)
            if self._drainer is not None:
                self.force_exit = True
        else:
            self.begin_drain()
        # uvicorn re-raises a captured signal after its shutdown, so the process would die of
        # it; a drained shutdown is a normal exit (status 0).
        self._captured_signals.clear()

    def begin_drain(self) -> None:
        """Answer 503 to new work, finish what runs (bounded), then stop (any thread)."""
        engine = self.state.engine
        assert engine is not None
        print("mistral7b: shutting down: finishing running requests (at most "
              f"{self.drain_timeout:g} s; /health answers 503 meanwhile)", file=sys.stderr,
              flush=True)
        self.state.status = "draining"
        engine.close()

        def drain() -> None:
            if not engine.drain(self.drain_timeout):
                print("mistral7b: drain timed out: ending the requests still running",
                      file=sys.stderr, flush=True)
                engine.stop(f"the server shut down before this request finished (drain "
                            f"timeout of {self.drain_timeout:g} s)")
            time.sleep(0.2)          # let the routes hand the last outputs to their clients
            self.should_exit = True

        self._drainer = threading.Thread(target=drain, name="mistral7b-drain", daemon=True)
        self._drainer.start()


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


def serve(load: Callable[[], LLM], options: ServeOptions) -> int:
    """Run the server until a shutdown signal; returns the process exit status."""
    if options.max_batch < 1 or options.max_queue < 0 or options.prefill_chunk < 1:
        raise InvalidArgumentError("--max-batch and --prefill-chunk must be >= 1, --max-queue "
                                   ">= 0")
    if options.max_request_bytes < 1:
        raise InvalidArgumentError(f"--max-request-bytes must be >= 1 (got "
                                   f"{options.max_request_bytes})")
    if options.drain_timeout < 0:
        raise InvalidArgumentError(f"--drain-timeout must be >= 0 (got {options.drain_timeout})")
    names = [n for n in options.served_model_names if n.strip()]
    if not names:
        raise InvalidArgumentError("--served-model-name: give a non-empty name")
    model_name = names[0]
    _check_port(options.host, options.port)
    state = ServerState(model_name=model_name, aliases=tuple(dict.fromkeys(names[1:])),
                        api_key=options.api_key, keepalive=options.keepalive,
                        safe_prompt=options.safe_prompt, moderate=options.moderate,
                        max_request_bytes=options.max_request_bytes,
                        access_log=options.access_log)
    app = create_app(state)
    config = uvicorn.Config(app, host=options.host, port=options.port, log_level="warning",
                            access_log=False, timeout_graceful_shutdown=FLUSH_SECONDS,
                            timeout_keep_alive=5)
    server = DrainingServer(config, state, options.drain_timeout)
    failure: list[str] = []

    def load_model() -> None:
        try:
            llm = load()
            engine = llm.engine(options.max_batch, options.max_queue, options.prefill_chunk)
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
