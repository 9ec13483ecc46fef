"""GGUF files (llama.cpp's format), read with our own memory-mapped reader (`gguf_file`).

Weights are dequantized to the chosen float dtype tensor by tensor as the model is built; the
file itself stays memory-mapped, never read whole into RAM. The `gguf` package is imported only
to dequantize (it takes ~0.6 s to import), never to parse.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from mistral7b.config import ModelConfig
from mistral7b.loading.checkpoint import TensorRef
from mistral7b.loading.gguf_file import GGUFFile, TensorInfo, read_gguf_file
from mistral7b.quant.formats import FORMATS

SUPPORTED_TYPES = ("F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q4_K", "Q5_K", "Q6_K")


def open_gguf(path: Path) -> GGUFFile:
    """The parsed GGUF file at `path` (metadata, tensor table, memory map), with every way a file
    can be broken turned into a LoadError."""
    return read_gguf_file(path)


def gguf_metadata(gguf: GGUFFile) -> dict[str, Any]:
    """Every metadata key as a plain Python value (str, int, float, bool or list)."""
    return gguf.metadata


def read_gguf(path: Path, dequantize: bool = False
              ) -> tuple[ModelConfig, list[TensorRef], dict[str, Any]]:
    """Quantized tensors stay packed (read as uint8 blocks) unless `dequantize`."""
    gguf = read_gguf_file(path, supported_types=SUPPORTED_TYPES)
    metadata = gguf.metadata
    names = {t.name for t in gguf.tensors}
    config = ModelConfig.from_gguf(metadata, has_output="output.weight" in names,
                                   source=str(path))
    if config.vocab_size == 0 and "token_embd.weight" in names:
        config = config.replace(vocab_size=gguf.tensor("token_embd.weight").shape[-1])
    tensors = []
    for t in gguf.tensors:
        shape = tuple(reversed(t.shape))  # GGUF lists dims innermost first
        # Matrices stay in their stored format (blocks, or 16-bit floats); vectors (norms) and
        # everything with dequantize=True become floats of the model's dtype.
        if t.type_name in FORMATS and len(shape) == 2 and not dequantize:
            tensors.append(TensorRef(t.name, shape, _packed_reader(gguf, t), str(path),
                                     packed=t.type_name, read_part=_part_reader(gguf, t)))
        else:
            tensors.append(TensorRef(t.name, shape, _dequantizer(gguf, t, shape), str(path)))
    return config, tensors, metadata


def _blocks(gguf: GGUFFile, tensor: TensorInfo) -> np.ndarray[Any, Any]:
    """The tensor's bytes as (rows, row_bytes), a read-only view of the memory map. F16 comes
    back as float16 numbers: its bytes are kept, (rows, 2 * cols)."""
    data = gguf.tensor_data(tensor)
    rows = data.shape[0] if data.ndim > 1 else 1
    return data.view(np.uint8).reshape(rows, -1)


def _packed_reader(gguf: GGUFFile, tensor: TensorInfo) -> Callable[[], torch.Tensor]:
    def read() -> torch.Tensor:
        # A copy: the memory map is read-only, and the copy leaves the file free to close.
        return torch.from_numpy(np.array(_blocks(gguf, tensor), copy=True))

    return read


def _part_reader(gguf: GGUFFile, tensor: TensorInfo) -> Callable[[int, int, int], torch.Tensor]:
    def read_part(dim: int, start: int, stop: int) -> torch.Tensor:
        """Rows or byte columns [start, stop) of the blocks: only those pages of the map."""
        blocks = _blocks(gguf, tensor)
        part = blocks[start:stop] if dim == 0 else blocks[:, start:stop]
        return torch.from_numpy(np.array(part, copy=True))

    return read_part


def _dequantizer(gguf: GGUFFile, tensor: TensorInfo, shape: tuple[int, ...]
                 ) -> Callable[[], torch.Tensor]:
    def read() -> torch.Tensor:
        data = gguf.tensor_data(tensor)
        if tensor.type_name == "F32":
            values = data  # a read-only view of the map: copied below
        elif tensor.type_name == "F16":
            values = data.astype(np.float32)
        else:
            from gguf import GGMLQuantizationType
            from gguf.quants import dequantize

            values = np.asarray(dequantize(data, GGMLQuantizationType[tensor.type_name]),
                                dtype=np.float32)
        return torch.from_numpy(np.require(values.reshape(shape), dtype=np.float32,
                                           requirements=["W", "C"]))

    return read
