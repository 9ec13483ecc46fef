"""Tensor parallelism (tensor_parallel.py) with 2 CPU ranks over gloo: one process's logits and
tokens, half the kv heads per rank, `torchrun -m mistral7b generate|serve`, refusals of splits
that do not divide, and no hang when a rank dies.

The ranks are processes started here with torchrun's environment (or by torchrun itself for
the command-line tests); each waits at most a bounded time, so nothing here can hang.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import torch
from gguf import GGMLQuantizationType as Q

import mistral7b
from mistral7b.config import ModelConfig
from mistral7b.errors import InvalidArgumentError
from mistral7b.tensor_parallel import check_split
from tests import tp_worker
from tests.conftest import make_hf_mistral, save_hf, save_native, wait_until
from tests.gguf_writer import write_gguf
from tests.serving import free_port

ROOT = Path(__file__).resolve().parents[1]
WORKER = str(Path(tp_worker.__file__))
LAUNCH_TIMEOUT = 180        # seconds a 2-rank run may take on a slow, shared machine


def rank_env(rank: int, port: int) -> dict[str, str]:
    """What torchrun tells each process it starts."""
    return {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port),
            "WORLD_SIZE": "2", "RANK": str(rank), "LOCAL_RANK": str(rank),
            "LOCAL_WORLD_SIZE": "2", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}


def start_ranks(args: list[str]) -> list[subprocess.Popen[str]]:
    port = free_port()
    return [subprocess.Popen([sys.executable, WORKER, *args], env=rank_env(rank, port),
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            for rank in (0, 1)]


def finish(procs: list[subprocess.Popen[str]], timeout: float = LAUNCH_TIMEOUT
           ) -> list[tuple[int, str]]:
    """Each rank's exit status and stderr (killed if it overstays)."""
    out = []
    for proc in procs:
        try:
            _, err = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            _, err = proc.communicate()
        out.append((proc.returncode, err))
    return out


