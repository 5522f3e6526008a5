"""Weight-only quantized matmul, bf16 activations: ours (Triton; int4 g128 and int8 per channel) against
bf16 cuBLAS (F.linear) and tinygemm int4 g128 (torch._weight_int4pack_mm), measured in the same run.

    python -m benchmarks.bench_quant                 # the full grid on a GPU -> results/{gpu}_quant.json, .png
    python -m benchmarks.bench_quant --quick         # a smoke run (GPU or CPU), results to a temporary folder
    python -m benchmarks.bench_quant --m 1,16 --shapes 4096x4096   # -> results/{gpu}_quant_partial.*

Without a GPU (or with --device cpu) it runs the CPU comparison of bench_quant_cpu instead: the C++
kernel against dequantize + F.linear and float32 F.linear -> results/cpu_quant.json, .png.

y = x @ W.T with x (M, K) bf16 and W (N, K). "weight GB/s" is the bytes of the weight as each
implementation stores it (bf16; or codes + scales (+ zeros)) over the time, beside its fraction of the
H100's 3.0 TB/s copy rate; x and y are left out. do_bench flushes the L2 between calls, so every call
reads its weight from HBM, as a model whose layers do not fit in L2 does.
"""
from __future__ import annotations

import argparse
import gc
from typing import Callable

import torch
import torch.nn.functional as F

import llmfast
from llmfast.quant import QuantizedWeight, quantize, unpack_int4
from . import bench_quant_cpu, common
from .common import (
    COPY_TB_S,
    bench_ms,
    default_device,
    mark_target,
    measure_copy_tb_s,
    plot_bars,
    print_table,
    save_results,
)

SHAPES = [(4096, 4096), (4096, 14336), (14336, 4096), (8192, 28672)]  # K x N
MS = [1, 4, 16, 32, 64, 128, 256]
QUICK_SHAPES = [(4096, 4096)]
QUICK_MS = [1, 16, 64]
CPU_QUICK_ARGS = ["--shapes", "1024x1024", "--m", "1,4", "--repeats", "1"]
DTYPE = torch.bfloat16
PEER = "bf16 F.linear"
TINYGEMM = "tinygemm int4 g128"
# ours: name -> (bits, group_size)
OURS = {"ours int4 g128": (4, 128), "ours int8": (8, -1)}
# speedup over bf16 cuBLAS the issue asks for (BENCHMARKS.md), by implementation and M
TARGETS = {"ours int4 g128": {1: 3.3, 16: 2.5, 64: 1.3, 256: 0.9}, "ours int8": {1: 1.8}}
TARGET_SHAPES = [(4096, 14336), (14336, 4096), (8192, 28672)]  # BENCHMARKS.md: "on the large shapes"
MAX_REL_ERR = 0.02  # of the largest output: bf16 outputs summed over up to 14336 products


def stored_bytes(*tensors: torch.Tensor) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def tinygemm(qw: QuantizedWeight) -> tuple[Callable[[torch.Tensor], torch.Tensor], int]:
    """torch._weight_int4pack_mm over our int4 g128 codes: tinygemm dequantizes as we do,
    (q - 8) * scale + zero, with scales and zeros interleaved as (K // 128, N, 2).

    _convert_weight_to_int4pack takes (N, K // 2) uint8, two codes a byte, high nibble first, since
    torch 2.5 (and on the H100's torch 2.11 and this checkout's 2.13), and (N, K) int32 codes before;
    the caller checks the result against our dequantized weight, so a layout this guard gets wrong
    shows as n/a, not as a wrong number. Returns (fn(x) -> y, the bytes of its weight)."""
    codes = unpack_int4(qw.qweight).to(torch.int32)  # (N, K)
    scales_and_zeros = torch.stack([qw.scales.T, qw.zeros.T], dim=-1).contiguous()  # (K // 128, N, 2)
    inner_k_tiles = 8
    try:
        packed = torch._convert_weight_to_int4pack((codes[:, ::2] << 4 | codes[:, 1::2]).to(torch.uint8),
                                                   inner_k_tiles)
    except RuntimeError:
        packed = torch._convert_weight_to_int4pack(codes, inner_k_tiles)
    fn = lambda x: torch._weight_int4pack_mm(x, packed, 128, scales_and_zeros)  # noqa: E731
    return fn, stored_bytes(packed, scales_and_zeros)


