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


# --- a new user's first hour (issue 11) ---

def run_bytes(*args: str | bytes, stdin: bytes = b"",
              env: dict[str, str] | None = None) -> subprocess.CompletedProcess[bytes]:
    """Like run(), but arguments and stdin may be bytes that are not UTF-8."""
    return subprocess.run([sys.executable, "-m", "mistral7b", *args], capture_output=True,
                          input=stdin, timeout=300, env=env)


def assert_one_line_error(stderr: str, message: str) -> None:
    assert "Traceback" not in stderr
    assert stderr.strip().count("\n") == 0, stderr
    assert stderr.startswith("mistral7b: error:") and message in stderr, stderr


def test_version_prints_the_package_version() -> None:
    proc = run("--version")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == f"mistral7b {mistral7b.__version__}\n"


@pytest.mark.parametrize("prompt", ["", "  \n "])
def test_chat_refuses_an_empty_prompt(native_v1_dir: Path, prompt: str) -> None:
    proc = run("chat", "--model", str(native_v1_dir), "--prompt", prompt, "-n", "2")
    assert proc.returncode == 2
    assert_one_line_error(proc.stderr, "empty")
    assert proc.stdout == ""


def test_generate_refuses_an_empty_prompt_from_stdin() -> None:
    # The default model's tokenizer adds no BOS: an empty text is no tokens at all.
    proc = run("generate", "-n", "2", stdin="")
    assert proc.returncode == 2
    assert_one_line_error(proc.stderr, "empty")


def test_one_shot_chat_too_long_is_an_error_without_the_repl_hint(native_v1_dir: Path) -> None:
    # Full attention (no window) over a 32768-token context: 40000 new tokens cannot fit.
    proc = run("chat", "--model", str(native_v1_dir), "--sliding-window", "0", "--prompt", "Hi",
               "-n", "40000")
    assert proc.returncode == 2
    assert_one_line_error(proc.stderr, "exceeds the model's context length")
    assert "/reset" not in proc.stderr
    assert proc.stdout == ""


def test_repl_too_long_keeps_the_reset_hint(native_v1_dir: Path) -> None:
    proc = run("chat", "--model", str(native_v1_dir), "--sliding-window", "0", "-n", "40000",
               stdin="Hi\n/exit\n")
    assert proc.returncode == 0, proc.stderr
    assert "the conversation no longer fits" in proc.stderr and "/reset" in proc.stderr


def test_an_answer_cut_by_max_tokens_is_marked_on_stderr(native_v1_dir: Path) -> None:
    proc = run("generate", "--model", str(native_v1_dir), "--prompt", "Hello", "-n", "5",
               "--temperature", "0", "--ignore-eos")
    assert proc.returncode == 0, proc.stderr
    expected = mistral7b.load(native_v1_dir).generate("Hello", max_tokens=5, temperature=0,
                                                      ignore_eos=True).text
    assert proc.stdout == expected + "\n"          # stdout holds only the text
    assert "[stopped: --max-tokens 5 reached]" in proc.stderr

    proc = run("chat", "--model", str(native_v1_dir), "--prompt", "Hello", "-n", "3",
               "--temperature", "0", "--ignore-eos")
    assert proc.returncode == 0, proc.stderr
    assert "[stopped: --max-tokens 3 reached]" in proc.stderr


def test_an_answer_ended_by_a_stop_string_is_not_marked(native_v1_dir: Path) -> None:
    text = mistral7b.load(native_v1_dir).generate("Hello", max_tokens=12, temperature=0,
                                                  ignore_eos=True).text
    stop = text.strip()[:3]
    assert stop
    proc = run("generate", "--model", str(native_v1_dir), "--prompt", "Hello", "-n", "12",
               "--temperature", "0", "--ignore-eos", "--stop", stop)
    assert proc.returncode == 0, proc.stderr
    assert stop not in proc.stdout
    assert "[stopped:" not in proc.stderr


@pytest.mark.parametrize("command", ["generate", "chat", "serve", "moderate", "info"])
def test_dash_t_means_threads_everywhere(command: str) -> None:
    from mistral7b.cli import build_parser

    args = build_parser().parse_args([command, "-t", "3"])
    assert args.threads == 3
    assert build_parser().parse_args([command, "--threads", "2"]).threads == 2
    if command in ("generate", "chat"):
        args = build_parser().parse_args([command, "--temp", "0.2"])
        assert args.temperature == 0.2 and args.threads == cli_threads()
    bench = build_parser().parse_args(["bench", "-t", "1,2"])
    assert bench.threads == [1, 2]


def cli_threads() -> int:
    from mistral7b.cli import torch_threads

    return torch_threads()


def test_threads_are_set_before_loading(native_v1_dir: Path, monkeypatch: pytest.MonkeyPatch,
                                        capsys: pytest.CaptureFixture[str]) -> None:
    from mistral7b import cli

    calls: list[int] = []
    monkeypatch.setattr(cli, "torch_set_threads", calls.append)
    assert cli.main(["info", "--model", str(native_v1_dir), "-t", "1"]) == 0
    assert calls == [1]
    assert "sliding window" in capsys.readouterr().out


def test_bad_thread_counts_are_one_line_errors(native_v1_dir: Path) -> None:
    proc = run("generate", "--model", str(native_v1_dir), "--prompt", "x", "-t", "0")
    assert proc.returncode == 2
    assert_one_line_error(proc.stderr, "--threads must be >= 1")
    proc = run("generate", "--model", str(native_v1_dir), "--prompt", "x", "-t", "0.5")
    assert proc.returncode == 2 and "invalid int value" in proc.stderr   # no longer temperature


