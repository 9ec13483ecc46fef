"""A small, fast and strict reader for GGUF v2/v3 files (llama.cpp's format).

The layout (all little-endian)::

    magic "GGUF" | version u32 | tensor count u64 | metadata count u64
    metadata:  key (string) | value type u32 | value              (x metadata count)
    tensors:   name (string) | n_dims u32 | dims u64 x n_dims | ggml type u32 | offset u64
    padding to `general.alignment` (default 32), then the tensor data; each tensor's offset is
    relative to the start of the data section.

A string is a u64 byte length followed by UTF-8 bytes; an array is an element type u32, a u64
count, then the elements.

The file is memory-mapped once (`np.memmap`) and never read whole into RAM. The header is parsed
with `struct` on a memoryview of the map; arrays of numbers come out of one `np.frombuffer` each,
arrays of strings out of one tight loop, so a 49k-token vocabulary takes tens of milliseconds.
Every length and count is checked against the bytes left in the file before anything is
allocated or looped over: a broken file is a `LoadError` naming the file and the problem, never a
hang or a huge allocation.

`GGUFFile.metadata` holds the same plain Python values as the `gguf` package's
``{k: f.contents() for k, f in GGUFReader(path).fields.items()}`` (including its pseudo-keys
`GGUF.version`, `GGUF.tensor_count` and `GGUF.kv_count`), with two differences:

- a nested array (an array of arrays) is a list of lists here; GGUFReader flattens it;
- a string that is not valid UTF-8 is a `LoadError` here at parse time; GGUFReader raises
  `UnicodeDecodeError` from `contents()`.

Only little-endian files are read (GGUFReader also guesses big-endian ones; llama.cpp and every
converter write little-endian).
"""

from __future__ import annotations

import struct
from collections.abc import Collection
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from mistral7b.errors import LoadError

MAGIC = b"GGUF"
VERSIONS = (2, 3)
DEFAULT_ALIGNMENT = 32
MAX_DIMS = 4            # GGML_MAX_DIMS: llama.cpp refuses tensors with more dimensions
MAX_ARRAY_DEPTH = 8     # arrays of arrays of ...: no writer nests deeper than 2

# Metadata value types: id -> (name, struct format, numpy dtype) for the fixed-size ones.
_SCALARS: dict[int, tuple[str, str, str]] = {
    0: ("UINT8", "<B", "<u1"),
    1: ("INT8", "<b", "<i1"),
    2: ("UINT16", "<H", "<u2"),
    3: ("INT16", "<h", "<i2"),
    4: ("UINT32", "<I", "<u4"),
    5: ("INT32", "<i", "<i4"),
    6: ("FLOAT32", "<f", "<f4"),
    7: ("BOOL", "<?", "?"),
    10: ("UINT64", "<Q", "<u8"),
    11: ("INT64", "<q", "<i8"),
    12: ("FLOAT64", "<d", "<f8"),
}
_STRING = 8
_ARRAY = 9
_UINT32 = 4
_VALUE_TYPE_NAMES = {**{k: v[0] for k, v in _SCALARS.items()}, _STRING: "STRING",
                     _ARRAY: "ARRAY"}
_SCALAR_STRUCTS = {k: struct.Struct(fmt) for k, (_, fmt, _) in _SCALARS.items()}
_SCALAR_DTYPES = {k: np.dtype(dt) for k, (_, _, dt) in _SCALARS.items()}

# GGML tensor types: id -> (name, values per block, bytes per block).
GGML_TYPES: dict[int, tuple[str, int, int]] = {
    0: ("F32", 1, 4),
    1: ("F16", 1, 2),
    2: ("Q4_0", 32, 18),
    3: ("Q4_1", 32, 20),
    6: ("Q5_0", 32, 22),
    7: ("Q5_1", 32, 24),
    8: ("Q8_0", 32, 34),
    9: ("Q8_1", 32, 40),
    10: ("Q2_K", 256, 84),
    11: ("Q3_K", 256, 110),
    12: ("Q4_K", 256, 144),
    13: ("Q5_K", 256, 176),
    14: ("Q6_K", 256, 210),
    15: ("Q8_K", 256, 292),
    16: ("IQ2_XXS", 256, 66),
    17: ("IQ2_XS", 256, 74),
    18: ("IQ3_XXS", 256, 98),
    19: ("IQ1_S", 256, 50),
    20: ("IQ4_NL", 32, 18),
    21: ("IQ3_S", 256, 110),
    22: ("IQ2_S", 256, 82),
    23: ("IQ4_XS", 256, 136),
    24: ("I8", 1, 1),
    25: ("I16", 1, 2),
    26: ("I32", 1, 4),
    27: ("I64", 1, 8),
    28: ("F64", 1, 8),
    29: ("IQ1_M", 256, 56),
    30: ("BF16", 1, 2),
    34: ("TQ1_0", 256, 54),
    35: ("TQ2_0", 256, 66),
    39: ("MXFP4", 32, 17),
    40: ("NVFP4", 64, 36),
    41: ("Q1_0", 128, 18),
}
# Types whose data is viewed as numbers (as GGUFReader does); every other type, BF16 included,
# as uint8 rows of blocks: (..., row_bytes).
_ELEMENT_DTYPES = {"F32": "<f4", "F16": "<f2", "F64": "<f8", "I8": "i1", "I16": "<i2",
                   "I32": "<i4", "I64": "<i8"}

