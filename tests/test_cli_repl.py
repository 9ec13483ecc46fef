"""The interactive `chat`, driven through a pseudo-terminal as a person would: line editing,
history, /help, /exit."""

from __future__ import annotations

import os
import re
import select
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

pty = pytest.importorskip("pty")      # POSIX only
termios = pytest.importorskip("termios")

# Bounds against a hang, never a measure of speed.
TIMEOUT = 120.0

LEFT, UP = "\x1b[D", "\x1b[A"


class Terminal:
    """A child process on a pseudo-terminal: send keys, wait for text."""

    def __init__(self, args: list[str]) -> None:
        import fcntl
        import struct

        self.master, slave = pty.openpty()
        # 40 rows x 200 columns, so that readline never wraps our short lines.
        fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 200, 0, 0))
        env = {**os.environ, "TERM": "dumb"}
        self.proc = subprocess.Popen(args, stdin=slave, stdout=slave, stderr=slave, env=env,
                                     close_fds=True)
        os.close(slave)
        self.output = ""
        self.pos = 0                  # where the next expect() starts looking

    def _read(self, timeout: float) -> bool:
        ready, _, _ = select.select([self.master], [], [], timeout)
        if not ready:
            return True
        try:
            data = os.read(self.master, 4096)
        except OSError:               # the child closed the terminal (it exited)
            return False
        if not data:
            return False
        self.output += data.decode("utf-8", errors="replace")
        return True

    def expect(self, pattern: str) -> re.Match[str]:
        """Wait until `pattern` (a regex) appears after the last match; return the match."""
        deadline = time.monotonic() + TIMEOUT
        regex = re.compile(pattern)
        while True:
            match = regex.search(self.output, self.pos)
            if match:
                self.pos = match.end()
                return match
            left = deadline - time.monotonic()
            more = left > 0 and self._read(min(left, 1.0))
            if left <= 0 or (not more and self.proc.poll() is not None):
                raise AssertionError(f"{pattern!r} not seen; the terminal shows:\n"
                                     f"{self.output[self.pos:]!r}")

    def send(self, keys: str) -> None:
        os.write(self.master, keys.encode())

    def wait(self) -> int:
        deadline = time.monotonic() + TIMEOUT
        while self.proc.poll() is None and time.monotonic() < deadline:
            self._read(0.2)
        return self.proc.wait(timeout=1)

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        os.close(self.master)


@pytest.fixture
def chat(native_v1_dir: Path) -> Iterator[Terminal]:
    terminal = Terminal([sys.executable, "-m", "mistral7b", "chat", "--model",
                         str(native_v1_dir), "-n", "2", "--temperature", "0", "--ignore-eos"])
    yield terminal
    terminal.close()


PROMPT = "> "


def test_help_lists_the_commands(chat: Terminal) -> None:
    chat.expect("Chatting with")
    chat.expect(PROMPT)
    chat.send("/help\r")
    help_text = chat.expect(r"commands: [^\r\n]*").group(0)
    for command in ("/help", "/reset", "/system", "/exit", "Ctrl-D"):
        assert command in help_text
    chat.expect(PROMPT)
    chat.send("/nope\r")
    chat.expect(r"unknown command /nope")
    chat.expect(PROMPT)
    chat.send("/exit\r")
    assert chat.wait() == 0


def test_arrow_keys_edit_the_line_and_recall_history(chat: Terminal) -> None:
    chat.expect(PROMPT)
    # Type "/helo", go back one character, insert the missing "l": readline makes "/hello".
    # Without line editing the command would arrive as "/helo\x1b[Dl".
    chat.send(f"/helo{LEFT}l\r")
    assert chat.expect(r"unknown command ([^\s;]+)").group(1) == "/hello"
    chat.expect(PROMPT)
    chat.send(f"{UP}\r")                       # the previous line, from the history
    assert chat.expect(r"unknown command ([^\s;]+)").group(1) == "/hello"
    chat.expect(PROMPT)
    chat.send("Hi\r")                          # a real answer, cut off by -n 2
    chat.expect(r"\[stopped: --max-tokens 2 reached\]")
    chat.expect(PROMPT)
    chat.send("/exit\r")
    assert chat.wait() == 0


def test_ctrl_d_ends_the_chat(chat: Terminal) -> None:
    chat.expect(PROMPT)
    chat.send("\x04")
    assert chat.wait() == 0
