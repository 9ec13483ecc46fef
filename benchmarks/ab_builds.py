"""Two builds of the C++ kernels on the same model, timed in one process, alternating.

    .venv/bin/python benchmarks/ab_builds.py --old HEAD~1          # that commit's csrc/ vs now
    .venv/bin/python benchmarks/ab_builds.py --isa avx2,avx512vnni  # two ISA levels of csrc/
    .venv/bin/python benchmarks/ab_builds.py --old HEAD~1 --rounds 6 --decode 1,4,16 --prefill 128

Why one process: on the shared VMs this project is measured on, the same code timed in two
processes differed by 5-8% from run to run, more than most kernel changes. Here both builds'
extensions are loaded side by side, each drives its own copy of the model, and every round
times each side once, the order alternating. Two copies of one model in one process still
differed by up to ~4% by load order (BENCHMARKS.md), so trust only differences above that.

Only the extension differs between the sides: the Python code, and so the weights' repacked
layout (quant/formats.py), are the working tree's. An --old commit whose C++ expects another
layout gives other logits; the script reports the largest logit difference between the sides
(0.0 means bit-identical) so that such a comparison is not mistaken for a speed-up.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path
from types import ModuleType
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import mistral7b
from mistral7b.bench import time_decode, time_prefill
from mistral7b.quant import kernels
from mistral7b.quant.build import build_extension

ROOT = Path(__file__).resolve().parents[1]


def build_old(rev: str, isa: str, workdir: Path) -> ModuleType:
    """The kernels of commit `rev` (its csrc/ files), built under another module name. Builds
    whose DecodeModel binding is not module_local (before the ISA levels) get the class renamed,
    or pybind11 would refuse to register it twice."""
    files = []
    for path in kernels.KERNEL_FILES:
        rel = path.relative_to(ROOT).as_posix()
        try:
            text = subprocess.run(["git", "show", f"{rev}:{rel}"], cwd=ROOT, check=True,
                                  capture_output=True, text=True).stdout
        except subprocess.CalledProcessError as e:
            raise SystemExit(f"cannot read {rel} at {rev}: {e.stderr.strip()}") from None
        files.append((path.name, text))
    renamed = "module_local" not in dict(files)["bindings.cpp"]
    out = []
    for name, text in files:
        if renamed:
            text = text.replace("DecodeModel", "DecodeModelOld")
        (workdir / name).write_text(text)
        out.append(workdir / name)
    try:
        cflags = kernels.isa_cflags(isa)
    except ValueError as e:
        raise SystemExit(str(e)) from None
    ext = build_extension("mistral7b_kernels_ab", out, cflags, kernels.KERNEL_LDFLAGS,
                          announce=f"compiling {rev}'s kernels ({isa}) for the comparison...")
    if renamed:
        setattr(ext, "DecodeModel", ext.DecodeModelOld)  # noqa: B010 (a module's attribute)
    if not hasattr(ext, "isa"):         # built before the ISA levels: the working tree's
        setattr(ext, "isa", isa)        # noqa: B010 (Python routes matmuls as for this level)
    return ext


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--old", help="a commit whose csrc/ is side A (side B: the working tree)")
    parser.add_argument("--isa", help="A,B: two ISA levels of the working tree's csrc/; with "
                        "--old, one level for both sides (default: the CPU's best)")
    parser.add_argument("--model", type=Path, help="a GGUF (default: the embedded model)")
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--decode", default="1,16", help="decode batch sizes (tg)")
    parser.add_argument("--tokens", type=int, default=128, help="tokens per decode test")
    parser.add_argument("--prefill", default="128", help="prompt lengths (pp); empty: none")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    if kernels.extension() is None:
        raise SystemExit("the C++ kernels are not available on this machine")
    best = kernels.supported_isas()[0]
    sides: dict[str, ModuleType] = {}
    with tempfile.TemporaryDirectory() as tmp:
        if args.old:
            isa = args.isa or best
            sides[f"{args.old} ({isa})"] = build_old(args.old, isa, Path(tmp))
            sides[f"working tree ({isa})"] = _level(isa)
        else:
            levels = (args.isa or f"avx2,{best}").split(",")
            if len(levels) != 2:
                raise SystemExit("--isa takes two levels, e.g. avx2,avx512vnni")
            for isa in levels:
                sides[isa] = _level(isa)
    results = compare(sides, args)
    if args.json:
        print(json.dumps(results, indent=2))
    else:
        print(table(results))


def _level(isa: str) -> ModuleType:
    supported = kernels.supported_isas()
    if isa not in supported:
        raise SystemExit(f"this CPU cannot run {isa} (it has {', '.join(supported)})")
    ext = kernels.extension_for(isa)
    if ext is None:
        raise SystemExit(f"the {isa} kernels did not build")
    return ext


def use(ext: ModuleType) -> None:
    """Route every packed matmul (and decode steps built from now on) through `ext`."""
    kernels._extension, kernels._tried = ext, True


def compare(sides: dict[str, ModuleType], args: argparse.Namespace) -> dict[str, Any]:
    models = {}
    for name, ext in sides.items():
        use(ext)
        models[name] = mistral7b.load(args.model, progress=False)
        time_decode(models[name], 2, 0, 1)               # builds its C++ decode step on ext
    # 16 tokens: at most PREFILL_INT_MAX_ROWS, so both sides run the integer kernel whatever
    # their level (longer chunks take the float32 pre-fill kernel on AVX2, the integer one with
    # VNNI, which differ by ~0.01-0.07 in the logits)
    ids = list(range(1, 1 + kernels.PREFILL_INT_MAX_ROWS))
    logits = []
    for name, ext in sides.items():
        use(ext)
        logits.append(models[name].logits(ids))
    tests = [(f"tg{args.tokens} x{b}", int(b)) for b in args.decode.split(",") if b]
    tests += [(f"pp{p}", -int(p)) for p in args.prefill.split(",") if p]
    times: dict[str, dict[str, list[float]]] = {name: {t: [] for t, _ in tests} for name in sides}
    names = list(sides)
    for r in range(args.rounds):
        for name in names if r % 2 == 0 else names[::-1]:
            use(sides[name])
            for test, size in tests:
                times[name][test].append(
                    time_decode(models[name], args.tokens, 0, size) if size > 0
                    else time_prefill(models[name], -size, 0))
    return {"model": str(models[names[0]].path), "rounds": args.rounds,
            "max_logit_difference": (logits[0] - logits[1]).abs().max().item(),
            "tokens_per_s": times}


def table(results: dict[str, Any]) -> str:
    times = results["tokens_per_s"]
    (a, ta), (b, tb) = times.items()
    lines = [f"{results['model']}, {results['rounds']} alternating rounds, tokens/s (median; "
             f"every round); largest logit difference between the sides: "
             f"{results['max_logit_difference']:.3g}", "",
             f"| test | {a} | {b} | B / A |", "|---|---:|---:|---:|"]
    for test in ta:
        ma, mb = statistics.median(ta[test]), statistics.median(tb[test])
        rounds_a = ", ".join(f"{v:.1f}" for v in ta[test])
        rounds_b = ", ".join(f"{v:.1f}" for v in tb[test])
        lines.append(f"| {test} | {ma:.1f} ({rounds_a}) | {mb:.1f} ({rounds_b}) | "
                     f"{mb / ma:.3f} |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
