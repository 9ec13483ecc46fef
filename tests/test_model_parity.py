"""Our logits against transformers (the oracle) on the same weights, in every processing mode."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import mistral7b
from mistral7b.cache import RollingCache
from tests.conftest import WINDOW

TOL = 1e-4
W = WINDOW


def reference(hf_model: torch.nn.Module, ids: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return hf_model(torch.tensor([ids])).logits[0].float()


def token_ids(n: int, vocab: int, seed: int = 0) -> list[int]:
    g = torch.Generator().manual_seed(seed + n)
    return torch.randint(0, vocab, (n,), generator=g).tolist()


@pytest.mark.parametrize("length", [1, W - 1, W, W + 1, 5 * W])
def test_mistral_logits_match_transformers(hf_mistral, mistral_dir: Path, length: int) -> None:
    llm = mistral7b.load(mistral_dir)
    assert llm.config.sliding_window == W and llm.config.n_kv_heads == 2
    ids = token_ids(length, llm.config.vocab_size)
    ours = llm.logits(ids)
    assert ours.shape == (length, llm.config.vocab_size) and ours.dtype == torch.float32
    assert (ours - reference(hf_mistral, ids)).abs().max().item() < TOL


@pytest.mark.parametrize("length", [1, 15, 16, 17, 80])
def test_llama_variant_logits_match_transformers(hf_llama, llama_dir: Path, length: int) -> None:
    llm = mistral7b.load(llama_dir)
    cfg = llm.config
    assert cfg.tie_embeddings and cfg.sliding_window is None and cfg.rope_theta == 500000.0
    assert cfg.head_dim * cfg.n_heads != cfg.dim
    ids = token_ids(length, cfg.vocab_size)
    assert (llm.logits(ids) - reference(hf_llama, ids)).abs().max().item() < TOL


@pytest.mark.parametrize("chunk", [1, 7, W, 3 * W])
def test_chunked_prefill_matches_transformers(hf_mistral, mistral_dir: Path, chunk: int) -> None:
    llm = mistral7b.load(mistral_dir)
    ids = token_ids(5 * W + 3, llm.config.vocab_size)
    ref = reference(hf_mistral, ids)
    chunked = llm.logits(ids, chunk_size=chunk)
    one_shot = llm.logits(ids, chunk_size=len(ids))
    assert (chunked - ref).abs().max().item() < TOL
    assert (one_shot - ref).abs().max().item() < TOL
    assert (chunked - one_shot).abs().max().item() < TOL


def test_token_by_token_decoding_matches_transformers(hf_mistral, mistral_dir: Path) -> None:
    """Prefill a prompt, then feed one token at a time through the rolling cache, past 5 W."""
    llm = mistral7b.load(mistral_dir)
    ids = token_ids(5 * W + 5, llm.config.vocab_size, seed=7)
    ref = reference(hf_mistral, ids)
    cache = RollingCache(llm.config, rows=1)
    prompt = 5
    with torch.inference_mode():
        rows = [llm.model(torch.tensor([ids[:prompt]]), cache)[0]]
        for t in ids[prompt:]:
            rows.append(llm.model(torch.tensor([[t]]), cache)[0])
    assert (torch.cat(rows) - ref).abs().max().item() < TOL


def test_batch_of_unequal_lengths_gets_unbatched_logits(mistral_dir: Path) -> None:
    llm = mistral7b.load(mistral_dir)
    lengths = [3, 2 * W + 5, 1, W]
    prompts = [token_ids(n, llm.config.vocab_size, seed=11) for n in lengths]
    alone = [llm.logits(p) for p in prompts]
    width = max(lengths)
    tokens = torch.tensor([p + [0] * (width - len(p)) for p in prompts])
    for chunk in (7, width):
        cache = RollingCache(llm.config, rows=len(prompts))
        outs = []
        with torch.inference_mode():
            for s in range(0, width, chunk):
                n_new = [max(0, min(chunk, n - s)) for n in lengths]
                outs.append(llm.model(tokens[:, s:s + chunk], cache, n_new=n_new))
        batched = torch.cat(outs, dim=1)
        for b, n in enumerate(lengths):
            assert (batched[b, :n] - alone[b]).abs().max().item() < 1e-5


def test_cache_bytes_stop_growing_after_window(mistral_dir: Path) -> None:
    llm = mistral7b.load(mistral_dir)
    cache = RollingCache(llm.config, rows=1)
    sizes = []
    with torch.inference_mode():
        for t in token_ids(6 * W, llm.config.vocab_size):
            llm.model(torch.tensor([[t]]), cache)
            sizes.append(cache.nbytes)
    cfg = llm.config
    full_window = 2 * cfg.n_layers * W * cfg.n_kv_heads * cfg.head_dim * 4
    assert max(sizes) == full_window
    assert len(set(sizes[W - 1:])) == 1


def test_windowless_model_refuses_to_run_past_its_context(llama_dir: Path) -> None:
    llm = mistral7b.load(llama_dir)
    ctx = llm.config.max_seq_len
    llm.logits(token_ids(ctx, llm.config.vocab_size))  # exactly the context: fine
    with pytest.raises(mistral7b.ContextLengthError, match=str(ctx)):
        llm.logits(token_ids(ctx + 1, llm.config.vocab_size))
    with pytest.raises(mistral7b.ContextLengthError, match="max_tokens"):
        llm.generate(token_ids(ctx - 4, llm.config.vocab_size), max_tokens=10)


def test_windowed_model_runs_far_past_its_trained_context(hf_mistral, tmp_path: Path) -> None:
    from tests.conftest import make_hf_mistral, save_hf

    model = make_hf_mistral(max_position_embeddings=32)
    llm = mistral7b.load(save_hf(model, tmp_path / "m"))
    ids = token_ids(3 * 32, llm.config.vocab_size)
    assert (llm.logits(ids) - reference(model, ids)).abs().max().item() < TOL


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_half_precision_close_to_float32(mistral_dir: Path, dtype: str) -> None:
    ids = token_ids(2 * W, 128)
    ref = mistral7b.load(mistral_dir).logits(ids)
    low = mistral7b.load(mistral_dir, dtype=dtype)
    assert low.model.tok_embeddings.weight.dtype == getattr(torch, dtype)
    out = low.logits(ids)
    assert out.dtype == torch.float32
    assert (out - ref).abs().max().item() < 0.1
