"""The two local lm-eval tasks over tests/data/lm_eval (test_lm_eval.py and
benchmarks/lm_eval_throughput.py): lm-eval task YAML, written with absolute data paths, since
`datasets` resolves relative ones against the working directory."""

from __future__ import annotations

from pathlib import Path

DATA = Path(__file__).parent / "data" / "lm_eval"

TASKS = {
    "m7b_mc": f"""task: m7b_mc
dataset_path: json
dataset_kwargs:
  data_files:
    test: {DATA / "multiple_choice.jsonl"}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{question}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: "{{{{answer}}}}"
metric_list:
  - metric: acc
""",
    "m7b_gen": f"""task: m7b_gen
dataset_path: json
dataset_kwargs:
  data_files:
    test: {DATA / "generation.jsonl"}
test_split: test
output_type: generate_until
doc_to_text: "{{{{question}}}}"
doc_to_target: "{{{{answer}}}}"
generation_kwargs:
  until: ["\\n"]
  max_gen_toks: 8
  do_sample: false
metric_list:
  - metric: exact_match
""",
}


def write_tasks(directory: Path, names: tuple[str, ...] = tuple(TASKS)) -> Path:
    """Write the tasks' YAML files into `directory` (an lm-eval --include_path)."""
    for name in names:
        (directory / f"{name}.yaml").write_text(TASKS[name])
    return directory
