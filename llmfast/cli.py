"""The `llmfast` command (also `python -m llmfast`)."""
from __future__ import annotations

import argparse
import importlib
import sys
from pathlib import Path

from llmfast.backends import BackendUnavailable

BENCHMARKS = ("norm", "attention", "quant", "paged", "throughput")
GPU_ONLY_BENCHMARKS = ("attention",)  # `bench all` skips them without a GPU


def _cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


# (flag, SamplingParams field, type): flags left out take generation_config.json's value, else SamplingParams'
# (flag, SamplingParams field, type, help)
SAMPLING_FLAGS = (
    ("--n", "n", int, "completions per prompt (default 1)"),
    ("--temperature", "temperature", float, "0 is greedy (default 1.0)"),
    ("--top-k", "top_k", int, "sample from the k likeliest tokens; 0 or -1: all (default 0)"),
    ("--top-p", "top_p", float, "sample from the smallest set of tokens with this probability (default 1.0)"),
    ("--min-p", "min_p", float, "drop tokens less likely than min_p x the likeliest (default 0.0)"),
    ("--repetition-penalty", "repetition_penalty", float, "> 1 discourages tokens already seen (default 1.0)"),
    ("--presence-penalty", "presence_penalty", float, "subtracted from the logit of each token generated (default 0.0)"),
    ("--frequency-penalty", "frequency_penalty", float, "times each generated token's count, subtracted (default 0.0)"),
    ("--max-tokens", "max_tokens", int, "new tokens at most (default 16)"),
    ("--min-tokens", "min_tokens", int, "new tokens before eos or a stop may end a completion (default 0)"),
    ("--seed", "seed", int, "this request's seed: the same output whatever else runs (default: the engine's)"),
)


def _port(text: str) -> int:
    if not text.isdigit() or not 0 <= int(text) <= 65535:
        raise argparse.ArgumentTypeError(f"expected a port in 0..65535, got {text!r}")
    return int(text)


def _positive_int(text: str) -> int:
    if not text.lstrip("+").isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"expected a positive int, got {text!r}")
    return int(text)


def _fail(command: str, exc: BaseException | str) -> int:
    print(f"llmfast {command}: error: {exc}", file=sys.stderr)
    return 2


def _engine_kwargs(args: argparse.Namespace) -> dict:
    kwargs = dict(dtype=args.dtype, device=args.device, quantization=args.quantization, block_size=args.block_size,
                  max_num_seqs=args.max_num_seqs, max_num_batched_tokens=args.max_num_batched_tokens,
                  num_kv_blocks=args.num_kv_blocks, gpu_memory_utilization=args.gpu_memory_utilization,
                  enforce_eager=args.enforce_eager,
                  seed=getattr(args, "engine_seed", None))  # serve's --seed (generate's seeds its requests)
    return {name: value for name, value in kwargs.items() if value is not None}


def _demo(args: argparse.Namespace) -> int:
    from llmfast.demo import main

    try:
        main(args.model, num_prompts=args.num_prompts, max_tokens=args.max_tokens, device=args.device)
    except (OSError, ValueError, BackendUnavailable) as exc:
        return _fail("demo", exc)
    return 0


def _generate(args: argparse.Namespace) -> int:
    from llmfast.engine import LLM, SamplingParams

    given = {field: getattr(args, field) for _, field, _, _ in SAMPLING_FLAGS if getattr(args, field) is not None}
    try:
        fixed = dict(stop=args.stop, stop_token_ids=args.stop_token_ids, ignore_eos=args.ignore_eos)
        # bad flags fail before the model loads; max_tokens is checked once generation_config.json is read
        params = SamplingParams(**{"max_tokens": None, **given}, **fixed)
        if args.stream and params.n > 1:
            raise ValueError("--stream prints one completion as it is generated; use --n 1")
        try:  # a CUDA-graph capture failure is a RuntimeError; its message says to pass --enforce-eager
            llm = LLM(args.model, **_engine_kwargs(args))
        except RuntimeError as exc:
            return _fail("generate", exc)
        # flags left out take the checkpoint's generation_config.json, as LLM.generate and the server do
        params = SamplingParams(**{**llm.sampling_defaults, **given}, **fixed)
        labelled = len(args.prompt) > 1 or params.n > 1
        if args.stream:
            for i, prompt in enumerate(args.prompt):
                if labelled:
                    print(f"--- prompt {i} ---")
                for piece in llm.stream(prompt, params):
                    print(piece.text, end="", flush=True)
                print()
            return 0
        for i, out in enumerate(llm.generate(args.prompt, params, use_tqdm=False)):
            for completion in out.outputs:
                if labelled:
                    print(f"--- prompt {i}, completion {completion.index} ({completion.finish_reason}) ---")
                print(completion.text)
    except (OSError, ValueError, BackendUnavailable) as exc:
        return _fail("generate", exc)
    return 0


