"""What every weight loader shares: reading tensor files safely, and building the model.

A loader turns a checkpoint into a list of `TensorRef`s (a checkpoint name, its shape, and a
function that reads it) plus a ModelConfig; `build_model` renames, checks and loads them into a
Transformer built on the `meta` device, so weights are allocated exactly once.
"""

from __future__ import annotations

import json
import math
import pickle
import struct
import zipfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from mistral7b import tensor_parallel
from mistral7b.config import ModelConfig
from mistral7b.errors import InvalidArgumentError, LoadError
from mistral7b.loading import names
from mistral7b.model import Transformer
from mistral7b.quant.formats import FORMATS
from mistral7b.rope import permute_rope_rows
from mistral7b.tensor_parallel import Shard

DTYPES = {
    "float32": torch.float32, "fp32": torch.float32,
    "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
    "float16": torch.float16, "fp16": torch.float16,
}


def parse_dtype(dtype: str | torch.dtype) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        if dtype in DTYPES.values():
            return dtype
        raise InvalidArgumentError(f"dtype {dtype} is not supported; use float32, bfloat16 or "
                                   "float16")
    if dtype not in DTYPES:
        raise InvalidArgumentError(f"unknown dtype {dtype!r}; use one of float32, bfloat16, "
                                   "float16")
    return DTYPES[dtype]


@dataclass(frozen=True)
class TensorRef:
    name: str                       # as written in the checkpoint
    shape: tuple[int, ...]          # the logical (float) shape
    read: Callable[[], torch.Tensor]
    file: str                       # for error messages
    # A block format ("Q4_1", ...) when `read` returns the packed blocks, (rows, row_bytes)
    # uint8, to be kept compact in a QuantLinear / QuantEmbedding.
    packed: str | None = None
    # Reads only rows (dim 0) or columns (dim 1) [start, stop) of what `read` returns (for a
    # packed tensor: of its bytes), without reading the rest: a tensor-parallel rank's slice.
    read_part: Callable[[int, int, int], torch.Tensor] | None = None

    def read_slice(self, dim: int, start: int, stop: int) -> torch.Tensor:
        if self.read_part is not None:
            return self.read_part(dim, start, stop)
        # A memory-mapped tensor: narrowing it first reads only the slice's pages.
        return self.read().narrow(dim, start, stop - start).contiguous()


# ---- reading files ------------------------------------------------------------------------

# Bytes per element of each safetensors dtype we can hold in torch.
_SAFETENSORS_DTYPES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2,
                       "I8": 1, "U8": 1, "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1}


def read_safetensors(path: Path) -> list[TensorRef]:
    """Tensors of a .safetensors file, after checking its header against the file's size (so a
    truncated download is reported as such rather than failing deep inside a read)."""
    size = _file_size(path)
    with open(path, "rb") as f:
        raw = f.read(8)
        if len(raw) < 8:
            raise LoadError(f"{path}: not a safetensors file (only {size} bytes)")
        (header_len,) = struct.unpack("<Q", raw)
        if header_len > size - 8 or header_len > 100_000_000:
            raise LoadError(f"{path}: corrupt or truncated safetensors file (header claims "
                            f"{header_len} bytes, file has {size})")
        try:
            header = json.loads(f.read(header_len))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise LoadError(f"{path}: corrupt safetensors header ({e})") from None
    if not isinstance(header, dict):
        raise LoadError(f"{path}: corrupt safetensors header (not a JSON object)")
    data_size = size - 8 - header_len
    for name, info in header.items():
        if name == "__metadata__":
            continue
        try:
            start, end = info["data_offsets"]
            dtype = info["dtype"]
            shape = info["shape"]
        except (KeyError, TypeError, ValueError):
            raise LoadError(f"{path}: corrupt safetensors header entry for {name!r}") from None
        if dtype not in _SAFETENSORS_DTYPES:
            raise LoadError(f"{path}: tensor {name!r} has unsupported dtype {dtype!r}")
        if end - start != math.prod(shape) * _SAFETENSORS_DTYPES[dtype]:
            raise LoadError(f"{path}: corrupt safetensors header: tensor {name!r} of shape "
                            f"{shape} and dtype {dtype} does not span bytes {start}..{end}")
        if end > data_size:
            raise LoadError(f"{path}: file is truncated: tensor {name!r} ends at byte {end} of "
                            f"the data section, which has only {data_size} bytes; "
                            "re-download the file")

    from safetensors import safe_open

    handle = safe_open(str(path), framework="pt")  # memory-mapped; kept alive by the closures

    def reader(name: str) -> Callable[[], torch.Tensor]:
        return lambda: handle.get_tensor(name)

    def part_reader(name: str) -> Callable[[int, int, int], torch.Tensor]:
        def read_part(dim: int, start: int, stop: int) -> torch.Tensor:
            part = handle.get_slice(name)
            return part[start:stop] if dim == 0 else part[:, start:stop]
        return read_part

    return [TensorRef(name, tuple(info["shape"]), reader(name), str(path),
                      read_part=part_reader(name))
            for name, info in header.items() if name != "__metadata__"]


