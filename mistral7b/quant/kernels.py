"""The one place that picks how a quantized matmul runs.

Fast path: a C++ extension (csrc/: qmatmul.cpp for the matmuls, decode.cpp for a whole decode
step; AVX2 + FMA + F16C, plus VNNI's fused integer dot product where the CPU has AVX-512 VNNI
or AVX-VNNI: see ISA_LEVELS) compiled on first use with torch.utils.cpp_extension and cached.
Portable path: dequantize with PyTorch, then F.linear. The fast path is used when the CPU has
AVX2, the extension builds, and MISTRAL7B_KERNELS is not set to "torch"; MISTRAL7B_ISA=avx2
(or avxvnni, avx512vnni) picks a level instead of the best the CPU has. The matmuls prefetch
weights MISTRAL7B_PREFETCH_BYTES ahead (default: kDefaultPrefetchBytes in csrc/kernels.h;
benchmarks/kernels.py measures other distances).

The build (first use, cached, safe to interrupt) is build.py's.
"""

from __future__ import annotations

import logging
import os
import threading
from pathlib import Path
from types import ModuleType

import torch
import torch.nn.functional as F

from mistral7b.errors import ConfigError
from mistral7b.quant.build import build_extension
from mistral7b.quant.formats import BASE, FORMATS, dequantize

log = logging.getLogger("mistral7b")

# Formats the C++ kernels implement (qmatmul and dequantize): all of FORMATS.
FAST_FORMATS = {"Q8_0", "Q4_0", "Q4_1", "Q4_K", "Q5_K", "Q6_K", "F16", "BF16",
                "Q4_0x8", "Q4_1x8", "Q8_0x8", "Q4_Kx8", "Q5_Kx8", "Q6_Kx8"}

# Which kernel multiplies x by a packed matrix. Decode (one new token per sequence): always the
# integer kernel (16-bit activations), which computes each row alone, so a sequence's numbers
# never depend on the batch. Pre-fill chunks (several tokens of one sequence, whose size the
# engine keeps fixed whatever the load): the integer kernel up to PREFILL_INT_MAX_ROWS rows,
# above it the float32 pre-fill kernel (csrc/prefill.cpp), which dequantizes a few weight rows at
# a time into cache. The cross-over lies between 8 and 16 rows on the AMD EPYC (Zen 3, 2
# threads; benchmarks/prefill_matmul.py on the default model's 120 layer matrices, ms, integer /
# pre-fill kernel): 8 rows 33.1 / 39.4, 12: 48.4 / 50.0, 16: 64.9 / 62.6, 24: 98.3 / 84.4 in one
# run; 8 rows 28.7 / 28.7, 12: 42.1 / 36.0, 16: 55.6 / 41.3 in another.
PREFILL_INT_MAX_ROWS = 16
# With VNNI (one instruction per integer multiply-add pair) the integer kernel beats the
# pre-fill kernel at every chunk size for the layouts repacked eight rows at a time (x8). AMD
# EPYC Zen 5, 2 threads, ms, integer / pre-fill kernel, 128 rows, benchmarks/prefill_matmul.py:
# the default model's 120 Q4_1x8 matrices 43.4 / 122.9; one matrix of each of Mistral 7B's
# shapes (--mistral-7b --format F) Q4_0x8 88.1 / 259.9, Q4_1x8 86.9 / 267.5, Q8_0x8 95.8 /
# 257.6, Q4_Kx8 90.7 / 264.7, Q5_Kx8 101.2 / 278.5, Q6_Kx8 110.2 / 275.0 (16 rows: 12.0-15.8 /
# 40.0-53.6). The GGUF-order formats and the AVX2 build (default model, 128 rows: 133.4 /
# 121.4; 7B's Q4_Kx8 275.8 / 265.3) keep PREFILL_INT_MAX_ROWS.


def integer_prefill(isa: str, rows: int, fmt: str, blas_dtype: torch.dtype) -> bool:
    """Whether a pre-fill chunk of `rows` rows against a packed matrix in `fmt` takes the
    integer kernel of the `isa` build (else the pre-fill kernel, or a bfloat16 BLAS matmul when
    blas_dtype asks for it)."""
    if rows <= PREFILL_INT_MAX_ROWS:
        return True
    return blas_dtype == torch.float32 and isa != "avx2" and fmt in BASE


CSRC = Path(__file__).parent / "csrc"
KERNEL_FILES = [CSRC / name for name in ("kernels.h", "qmatmul.cpp", "prefill.cpp", "decode.cpp",
                                        "bindings.cpp")]
# Auto-vectorised loops stay 256 bits wide in every build (the intrinsics are), so an AVX-512
# build differs from the AVX2 one only where kernels.h asks for VNNI.
KERNEL_CFLAGS = ["-O3", "-mavx2", "-mfma", "-mf16c", "-mprefer-vector-width=256", "-fopenmp"]
KERNEL_LDFLAGS = ["-fopenmp"]

# The instruction-set levels the kernels are built for, best first: (name, extra compiler
# flags, the /proc/cpuinfo flags the CPU must have). Each level is its own build (its own
# cached folder); integer dot products are exact, so every level gives the same numbers.
ISA_LEVELS = [
    ("avx512vnni", ["-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512vnni"],
     {"avx512f", "avx512bw", "avx512vl", "avx512_vnni"}),
    ("avxvnni", ["-mavxvnni"], {"avx_vnni"}),
    ("avx2", [], set()),
]

_lock = threading.Lock()
_extension: ModuleType | None = None         # what extension() returns
_extensions: dict[str, ModuleType | None] = {}   # every level built so far
_tried = False