def _serve(args: argparse.Namespace) -> int:
    try:
        from llmfast.engine import LLM
        from llmfast.server import serve
    except ImportError as exc:
        return _fail("serve", f"{exc}; the server needs `pip install fastapi uvicorn`")
    try:
        llm = LLM(args.model, **_engine_kwargs(args))
    except (OSError, ValueError, RuntimeError, BackendUnavailable) as exc:  # RuntimeError: CUDA-graph capture
        return _fail("serve", exc)
    serve(llm, args.served_model_name or args.model, host=args.host, port=args.port, log_level=args.log_level)
    return 0


def _add_engine_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, help="checkpoint folder (config.json, *.safetensors, tokenizer)")
    engine = parser.add_argument_group("engine")
    engine.add_argument("--dtype", default=None, help="float32, float16, bfloat16 or auto (the checkpoint's)")
    engine.add_argument("--device", default=None, help="auto (default), cpu or cuda")
    engine.add_argument("--quantization", default=None, choices=("int8", "int4"), help="weight-only quantization")
    engine.add_argument("--block-size", type=int, default=None, help="tokens per KV-cache block (default 16)")
    engine.add_argument("--num-kv-blocks", type=int, default=None, help="KV-cache blocks (default: from free memory)")
    engine.add_argument("--max-num-seqs", type=int, default=None, help="most sequences in one batch (default 256)")
    engine.add_argument("--max-num-batched-tokens", type=int, default=None,
                        help="most tokens in one forward (default 8192)")
    engine.add_argument("--gpu-memory-utilization", type=float, default=None,
                        help="fraction of the GPU's memory the engine may use, the KV cache included (default 0.9)")
    engine.add_argument("--enforce-eager", action="store_true", default=None,
                        help="run every step eagerly, without CUDA graphs")


def _bench(args: argparse.Namespace) -> int:
    """Runs one benchmark, or each in turn for `all` (a failure does not stop the others); the worst exit code."""
    names = BENCHMARKS if args.name == "all" else (args.name,)
    if args.name == "all" and {"-h", "--help"} & set(args.bench_args):
        print(f"usage: llmfast bench all [OPTIONS]\n\nRuns {', '.join(BENCHMARKS)} in turn, each with OPTIONS "
              "(e.g. --quick); `llmfast bench NAME --help` lists one benchmark's options.")
        return 0
    codes = []
    for name in names:
        if len(names) > 1 and name in GPU_ONLY_BENCHMARKS and not _cuda_available():
            print(f"llmfast bench {name}: skipped (needs a CUDA GPU)", file=sys.stderr)
            continue
        # benchmarks/ is installed as llmfast_benchmarks beside llmfast (see setup.py)
        module = importlib.import_module(f"llmfast_benchmarks.bench_{name}")
        try:
            codes.append(module.main(args.bench_args) or 0)
        except SystemExit as exc:  # argparse errors and explicit exits of one benchmark
            codes.append(exc.code if isinstance(exc.code, int) else 2)
        if len(names) > 1 and codes[-1]:
            print(f"llmfast bench {name}: exit code {codes[-1]}", file=sys.stderr)
    return max(codes, default=0)