def implementations(k: int, n: int, device: torch.device) -> dict[str, tuple[Callable | None, int, object]]:
    """name -> (fn(x) -> y or None, weight bytes it reads, its weight for the check or the reason it is n/a)."""
    torch.manual_seed(0)
    weight = torch.randn(n, k, dtype=DTYPE, device=device) * 0.02
    impls = {PEER: (lambda x: F.linear(x, weight), stored_bytes(weight), weight)}
    qw4 = None
    for name, (bits, group_size) in OURS.items():
        qw = quantize(weight, bits, group_size)
        qw4 = qw if bits == 4 else qw4
        impls[name] = (lambda x, qw=qw: llmfast.ops.quant_matmul(x, qw, backend="triton"),
                       stored_bytes(*(t for t in (qw.qweight, qw.scales, qw.zeros) if t is not None)), qw)
    try:
        fn, nbytes = tinygemm(qw4)
        impls[TINYGEMM] = (fn, nbytes, qw4)
    except Exception as exc:  # not built for this GPU or this torch: the peer is n/a, not the run
        impls[TINYGEMM] = (None, 0, f"{type(exc).__name__}: {exc}"[:300])
    return impls


def check(name: str, y: torch.Tensor, x: torch.Tensor, w: torch.Tensor | QuantizedWeight) -> float:
    """Max error over the largest output, against fp32 x @ w.T over the implementation's own weight."""
    dense = w if isinstance(w, torch.Tensor) else w.dequantize()
    ref = x.float() @ dense.float().T
    err = ((y.float() - ref).abs().max() / ref.abs().max()).item()
    if not err <= MAX_REL_ERR:
        raise AssertionError(f"{name}: max error {err:.3g} of the largest output")
    return err


def run_case(k: int, n: int, m: int, impls: dict, device: torch.device) -> list[dict]:
    x = torch.randn(m, k, dtype=DTYPE, device=device)
    rows = []
    for name, (fn, nbytes, w) in impls.items():
        row = {"k": k, "n": n, "m": m, "impl": name, "ours": name in OURS, "ms": None, "weight_bytes": nbytes,
               "weight_gb_s": None, "roofline": None}
        if fn is None:
            rows.append({**row, "error": w})
            continue
        try:
            for _ in range(3):  # autotunes (ours, per power of 2 of M), fills the allocator's cache
                y = fn(x)
            row["max_rel_err"] = check(name, y, x, w)
            ms = bench_ms(lambda: fn(x), device=device)
        except Exception as exc:  # a peer that fails here is reported n/a; ours must work
            if name in OURS:
                raise
            rows.append({**row, "error": f"{type(exc).__name__}: {exc}"[:300]})
            print(f"  M={m:<4} {name:20} n/a ({rows[-1]['error']})")
            continue
        gb_s = nbytes / ms / 1e6
        rows.append({**row, "ms": ms, "weight_gb_s": gb_s, "roofline": gb_s / (COPY_TB_S * 1e3)})
        print(f"  M={m:<4} {name:20} {ms:9.4f} ms  {gb_s:7.0f} GB/s of weight", flush=True)
    peer_ms = next(r["ms"] for r in rows if r["impl"] == PEER)
    for row in rows:
        if row["ms"] is not None:
            row["x_bf16"] = peer_ms / row["ms"]
            target = TARGETS.get(row["impl"], {}).get(m) if (k, n) in TARGET_SHAPES else None
            if target is not None:
                mark_target(row, "x_bf16", target)
    return rows


def run_cpu(args: argparse.Namespace) -> int:
    """The CPU comparison of bench_quant_cpu, with this benchmark's --m, --shapes and --quick."""
    argv = list(CPU_QUICK_ARGS) if args.quick else []
    if args.shapes:
        argv += ["--shapes", ",".join(f"{k}x{n}" for k, n in args.shapes)]
    if args.m:
        argv += ["--m", ",".join(map(str, args.m))]
    out_dir = common.out_dir(args, "quant")
    if out_dir is not None:
        argv += ["--out-dir", str(out_dir)]
    return bench_quant_cpu.main(argv)


