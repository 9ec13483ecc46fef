"""The Triton decode kernels (gpu_decode.py, gpu_kernels.py) against plain PyTorch: on a GPU
when there is one (float16 and bfloat16), else on the CPU through Triton's interpreter in float16
only (the interpreter's bfloat16 arithmetic is not faithful). Skipped where triton is missing."""

from __future__ import annotations

import os

import pytest
import torch

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
if DEVICE == "cpu":
    os.environ.setdefault("TRITON_INTERPRET", "1")    # before triton is imported anywhere
    if os.environ["TRITON_INTERPRET"] != "1":
        pytest.skip("no GPU, and TRITON_INTERPRET is off", allow_module_level=True)
pytest.importorskip("triton")


import torch.nn.functional as F  # noqa: E402

import mistral7b  # noqa: E402
from mistral7b import gpu_decode, gpu_kernels  # noqa: E402
from mistral7b.cache import _slot_positions  # noqa: E402
from mistral7b.rope import apply_rope, rope_rotations  # noqa: E402
from tests.conftest import STEPS, greedy_run, make_hf_mistral, save_hf  # noqa: E402

HALF = torch.float16
DTYPES = [torch.float16, torch.bfloat16] if DEVICE == "cuda" else [torch.float16]


def close(a: torch.Tensor, b: torch.Tensor) -> None:
    """Equal up to one rounding of a's dtype (the kernels and PyTorch sum in other orders)."""
    tol = 1e-3 if a.dtype == torch.float16 else 8e-3
    torch.testing.assert_close(a, b.to(a.dtype), rtol=tol, atol=tol)


def randn(*shape: int, dtype: torch.dtype = HALF) -> torch.Tensor:
    return torch.randn(*shape, dtype=dtype, device=DEVICE)


@pytest.mark.parametrize("dtype", DTYPES)
def test_rms_norm_with_and_without_the_residual_add(dtype: torch.dtype) -> None:
    torch.manual_seed(0)
    x, r, w = randn(3, 96, dtype=dtype), randn(3, 96, dtype=dtype), randn(96, dtype=dtype)
    normed, total = gpu_kernels.rms_norm(x, w, 1e-5, residual=r)
    assert torch.equal(total, x + r)
    close(normed, F.rms_norm(x + r, (96,), eps=1e-5) * w)
    normed, same = gpu_kernels.rms_norm(x, w, 1e-5)
    assert same is x
    close(normed, F.rms_norm(x, (96,), eps=1e-5) * w)


@pytest.mark.parametrize("dtype", DTYPES)
def test_silu_mul_of_the_fused_gate_up_projection(dtype: torch.dtype) -> None:
    torch.manual_seed(1)
    gate_up = randn(2, 2 * 1500, dtype=dtype)              # more than one 1024-wide block
    gate, up = gate_up.chunk(2, dim=-1)
    close(gpu_kernels.silu_mul(gate_up), F.silu(gate) * up)


@pytest.mark.parametrize("dtype", DTYPES)
def test_rope_store_rotates_q_and_k_and_writes_k_v_at_each_rows_slot(dtype: torch.dtype) -> None:
    torch.manual_seed(2)
    B, H, Hkv, hd, S = 3, 4, 2, 16, 8
    qkv = randn(B, (H + 2 * Hkv) * hd, dtype=dtype)
    positions = torch.tensor([[0], [9], [3]], device=DEVICE)
    rotations = rope_rotations(positions, hd, 10000.0)
    rope = torch.view_as_real(rotations.reshape(B, -1)).contiguous()
    k_cache = torch.zeros(5, Hkv, S, hd, dtype=dtype, device=DEVICE)
    v_cache = torch.zeros_like(k_cache)
    rows, slots = torch.tensor([4, 0, 2], device=DEVICE), positions[:, 0] % S
    q = gpu_kernels.rope_store(qkv, rope, k_cache, v_cache, rows, slots, H, Hkv, hd)

    heads = qkv.view(B, 1, H + 2 * Hkv, hd)
    rotated = apply_rope(heads[:, :, : H + Hkv], rotations)
    close(q, rotated[:, 0, :H])
    for b in range(B):
        close(k_cache[rows[b], :, slots[b]], rotated[b, 0, H:])
        assert torch.equal(v_cache[rows[b], :, slots[b]], heads[b, 0, H + Hkv:])
    written = torch.zeros(5, S, dtype=torch.bool, device=DEVICE)
    written[rows, slots] = True
    untouched = ~written[:, None, :].expand(5, Hkv, S)             # nothing else was written
    assert not k_cache[untouched].any() and not v_cache[untouched].any()


