"""The `mistral7b` command: one dispatcher over the subcommands.

A user mistake (wrong path, corrupt file, bad option value, a device that is not there) prints
one line starting with "mistral7b: error:" and exits with status 2; no traceback. Text from the
command line and stdin goes through text.clean_text / clean_bytes first, so bytes that are not
UTF-8 become U+FFFD instead of a UnicodeError.
"""

from __future__ import annotations

import argparse
import io
import json
import logging
import os
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING

from mistral7b import __version__
from mistral7b.errors import ContextLengthError, InvalidArgumentError, Mistral7BError
from mistral7b.text import clean_bytes, clean_text

if TYPE_CHECKING:
    from mistral7b.constrained import ResponseFormat
    from mistral7b.generate import StreamPiece
    from mistral7b.llm import LLM
    from mistral7b.sampling import SamplingParams

API_KEY_ENV = "MISTRAL7B_API_KEY"     # serve's --api-key from the environment, hidden from `ps`


def _add_model_args(p: argparse.ArgumentParser, threads: bool = True) -> None:
    p.add_argument("--model", "-m", default=None,
                   help="a .gguf file, or a Mistral native or Hugging Face directory "
                        "(default: the embedded SmolLM2-135M-Instruct Q4_1)")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"],
                   help="weight and activation dtype (default: float32)")
    p.add_argument("--device", default="cpu", help="torch device, e.g. cpu or cuda (default: cpu)")
    p.add_argument("--quantize", choices=["q8_0", "q4_0", "q4_1"], default=None,
                   help="pack a float checkpoint's linear weights into this GGUF block format "
                        "at load (fast CPU kernels, 4-7x less memory than fp32)")
    p.add_argument("--sliding-window", type=int, default=None, metavar="N",
                   help="override the attention window (0 = full attention; default: the "
                        "checkpoint's, 4096 for Mistral 7B v0.1 GGUFs)")
    p.add_argument("--kv-cache-dtype", default=None, choices=["float32", "bfloat16", "float16"],
                   help="dtype of the rolling KV cache (default: --dtype); float16 halves its "
                        "memory and what attention reads per token")
    p.add_argument("--prefill-dtype", default="float32", choices=["float32", "bfloat16"],
                   help="matmul dtype of quantized weights during pre-fill; bfloat16 is ~2.5x "
                        "faster on CPUs with AVX512-BF16/AMX but less exact (default: float32)")
    p.add_argument("--compile", action="store_true",
                   help="on a GPU, torch.compile the decode steps before capturing them as "
                        "CUDA graphs (compiles for a minute or more; off by default)")
    if threads:   # bench has its own -t/--threads list
        p.add_argument("--threads", "-t", type=int, default=torch_threads(), metavar="N",
                       help="CPU threads (default: all cores, here %(default)s)")


def _check_device(args: argparse.Namespace) -> None:
    """Fail with one line naming the devices that exist before a command waits on stdin or
    starts a server (load() checks it too)."""
    from mistral7b.device import resolve_device

    resolve_device(args.device)


def _set_threads(args: argparse.Namespace) -> None:
    threads = getattr(args, "threads", None)
    if isinstance(threads, int):
        if threads < 1:
            raise InvalidArgumentError(f"--threads must be >= 1 (got {threads})")
        torch_set_threads(threads)


def _load(args: argparse.Namespace, progress: bool = True) -> LLM:
    """The model; started by torchrun with several processes, split over them (on ranks
    other than 0 this never returns: they follow rank 0 and exit with it)."""
    import mistral7b
    from mistral7b.tensor_parallel import world_from_env

    _set_threads(args)                  # load() checks the device before anything else
    return mistral7b.load(args.model, dtype=args.dtype, device=args.device, progress=progress,
                          sliding_window=args.sliding_window,
                          dequantize=getattr(args, "dequantize", False), quantize=args.quantize,
                          prefill_dtype=args.prefill_dtype, kv_cache_dtype=args.kv_cache_dtype,
                          compile=getattr(args, "compile", False),
                          tensor_parallel=world_from_env() > 1)


def torch_set_threads(n: int) -> None:
    import torch

    torch.set_num_threads(n)


