"""The embedded default model (SmolLM2-135M-Instruct Q4_1 GGUF) against transformers, and the
chat command on it."""

from __future__ import annotations

import os
import select
import signal
import subprocess
import sys
import time

import pytest
import torch

import mistral7b
from mistral7b.default_model import default_model_path

QUESTION = [{"role": "user", "content": "What is the capital of France?"}]


@pytest.fixture(scope="module")
def llm() -> mistral7b.LLM:
    """As users run it: quantized weights packed, fast kernels."""
    return mistral7b.load()


@pytest.fixture(scope="module")
def llm_fp32() -> mistral7b.LLM:
    """Dequantized to fp32 at load, like transformers does with a GGUF: the parity path."""
    return mistral7b.load(dequantize=True)


@pytest.fixture(scope="module")
def hf() -> tuple[object, object]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = default_model_path()
    tok = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    model = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name,
                                                 dtype=torch.float32).eval()
    return tok, model


def test_chat_prompt_and_greedy_answer_match_transformers(llm_fp32, hf) -> None:
    llm = llm_fp32
    tok, model = hf
    ours = llm.tokenizer.encode_chat(QUESTION)
    theirs = tok.apply_chat_template(QUESTION, add_generation_prompt=True, tokenize=True,
                                     return_dict=False)
    assert ours == list(theirs)
    result = llm.chat(QUESTION, max_tokens=32, temperature=0, ignore_eos=True)
    with torch.no_grad():
        out = model.generate(torch.tensor([ours]), max_new_tokens=32, min_new_tokens=32,
                             do_sample=False, eos_token_id=None, pad_token_id=0)
    reference = out[0, len(ours):].tolist()
    assert result.token_ids == reference
    assert result.text == tok.decode(reference, skip_special_tokens=True)


def test_default_model_stops_at_end_of_turn(llm) -> None:
    result = llm.chat(QUESTION, max_tokens=64, temperature=0)
    assert result.finish_reason == "stop"
    assert "Paris" in result.text
    assert "<|im_end|>" not in result.text


def run_cli(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "mistral7b", *args], capture_output=True,
                          text=True, input=stdin, timeout=300)


def test_chat_prompt_streams_one_answer(llm) -> None:
    proc = run_cli("chat", "--prompt", QUESTION[0]["content"], "-n", "24", "--temperature", "0")
    assert proc.returncode == 0, proc.stderr
    expected = llm.chat(QUESTION, max_tokens=24, temperature=0).text
    assert proc.stdout == expected + "\n"


def test_chat_repl_keeps_history_and_understands_commands(llm) -> None:
    script = "What is the capital of France?\n/system Answer in French.\nHello\n/reset\n" \
             "/bogus\n/exit\n"
    proc = run_cli("chat", "-n", "12", "--temperature", "0", stdin=script)
    assert proc.returncode == 0, proc.stderr
    first = llm.chat(QUESTION, max_tokens=12, temperature=0).text
    second = llm.chat([{"role": "system", "content": "Answer in French."},
                       {"role": "user", "content": "Hello"}], max_tokens=12, temperature=0).text
    assert proc.stdout.count("> ") >= 5
    assert first in proc.stdout and second in proc.stdout
    assert "system prompt set" in proc.stderr and "conversation cleared" in proc.stderr
    assert "unknown command /bogus" in proc.stderr


def test_chat_repl_second_turn_sees_the_first(llm) -> None:
    proc = run_cli("chat", "-n", "10", "--temperature", "0", stdin="Hi\nAnd then?\n")
    first = llm.chat([{"role": "user", "content": "Hi"}], max_tokens=10, temperature=0).text
    second = llm.chat([{"role": "user", "content": "Hi"},
                       {"role": "assistant", "content": first},
                       {"role": "user", "content": "And then?"}], max_tokens=10,
                      temperature=0).text
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == f"> {first}\n> {second}\n> "


def test_conversation_too_long_for_the_context_is_a_clear_message() -> None:
    proc = run_cli("chat", "--prompt", "hello", "--max-tokens", "9000")
    assert proc.returncode == 2
    assert proc.stderr.startswith("mistral7b: error: ")
    assert "exceeds the model's context length" in proc.stderr and "8192" in proc.stderr
    assert "Traceback" not in proc.stderr


@pytest.mark.skipif(os.name != "posix", reason="needs SIGINT")
def test_ctrl_c_stops_the_answer_not_the_program() -> None:
    proc = subprocess.Popen([sys.executable, "-m", "mistral7b", "chat", "-n", "8000",
                             "--ignore-eos", "--temperature", "1.0", "--seed", "0"],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert proc.stdin is not None and proc.stdout is not None
    try:
        proc.stdin.write(b"Tell me a long story.\n")
        proc.stdin.flush()
        seen = b""
        deadline = time.monotonic() + 120
        while len(seen) < 8 and time.monotonic() < deadline:  # "> " and some streamed text
            ready, _, _ = select.select([proc.stdout], [], [], 1.0)
            if ready:
                seen += os.read(proc.stdout.fileno(), 4096)
            assert proc.poll() is None, proc.stderr.read() if proc.stderr else ""
        assert len(seen) >= 8, "no answer was streamed"
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(b"/exit\n", timeout=120)
    finally:
        proc.kill()
    assert proc.returncode == 0, err
    assert b"[interrupted]" in seen + out and b"Traceback" not in err