def read_pth(path: Path) -> list[TensorRef]:
    """A PyTorch checkpoint, loaded with weights_only=True: it may only hold tensors."""
    _file_size(path)
    try:
        state = torch.load(path, map_location="cpu", mmap=True, weights_only=True)
    except pickle.UnpicklingError as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise LoadError(f"{path}: refused to load: the file holds Python objects, not only "
                        f"tensors (weights_only=True): {first}") from None
    except (RuntimeError, EOFError, zipfile.BadZipFile, OSError, ValueError) as e:
        raise LoadError(f"{path}: corrupt or truncated PyTorch checkpoint ({e})") from None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise LoadError(f"{path}: expected a dict of tensors, found {type(state).__name__}")

    def reader(t: torch.Tensor) -> Callable[[], torch.Tensor]:
        return lambda: t

    return [TensorRef(k, tuple(v.shape), reader(v), str(path)) for k, v in state.items()]


def read_json(path: Path) -> dict:
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except FileNotFoundError:
        raise LoadError(f"{path}: file not found") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise LoadError(f"{path}: invalid JSON ({e})") from None
    if not isinstance(data, dict):
        raise LoadError(f"{path}: expected a JSON object")
    return data


def _file_size(path: Path) -> int:
    try:
        return path.stat().st_size
    except FileNotFoundError:
        raise LoadError(f"{path}: file not found") from None


# ---- building the model -------------------------------------------------------------------


def build_model(config: ModelConfig, tensors: Sequence[TensorRef], name_map: names.NameMap,
                rope_layout: Literal["interleaved", "half_split"], dtype: torch.dtype,
                device: torch.device | str = "cpu", progress: bool = True,
                quantize: str | None = None, shard: Shard | None = None) -> Transformer:
    """Rename, check and load checkpoint tensors into a Transformer of `config`.

    The check is strict: a tensor the model needs but the checkpoint lacks, a tensor the model
    does not know, or a shape mismatch is a LoadError naming every offending tensor.
    quantize ("q8_0", "q4_0", "q4_1"): pack the float weights of every linear layer into that
    block format at load (embeddings, norms and already-packed tensors are left as they are).
    shard: this rank's part under tensor parallelism (tensor_parallel.py): the model holds
    its share of the heads and FFN units, and only those slices are read.
    """
    fmt = _quantize_format(quantize)
    world = shard.world if shard is not None else 1
    local = tensor_parallel.local_config(config, world)
    with torch.device("meta"):
        model = Transformer(local)
        whole = Transformer(config) if world > 1 else model
    expected = {k: tuple(v.shape) for k, v in whole.state_dict().items()}
    local_shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    del whole

    ours: dict[str, TensorRef] = {}
    unknown: list[str] = []
    for ref in tensors:
        name = names.rename(ref.name, name_map)
        if name is None or name not in expected:
            if names.is_ignored(ref.name):
                continue
            # A tied model needs no output head; some writers store a copy anyway.
            if name == "output.weight" and config.tie_embeddings:
                continue
            unknown.append(ref.name)
            continue
        ours[name] = ref
    missing = [k for k in expected if k not in ours]
    wrong = [f"{ref.name} {list(ref.shape)} (expected {list(expected[k])})"
             for k, ref in ours.items() if ref.shape != expected[k]]
    problems = []
    if missing:
        problems.append(f"missing tensors: {_some(missing)}")
    if unknown:
        problems.append(f"unexpected tensors: {_some(unknown)}")
    if wrong:
        problems.append(f"wrong shapes: {_some(wrong)}")
    if problems:
        files = sorted({ref.file for ref in tensors})
        raise LoadError(f"checkpoint {_some(files)} does not match its configuration "
                        f"({config.source}): " + "; ".join(problems))

    # Which tensors end up packed: those the file stores packed, and with `quantize` the float
    # weights of linear layers whose rows are whole blocks.
    packed: dict[str, str] = {}
    for name, ref in ours.items():
        if ref.packed is not None:
            packed[name] = ref.packed
        elif fmt and _is_linear_weight(model, name) and local_shapes[name][1] % 32 == 0:
            packed[name] = fmt
    for name, block_format in packed.items():
        _install_packed(model, name, block_format, dtype)

    state: dict[str, torch.Tensor] = {}
    for name, ref in tqdm(ours.items(), desc="loading weights", unit="tensor",
                          disable=None if progress else True, leave=False):
        try:
            tensor = _read(ref, name, shard)
        except Exception as e:  # safetensors and torch raise assorted types for bad bytes
            raise LoadError(f"{ref.file}: cannot read tensor {ref.name!r}: {e}") from None
        heads_attr = names.rope_heads_attr(name)
        if heads_attr is not None and rope_layout != "interleaved":
            # Per head, so a rank's whole heads permute alone.
            tensor = permute_rope_rows(tensor, getattr(local, heads_attr), to="interleaved")
        if name in packed and ref.packed is None:
            tensor = _pack(tensor, packed[name])
        # Packed blocks stay uint8; float tensors take the model's dtype.
        state[name] = tensor.to(device) if name in packed else tensor.to(device=device,
                                                                          dtype=dtype)
    model.load_state_dict(state, strict=True, assign=True)
    # Drop our references before fusing, so that each layer's separate q/k/v and gate/up
    # matrices are freed as soon as their concatenation exists: a load never holds a second
    # copy of the weights (on a GPU, peak memory stays at the weights plus one layer).
    state.clear()
    model.requires_grad_(False)
    model.fuse()
    return model.eval()


