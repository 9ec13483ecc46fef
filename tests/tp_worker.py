"""One rank of a tensor-parallel run, for test_tensor_parallel.py (started by torchrun or with
torchrun's environment variables). Rank 0 writes what the tests compare with one process:

    python tests/tp_worker.py MODEL OUT.pt [--quantize q8_0] [--idle]

--idle: load, write OUT.pt with the pid, and wait (the tests kill a rank and watch the other).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import mistral7b
from mistral7b.cache import RollingCache

TOKENS = torch.arange(40) * 7 % 120 + 3      # 40 tokens: past the tiny models' window of 16
PROMPT = [5, 17, 29, 41, 53]


def logits_in_every_mode(llm: mistral7b.LLM) -> dict[str, torch.Tensor]:
    """(40, vocab) logits of TOKENS: in one pass, in chunks of 7, and token by token."""
    model = llm.model
    out = {}
    with torch.inference_mode():
        for mode, size in (("one_shot", len(TOKENS)), ("chunked", 7), ("token_by_token", 1)):
            cache = RollingCache(model.config, rows=1)
            out[mode] = torch.cat([model(TOKENS[None, i:i + size], cache)[0]
                                   for i in range(0, len(TOKENS), size)])
    return out


def results(llm: mistral7b.LLM) -> dict[str, object]:
    found: dict[str, object] = dict(logits_in_every_mode(llm))
    found["greedy"] = llm.generate(PROMPT, max_tokens=24, temperature=0,
                                   ignore_eos=True).token_ids
    found["cache_shape"] = list(llm.engine().cache.k.shape)
    return found


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("model")
    parser.add_argument("out")
    parser.add_argument("--quantize")
    parser.add_argument("--idle", action="store_true")
    args = parser.parse_args()
    Path(f"{args.out}.pid{os.environ.get('RANK', '0')}").write_text(str(os.getpid()))
    llm = mistral7b.load(args.model, progress=False, quantize=args.quantize,
                         tensor_parallel=True)
    if args.idle:
        Path(args.out).write_text("loaded")
        time.sleep(600)
        return
    torch.save(results(llm), args.out)


if __name__ == "__main__":
    main()
