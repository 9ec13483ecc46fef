"""Max |logit error| of mistral7b against transformers (the oracle), for every processing mode.

    .venv/bin/python benchmarks/parity.py

Tiny random MistralForCausalLM (window 16, GQA 8:2) and LlamaForCausalLM (tied, head_dim 16 with
dim 48) built in memory, plus the embedded SmolLM2-135M-Instruct GGUF. Prints a markdown table.
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import mistral7b
from mistral7b.cache import RollingCache
from tests.conftest import WINDOW, make_hf_llama, make_hf_mistral, save_hf, save_native


def ref(model: torch.nn.Module, ids: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0].float()


def err(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a - b).abs().max().item()


def main() -> None:
    torch.manual_seed(0)
    W = WINDOW
    rows: list[tuple[str, float]] = []

    def add(name: str, ours: torch.Tensor, oracle: torch.Tensor) -> None:
        rows.append((name, err(ours, oracle)))

    with tempfile.TemporaryDirectory() as tmp:
        hf_mistral, hf_llama = make_hf_mistral(), make_hf_llama()
        mistral = mistral7b.load(save_hf(hf_mistral, Path(tmp) / "m"), progress=False)
        llama = mistral7b.load(save_hf(hf_llama, Path(tmp) / "l"), progress=False)
        native = mistral7b.load(save_native(hf_mistral, Path(tmp) / "n"), progress=False)
        for n in (1, W - 1, W, W + 1, 5 * W):
            ids = torch.randint(0, 128, (n,)).tolist()
            add(f"Mistral (W={W}), one shot, T={n}", mistral.logits(ids, n), ref(hf_mistral, ids))
        for n in (1, 15, 16, 17, 80):
            ids = torch.randint(0, 128, (n,)).tolist()
            add(f"Llama variant (no window, tied), T={n}", llama.logits(ids), ref(hf_llama, ids))
        ids = torch.randint(0, 128, (5 * W + 3,)).tolist()
        expected = ref(hf_mistral, ids)
        for chunk in (1, 7, W, 3 * W):
            add(f"Mistral chunked pre-fill, chunk={chunk}, T={len(ids)}",
                mistral.logits(ids, chunk), expected)
        cache = RollingCache(mistral.config)
        with torch.inference_mode():
            steps = [mistral.model(torch.tensor([ids[:5]]), cache)[0]]
            steps += [mistral.model(torch.tensor([[t]]), cache)[0] for t in ids[5:]]
        add(f"Mistral token-by-token through the rolling cache, T={len(ids)}", torch.cat(steps),
            expected)
        add("Mistral native layout vs HF layout (same weights)", native.logits(ids),
            mistral.logits(ids))

    from transformers import AutoModelForCausalLM

    from mistral7b.default_model import default_model_path

    path = default_model_path()
    smol = mistral7b.load(progress=False)
    hf = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name,
                                              dtype=torch.float32).eval()
    question = [{"role": "user", "content": "What is the capital of France?"}]
    ids = smol.tokenizer.encode_chat(question)
    add(f"SmolLM2-135M-Instruct Q4_1 GGUF (dequantized fp32), T={len(ids)}", smol.logits(ids),
        ref(hf, ids))

    print("| mode | max abs logit error |\n|---|---|")
    for name, value in rows:
        print(f"| {name} | {value:.2e} |")


if __name__ == "__main__":
    main()
