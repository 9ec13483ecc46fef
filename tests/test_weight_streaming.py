"""How packed weights are streamed from memory (issue 12): software prefetch at any distance and
weights in a huge-page arena change no bit of any result, the arena falls back to ordinary pages
where the kernel refuses the advice, a process's first generation equals its later ones, and
the 32-value formats repacked eight rows at a time compute what the GGUF order does."""

from __future__ import annotations

import json
import mmap
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

import mistral7b
from mistral7b.quant import hugepages, kernels, repack
from mistral7b.quant.formats import FORMATS as FORMATS_BY_NAME
from mistral7b.quant.formats import dequantize
from mistral7b.quant.hugepages import HUGE_PAGE, arena, move_packed_weights
from mistral7b.quant.modules import QuantLinear
from tests.test_quant import FORMATS, packed_weight, relative_error


@pytest.fixture
def ext() -> Iterator[object]:
    extension = kernels.extension()
    if extension is None:
        pytest.skip("the C++ kernels are not available on this machine")
    default = extension.prefetch_bytes()
    yield extension
    extension.set_prefetch_bytes(default)


@pytest.mark.parametrize("fmt", FORMATS)
def test_every_prefetch_distance_gives_the_same_bits(ext: object, fmt: str) -> None:
    # Ragged thread ranges (33 and 61 rows), a matrix smaller than one prefetch distance
    # (3 rows), batches that take the 4-row tile and its remainder.
    for n, k in [(3, 256), (33, 512), (61, 768)]:
        raw, _ = packed_weight(fmt, n, k, seed=n)
        for m in (1, 4, 5):
            x = torch.randn(m, k, generator=torch.Generator().manual_seed(m))
            ext.set_prefetch_bytes(0)  # type: ignore[attr-defined]
            plain = kernels.linear(x, raw, fmt)
            for distance in (64, 1000, 4096, 1 << 20):
                ext.set_prefetch_bytes(distance)  # type: ignore[attr-defined]
                assert torch.equal(kernels.linear(x, raw, fmt), plain), (n, m, distance)


def test_a_negative_prefetch_distance_is_refused(ext: object) -> None:
    with pytest.raises(RuntimeError, match=">= 0"):
        ext.set_prefetch_bytes(-1)  # type: ignore[attr-defined]


def test_the_arena_is_aligned_to_a_huge_page() -> None:
    memory, _ = arena(3 * HUGE_PAGE + 5)
    assert memory.data_ptr() % HUGE_PAGE == 0 and memory.numel() == 3 * HUGE_PAGE + 5
    memory.fill_(7)
    assert int(memory.sum()) == 7 * memory.numel()


