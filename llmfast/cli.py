"""The `llmfast` command (also `python -m llmfast`)."""
from __future__ import annotations

import argparse
import importlib
import sys

BENCHMARKS = ("norm",)


def _demo(args: argparse.Namespace) -> int:
    from llmfast.demo import main

    main()
    return 0


def _bench(args: argparse.Namespace) -> int:
    names = BENCHMARKS if args.name == "all" else (args.name,)
    for name in names:
        # benchmarks/ is installed as llmfast_benchmarks beside llmfast (see setup.py)
        module = importlib.import_module(f"llmfast_benchmarks.bench_{name}")
        module.main(args.bench_args)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="llmfast", description="GPU kernels and an engine for LLMs.")
    sub = parser.add_subparsers(dest="command", required=True)

    demo = sub.add_parser("demo", help="run every op on every available backend against the reference")
    demo.set_defaults(run=_demo)

    bench = sub.add_parser("bench", help="benchmark an op family; prints a table, writes JSON + PNG")
    bench.add_argument("name", choices=(*BENCHMARKS, "all"))
    bench.add_argument("bench_args", nargs=argparse.REMAINDER, help="options passed to the benchmark (see --help)")
    bench.set_defaults(run=_bench)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.run(args)


if __name__ == "__main__":
    sys.exit(main())
