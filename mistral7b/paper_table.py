"""The Mistral 7B paper's benchmark table (SPEC.md §2), measured with lm-eval on any model:
`mistral7b eval --tasks paper`.

Each row is the lm-eval task closest to the paper's benchmark, with the paper's few-shot
setting and Mistral 7B's published score beside the measured one. The paper reports MATH
and GSM8K as maj@4 and maj@8; lm-eval's tasks score one greedy answer, so those two read
lower than a majority vote would. The code benchmarks run generated code: they are skipped
unless asked for (`--run-generated-code`). A task that cannot be loaded (its data out of reach,
or a package it needs missing) is listed as skipped, with the reason.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any


def offline_unless_hub_reachable(timeout: float = 3.0) -> bool:
    """Put the Hugging Face libraries offline (datasets from the local cache only) when the
    hub cannot be reached; otherwise each dataset retries for about 40 s before failing.
    Call before they are imported. Returns whether the hub is reachable."""
    if os.environ.get("HF_HUB_OFFLINE") == "1":
        return False
    try:
        socket.create_connection(("huggingface.co", 443), timeout=timeout).close()
        return True
    except OSError:
        os.environ["HF_HUB_OFFLINE"] = "1"
        os.environ["HF_DATASETS_OFFLINE"] = "1"
        return False


@dataclass(frozen=True)
class PaperTask:
    benchmark: str          # as the paper names it
    task: str               # lm-eval's task (or group)
    shots: int              # the paper's few-shot setting
    metric: str             # lm-eval's metric, with its filter ("acc_norm,none")
    paper: float            # Mistral 7B's score in the paper (%)
    runs_code: bool = False


PAPER_TASKS = [
    PaperTask("MMLU", "mmlu", 5, "acc,none", 60.1),
    PaperTask("HellaSwag", "hellaswag", 0, "acc_norm,none", 81.3),
    PaperTask("WinoGrande", "winogrande", 0, "acc,none", 75.3),
    PaperTask("PIQA", "piqa", 0, "acc_norm,none", 83.0),
    PaperTask("ARC-e", "arc_easy", 0, "acc_norm,none", 80.0),
    PaperTask("ARC-c", "arc_challenge", 0, "acc_norm,none", 55.5),
    PaperTask("NQ", "nq_open", 5, "exact_match,remove_whitespace", 28.8),
    PaperTask("TriviaQA", "triviaqa", 5, "exact_match,remove_whitespace", 69.9),
    PaperTask("HumanEval", "humaneval", 0, "pass@1,create_test", 30.5, runs_code=True),
    PaperTask("MBPP", "mbpp", 3, "pass_at_1,none", 47.5, runs_code=True),
    PaperTask("MATH", "minerva_math", 4, "exact_match,none", 13.1),
    PaperTask("GSM8K", "gsm8k", 8, "exact_match,strict-match", 52.2),
]


@dataclass
class PaperRow:
    spec: PaperTask
    measured: float | None = None     # %, when it ran
    skipped: str = ""                 # why it did not


def run_paper(lm: Any, limit: int | None = None, run_code: bool = False,
              say: Callable[[str], None] = lambda _: None,
              tasks: list[PaperTask] | None = None, manager: Any = None) -> list[PaperRow]:
    """Every paper task (or `tasks`) on `lm` (an lm-eval model), one at a time."""
    import lm_eval
    from lm_eval.tasks import TaskManager

    manager = manager or TaskManager()
    rows = []
    for spec in PAPER_TASKS if tasks is None else tasks:
        row = PaperRow(spec)
        rows.append(row)
        if spec.runs_code and not run_code:
            row.skipped = "runs generated code: add --run-generated-code to run it"
            continue
        try:                      # the dataset: downloaded, or read from the local cache
            manager.load([spec.task])
        except Exception as e:    # datasets and the hub raise many types; the reason is shown
            row.skipped = f"could not load the task: {_first_line(e)}"
            say(f"{spec.benchmark}: skipped ({row.skipped})")
            continue
        say(f"{spec.benchmark}: {spec.task}, {spec.shots}-shot")
        results = lm_eval.simple_evaluate(model=lm, tasks=[spec.task], num_fewshot=spec.shots,
                                          limit=limit, task_manager=manager,
                                          confirm_run_unsafe_code=spec.runs_code)
        scores = (results or {}).get("results", {}).get(spec.task, {})
        if spec.metric in scores:
            row.measured = 100 * float(scores[spec.metric])
        else:
            row.skipped = f"no {spec.metric} in lm-eval's results ({sorted(scores)})"
    return rows


def paper_table(rows: list[PaperRow], model: str) -> str:
    """The paper's layout: one row per benchmark, the measured and the paper's score."""
    lines = [f"| benchmark | shots | lm-eval task | {model} | Mistral 7B (paper) |",
             "|---|---:|---|---:|---:|"]
    for row in rows:
        measured = f"{row.measured:.1f}" if row.measured is not None else "skipped"
        lines.append(f"| {row.spec.benchmark} | {row.spec.shots} | {row.spec.task} | "
                     f"{measured} | {row.spec.paper:.1f} |")
    skipped = [r for r in rows if r.skipped]
    if skipped:
        lines += ["", "Skipped:"] + [f"- {r.spec.benchmark}: {r.skipped}" for r in skipped]
    lines += ["", "MATH and GSM8K: the paper reports maj@4 and maj@8; lm-eval scores one greedy "
                  "answer."]
    return "\n".join(lines)


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return (text.splitlines()[0] if text else type(error).__name__)[:200]