def torchrun(args: list[str]) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
            "--master-port", str(free_port()), "-m", "mistral7b", *args]


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Tiny SWA models (window 16, 8 query and 2 kv heads): float HF safetensors; native with
    an FFN of 128 so that each rank's share of w2's inputs is whole 32-value blocks; GGUF
    Q8_0 and Q4_0 of that model."""
    root = tmp_path_factory.mktemp("tp")
    wide = make_hf_mistral(intermediate_size=128, seed=3)
    found = {"hf": save_hf(make_hf_mistral(), root / "hf"),
             "native": save_native(wide, root / "native")}
    for qtype in (Q.Q8_0, Q.Q4_0):
        path = root / f"tiny-{qtype.name}.gguf"
        write_gguf(make_hf_mistral(intermediate_size=128, seed=3), path, qtype, window=16)
        found[qtype.name] = path
    return found


# Packed weights' own paths differ by ~1.6e-5 between modes in one process (token by token
# against one pass), so the split's different summation order is held to that scale.
@pytest.mark.parametrize(("model", "quantize", "tolerance"), [
    ("hf", None, 1e-5), ("native", "q8_0", 5e-5), ("native", "q4_0", 5e-5),
    ("Q8_0", None, 5e-5), ("Q4_0", None, 5e-5)])
def test_two_ranks_give_one_process_logits_and_tokens(models: dict[str, Path], tmp_path: Path,
                                                      model: str, quantize: str | None,
                                                      tolerance: float) -> None:
    out = tmp_path / "rank0.pt"
    args = [str(models[model]), str(out)] + (["--quantize", quantize] if quantize else [])
    for status, err in finish(start_ranks(args)):
        assert status == 0, err
    split: dict[str, Any] = torch.load(out)
    alone = tp_worker.results(mistral7b.load(models[model], progress=False, quantize=quantize))
    for mode in ("one_shot", "chunked", "token_by_token"):      # 40 tokens, window 16
        torch.testing.assert_close(split[mode], alone[mode], rtol=0, atol=tolerance)
    assert split["greedy"] == alone["greedy"]
    # (layers, rows, kv heads, slots, head_dim): each rank holds half the kv heads.
    assert split["cache_shape"][2] * 2 == alone["cache_shape"][2] == 2


@pytest.mark.parametrize("victim", [0, 1])
def test_when_a_rank_dies_the_other_exits_with_a_message(models: dict[str, Path],
                                                         tmp_path: Path, victim: int) -> None:
    out = tmp_path / "idle"
    procs = start_ranks([str(models["hf"]), str(out), "--idle"])
    try:
        assert wait_until(out.exists, LAUNCH_TIMEOUT), finish(procs, 1)
        os.kill(int(Path(f"{out}.pid{victim}").read_text()), signal.SIGKILL)
        started = time.monotonic()
        survivor = procs[1 - victim]
        status, err = finish([survivor], timeout=90)[0]
        assert time.monotonic() - started < 60, err     # the leader's heartbeat: ~10 s
        assert status == 1 and "lost contact with the other ranks" in err, err
        assert f"rank {1 - victim} of 2" in err
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.communicate()


def test_splits_that_do_not_divide_are_refused_naming_the_numbers() -> None:
    config = ModelConfig(dim=64, n_layers=2, n_heads=8, n_kv_heads=2, head_dim=8,
                         hidden_dim=96, vocab_size=128, norm_eps=1e-5)
    check_split(config, 2)
    with pytest.raises(InvalidArgumentError, match="n_kv_heads 2 is not divisible by 4"):
        check_split(config, 4)
    with pytest.raises(InvalidArgumentError, match="n_heads 8 is not divisible by 3"):
        check_split(config, 3)
    with pytest.raises(InvalidArgumentError, match="w2's 96 input columns split over 2 ranks "
                                                   "give 48 each, which cuts a 32-value block"):
        check_split(config, 2, packed_block=32)


def test_torchrun_refuses_the_default_model_once_with_its_numbers() -> None:
    """SmolLM2-135M has 9 query heads: not for 2 ranks. One line, exit status 2."""
    run = subprocess.run(torchrun(["generate", "--prompt", "Hi", "--max-tokens", "2"]),
                         capture_output=True, text=True, timeout=LAUNCH_TIMEOUT, cwd=ROOT)
    assert run.returncode != 0
    message = "mistral7b: error: tensor parallel: n_heads 9 is not divisible by 2"
    assert run.stderr.count(message) == 1, run.stderr


@pytest.fixture(scope="module")
def v3_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny model with Mistral's v3 tokenizer, for the command line."""
    import mistral_common

    directory = save_native(make_hf_mistral(vocab=32768, seed=4),
                            tmp_path_factory.mktemp("tp_v3"))
    shutil.copy(Path(os.path.dirname(mistral_common.__file__)) / "data" /
                "mistral_instruct_tokenizer_240323.model.v3", directory / "tokenizer.model.v3")
    return directory


def test_torchrun_generate_prints_the_one_process_text(v3_model: Path) -> None:
    args = ["generate", "--model", str(v3_model), "--prompt", "Hello there", "--max-tokens",
            "12", "--temperature", "0"]
    alone = subprocess.run([sys.executable, "-m", "mistral7b", *args], capture_output=True,
                           text=True, timeout=LAUNCH_TIMEOUT, cwd=ROOT)
    split = subprocess.run(torchrun(args), capture_output=True, text=True,
                           timeout=LAUNCH_TIMEOUT, cwd=ROOT)
    assert alone.returncode == 0 and split.returncode == 0, split.stderr
    assert split.stdout == alone.stdout and alone.stdout.strip()


