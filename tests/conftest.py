"""Tiny random models made in code, saved in each checkpoint format, and their transformers twins
(the oracle)."""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))

WINDOW = 16
# Found without importing mistral-common, so that the GPU-only tests also run where it is absent.
_MISTRAL_COMMON = importlib.util.find_spec("mistral_common")
MISTRAL_V1_TOKENIZER = Path(_MISTRAL_COMMON.origin if _MISTRAL_COMMON and _MISTRAL_COMMON.origin
                            else "mistral_common/missing").parent / "data" / "tokenizer.model.v1"


def wait_until(condition: Callable[[], bool], timeout: float = 5.0) -> bool:
    """Poll `condition` until it holds (True) or `timeout` seconds pass (False)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.01)
    return False


# Three prompts decoded past the window's wrap (greedy_run).
PROMPTS = [[5, 9, 1, 77, 3], [4] * 13, [100, 2]]
STEPS = 2 * WINDOW + 3                  # every row wraps its window-sized buffer


def greedy_run(model: torch.nn.Module, device: str, decoder_args: dict | None,
               dtype: torch.dtype = torch.float32, forced: list[list[int]] | None = None
               ) -> tuple[list[list[int]], list[torch.Tensor]]:
    """Greedy tokens and per-step logits (on the host) of three rows; row 1 leaves half-way,
    so the later steps run rows 0 and 2 only (a padded bucket for the static decoder).
    decoder_args: a StaticDecoder's keyword arguments, or None for the plain step. forced: feed
    each step these tokens (another run's history) instead of its own greedy choice."""
    from mistral7b.cache import RollingCache
    from mistral7b.generate import decode_step, prefill
    from mistral7b.static_decode import StaticDecoder

    cache = RollingCache(model.config, rows=4, dtype=dtype, device=device, initial_slots=4)
    decoder = StaticDecoder(model, cache, **decoder_args) if decoder_args is not None else None
    rows = [0, 1, 2]
    tokens = prefill(model, cache, rows, PROMPTS, 8).argmax(-1).tolist()
    history, logits = [list(tokens)], []
    for i in range(STEPS):
        if forced is not None:
            tokens = forced[i]
        if i == STEPS // 2:
            rows, tokens = [0, 2], [tokens[0], tokens[-1]]
        step = (decoder.step(rows, tokens) if decoder is not None
                else decode_step(model, cache, rows, tokens))
        logits.append(step.cpu())
        tokens = step.argmax(-1).tolist()
        history.append(list(tokens))
    return history, logits


def make_hf_mistral(window: int | None = WINDOW, vocab: int = 128, seed: int = 0,
                    **overrides: object) -> torch.nn.Module:
    from transformers import MistralConfig, MistralForCausalLM

    torch.manual_seed(seed)
    kwargs: dict = dict(vocab_size=vocab, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                        num_attention_heads=8, num_key_value_heads=2, sliding_window=window,
                        max_position_embeddings=512, rms_norm_eps=1e-5,
                        attn_implementation="eager")
    kwargs.update(overrides)
    model = MistralForCausalLM(MistralConfig(**kwargs)).eval()
    _randomize_norms(model)
    return model


def make_hf_llama(vocab: int = 128, seed: int = 1, **overrides: object) -> torch.nn.Module:
    """Llama-family variant: tied embeddings, head_dim != dim / n_heads, no window, theta 5e5."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    kwargs: dict = dict(vocab_size=vocab, hidden_size=48, intermediate_size=80, num_hidden_layers=2,
                        num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                        tie_word_embeddings=True, max_position_embeddings=128,
                        rope_theta=500000.0, attn_implementation="eager")
    kwargs.update(overrides)
    model = LlamaForCausalLM(LlamaConfig(**kwargs)).eval()
    _randomize_norms(model)
    return model


def _randomize_norms(model: torch.nn.Module) -> None:
    # Norm weights start at 1; random ones make a mapping mistake between norms visible.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1 + 0.2 * torch.randn_like(p))


def save_hf(model: torch.nn.Module, directory: Path, shards: bool = False) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(directory, max_shard_size="100KB" if shards else "10GB")
    return directory


# Mistral native names and the q/k row order of its checkpoints, written here independently of
# the package (inverse of the permutation in transformers' Llama/Mistral conversion scripts).
_NATIVE_NAMES = {
    "model.embed_tokens.weight": "tok_embeddings.weight",
    "model.norm.weight": "norm.weight",
    "lm_head.weight": "output.weight",
}
_NATIVE_LAYER = {
    "self_attn.q_proj": "attention.wq", "self_attn.k_proj": "attention.wk",
    "self_attn.v_proj": "attention.wv", "self_attn.o_proj": "attention.wo",
    "mlp.gate_proj": "feed_forward.w1", "mlp.down_proj": "feed_forward.w2",
    "mlp.up_proj": "feed_forward.w3", "input_layernorm": "attention_norm",
    "post_attention_layernorm": "ffn_norm",
}


def _to_interleaved(w: torch.Tensor, heads: int) -> torch.Tensor:
    rows, cols = w.shape
    return w.view(heads, 2, rows // heads // 2, cols).transpose(1, 2).reshape(rows, cols)


def native_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    cfg = model.config
    out = {}
    for name, t in model.state_dict().items():
        if name in _NATIVE_NAMES:
            new = _NATIVE_NAMES[name]
        else:
            _, _, layer, *rest = name.split(".")
            module = ".".join(rest[:-1])
            new = f"layers.{layer}.{_NATIVE_LAYER[module]}.{rest[-1]}"
        if "q_proj" in name:
            t = _to_interleaved(t, cfg.num_attention_heads)
        elif "k_proj" in name:
            t = _to_interleaved(t, cfg.num_key_value_heads)
        out[new] = t.clone().contiguous()
    return out


def native_params(model: torch.nn.Module) -> dict:
    cfg = model.config
    params = {
        "dim": cfg.hidden_size, "n_layers": cfg.num_hidden_layers, "head_dim": cfg.head_dim,
        "hidden_dim": cfg.intermediate_size, "n_heads": cfg.num_attention_heads,
        "n_kv_heads": cfg.num_key_value_heads, "norm_eps": cfg.rms_norm_eps,
        "vocab_size": cfg.vocab_size,
    }
    window = getattr(cfg, "sliding_window", None)
    if window:
        params["sliding_window"] = window
    rope = getattr(cfg, "rope_parameters", None) or {}
    theta = rope.get("rope_theta", getattr(cfg, "rope_theta", 10000.0))
    if theta != 10000.0:
        params["rope_theta"] = theta
    return params


def save_native(model: torch.nn.Module, directory: Path, fmt: str = "safetensors",
                tokenizer: Path | None = None) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "params.json").write_text(json.dumps(native_params(model)))
    state = native_state(model)
    if fmt == "safetensors":
        save_file(state, directory / "consolidated.safetensors")
    else:
        torch.save(state, directory / "consolidated.00.pth")
    if tokenizer is not None:
        shutil.copy(tokenizer, directory / tokenizer.name)
    return directory


@pytest.fixture(scope="session")
def hf_mistral() -> torch.nn.Module:
    return make_hf_mistral()


@pytest.fixture(scope="session")
def hf_llama() -> torch.nn.Module:
    return make_hf_llama()


@pytest.fixture(scope="session")
def mistral_dir(hf_mistral: torch.nn.Module, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_hf(hf_mistral, tmp_path_factory.mktemp("hf_mistral"))


@pytest.fixture(scope="session")
def llama_dir(hf_llama: torch.nn.Module, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_hf(hf_llama, tmp_path_factory.mktemp("hf_llama"))


@pytest.fixture(scope="session")
def hf_mistral_v1() -> torch.nn.Module:
    """A tiny model with Mistral 7B v0.1's vocabulary, to run with the real v1 tokenizer."""
    return make_hf_mistral(vocab=32000, seed=3)


@pytest.fixture(scope="session")
def native_v1_dir(hf_mistral_v1: torch.nn.Module, tmp_path_factory: pytest.TempPathFactory
                  ) -> Path:
    return save_native(hf_mistral_v1, tmp_path_factory.mktemp("native_v1"),
                       tokenizer=MISTRAL_V1_TOKENIZER)
