"""Fused residual add + LayerNorm / RMSNorm in bf16: ours against eager PyTorch, torch.compile and
Liger-Kernel, measured in the same run.

    python -m benchmarks.bench_norm                  # the full grid on a GPU -> results/{gpu}_norm.json, .png
    python -m benchmarks.bench_norm --quick          # two small sizes (GPU or CPU), results to a temporary folder
    python -m benchmarks.bench_norm --ops rmsnorm    # one op's full grid -> results/{gpu}_norm_rmsnorm.*
    python -m benchmarks.bench_norm --ops rmsnorm --sizes 16384x4096   # -> results/{gpu}_norm_partial.*

The JSON is rewritten after every case, so a run stopped by a time limit keeps what it measured.

Bytes counted per case, the same for every implementation (so TB/s ratios are ms ratios), 2 B each:
    fwd      4*N*H: read x, residual; write y, h
    fwd+bwd  8*N*H: the forward's, plus the backward reading dy, dh, h and writing dx (h = x + residual
             passes one gradient to both inputs, so dresidual is dx and is not counted again)
weight, bias, their gradients and the per-row statistics (O(H) and O(N) bytes) are left out.
The backward alone ("bwd TB/s") is fwd+bwd ms - fwd ms over 4*N*H*2 bytes; its target is the forward's
TB/s at most 1.5x it ("fwd/bwd" <= 1.5).
Targets (issue 2, BENCHMARKS.md), marked on our rows:
    fwd      >= 2.7 TB/s at 16384x4096 and above, i.e. from 2^26 elements ("meets_fwd_tb_s"), and >= 1.3x
             the best peer at every size
             ("vs_best_peer", "meets_fwd_vs_peer"); both, where measured: "meets_fwd_target"
    fwd+bwd  >= 1.5x eager ("vs_eager", eager ms / ours; "meets_fwd_bwd_target"), and the backward rule above
             ("meets_bwd_target")
The backward gets fresh random gradients for both y and h, as in a transformer block where h feeds
the next residual add.
"""
from __future__ import annotations

import argparse
import gc
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F

import llmfast
from . import common
from .common import (
    COPY_TB_S,
    bench_ms,
    copy_scaled,
    default_device,
    group_rows,
    mark_target,
    parse_pairs,
    measure_copy_tb_s,
    plot_bars,
    print_table,
    save_results,
    tb_per_s,
)

SIZES = [(4096, 4096), (16384, 4096), (32768, 8192), (4096, 16384), (4096, 65536)]
QUICK_SIZES = [(256, 1024), (1024, 4096)]
MODES = ("fwd", "fwd+bwd")
DTYPE = torch.bfloat16
# --ops name -> (llmfast op, label, eps)
OPS = {
    "layernorm": ("add_layer_norm", "add+LayerNorm", 1e-5),
    "rmsnorm": ("add_rms_norm", "add+RMSNorm", 1e-6),
}
# Ours on each device. The cuda and cpu backends' backward is a PyTorch composite in llmfast.ops.norm,
# not a kernel, so they are timed forward only.
OUR_BACKENDS = {"cuda": ("triton", "cuda"), "cpu": ("cpu", "reference")}
FORWARD_ONLY = ("cuda", "cpu")
ATOL, RTOL = 0.05, 0.02  # bf16: a correct kernel differs from eager by a rounding or two
EAGER = "eager"
# issue 2 / BENCHMARKS.md targets for ours, bf16
FWD_TB_S_TARGET = 2.7  # 90% of the H100's measured copy, "at 16384 x 4096 and above" (BENCHMARKS.md): sizes
FWD_TB_S_MIN_ELEMENTS = 16384 * 4096  # of at least as many elements
FWD_VS_PEER_TARGET = 1.3  # x the best peer's forward, at every size
FWD_BWD_VS_EAGER_TARGET = 1.5  # x eager's forward+backward
BWD_TARGET = 1.5  # BENCHMARKS.md: the backward within 1.5x of the forward's bytes per second
PARAM_GRAD_REL_ERR = 0.02  # ||dw - dw_eager|| / ||dw_eager||: dw, db are sums over N rows


@dataclass
class Impl:
    name: str
    fn: Callable | None  # (x, residual, weight, bias) -> (y, h); None when unavailable
    ours: bool = False
    backward: bool = True
    why_not: str = ""


