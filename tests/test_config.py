"""ModelConfig from every config dialect; the v0.1 rules; refusals that name the field."""

from __future__ import annotations

import pytest

from mistral7b.config import ModelConfig
from mistral7b.errors import ConfigError

# Mistral 7B v0.1's params.json as published: no rope_theta key.
V01_PARAMS = {"dim": 4096, "n_layers": 32, "head_dim": 128, "hidden_dim": 14336, "n_heads": 32,
              "n_kv_heads": 8, "norm_eps": 1e-05, "sliding_window": 4096, "vocab_size": 32000}

HF_V01 = {"architectures": ["MistralForCausalLM"], "model_type": "mistral", "hidden_size": 4096,
          "intermediate_size": 14336, "num_hidden_layers": 32, "num_attention_heads": 32,
          "num_key_value_heads": 8, "max_position_embeddings": 32768, "rms_norm_eps": 1e-05,
          "rope_theta": 10000.0, "sliding_window": 4096, "vocab_size": 32000,
          "tie_word_embeddings": False, "hidden_act": "silu"}


def test_v01_params_json() -> None:
    cfg = ModelConfig.from_params(V01_PARAMS)
    assert cfg.rope_theta == 10000.0          # absent key: v0.1's theta, never 1e6
    assert cfg.sliding_window == 4096
    assert cfg.kv_group == 4 and cfg.cache_size == 4096
    assert abs(cfg.num_parameters() / 1e9 - 7.24) < 0.01   # Mistral 7B: 7.24 B parameters
    # 128 KiB of fp16 cache per token (SPEC §1)
    assert cfg.kv_bytes_per_token(2) == 128 * 1024


def test_v02_params_json_without_window() -> None:
    params = dict(V01_PARAMS, rope_theta=1000000.0)
    del params["sliding_window"]
    cfg = ModelConfig.from_params(params)
    assert cfg.rope_theta == 1e6 and cfg.sliding_window is None and cfg.cache_size == 32768


def test_hf_transformers4_style() -> None:
    cfg = ModelConfig.from_hf(HF_V01)
    assert cfg == ModelConfig.from_params(V01_PARAMS).replace(
        max_seq_len=32768, source="config.json")


def test_hf_transformers5_style_rope_parameters() -> None:
    config = dict(HF_V01)
    del config["rope_theta"]
    config["rope_parameters"] = {"rope_theta": 1e6, "rope_type": "default"}
    config["sliding_window"] = None
    cfg = ModelConfig.from_hf(config)
    assert cfg.rope_theta == 1e6 and cfg.sliding_window is None


def test_hf_without_theta_means_10000() -> None:
    config = dict(HF_V01)
    del config["rope_theta"]
    assert ModelConfig.from_hf(config).rope_theta == 10000.0


def test_llama_variant() -> None:
    config = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 576,
              "intermediate_size": 1536, "num_hidden_layers": 30, "num_attention_heads": 9,
              "num_key_value_heads": 3, "max_position_embeddings": 8192, "rms_norm_eps": 1e-05,
              "rope_theta": 100000, "tie_word_embeddings": True, "vocab_size": 49152,
              "head_dim": 64}
    cfg = ModelConfig.from_hf(config)
    assert cfg.tie_embeddings and cfg.sliding_window is None and cfg.head_dim == 64
    assert cfg.cache_size == 8192


@pytest.mark.parametrize(("change", "field"), [
    ({"rope_scaling": {"type": "linear", "factor": 2.0}}, "rope_scaling.rope_type"),
    ({"rope_parameters": {"rope_type": "llama3", "rope_theta": 5e5}}, "rope_parameters.rope_type"),
    ({"num_local_experts": 8}, "num_local_experts"),
    ({"architectures": ["MixtralForCausalLM"]}, "MixtralForCausalLM"),
    ({"attention_bias": True}, "attention_bias"),
    ({"hidden_act": "gelu"}, "hidden_act"),
    ({"num_attention_heads": 30}, "n_kv_heads"),
])
def test_hf_refusals_name_the_field(change: dict, field: str) -> None:
    with pytest.raises(ConfigError, match=field.replace(".", r"\.")):
        ModelConfig.from_hf(dict(HF_V01, **change))


def test_params_refusals_name_the_field() -> None:
    with pytest.raises(ConfigError, match="`moe`"):
        ModelConfig.from_params(dict(V01_PARAMS, moe={"num_experts": 8}))
    missing = dict(V01_PARAMS)
    del missing["hidden_dim"]
    with pytest.raises(ConfigError, match="hidden_dim"):
        ModelConfig.from_params(missing)
