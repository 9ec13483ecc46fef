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
from mistral7b.errors import InvalidArgumentError
from mistral7b.quant import formats, kernels
from mistral7b.quant.formats import FORMATS as FORMATS_BY_NAME
from mistral7b.quant.modules import QuantEmbedding, QuantLinear
from tests.gguf_writer import random_k_blocks

FORMATS = ["Q8_0", "Q4_0", "Q4_1", "Q4_K", "Q5_K", "Q6_K", "F16", "BF16"]
# (rows of x, out features, in features): odd output counts, several block counts, batch 1,
# small batches, and past the integer kernel's row limit (the dequantize + BLAS path).
SHAPES = [(1, 7, 256), (1, 33, 512), (3, 65, 256), (16, 129, 768), (17, 31, 256), (48, 9, 512),
          (49, 31, 256), (70, 5, 512)]


def packed_weight(fmt: str, rows: int, cols: int, seed: int = 0) -> tuple[torch.Tensor,
                                                                         torch.Tensor]:
    """Blocks of `fmt` and the float matrix they mean according to the gguf package."""
    rng = np.random.default_rng(seed)
    kind = Q[fmt]
    if fmt.endswith("_K"):
        raw = random_k_blocks(rows, cols, kind, rng)
    elif fmt == "F16":
        raw = rng.standard_normal((rows, cols)).astype(np.float16).view(np.uint8)
        reference = raw.view(np.float16).astype(np.float32)
        return torch.from_numpy(np.ascontiguousarray(raw)), torch.from_numpy(reference)
    else:
        raw = gguf_quantize(rng.standard_normal((rows, cols)).astype(np.float32), kind)
    reference = np.asarray(gguf_dequantize(raw, kind), dtype=np.float32).reshape(rows, cols)
    return torch.from_numpy(np.ascontiguousarray(raw)), torch.from_numpy(reference)


def relative_error(ours: torch.Tensor, reference: torch.Tensor) -> float:
    return ((ours - reference).abs().max() / reference.abs().max()).item()


def _no_portable_fallback(raw: torch.Tensor, fmt: str) -> torch.Tensor:
    raise AssertionError(f"the fast path fell back to the portable dequantize for {fmt}")


