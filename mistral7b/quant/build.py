"""Compiling a C++ extension on first use, so that an interrupted or concurrent build never
wedges a later run (used by kernels.py for the CPU kernels).

build_extension is generic over name, files and flags:
- Build folder: <root>/<name>_<key>, root = $TORCH_EXTENSIONS_DIR or torch's default
  extensions root (~/.cache/torch_extensions), key = 12 hex digits of a SHA-256 over the files'
  names and contents, the flags, the torch version and the Python ABI. The files (the .cpp
  sources and the headers they #include "...") are copied into the folder and compiled there,
  so nothing depends on where the checkout lives: two checkouts with the same sources share one
  build, different sources never touch each other's folder. The module is named like its
  folder, so torch's own versioning never renames or rebuilds it.
- A file `built` in the folder marks a finished build: the module is then imported directly,
  with no lock and no compiler.
- Lock protocol: a builder holds an fcntl.flock on `build.lock` in the folder for the whole
  build. The kernel drops a flock when its holder dies, so it never goes stale; the compile
  child inherits it, so it stays held while a compile runs. Holding it, any torch `lock` file
  in the folder was left by a dead process and is deleted. Waiting for another, live builder is
  bounded by LOCK_WAIT_S; past it we give up (the caller falls back to the portable kernels)
  with a message naming the folder to delete.
- The compile runs in a child process (`python -c`, torch's load) in a session of its own, so
  a Ctrl-C at the terminal reaches only us. On Ctrl-C or SIGTERM we stop it (see _stop), wait
  until it and its compilers are gone, and re-raise (SIGTERM: re-deliver to the old handler).
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import json
import logging
import os
import platform
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from types import FrameType, ModuleType

import torch

log = logging.getLogger("mistral7b")

LOCK_WAIT_S = 600.0  # the longest we wait for another build: ~30 s idle, minutes when busy
STOP_WAIT_S = 30.0  # after Ctrl-C / SIGTERM, how long the compile child gets to stop cleanly


class BuildError(RuntimeError):
    """An extension did not build, or another process's build did not finish in time."""


class _Terminated(BaseException):
    """SIGTERM during a build, raised like KeyboardInterrupt so that clean-up runs."""


def build_key(files: list[Path], cflags: list[str], ldflags: list[str]) -> str:
    """12 hex digits naming a build: the files' names and contents and the flags, not where the
    files live; the torch version and Python ABI, which the built module depends on."""
    h = hashlib.sha256()
    for part in (torch.__version__, sys.implementation.cache_tag, platform.machine(),
                 *cflags, "|", *ldflags):
        h.update(part.encode() + b"\0")
    for f in files:
        h.update(f.name.encode() + b"\0" + f.read_bytes() + b"\0")
    return h.hexdigest()[:12]


def build_folder(name: str, files: list[Path], cflags: list[str], ldflags: list[str],
                 root: Path | None = None) -> Path:
    """Where the build of `files` with these flags lives (see the module docstring)."""
    from torch.utils.cpp_extension import get_default_build_root

    root = root or Path(os.environ.get("TORCH_EXTENSIONS_DIR") or get_default_build_root())
    return root / f"{name}_{build_key(files, cflags, ldflags)}"


def build_extension(name: str, files: list[Path], cflags: list[str], ldflags: list[str], *,
                    announce: str, root: Path | None = None,
                    wait_s: float = LOCK_WAIT_S) -> ModuleType:
    """The extension compiled from `files` (.cpp sources and the headers they include), built
    first (logging `announce`) unless a finished build is cached. Raises BuildError."""
    folder = build_folder(name, files, cflags, ldflags, root)
    if not (folder / "built").exists():
        folder.mkdir(parents=True, exist_ok=True)
        with _sigterm_raises(), _flock(folder / "build.lock", wait_s) as lock_fd:
            if not (folder / "built").exists():  # else another process built it while we waited
                log.info("%s", announce)
                (folder / "lock").unlink(missing_ok=True)  # torch's, left by a dead process
                for f in files:
                    shutil.copyfile(f, folder / f.name)
                _compile(folder, [f.name for f in files if f.suffix != ".h"], cflags, ldflags,
                         lock_fd)
                (folder / "built").touch()
    try:
        return _import(folder.name, folder / f"{folder.name}.so")
    except ImportError as e:
        raise BuildError(f"{e}; delete {folder} to rebuild") from e


