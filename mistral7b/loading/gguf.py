"""GGUF files (llama.cpp's format), read with the `gguf` package's memory-mapped reader.

Weights are dequantized to the chosen float dtype tensor by tensor as the model is built; the
file itself stays memory-mapped, never read whole into RAM.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from mistral7b.config import ModelConfig
from mistral7b.errors import LoadError
from mistral7b.loading.checkpoint import TensorRef
from mistral7b.quant.formats import FORMATS

SUPPORTED_TYPES = ("F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q4_K", "Q5_K", "Q6_K")


def open_gguf(path: Path) -> Any:
    """A GGUFReader over `path`, with every way a file can be broken turned into a LoadError."""
    from gguf import GGUFReader

    try:
        size = path.stat().st_size
    except FileNotFoundError:
        raise LoadError(f"{path}: file not found") from None
    with open(path, "rb") as f:
        head = f.read(24)
    if len(head) < 8 or head[:4] != b"GGUF":
        raise LoadError(f"{path}: not a GGUF file (bad magic {head[:4]!r}, expected b'GGUF')")
    version = int.from_bytes(head[4:8], "little")
    if version not in (2, 3):
        raise LoadError(f"{path}: unsupported GGUF version {version} (supported: 2, 3)")
    if len(head) < 24:
        raise LoadError(f"{path}: corrupt or truncated GGUF file (only {size} bytes)")
    # The reader loops over these counts: refuse absurd ones before it starts (each tensor
    # entry and each key/value takes at least a dozen bytes of header).
    n_tensors = int.from_bytes(head[8:16], "little")
    n_kv = int.from_bytes(head[16:24], "little")
    if n_tensors * 12 > size or n_kv * 12 > size:
        raise LoadError(f"{path}: corrupt or truncated GGUF file (its header lists {n_tensors} "
                        f"tensors and {n_kv} metadata entries, which cannot fit in {size} bytes)")
    try:
        reader = GGUFReader(str(path))
    except Exception as e:  # the reader raises ValueError, IndexError, OverflowError, ...
        raise LoadError(f"{path}: corrupt or truncated GGUF file ({type(e).__name__}: {e})"
                        ) from None
    for t in reader.tensors:
        end = int(t.data_offset) + int(t.n_bytes)
        if end > size:
            raise LoadError(f"{path}: file is truncated: tensor {t.name!r} ends at byte {end}, "
                            f"the file has {size} bytes")
    return reader


def gguf_metadata(reader: Any) -> dict[str, Any]:
    """Every metadata key as a plain Python value (str, int, float, bool or list)."""
    return {name: field.contents() for name, field in reader.fields.items()}


def read_gguf(path: Path, dequantize: bool = False
              ) -> tuple[ModelConfig, list[TensorRef], dict[str, Any]]:
    """Quantized tensors stay packed (read as uint8 blocks) unless `dequantize`."""
    reader = open_gguf(path)
    for t in reader.tensors:
        if t.tensor_type.name not in SUPPORTED_TYPES:
            raise LoadError(f"{path}: tensor {t.name!r} has type {t.tensor_type.name}, which is "
                            f"not supported (supported: {', '.join(SUPPORTED_TYPES)})")
    metadata = gguf_metadata(reader)
    names = {t.name for t in reader.tensors}
    config = ModelConfig.from_gguf(metadata, has_output="output.weight" in names,
                                   source=str(path))
    if config.vocab_size == 0 and "token_embd.weight" in names:
        embd = next(t for t in reader.tensors if t.name == "token_embd.weight")
        config = config.replace(vocab_size=int(embd.shape[-1]))
    tensors = []
    for t in reader.tensors:
        shape = tuple(int(n) for n in reversed(t.shape.tolist()))  # GGUF lists dims innermost first
        kind = t.tensor_type.name
        if kind in FORMATS and not dequantize:
            tensors.append(TensorRef(t.name, shape, _packed_reader(t), str(path), packed=kind))
        else:
            tensors.append(TensorRef(t.name, shape, _dequantizer(t, shape), str(path)))
    return config, tensors, metadata


def _packed_reader(tensor: Any) -> Callable[[], torch.Tensor]:
    def read() -> torch.Tensor:
        # A copy: the memory map is read-only, and the copy leaves the file free to close.
        return torch.from_numpy(np.array(tensor.data, dtype=np.uint8, copy=True))

    return read


def _dequantizer(tensor: Any, shape: tuple[int, ...]) -> Callable[[], torch.Tensor]:
    def read() -> torch.Tensor:
        from gguf.quants import dequantize

        values = np.asarray(dequantize(tensor.data, tensor.tensor_type), dtype=np.float32)
        # Quantized types come back as a fresh array; F32 ones as a read-only view of the map.
        return torch.from_numpy(np.require(values.reshape(shape), requirements=["W", "C"]))

    return read