def _read(ref: TensorRef, name: str, shard: Shard | None) -> torch.Tensor:
    """The tensor, or under tensor parallelism this rank's rows or columns of it (for packed
    blocks, columns are counted in whole blocks' bytes: check_split made sure they are)."""
    split = tensor_parallel.split_of(name) if shard is not None and shard.world > 1 else None
    if split is None or shard is None:
        return ref.read()
    if split == "column":
        return ref.read_slice(0, *shard.span(ref.shape[0]))
    start, stop = shard.span(ref.shape[1])
    if ref.packed is not None:
        block = FORMATS[ref.packed]
        start, stop = block.row_bytes(start), block.row_bytes(stop)
    return ref.read_slice(1, start, stop)


QUANTIZE_CHOICES = ("q8_0", "q4_0", "q4_1")


def _quantize_format(quantize: str | None) -> str | None:
    if quantize is None:
        return None
    if quantize.lower() not in QUANTIZE_CHOICES:
        raise InvalidArgumentError(f"unknown quantization {quantize!r}; use one of "
                                   f"{', '.join(QUANTIZE_CHOICES)}")
    return quantize.upper()


def _is_linear_weight(model: Transformer, name: str) -> bool:
    return isinstance(model.get_submodule(name.removesuffix(".weight")), nn.Linear)


def _pack(weight: torch.Tensor, fmt: str) -> torch.Tensor:
    """Float (N, K) -> (N, row_bytes) uint8 blocks, with the gguf package's quantizer (the
    reference implementation of these formats)."""
    from gguf import GGMLQuantizationType
    from gguf.quants import quantize

    blocks = quantize(weight.float().numpy(), GGMLQuantizationType[fmt])
    return torch.from_numpy(np.ascontiguousarray(blocks))


def _install_packed(model: Transformer, name: str, fmt: str, dtype: torch.dtype) -> None:
    """Swap the nn.Linear / nn.Embedding owning `name` for its packed counterpart (on meta)."""
    from mistral7b.quant.modules import QuantEmbedding, QuantLinear

    path = name.removesuffix(".weight")
    parent_path, _, attr = path.rpartition(".")
    parent = model.get_submodule(parent_path) if parent_path else model
    module = getattr(parent, attr)
    with torch.device("meta"):
        if isinstance(module, nn.Linear):
            packed: nn.Module = QuantLinear(module.in_features, module.out_features, fmt)
        elif isinstance(module, nn.Embedding):
            packed = QuantEmbedding(module.num_embeddings, module.embedding_dim, fmt, dtype)
        else:
            raise LoadError(f"tensor {name} is packed ({fmt}) but its module is a "
                            f"{type(module).__name__}")
    setattr(parent, attr, packed)


def _some(items: Sequence[str], limit: int = 6) -> str:
    shown = ", ".join(items[:limit])
    return shown + (f" (and {len(items) - limit} more)" if len(items) > limit else "")