@contextlib.contextmanager
def _flock(path: Path, wait_s: float) -> Iterator[int]:
    """Hold an exclusive flock on `path` (its file descriptor), waiting at most wait_s."""
    import fcntl  # POSIX only: on Windows, an ImportError here means the portable kernels

    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        deadline, told = time.monotonic() + wait_s, False
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    raise BuildError(f"another process has been building in {path.parent} for "
                                     f"over {wait_s:g} s; if none is, delete that folder") from None
                if not told:
                    log.info("waiting for another process building in %s", path.parent)
                    told = True
                time.sleep(0.2)
        yield fd
    finally:
        os.close(fd)  # releases the lock


_CHILD = """\
import json, signal, sys
signal.signal(signal.SIGTERM, lambda *_: None)  # let ninja stop the compilers: see _stop
import torch.utils.cpp_extension as cpp
try:
    cpp.load(**json.loads(sys.argv[1]))
except Exception as e:
    sys.exit(str(e))
"""


def _compile(folder: Path, sources: list[str], cflags: list[str], ldflags: list[str],
             lock_fd: int) -> None:
    """Run torch's load on the copies in `folder`, in a child in its own session that shares
    our lock; its output goes to build.log."""
    args = dict(name=folder.name, sources=[str(folder / s) for s in sources],
                extra_cflags=cflags, extra_ldflags=ldflags, build_directory=str(folder),
                verbose=False)
    with open(folder / "build.log", "w") as out:
        proc = subprocess.Popen([sys.executable, "-c", _CHILD, json.dumps(args)],
                                stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True, pass_fds=(lock_fd,))
        try:
            proc.wait()
        except BaseException:  # Ctrl-C or SIGTERM: stop the compilers too
            _stop(proc)
            raise
    if proc.returncode != 0:
        lines = [line.strip() for line in (folder / "build.log").read_text().splitlines()]
        reason = next((line for line in lines if "error:" in line or "not found" in line),
                      next((line for line in reversed(lines) if line), "no output"))
        raise BuildError(f"{reason}; see {folder / 'build.log'}")


def _stop(proc: subprocess.Popen[bytes]) -> None:
    """End the compile child and everything it started. SIGTERM to its process group reaches
    ninja, which kills the compilers (it starts each in a process group of its own) and waits
    for them; the child ignores SIGTERM and waits for ninja, so nothing is orphaned. The signal
    is repeated, as ninja may not have started yet; SIGKILL after STOP_WAIT_S."""
    deadline = time.monotonic() + STOP_WAIT_S
    while time.monotonic() < deadline:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=0.5)
            return
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()


def _raise_terminated(signum: int, frame: FrameType | None) -> None:
    raise _Terminated


@contextlib.contextmanager
def _sigterm_raises() -> Iterator[None]:
    """Inside, SIGTERM raises _Terminated, so that the build's clean-up runs; on the way out the
    old handler is back and gets the signal (by default: this process ends). Only on the main
    thread (where Python runs handlers), and not when SIGTERM is ignored."""
    old = signal.getsignal(signal.SIGTERM)
    if threading.current_thread() is not threading.main_thread() or old in (None, signal.SIG_IGN):
        yield
        return
    signal.signal(signal.SIGTERM, _raise_terminated)
    try:
        yield
    except _Terminated:
        signal.signal(signal.SIGTERM, old)
        signal.raise_signal(signal.SIGTERM)
        raise BuildError("interrupted by SIGTERM") from None  # the old handler returned
    finally:
        signal.signal(signal.SIGTERM, old)


def _import(name: str, path: Path) -> ModuleType:
    spec = importlib.util.spec_from_file_location(name, path)
    if spec is None or spec.loader is None:
        raise ImportError(f"cannot import {path}")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