def torch_threads() -> int:
    import os

    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (
        os.cpu_count() or 1)


def _add_safety_args(p: argparse.ArgumentParser, moderation: bool = True) -> None:
    g = p.add_argument_group("guardrails (paper section 5)")
    g.add_argument("--safe-prompt", action="store_true",
                   help="put the paper's guardrail prompt in front (as the system prompt of a "
                        "chat, before the text of a completion)")
    if moderation:
        g.add_argument("--moderate", choices=["input", "output", "both"], default=None,
                       help="self-reflection moderation: classify the user's message, the "
                            "answer (shown only once judged whole), or both, and refuse "
                            "flagged ones")


def _add_sampling_args(p: argparse.ArgumentParser, max_tokens: int = 256) -> None:
    g = p.add_argument_group("sampling")
    g.add_argument("--max-tokens", "-n", type=int, default=max_tokens,
                   help=f"tokens to generate at most (default: {max_tokens})")
    g.add_argument("--temperature", "--temp", type=float, default=0.7,
                   help="0 = greedy (default: 0.7)")
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
    g = p.add_argument_group("structured output (an answer cut by --max-tokens may not parse)")
    shape = g.add_mutually_exclusive_group()
    shape.add_argument("--json", action="store_true", help="answer with a JSON object")
    shape.add_argument("--json-schema", metavar="FILE", type=Path,
                       help="answer with JSON that follows this JSON schema")
    shape.add_argument("--grammar", metavar="FILE", type=Path,
                       help="answer in this Lark grammar (llguidance's dialect; /regex/ "
                            "terminals allowed)")
    g = p.add_argument_group("pre-fill")
    g.add_argument("--chunk-size", type=int, default=None,
                   help="pre-fill chunk size (default: the sliding window)")


def _sampling_params(args: argparse.Namespace) -> SamplingParams:
    from mistral7b.sampling import SamplingParams

    return SamplingParams(
        max_tokens=args.max_tokens, temperature=args.temperature, top_k=args.top_k,
        top_p=args.top_p, min_p=args.min_p, repetition_penalty=args.repetition_penalty,
        presence_penalty=args.presence_penalty, frequency_penalty=args.frequency_penalty,
        seed=args.seed, stop=tuple(clean_text(s) for s in args.stop), ignore_eos=args.ignore_eos,
        response_format=_response_format(args))


def _response_format(args: argparse.Namespace) -> ResponseFormat | None:
    from mistral7b.constrained import ResponseFormat

    if getattr(args, "json", False):
        return ResponseFormat.json_object()
    for flag, path in (("--json-schema", getattr(args, "json_schema", None)),
                       ("--grammar", getattr(args, "grammar", None))):
        if path is None:
            continue
        try:
            text = path.read_text(encoding="utf-8")
        except OSError as e:
            raise InvalidArgumentError(f"{flag} {path}: {e.strerror or e}") from None
        except UnicodeDecodeError:
            raise InvalidArgumentError(f"{flag} {path}: not UTF-8 text") from None
        origin = f"{flag} {path}"
        return (ResponseFormat.json_schema(text, origin) if flag == "--json-schema"
                else ResponseFormat.lark(text, origin))
    return None


def _report_length(finish_reason: str | None, max_tokens: int) -> None:
    """Say on stderr (stdout keeps only the text) that an answer was cut off by --max-tokens."""
    if finish_reason == "length":
        print(f"[stopped: --max-tokens {max_tokens} reached]", file=sys.stderr, flush=True)


def _stream_to_stdout(pieces: Iterator[StreamPiece], stats: bool, max_tokens: int
                      ) -> tuple[str, bool]:
    """Print pieces as they come; Ctrl-C stops the answer (not the program). Returns the text
    printed and whether it was interrupted."""
    start = time.perf_counter()
    first: float | None = None
    n = 0
    text = []
    interrupted = False
    finish_reason: str | None = None
    try:
        for piece in pieces:
            if first is None:
                first = time.perf_counter()
            n += len(piece.token_ids)
            text.append(piece.text)
            finish_reason = piece.finish_reason or finish_reason
            sys.stdout.write(piece.text)
            sys.stdout.flush()
    except KeyboardInterrupt:
        interrupted = True
        sys.stdout.write(" [interrupted]")
    sys.stdout.write("\n")
    sys.stdout.flush()
    _report_length(finish_reason, max_tokens)
    if stats and first is not None:
        decode = time.perf_counter() - first
        print(f"[{n} tokens; first token after {first - start:.2f} s; "
              f"decode {(n - 1) / decode if decode > 0 and n > 1 else 0:.1f} tokens/s]",
              file=sys.stderr)
    return "".join(text), interrupted


