"""GGUF loading: every supported tensor type against a float reference, the embedded SmolLM2
against transformers, Mistral 7B v0.1's missing window, and broken files."""

from __future__ import annotations

import logging
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as Q
from gguf import GGUFWriter

import mistral7b
from mistral7b.config import ModelConfig
from mistral7b.default_model import default_model_path
from mistral7b.errors import LoadError
from tests.conftest import make_hf_mistral
from tests.gguf_writer import write_gguf

W = 16
IDS = [int(x) for x in np.random.default_rng(0).integers(0, 256, size=5 * W + 3)]

# Max |logit error| allowed against the original float model, by type (the dequantized twin must
# match to 1e-4 whatever the type).
QUANT_TOLERANCE = {Q.F32: 1e-4, Q.F16: 2e-2, Q.BF16: 0.1, Q.Q8_0: 0.1, Q.Q4_0: 1.0, Q.Q4_1: 1.0}


def small_mistral(seed: int = 5) -> torch.nn.Module:
    # K-quants pack 256 values per block, so rows are 256 wide.
    return make_hf_mistral(window=W, vocab=256, seed=seed, hidden_size=256, intermediate_size=512,
                           num_attention_heads=4, num_key_value_heads=2, head_dim=64)


def hf_logits(model: torch.nn.Module, ids: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0].float()


@pytest.mark.parametrize("qtype", [Q.F32, Q.F16, Q.BF16, Q.Q8_0, Q.Q4_0, Q.Q4_1, Q.Q4_K, Q.Q5_K,
                                   Q.Q6_K], ids=lambda q: q.name)
def test_each_tensor_type_matches_its_float_reference(tmp_path: Path, qtype: Q) -> None:
    original = small_mistral()
    before = hf_logits(original, IDS)
    path = tmp_path / f"tiny-{qtype.name}.gguf"
    reference = hf_logits(write_gguf(original, path, qtype, window=W), IDS)
    dequantized = mistral7b.load(path, dequantize=True)
    assert dequantized.config.sliding_window == W and dequantized.config.n_kv_heads == 2
    ours = dequantized.logits(IDS)
    assert (ours - reference).abs().max().item() < 1e-4
    if qtype in QUANT_TOLERANCE:
        assert (ours - before).abs().max().item() < QUANT_TOLERANCE[qtype]
    # Packed weights and their kernels (16-bit activations for Q8_0/Q4_0/Q4_1): close to the
    # same reference.
    packed = mistral7b.load(path).logits(IDS)
    assert (packed - reference).abs().max().item() < 1e-3 * max(1.0, reference.abs().max().item())


def test_a_mix_of_types_in_one_layer_decodes_in_the_fused_step(tmp_path: Path) -> None:
    """Q4_K_M files store wv and w2 in Q6_K on half of Mistral 7B's layers, so wq, wk and wv
    cannot be stacked into one matrix there (nor w1 and w3 when their types differ): the
    one-call decode step takes such a projection as its parts. Two sequences decoded together,
    teacher-forced, match transformers at every step on the weights the file holds."""
    from mistral7b.cache import RollingCache
    from mistral7b.generate import decode_step, prefill

    path = tmp_path / "mix.gguf"
    original = write_gguf(small_mistral(), path, Q.Q4_K, window=W,
                          types={"model.layers.1.self_attn.v_proj": Q.Q6_K,
                                 "model.layers.1.mlp.down_proj": Q.Q6_K,
                                 "model.layers.0.mlp.up_proj": Q.Q8_0})
    model = mistral7b.load(path).model
    attention, ffn = model.layers[1].attention, model.layers[0].feed_forward
    assert attention.wqkv is None and ffn.w13 is None
    assert (attention.wv.fmt, ffn.w3.fmt) == ("Q6_Kx8", "Q8_0x8")
    assert model._fused_decode_plan() is not None
    sequences, start = [IDS[:40], IDS[40:80]], [7, 12]
    cache = RollingCache(model.config, rows=2)
    prefill(model, cache, [0, 1], [s[:n] for s, n in zip(sequences, start, strict=True)], 8)
    steps = [decode_step(model, cache, [0, 1],
                         [s[n + t] for s, n in zip(sequences, start, strict=True)])
             for t in range(25)]   # past the window of 16
    for b, (sequence, n) in enumerate(zip(sequences, start, strict=True)):
        reference = hf_logits(original, sequence)[n:n + len(steps)]
        ours = torch.stack([step[b] for step in steps])
        assert (ours - reference).abs().max().item() < 1e-3 * max(1.0, reference.abs().max().item())


@pytest.mark.parametrize("vocabulary", [{}, {"tokenizer.ggml.model": "none"}],
                         ids=["no tokenizer keys", "llama.cpp's no-vocabulary model"])
def test_gguf_without_tokenizer_runs_on_token_ids(tmp_path: Path,
                                                  vocabulary: dict[str, str]) -> None:
    path = tmp_path / "tiny.gguf"
    write_gguf(small_mistral(), path, Q.Q8_0, window=W, strings=vocabulary)
    llm = mistral7b.load(path)
    assert len(llm.generate([1, 2, 3], max_tokens=3, temperature=0).token_ids) == 3
    with pytest.raises(mistral7b.TokenizerError):
        llm.tokenizer.encode("hello")