@pytest.fixture(params=["fast", "portable"])
def path(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    if request.param == "portable":
        monkeypatch.setattr(kernels, "_extension", None)
        monkeypatch.setattr(kernels, "_tried", True)
    elif kernels.extension() is None:
        pytest.skip("the AVX2 extension is not available on this machine")
    else:  # every format must run in C++ here: a silent fallback would test the wrong code
        monkeypatch.setattr(kernels, "dequantize", _no_portable_fallback)
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


@pytest.mark.parametrize("fmt", ["Q4_K", "Q5_K", "Q6_K"])
def test_k_blocks_at_the_integer_limits(path: str, fmt: str) -> None:
    """The largest weight integers and scales, times activations that quantize to +-32767,
    must not overflow the int16 products or int32 sums; a zero row of x gives exact zeros."""
    spec = FORMATS_BY_NAME[fmt]
    ones = np.full((2, spec.block_bytes), 0xFF, dtype=np.uint8)     # all bits set
    zeros = np.zeros((2, spec.block_bytes), dtype=np.uint8)         # all integers 0
    blocks = np.stack([ones, zeros, ones, zeros])                   # 4 rows of 2 blocks
    scales = {"Q6_K": [(192, 208, 0x80)]}.get(fmt, [(4, 16, 0xFF)])  # int8 -128 / 6-bit 63
    for lo, hi, byte in scales:
        blocks[:, :, lo:hi] = byte
    f16_offsets = [208] if fmt == "Q6_K" else [0, 2]
    for off in f16_offsets:
        blocks[:, :, off:off + 2] = np.array([3e-3], np.float16).view(np.uint8)
    if fmt != "Q6_K":
        blocks[2:, :, 2:4] = np.array([-2e-3], np.float16).view(np.uint8)   # a negative dmin
    raw = np.ascontiguousarray(blocks.reshape(4, -1))
    weight = torch.from_numpy(np.asarray(gguf_dequantize(raw, Q[fmt]), np.float32).reshape(4, -1))
    signs = torch.where(torch.arange(512) % 3 == 0, -1.0, 1.0)
    x = torch.stack([torch.full((512,), 7.0), 7.0 * signs, torch.zeros(512), -signs])
    y = kernels.linear(x, torch.from_numpy(raw), fmt)
    reference = x.double() @ weight.double().T
    assert relative_error(y.double(), reference) < 2e-4
    assert torch.equal(y[2], torch.zeros(4))
    assert torch.equal(kernels.dequantize_rows(torch.from_numpy(raw), fmt), weight)


def test_activations_quantize_as_the_reference_rounding() -> None:
    """The integer kernels see each run of 32 activations as q = round_half_even(x / d),
    d = max |x| / 32767 (float32 arithmetic, x times 1 / d): bit for bit, ties included."""
    ext = kernels.extension()
    if ext is None:
        pytest.skip("the AVX2 extension is not available on this machine")
    g = torch.Generator().manual_seed(5)
    x = torch.randn(3, 256, generator=g) * torch.logspace(-3, 3, 256)
    x[1, :32] = 0.0                                                 # an all-zero run
    ties = torch.tensor([0.5, 1.5, 2.5, -0.5, -1.5, -2.5, 3.5, 32767.0])
    x[2, 32:64] = torch.cat([ties, torch.zeros(24)])                # d = 1: exact halves
    q, d, s = ext.quantize_activations(x)
    runs = x.view(3, -1, 32)
    d_ref = runs.abs().amax(-1) / 32767
    inv = torch.where(d_ref > 0, 1 / d_ref, torch.zeros(()))
    q_ref = torch.round(runs * inv[..., None]).to(torch.int16)       # round half to even
    assert torch.equal(d, d_ref)
    assert torch.equal(q, q_ref.view(3, -1))
    assert torch.equal(s, d_ref * q_ref.sum(-1, dtype=torch.int32).float())
    assert q[2, 32:40].tolist() == [0, 2, 2, 0, -2, -2, 4, 32767]


@pytest.mark.parametrize("fmt", FORMATS)
def test_each_row_gets_the_same_bits_whatever_the_batch(fmt: str) -> None:
    """A sequence's numbers must not depend on which others share its batch: the server's
    16 concurrent greedy clients must each get exactly the text they get alone."""
    ext = kernels.extension()
    if ext is None:
        pytest.skip("the AVX2 extension is not available on this machine")
    raw, _ = packed_weight(fmt, 37, 512)
    x = torch.randn(16, 512, generator=torch.Generator().manual_seed(3))
    ggml = FORMATS_BY_NAME[fmt].ggml_type
    together = ext.qmatmul(x, raw, ggml)
    for rows in (range(16), range(1, 6), range(3, 16)):            # 4-row tiles and leftovers
        alone = torch.cat([ext.qmatmul(x[i:i + 1], raw, ggml) for i in rows])
        assert torch.equal(ext.qmatmul(x[list(rows)], raw, ggml), alone)
        assert torch.equal(together[list(rows)], alone)


@pytest.mark.parametrize("fmt", FORMATS)
def test_prefill_kernel_matches_the_float_reference_whatever_the_batch(fmt: str) -> None:
    """csrc/prefill.cpp: float32 products of the dequantized weights, each row computed alone
    (tiles of 4 rows x 3 weight rows, panels of weight rows shared by the threads)."""
    ext = kernels.extension()
    if ext is None:
        pytest.skip("the AVX2 extension is not available on this machine")
    ggml = FORMATS_BY_NAME[fmt].ggml_type
    # K = 257 leaves 16-bit float rows a tail of one value past the 8-wide vectors;
    # N = 31 ends on a partial tile, 100 spans several panels with a partial last one.
    k_values = [256, 257] if fmt in ("F16", "BF16") else [256, 512]
    for n, k in [(31, k_values[0]), (100, k_values[1])]:
        raw, weight = packed_weight(fmt, n, k, seed=n)
        x = torch.randn(23, k, generator=torch.Generator().manual_seed(k))
        together = ext.prefill_matmul(x, raw, ggml)
        reference = x.double() @ weight.double().T
        assert relative_error(together.double(), reference) < 1e-5
        for rows in ([0], [5, 6, 7], list(range(3, 20))):
            assert torch.equal(ext.prefill_matmul(x[rows], raw, ggml), together[rows])
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            assert torch.equal(ext.prefill_matmul(x, raw, ggml), together)
        finally:
            torch.set_num_threads(threads)


def test_decode_steps_always_take_the_integer_kernel() -> None:
    """A decode batch of any size keeps each row's bits (the integer kernel); a pre-fill chunk
    of more than PREFILL_INT_MAX_ROWS rows takes the kernel integer_prefill picks."""
    ext = kernels.extension()
    if ext is None:
        pytest.skip("the AVX2 extension is not available on this machine")
    raw, _ = packed_weight("Q4_1", 40, 256)
    x = torch.randn(64, 256, generator=torch.Generator().manual_seed(1))
    integer, prefill = ext.qmatmul(x, raw, Q.Q4_1), ext.prefill_matmul(x, raw, Q.Q4_1)
    assert not torch.equal(integer, prefill)
    layer = QuantLinear(256, 40, "Q4_1")
    layer.weight = raw
    assert torch.equal(layer(x[:, None]), integer[:, None])           # 64 sequences, 1 token
    assert torch.equal(layer(x), integer)                             # (B, dim): a decode batch
    many = integer if kernels.integer_prefill(ext.isa, 64, "Q4_1", torch.float32) else prefill
    assert torch.equal(layer(x[None]), many[None])                    # one sequence, 64 tokens
    small = kernels.PREFILL_INT_MAX_ROWS
    assert torch.equal(layer(x[None, :small]), integer[None, :small])


def test_pre_fill_chunks_take_the_integer_kernel_where_it_measured_faster() -> None:
    f32, bf16 = torch.float32, torch.bfloat16
    small = kernels.PREFILL_INT_MAX_ROWS
    assert all(kernels.integer_prefill(isa, small, "Q6_K", f32) for isa in ("avx2", "avxvnni"))
    assert not kernels.integer_prefill("avx2", small + 1, "Q4_1x8", f32)
    assert kernels.integer_prefill("avx512vnni", 256, "Q4_1x8", f32)
    assert kernels.integer_prefill("avxvnni", 256, "Q4_Kx8", f32)
    assert kernels.integer_prefill("avx512vnni", 256, "Q6_Kx8", f32)
    assert not kernels.integer_prefill("avx512vnni", 256, "Q4_1", f32)     # GGUF order
    assert not kernels.integer_prefill("avx512vnni", 256, "Q4_1x8", bf16)   # asked for bfloat16


def test_kernels_reject_shapes_that_are_not_whole_blocks() -> None:
    ext = kernels.extension()
    if ext is None:
        pytest.skip("the AVX2 extension is not available on this machine")
    raw, _ = packed_weight("Q4_K", 3, 512)
    with pytest.raises(RuntimeError, match="multiple of 256"):
        ext.qmatmul(torch.randn(1, 480), raw, Q.Q4_K)
    with pytest.raises(RuntimeError, match="bytes"):
        ext.qmatmul(torch.randn(1, 256), raw, Q.Q4_K)
    with pytest.raises(RuntimeError, match="whole blocks"):
        ext.dequantize(raw[:, :100], Q.Q4_K)


def test_fast_path_is_used_on_this_machine() -> None:
    if torch.backends.cpu.get_cpu_capability() not in ("AVX2", "AVX512"):
        pytest.skip("no AVX2")
    assert kernels.extension() is not None
    # the K-quants too (no NumPy on the hot path), and the repacked x8 layouts
    assert kernels.FAST_FORMATS == set(FORMATS_BY_NAME)


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


def test_bfloat16_prefill_stays_close_to_the_float_path(both) -> None:
    packed, dequantized = both
    prompt = "Mistral 7B uses grouped-query attention and a sliding window of 4096 tokens. " * 5
    ids = packed.tokenizer.encode(prompt)
    assert len(ids) > kernels.PREFILL_INT_MAX_ROWS     # pre-fill takes the many-row matmul
    reference = dequantized.logits(ids)
    kwargs = dict(max_tokens=16, temperature=0, ignore_eos=True)
    packed.model.set_prefill_dtype(torch.bfloat16)
    try:
        # Measured 0.4-0.8 on logits of ~40 (bfloat16 keeps 8 bits of mantissa); float32: 0.01.
        assert (packed.logits(ids) - reference).abs().max().item() < 1.5
        assert (packed.generate(prompt, **kwargs).token_ids
                == dequantized.generate(prompt, **kwargs).token_ids)
    finally:
        packed.model.set_prefill_dtype(torch.float32)
    assert (packed.logits(ids) - reference).abs().max().item() < 0.05


def test_prefill_dtype_must_be_float32_or_bfloat16() -> None:
    with pytest.raises(InvalidArgumentError, match="prefill_dtype"):
        mistral7b.load(prefill_dtype="float16")


def test_isa_levels_follow_the_cpu_flags_and_mistral7b_isa(monkeypatch: pytest.MonkeyPatch
                                                            ) -> None:
    from mistral7b.errors import ConfigError

    everything = {"avx512f", "avx512bw", "avx512vl", "avx512_vnni", "avx_vnni"}
    assert kernels.supported_isas(everything) == ["avx512vnni", "avxvnni", "avx2"]
    assert kernels.supported_isas({"avx_vnni", "avx512f"}) == ["avxvnni", "avx2"]
    assert kernels.supported_isas(set()) == ["avx2"]
    monkeypatch.delenv("MISTRAL7B_ISA", raising=False)
    assert kernels.chosen_isa(everything) == "avx512vnni"
    monkeypatch.setenv("MISTRAL7B_ISA", "AVX2")
    assert kernels.chosen_isa(everything) == "avx2"
    monkeypatch.setenv("MISTRAL7B_ISA", "avx512vnni")
    with pytest.raises(ConfigError, match="this CPU lacks it"):
        kernels.chosen_isa({"avx_vnni"})
    monkeypatch.setenv("MISTRAL7B_ISA", "sse2")
    with pytest.raises(ConfigError, match="not one of avx512vnni, avxvnni, avx2"):
        kernels.chosen_isa(everything)


X8_FORMATS = formats.BASE                    # each x8 format and the one it repacks


@pytest.mark.parametrize("isa", [isa for isa in kernels.supported_isas()[:1] if isa != "avx2"]
                         or [pytest.param("none", marks=pytest.mark.skip(
                             reason="this CPU has no ISA level beyond AVX2"))])
def test_the_best_isa_level_gives_the_avx2_numbers_bit_for_bit(isa: str) -> None:
    """The level extension() picks on this CPU (VNNI's fused dot products) against the AVX2
    build: every format, GGUF order and repacked, one activation row and several (the x8 tiles
    of four and the rows left over), and the pre-fill kernel. (One extra build: the other levels
    are checked where they are the best.)"""
    from mistral7b.quant.formats import repack

    if torch.backends.cpu.get_cpu_capability() not in ("AVX2", "AVX512"):
        pytest.skip("no AVX2")
    base, other = kernels.extension_for("avx2"), kernels.extension_for(isa)
    assert base is not None and other is not None
    assert (base.isa, other.isa) == ("avx2", isa)
    for fmt in [*FORMATS, *X8_FORMATS]:
        raw, _ = packed_weight(X8_FORMATS.get(fmt, fmt), 24, 512, seed=len(fmt))
        if fmt in X8_FORMATS:
            raw = repack(raw, X8_FORMATS[fmt])
        ggml_type = FORMATS_BY_NAME[fmt].ggml_type
        for m in (1, 3, 6):
            x = torch.randn(m, 512, generator=torch.Generator().manual_seed(m))
            assert torch.equal(other.qmatmul(x, raw, ggml_type),
                               base.qmatmul(x, raw, ggml_type)), (fmt, m)
        x = torch.randn(40, 512, generator=torch.Generator().manual_seed(40))   # pre-fill
        assert torch.equal(other.prefill_matmul(x, raw, ggml_type),
                           base.prefill_matmul(x, raw, ggml_type)), fmt


def test_ab_builds_times_two_isa_levels_with_identical_logits() -> None:
    """benchmarks/ab_builds.py in its smallest run: the AVX2 build and the CPU's best level
    side by side in one process drive the default model to identical logits."""
    import json
    import subprocess
    import sys
    from pathlib import Path

    best = kernels.supported_isas()[0]
    if best == "avx2" or torch.backends.cpu.get_cpu_capability() not in ("AVX2", "AVX512"):
        pytest.skip("this CPU has no ISA level beyond AVX2")
    script = Path(__file__).resolve().parents[1] / "benchmarks" / "ab_builds.py"
    out = subprocess.run([sys.executable, str(script), "--isa", f"avx2,{best}", "--rounds", "1",
                          "--decode", "1", "--tokens", "4", "--prefill", "", "--json"],
                         check=True, capture_output=True, text=True, timeout=600)
    results = json.loads(out.stdout)
    assert results["max_logit_difference"] == 0.0
    assert set(results["tokens_per_s"]) == {"avx2", best}
    assert all(v["tg4 x1"][0] > 0 for v in results["tokens_per_s"].values())


def test_a_level_that_does_not_build_falls_back_to_the_next(monkeypatch: pytest.MonkeyPatch
                                                            ) -> None:
    """A compiler without a level's flags costs that level only, unless MISTRAL7B_ISA named it."""
    built: list[str] = []

    def fake_build(isa: str) -> object:
        built.append(isa)
        return None if isa == "avx512vnni" else f"kernels for {isa}"

    monkeypatch.setattr(kernels, "_build", fake_build)
    monkeypatch.setattr(kernels, "supported_isas",
                        lambda flags=None: ["avx512vnni", "avxvnni", "avx2"])
    monkeypatch.setattr(kernels, "_cpu_has_avx2", lambda: True)
    for name in ("MISTRAL7B_ISA", "MISTRAL7B_KERNELS", "MISTRAL7B_PREFETCH_BYTES"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(kernels, "_tried", False)
    monkeypatch.setattr(kernels, "_extension", None)
    assert kernels.extension() == "kernels for avxvnni"
    assert built == ["avx512vnni", "avxvnni"]
    built.clear()
    monkeypatch.setenv("MISTRAL7B_ISA", "avx512vnni")
    monkeypatch.setattr(kernels, "_tried", False)
    monkeypatch.setattr(kernels, "_extension", None)
    assert kernels.extension() is None
    assert built == ["avx512vnni"]