def reference_attention(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor,
                        positions: torch.Tensor, n_slots: int, window: int | None
                        ) -> torch.Tensor:
    """Masked softmax attention in float64, the mask from RollingCache's slot arithmetic."""
    B, H, hd = q.shape
    Hkv, S = keys.shape[1], keys.shape[2]
    key_pos = _slot_positions(positions[:, None] + 1, S)                  # (B, S)
    ok = (key_pos >= 0) & (torch.arange(S, device=q.device) < n_slots)
    if window is not None:
        ok &= positions[:, None] - key_pos < window
    qg = q.double().view(B, Hkv, H // Hkv, hd)
    scores = qg @ keys.double().transpose(-1, -2) * hd**-0.5              # (B, Hkv, G, S)
    scores = scores.masked_fill(~ok[:, None, None, :], float("-inf"))
    return (scores.softmax(-1) @ values.double()).reshape(B, H * hd)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rows", [1, 2, 9])          # 1 and 2 rows split the slots; 9 do not
@pytest.mark.parametrize("window", [None, 40])
def test_decode_attention_over_the_rolling_buffer(rows: int, window: int | None,
                                                  dtype: torch.dtype) -> None:
    torch.manual_seed(3)
    H, Hkv, hd, S = 8, 2, 16, 160                 # 160 slots: 3 blocks of 64, the last ragged
    q, keys, values = (randn(rows, H, hd, dtype=dtype), randn(rows, Hkv, S, hd, dtype=dtype),
                       randn(rows, Hkv, S, hd, dtype=dtype))
    # Empty slots, a wrapped buffer, a window cutting inside it, a row at position 0.
    positions = torch.tensor([100, 0, 500, 159, 160, 7, 63, 64, 300], device=DEVICE)[:rows]
    for n_slots in (S, 101):
        if n_slots < S and int(positions.max()) >= n_slots:
            positions = positions.clamp(max=n_slots - 1)
        out = gpu_kernels.attention(q, keys, values, positions, n_slots, window)
        expected = reference_attention(q, keys, values, positions, n_slots, window)
        tol = 2e-3 if dtype == torch.float16 else 1.6e-2
        torch.testing.assert_close(out.double(), expected, rtol=tol, atol=tol)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape,config", [((37, 100), (4, 32, 4)),   # ragged rows and K slices
                                          ((64, 160), None),         # gemv_config's choice
                                          ((3, 2048), (2, 1024, 4))])
def test_gemv_is_one_row_of_f_linear(dtype: torch.dtype, shape: tuple[int, int],
                                     config: tuple[int, int, int] | None) -> None:
    torch.manual_seed(2)
    w, x = randn(*shape, dtype=dtype), randn(1, shape[1], dtype=dtype)
    got = gpu_kernels.gemv(x, w, config)
    assert got.shape == (1, shape[0]) and got.dtype == dtype
    close(got, x.double() @ w.double().T)


def test_gemv_config_slices_k_in_powers_of_two() -> None:
    assert gpu_decode.gemv_config(4096, 4096) == (2, 1024, 4)
    assert gpu_decode.gemv_config(4096, 14336) == (2, 1024, 8)
    assert gpu_decode.gemv_config(64, 160) == (2, 256, 4)
    assert gpu_decode.gemv_config(8, 10) == (2, 16, 4)


def test_attention_splits_fill_the_gpu_in_whole_blocks() -> None:
    assert gpu_decode.attention_splits(1, 8, 256) == (4, 64)
    assert gpu_decode.attention_splits(16, 8, 256) == (1, 256)
    assert gpu_decode.attention_splits(1, 8, 4096) == (16, 256)
    assert gpu_decode.attention_splits(2, 8, 100) == (2, 64)