def _eager(op: str, eps: float) -> Callable:
    if op == "layernorm":
        def add_layer_norm(x, r, w, b):
            h = x + r
            return F.layer_norm(h, (h.shape[-1],), w, b, eps), h
        return add_layer_norm

    def add_rms_norm(x, r, w, b):
        h = x + r
        return F.rms_norm(h, (h.shape[-1],), w, eps), h
    return add_rms_norm


def _liger(op: str, eps: float) -> list[Impl]:
    """Liger-Kernel 0.8.x: its norm after an eager add, and (RMSNorm) its own fused add+norm."""
    try:
        if op == "layernorm":
            from liger_kernel.ops.layer_norm import LigerLayerNormFunction

            def liger_ln(x, r, w, b):
                h = x + r
                return LigerLayerNormFunction.apply(h, w, b, eps), h
            return [Impl("liger (add, then LN)", liger_ln)]

        from liger_kernel.ops.fused_add_rms_norm import LigerFusedAddRMSNormFunction
        from liger_kernel.ops.rms_norm import LigerRMSNormFunction

        def liger_rms(x, r, w, b):
            h = x + r
            # apply() takes no keywords: (X, W, eps, offset, casting_mode, in_place). in_place=False
            # keeps the timed loop's dy intact (in place, the backward overwrites dy with dx).
            return LigerRMSNormFunction.apply(h, w, eps, 0.0, "llama", False), h

        def liger_fused(x, r, w, b):
            return LigerFusedAddRMSNormFunction.apply(x, r, w, eps)  # (y, h)
        return [Impl("liger (add, then RMS)", liger_rms), Impl("liger fused add+RMS", liger_fused)]
    except Exception as exc:  # not installed, or built against another Triton: the peer is n/a, not the run
        return [Impl("liger", None, why_not=f"{type(exc).__name__}: {exc}")]


def _ours(op: str, eps: float, device: torch.device) -> list[Impl]:
    op_name = OPS[op][0]
    fn = getattr(llmfast.ops, op_name, None)
    if fn is None:
        raise SystemExit(f"llmfast.ops.{op_name} does not exist in this checkout; nothing of ours to time")
    runnable = llmfast.available_backends(op_name)
    impls = []
    for backend in OUR_BACKENDS[device.type]:
        if backend not in runnable:
            impls.append(Impl(f"ours ({backend})", None, True, backend not in FORWARD_ONLY, f"not among {runnable}"))
            continue
        if op == "layernorm":
            call = lambda x, r, w, b, be=backend: fn(x, r, w, b, eps, backend=be)  # noqa: E731
        else:
            call = lambda x, r, w, b, be=backend: fn(x, r, w, eps, backend=be)  # noqa: E731
        impls.append(Impl(f"ours ({backend})", call, ours=True, backward=backend not in FORWARD_ONLY))
    if all(i.fn is None for i in impls):
        raise SystemExit(f"none of our {OUR_BACKENDS[device.type]} backends of {op_name} runs here ({runnable})")
    return impls


def implementations(op: str, device: torch.device, compile_peer: bool) -> list[Impl]:
    eps = OPS[op][2]
    eager = _eager(op, eps)
    impls = [Impl(EAGER, eager)]
    if compile_peer:
        impls.append(Impl("torch.compile", torch.compile(eager)))
    else:
        impls.append(Impl("torch.compile", None, why_not="--no-compile"))
    if device.type == "cuda":
        impls += _liger(op, eps)
    return impls + _ours(op, eps, device)


def _check_close(what: str, ours: torch.Tensor, ref: torch.Tensor) -> float:
    diff = (ours.float() - ref.float()).abs()
    if not bool((diff <= ATOL + RTOL * ref.float().abs()).all()):
        raise AssertionError(f"{what}: max abs diff {diff.max().item():.4g} from eager exceeds bf16 tolerance")
    return diff.max().item()


