"""Find out what a model path holds and load it: Mistral native or Hugging Face directories."""

from __future__ import annotations

from pathlib import Path

import torch

from mistral7b.config import ModelConfig
from mistral7b.errors import LoadError
from mistral7b.loading import names
from mistral7b.loading.checkpoint import build_model
from mistral7b.loading.hf import is_hf, read_hf
from mistral7b.loading.native import is_native, read_native
from mistral7b.model import Transformer
from mistral7b.tokenizer import Tokenizer, find_tokenizer


def load_checkpoint(path: str | Path, dtype: torch.dtype, device: torch.device | str = "cpu",
                    progress: bool = True) -> tuple[ModelConfig, Transformer, Tokenizer]:
    path = Path(path).expanduser()
    if not path.exists():
        raise LoadError(f"model path {path} does not exist")
    if path.is_file():
        if path.suffix == ".gguf":
            raise LoadError(f"{path}: GGUF files are not supported yet; use a Mistral native or "
                            "Hugging Face directory")
        raise LoadError(f"{path} is a file; pass the directory that holds the checkpoint "
                        "(params.json + consolidated.* or config.json + *.safetensors)")
    if is_native(path):
        config, tensors = read_native(path)
        model = build_model(config, tensors, names.NATIVE, "interleaved", dtype, device, progress)
    elif is_hf(path):
        config, tensors = read_hf(path)
        model = build_model(config, tensors, names.HF, "half_split", dtype, device, progress)
    else:
        raise LoadError(f"{path}: not a model directory: expected params.json with "
                        "consolidated.safetensors/consolidated.00.pth (Mistral native) or "
                        "config.json with *.safetensors (Hugging Face)")
    return config, model, find_tokenizer(path, config.vocab_size)
