"""Hugging Face checkpoints: `config.json` + one or sharded `*.safetensors`."""

from __future__ import annotations

from pathlib import Path

from mistral7b.config import ModelConfig
from mistral7b.errors import LoadError
from mistral7b.loading.checkpoint import TensorRef, read_json, read_safetensors

INDEX = "model.safetensors.index.json"


def is_hf(directory: Path) -> bool:
    return (directory / "config.json").is_file()


def read_hf(directory: Path) -> tuple[ModelConfig, list[TensorRef]]:
    config = ModelConfig.from_hf(read_json(directory / "config.json"),
                                 source=str(directory / "config.json"))
    if (directory / INDEX).is_file():
        weight_map = read_json(directory / INDEX).get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map:
            raise LoadError(f"{directory / INDEX}: no `weight_map` in the index")
        files = sorted(set(weight_map.values()))
        absent = [f for f in files if not (directory / f).is_file()]
        if absent:
            raise LoadError(f"{directory}: shards listed in {INDEX} are missing: "
                            f"{', '.join(absent)}")
    else:
        files = sorted(p.name for p in directory.glob("*.safetensors"))
    if not files:
        found = sorted(p.name for p in directory.glob("*.bin"))
        hint = (f" (found {', '.join(found)}: convert PyTorch .bin weights to safetensors)"
                if found else "")
        raise LoadError(f"{directory}: no *.safetensors weights found{hint}")
    tensors: list[TensorRef] = []
    for name in files:
        tensors.extend(read_safetensors(directory / name))
    return config, tensors