def check_against_eager(impl: Impl, eager: Callable, x, r, w, b, dy, dh) -> dict:
    """``impl`` against eager; raises when clearly wrong. The forward is compared with eager in bf16;
    input gradients (when timed) with eager on the same values in float32, as eager's own bf16 weight
    gradient is off by ~3% on CPU."""
    with torch.no_grad():
        y_ref, h_ref = eager(x, r, w, b)
        y, h = impl.fn(x, r, w, b)
        report = {"y_max_abs_diff": _check_close(f"{impl.name} y", y, y_ref),
                  "h_max_abs_diff": _check_close(f"{impl.name} h", h, h_ref)}
    del y_ref, h_ref, y, h
    if impl.backward:
        def leaves(dtype):
            return [None if t is None else t.detach().to(dtype).requires_grad_() for t in (x, r, w, b)]

        def input_grads(fn, args, dtype):
            return torch.autograd.grad(fn(*args), [t for t in args if t is not None], (dy.to(dtype), dh.to(dtype)))

        grads = input_grads(impl.fn, leaves(x.dtype), x.dtype)
        grads_ref = input_grads(eager, leaves(torch.float32), torch.float32)
        report["dx_max_abs_diff"] = _check_close(f"{impl.name} dx", grads[0], grads_ref[0])
        report["dresidual_max_abs_diff"] = _check_close(f"{impl.name} dresidual", grads[1], grads_ref[1])
        for what, g, g_ref in zip(("dweight", "dbias"), grads[2:], grads_ref[2:]):
            rel = ((g.float() - g_ref.float()).norm() / g_ref.float().norm()).item()
            if rel > PARAM_GRAD_REL_ERR:
                raise AssertionError(f"{impl.name} {what}: relative error {rel:.3g} from eager")
            report[f"{what}_rel_err"] = rel
    print(f"  check {impl.name}: " + ", ".join(f"{k} {v:.3g}" for k, v in report.items()))
    return report


def run_case(op: str, n: int, hidden: int, impls: list[Impl], device: torch.device) -> list[dict]:
    """Checks ours, then times every implementation in both modes; one result dict per (mode, impl)."""
    torch.manual_seed(0)
    x, r, dy, dh = (torch.randn(n, hidden, dtype=DTYPE, device=device) for _ in range(4))
    w = 1 + 0.1 * torch.randn(hidden, dtype=DTYPE, device=device)  # trained norm weights sit near 1
    b = 0.1 * torch.randn(hidden, dtype=DTYPE, device=device) if op == "layernorm" else None
    params = [p for p in (x, r, w, b) if p is not None]
    eager = impls[0].fn
    checks = {i.name: check_against_eager(i, eager, x, r, w, b, dy, dh) for i in impls if i.ours and i.fn}

    rows = []
    for mode in MODES:
        nbytes = (4 if mode == "fwd" else 8) * n * hidden * x.element_size()
        for p in params:
            p.requires_grad_(mode != "fwd")
        for impl in impls:
            row = {"op": op, "mode": mode, "n": n, "hidden": hidden, "impl": impl.name, "ours": impl.ours,
                   "bytes": nbytes, "ms": None, "tb_s": None, "roofline": None}
            if mode != "fwd" and not impl.backward:
                continue
            if impl.fn is None:
                rows.append({**row, "error": impl.why_not})
                if mode == "fwd":
                    print(f"  {impl.name}: n/a ({impl.why_not})")
                continue
            if mode == "fwd":
                step = lambda f=impl.fn: f(x, r, w, b)  # noqa: E731
            else:
                step = lambda f=impl.fn: torch.autograd.backward(f(x, r, w, b), (dy, dh))  # noqa: E731
            try:
                for _ in range(3):  # compiles, autotunes, fills the allocator's cache
                    step()
                ms = bench_ms(step, grad_to_none=params, device=device)
            except Exception as exc:  # a peer that fails here is reported n/a; ours must work
                if impl.ours:
                    raise
                rows.append({**row, "error": f"{type(exc).__name__}: {exc}"[:300]})
                print(f"  {impl.name} {mode}: n/a ({rows[-1]['error']})")
                continue
            tb_s = tb_per_s(nbytes, ms)
            rows.append({**row, "ms": ms, "tb_s": tb_s, "roofline": tb_s / COPY_TB_S,
                         "check": checks.get(impl.name)})
            print(f"  {mode:7} {impl.name:24} {ms:9.4f} ms  {tb_s:6.3f} TB/s", flush=True)
    for p in params:
        p.grad = None
    return rows


def add_ratios(rows: list[dict]) -> None:
    """For each of our rows, in its mode: ``vs_best_peer``, best peer ms / our ms (above 1 is faster than every
    peer), and ``vs_eager``, eager ms / our ms."""
    for case in group_rows(rows, ("op", "mode", "n", "hidden")):
        peers = [row for row in case if not row["ours"] and row["ms"] is not None]
        best = min(peers, key=lambda row: row["ms"], default=None)
        eager = next((row for row in peers if row["impl"] == EAGER), None)
        for row in case:
            if not row["ours"] or row["ms"] is None:
                continue
            if best is not None:
                row["best_peer"] = best["impl"]
                row["vs_best_peer"] = best["ms"] / row["ms"]
            if eager is not None:
                row["vs_eager"] = eager["ms"] / row["ms"]


