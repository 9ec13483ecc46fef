"""Packed quantized weights: every kernel against a float reference (gguf's dequantize, then a
matmul), the portable fallback, memory, and the default model's text against the float path."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as Q
from gguf.quants import dequantize as gguf_dequantize
from gguf.quants import quantize as gguf_quantize

import mistral7b
from mistral7b.default_model import default_model_path
from mistral7b.quant import kernels
from mistral7b.quant.modules import QuantEmbedding, QuantLinear
from tests.gguf_writer import random_k_blocks

FORMATS = ["Q8_0", "Q4_0", "Q4_1", "Q4_K", "Q5_K", "Q6_K"]
# (rows of x, out features, in features): odd output counts, several block counts, batch 1,
# small batches, and past the integer kernel's row limit (the dequantize + BLAS path).
SHAPES = [(1, 7, 256), (1, 33, 512), (3, 65, 256), (16, 129, 768), (17, 31, 256), (40, 5, 512)]


def packed_weight(fmt: str, rows: int, cols: int, seed: int = 0) -> tuple[torch.Tensor,
                                                                         torch.Tensor]:
    """Blocks of `fmt` and the float matrix they mean according to the gguf package."""
    rng = np.random.default_rng(seed)
    kind = Q[fmt]
    if fmt.endswith("_K"):
        raw = random_k_blocks(rows, cols, kind, rng)
    else:
        raw = gguf_quantize(rng.standard_normal((rows, cols)).astype(np.float32), kind)
    reference = np.asarray(gguf_dequantize(raw, kind), dtype=np.float32).reshape(rows, cols)
    return torch.from_numpy(np.ascontiguousarray(raw)), torch.from_numpy(reference)


def relative_error(ours: torch.Tensor, reference: torch.Tensor) -> float:
    return ((ours - reference).abs().max() / reference.abs().max()).item()


@pytest.fixture(params=["fast", "portable"])
def path(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    if request.param == "portable":
        monkeypatch.setattr(kernels, "_extension", None)
        monkeypatch.setattr(kernels, "_tried", True)
    elif kernels.extension() is None:
        pytest.skip("the AVX2 extension is not available on this machine")
    return str(request.param)


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize(("m", "n", "k"), SHAPES)
def test_linear_matches_float_reference(path: str, fmt: str, m: int, n: int, k: int) -> None:
    raw, weight = packed_weight(fmt, n, k, seed=m + n)
    x = torch.randn(m, k, generator=torch.Generator().manual_seed(n))
    reference = x @ weight.T
    layer = QuantLinear(k, n, fmt)
    layer.weight = raw
    # 16-bit activations on the fast path: ~1e-5 relative; the portable path is fp32 exact.
    assert relative_error(layer(x), reference) < 2e-4
    assert relative_error(layer(x[None]), reference[None]) < 2e-4   # any leading shape


@pytest.mark.parametrize("fmt", FORMATS)
def test_dequantize_rows_is_exact(path: str, fmt: str) -> None:
    raw, weight = packed_weight(fmt, 9, 512)
    assert torch.equal(kernels.dequantize_rows(raw, fmt), weight)


@pytest.mark.parametrize("fmt", ["Q8_0", "Q4_1", "Q6_K"])
def test_embedding_lookup_and_tied_head(path: str, fmt: str) -> None:
    raw, weight = packed_weight(fmt, 50, 256)
    embedding = QuantEmbedding(50, 256, fmt)
    embedding.weight = raw
    ids = torch.tensor([[3, 0, 49], [7, 7, 1]])
    assert torch.equal(embedding(ids), weight[ids])
    h = torch.randn(2, 3, 256)
    assert relative_error(embedding.linear(h), h @ weight.T) < 2e-4


def test_fast_path_is_used_on_this_machine() -> None:
    if torch.backends.cpu.get_cpu_capability() not in ("AVX2", "AVX512"):
        pytest.skip("no AVX2")
    assert kernels.extension() is not None


def test_loading_a_q4_gguf_keeps_the_weights_packed() -> None:
    llm = mistral7b.load()
    model = llm.model
    float_bytes = sum(p.nbytes for p in model.parameters())
    packed = [m for m in model.modules() if isinstance(m, QuantLinear | QuantEmbedding)]
    # q/k/v and gate/up are stacked at load: 4 packed matrices a layer, and the embedding.
    assert len(packed) == 4 * llm.config.n_layers + 1
    assert all(m.weight.dtype == torch.uint8 for m in packed)
    assert all(p.dim() == 1 for p in model.parameters())     # only the norms are float
    packed_bytes = sum(m.weight.nbytes for m in packed)
    file_bytes = default_model_path().stat().st_size
    assert packed_bytes + float_bytes < file_bytes           # nothing bigger than the file
    assert float_bytes < 1_000_000


@pytest.fixture(scope="module")
def both() -> tuple[mistral7b.LLM, mistral7b.LLM]:
    return mistral7b.load(), mistral7b.load(dequantize=True)


@pytest.mark.parametrize("prompt", ["The capital of France is", "def fibonacci(n):",
                                    "Once upon a time"])
def test_default_model_packed_equals_float_path(both, prompt: str) -> None:
    packed, dequantized = both
    ids = packed.tokenizer.encode(prompt)
    assert (packed.logits(ids) - dequantized.logits(ids)).abs().max().item() < 0.05
    kwargs = dict(max_tokens=24, temperature=0, ignore_eos=True)
    assert packed.generate(prompt, **kwargs).token_ids == dequantized.generate(prompt,
                                                                              **kwargs).token_ids