STDIN_HINT = "mistral7b: reading the prompt from stdin (finish with Ctrl-D)"


def cmd_generate(args: argparse.Namespace) -> int:
    params = _sampling_params(args)
    _check_device(args)
    if args.prompt is not None:
        prompt = clean_text(args.prompt)
    else:
        if sys.stdin.isatty():
            print(STDIN_HINT, file=sys.stderr, flush=True)
        prompt = clean_bytes(sys.stdin.buffer.read())
    llm = _load(args)
    sys.stdout.write(prompt if args.echo else "")
    _, interrupted = _stream_to_stdout(
        llm.stream_generate(prompt, params, chunk_size=args.chunk_size,
                            safe_prompt=args.safe_prompt), args.stats, params.max_tokens)
    return 130 if interrupted else 0


CHAT_HELP = "commands: /help (this list), /reset (forget the conversation), /system TEXT (set " \
            "the system prompt and start over), /exit (or Ctrl-D); Ctrl-C stops an answer"


def _line_editing() -> None:
    """Arrow keys, editing and history for input() at a terminal (readline is missing on some
    platforms, e.g. Windows: then input() works without them)."""
    if sys.stdin.isatty():
        try:
            import readline  # noqa: F401  (importing it is what turns it on for input())
        except ImportError:
            pass


def cmd_chat(args: argparse.Namespace) -> int:
    from mistral7b.generate import check_prompt
    from mistral7b.guardrails.moderation import refusal_message
    from mistral7b.guardrails.safety import with_safety_prompt

    params = _sampling_params(args)
    one_shot = clean_text(args.prompt) if args.prompt is not None else None
    if one_shot is not None and not one_shot.strip():
        raise InvalidArgumentError("--prompt: empty (no message to answer)")
    llm = _load(args)
    system = clean_text(args.system) if args.system is not None else None
    history: list[dict[str, str]] = []

    check_input = args.moderate in ("input", "both")
    check_output = args.moderate in ("output", "both")

    def answer(user: str) -> None:
        """Answer `user`; a ContextLengthError means the conversation no longer fits."""
        messages = ([{"role": "system", "content": system}] if system else []) + history
        messages.append({"role": "user", "content": user})
        if args.safe_prompt:
            messages = with_safety_prompt(messages)
        prompt = llm.tokenizer.encode_chat(messages)
        check_prompt(llm.config, prompt, params.max_tokens)
        verdict = llm.moderate(user, "user") if check_input else None
        if verdict is not None and verdict.flagged:
            text = refusal_message(verdict)
            print(text)
        elif check_output:   # the answer is judged whole before it is shown
            result = llm.generate(prompt, params, chunk_size=args.chunk_size)
            text = result.text
            verdict = llm.moderate(text, "assistant") if text.strip() else None
            if verdict is not None and verdict.flagged:
                text = refusal_message(verdict)
            print(text)
            if verdict is None or not verdict.flagged:
                _report_length(result.finish_reason, params.max_tokens)
        else:
            text, _ = _stream_to_stdout(
                llm.stream_generate(prompt, params, chunk_size=args.chunk_size), args.stats,
                params.max_tokens)
        history.extend([{"role": "user", "content": user}, {"role": "assistant", "content": text}])

    if one_shot is not None:
        answer(one_shot)    # errors, a prompt too long included, are one line and status 2
        return 0

    # Lines that are not UTF-8 arrive as surrogate escapes, and clean_text makes them U+FFFD.
    if isinstance(sys.stdin, io.TextIOWrapper):
        sys.stdin.reconfigure(errors="surrogateescape")
    _line_editing()
    print(f"Chatting with {llm.path.name if llm.path else 'the model'}. {CHAT_HELP}",
          file=sys.stderr)
    while True:
        try:
            line = input("> ")
        except EOFError:
            print(file=sys.stderr)
            return 0
        except KeyboardInterrupt:
            print("\n(Ctrl-D or /exit to quit)", file=sys.stderr)
            continue
        line = clean_text(line).strip()
        if not line:
            continue
        if line in ("/exit", "/quit"):
            return 0
        if line == "/help":
            print(CHAT_HELP, file=sys.stderr)
        elif line == "/reset":
            history.clear()
            print("(conversation cleared)", file=sys.stderr)
        elif line.startswith("/system"):
            system = line.removeprefix("/system").strip() or None
            history.clear()
            print(f"(system prompt {'set' if system else 'removed'}; conversation cleared)",
                  file=sys.stderr)
        elif line.startswith("/"):
            print(f"unknown command {line.split()[0]}; {CHAT_HELP}", file=sys.stderr)
        else:
            try:
                answer(line)
            except ContextLengthError as e:
                print(f"mistral7b: the conversation no longer fits: {e}. Use /reset to start "
                      "over.", file=sys.stderr)
            except Mistral7BError as e:
                print(f"mistral7b: error: {e}", file=sys.stderr)