def add_targets(rows: list[dict], copy_tb_s: float | None = None) -> None:
    """Marks our rows (after add_ratios): forward ``meets_fwd_tb_s`` (from FWD_TB_S_MIN_ELEMENTS; FWD_TB_S_TARGET
    scaled to ``copy_tb_s``, this GPU's measured copy rate), ``meets_fwd_vs_peer`` and both, ``meets_fwd_target``;
    forward+backward ``meets_fwd_bwd_target`` (vs eager)."""
    fwd_tb_s = copy_scaled(FWD_TB_S_TARGET, copy_tb_s)
    for row in rows:
        if not row["ours"] or row["ms"] is None:
            continue
        if row["mode"] == "fwd+bwd":
            mark_target(row, "vs_eager", FWD_BWD_VS_EAGER_TARGET, "meets_fwd_bwd_target")
            continue
        met = [mark_target(row, "vs_best_peer", FWD_VS_PEER_TARGET, "meets_fwd_vs_peer")]
        if row["n"] * row["hidden"] >= FWD_TB_S_MIN_ELEMENTS:
            met.append(mark_target(row, "tb_s", fwd_tb_s, "meets_fwd_tb_s"))
        met = [m for m in met if m is not None]
        if met:
            row["meets_fwd_target"] = all(met)


def add_backward_rates(rows: list[dict]) -> None:
    """For our fwd+bwd rows: the backward alone (fwd+bwd ms - fwd ms, 4*N*H*2 bytes: read dy, dh, h;
    write dx), its TB/s, and the target's ratio, the forward's TB/s over the backward's (<= 1.5)."""
    fwd = {(r["op"], r["n"], r["hidden"], r["impl"]): r for r in rows if r["mode"] == "fwd" and r["ms"]}
    for row in rows:
        f = fwd.get((row["op"], row["n"], row["hidden"], row["impl"]))
        if not (row["ours"] and row["mode"] == "fwd+bwd" and row["ms"] and f) or row["ms"] <= f["ms"]:
            continue
        row["bwd_ms"] = row["ms"] - f["ms"]
        row["bwd_tb_s"] = tb_per_s(row["bytes"] // 2, row["bwd_ms"])
        row["fwd_over_bwd_tb_s"] = f["tb_s"] / row["bwd_tb_s"]
        row["meets_bwd_target"] = row["fwd_over_bwd_tb_s"] <= BWD_TARGET


def _parse_sizes(text: str) -> list[tuple[int, int]]:
    return parse_pairs(text, "NxH")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="bench_norm", description=__doc__.split("\n\n")[0])
    parser.add_argument("--ops", default="layernorm,rmsnorm", help="comma-separated: layernorm,rmsnorm")
    parser.add_argument("--sizes", type=_parse_sizes, help="N x H list, e.g. 4096x4096,16384x4096")
    parser.add_argument("--quick", action="store_true", help=f"sizes {QUICK_SIZES}: a smoke run (CPU too)")
    parser.add_argument("--device", choices=("cuda", "cpu"), help="default: cuda when there is a GPU")
    parser.add_argument("--no-compile", action="store_true", help="leave the torch.compile peer out")
    parser.add_argument("--out-dir", type=common.writable_dir, help="where JSON + PNG go (default benchmarks/results/; "
                        "--quick: a temporary folder)")
    args = parser.parse_args(argv)
    with common.results_dir(common.out_dir(args, "norm")):
        return _run(args, parser)


