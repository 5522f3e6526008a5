"""Dense float32 linear on CPU: the engine's packed C++ kernel (``packed_linear_cpu``, what ``LLM`` runs its
float32 linear layers with on CPU) against ``F.linear`` (MKL) and ``x @ W.T`` with ``W.T`` stored contiguous.

    python -m benchmarks.bench_linear_cpu --threads 1      # -> results/cpu_linear.json, .png (_avx2 w/o AVX-512)
    python -m benchmarks.bench_linear_cpu --m 1,32 --shapes 512x32000 --repeats 1 --out-dir /tmp/l   # a quick look

y = x @ W.T with x (M, K) and W (N, K), cold weights as in bench_quant_cpu (each implementation cycles
through copies of its weight that overflow the last-level cache twice). Shapes: the output head and
the MLP of the CPU throughput benchmark's model (hidden 512, vocab 32000), and two 7B-sized layers.
Each case is timed --repeats times, implementations interleaved; the median is reported with its spread.
"""
from __future__ import annotations

import argparse
import os
import statistics

import torch
import torch.nn.functional as F

from llmfast import _ext
from llmfast.engine.cpu_linear import pack_weight
from . import common
from .bench_quant_cpu import cold, last_level_cache_bytes
from .common import plot_bars, print_table, save_results

SHAPES = [(512, 32000), (512, 1408), (1408, 512), (4096, 4096), (4096, 11008)]  # K x N
MS = [1, 8, 32, 128, 1024]
PEER = "F.linear"
OURS = "ours packed"


def parse_shapes(text: str) -> list[tuple[int, int]]:
    return common.parse_pairs(text, "KxN")


def implementations(k: int, n: int, llc: int) -> dict:
    """name -> fn(x) -> y, each over its own cold copies of one weight."""
    weight = torch.randn(n, k) * 0.02
    nbytes = weight.numel() * 4
    dense = cold(lambda: weight.clone(), nbytes, llc)
    transposed = cold(lambda: weight.t().contiguous(), nbytes, llc)
    packed = cold(lambda: pack_weight(weight), nbytes, llc)
    return {
        PEER: lambda x: F.linear(x, dense()),
        "x @ W.T (W.T contiguous)": lambda x: torch.mm(x, transposed()),
        OURS: lambda x: torch.ops.llmfast.packed_linear_cpu(x, packed(), n, None),
    }, weight


def run_case(k: int, n: int, m: int, impls: dict, weight: torch.Tensor, repeats: int) -> list[dict]:
    x = torch.randn(m, k)
    ref = x.double() @ weight.double().T
    err = ((impls[OURS](x).double() - ref).abs().max() / ref.abs().max()).item()
    if err > 1e-5:
        raise AssertionError(f"{OURS}: max error {err:.3g} of the largest output")
    times = common.interleaved_ms({name: lambda fn=fn: fn(x) for name, fn in impls.items()}, repeats)
    rows = []
    for name, ts in times.items():
        ms = statistics.median(ts)
        rows.append({"k": k, "n": n, "m": m, "impl": name, "ms": ms, "ms_min": min(ts), "ms_max": max(ts),
                     "gflops": 2 * m * n * k / ms / 1e6, "weight_gb_s": n * k * 4 / ms / 1e6})
        print(f"  M={m:<5} {name:26} {ms:9.3f} ms  ({min(ts):.3f}..{max(ts):.3f})  {rows[-1]['gflops']:6.1f} GFLOP/s",
              flush=True)
    peer_ms = next(r["ms"] for r in rows if r["impl"] == PEER)
    for row in rows:
        row["x_f_linear"] = peer_ms / row["ms"]
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="bench_linear_cpu", description=__doc__.split("\n\n")[0])
    parser.add_argument("--shapes", type=parse_shapes, default=SHAPES, help="K x N list, e.g. 512x32000,4096x4096")
    parser.add_argument("--m", type=common.parse_int_list, default=MS, help="batch rows M, e.g. 1,8,32")
    parser.add_argument("--repeats", type=int, default=3, help="timings per case, implementations interleaved")
    parser.add_argument("--threads", type=common.positive_int, help="torch CPU threads (default: torch's own)")
    parser.add_argument("--out-dir", type=common.writable_dir, help="write the JSON + PNG here instead of benchmarks/results/")
    args = parser.parse_args(argv)
    if not _ext.has_op("packed_linear_cpu"):
        raise SystemExit("llmfast._C with packed_linear_cpu is not built here: nothing of ours to time")
    with common.torch_threads(args.threads):
        run(args)
    return 0


def run(args: argparse.Namespace) -> None:
    torch.manual_seed(0)
    llc = last_level_cache_bytes()
    print(f"CPU, {torch.get_num_threads()} threads, last-level cache {llc >> 20} MiB, float32")
    rows = []
    for k, n in args.shapes:
        print(f"K x N = {k} x {n}", flush=True)
        impls, weight = implementations(k, n, llc)
        for m in args.m:
            rows += run_case(k, n, m, impls, weight, max(1, args.repeats))
        del impls

    with common.results_dir(args.out_dir):
        save_results("linear", {
            "what": "y = x @ W.T, x (M, K) float32, W (N, K); ours = torch.ops.llmfast.packed_linear_cpu",
            "weights": "cold: each implementation cycles through copies of its weight overflowing 2x the LLC",
            "threads": torch.get_num_threads(), "llc_bytes": llc, "cpu_count": os.cpu_count(),
            "repeats": args.repeats, "results": rows,
        }, device="cpu", packages=("llmfast",))
        labels = [f"M={m}" for m in args.m]
        panels = {}
        for k, n in args.shapes:
            case = {(r["impl"], r["m"]): r["x_f_linear"] for r in rows if (r["k"], r["n"]) == (k, n)}
            names = dict.fromkeys(r["impl"] for r in rows)
            panels[f"K x N = {k} x {n}"] = (labels, {i: [case.get((i, m)) for m in args.m] for i in names})
        plot_bars("linear", panels, ylabel=f"speedup over {PEER} (higher is better)", device="cpu",
                  title="dense float32 linear on CPU")
    print()
    print_table([{"K x N": f"{r['k']}x{r['n']}", "M": r["m"], "impl": r["impl"], "ms": r["ms"],
                  "spread ms": f"{r['ms_min']:.3g}..{r['ms_max']:.3g}", "GFLOP/s": r["gflops"],
                  f"x {PEER}": r["x_f_linear"]} for r in rows],
                ["K x N", "M", "impl", "ms", "spread ms", "GFLOP/s", f"x {PEER}"])


if __name__ == "__main__":
    raise SystemExit(main())
