"""Weight-only quantized matmul on CPU, float32 activations: our C++ kernel (int8 per channel, int4 g128)
against dequantize + F.linear and against plain float32 F.linear, measured in the same run.

    python -m benchmarks.bench_quant_cpu                     # -> results/cpu_quant.json, .png (_avx2 w/o AVX-512)
    python -m benchmarks.bench_quant_cpu --m 1,16 --shapes 4096x4096 --repeats 1 --out-dir /tmp/q   # a quick look

y = x @ W.T with x (M, K) and W (N, K). Weights are cold, as in a model whose layers do not fit in the
last-level cache: each implementation cycles through enough copies of its weight that they overflow
it. "weight GB/s" is the bytes of the weight as that implementation stores it (float32; or the codes
plus scales and zeros) over the time; x and y are left out. Each case is timed --repeats times,
implementations interleaved, and the median of those medians is reported with its spread.
"""
from __future__ import annotations

import argparse
import itertools
import math
import os
import statistics
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F

import llmfast
from llmfast.quant import QuantizedWeight, quantize
from . import common
from .common import plot_bars, print_table, save_results

SHAPES = [(4096, 4096), (4096, 11008), (11008, 4096)]  # K x N: attention projection, MLP up, MLP down
MS = [1, 4, 16, 64]
QUANTS = {"int8": (8, -1), "int4 g128": (4, 128)}
PEER = "fp32 F.linear"
DEFAULT_LLC_BYTES = 32 << 20


def last_level_cache_bytes() -> int:
    """The largest CPU cache's size from sysfs (Linux), or 32 MiB where it cannot be read."""
    sizes = []
    for index in Path("/sys/devices/system/cpu/cpu0/cache").glob("index*"):
        try:
            text = (index / "size").read_text().strip()
        except OSError:
            continue
        unit = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}.get(text[-1:], 1)
        sizes.append(int(text.rstrip("KMG")) * unit)
    return max(sizes, default=DEFAULT_LLC_BYTES)


def weight_bytes(w: torch.Tensor | QuantizedWeight) -> int:
    if isinstance(w, torch.Tensor):
        return w.numel() * w.element_size()
    return sum(t.numel() * t.element_size() for t in (w.qweight, w.scales, w.zeros) if t is not None)


def cold(make: Callable[[], object], nbytes: int, llc: int) -> Callable[[], object]:
    """A function returning a different copy of a weight on each call, enough copies to overflow ``llc`` twice."""
    copies = [make() for _ in range(max(1, math.ceil(2 * llc / nbytes)))]
    return itertools.cycle(copies).__next__


def implementations(k: int, n: int, llc: int) -> dict[str, tuple[Callable, int, object]]:
    """name -> (fn(x) -> y, weight bytes it reads, a weight for the correctness check)."""
    torch.manual_seed(0)
    weight = torch.randn(n, k) * 0.02
    impls = {}
    dense = cold(lambda: weight.clone(), weight_bytes(weight), llc)
    impls[PEER] = (lambda x: F.linear(x, dense()), weight_bytes(weight), weight)
    for name, (bits, group_size) in QUANTS.items():
        qw = quantize(weight, bits, group_size)
        nbytes = weight_bytes(qw)
        copies = cold(lambda: QuantizedWeight(qw.qweight.clone(), qw.scales.clone(),
                                              None if qw.zeros is None else qw.zeros.clone()), nbytes, llc)
        impls[f"ours {name}"] = (lambda x, c=copies: llmfast.ops.quant_matmul(x, c(), backend="cpu"), nbytes, qw)
        impls[f"{name} dequantize + F.linear"] = (lambda x, c=copies: F.linear(x, c().dequantize()), nbytes, qw)
    return impls


def check(name: str, y: torch.Tensor, x: torch.Tensor, w: torch.Tensor | QuantizedWeight) -> None:
    """Ours against float64 x @ w.T over its own dequantized weight; the rest are PyTorch."""
    dense = w if isinstance(w, torch.Tensor) else w.dequantize()
    ref = x.double() @ dense.double().T
    err = ((y.double() - ref).abs().max() / ref.abs().max()).item()
    if err > 1e-4:
        raise AssertionError(f"{name}: max error {err:.3g} of the largest output")


