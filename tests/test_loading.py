"""Checkpoint formats give identical models; broken checkpoints give clear errors."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

import mistral7b
from mistral7b.errors import ConfigError, InvalidArgumentError, LoadError
from mistral7b.rope import permute_rope_rows
from tests.conftest import save_hf, save_native

IDS = [5, 17, 99, 3, 64, 8, 120, 1, 2, 33, 45, 7, 0, 127, 56, 90, 11, 12, 13, 14]


@pytest.mark.parametrize("fmt", ["safetensors", "pth"])
def test_native_and_hf_layouts_give_identical_logits(hf_mistral, mistral_dir: Path,
                                                     tmp_path: Path, fmt: str) -> None:
    native = mistral7b.load(save_native(hf_mistral, tmp_path / "native", fmt=fmt))
    hf = mistral7b.load(mistral_dir)
    assert native.config.sliding_window == hf.config.sliding_window
    assert torch.equal(native.logits(IDS), hf.logits(IDS))


def test_sharded_hf_checkpoint(hf_mistral, mistral_dir: Path, tmp_path: Path) -> None:
    sharded = save_hf(hf_mistral, tmp_path / "sharded", shards=True)
    assert (sharded / "model.safetensors.index.json").is_file()
    assert len(list(sharded.glob("*.safetensors"))) > 1
    assert torch.equal(mistral7b.load(sharded).logits(IDS), mistral7b.load(mistral_dir).logits(IDS))


def test_rope_permutation_round_trip() -> None:
    w = torch.arange(4 * 8 * 3).reshape(32, 3)
    there = permute_rope_rows(w, 4, to="interleaved")
    assert torch.equal(permute_rope_rows(there, 4, to="half_split"), w)
    # One head of head_dim 4: half-split rows [re0 re1 im0 im1] -> interleaved [re0 im0 re1 im1].
    head = torch.tensor([[0], [1], [2], [3]])
    assert permute_rope_rows(head, 1, to="interleaved").flatten().tolist() == [0, 2, 1, 3]


def test_missing_directory() -> None:
    with pytest.raises(LoadError, match="does not exist"):
        mistral7b.load("/nonexistent/model")


def test_directory_without_a_model(tmp_path: Path) -> None:
    with pytest.raises(LoadError, match="not a model directory"):
        mistral7b.load(tmp_path)


def test_truncated_safetensors(mistral_dir: Path, tmp_path: Path) -> None:
    broken = tmp_path / "broken"
    shutil.copytree(mistral_dir, broken)
    weights = broken / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])
    with pytest.raises(LoadError, match="truncated"):
        mistral7b.load(broken)
    weights.write_bytes(data[:5])
    with pytest.raises(LoadError, match="not a safetensors file"):
        mistral7b.load(broken)
    weights.write_bytes(b"\xff" * 64)
    with pytest.raises(LoadError, match="corrupt or truncated"):
        mistral7b.load(broken)


def _rewrite_native(hf_mistral, directory: Path, edit) -> Path:
    save_native(hf_mistral, directory)
    from safetensors.torch import load_file

    state = load_file(directory / "consolidated.safetensors")
    edit(state)
    save_file(state, directory / "consolidated.safetensors")
    return directory


def test_wrong_tensor_shape_is_named(hf_mistral, tmp_path: Path) -> None:
    def edit(state):
        state["layers.1.attention.wk.weight"] = torch.zeros(3, 64)

    expected = r"wrong shapes: layers\.1\.attention\.wk\.weight \[3, 64\]"
    with pytest.raises(LoadError, match=expected):
        mistral7b.load(_rewrite_native(hf_mistral, tmp_path / "m", edit))


def test_missing_and_extra_tensors_are_named(hf_mistral, tmp_path: Path) -> None:
    def edit(state):
        del state["layers.0.feed_forward.w3.weight"]
        state["layers.0.feed_forward.w4.weight"] = torch.zeros(2)

    with pytest.raises(LoadError) as err:
        mistral7b.load(_rewrite_native(hf_mistral, tmp_path / "m", edit))
    assert "missing tensors: layers.0.feed_forward.w3.weight" in str(err.value)
    assert "unexpected tensors: layers.0.feed_forward.w4.weight" in str(err.value)


def test_pth_with_pickled_object_is_refused(hf_mistral, tmp_path: Path) -> None:
    directory = save_native(hf_mistral, tmp_path / "m", fmt="pth")

    class Payload:
        def __reduce__(self):
            return (print, ("this must never run",))

    torch.save({"tok_embeddings.weight": Payload()}, directory / "consolidated.00.pth")
    with pytest.raises(LoadError, match="weights_only"):
        mistral7b.load(directory)


def test_corrupt_pth(hf_mistral, tmp_path: Path) -> None:
    directory = save_native(hf_mistral, tmp_path / "m", fmt="pth")
    (directory / "consolidated.00.pth").write_bytes(b"not a zip file at all")
    with pytest.raises(LoadError, match=r"consolidated\.00\.pth"):
        mistral7b.load(directory)


def test_unknown_dtype(mistral_dir: Path) -> None:
    with pytest.raises(InvalidArgumentError, match=r"unknown dtype 'float8'"):
        mistral7b.load(mistral_dir, dtype="float8")


def test_invalid_config_json(mistral_dir: Path, tmp_path: Path) -> None:
    broken = tmp_path / "broken"
    shutil.copytree(mistral_dir, broken)
    (broken / "config.json").write_text("{not json")
    with pytest.raises(LoadError, match="invalid JSON"):
        mistral7b.load(broken)


def test_unsupported_rope_scaling_is_refused(mistral_dir: Path, tmp_path: Path) -> None:
    broken = tmp_path / "scaled"
    shutil.copytree(mistral_dir, broken)
    config = json.loads((broken / "config.json").read_text())
    config["rope_parameters"] = {"rope_type": "yarn", "rope_theta": 1e6, "factor": 4.0}
    (broken / "config.json").write_text(json.dumps(config))
    with pytest.raises(ConfigError, match=r"rope_parameters\.rope_type"):
        mistral7b.load(broken)


def test_missing_shard_is_named(hf_mistral, tmp_path: Path) -> None:
    sharded = save_hf(hf_mistral, tmp_path / "sharded", shards=True)
    victim = sorted(sharded.glob("*.safetensors"))[0]
    victim.unlink()
    with pytest.raises(LoadError, match=re.escape(victim.name)):
        mistral7b.load(sharded)


def test_checkpoint_without_tokenizer_still_runs_on_token_ids(mistral_dir: Path) -> None:
    llm = mistral7b.load(mistral_dir)
    result = llm.generate([1, 2, 3], max_tokens=4, temperature=0)
    assert len(result.token_ids) == 4 and result.finish_reason == "length"
    with pytest.raises(mistral7b.TokenizerError, match="no tokenizer"):
        llm.generate("hello", max_tokens=4)
    with pytest.raises(mistral7b.TokenizerError, match="no tokenizer"):
        llm.tokenizer.decode([1, 2])


@pytest.mark.parametrize(("fmt", "tolerance"), [("q8_0", 0.02), ("q4_0", 0.3), ("q4_1", 0.3)])
def test_quantize_a_float_checkpoint_at_load(hf_mistral, mistral_dir: Path, fmt: str,
                                             tolerance: float) -> None:
    from mistral7b.quant.modules import QuantLinear

    llm = mistral7b.load(mistral_dir, quantize=fmt)
    packed = [m for m in llm.model.modules() if isinstance(m, QuantLinear)]
    # q/k/v, wo, gate/up, down in each layer, and the output head; all uint8 blocks of `fmt`
    # (repacked eight rows at a time where the rows come in eights and the kernels are built).
    assert len(packed) == 4 * llm.config.n_layers + 1
    assert all(m.fmt.removesuffix("x8") == fmt.upper() and m.weight.dtype == torch.uint8
               for m in packed)
    with torch.no_grad():
        reference = hf_mistral(torch.tensor([IDS])).logits[0]
    assert (llm.logits(IDS) - reference).abs().max().item() < tolerance


def test_unknown_quantization_is_refused(mistral_dir: Path) -> None:
    with pytest.raises(InvalidArgumentError, match="unknown quantization 'q3_k'"):
        mistral7b.load(mistral_dir, quantize="q3_k")
