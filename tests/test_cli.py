"""The command line: real output on a tiny model, one-line errors with status 2."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

import mistral7b


def run(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "mistral7b", *args], capture_output=True,
                          text=True, input=stdin, timeout=300)


def test_generate_streams_the_greedy_text(native_v1_dir: Path) -> None:
    proc = run("generate", "--model", str(native_v1_dir), "--prompt", "Hello", "-n", "12",
               "--temperature", "0", "--ignore-eos", "--stats")
    assert proc.returncode == 0, proc.stderr
    expected = mistral7b.load(native_v1_dir).generate("Hello", max_tokens=12, temperature=0,
                                                      ignore_eos=True).text
    assert proc.stdout == expected + "\n"
    assert "tokens/s" in proc.stderr


def test_info_describes_the_model(native_v1_dir: Path) -> None:
    proc = run("info", "--model", str(native_v1_dir))
    assert proc.returncode == 0, proc.stderr
    assert "sliding window" in proc.stdout and "16" in proc.stdout
    assert "8 / 2 (GQA group 4)" in proc.stdout
    assert "tokenizer.model.v1" in proc.stdout


@pytest.mark.parametrize(("args", "message"), [
    (["generate", "--model", "/no/such/dir", "--prompt", "x"], "does not exist"),
    (["info", "--model", "/no/such/dir"], "does not exist"),
    (["generate", "--model", "{model}", "--prompt", "x", "--temperature", "-1"], "temperature"),
    (["generate", "--model", "{model}", "--prompt", "x", "--top-p", "0"], "top_p"),
    (["generate", "--model", "{model}", "--prompt", "x", "-n", "0"], "max_tokens"),
])
def test_user_mistakes_print_one_line_and_exit_2(native_v1_dir: Path, args: list[str],
                                                 message: str) -> None:
    proc = run(*[a.replace("{model}", str(native_v1_dir)) for a in args])
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    assert proc.stderr.strip().count("\n") == 0
    assert proc.stderr.startswith("mistral7b: error:") and message in proc.stderr


def test_bad_flag_value_is_an_argparse_error() -> None:
    proc = run("generate", "--model", "x", "--max-tokens", "many")
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "invalid int value" in proc.stderr


def test_bench_reports_every_test_as_json(native_v1_dir: Path) -> None:
    import json

    proc = run("bench", "--model", str(native_v1_dir), "-p", "16", "-n", "4", "-b", "1,3",
               "-d", "0,20", "-r", "2", "--json")
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)
    tests = [(r["test"], r["depth"], r["batch"]) for r in report["results"]]
    assert tests == [("pp16", 0, 1), ("tg4", 0, 1), ("tg4", 0, 3),
                     ("pp16", 20, 1), ("tg4", 20, 1), ("tg4", 20, 3)]
    assert all(r["tokens_per_s"] > 0 and len(r["runs"]) == 2 for r in report["results"])
    assert report["load_s"] > 0 and report["peak_rss_mib"] > 0


def test_bench_rejects_bad_lists() -> None:
    proc = run("bench", "-p", "12,x")
    assert proc.returncode == 2 and "comma-separated integers" in proc.stderr


def test_bench_long_shows_the_rolling_cache_memory_saving(tmp_path: Path) -> None:
    import json

    plot = tmp_path / "long.png"
    proc = run("bench", "--long", "--sliding-window", "64", "--contexts", "32,64,256", "-n", "2",
               "--json", "--plot", str(plot))
    assert proc.returncode == 0, proc.stderr
    rows = {r["context"]: r for r in json.loads(proc.stdout)}
    # Below the window both caches hold every position; at 4 W the rolling one is 4x smaller.
    assert rows[32]["cache_mib_window"] == rows[32]["cache_mib_full"]
    assert rows[256]["cache_mib_full"] == 4 * rows[256]["cache_mib_window"]
    assert rows[256]["cache_mib_window"] == rows[64]["cache_mib_window"]
    # 8 kv heads x 128 x 2 (k, v) x 4 layers x fp32 = 32 KiB per position.
    assert rows[256]["cache_mib_full"] == 256 * 32 / 1024
    assert plot.stat().st_size > 10_000
