"""The first-use build of C++ extensions (quant/build.py): keyed build folders, locks left by
dead processes, SIGTERM during a compile, the one-line message. A tiny extension (Python.h only,
a header included with #include "...") stands in for the real kernels, which take ~30 s."""

from __future__ import annotations

import fcntl
import os
import signal
import subprocess
import sys
from pathlib import Path

import psutil
import pytest

from mistral7b.quant import build, kernels
from tests.conftest import wait_until

TINY_H = "#define TINY_ANSWER 42\n"
TINY_CPP = """\
#include <Python.h>
#include "tiny.h"

#define CONCAT_(a, b) a##b
#define CONCAT(a, b) CONCAT_(a, b)
#define STR_(a) #a
#define STR(a) STR_(a)

static struct PyModuleDef tiny_module = {PyModuleDef_HEAD_INIT, STR(TORCH_EXTENSION_NAME),
                                         nullptr, -1, nullptr};

PyMODINIT_FUNC CONCAT(PyInit_, TORCH_EXTENSION_NAME)(void) {
  PyObject* m = PyModule_Create(&tiny_module);
  if (m != nullptr) PyModule_AddIntConstant(m, "answer", TINY_ANSWER);
  return m;
}
"""

# Builds the tiny extension in a process of its own (a hang fails the test by timeout, and
# SIGTERM can be sent to it), with the CLI's log format; prints the module's answer.
DRIVER = """\
import logging, sys
from pathlib import Path
from mistral7b.quant import build
logging.basicConfig(level=logging.WARNING, format="mistral7b: %(message)s")
logging.getLogger("mistral7b").setLevel(logging.INFO)
root, files = Path(sys.argv[1]), [Path(p) for p in sys.argv[2:]]
module = build.build_extension("tiny", files, [], [], announce="compiling tiny...", root=root)
print("answer", module.answer)
"""

# A C++ compiler whose compile step records its pid and sleeps: a build that stays in the
# compiler until it is stopped. Everything else (version checks, the link) goes to g++.
SLOW_CXX = """\
#!/bin/sh
case " $* " in
  *" -c "*) echo $$ >> "$SLOW_CXX_PIDS"; exec sleep 600 ;;
esac
exec g++ "$@"
"""


def tiny_files(folder: Path) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "tiny.h").write_text(TINY_H)
    (folder / "tiny.cpp").write_text(TINY_CPP)
    return [folder / "tiny.h", folder / "tiny.cpp"]


def build_in_subprocess(root: Path, files: list[Path],
                        env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-c", DRIVER, str(root), *map(str, files)],
                          capture_output=True, text=True, timeout=120,
                          env={**os.environ, **(env or {})})


def test_build_folder_depends_on_contents_and_flags_not_on_checkout_path(tmp_path: Path) -> None:
    a, b = tiny_files(tmp_path / "checkout_a"), tiny_files(tmp_path / "checkout_b")
    root = tmp_path / "ext"
    folder = build.build_folder("tiny", a, ["-O2"], [], root)
    assert folder == build.build_folder("tiny", b, ["-O2"], [], root)
    assert folder.parent == root and folder.name.startswith("tiny_")
    assert build.build_folder("tiny", a, ["-O3"], [], root) != folder
    assert build.build_folder("tiny", a, [], ["-O2"], root) != folder
    (tmp_path / "checkout_b" / "tiny.h").write_text("#define TINY_ANSWER 43\n")
    assert build.build_folder("tiny", b, ["-O2"], [], root) != folder
    # The real kernels: no include path, so no flag names the checkout.
    assert not any(str(kernels.CSRC) in flag
                   for flag in kernels.KERNEL_CFLAGS + kernels.KERNEL_LDFLAGS)


def test_locks_left_by_dead_processes_do_not_block_the_build(tmp_path: Path) -> None:
    files, root = tiny_files(tmp_path / "src"), tmp_path / "ext"
    folder = build.build_folder("tiny", files, [], [], root)
    folder.mkdir(parents=True)
    (folder / "lock").touch()  # torch's FileBaton, from a build that was killed
    (folder / "build.lock").write_text("12345\n")  # ours: a plain file, no flock on it
    done = build_in_subprocess(root, files)
    assert done.returncode == 0, done.stderr
    assert "answer 42" in done.stdout
    assert not (folder / "lock").exists()


def test_a_live_builder_is_waited_for_within_a_bound(tmp_path: Path) -> None:
    files, root = tiny_files(tmp_path / "src"), tmp_path / "ext"
    folder = build.build_folder("tiny", files, [], [], root)
    folder.mkdir(parents=True)
    with open(folder / "build.lock", "w") as held:
        fcntl.flock(held, fcntl.LOCK_EX)  # another builder, alive
        with pytest.raises(build.BuildError, match="delete that folder") as e:
            build.build_extension("tiny", files, [], [], announce="", root=root, wait_s=0.5)
    assert str(folder) in str(e.value)


def test_sigterm_during_the_compile_leaves_no_process_and_the_next_build_works(
        tmp_path: Path) -> None:
    files, root = tiny_files(tmp_path / "src"), tmp_path / "ext"
    slow_cxx, pids = tmp_path / "bin" / "g++", tmp_path / "compiler_pids"
    slow_cxx.parent.mkdir()
    slow_cxx.write_text(SLOW_CXX)
    slow_cxx.chmod(0o755)
    env = {**os.environ, "CXX": str(slow_cxx), "SLOW_CXX_PIDS": str(pids)}
    driver = subprocess.Popen([sys.executable, "-c", DRIVER, str(root), *map(str, files)],
                              env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    session: int | None = None
    try:
        assert wait_until(lambda: (pids.exists() and pids.read_text().strip() != "")
                          or driver.poll() is not None, timeout=120)
        assert driver.poll() is None, driver.communicate()[0]
        compiler = int(pids.read_text().split()[0])
        session = os.getsid(compiler)
        assert session != os.getsid(driver.pid)  # the compile runs in a session of its own
        driver.send_signal(signal.SIGTERM)
        driver.wait(timeout=120)
        assert driver.returncode == -signal.SIGTERM  # the signal, re-raised once cleaned up
        assert wait_until(lambda: not alive_in_session(session), timeout=120), \
            alive_in_session(session)
    finally:
        for p in alive_in_session(session) if session is not None else []:
            p.kill()
        if driver.poll() is None:
            driver.kill()
    assert pids.read_text().split() == [str(compiler)]  # one compile, stopped

    done = build_in_subprocess(root, files)  # the real compiler, in the same folder
    assert done.returncode == 0, done.stderr
    assert "answer 42" in done.stdout


def alive_in_session(session: int) -> list[psutil.Process]:
    found = []
    for p in psutil.process_iter():
        try:
            if os.getsid(p.pid) == session and p.status() != psutil.STATUS_ZOMBIE:
                found.append(p)
        except (ProcessLookupError, psutil.NoSuchProcess):
            pass
    return found


def test_the_compiling_line_is_printed_only_when_building(tmp_path: Path) -> None:
    files, root = tiny_files(tmp_path / "src"), tmp_path / "ext"
    first = build_in_subprocess(root, files)
    assert first.returncode == 0, first.stderr
    assert first.stderr.splitlines() == ["mistral7b: compiling tiny..."]
    again = build_in_subprocess(root, files)
    assert again.returncode == 0, again.stderr
    assert again.stderr == "" and "answer 42" in again.stdout
    # Another checkout with the same sources reuses the build.
    other = build_in_subprocess(root, tiny_files(tmp_path / "other_checkout"))
    assert other.returncode == 0 and other.stderr == "", other.stderr

