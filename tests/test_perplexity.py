"""A prompt's own log-probabilities (SamplingParams.prompt_logprobs) and perplexity over
sliding windows (perplexity.py, `mistral7b perplexity`), against transformers on the same
weights."""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import mistral7b
from mistral7b.perplexity import perplexity, windows
from tests.conftest import WINDOW, make_hf_mistral, save_hf, save_native

ROOT = Path(__file__).resolve().parents[1]
TEXT = ("The rolling buffer cache keeps the last W keys and values of every layer. "
        "Position i is written to slot i mod W, so memory stays flat however long the "
        "sequence grows, and attention never sees a key older than the window.")


def test_prompt_logprobs_match_transformers(tmp_path: Path) -> None:
    """50 tokens through a model with a window of 16, pre-filled in chunks of 16: each
    token's log-probability and the 3 likeliest tokens at its position."""
    hf = make_hf_mistral()
    llm = mistral7b.load(save_hf(hf, tmp_path / "hf"), progress=False)
    ids = (torch.arange(50) * 7 % 120 + 3).tolist()
    result = llm.generate(ids, max_tokens=0, prompt_logprobs=3, chunk_size=WINDOW)
    assert result.token_ids == [] and result.finish_reason == "length"
    scores = result.prompt_logprobs
    assert scores is not None and len(scores) == len(ids)
    assert scores[0].token_id == ids[0] and scores[0].logprob is None and scores[0].top == []
    with torch.no_grad():
        expected = torch.log_softmax(hf(torch.tensor([ids])).logits[0].float(), dim=-1)
    for t, row in zip(scores[1:], expected[:-1], strict=True):
        assert t.logprob == pytest.approx(row[t.token_id].item(), abs=1e-5)
        values, indices = row.topk(3)
        assert [i for i, _ in t.top] == indices.tolist()
        assert [v for _, v in t.top] == pytest.approx(values.tolist(), abs=1e-5)
    # Generating after scoring: the same prompt scores, then tokens.
    both = llm.generate(ids, max_tokens=4, prompt_logprobs=0, temperature=0)
    assert len(both.token_ids) == 4 and both.prompt_logprobs is not None
    assert [t.logprob for t in both.prompt_logprobs] == pytest.approx(
        [t.logprob for t in scores], abs=1e-6)


def test_max_tokens_0_needs_prompt_logprobs() -> None:
    with pytest.raises(mistral7b.errors.InvalidArgumentError, match="max_tokens must be >= 1"):
        mistral7b.SamplingParams(max_tokens=0)


def test_windows_score_each_token_once() -> None:
    assert windows(10, 6, 3) == [(0, 6, 1), (3, 9, 6), (6, 10, 9)]    # the module's example
    assert windows(5, 8, 4) == [(0, 5, 1)]
    for n, context, stride in [(100, 16, 5), (37, 10, 10), (64, 32, 1)]:
        spans = windows(n, context, stride)
        scored = [t for _, end, first in spans for t in range(first, end)]
        assert scored == list(range(1, n))
        assert all(end - start <= context for start, end, _ in spans)
        # every token after the first window sees at least context - stride tokens
        assert all(first - start >= context - stride for start, _, first in spans[1:])


@pytest.fixture(scope="module")
def with_tokenizer(tmp_path_factory: pytest.TempPathFactory) -> tuple[torch.nn.Module, Path]:
    import mistral_common

    hf = make_hf_mistral(vocab=32768, seed=5)
    directory = save_native(hf, tmp_path_factory.mktemp("ppl"))
    shutil.copy(Path(os.path.dirname(mistral_common.__file__)) / "data" /
                "mistral_instruct_tokenizer_240323.model.v3", directory / "tokenizer.model.v3")
    return hf, directory


def test_perplexity_matches_transformers(with_tokenizer: tuple[torch.nn.Module, Path]) -> None:
    hf, directory = with_tokenizer
    llm = mistral7b.load(directory, progress=False)
    ids = llm.tokenizer.encode(TEXT)
    context, stride = 24, 10
    result = perplexity(llm, TEXT, context=context, stride=stride)
    # Hugging Face's recipe, on transformers' logits of each window.
    nll = 0.0
    for start, end, first in windows(len(ids), context, stride):
        with torch.no_grad():
            logits = hf(torch.tensor([ids[start:end]])).logits[0].float()
        lp = torch.log_softmax(logits[:-1], dim=-1)
        targets = torch.tensor(ids[start + 1:end])
        nll -= lp.gather(1, targets[:, None])[first - start - 1:, 0].sum().item()
    assert result.tokens == len(ids) - 1
    assert result.mean_nll == pytest.approx(nll / (len(ids) - 1), abs=1e-5)
    assert result.perplexity == pytest.approx(math.exp(nll / (len(ids) - 1)), rel=1e-5)
    assert result.bits_per_byte == pytest.approx(nll / math.log(2) / len(TEXT.encode()),
                                                 rel=1e-5)


def run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "mistral7b", "perplexity", *args],
                          capture_output=True, text=True, timeout=300, cwd=ROOT)


def test_the_command(with_tokenizer: tuple[torch.nn.Module, Path], tmp_path: Path) -> None:
    _, directory = with_tokenizer
    text = tmp_path / "text.txt"
    text.write_text(TEXT)
    run = run_cli("--model", str(directory), str(text), "--context", "24", "--stride", "10",
                  "--json")
    assert run.returncode == 0, run.stderr
    report = json.loads(run.stdout)
    expected = perplexity(mistral7b.load(directory, progress=False), TEXT, 24, 10)
    assert report["perplexity"] == pytest.approx(expected.perplexity, rel=1e-6)
    assert report["windows"] == expected.windows and report["context"] == 24


@pytest.mark.parametrize(("content", "message"), [
    (b"", "FILE {}: empty"),
    (b"caf\xe9", "FILE {}: not UTF-8 text (byte 3 is 0xe9)"),
    (None, "FILE {}: no such file"),
])
def test_bad_files_are_refused_naming_them(tmp_path: Path, content: bytes | None,
                                           message: str) -> None:
    path = tmp_path / "text.txt"
    if content is not None:
        path.write_bytes(content)
    run = run_cli(str(path))
    assert run.returncode == 2 and run.stderr.strip() == f"mistral7b: error: " \
        f"{message.format(path)}", run.stderr