def run_case(k: int, n: int, m: int, impls: dict, repeats: int) -> list[dict]:
    x = torch.randn(m, k)
    for name, (fn, _, w) in impls.items():
        if name.startswith("ours"):
            check(name, fn(x), x, w)
    times = common.interleaved_ms({name: lambda fn=fn: fn(x) for name, (fn, _, _) in impls.items()}, repeats)
    rows = []
    for name, (_, nbytes, _) in impls.items():
        ms = statistics.median(times[name])
        rows.append({"k": k, "n": n, "m": m, "impl": name, "ours": name.startswith("ours"), "ms": ms,
                     "ms_min": min(times[name]), "ms_max": max(times[name]), "weight_bytes": nbytes,
                     "weight_gb_s": nbytes / ms / 1e6, "tflops": 2 * m * n * k / ms / 1e9})
        print(f"  M={m:<4} {name:30} {ms:9.3f} ms  ({min(times[name]):.3f}..{max(times[name]):.3f})  "
              f"{rows[-1]['weight_gb_s']:6.1f} GB/s", flush=True)
    peer_ms = next(r["ms"] for r in rows if r["impl"] == PEER)
    for row in rows:
        row["x_fp32_linear"] = peer_ms / row["ms"]
        if row["ours"]:
            deq = next(r for r in rows if r["impl"] == row["impl"].replace("ours ", "") + " dequantize + F.linear")
            row["x_dequantize_linear"] = deq["ms"] / row["ms"]
    return rows


def parse_shapes(text: str) -> list[tuple[int, int]]:
    return common.parse_pairs(text, "KxN", first_multiple_of=128)


def save(args: argparse.Namespace, rows: list[dict], llc: int) -> None:
    """results/cpu_quant.json and .png (or under --out-dir)."""
    save_results("quant", {
        "what": "y = x @ W.T, x (M, K) float32, W (N, K); ours = llmfast quant_matmul backend='cpu'",
        "weights": "cold: each implementation cycles through copies of its weight overflowing 2x the LLC",
        "weight_bytes": "as stored: float32 for F.linear; codes + scales (+ zeros) for the quantized ones",
        "quantization": {name: {"bits": b, "group_size": g} for name, (b, g) in QUANTS.items()},
        "threads": torch.get_num_threads(), "llc_bytes": llc, "cpu_count": os.cpu_count(),
        "repeats": args.repeats, "results": rows,
    }, device="cpu", packages=("llmfast",))
    labels = [f"M={m}" for m in args.m]
    panels = {}
    for k, n in args.shapes:
        case = [r for r in rows if (r["k"], r["n"]) == (k, n)]
        names = dict.fromkeys(r["impl"] for r in case)
        speedup = {(r["impl"], r["m"]): r["x_fp32_linear"] for r in case}
        panels[f"K x N = {k} x {n}"] = (labels, {i: [speedup.get((i, m)) for m in args.m] for i in names})
    plot_bars("quant", panels, ylabel=f"speedup over {PEER} (higher is better)", device="cpu",
              title="weight-only quantized matmul on CPU, float32 activations")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="bench_quant_cpu", description=__doc__.split("\n\n")[0])
    parser.add_argument("--shapes", type=parse_shapes, default=SHAPES, help="K x N list, e.g. 4096x4096,4096x11008")
    parser.add_argument("--m", type=common.parse_int_list, default=MS, help="batch rows M, e.g. 1,4,16,64")
    parser.add_argument("--repeats", type=int, default=3, help="timings per case, implementations interleaved")
    parser.add_argument("--out-dir", type=common.writable_dir, help="write the JSON + PNG here instead of benchmarks/results/")
    args = parser.parse_args(argv)
    if "cpu" not in llmfast.available_backends("quant_matmul"):
        raise SystemExit("llmfast._C with quant_matmul_cpu is not built here: nothing of ours to time")

    llc = last_level_cache_bytes()
    print(f"CPU, {torch.get_num_threads()} threads, last-level cache {llc >> 20} MiB, float32 activations")
    rows = []
    for k, n in args.shapes:
        print(f"K x N = {k} x {n}", flush=True)
        impls = implementations(k, n, llc)
        for m in args.m:
            rows += run_case(k, n, m, impls, max(1, args.repeats))
        del impls

    with common.results_dir(args.out_dir):
        save(args, rows, llc)

    print()
    print_table([{
        "K x N": f"{r['k']}x{r['n']}", "M": r["m"], "impl": r["impl"], "ms": r["ms"],
        "spread ms": f"{r['ms_min']:.3g}..{r['ms_max']:.3g}", "weight GB/s": r["weight_gb_s"],
        f"x {PEER}": r["x_fp32_linear"], "x dequantize+linear": r.get("x_dequantize_linear", ""),
    } for r in rows], ["K x N", "M", "impl", "ms", "spread ms", "weight GB/s", f"x {PEER}", "x dequantize+linear"])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