@pytest.fixture(scope="module")
def half_llm(tmp_path_factory: pytest.TempPathFactory) -> mistral7b.LLM:
    """A tiny Mistral with head_dim 16 (the kernels' smallest), loaded in float16."""
    directory = tmp_path_factory.mktemp("gpu-decode")
    save_hf(make_hf_mistral(hidden_size=64, num_attention_heads=4, num_key_value_heads=2,
                            head_dim=16), directory / "m")
    return mistral7b.load(directory / "m", dtype="float16", device=DEVICE, progress=False)


@pytest.mark.parametrize("static", [False, True])
def test_decode_layers_follow_the_plain_layers_past_the_window(
        half_llm: mistral7b.LLM, static: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    """Fed the same tokens, the two give logits within float16 rounding, and the same greedy
    choice wherever the choice is not a near tie (this tiny model has exact float16 ties)."""
    calls = []
    real = gpu_decode.decode_layers
    monkeypatch.setattr(gpu_decode, "decode_layers", lambda *a: calls.append(1) or real(*a))
    half_llm.model.fused_decode = False
    decoder = {} if static else None                           # graphs on a GPU
    plain_tokens, plain_logits = greedy_run(half_llm.model, DEVICE, decoder, HALF)
    assert not calls
    half_llm.model.fused_decode = True
    monkeypatch.setattr(gpu_decode, "DEVICE_TYPES", ("cuda", "cpu"))
    _, fused_logits = greedy_run(half_llm.model, DEVICE, decoder, HALF, forced=plain_tokens)
    # The plain step of rows [0, 2] is not contiguous; CUDA graphs call it once per capture.
    assert len(calls) >= (STEPS // 2 if DEVICE == "cpu" or not static else 1)
    for i, (a, b) in enumerate(zip(fused_logits, plain_logits, strict=True)):
        assert (a - b).abs().max().item() < 5e-3, i
        top = b.topk(2, dim=-1).values
        clear = (top[:, 0] - top[:, 1]) > 1e-2
        assert torch.equal(a.argmax(-1)[clear], b.argmax(-1)[clear]), i


def test_one_row_steps_use_the_gemv_and_follow_the_plain_layers(
        half_llm: mistral7b.LLM, monkeypatch: pytest.MonkeyPatch) -> None:
    """At batch 1 the projections go through gpu_kernels.gemv (four per layer), and the logits
    stay within float16 rounding of the plain layers' past the window's wrap."""
    from mistral7b.cache import RollingCache
    from mistral7b.generate import decode_step, prefill
    from tests.conftest import PROMPTS

    def run(fused: bool, forced: list[int] | None = None) -> tuple[list[int], list[torch.Tensor]]:
        half_llm.model.fused_decode = fused
        cache = RollingCache(half_llm.model.config, rows=1, dtype=HALF, device=DEVICE,
                             initial_slots=4)
        token = prefill(half_llm.model, cache, [0], PROMPTS[:1], 8).argmax(-1).tolist()
        history, logits = [], []
        for i in range(STEPS):
            step = decode_step(half_llm.model, cache, [0], token)
            logits.append(step.cpu())
            history += step.argmax(-1).tolist()
            token = [forced[i]] if forced is not None else step.argmax(-1).tolist()
        return history, logits

    plain_tokens, plain_logits = run(fused=False)
    calls = []
    real = gpu_kernels.gemv
    monkeypatch.setattr(gpu_kernels, "gemv", lambda *a: calls.append(1) or real(*a))
    monkeypatch.setattr(gpu_decode, "DEVICE_TYPES", ("cuda", "cpu"))
    _, fused_logits = run(fused=True, forced=plain_tokens)
    half_llm.model.fused_decode = True
    assert len(calls) == 4 * len(half_llm.model.layers) * STEPS
    for i, (a, b) in enumerate(zip(fused_logits, plain_logits, strict=True)):
        assert (a - b).abs().max().item() < 5e-3, i
