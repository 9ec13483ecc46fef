"""mistral7b against llama.cpp (through llama-cpp-python) on the same GGUF, interleaved.

    .venv/bin/python benchmarks/compare_llama_cpp.py [--model FILE.gguf] \
        [--llama-python /path/to/python-with-llama_cpp] [-p 128] [-n 128] [-r 3] [-t 2] \
        [--bf16-prefill]

llama-cpp-python is optional (it compiles llama.cpp, minutes): install it in any environment
and point --llama-python at that interpreter (default: this one). Each repetition runs our
pre-fill, llama.cpp's pre-fill, our decode, llama.cpp's decode, so both see the same machine
state; the table gives medians and the ratio ours / llama.cpp. Both sides are timed from
Python, model only (no sampling), with the same random token ids. --bf16-prefill adds a row for
our opt-in bfloat16 pre-fill (`--prefill-dtype bfloat16`), timed in the same interleaving.
Batched multi-stream decode is not compared: llama-cpp-python's high-level API runs one
sequence.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import textwrap
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import mistral7b
from mistral7b.bench import time_decode, time_prefill
from mistral7b.default_model import default_model_path

LLAMA_SIDE = textwrap.dedent("""
    import json, sys, time, random
    from llama_cpp import Llama
    path, n_prompt, n_gen, threads, vocab = sys.argv[1], *map(int, sys.argv[2:6])
    llm = Llama(model_path=path, n_ctx=n_prompt + n_gen + 16, n_threads=threads,
                n_threads_batch=threads, n_batch=max(n_prompt, 1), verbose=False)
    rng = random.Random(0)
    for line in sys.stdin:          # one command per line: "pp" or "tg"
        llm.reset()
        if line.strip() == "pp":
            tokens = [rng.randrange(vocab) for _ in range(n_prompt)]
            start = time.perf_counter(); llm.eval(tokens)
            result = n_prompt / (time.perf_counter() - start)
        else:
            llm.eval([1])
            start = time.perf_counter()
            for _ in range(n_gen):
                llm.eval([rng.randrange(vocab)])
            result = n_gen / (time.perf_counter() - start)
        print(json.dumps(result), flush=True)
""")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, default=None, help="GGUF file (default model)")
    parser.add_argument("--llama-python", default=sys.executable)
    parser.add_argument("-p", "--n-prompt", type=int, default=128)
    parser.add_argument("-n", "--n-gen", type=int, default=128)
    parser.add_argument("-r", "--repetitions", type=int, default=3)
    parser.add_argument("-t", "--threads", type=int, default=2)
    parser.add_argument("--bf16-prefill", action="store_true",
                        help="also time our pre-fill with bfloat16 matmuls")
    args = parser.parse_args()

    path = args.model or default_model_path()
    torch.set_num_threads(args.threads)
    ours = mistral7b.load(path, progress=False)
    llama = subprocess.Popen(
        [args.llama_python, "-c", LLAMA_SIDE, str(path), str(args.n_prompt), str(args.n_gen),
         str(args.threads), str(ours.config.vocab_size)],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    assert llama.stdin is not None and llama.stdout is not None

    def theirs(command: str) -> float:
        assert llama.stdin is not None and llama.stdout is not None
        llama.stdin.write(command + "\n")
        llama.stdin.flush()
        line = llama.stdout.readline()
        if not line:
            raise SystemExit("llama-cpp-python side failed (is llama_cpp installed for "
                             f"{args.llama_python}?)")
        return float(json.loads(line))

    runs: dict[str, list[float]] = {k: [] for k in ("ours pp", "llama pp", "ours tg", "llama tg",
                                                     "ours pp-bf16")}
    theirs("pp"), theirs("tg")                                  # warm-up both sides
    time_prefill(ours, args.n_prompt, 0), time_decode(ours, 8, 0, 1)
    for _ in range(args.repetitions):
        runs["ours pp"].append(time_prefill(ours, args.n_prompt, 0))
        if args.bf16_prefill:
            ours.model.set_prefill_dtype(torch.bfloat16)
            runs["ours pp-bf16"].append(time_prefill(ours, args.n_prompt, 0))
            ours.model.set_prefill_dtype(torch.float32)
        runs["llama pp"].append(theirs("pp"))
        runs["ours tg"].append(time_decode(ours, args.n_gen, 0, 1))
        runs["llama tg"].append(theirs("tg"))
    llama.stdin.close()
    llama.wait(timeout=60)

    med = {k: statistics.median(v) for k, v in runs.items() if v}
    print(f"{path.name}, {args.threads} threads, {args.repetitions} interleaved repetitions "
          "(median tokens/s)\n")
    print("| test | mistral7b | llama.cpp | ratio |\n|---|---:|---:|---:|")
    rows = [("pp", "pp", f"pp{args.n_prompt}"), ("tg", "tg", f"tg{args.n_gen}")]
    if args.bf16_prefill:
        rows.insert(1, ("pp-bf16", "pp", f"pp{args.n_prompt} (ours: --prefill-dtype bfloat16)"))
    for ours_key, llama_key, name in rows:
        mine, other = med["ours " + ours_key], med["llama " + llama_key]
        print(f"| {name} | {mine:.1f} | {other:.1f} | {mine / other:.2f}x |")


if __name__ == "__main__":
    main()
