"""Decode steps of fixed shape (static_decode.py): the same tokens and logits as the plain step,
eager, through torch.compile (inductor, on the CPU) and as CUDA graphs (marked `cuda`), past the
window's wrap-around and with rows of unequal lengths joining and leaving."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import pytest
import torch

import mistral7b
from mistral7b.cache import RollingCache
from mistral7b.engine import Engine, EngineOutput
from mistral7b.engine.engine import run_requests
from mistral7b.generate import decode_step
from mistral7b.sampling import SamplingParams
from mistral7b.static_decode import StaticDecoder
from tests.conftest import PROMPTS, WINDOW, greedy_run, wait_until

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs an NVIDIA GPU")


@pytest.fixture(scope="module")
def llm(mistral_dir: Path) -> mistral7b.LLM:
    return mistral7b.load(mistral_dir, progress=False)


def assert_same(a: tuple[list[list[int]], list[torch.Tensor]],
                b: tuple[list[list[int]], list[torch.Tensor]], atol: float) -> None:
    assert a[0] == b[0]
    worst = max((x - y).abs().max().item() for x, y in zip(a[1], b[1], strict=True))
    assert worst <= atol, worst


def test_eager_static_step_equals_the_plain_step(llm: mistral7b.LLM) -> None:
    """Same tokens, logits equal but for float32 rounding: the static step pads rows to a bucket,
    and a float BLAS may sum a row in another order for another batch size (bit-identical on 2
    threads; 1.8e-7 apart on a 16-core machine with torch 2.11)."""
    assert_same(greedy_run(llm.model, "cpu", None),
                greedy_run(llm.model, "cpu", {"cuda_graphs": False}), atol=1e-5)


def test_compiled_step_gives_the_same_greedy_tokens(llm: mistral7b.LLM) -> None:
    assert_same(greedy_run(llm.model, "cpu", None),
                greedy_run(llm.model, "cpu", {"cuda_graphs": False, "compile": True}),
                atol=1e-4)


def test_bucket_sizes_and_limits(llm: mistral7b.LLM) -> None:
    decoder = StaticDecoder(llm.model, RollingCache(llm.config, rows=11))
    assert [decoder.bucket(n) for n in (1, 2, 3, 5, 9, 10)] == [1, 2, 4, 8, 10, 10]
    with pytest.raises(ValueError, match="outside the cache's 10 rows"):
        decoder.bucket(11)
    with pytest.raises(ValueError, match="spare last row"):
        StaticDecoder(llm.model, RollingCache(llm.config, rows=1))


def test_packed_models_keep_the_cpu_decode_step() -> None:
    llm = mistral7b.load(progress=False)      # the default model: Q4_1 GGUF
    with pytest.raises(ValueError, match="C\\+\\+ decode step"):
        StaticDecoder(llm.model, RollingCache(llm.config, rows=2))


def engine_outputs(llm: mistral7b.LLM, static: bool, prefill_budget: int | None = None
                   ) -> list[list[int]]:
    engine = Engine(llm.model, llm.tokenizer, max_batch=3, prefill_chunk=4,
                    static_decode=static, prefill_budget=prefill_budget)
    engine.start()
    outputs: dict[int, list[int]] = {i: [] for i in range(len(PROMPTS))}
    finished: list[int] = []

    def collect(i: int) -> object:
        def on_output(out: EngineOutput) -> None:
            if out.piece is not None:
                outputs[i] += out.piece.token_ids
            if out.finished:
                finished.append(i)
        return on_output

    try:
        for i, prompt in enumerate(PROMPTS):
            params = SamplingParams(max_tokens=10 + 7 * i, temperature=0, ignore_eos=True)
            engine.submit(prompt, params, collect(i))  # type: ignore[arg-type]
        assert wait_until(lambda: len(finished) == len(PROMPTS), timeout=120)
    finally:
        engine.stop()
    return [outputs[i] for i in range(len(PROMPTS))]


def test_engine_with_static_steps_generates_the_same_tokens(llm: mistral7b.LLM) -> None:
    assert engine_outputs(llm, static=True) == engine_outputs(llm, static=False)


def test_batched_prefill_generates_the_same_tokens(llm: mistral7b.LLM) -> None:
    """Pre-fill chunks of several requests in one forward (the GPU default), including a
    prompt of several chunks beside shorter ones, as when each request is pre-filled alone."""
    assert (engine_outputs(llm, static=True, prefill_budget=64)
            == engine_outputs(llm, static=False, prefill_budget=4))


@cuda
@pytest.mark.cuda
def test_cuda_graph_steps_equal_the_plain_steps(mistral_dir: Path) -> None:
    model = mistral7b.load(mistral_dir, device="cuda", progress=False).model
    assert_same(greedy_run(model, "cuda", None), greedy_run(model, "cuda", {}), atol=1e-4)


@cuda
@pytest.mark.cuda
def test_cuda_engine_matches_the_cpu_engine(mistral_dir: Path, llm: mistral7b.LLM) -> None:
    gpu = mistral7b.load(mistral_dir, device="cuda", progress=False)
    assert engine_outputs(gpu, static=True) == engine_outputs(llm, static=False)


def test_a_float_model_never_builds_the_cpu_kernels(mistral_dir: Path) -> None:
    """Loading float weights (e.g. onto a GPU machine) must not compile the packed-format C++
    kernels, which it does not use."""
    import subprocess
    import sys

    code = (f"import sys, mistral7b; mistral7b.load({str(mistral_dir)!r}, progress=False); "
            "print([m for m in sys.modules if m.startswith('mistral7b_kernels')])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True, timeout=300)
    assert out.stdout.strip() == "[]"


@cuda
@pytest.mark.cuda
def test_gguf_on_cuda_is_dequantized_and_matches_the_cpu(tmp_path: Path) -> None:
    gguf = pytest.importorskip("gguf")
    from tests.conftest import make_hf_mistral
    from tests.gguf_writer import write_gguf

    path = tmp_path / "q8_0.gguf"
    write_gguf(make_hf_mistral(), path, gguf.GGMLQuantizationType.Q8_0, window=WINDOW)
    cpu = mistral7b.load(path, progress=False)
    gpu = mistral7b.load(path, device="cuda", progress=False)
    ids = [1, 5, 9, 3, 7]
    assert torch.allclose(gpu.logits(ids).cpu(), cpu.logits(ids), atol=1e-3)


@cuda
@pytest.mark.cuda
def test_bench_decodes_with_cuda_graphs_on_a_gpu(mistral_dir: Path) -> None:
    from mistral7b import bench

    gpu = mistral7b.load(mistral_dir, device="cuda", progress=False)
    assert bench.time_decode(gpu, 8, 0, 2) > 0


def test_a_failed_graph_capture_falls_back_to_eager_steps(llm: mistral7b.LLM,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    cache = RollingCache(llm.config, rows=2)
    plain_cache = RollingCache(llm.config, rows=1)
    decoder = StaticDecoder(llm.model, cache)
    decoder.cuda_graphs = True                        # as on a GPU

    def refuse(R: int) -> None:
        raise RuntimeError("operation not permitted when stream is capturing")

    monkeypatch.setattr(decoder, "_graph", refuse)
    got = decoder.step([0], [5])
    assert not decoder.cuda_graphs
    assert torch.equal(got, decode_step(llm.model, plain_cache, [0], [5]))


def test_overlapped_steps_generate_what_the_synchronous_steps_do(llm: mistral7b.LLM) -> None:
    """With a fixed-shape decoder the engine queues step N+1 on the device's own tokens before
    it reads step N's. Here five requests share two rows, so a row goes to a new request right
    after its last one ended, while a step that still included the old one was queued. Greedy,
    seeded and penalised requests all give what the plain, synchronous steps give, and a
    consumer that walks away mid-stream leaves the engine fit for the next requests."""
    prompts = [PROMPTS[i % 3] + [i + 3] for i in range(5)]
    params = [SamplingParams(max_tokens=6 + 5 * i, temperature=0, ignore_eos=True) if i % 2 else
              SamplingParams(max_tokens=9 + 3 * i, temperature=0.9, seed=i,
                             repetition_penalty=1.3, ignore_eos=True)
              for i in range(5)]

    def run(static: bool) -> tuple[dict[int, list[int]], list[bool]]:
        engine = Engine(llm.model, llm.tokenizer, max_batch=2, prefill_chunk=4,
                        static_decode=static)
        chained: list[bool] = []
        if engine.decoder is not None:
            step = engine.decoder.step

            def spy(rows: Sequence[int], tokens: Sequence[int] | torch.Tensor) -> torch.Tensor:
                chained.append(isinstance(tokens, torch.Tensor))
                return step(rows, tokens)
            engine.decoder.step = spy  # type: ignore[method-assign]
        for i, _ in run_requests(engine, prompts[:2], params[:2]):
            if i == 0:
                break                       # cancels both with a step still queued
        out: dict[int, list[int]] = {i: [] for i in range(len(prompts))}
        for i, piece in run_requests(engine, prompts, params):
            out[i] += piece.token_ids
        return out, chained

    plain, _ = run(static=False)
    overlapped, chained = run(static=True)
    assert overlapped == plain
    assert sum(chained) > 20                # most steps took their tokens from the device
