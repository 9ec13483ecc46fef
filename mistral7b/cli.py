"""The `mistral7b` command: one dispatcher over the subcommands.

A user mistake (wrong path, corrupt file, bad option value) prints one line starting with
"mistral7b: error:" and exits with status 2; no traceback.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable, Sequence

from mistral7b.errors import Mistral7BError


def _add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", "-m", required=True,
                   help="model directory (Mistral native or Hugging Face)")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"],
                   help="weight and activation dtype (default: float32)")
    p.add_argument("--device", default="cpu", help="torch device, e.g. cpu or cuda (default: cpu)")


def _add_sampling_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("sampling")
    g.add_argument("--max-tokens", "-n", type=int, default=256, help="tokens to generate")
    g.add_argument("--temperature", "-t", type=float, default=0.7, help="0 = greedy")
    g.add_argument("--top-k", type=int, default=0, help="keep the k most likely tokens (0 = off)")
    g.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass")
    g.add_argument("--min-p", type=float, default=0.0, help="drop tokens below min_p * max prob")
    g.add_argument("--repetition-penalty", type=float, default=1.0)
    g.add_argument("--presence-penalty", type=float, default=0.0)
    g.add_argument("--frequency-penalty", type=float, default=0.0)
    g.add_argument("--seed", type=int, default=None)
    g.add_argument("--stop", action="append", default=[], metavar="TEXT",
                   help="stop string (repeatable)")
    g.add_argument("--ignore-eos", action="store_true", help="keep generating past EOS")
    g.add_argument("--chunk-size", type=int, default=None,
                   help="pre-fill chunk size (default: the sliding window)")


def _sampling_params(args: argparse.Namespace) -> object:
    from mistral7b.sampling import SamplingParams

    return SamplingParams(
        max_tokens=args.max_tokens, temperature=args.temperature, top_k=args.top_k,
        top_p=args.top_p, min_p=args.min_p, repetition_penalty=args.repetition_penalty,
        presence_penalty=args.presence_penalty, frequency_penalty=args.frequency_penalty,
        seed=args.seed, stop=tuple(args.stop), ignore_eos=args.ignore_eos)


def cmd_generate(args: argparse.Namespace) -> int:
    import mistral7b

    params = _sampling_params(args)
    prompt = args.prompt if args.prompt is not None else sys.stdin.read()
    llm = mistral7b.load(args.model, dtype=args.dtype, device=args.device)
    start = time.perf_counter()
    first: float | None = None
    n = 0
    sys.stdout.write(prompt if args.echo else "")
    for piece in llm.stream_generate(prompt, params, chunk_size=args.chunk_size):  # type: ignore[arg-type]
        if first is None:
            first = time.perf_counter()
        n += len(piece.token_ids)
        sys.stdout.write(piece.text)
        sys.stdout.flush()
    sys.stdout.write("\n")
    if args.stats and first is not None:
        decode = time.perf_counter() - first
        print(f"[{n} tokens; first token after {first - start:.2f} s; "
              f"decode {(n - 1) / decode if decode > 0 and n > 1 else 0:.1f} tokens/s]",
              file=sys.stderr)
    return 0


def cmd_info(args: argparse.Namespace) -> int:
    import mistral7b

    llm = mistral7b.load(args.model, dtype=args.dtype, device=args.device, progress=False)
    cfg = llm.config
    weight_bytes = sum(p.nbytes for p in llm.model.parameters())
    per_token = cfg.kv_bytes_per_token(llm.dtype.itemsize)
    window = cfg.sliding_window
    rows = [
        ("path", str(llm.path)),
        ("config", cfg.source),
        ("layers", cfg.n_layers),
        ("dim / hidden_dim", f"{cfg.dim} / {cfg.hidden_dim}"),
        ("heads (query / kv)", f"{cfg.n_heads} / {cfg.n_kv_heads} (GQA group {cfg.kv_group})"),
        ("head_dim", cfg.head_dim),
        ("vocab", cfg.vocab_size),
        ("rope theta", cfg.rope_theta),
        ("sliding window", window if window else "none (full attention)"),
        ("context", f"{cfg.max_seq_len}" + (" (rolling cache: sequences may run past it)"
                                            if window else "")),
        ("tied embeddings", cfg.tie_embeddings),
        ("parameters", f"{cfg.num_parameters() / 1e6:.1f} M"),
        ("dtype / device", f"{str(llm.dtype).removeprefix('torch.')} / {llm.device}"),
        ("weights in memory", f"{weight_bytes / 2**20:.1f} MiB"),
        ("kv cache", f"{per_token / 1024:.1f} KiB per token, "
                     f"{per_token * cfg.cache_size / 2**20:.1f} MiB per sequence at "
                     f"{cfg.cache_size} slots"),
        ("tokenizer", llm.tokenizer.name),
    ]
    width = max(len(k) for k, _ in rows)
    for key, value in rows:
        print(f"{key:<{width}}  {value}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mistral7b", description="Run Mistral-family models.")
    sub = parser.add_subparsers(dest="command", required=True)

    gen = sub.add_parser("generate", help="complete a prompt, streaming to stdout")
    _add_model_args(gen)
    gen.add_argument("--prompt", "-p", default=None, help="prompt text (default: read stdin)")
    gen.add_argument("--echo", action="store_true", help="print the prompt before the answer")
    gen.add_argument("--stats", action="store_true", help="print timing to stderr")
    _add_sampling_args(gen)
    gen.set_defaults(func=cmd_generate)

    info = sub.add_parser("info", help="describe a model: architecture, window, size, tokenizer")
    _add_model_args(info)
    info.set_defaults(func=cmd_info)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    func: Callable[[argparse.Namespace], int] = args.func
    try:
        return func(args)
    except Mistral7BError as e:
        print(f"mistral7b: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("\nmistral7b: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        return 0
