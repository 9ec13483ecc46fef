"""Mistral's native checkpoints: `params.json` + `consolidated.safetensors` (or `.00.pth`)."""

from __future__ import annotations

from pathlib import Path

from mistral7b.config import ModelConfig
from mistral7b.errors import LoadError
from mistral7b.loading.checkpoint import TensorRef, read_json, read_pth, read_safetensors


def is_native(directory: Path) -> bool:
    return (directory / "params.json").is_file() and any(directory.glob("consolidated*"))


def read_native(directory: Path) -> tuple[ModelConfig, list[TensorRef]]:
    config = ModelConfig.from_params(read_json(directory / "params.json"),
                                     source=str(directory / "params.json"))
    safetensors = directory / "consolidated.safetensors"
    if safetensors.is_file():
        return config, read_safetensors(safetensors)
    shards = sorted(directory.glob("consolidated.*.pth"))
    if len(shards) > 1:
        raise LoadError(f"{directory}: {len(shards)} tensor-parallel shards "
                        f"({', '.join(p.name for p in shards)}) are not supported; "
                        "merge them into one consolidated file first")
    if not shards:
        raise LoadError(f"{directory}: no consolidated.safetensors or consolidated.00.pth found")
    return config, read_pth(shards[0])