def cmd_info(args: argparse.Namespace) -> int:
    llm = _load(args, progress=False)
    cfg = llm.config
    weight_bytes = sum(t.nbytes for t in [*llm.model.parameters(), *llm.model.buffers()])
    per_token = cfg.kv_bytes_per_token(llm.cache_dtype.itemsize)
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


def _int_list(text: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}"
                                         ) from None
    if not values or any(v < 0 for v in values):
        raise argparse.ArgumentTypeError(f"expected non-negative integers, got {text!r}")
    return values


def cmd_bench(args: argparse.Namespace) -> int:
    from mistral7b import bench

    if args.long:
        if args.threads:
            torch_set_threads(args.threads[0])
        window = args.sliding_window or 4096
        rows = bench.run_long(args.contexts or bench.LONG_CONTEXTS, n=args.n_gen[0] or 16,
                              window=window, progress=None if args.json else
                              lambda line: print(line, file=sys.stderr))
        if args.plot:
            bench.long_plot(rows, Path(args.plot), window)
        if args.json:
            from dataclasses import asdict

            print(json.dumps([asdict(r) for r in rows], indent=2))
        else:
            print(bench.long_report(rows, window))
        return 0
    start = time.perf_counter()
    llm = _load(args, progress=not args.json)
    load_s = time.perf_counter() - start
    if any(t < 1 for t in args.threads) or any(b < 1 for b in args.batch) or args.repetitions < 1:
        raise InvalidArgumentError("--threads, --batch and --repetitions must be >= 1")
    results = bench.run(llm, [n for n in args.n_prompt if n], [n for n in args.n_gen if n],
                        args.depth, args.batch, args.threads, args.repetitions)
    print(bench.report(llm, results, load_s, args.json))
    return 0


