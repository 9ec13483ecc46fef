"""The one-call C++ decode step (fused_decode.py, csrc/decode.cpp) against the Python layers,
which test_model_parity.py holds to transformers: same logits, same greedy tokens, through
batches of unequal rows, non-contiguous cache rows and the rolling buffer's wrap-around."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import mistral7b
from mistral7b import fused_decode
from mistral7b.cache import RollingCache
from mistral7b.generate import decode_step, prefill
from mistral7b.model import Transformer
from mistral7b.quant import kernels
from tests.conftest import WINDOW, make_hf_mistral, save_hf

pytestmark = pytest.mark.skipif(kernels.extension() is None,
                                reason="the compiled kernels are not available here")


def decode_both(model: Transformer, prompts: list[list[int]], rows: list[int], n_rows: int,
                steps: int, cache_dtype: torch.dtype = torch.float32
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits of `steps` greedy decode steps, (steps, B, vocab), from the Python layers and from
    the fused step; both follow the Python path's tokens so that they see the same inputs."""
    caches = {fused: RollingCache(model.config, rows=n_rows, dtype=cache_dtype)
              for fused in (False, True)}
    for cache in caches.values():
        prefill(model, cache, rows, prompts, chunk_size=7)
    tokens = [p[-1] for p in prompts]
    out: dict[bool, list[torch.Tensor]] = {False: [], True: []}
    for _ in range(steps):
        for fused in (False, True):
            model.fused_decode = fused
            out[fused].append(decode_step(model, caches[fused], rows, tokens))
        tokens = out[False][-1].argmax(-1).tolist()
    model.fused_decode = True
    return torch.stack(out[False]), torch.stack(out[True])


@pytest.fixture(scope="module")
def tiny_q8(mistral_dir: Path) -> Transformer:
    model = mistral7b.load(mistral_dir, quantize="q8_0").model
    assert model._fused_decode_plan() is not None
    return model


def test_fused_step_matches_python_layers_past_the_window(tiny_q8: Transformer) -> None:
    # Prompts shorter than, equal to and longer than the window, then 3 windows of decoding.
    prompts = [[5, 9, 2], list(range(1, 1 + WINDOW)), [(7 * i) % 120 for i in range(35)]]
    slow, fast = decode_both(tiny_q8, prompts, rows=[0, 1, 2], n_rows=3, steps=3 * WINDOW)
    assert (slow - fast).abs().max().item() < 2e-4
    assert torch.equal(slow.argmax(-1), fast.argmax(-1))


def test_fused_step_with_a_float16_cache(tiny_q8: Transformer) -> None:
    # Both paths store float16 keys/values (rounded the same way) and attend in float32.
    prompts = [[5, 9, 2], [(7 * i) % 120 for i in range(35)]]
    slow, fast = decode_both(tiny_q8, prompts, rows=[0, 1], n_rows=2, steps=2 * WINDOW,
                             cache_dtype=torch.float16)
    assert (slow - fast).abs().max().item() < 2e-4
    # The same choice wherever it is not a near-tie (random tiny models have some).
    top2 = slow.topk(2, dim=-1).values
    clear = (top2[..., 0] - top2[..., 1]) > 1e-3
    assert torch.equal(slow.argmax(-1)[clear], fast.argmax(-1)[clear])


def test_fused_step_on_non_contiguous_cache_rows(tiny_q8: Transformer) -> None:
    prompts = [[3, 1, 4, 1, 5], [2, 7, 1, 8, 2, 8, 1, 8]]
    slow, fast = decode_both(tiny_q8, prompts, rows=[3, 1], n_rows=4, steps=20)
    assert (slow - fast).abs().max().item() < 2e-4


def test_fused_step_over_several_attention_chunks(tmp_path: Path) -> None:
    # Attention cuts a row's slots into chunks of 64 and merges them: rows of 5, 70 and 120
    # cached tokens (one, two and two chunks, the last crossing into a third), no window.
    directory = save_hf(make_hf_mistral(window=None), tmp_path)
    model = mistral7b.load(directory, quantize="q8_0").model
    assert model._fused_decode_plan() is not None
    prompts = [[3, 1, 4, 1, 5], [(5 * i) % 120 for i in range(70)],
               [(11 * i + 2) % 120 for i in range(120)]]
    slow, fast = decode_both(model, prompts, rows=[0, 1, 2], n_rows=3, steps=12)
    assert (slow - fast).abs().max().item() < 2e-4
    assert torch.equal(slow.argmax(-1), fast.argmax(-1))


def test_positions_past_the_rope_table_are_computed_alike(tiny_q8: Transformer,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    # A sequence longer than the table (a windowed model decodes without end) gets its step's
    # rows from rope_rotations directly: the same bits as the table's.
    prompts = [[5, 9, 2], [(7 * i) % 120 for i in range(35)]]
    _, table = decode_both(tiny_q8, prompts, rows=[0, 1], n_rows=2, steps=10)
    monkeypatch.setattr(fused_decode, "ROPE_TABLE_POSITIONS", 8)
    tiny_q8._decode_weights_known = False
    _, computed = decode_both(tiny_q8, prompts, rows=[0, 1], n_rows=2, steps=10)
    assert torch.equal(table, computed)


def test_fused_step_is_not_used_for_float_weights(mistral_dir: Path) -> None:
    model = mistral7b.load(mistral_dir).model
    assert model._fused_decode_plan() is None


def test_default_model_fused_step_matches_python_layers() -> None:
    llm = mistral7b.load()
    # A prompt of more than one attention chunk (64 slots), at the model's head_dim of 64.
    ids = llm.tokenizer.encode("The sliding window attention of Mistral 7B attends to the last "
                               "4096 positions of each layer, and a rolling buffer cache keeps "
                               "them. " * 3 + "So the window")
    assert len(ids) > 64
    slow, fast = decode_both(llm.model, [ids], rows=[0], n_rows=1, steps=32)
    # Logits are ~20 in size; the two paths differ in summation order only (relative 2e-4).
    assert (slow - fast).abs().max().item() < 0.02
    assert torch.equal(slow.argmax(-1), fast.argmax(-1))


def test_default_model_with_a_float16_cache_keeps_its_greedy_text() -> None:
    full = mistral7b.load()
    half = mistral7b.load(kv_cache_dtype="float16")
    assert half.cache_dtype == torch.float16 and full.cache_dtype == torch.float32
    ids = full.tokenizer.encode("The sliding window attention of Mistral 7B is")
    kwargs = dict(max_tokens=32, temperature=0, ignore_eos=True, logprobs=True)
    a, b = full.generate(ids, **kwargs), half.generate(ids, **kwargs)
    assert a.token_ids == b.token_ids
    # Measured 0.003: float16 keeps 11 bits of each key and value.
    assert max(abs(x - y) for x, y in zip(a.logprobs or [], b.logprobs or [], strict=True)) < 0.05