def save(name: str, rows: list[dict], shapes: list, ms_list: list[int], copy_tb_s: float | None,
         device: torch.device) -> None:
    """results/{gpu}_{name}.json and .png: every row, and the speedups over bf16 per shape."""
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    save_results(name, {
        "what": "y = x @ W.T, x (M, K) bf16, W (N, K); ours = llmfast quant_matmul backend='triton'",
        "weight_bytes": "as stored: bf16 for F.linear; codes + scales (+ zeros) for the quantized ones",
        "weights": "cold: triton.testing.do_bench flushes the L2 between calls",
        "quantization": {impl: {"bits": b, "group_size": g} for impl, (b, g) in OURS.items()},
        "roofline_tb_s": COPY_TB_S, "copy_tb_s_measured": copy_tb_s, "targets_x_bf16": TARGETS,
        "target_shapes": [f"{k}x{n}" for k, n in TARGET_SHAPES],
        "results": rows,
    }, device=device, packages=("llmfast",))
    labels = [f"M={m}" for m in ms_list]
    panels = {}
    for k, n in shapes:
        case = [r for r in rows if (r["k"], r["n"]) == (k, n) and r["impl"] != PEER]
        speedup = {(r["impl"], r["m"]): r.get("x_bf16") for r in case}
        impl_names = dict.fromkeys(r["impl"] for r in case)
        panels[f"K x N = {k} x {n}"] = (labels, {i: [speedup.get((i, m)) for m in ms_list] for i in impl_names})
    plot_bars(name, panels, ylabel=f"speedup over {PEER} (higher is better)", device=device, hline=1.0,
              hline_label=PEER, title=f"weight-only quantized matmul, {where}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="bench_quant", description=__doc__.split("\n\n")[0])
    parser.add_argument("--shapes", type=bench_quant_cpu.parse_shapes, help="K x N list, e.g. 4096x4096,4096x14336")
    parser.add_argument("--m", type=common.parse_int_list, help="batch rows M, e.g. 1,16,64")
    parser.add_argument("--quick", action="store_true", help="a few small cases, results to a temporary folder")
    parser.add_argument("--device", choices=("cuda", "cpu"), help="default: cuda when there is a GPU")
    parser.add_argument("--out-dir", type=common.writable_dir, help="write the JSON + PNG here instead of benchmarks/results/")
    args = parser.parse_args(argv)
    device = torch.device(args.device) if args.device else default_device()
    if device.type == "cpu":
        return run_cpu(args)
    if not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA GPU is visible")
    if "triton" not in llmfast.available_backends("quant_matmul"):
        raise SystemExit("the triton backend of quant_matmul cannot run here: nothing of ours to time")
    shapes = args.shapes or (QUICK_SHAPES if args.quick else SHAPES)
    ms_list = args.m or (QUICK_MS if args.quick else MS)
    # a partial GPU run must not overwrite the full grid's results
    name = "quant" if (shapes, ms_list) == (SHAPES, MS) else "quant_partial"

    copy_tb_s = measure_copy_tb_s()
    print(f"device-to-device copy here: {copy_tb_s:.2f} TB/s (H100 in BENCHMARKS.md: {COPY_TB_S})")
    rows = []
    for k, n in shapes:
        print(f"K x N = {k} x {n}, bf16 activations", flush=True)
        impls = implementations(k, n, device)
        for m in ms_list:
            rows += run_case(k, n, m, impls, device)
        del impls
        gc.collect()
        torch.cuda.empty_cache()

    with common.results_dir(common.out_dir(args, "quant")):
        save(name, rows, shapes, ms_list, copy_tb_s, device)

    roofline = f"% of {COPY_TB_S} TB/s"
    print()
    print_table([{
        "K x N": f"{r['k']}x{r['n']}", "M": r["m"], "impl": r["impl"], "ms": r["ms"], "weight GB/s": r["weight_gb_s"],
        roofline: None if r["roofline"] is None else 100 * r["roofline"],
        "x bf16": r.get("x_bf16"), "target": r.get("target_x_bf16", ""),
    } for r in rows], ["K x N", "M", "impl", "ms", "weight GB/s", roofline, "x bf16", "target"])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