def cmd_moderate(args: argparse.Namespace) -> int:
    from mistral7b.guardrails import evaluation
    from mistral7b.guardrails.moderation import moderate

    if args.threshold is not None and not 0.0 <= args.threshold <= 1.0:
        raise InvalidArgumentError(f"--threshold must be in [0, 1] (got {args.threshold})")
    if args.eval:
        if args.text or args.file:
            raise InvalidArgumentError("--eval runs on the evaluation set: give no TEXT or --file")
        items = evaluation.load_eval_set(Path(args.eval_file) if args.eval_file else None)
        if args.limit is not None:
            if args.limit < 1:
                raise InvalidArgumentError(f"--limit must be >= 1 (got {args.limit})")
            items = evaluation.balanced_sample(items, args.limit)
        llm = _load(args, progress=False)

        def progress(done: int, total: int) -> None:
            print(f"\r  {done}/{total}", end="", file=sys.stderr, flush=True)

        print(f"moderating {len(items)} prompts...", file=sys.stderr)
        report, _ = evaluation.evaluate(llm, items, args.threshold, progress)
        print(file=sys.stderr)
        if args.answers:
            bad = [i for i in items if i.label != "acceptable"]
            print(f"answering the {len(bad)} unacceptable prompts without and with the safety "
                  "prompt, then moderating the answers...", file=sys.stderr)
            report.refusal = evaluation.refusal_rates(llm, bad, args.max_tokens, args.threshold,
                                                      progress=progress)
            report.answers_judged = len(bad)
            print(file=sys.stderr)
        if args.plot:
            name = llm.path.name if llm.path else "model"
            evaluation.plot_sweep(report, Path(args.plot), f"self-moderation, {name}, "
                                                           f"{report.n} prompts")
        print(json.dumps(report.to_dict(), indent=2) if args.json else report.table())
        return 0
    texts = [clean_text(t) for t in args.text]
    if args.file:
        if args.file == "-":
            lines = clean_bytes(sys.stdin.buffer.read()).splitlines()
        else:
            path = Path(args.file)
            if not path.is_file():
                raise InvalidArgumentError(f"--file {args.file}: no such file")
            lines = path.read_text(encoding="utf-8", errors="replace").splitlines()
        texts += [line for line in lines if line.strip()]
    if not texts:
        raise InvalidArgumentError("nothing to moderate: give TEXT, --file FILE (one text per "
                                   "line, - for stdin) or --eval")
    llm = _load(args, progress=False)
    for result in moderate(llm, texts, args.role, args.threshold):
        print(json.dumps(result.to_dict(), ensure_ascii=False), flush=True)
    return 0


def read_text_file(name: str, what: str) -> str:
    """A UTF-8 text file (- for stdin), or an error naming it and what is wrong."""
    if name == "-":
        data = sys.stdin.buffer.read()
    else:
        path = Path(name)
        if not path.is_file():
            raise InvalidArgumentError(f"{what} {name}: no such file")
        data = path.read_bytes()
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise InvalidArgumentError(f"{what} {name}: not UTF-8 text (byte {e.start} is "
                                   f"0x{data[e.start]:02x})") from None
    if not text.strip():
        raise InvalidArgumentError(f"{what} {name}: empty")
    return text