_U32 = struct.Struct("<I")
_U64 = struct.Struct("<Q")


@dataclass(frozen=True)
class TensorInfo:
    name: str
    type_name: str              # the ggml type, e.g. "Q4_1", "F32"
    type_id: int
    shape: tuple[int, ...]      # GGUF order: the innermost (contiguous) dimension first
    offset: int                 # absolute byte offset of the data in the file
    n_bytes: int
    n_elements: int

    @property
    def data_shape(self) -> tuple[int, ...]:
        """The shape of `GGUFFile.tensor_data`: numpy order (outermost first), and for block
        types the last dimension in bytes (rows, row_bytes)."""
        dims = tuple(reversed(self.shape))
        if self.type_name in _ELEMENT_DTYPES:
            return dims
        _, block, block_bytes = GGML_TYPES[self.type_id]
        return (*dims[:-1], dims[-1] // block * block_bytes)

    @property
    def data_dtype(self) -> np.dtype[Any]:
        return np.dtype(_ELEMENT_DTYPES.get(self.type_name, "u1"))


class GGUFFile:
    """A parsed GGUF file: its metadata, its tensor table, and read-only views of tensor data
    over one memory map of the file."""

    def __init__(self, path: Path, version: int, metadata: dict[str, Any],
                 tensors: list[TensorInfo], alignment: int, data_offset: int,
                 buffer: memoryview) -> None:
        self.path = path
        self.version = version
        self.metadata = metadata
        self.tensors = tensors
        self.alignment = alignment
        self.data_offset = data_offset
        self._buffer = buffer
        self._by_name = {t.name: t for t in tensors}

    def tensor(self, name: str) -> TensorInfo:
        try:
            return self._by_name[name]
        except KeyError:
            raise LoadError(f"{self.path}: no tensor named {name!r}") from None

    def tensor_data(self, tensor: TensorInfo | str) -> np.ndarray[Any, Any]:
        """A read-only view of the tensor's bytes in the memory map, shaped and typed as
        GGUFReader's `tensor.data`: F32/F16/F64/I8..I64 as numbers, every other type (BF16 and
        the quantized ones) as uint8 (rows, row_bytes)."""
        info = self.tensor(tensor) if isinstance(tensor, str) else tensor
        dtype = info.data_dtype
        data = np.frombuffer(self._buffer, dtype=dtype, count=info.n_bytes // dtype.itemsize,
                             offset=info.offset)
        return data.reshape(info.data_shape)


def read_gguf_file(path: str | Path, supported_types: Collection[str] | None = None) -> GGUFFile:
    """Parse the GGUF file at `path`. With `supported_types` (ggml type names), a tensor of any
    other type is a LoadError naming it and listing the supported ones."""
    path = Path(path)
    try:
        size = path.stat().st_size
    except FileNotFoundError:
        raise LoadError(f"{path}: file not found") from None
    except OSError as e:
        raise LoadError(f"{path}: cannot read the file ({e})") from None
    try:
        if size < len(MAGIC):
            with open(path, "rb") as f:
                head = f.read(len(MAGIC))
            raise LoadError(f"{path}: not a GGUF file (bad magic {head!r}, expected {MAGIC!r})")
        mapped = np.memmap(path, dtype=np.uint8, mode="r")
    except (OSError, ValueError) as e:
        raise LoadError(f"{path}: cannot read the file ({e})") from None
    return _Parser(path, mapped.data, supported_types).parse()


class _Parser:
    def __init__(self, path: Path, buffer: memoryview,
                 supported_types: Collection[str] | None) -> None:
        self.path = path
        self.buf = buffer
        self.size = len(buffer)
        self.pos = 0
        self.supported = supported_types

    # ---- errors and bounds ----------------------------------------------------------------

    def corrupt(self, detail: str) -> LoadError:
        return LoadError(f"{self.path}: corrupt or truncated GGUF file ({detail})")

    def need(self, n: int, what: str) -> None:
        """Fail unless `n` bytes are left from the current position."""
        left = self.size - self.pos
        if n > left:
            raise self.corrupt(f"{what} at byte {self.pos} needs {n} bytes, but only {left} "
                               f"are left in the {self.size}-byte file")

    def u32(self, what: str) -> int:
        self.need(4, what)
        (value,) = _U32.unpack_from(self.buf, self.pos)
        self.pos += 4
        return int(value)

    def u64(self, what: str) -> int:
        self.need(8, what)
        (value,) = _U64.unpack_from(self.buf, self.pos)
        self.pos += 8
        return int(value)

    def string(self, what: str) -> str:
        n = self.u64(f"the length of {what}")
        self.need(n, what)
        start = self.pos
        self.pos += n
        try:
            return str(self.buf[start:start + n], "utf-8")
        except UnicodeDecodeError as e:
            raise self.corrupt(f"{what} at byte {start} is not valid UTF-8 ({e.reason})"
                               ) from None

    # ---- the file -------------------------------------------------------------------------

    def parse(self) -> GGUFFile:
        path, buf = self.path, self.buf
        magic = bytes(buf[:4])
        if magic != MAGIC:
            raise LoadError(f"{path}: not a GGUF file (bad magic {magic!r}, expected {MAGIC!r})")
        self.pos = 4
        version = self.u32("the version")
        if version not in VERSIONS:
            hint = ""
            if int.from_bytes(version.to_bytes(4, "little"), "big") in VERSIONS:
                hint = "; it looks big-endian, and only little-endian files are read"
            raise LoadError(f"{path}: unsupported GGUF version {version} (supported: "
                            f"{', '.join(map(str, VERSIONS))}){hint}")
        n_tensors = self.u64("the tensor count")
        n_kv = self.u64("the metadata count")
        # Each metadata entry takes at least 13 bytes (key length, type, a one-byte value), each
        # tensor entry at least 24 (name length, n_dims, type, offset).
        if n_kv * 13 + n_tensors * 24 > self.size - self.pos:
            raise LoadError(f"{path}: corrupt or truncated GGUF file (its header lists "
                            f"{n_tensors} tensors and {n_kv} metadata entries, which cannot fit "
                            f"in {self.size} bytes)")
        metadata: dict[str, Any] = {"GGUF.version": version, "GGUF.tensor_count": n_tensors,
                                    "GGUF.kv_count": n_kv}
        alignment_type = None
        for i in range(n_kv):
            key = self.string(f"the key of metadata entry {i}")
            vtype = self.u32(f"the value type of metadata key {key!r}")
            if key in metadata:
                raise self.corrupt(f"metadata key {key!r} appears twice")
            metadata[key] = self.value(vtype, f"metadata key {key!r}", 0)
            if key == "general.alignment":
                alignment_type = vtype
        raw = self.tensor_table(n_tensors)

        alignment = DEFAULT_ALIGNMENT
        if alignment_type is not None:
            alignment = metadata["general.alignment"]
            if alignment_type != _UINT32:
                raise self.corrupt(f"general.alignment should be a UINT32, not a "
                                   f"{_VALUE_TYPE_NAMES[alignment_type]}")
            if alignment == 0 or alignment & (alignment - 1):
                raise self.corrupt(f"general.alignment is {alignment}, not a power of two")
        data_offset = -(-self.pos // alignment) * alignment
        tensors = [self.tensor_info(data_offset, alignment, *entry) for entry in raw]
        self.check_layout(tensors)
        return GGUFFile(path, version, metadata, tensors, alignment, data_offset, buf)

    # ---- metadata values ------------------------------------------------------------------

    def value(self, vtype: int, what: str, depth: int) -> Any:
        scalar = _SCALAR_STRUCTS.get(vtype)
        if scalar is not None:
            self.need(scalar.size, what)
            (value,) = scalar.unpack_from(self.buf, self.pos)
            self.pos += scalar.size
            return value
        if vtype == _STRING:
            return self.string(what)
        if vtype == _ARRAY:
            return self.array(what, depth)
        raise self.corrupt(f"{what} has unknown value type {vtype}")

    def array(self, what: str, depth: int) -> list[Any]:
        if depth >= MAX_ARRAY_DEPTH:
            raise self.corrupt(f"{what} nests arrays more than {MAX_ARRAY_DEPTH} deep")
        itype = self.u32(f"the element type of {what}")
        count = self.u64(f"the length of {what}")
        dtype = _SCALAR_DTYPES.get(itype)
        if dtype is not None:
            n_bytes = count * dtype.itemsize
            self.need(n_bytes, f"{what} ({count} {_VALUE_TYPE_NAMES[itype]})")
            values = np.frombuffer(self.buf, dtype=dtype, count=count, offset=self.pos)
            self.pos += n_bytes
            return values.tolist()
        if itype == _STRING:
            self.need(count * 8, f"{what} ({count} strings)")
            return self.strings(count, what)
        if itype == _ARRAY:
            self.need(count * 12, f"{what} ({count} arrays)")
            return [self.array(f"{what}[{i}]", depth + 1) for i in range(count)]
        raise self.corrupt(f"{what} is an array of unknown value type {itype}")

    def strings(self, count: int, what: str) -> list[str]:
        """`count` strings in one tight loop (a vocabulary holds tens of thousands)."""
        buf, end, unpack = self.buf, self.size, _U64.unpack_from
        out: list[str] = []
        append = out.append
        pos = self.pos
        i = 0
        try:
            for i in range(count):
                if end - pos < 8:
                    raise self.corrupt(f"{what}[{i}] at byte {pos}: its length runs past the end "
                                       f"of the {end}-byte file")
                (n,) = unpack(buf, pos)
                pos += 8
                if n > end - pos:
                    raise self.corrupt(f"{what}[{i}] at byte {pos} is {n} bytes long, but only "
                                       f"{end - pos} are left in the {end}-byte file")
                append(str(buf[pos:pos + n], "utf-8"))
                pos += n
        except UnicodeDecodeError as e:
            raise self.corrupt(f"{what}[{i}] at byte {pos} is not valid UTF-8 ({e.reason})"
                               ) from None
        self.pos = pos
        return out

    # ---- tensors --------------------------------------------------------------------------

    def tensor_table(self, count: int) -> list[tuple[str, tuple[int, ...], int, int]]:
        entries = []
        seen: set[str] = set()
        for i in range(count):
            name = self.string(f"the name of tensor {i}")
            what = f"tensor {name!r}"
            if name in seen:
                raise self.corrupt(f"{what} appears twice")
            seen.add(name)
            n_dims = self.u32(f"the dimension count of {what}")
            if n_dims > MAX_DIMS:
                raise self.corrupt(f"{what} has {n_dims} dimensions (at most {MAX_DIMS})")
            self.need(8 * n_dims, f"the dimensions of {what}")
            dims = struct.unpack_from(f"<{n_dims}Q", self.buf, self.pos)
            self.pos += 8 * n_dims
            type_id = self.u32(f"the type of {what}")
            offset = self.u64(f"the data offset of {what}")
            entries.append((name, dims, type_id, offset))
        return entries

    def tensor_info(self, data_offset: int, alignment: int, name: str, dims: tuple[int, ...],
                    type_id: int, offset: int) -> TensorInfo:
        path, what = self.path, f"tensor {name!r}"
        known = GGML_TYPES.get(type_id)
        type_name = known[0] if known else f"<unknown type id {type_id}>"
        if known is None or (self.supported is not None and type_name not in self.supported):
            supported = (self.supported if self.supported is not None
                         else [name for name, _, _ in GGML_TYPES.values()])
            raise LoadError(f"{path}: {what} has type {type_name}, which is not supported "
                            f"(supported: {', '.join(supported)})")
        _, block, block_bytes = known
        n_elements = 1
        for d in dims:
            n_elements *= d
        if block > 1 and (not dims or dims[0] % block):
            raise self.corrupt(f"{what} of type {type_name} has shape {list(dims)}: rows must be "
                               f"whole blocks of {block} values")
        if offset % alignment:
            raise self.corrupt(f"{what} has data offset {offset}, not a multiple of the "
                               f"alignment {alignment}")
        n_bytes = n_elements // block * block_bytes
        return TensorInfo(name, type_name, type_id, tuple(dims), data_offset + offset, n_bytes,
                          n_elements)

    def check_layout(self, tensors: list[TensorInfo]) -> None:
        previous: TensorInfo | None = None
        for t in sorted(tensors, key=lambda t: t.offset):
            end = t.offset + t.n_bytes
            if end > self.size:
                raise LoadError(f"{self.path}: file is truncated: tensor {t.name!r} ends at byte "
                                f"{end}, the file has {self.size} bytes")
            if previous is not None and t.offset < previous.offset + previous.n_bytes:
                raise self.corrupt(f"tensors {previous.name!r} and {t.name!r} overlap")
            previous = t
