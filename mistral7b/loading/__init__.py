"""Find out what a model path holds and load it: GGUF files, Mistral native or Hugging Face
directories."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import torch

from mistral7b.config import ModelConfig, is_mistral_7b
from mistral7b.errors import InvalidArgumentError, LoadError
from mistral7b.loading import names
from mistral7b.loading.checkpoint import build_model
from mistral7b.loading.gguf import read_gguf
from mistral7b.loading.hf import is_hf, read_hf
from mistral7b.loading.native import is_native, read_native
from mistral7b.model import Transformer
from mistral7b.quant.formats import FORMATS
from mistral7b.tensor_parallel import Shard, check_split
from mistral7b.tokenizer import Tokenizer, find_tokenizer


def load_checkpoint(path: str | Path, dtype: torch.dtype, device: torch.device | str = "cpu",
                    progress: bool = True, sliding_window: int | None = None,
                    dequantize: bool = False, quantize: str | None = None,
                    shard: Shard | None = None) -> tuple[ModelConfig, Transformer, Tokenizer]:
    """sliding_window: None keeps what the checkpoint says; N > 0 forces a window of N tokens;
    0 forces full attention. dequantize: turn quantized GGUF tensors into `dtype` at load instead
    of keeping them packed. quantize: "q8_0" | "q4_0" | "q4_1" packs float linear weights.
    shard: load only this tensor-parallel rank's slices (tensor_parallel.py)."""
    path = Path(path).expanduser()
    if not path.exists():
        raise LoadError(f"model path {path} does not exist")
    tokenizer: Tokenizer | None = None
    layout: Literal["interleaved", "half_split"] = "interleaved"  # native and GGUF q/k rows
    if path.is_file():
        if path.suffix != ".gguf":
            raise LoadError(f"{path} is a file but not a .gguf; for other formats pass the "
                            "directory that holds the checkpoint (params.json + consolidated.* "
                            "or config.json + *.safetensors)")
        config, tensors, metadata = read_gguf(path, dequantize)
        name_map = names.GGUF
        from mistral7b.tokenizer_gguf import NO_VOCABULARY, tokenizer_from_gguf

        if metadata.get("tokenizer.ggml.model", "none") not in NO_VOCABULARY:
            gguf_tokenizer = tokenizer_from_gguf(metadata, str(path))
            # Mistral 7B GGUFs chat in Mistral's v1 instruct format (mistral-common's encoding),
            # whatever template a converter may have stored.
            gguf_tokenizer.mistral_v1_chat = is_mistral_7b(config)
            tokenizer = gguf_tokenizer
    elif is_native(path):
        config, tensors = read_native(path)
        name_map = names.NATIVE
    elif is_hf(path):
        config, tensors = read_hf(path)
        name_map, layout = names.HF, "half_split"
    else:
        raise LoadError(f"{path}: not a model directory: expected params.json with "
                        "consolidated.safetensors/consolidated.00.pth (Mistral native) or "
                        "config.json with *.safetensors (Hugging Face), or a .gguf file")
    if sliding_window is not None:
        if sliding_window < 0:
            raise InvalidArgumentError(f"sliding_window must be >= 0 (got {sliding_window}); "
                                       "0 means full attention")
        config = config.replace(sliding_window=sliding_window or None)
    if shard is not None:      # before anything is read
        blocks = {FORMATS[t.packed].block_size for t in tensors if t.packed is not None}
        if quantize is not None:
            blocks.add(32)
        check_split(config, shard.world, max(blocks) if blocks else None)
    model = build_model(config, tensors, name_map, layout, dtype, device, progress, quantize,
                        shard)
    if tokenizer is None:
        tokenizer = find_tokenizer(path, config.vocab_size)
    return config, model, tokenizer