def _run(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:

    ops = [o.strip() for o in args.ops.split(",") if o.strip()]
    unknown = sorted(set(ops) - set(OPS))
    if unknown or not ops:
        parser.error(f"--ops: expected a comma-separated subset of {list(OPS)}, got {args.ops!r}")
    device = torch.device(args.device) if args.device else default_device()
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA GPU is visible")
    sizes = args.sizes or (QUICK_SIZES if args.quick else SIZES)
    if device.type == "cpu" and sizes is SIZES:
        parser.error("on CPU the full grid (up to 32768x8192 with gradients) is too big: use --quick or --sizes")
    full_run = sizes is SIZES and ops == list(OPS)
    # a partial or quick GPU run must not overwrite the full grid's results; CPU results are never canonical
    if full_run or device.type == "cpu":
        name = "norm"
    elif sizes is SIZES and len(ops) == 1:
        name = f"norm_{ops[0]}"  # one op's full grid: a device call each, neither overwriting the other
    else:
        name = "norm_partial"

    copy_tb_s = measure_copy_tb_s() if device.type == "cuda" else None
    if copy_tb_s is not None:
        print(f"device-to-device copy here: {copy_tb_s:.2f} TB/s (H100 in BENCHMARKS.md: {COPY_TB_S})")
    rows = []
    for op in ops:
        for n, hidden in sizes:
            print(f"{OPS[op][1]} {n}x{hidden} bf16 on {device.type}", flush=True)
            torch._dynamo.reset()  # compile once per shape, from scratch, under the recompile limit
            rows += run_case(op, n, hidden, implementations(op, device, not args.no_compile), device)
            gc.collect()
            if device.type == "cuda":
                torch.cuda.empty_cache()
            add_ratios(rows)
            add_backward_rates(rows)
            add_targets(rows, copy_tb_s)
            save_results(name, {
                "bytes": "fwd 4*N*H*2 (read x, residual; write y, h); fwd+bwd 8*N*H*2 (plus read dy, dh, h; "
                         "write dx)",
                "roofline_tb_s": COPY_TB_S, "copy_tb_s_measured": copy_tb_s, "dtype": "bfloat16",
                "targets": {"fwd_tb_s": copy_scaled(FWD_TB_S_TARGET, copy_tb_s), "fwd_tb_s_on_h100": FWD_TB_S_TARGET,
                            "fwd_tb_s_from_elements": FWD_TB_S_MIN_ELEMENTS,
                            "fwd_vs_best_peer": FWD_VS_PEER_TARGET, "fwd_bwd_vs_eager": FWD_BWD_VS_EAGER_TARGET,
                            "fwd_over_bwd_tb_s_at_most": BWD_TARGET},
                "results": rows,
            }, device=device, packages=("liger_kernel", "llmfast"))
    size_labels = [f"{n}x{h}" for n, h in sizes]
    panels = {}
    for op in ops:
        for mode in MODES:
            impl_names = dict.fromkeys(r["impl"] for r in rows if r["op"] == op and r["mode"] == mode and r["tb_s"])
            tb = {(r["impl"], f"{r['n']}x{r['hidden']}"): r["tb_s"] for r in rows if r["op"] == op and r["mode"] == mode}
            panels[f"{OPS[op][1]} {mode}, bf16"] = (
                size_labels, {i: [tb.get((i, s)) for s in size_labels] for i in impl_names})
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    plot_bars(name, panels, ylabel="effective TB/s", device=device, title=f"fused add + norm, {where}",
              hline=COPY_TB_S if device.type == "cuda" else None, hline_label=f"H100 copy, {COPY_TB_S} TB/s")

    order = {m: i for i, m in enumerate(MODES)}
    table = sorted(rows, key=lambda r: (ops.index(r["op"]), order[r["mode"]], sizes.index((r["n"], r["hidden"]))))
    # the target columns: yes/no where a target applies to the row
    targets = {f">= {copy_scaled(FWD_TB_S_TARGET, copy_tb_s):.2f} TB/s": "meets_fwd_tb_s",
               f">= {FWD_VS_PEER_TARGET}x peer": "meets_fwd_vs_peer",
               "fwd target": "meets_fwd_target", f">= {FWD_BWD_VS_EAGER_TARGET}x eager": "meets_fwd_bwd_target",
               f"fwd/bwd <= {BWD_TARGET}": "meets_bwd_target"}
    print()
    print_table([{
        "op": OPS[r["op"]][1], "mode": r["mode"], "N x H": f"{r['n']}x{r['hidden']}", "impl": r["impl"],
        "ms": r["ms"], "TB/s": r["tb_s"],
        f"% of {COPY_TB_S} TB/s": None if r["roofline"] is None else 100 * r["roofline"],
        "x best peer": r.get("vs_best_peer") if r["ours"] else "", "x eager": r.get("vs_eager") if r["ours"] else "",
        "bwd TB/s": r.get("bwd_tb_s", ""), "fwd/bwd": r.get("fwd_over_bwd_tb_s", ""),
        **{column: r.get(flag, "") for column, flag in targets.items()},
    } for r in table], ["op", "mode", "N x H", "impl", "ms", "TB/s", f"% of {COPY_TB_S} TB/s", "x best peer",
                        "x eager", "bwd TB/s", "fwd/bwd", *targets])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