def test_torchrun_serve_answers_with_the_one_process_text(v3_model: Path) -> None:
    import httpx
    import openai

    ask = [{"role": "user", "content": "Hello"}]
    expected = mistral7b.load(v3_model, progress=False).chat(ask, max_tokens=8,
                                                             temperature=0).text
    port = free_port()
    proc = subprocess.Popen(torchrun(["serve", "--model", str(v3_model), "--port", str(port)]),
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            cwd=ROOT)
    url = f"http://127.0.0.1:{port}"
    try:
        def ready() -> bool:
            try:
                return httpx.get(f"{url}/health", timeout=1).status_code == 200
            except httpx.HTTPError:
                return False

        assert wait_until(ready, LAUNCH_TIMEOUT), "the server did not become ready"
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused")
        answer = client.chat.completions.create(model=v3_model.name, messages=ask,  # type: ignore
                                                max_tokens=8, temperature=0)
        assert answer.choices[0].message.content == expected
        stream = client.chat.completions.create(model=v3_model.name, messages=ask,  # type: ignore
                                                max_tokens=8, temperature=0, stream=True)
        assert "".join(c.choices[0].delta.content or "" for c in stream if c.choices) == \
            expected
    finally:
        proc.send_signal(signal.SIGTERM)      # torchrun passes it on; rank 0 drains and stops
        try:
            _, err = proc.communicate(timeout=90)
        except subprocess.TimeoutExpired:
            proc.kill()
            _, err = proc.communicate()
    assert "mistral7b: stopped" in err and "lost contact" not in err, err


def test_torchrun_bench_reports_the_world_size(v3_model: Path) -> None:
    import json

    run = subprocess.run(torchrun(["bench", "--model", str(v3_model), "-p", "8", "-n", "4",
                                   "-r", "1", "--json"]),
                         capture_output=True, text=True, timeout=LAUNCH_TIMEOUT, cwd=ROOT)
    assert run.returncode == 0, run.stderr           # the group is left cleanly at exit
    report = json.loads(run.stdout)
    assert report["world_size"] == 2 and [r["test"] for r in report["results"]] == ["pp8", "tg4"]


def test_a_rank_reads_only_its_slices_of_split_weights(models: dict[str, Path],
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    """Rank 1 of 2, built in this process: every split matrix comes from a partial read of
    its half (rows for q/k/v and gate/up, whole-block columns for wo and w2), never whole."""
    from mistral7b.loading import checkpoint
    from mistral7b.tensor_parallel import Shard

    whole: list[str] = []
    parts: dict[str, tuple[int, int, int]] = {}
    real_read = checkpoint.TensorRef.read_slice

    def read_slice(self: checkpoint.TensorRef, dim: int, start: int, stop: int
                   ) -> torch.Tensor:
        parts[self.name] = (dim, start, stop)
        return real_read(self, dim, start, stop)

    real_build = checkpoint.build_model

    def build(config: Any, tensors: Any, *args: Any, **kwargs: Any) -> Any:
        def spy(ref: checkpoint.TensorRef) -> checkpoint.TensorRef:
            def read() -> torch.Tensor:
                whole.append(ref.name)
                return ref.read()
            return checkpoint.TensorRef(ref.name, ref.shape, read, ref.file, ref.packed,
                                        ref.read_part)
        return real_build(config, [spy(t) for t in tensors], *args, **kwargs)

    monkeypatch.setattr(checkpoint.TensorRef, "read_slice", read_slice)
    monkeypatch.setattr("mistral7b.loading.build_model", build)
    from mistral7b.loading import load_checkpoint

    _, model, _ = load_checkpoint(models["Q8_0"], torch.float32, shard=Shard(1, 2),
                                  progress=False)
    split = set(parts)
    assert split and not split & set(whole)
    assert parts["blk.0.attn_q.weight"] == (0, 32, 64)           # 8 heads of 8: rows 32..63
    assert parts["blk.0.ffn_up.weight"] == (0, 64, 128)          # FFN units 64..127
    assert parts["blk.0.ffn_down.weight"] == (1, 68, 136)        # Q8_0: 2 blocks of 34 bytes
    assert model.config.n_kv_heads == 1 and model.config.hidden_dim == 64