def _cpu_has_avx2() -> bool:
    return torch.backends.cpu.get_cpu_capability() in ("AVX2", "AVX512")


def cpu_flags() -> set[str]:
    """The CPU's feature flags as Linux names them (empty where /proc/cpuinfo is absent)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def supported_isas(flags: set[str] | None = None) -> list[str]:
    """The ISA levels this CPU can run, best first (always ends with "avx2")."""
    flags = cpu_flags() if flags is None else flags
    return [name for name, _, needs in ISA_LEVELS if needs <= flags]


def chosen_isa(flags: set[str] | None = None) -> str:
    """The level extension() builds: MISTRAL7B_ISA when set and supported, else the best the CPU
    has. An unknown or unsupported MISTRAL7B_ISA is an error naming the choices."""
    supported = supported_isas(flags)
    wanted = os.environ.get("MISTRAL7B_ISA", "").lower()
    if not wanted:
        return supported[0]
    names = [name for name, _, _ in ISA_LEVELS]
    if wanted not in names:
        raise ConfigError(f"MISTRAL7B_ISA={wanted!r} is not one of {', '.join(names)}")
    if wanted not in supported:
        raise ConfigError(f"MISTRAL7B_ISA={wanted}: this CPU lacks it (it has "
                         f"{', '.join(supported)})")
    return wanted


def extension() -> ModuleType | None:
    """The compiled kernels for the chosen ISA level, building them on first use; None when
    unavailable."""
    global _extension, _tried
    if _tried:
        return _extension
    with _lock:
        if _tried:
            return _extension
        if os.environ.get("MISTRAL7B_KERNELS", "").lower() == "torch":
            log.info("MISTRAL7B_KERNELS=torch: using the portable PyTorch kernels")
        elif not _cpu_has_avx2():
            log.warning("this CPU has no AVX2: using the portable (slower) PyTorch kernels")
        else:
            # The chosen level, else (a compiler without its flags) the next one down; a level
            # that MISTRAL7B_ISA names explicitly gets no substitute.
            flags = cpu_flags()
            isa, supported = chosen_isa(flags), supported_isas(flags)
            levels = [isa] if os.environ.get("MISTRAL7B_ISA") else supported[supported.index(isa):]
            for level in levels:
                _extension = _build(level)
                if _extension is not None:
                    break
            if _extension is None:
                log.warning("using the portable (slower) PyTorch kernels")
            if _extension is not None and os.environ.get("MISTRAL7B_PREFETCH_BYTES"):
                _extension.set_prefetch_bytes(int(os.environ["MISTRAL7B_PREFETCH_BYTES"]))
        _tried = True  # not on Ctrl-C during the build: the next call tries again
    return _extension


def extension_for(isa: str) -> ModuleType | None:
    """The kernels built for one ISA level (tests compare levels); None if it does not build.
    The caller checks that the CPU supports it."""
    with _lock:
        return _build(isa)


def isa_cflags(isa: str) -> list[str]:
    """The compiler flags of one ISA level's build (ValueError for an unknown level)."""
    for name, flags, _ in ISA_LEVELS:
        if name == isa:
            return KERNEL_CFLAGS + flags
    raise ValueError(f"unknown ISA level {isa!r}: one of "
                     f"{', '.join(name for name, _, _ in ISA_LEVELS)}")


def _build(isa: str) -> ModuleType | None:
    if isa in _extensions:
        return _extensions[isa]
    try:
        ext = build_extension("mistral7b_kernels", KERNEL_FILES, isa_cflags(isa),
                              KERNEL_LDFLAGS, announce=f"compiling the CPU kernels for {isa} "
                              "(first use; about 30 s)...")
    except Exception as e:  # a missing compiler or headers: run, slower, rather than fail
        log.warning("could not build the %s kernels (%s)", isa, e)
        ext = None
    _extensions[isa] = ext
    return ext


def dequantize_rows(raw: torch.Tensor, fmt: str) -> torch.Tensor:
    """(N, row_bytes) uint8 -> (N, K) float32."""
    ext = extension() if fmt in FAST_FORMATS and raw.device.type == "cpu" else None
    if ext is not None:
        return ext.dequantize(raw, FORMATS[fmt].ggml_type)
    return dequantize(raw, fmt)


def linear(x: torch.Tensor, raw: torch.Tensor, fmt: str,
           blas_dtype: torch.dtype = torch.float32, decode: bool = False) -> torch.Tensor:
    """x (M, K) float32 @ W.T for W stored as (N, row_bytes) blocks of `fmt`; (M, N) float32.

    decode: x holds one token per sequence (a decode step), so the integer kernel runs whatever
    M is; a pre-fill chunk takes it where integer_prefill says. blas_dtype: bfloat16 makes
    pre-fill chunks of more than PREFILL_INT_MAX_ROWS rows dequantize the weight and run a
    bfloat16 BLAS matmul, ~2.5x faster on CPUs with AVX512-BF16 or AMX, at a cost in accuracy
    (see README)."""
    ext = extension() if fmt in FAST_FORMATS and x.device.type == "cpu" else None
    if ext is not None and (decode or integer_prefill(ext.isa, x.shape[0], fmt,
                                                     blas_dtype)):
        return ext.qmatmul(x, raw, FORMATS[fmt].ggml_type)
    if ext is not None and blas_dtype == torch.float32:
        return ext.prefill_matmul(x, raw, FORMATS[fmt].ggml_type)
    weight = dequantize_rows(raw, fmt)
    if blas_dtype == torch.float32:
        return F.linear(x, weight)
    return F.linear(x.to(blas_dtype), weight.to(blas_dtype)).float()