def cmd_perplexity(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from mistral7b.perplexity import perplexity

    for flag, value in (("--context", args.context), ("--stride", args.stride),
                        ("--batch", args.batch)):
        if value is not None and value < 1:
            raise InvalidArgumentError(f"{flag} must be >= 1 (got {value})")
    text = read_text_file(args.file, "FILE")
    llm = _load(args, progress=not args.json)
    with tqdm(desc="scoring windows", unit="window", file=sys.stderr, leave=False) as bar:
        def progress(done: int, total: int) -> None:
            bar.total = total
            bar.update(done - bar.n)

        result = perplexity(llm, text, args.context, args.stride, args.batch, progress)
    if args.json:
        print(json.dumps(asdict(result), indent=2))
    else:
        print(f"{result.tokens} tokens ({result.bytes} bytes), {result.windows} windows of "
              f"{result.context} tokens every {result.stride}\n"
              f"mean NLL {result.mean_nll:.4f} nats/token, perplexity "
              f"{result.perplexity:.3f}, {result.bits_per_byte:.4f} bits per byte")
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    """lm-evaluation-harness tasks on the model (lm_eval_model.py)."""
    names = [t.strip() for t in args.tasks.split(",") if t.strip()]
    if names == ["paper"]:
        from mistral7b.paper_table import offline_unless_hub_reachable

        offline_unless_hub_reachable()          # before the dataset libraries load
    try:
        import lm_eval
        from lm_eval.tasks import TaskManager
        from lm_eval.utils import handle_non_serializable, make_table
    except ImportError:
        raise InvalidArgumentError("mistral7b eval needs lm-eval: pip install "
                                   "'mistral7b[eval]'") from None
    from mistral7b.lm_eval_model import Mistral7BLM

    for flag, value, least in (("--limit", args.limit, 1), ("--batch-size", args.batch_size, 1),
                               ("--num-fewshot", args.num_fewshot, 0)):
        if value is not None and value < least:
            raise InvalidArgumentError(f"{flag} must be >= {least} (got {value})")
    if names == ["paper"]:
        return _eval_paper(args)
    tasks = TaskManager(include_path=args.include_path)
    known = set(tasks.all_tasks)
    unknown = [n for n in names if n not in known]
    if not names or unknown:
        raise InvalidArgumentError(f"--tasks: unknown task {unknown[0]!r} (`lm-eval ls tasks` "
                                   "lists them; --include-path DIR adds your own YAML tasks)"
                                   if unknown else "--tasks: give at least one task")
    llm = _load(args, progress=False)
    model = Mistral7BLM(llm=llm, batch_size=args.batch_size)
    results = lm_eval.simple_evaluate(model=model, tasks=names, num_fewshot=args.num_fewshot,
                                      limit=args.limit, task_manager=tasks,
                                      apply_chat_template=args.apply_chat_template)
    if results is None:
        return 0
    print(make_table(results))
    if args.output:
        Path(args.output).write_text(json.dumps(
            {k: results[k] for k in ("results", "configs", "versions", "n-shot")
             if k in results}, indent=2, default=handle_non_serializable))
    return 0


def _eval_paper(args: argparse.Namespace) -> int:
    """`eval --tasks paper`: the paper's table, measured (paper_table.py)."""
    from mistral7b.lm_eval_model import Mistral7BLM
    from mistral7b.paper_table import paper_table, run_paper

    llm = _load(args, progress=False)
    model = Mistral7BLM(llm=llm, batch_size=args.batch_size)
    rows = run_paper(model, args.limit, args.run_generated_code,
                     say=lambda line: print(f"mistral7b: {line}", file=sys.stderr, flush=True))
    name = llm.path.name if llm.path else "model"
    print(paper_table(rows, name))
    if args.output:
        Path(args.output).write_text(json.dumps(
            [{"benchmark": r.spec.benchmark, "task": r.spec.task, "shots": r.spec.shots,
              "metric": r.spec.metric, "measured": r.measured, "paper": r.spec.paper,
              "skipped": r.skipped or None} for r in rows], indent=2))
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    from mistral7b.default_model import default_model_path
    from mistral7b.server.serve import ServeOptions, serve

    if args.model is not None and not Path(args.model).exists():
        raise InvalidArgumentError(f"--model {args.model}: no such file or directory")
    _check_device(args)
    _set_threads(args)      # here too: the threads the server starts inherit it
    if os.environ.get("RANK", "0") != "0":
        _load(args, progress=False)     # under torchrun: rank 0 serves, the others follow it
        return 0
    names = [clean_text(n) for n in args.served_model_names or []] or [
        Path(args.model).name if args.model else default_model_path().name]
    api_key = args.api_key or os.environ.get(API_KEY_ENV) or None
    options = ServeOptions(host=args.host, port=args.port, api_key=api_key,
                           max_batch=args.max_batch, max_queue=args.max_queue,
                           prefill_chunk=args.prefill_chunk, drain_timeout=args.drain_timeout,
                           safe_prompt=args.safe_prompt, moderate=args.moderate,
                           served_model_names=names, max_request_bytes=args.max_request_bytes,
                           access_log=not args.quiet)
    return serve(lambda: _load(args, progress=False), options)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mistral7b", description="Run Mistral-family models.")
    parser.add_argument("--version", action="version", version=f"mistral7b {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    gen = sub.add_parser("generate", help="complete a prompt, streaming to stdout")
    _add_model_args(gen)
    gen.add_argument("--prompt", "-p", default=None,
                     help="prompt text (default: read stdin until end of file, Ctrl-D at a "
                          "terminal)")
    gen.add_argument("--echo", action="store_true", help="print the prompt before the answer")
    gen.add_argument("--stats", action="store_true", help="print timing to stderr")
    _add_safety_args(gen, moderation=False)
    _add_sampling_args(gen)
    gen.set_defaults(func=cmd_generate)

    chat = sub.add_parser("chat", help="chat with the model (interactive, or one turn with "
                                       "--prompt)")
    _add_model_args(chat)
    chat.add_argument("--prompt", "-p", default=None,
                      help="answer this one message and exit (non-interactive)")
    chat.add_argument("--system", "-s", default=None, help="system prompt")
    chat.add_argument("--stats", action="store_true", help="print timing to stderr")
    _add_safety_args(chat)
    _add_sampling_args(chat, max_tokens=512)
    chat.set_defaults(func=cmd_chat)

    bench = sub.add_parser("bench", help="prefill (pp) and decode (tg) speed, like llama-bench")
    _add_model_args(bench, threads=False)
    bench.add_argument("--dequantize", action="store_true",
                       help="expand quantized GGUF weights to --dtype (the unquantized path)")
    bench.add_argument("-p", "--n-prompt", type=_int_list, default=[128], metavar="N[,N]",
                       help="prompt sizes for pp tests (default: 128; 0 = none)")
    bench.add_argument("-n", "--n-gen", type=_int_list, default=[128], metavar="N[,N]",
                       help="tokens for tg tests (default: 128; 0 = none)")
    bench.add_argument("-d", "--depth", type=_int_list, default=[0], metavar="N[,N]",
                       help="tokens already in the cache (default: 0)")
    bench.add_argument("-b", "--batch", type=_int_list, default=[1], metavar="N[,N]",
                       help="sequences decoded together in tg tests (default: 1)")
    bench.add_argument("-t", "--threads", type=_int_list, default=[torch_threads()],
                       metavar="N[,N]", help="threads (default: all cores)")
    bench.add_argument("-r", "--repetitions", type=int, default=3,
                       help="timed runs of each test, after one warm-up (default: 3)")
    bench.add_argument("--json", action="store_true", help="print JSON instead of a table")
    bench.add_argument("--long", action="store_true",
                       help="the paper's long-context claims: KV-cache size and decode speed "
                            "from 1K to 32K tokens, sliding window (W=4096) vs full attention, "
                            "on a random model with Mistral 7B's attention shapes (no --model)")
    bench.add_argument("--contexts", type=_int_list, default=None, metavar="N[,N]",
                       help="contexts for --long (default: 1024,...,32768)")
    bench.add_argument("--plot", default=None, metavar="PNG",
                       help="with --long: also draw the table as a PNG (needs matplotlib)")
    bench.set_defaults(func=cmd_bench)

    serve = sub.add_parser("serve", help="an OpenAI-compatible HTTP server with continuous "
                                         "batching")
    _add_model_args(serve)
    serve.add_argument("--host", default="127.0.0.1", help="address to listen on "
                       "(default: 127.0.0.1; 0.0.0.0 for every interface)")
    serve.add_argument("--port", type=int, default=8000, help="(default: 8000)")
    serve.add_argument("--api-key", default=None,
                       help="require `Authorization: Bearer KEY` on /v1/*, /tokenize and "
                            f"/detokenize (default: ${API_KEY_ENV} if set, which keeps the key "
                            "out of `ps`; else none)")
    serve.add_argument("--served-model-name", "--model-name", action="append", default=None,
                       dest="served_model_names", metavar="NAME",
                       help="model id reported by /v1/models (default: the file or folder "
                            "name); repeat it to add aliases that requests may name")
    # 4 MiB, ServeOptions' default (a test checks; importing it here costs fastapi)
    serve.add_argument("--max-request-bytes", type=int, default=4 * 2**20, metavar="N",
                       help="largest request body; bigger ones get 413 (default: 4194304, 4 MiB)")
    serve.add_argument("--quiet", "-q", action="store_true",
                       help="no access log line per request")
    serve.add_argument("--max-batch", type=int, default=16,
                       help="sequences generated at once; each holds one cache row (default: 16)")
    serve.add_argument("--max-queue", type=int, default=256,
                       help="requests waiting for a free row before 429 (default: 256)")
    serve.add_argument("--prefill-chunk", type=int, default=256,
                       help="prompt tokens pre-filled per engine step, between decode steps of "
                            "the running streams (default: 256)")
    serve.add_argument("--drain-timeout", type=float, default=30.0,
                       help="on SIGTERM, seconds to let running requests finish (default: 30)")
    _add_safety_args(serve)
    serve.set_defaults(func=cmd_serve)

    mod = sub.add_parser("moderate", help="self-reflection moderation: the model labels texts "
                                          "(JSON lines), or --eval on our labeled set")
    _add_model_args(mod)
    mod.add_argument("text", nargs="*", help="texts to classify")
    mod.add_argument("--file", "-f", default=None,
                     help="classify each non-empty line of this file (- for stdin)")
    mod.add_argument("--role", choices=["user", "assistant"], default="user",
                     help="what the texts are: user prompts or assistant answers (default: user)")
    mod.add_argument("--threshold", type=float, default=None,
                     help="flag when P(acceptable) is below this (default: the most likely "
                          "label decides)")
    mod.add_argument("--eval", action="store_true",
                     help="precision/recall, confusion matrix and threshold sweep on the "
                          "evaluation set (mistral7b/guardrails/data)")
    mod.add_argument("--eval-file", default=None, help="with --eval: another JSONL set")
    mod.add_argument("--limit", type=int, default=None,
                     help="with --eval: only this many prompts, half acceptable")
    mod.add_argument("--answers", action="store_true",
                     help="with --eval: also the refusal rate of answers to the unacceptable "
                          "prompts, with and without --safe-prompt (slow)")
    mod.add_argument("--max-tokens", type=int, default=64,
                     help="with --answers: tokens per answer (default: 64)")
    mod.add_argument("--plot", default=None, metavar="PNG",
                     help="with --eval: the precision-recall curve as a PNG")
    mod.add_argument("--json", action="store_true", help="with --eval: JSON instead of a table")
    mod.set_defaults(func=cmd_moderate)

    ppl = sub.add_parser("perplexity", help="perplexity of a text file over sliding windows")
    _add_model_args(ppl)
    ppl.add_argument("file", metavar="FILE", help="a UTF-8 text file (- for stdin)")
    ppl.add_argument("--context", type=int, default=None, metavar="N",
                     help="tokens per window (default: the model's sliding window, at most "
                          "2048)")
    ppl.add_argument("--stride", type=int, default=None, metavar="S",
                     help="tokens between window starts; each token is scored with at least "
                          "N - S tokens before it (default: N / 2)")
    ppl.add_argument("--batch", type=int, default=4, metavar="B",
                     help="windows scored together (default: 4)")
    ppl.add_argument("--json", action="store_true", help="print JSON")
    ppl.set_defaults(func=cmd_perplexity)

    ev = sub.add_parser("eval", help="lm-evaluation-harness tasks on the model (needs "
                                      "pip install 'mistral7b[eval]')")
    _add_model_args(ev)
    ev.add_argument("--tasks", required=True, metavar="T[,T]",
                    help="lm-eval task names (e.g. hellaswag,arc_easy), or `paper`: the "
                         "paper's table with its few-shot settings, beside its scores")
    ev.add_argument("--run-generated-code", action="store_true",
                    help="with --tasks paper: also run HumanEval and MBPP, which execute the "
                         "model's code")
    ev.add_argument("--num-fewshot", type=int, default=None, metavar="K",
                    help="few-shot examples (default: each task's)")
    ev.add_argument("--limit", type=int, default=None, metavar="N",
                    help="at most N items per task")
    ev.add_argument("--batch-size", type=int, default=8, metavar="B",
                    help="requests run together through the engine (default: 8)")
    ev.add_argument("--include-path", default=None, metavar="DIR",
                    help="a directory of your own lm-eval task YAML files")
    ev.add_argument("--apply-chat-template", action="store_true",
                    help="put prompts in the model's chat template")
    ev.add_argument("--output", default=None, metavar="FILE",
                    help="also write the results as JSON")
    ev.set_defaults(func=cmd_eval)

    info = sub.add_parser("info", help="describe a model: architecture, window, size, tokenizer")
    _add_model_args(info)
    info.set_defaults(func=cmd_info)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="mistral7b: %(message)s")
    logging.getLogger("mistral7b").setLevel(logging.INFO)
    func: Callable[[argparse.Namespace], int] = args.func
    try:
        return func(args)
    except Mistral7BError as e:
        if os.environ.get("RANK", "0") == "0":   # under torchrun, rank 0 says it once
            print(f"mistral7b: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("\nmistral7b: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        return 0