def test_generate_says_it_reads_a_terminal(native_v1_dir: Path) -> None:
    import os
    import pty

    master, slave = pty.openpty()
    try:
        proc = subprocess.Popen([sys.executable, "-m", "mistral7b", "generate", "--model",
                                 str(native_v1_dir), "-n", "2", "--temperature", "0"],
                                stdin=slave, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                text=True)
        os.close(slave)
        os.write(master, b"Hello\n\x04")           # a line, then Ctrl-D: end of file
        out, err = proc.communicate(timeout=300)
    finally:
        os.close(master)
    assert proc.returncode == 0, err
    assert "reading the prompt from stdin (finish with Ctrl-D)" in err
    assert out.strip()


def test_invalid_utf8_on_stdin_becomes_replacement_characters(native_v1_dir: Path) -> None:
    proc = run_bytes("generate", "--model", str(native_v1_dir), "-n", "4", "--echo",
                     stdin=b"Hello \xff\xfe")
    assert proc.returncode == 0, proc.stderr.decode()
    assert proc.stdout.decode().startswith("Hello \ufffd\ufffd")
    assert b"reading the prompt" not in proc.stderr          # stdin is not a terminal


def test_invalid_utf8_arguments_become_replacement_characters(native_v1_dir: Path) -> None:
    proc = run_bytes("generate", "--model", str(native_v1_dir), "-n", "4", "--echo",
                     "--prompt", b"Hi \xff", "--stop", b"\xfe")
    assert proc.returncode == 0, proc.stderr.decode()
    assert proc.stdout.decode().startswith("Hi \ufffd")
    proc = run_bytes("chat", "--model", str(native_v1_dir), "-n", "4", "--prompt", b"Hi \xff",
                     "--system", b"Be \xfe brief")
    assert proc.returncode == 0, proc.stderr.decode()
    proc = run_bytes("chat", "--model", str(native_v1_dir), "-n", "4",
                     stdin=b"Hi \xff\n/bad\xfe\n/exit\n")
    assert proc.returncode == 0, proc.stderr.decode()
    assert "unknown command /bad\ufffd" in proc.stderr.decode()


@pytest.mark.parametrize("command", [["generate", "--prompt", "x"], ["chat", "--prompt", "x"],
                                     ["info"]])
@pytest.mark.parametrize("device", ["banana", "cuda"])
def test_an_unknown_or_missing_device_is_one_line(native_v1_dir: Path, command: list[str],
                                                  device: str,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    import torch

    from mistral7b.cli import main

    if device == "cuda" and torch.cuda.is_available():
        device = "cuda:99"                            # still one that is not there
    assert main([*command, "--model", str(native_v1_dir), "--device", device]) == 2
    out, err = capsys.readouterr()
    assert_one_line_error(err, f"device {device!r}")
    assert "available here: cpu" in err and out == ""


def test_serve_flags_reach_the_server_options(native_v1_dir: Path,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    from mistral7b import cli
    from mistral7b.server import serve

    seen: list[serve.ServeOptions] = []
    monkeypatch.setattr(cli, "torch_set_threads", lambda n: None)   # not this process's
    monkeypatch.setattr(serve, "serve", lambda load, options: seen.append(options) or 0)
    monkeypatch.delenv(cli.API_KEY_ENV, raising=False)
    assert cli.main(["serve", "--model", str(native_v1_dir)]) == 0
    options = seen.pop()
    assert options.served_model_names == [native_v1_dir.name]
    assert options.max_request_bytes == serve.ServeOptions().max_request_bytes == 4 * 2**20
    assert options.access_log
    assert options.api_key is None

    monkeypatch.setenv(cli.API_KEY_ENV, "from-env")
    assert cli.main(["serve", "--model", str(native_v1_dir), "--served-model-name", "mistral",
                     "--served-model-name", "gpt-4", "--max-request-bytes", "1000",
                     "--quiet"]) == 0
    options = seen.pop()
    assert options.served_model_names == ["mistral", "gpt-4"]
    assert options.max_request_bytes == 1000 and not options.access_log
    assert options.api_key == "from-env"

    assert cli.main(["serve", "--model", str(native_v1_dir), "--model-name", "old",
                     "--api-key", "flag"]) == 0
    options = seen.pop()
    assert options.served_model_names == ["old"] and options.api_key == "flag"


def test_structured_output_flags(tmp_path: Path) -> None:
    """--json-schema and --grammar on the default model; a bad or missing file is one line
    naming the flag and the file, exit 2."""
    import json

    schema = tmp_path / "person.json"
    schema.write_text(json.dumps({
        "type": "object", "additionalProperties": False, "required": ["name", "age"],
        "properties": {"name": {"type": "string", "maxLength": 20}, "age": {"type": "integer"}}}))
    proc = run("chat", "--prompt", "Invent a person.", "--json-schema", str(schema),
               "--temperature", "0")
    assert proc.returncode == 0, proc.stderr
    assert set(json.loads(proc.stdout)) == {"name", "age"}
    grammar = tmp_path / "yes_no.lark"
    grammar.write_text('start: "yes" | "no"\n')
    proc = run("generate", "--prompt", "Is water wet? Answer:", "--grammar", str(grammar),
               "--temperature", "0")
    assert proc.returncode == 0 and proc.stdout.strip() in ("yes", "no"), proc.stderr
    bad = tmp_path / "bad.json"
    bad.write_text('{"type": "objekt"}')
    for flag, path, message in (("--json-schema", bad, "objekt"),
                                ("--json-schema", tmp_path / "none.json", "No such file"),
                                ("--grammar", bad, "--grammar")):
        proc = run("generate", "--prompt", "x", flag, str(path))
        assert proc.returncode == 2
        assert_one_line_error(proc.stderr, f"{flag} {path}")
        assert message in proc.stderr