def test_sliding_window_override(tmp_path: Path) -> None:
    path = tmp_path / "tiny.gguf"
    model = write_gguf(small_mistral(), path, Q.F32, window=W)
    assert mistral7b.load(path, sliding_window=0).config.sliding_window is None
    assert mistral7b.load(path, sliding_window=8).config.sliding_window == 8
    # Full attention over 5 W tokens is no longer the windowed reference.
    full = mistral7b.load(path, sliding_window=0).logits(IDS)
    assert (full - hf_logits(model, IDS)).abs().max().item() > 1e-2


MISTRAL_V01_GGUF_METADATA = {
    "general.architecture": "llama", "llama.context_length": 32768,
    "llama.embedding_length": 4096, "llama.block_count": 32, "llama.feed_forward_length": 14336,
    "llama.attention.head_count": 32, "llama.attention.head_count_kv": 8,
    "llama.rope.dimension_count": 128, "llama.rope.freq_base": 10000.0,
    "llama.attention.layer_norm_rms_epsilon": 1e-5, "tokenizer.ggml.tokens": ["x"] * 32000,
}


def test_mistral_v01_gguf_gets_its_window(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.INFO, logger="mistral7b"):
        cfg = ModelConfig.from_gguf(MISTRAL_V01_GGUF_METADATA, has_output=True)
    assert cfg.sliding_window == 4096
    assert "Mistral 7B v0.1 detected" in caplog.text
    # v0.2 has the same shapes but theta 1e6 and really no window.
    v02 = dict(MISTRAL_V01_GGUF_METADATA, **{"llama.rope.freq_base": 1e6})
    assert ModelConfig.from_gguf(v02, has_output=True).sliding_window is None
    # An explicit key wins.
    keyed = dict(MISTRAL_V01_GGUF_METADATA, **{"llama.attention.sliding_window": 2048})
    assert ModelConfig.from_gguf(keyed, has_output=True).sliding_window == 2048


def test_smollm2_logits_match_transformers() -> None:
    from transformers import AutoModelForCausalLM

    path = default_model_path()
    llm = mistral7b.load(dequantize=True)
    assert llm.path == path and llm.config.tie_embeddings and llm.config.n_kv_heads == 3
    hf = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name,
                                              dtype=torch.float32).eval()
    ids = [1, 504, 3458, 282, 4649, 314, 2, 30, 5000, 400, 12, 77, 31, 4343, 900, 17, 49151]
    err = (llm.logits(ids) - hf_logits(hf, ids)).abs().max().item()
    assert err < 1e-4


# ---- broken files ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def good_gguf(tmp_path_factory: pytest.TempPathFactory) -> bytes:
    path = tmp_path_factory.mktemp("gguf") / "tiny.gguf"
    write_gguf(small_mistral(), path, Q.Q8_0, window=W)
    return path.read_bytes()


@pytest.mark.parametrize(("mutate", "message"), [
    (lambda b: b[: len(b) // 2], "truncated"),
    (lambda b: b[:200], "corrupt or truncated"),
    (lambda b: b[:12], "corrupt or truncated"),
    (lambda b: b"GGML" + b[4:], "bad magic"),
    (lambda b: b[:4] + struct.pack("<I", 7) + b[8:], "unsupported GGUF version 7"),
    (lambda b: b[:8] + struct.pack("<Q", 2**60) + b[16:], "cannot fit in"),
    (lambda b: b[:16] + struct.pack("<Q", 2**60) + b[24:], "cannot fit in"),
    (lambda b: b"", "bad magic"),
])
def test_broken_gguf_files_are_clear_errors(good_gguf: bytes, tmp_path: Path, mutate,
                                            message: str) -> None:
    path = tmp_path / "broken.gguf"
    path.write_bytes(mutate(good_gguf))
    with pytest.raises(LoadError, match=message):
        mistral7b.load(path)


def test_unsupported_tensor_type_is_named(tmp_path: Path) -> None:
    path = tmp_path / "q5_0.gguf"
    writer = GGUFWriter(str(path), "llama")
    writer.add_embedding_length(32)
    writer.add_tensor("token_embd.weight", np.zeros((4, 22), dtype=np.uint8), raw_dtype=Q.Q5_0)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(LoadError, match=r"type Q5_0, which is not supported \(supported: F32"):
        mistral7b.load(path)


def test_a_non_gguf_file_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "model.bin"
    path.write_bytes(b"hello")
    with pytest.raises(LoadError, match=r"not a \.gguf"):
        mistral7b.load(path)


@pytest.mark.parametrize("qtype", [Q.F16, Q.BF16], ids=lambda q: q.name)
def test_16_bit_weights_stay_16_bit(tmp_path: Path, qtype: Q) -> None:
    from mistral7b.quant.modules import QuantLinear

    path = tmp_path / f"tiny-{qtype.name}.gguf"
    write_gguf(small_mistral(), path, qtype, window=W)
    model = mistral7b.load(path).model               # float32 activations
    matrices = [m for m in model.modules() if isinstance(m, QuantLinear)]
    assert matrices and all(m.fmt == qtype.name for m in matrices)
    assert all(m.weight.nbytes == 2 * m.in_features * m.out_features for m in matrices)