def _eval_ppl(args: argparse.Namespace) -> int:
    from llmfast.eval import perplexity

    try:
        try:
            text = Path(args.file).read_text(encoding="utf-8-sig")  # a byte-order mark is not text
        except UnicodeDecodeError as exc:
            raise ValueError(f"--file: {args.file} is not UTF-8 text ({exc.reason} at byte {exc.start})") from None
        ppl = perplexity(args.model, text, args.stride, args.max_length, dtype=args.dtype, device=args.device)
    except (OSError, ValueError, BackendUnavailable) as exc:
        return _fail("eval ppl", exc)
    except (MemoryError, RuntimeError) as exc:  # torch.OutOfMemoryError is a RuntimeError
        if not isinstance(exc, MemoryError) and "memory" not in str(exc):
            raise
        window = f"{args.max_length} tokens" if args.max_length else "the model's maximum length"
        return _fail("eval ppl", f"out of memory with windows of {window}; pass a smaller --max-length")
    print(f"{ppl:.6f}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="llmfast", description="GPU kernels and an engine for LLMs.")
    sub = parser.add_subparsers(dest="command", required=True)

    demo = sub.add_parser("demo", help="batched generation (a built-in tiny model by default), then every op "
                                        "on every available backend against the reference")
    demo.add_argument("--model", default=None, help="checkpoint folder (default: a small random model, no download)")
    demo.add_argument("--num-prompts", type=_positive_int, default=32, help="requests in the batch (default 32)")
    demo.add_argument("--max-tokens", type=_positive_int, default=64, help="tokens generated per request (default 64)")
    demo.add_argument("--device", default="auto", help="auto, cpu or cuda")
    demo.set_defaults(run=_demo)

    generate = sub.add_parser("generate", help="complete prompts with the engine and print the text")
    _add_engine_args(generate)
    generate.add_argument("--prompt", action="append", required=True, help="a prompt (repeat for a batch)")
    sampling = generate.add_argument_group(
        "sampling (vLLM's SamplingParams; default: generation_config.json's fields, else SamplingParams')")
    for flag, field, kind, text in SAMPLING_FLAGS:
        sampling.add_argument(flag, dest=field, type=kind, default=None, help=text)
    sampling.add_argument("--stop", action="append", default=None, help="a stop string (repeatable)")
    sampling.add_argument("--stop-token-ids", type=int, nargs="+", default=None, help="token ids that end a completion")
    sampling.add_argument("--ignore-eos", action="store_true", help="keep generating past the eos token")
    generate.add_argument("--stream", action="store_true", help="print the text as it is generated")
    generate.set_defaults(run=_generate)

    serve = sub.add_parser("serve", help="an OpenAI-compatible HTTP server (needs fastapi and uvicorn)")
    _add_engine_args(serve)
    serve.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    serve.add_argument("--port", type=_port, default=8000, help="default 8000; 0 picks a free port (logged at startup)")
    serve.add_argument("--served-model-name", default=None, help="the model id clients send (default: --model)")
    serve.add_argument("--log-level", default="info", choices=("critical", "error", "warning", "info", "debug"))
    serve.add_argument("--seed", dest="engine_seed", type=int, default=None,
                       help="the engine's seed, for requests without their own (default 0)")
    serve.set_defaults(run=_serve)

    bench = sub.add_parser("bench", help="benchmark an op family; prints a table, writes JSON + PNG")
    bench.add_argument("name", choices=(*BENCHMARKS, "all"))
    bench.add_argument("bench_args", nargs=argparse.REMAINDER, help="options passed to the benchmark (see --help)")
    bench.set_defaults(run=_bench)

    evaluate = sub.add_parser("eval", help="evaluate a checkpoint on llmfast's models")
    metrics = evaluate.add_subparsers(dest="metric", required=True)
    ppl = metrics.add_parser("ppl", help="perplexity of a text file, sliding window; prints the number")
    ppl.add_argument("--model", required=True, help="checkpoint folder (config.json, *.safetensors, tokenizer)")
    ppl.add_argument("--file", required=True, help="UTF-8 text file to score")
    ppl.add_argument("--max-length", type=_positive_int, default=None,
                     help="window length (default: the model's maximum length)")
    ppl.add_argument("--stride", type=_positive_int, default=None, help="window step (default: half the window)")
    ppl.add_argument("--dtype", default="auto", help="float32, float16, bfloat16 or auto (the checkpoint's)")
    ppl.add_argument("--device", default="auto", help="auto (default: a GPU when there is one), cpu or cuda")
    ppl.set_defaults(run=_eval_ppl)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.run(args)
    except KeyboardInterrupt:  # Ctrl-C: a line, not a traceback through the engine; 130 as a shell reports it
        print("llmfast: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
