"""ModelConfig: the shape of a Mistral-family model, read from any checkpoint format.

The fields mirror Mistral's `params.json` (Table 1 of the paper). Readers for Hugging Face's
`config.json` (transformers 4 and 5 styles) translate into the same fields, so the model code
never sees where a checkpoint came from.
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass
from typing import Any

from mistral7b.errors import ConfigError

log = logging.getLogger("mistral7b")

# Mistral 7B v0.1 was trained with theta 10000 and its params.json has no `rope_theta` key;
# v0.2 and later write `rope_theta: 1000000.0` explicitly. A reader that assumes 1e6 when the key
# is absent silently breaks v0.1 (a bug seen in peers), so "absent" means 10000 everywhere.
DEFAULT_ROPE_THETA = 10000.0

# Context length assumed for a native checkpoint without a window whose params.json gives none
# (Mistral 7B v0.2/v0.3 were trained at 32768 tokens).
DEFAULT_NATIVE_CONTEXT = 32768

# transformers' "rope_type" values that mean plain RoPE. Scaled variants (linear, dynamic, yarn,
# llama3, longrope) change the frequencies and are refused rather than run wrongly.
_PLAIN_ROPE_TYPES = {None, "default"}


@dataclass(frozen=True)
class ModelConfig:
    dim: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    hidden_dim: int
    vocab_size: int
    norm_eps: float = 1e-5
    rope_theta: float = DEFAULT_ROPE_THETA
    # Keys j a query at position i sees: i - sliding_window < j <= i. None = full attention.
    sliding_window: int | None = None
    # Longest sequence the model may attend over when it has no window (trained context).
    # With a window the rolling cache lets sequences run past it.
    max_seq_len: int = 32768
    tie_embeddings: bool = False
    # Where the config came from, for `mistral7b info` ("params.json", "config.json", ...).
    source: str = ""

    def __post_init__(self) -> None:
        for name in ("dim", "n_layers", "n_heads", "n_kv_heads", "head_dim", "hidden_dim",
                     "vocab_size", "max_seq_len"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ConfigError(f"{self.source or 'config'}: `{name}` must be a positive "
                                  f"integer (got {value!r})")
        if self.n_heads % self.n_kv_heads:
            raise ConfigError(f"{self.source or 'config'}: n_heads ({self.n_heads}) must be a "
                              f"multiple of n_kv_heads ({self.n_kv_heads}) for grouped-query "
                              "attention")
        if self.head_dim % 2:
            raise ConfigError(f"{self.source or 'config'}: head_dim must be even for RoPE "
                              f"(got {self.head_dim})")
        if self.sliding_window is not None and self.sliding_window <= 0:
            raise ConfigError(f"{self.source or 'config'}: sliding_window must be positive or "
                              f"null (got {self.sliding_window})")

    @property
    def cache_size(self) -> int:
        """Slots per layer in the rolling cache: W with a window, the whole context without."""
        return self.sliding_window if self.sliding_window is not None else self.max_seq_len

    @property
    def kv_group(self) -> int:
        """Query heads per key/value head: query head h reads kv head h // kv_group."""
        return self.n_heads // self.n_kv_heads

    def replace(self, **changes: Any) -> ModelConfig:
        return dataclasses.replace(self, **changes)

    def num_parameters(self) -> int:
        attn = self.dim * self.head_dim * (2 * self.n_heads + 2 * self.n_kv_heads)
        ffn = 3 * self.dim * self.hidden_dim
        per_layer = attn + ffn + 2 * self.dim
        embed = self.vocab_size * self.dim * (1 if self.tie_embeddings else 2)
        return self.n_layers * per_layer + embed + self.dim

    def kv_bytes_per_token(self, bytes_per_element: int) -> int:
        return 2 * self.n_layers * self.n_kv_heads * self.head_dim * bytes_per_element

    # ---- readers ------------------------------------------------------------------------

    @classmethod
    def from_params(cls, params: dict[str, Any], source: str = "params.json") -> ModelConfig:
        """Mistral's native `params.json` (mistral-inference)."""
        _refuse(params, source, {
            "moe": "mixture-of-experts models are not supported",
            "vision_encoder": "vision models are not supported",
            "quantization": "pre-quantized native checkpoints are not supported",
            "lora": "LoRA checkpoints are not supported; merge the adapter first",
            "yarn": "YaRN RoPE scaling is not supported",
        })
        if params.get("rope_scaling"):
            raise ConfigError(f"{source}: `rope_scaling` is not supported (got "
                              f"{params['rope_scaling']!r}); only plain RoPE is implemented")
        dim = _required(params, "dim", source)
        n_heads = _required(params, "n_heads", source)
        window = params.get("sliding_window", params.get("window_size"))
        if isinstance(window, list):  # some params.json store one window per layer
            if len(set(window)) != 1:
                raise ConfigError(f"{source}: per-layer `sliding_window` values {window} are not "
                                  "supported; all layers must share one window")
            window = window[0]
        return cls(
            dim=dim,
            n_layers=_required(params, "n_layers", source),
            n_heads=n_heads,
            n_kv_heads=params.get("n_kv_heads") or n_heads,
            head_dim=params.get("head_dim") or dim // n_heads,
            hidden_dim=_required(params, "hidden_dim", source),
            vocab_size=_required(params, "vocab_size", source),
            norm_eps=float(params.get("norm_eps", 1e-5)),
            rope_theta=float(params.get("rope_theta") or DEFAULT_ROPE_THETA),
            sliding_window=window or None,
            max_seq_len=int(params.get("max_seq_len") or params.get("max_position_embeddings")
                            or DEFAULT_NATIVE_CONTEXT),
            tie_embeddings=bool(params.get("tied_embeddings", False)),
            source=source,
        )

    @classmethod
    def from_hf(cls, config: dict[str, Any], source: str = "config.json") -> ModelConfig:
        """Hugging Face `config.json` of MistralForCausalLM or LlamaForCausalLM, transformers 4
        (`rope_theta`, `rope_scaling`) or 5 (`rope_parameters: {rope_theta, rope_type}`)."""
        archs = config.get("architectures") or []
        model_type = config.get("model_type")
        supported = {"MistralForCausalLM", "LlamaForCausalLM"}
        if archs and not set(archs) & supported:
            raise ConfigError(f"{source}: architecture {archs} is not supported; expected one of "
                              f"{sorted(supported)}")
        if model_type not in (None, "mistral", "llama"):
            raise ConfigError(f"{source}: model_type {model_type!r} is not supported; expected "
                              "'mistral' or 'llama'")
        _refuse(config, source, {
            "num_local_experts": "mixture-of-experts models are not supported",
            "num_experts": "mixture-of-experts models are not supported",
        })
        for flag in ("attention_bias", "mlp_bias"):
            if config.get(flag):
                raise ConfigError(f"{source}: `{flag}: true` is not supported (Mistral and Llama "
                                  "have no biases)")
        act = config.get("hidden_act", "silu")
        if act != "silu":
            raise ConfigError(f"{source}: `hidden_act` {act!r} is not supported; expected 'silu'")
        if config.get("pretraining_tp", 1) not in (1, None):
            raise ConfigError(f"{source}: `pretraining_tp` other than 1 is not supported")

        # RoPE: transformers 5 nests theta and the scaling type in `rope_parameters`;
        # transformers 4 has a top-level `rope_theta` and an optional `rope_scaling` dict.
        rope = config.get("rope_parameters") or {}
        scaling = config.get("rope_scaling") or {}
        for field, block in (("rope_parameters", rope), ("rope_scaling", scaling)):
            rope_type = block.get("rope_type", block.get("type"))
            if rope_type not in _PLAIN_ROPE_TYPES:
                raise ConfigError(f"{source}: `{field}.rope_type` {rope_type!r} is not supported; "
                                  "only plain RoPE ('default') is implemented")
        theta = rope.get("rope_theta", config.get("rope_theta"))

        # `sliding_window: null` (or absent, as in every Llama config) means full attention.
        # Some Mistral configs keep a window but switch it off with `use_sliding_window: false`.
        window = config.get("sliding_window")
        if config.get("use_sliding_window") is False:
            window = None
        hidden = _required(config, "hidden_size", source)
        n_heads = _required(config, "num_attention_heads", source)
        return cls(
            dim=hidden,
            n_layers=_required(config, "num_hidden_layers", source),
            n_heads=n_heads,
            n_kv_heads=config.get("num_key_value_heads") or n_heads,
            head_dim=config.get("head_dim") or hidden // n_heads,
            hidden_dim=_required(config, "intermediate_size", source),
            vocab_size=_required(config, "vocab_size", source),
            norm_eps=float(config.get("rms_norm_eps", 1e-6)),
            rope_theta=float(theta if theta is not None else DEFAULT_ROPE_THETA),
            sliding_window=window or None,
            max_seq_len=int(config.get("max_position_embeddings") or DEFAULT_NATIVE_CONTEXT),
            tie_embeddings=bool(config.get("tie_word_embeddings", False)),
            source=source,
        )

    @classmethod
    def from_gguf(cls, metadata: dict[str, Any], has_output: bool, source: str = "gguf"
                  ) -> ModelConfig:
        """GGUF metadata (architecture `llama`, or `mistral` where a writer uses it).
        `has_output`: whether the file has an `output.weight` tensor (absent = tied)."""
        arch = metadata.get("general.architecture")
        if arch not in ("llama", "mistral"):
            raise ConfigError(f"{source}: general.architecture {arch!r} is not supported; "
                              "expected 'llama' or 'mistral'")

        def key(name: str) -> str:
            return f"{arch}.{name}"

        if metadata.get(key("expert_count")):
            raise ConfigError(f"{source}: `{key('expert_count')}` is set: mixture-of-experts "
                              "models are not supported")
        scaling = metadata.get(key("rope.scaling.type"))
        if scaling not in (None, "none"):
            raise ConfigError(f"{source}: `{key('rope.scaling.type')}` {scaling!r} is not "
                              "supported; only plain RoPE is implemented")
        dim = _required(metadata, key("embedding_length"), source)
        n_heads = _required(metadata, key("attention.head_count"), source)
        head_dim = metadata.get(key("attention.key_length")) or dim // n_heads
        rope_dims = metadata.get(key("rope.dimension_count"), head_dim)
        if rope_dims != head_dim:
            raise ConfigError(f"{source}: `{key('rope.dimension_count')}` = {rope_dims} differs "
                              f"from head_dim {head_dim}: partial RoPE is not supported")
        vocab = metadata.get(key("vocab_size")) or len(metadata.get("tokenizer.ggml.tokens", []))
        theta = metadata.get(key("rope.freq_base"))
        config = cls(
            dim=dim,
            n_layers=_required(metadata, key("block_count"), source),
            n_heads=n_heads,
            n_kv_heads=metadata.get(key("attention.head_count_kv")) or n_heads,
            head_dim=head_dim,
            hidden_dim=_required(metadata, key("feed_forward_length"), source),
            vocab_size=vocab or 0,
            norm_eps=float(metadata.get(key("attention.layer_norm_rms_epsilon"), 1e-5)),
            rope_theta=float(theta if theta is not None else DEFAULT_ROPE_THETA),
            sliding_window=metadata.get(key("attention.sliding_window")) or None,
            max_seq_len=int(metadata.get(key("context_length")) or DEFAULT_NATIVE_CONTEXT),
            tie_embeddings=not has_output,
            source=source,
        )
        if config.sliding_window is None and is_mistral_7b_v01(config):
            # GGUF converters never wrote a window key for Mistral 7B v0.1, yet the model was
            # trained with W = 4096; without it, attention past 4096 tokens is not the paper's.
            config = config.replace(sliding_window=MISTRAL_V01_WINDOW)
            log.info("%s: Mistral 7B v0.1 detected (shapes, 32000-token vocabulary, theta 1e4) "
                     "and no sliding-window key: using W = %d (override with sliding_window)",
                     source, MISTRAL_V01_WINDOW)
        return config


MISTRAL_V01_WINDOW = 4096


def is_mistral_7b(config: ModelConfig) -> bool:
    """Mistral 7B's shapes with its 32000-token v1 vocabulary (v0.1 and v0.2; v0.3 has 32768)."""
    return (config.dim, config.n_layers, config.n_heads, config.n_kv_heads, config.head_dim,
            config.hidden_dim, config.vocab_size) == (4096, 32, 32, 8, 128, 14336, 32000)


def is_mistral_7b_v01(config: ModelConfig) -> bool:
    """v0.1 is the one with theta 10000 (v0.2 has theta 1e6 and no window)."""
    return is_mistral_7b(config) and config.rope_theta == DEFAULT_ROPE_THETA


def _required(d: dict[str, Any], key: str, source: str) -> Any:
    if key not in d or d[key] is None:
        raise ConfigError(f"{source}: required field `{key}` is missing")
    return d[key]


def _refuse(d: dict[str, Any], source: str, unsupported: dict[str, str]) -> None:
    for key, why in unsupported.items():
        if d.get(key):
            raise ConfigError(f"{source}: field `{key}` is present: {why}")