def test_the_arena_falls_back_when_the_advice_fails(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(mmap, "MADV_HUGEPAGE", 0x7FFF, raising=False)   # EINVAL from the kernel
    memory, advised = arena(2 * HUGE_PAGE)
    assert not advised
    memory.fill_(1)
    assert int(memory.sum()) == memory.numel()
    monkeypatch.delattr(mmap, "MADV_HUGEPAGE", raising=False)          # no THP on this OS
    assert arena(2 * HUGE_PAGE)[1] is False


def test_moving_weights_into_the_arena_changes_no_output(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MISTRAL7B_HUGEPAGES", "0")       # load without the arena first...
    llm = mistral7b.load(progress=False)
    before = llm.logits("The rolling buffer cache")
    monkeypatch.delenv("MISTRAL7B_HUGEPAGES")
    monkeypatch.setattr(mmap, "MADV_HUGEPAGE", 0x7FFF, raising=False)
    packed = {name: buf.data_ptr() for name, buf in llm.model.named_buffers()
              if buf.dtype == torch.uint8}
    moved = move_packed_weights(llm.model)                # ...then move them (fallback pages)
    assert moved >= sum(b.numel() for b in llm.model.buffers() if b.dtype == torch.uint8)
    after = {name: buf for name, buf in llm.model.named_buffers() if buf.dtype == torch.uint8}
    assert set(after) == set(packed) and all(after[n].data_ptr() != packed[n] for n in packed)
    assert torch.equal(llm.logits("The rolling buffer cache"), before)
    assert hugepages.ALIGN and all(b.data_ptr() % hugepages.ALIGN == 0 for b in after.values())


# Run in a process of its own: "first" means the first generation the process ever makes
# (kernels just loaded, caches and thread pools cold).
FIRST_AND_LATER = """
import json, mistral7b
llm = mistral7b.load(progress=False)
out = []
for prompt in ["The capital of France is",
               "Sliding window attention and a rolling buffer cache. " * 12]:  # BLAS pre-fill
    for _ in range(3):
        r = llm.generate(prompt, max_tokens=8, temperature=0, logprobs=True, ignore_eos=True)
        out.append([prompt[:8], r.token_ids, r.logprobs, llm.logits(prompt)[-1].tolist()])
print(json.dumps(out))
"""


def test_the_first_generation_in_a_process_equals_the_later_ones() -> None:
    proc = subprocess.run([sys.executable, "-c", FIRST_AND_LATER], capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    runs = json.loads(proc.stdout)
    for first, later in [(runs[0], runs[1]), (runs[0], runs[2]), (runs[3], runs[4]),
                         (runs[3], runs[5])]:
        assert first == later, first[0]


# ---- formats repacked eight rows at a time ---------------------------------------------------

X8 = ["Q4_0x8", "Q4_1x8", "Q8_0x8", "Q4_Kx8", "Q5_Kx8", "Q6_Kx8"]


@pytest.mark.parametrize("fmt", ["Q4_0x8", "Q4_1x8", "Q8_0x8"])
def test_repacking_is_a_permutation_of_the_bytes(fmt: str) -> None:
    base = repack.BASE[fmt]
    raw, reference = packed_weight(base, 24, 512, seed=1)
    packed = repack.repack(raw, base)
    assert packed.shape == raw.shape and not torch.equal(packed, raw)
    assert torch.equal(torch.sort(packed.flatten()).values, torch.sort(raw.flatten()).values)
    assert torch.equal(repack.unrepack(packed, fmt), raw)
    assert torch.equal(dequantize(packed, fmt), reference)        # the portable path


@pytest.mark.parametrize("fmt", ["Q4_0", "Q4_1"])
def test_4_bit_repacking_puts_each_weight_in_its_rows_lanes(fmt: str) -> None:
    """Q4_0x8/Q4_1x8 nibbles: chunk i's byte 2r + e is row r's GGUF byte 2i + e, whose low
    nibble is weight 2i + e and high nibble weight 16 + 2i + e; the f16 fields row by row."""
    bb = FORMATS_BY_NAME[fmt].block_bytes
    head = 4 if fmt == "Q4_1" else 2                   # bytes of d (and m) in a GGUF block
    raw, _ = packed_weight(fmt, 16, 96, seed=4)
    groups = repack.repack(raw, fmt).reshape(2, 3, 8 * bb)   # (group, block, 8 rows' bytes)
    for row, block, v in [(0, 0, 0), (3, 1, 17), (7, 2, 31), (10, 2, 14), (15, 0, 1)]:
        g, r, i, e = row // 8, row % 8, v % 16 // 2, v % 2
        byte = int(groups[g, block, 8 * head + 16 * i + 2 * r + e])
        gguf = int(raw[row, bb * block + head + v % 16])     # weight v: byte v % 16, nibble v // 16
        assert byte >> 4 * (v // 16) & 0x0F == gguf >> 4 * (v // 16) & 0x0F, (row, v)
        for f in range(head // 2):                     # d, then m: f16 per row
            assert torch.equal(groups[g, block, 16 * f + 2 * r:16 * f + 2 * r + 2],
                               raw[row, bb * block + 2 * f:bb * block + 2 * f + 2])


def test_q8_0_repacking_puts_each_weight_in_its_rows_lanes() -> None:
    """Q8_0x8: chunk i (0..15) of a block's weights holds row r's weights 2i, 2i + 1 at bytes
    2r, 2r + 1; the eight f16 scales come first, row by row."""
    raw, _ = packed_weight("Q8_0", 16, 96, seed=5)
    groups = repack.repack(raw, "Q8_0").reshape(2, 3, 8 * 34)   # (group, block, 8 rows' bytes)
    for row, block, v in [(0, 0, 0), (3, 1, 17), (7, 2, 31), (10, 2, 14), (15, 0, 1)]:
        g, r = row // 8, row % 8
        assert int(groups[g, block, 16 + 16 * (v // 2) + 2 * r + v % 2]) == \
            int(raw[row, 34 * block + 2 + v]), (row, v)
        assert torch.equal(groups[g, block, 2 * r:2 * r + 2], raw[row, 34 * block:34 * block + 2])


def gguf_k_value(block: torch.Tensor, fmt: str, v: int) -> int:
    """Weight v of one GGUF K-quant block as its unsigned integer, read as the gguf package's
    dequantize does."""
    if fmt in ("Q4_K", "Q5_K"):
        j = v // 32
        low = int(block[-128 + 32 * (j // 2) + v % 32]) >> 4 * (j % 2) & 0x0F
        return low if fmt == "Q4_K" else low | (int(block[16 + v % 32]) >> j & 1) << 4
    h, k, i = v // 128, v % 128 // 32, v % 32
    return ((int(block[64 * h + 32 * (k % 2) + i]) >> 4 * (k // 2) & 0x0F)
            | (int(block[128 + 32 * h + i]) >> 2 * k & 3) << 4)


@pytest.mark.parametrize("fmt", ["Q4_K", "Q5_K", "Q6_K"])
def test_k_quant_repacking_puts_each_weight_where_the_kernel_reads_it(fmt: str) -> None:
    bb = FORMATS_BY_NAME[fmt].block_bytes
    raw, reference = packed_weight(fmt, 16, 768, seed=3)
    packed = repack.repack(raw, fmt)
    assert packed.shape == raw.shape and torch.equal(repack.unrepack(packed, fmt + "x8"), raw)
    assert torch.equal(dequantize(packed, fmt + "x8"), reference)   # the portable path
    groups = packed.reshape(2, 3, 8 * bb)                 # (group, block, bytes of the 8 rows)
    nibbles = 144 if fmt == "Q6_K" else 128
    width = {"Q5_K": 1, "Q6_K": 2}.get(fmt, 0)          # bits above the nibble, per weight
    for row, block, v in [(0, 0, 0), (3, 1, 21), (7, 2, 255), (10, 2, 130), (15, 0, 47)]:
        g, r, j, t = row // 8, row % 8, v // 32, v % 32
        second, i, lane = t // 16, t % 16 // 2, 2 * r + t % 2
        value = int(groups[g, block, nibbles + 128 * j + 16 * i + lane]) >> 4 * second & 0x0F
        if width:                                         # C chunks per 16 bytes
            c = 4 // width
            byte = int(groups[g, block, nibbles + 1024 + 16 * (8 // c) * j + 16 * (i // c) + lane])
            value |= (byte >> 2 * width * (i % c) + width * second & (1 << width) - 1) << 4
        assert value == gguf_k_value(raw[row, bb * block:bb * (block + 1)], fmt, v), (row, v)
    scales = {"Q6_K": (16, 192, 16)}.get(fmt, (32, 4, 12))   # x8 start, GGUF start, bytes
    for row, block in [(0, 0), (11, 2)]:
        g, r = row // 8, row % 8
        for k in range(scales[2]):                        # the scale bytes, transposed
            assert groups[g, block, scales[0] + 8 * k + r] == raw[row, bb * block + scales[1] + k]


@pytest.mark.parametrize("fmt", ["Q4_K", "Q5_K", "Q6_K"])
def test_k_quant_repacking_in_cpp_gives_the_same_bytes(ext: object, fmt: str) -> None:
    raw, _ = packed_weight(fmt, 40, 1024, seed=5)
    ggml_type = FORMATS_BY_NAME[fmt].ggml_type
    assert torch.equal(ext.repack_k(raw, ggml_type),  # type: ignore[attr-defined]
                       repack.repack(raw, fmt))
    with pytest.raises(RuntimeError, match="rows in eights"):
        ext.repack_k(raw[:12].contiguous(), ggml_type)  # type: ignore[attr-defined]


@pytest.mark.parametrize("fmt", X8)
def test_repacked_kernels_match_the_float_reference_and_batching(ext: object, fmt: str) -> None:
    base = repack.BASE[fmt]
    for n, k in [(8, 256), (40, 512), (96, 768)]:
        raw, weight = packed_weight(base, n, k, seed=n)
        packed = repack.repack(raw, base)
        assert torch.equal(kernels.dequantize_rows(packed, fmt), weight)   # C++, exact
        x = torch.randn(49, k, generator=torch.Generator().manual_seed(k))
        for m in (1, 3, 4, 5, 17, 48, 49):          # tiles of 4, remainders, the BLAS path
            ours = kernels.linear(x[:m], packed, fmt)
            reference = x[:m] @ weight.T
            assert relative_error(ours, reference) < 2e-4, (n, m)
        # The pre-fill kernel reads the x8 layout to the same floats as the GGUF order.
        base_type, x8_type = FORMATS_BY_NAME[base].ggml_type, FORMATS_BY_NAME[fmt].ggml_type
        assert torch.equal(ext.prefill_matmul(x, packed, x8_type),  # type: ignore[attr-defined]
                           ext.prefill_matmul(x, raw, base_type))  # type: ignore[attr-defined]
        ext.set_prefetch_bytes(0)  # type: ignore[attr-defined]
        alone = [kernels.linear(x[i:i + 1], packed, fmt) for i in range(6)]
        for distance in (0, 4096):
            ext.set_prefetch_bytes(distance)  # type: ignore[attr-defined]
            together = kernels.linear(x[:6], packed, fmt)
            for i in range(6):                  # a row's bits do not depend on the batch
                assert torch.equal(together[i], alone[i][0]), (n, i, distance)


def test_a_repacked_matrix_needs_rows_in_eights(ext: object) -> None:
    raw, _ = packed_weight("Q4_1", 8, 256)
    with pytest.raises(RuntimeError, match="multiple of 8 rows"):
        ext.qmatmul(torch.randn(1, 256), raw[:4].contiguous(), 1003)  # type: ignore[attr-defined]


def test_load_repacks_the_default_model_and_keeps_its_text(ext: object,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    llm = mistral7b.load(progress=False)
    fmts = {m.fmt for m in llm.model.modules() if isinstance(m, QuantLinear)}
    assert fmts == {"Q4_1x8"}
    monkeypatch.setenv("MISTRAL7B_REPACK", "0")
    gguf_order = mistral7b.load(progress=False)
    assert {m.fmt for m in gguf_order.model.modules() if isinstance(m, QuantLinear)} == {"Q4_1"}
    prompt = "The rolling buffer cache keeps"
    assert (llm.logits(prompt) - gguf_order.logits(prompt)).abs().max() < 1e-2
    a = llm.generate(prompt, max_tokens=16, temperature=0)
    b = gguf_order.generate(prompt, max_tokens=16, temperature=0)
    assert a.token_ids == b.token_ids


def test_the_random_7b_benchmark_file_loads_repacked_and_runs_on_token_ids(
        ext: object, tmp_path: Path) -> None:
    """benchmarks/random_gguf.py (the file of the llama.cpp comparison at 7B shapes), --tiny."""
    path = tmp_path / "random.gguf"
    script = Path(__file__).resolve().parents[1] / "benchmarks" / "random_gguf.py"
    subprocess.run([sys.executable, str(script), str(path), "--tiny"], check=True,
                   capture_output=True, timeout=300)
    llm = mistral7b.load(path, progress=False)
    fmts = {m.fmt for m in llm.model.modules() if isinstance(m, QuantLinear)}
    assert fmts == {"Q4_Kx8", "Q6_Kx8"}
    assert len(llm.generate([1, 2, 3], max_tokens=3, temperature=0).token_ids) == 3
