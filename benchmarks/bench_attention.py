"""Flash attention in bf16: our Triton kernels against F.scaled_dot_product_attention forced to its flash,
cuDNN and efficient backends, forward and backward, measured in the same run. GPU only.

    python -m benchmarks.bench_attention            # the full grid -> results/{gpu}_attention.json, .png
    python -m benchmarks.bench_attention --quick    # one tiny case, results to a temporary folder (or --out-dir)
    python -m benchmarks.bench_attention --causal yes   # half the grid -> results/{gpu}_attention_causal.*

The results file is rewritten after every case, so a run stopped by a time limit keeps what it measured.

FLOPs counted per case, the same for every implementation (so TFLOP/s ratios are time ratios):
    fwd  4 * B * H * S^2 * D (two matmuls of 2 * S^2 * D each per head), halved when causal
    bwd  2.5 x the forward's (five matmuls against the forward's two)
Varlen: 32 sequences of random lengths 64..2048 (seed 0), the FLOPs summed over the sequences; SDPA
gets them padded to the longest, as a batch, so it also spends time on padding: that is the cost
varlen avoids. Layouts are each side's native one: ours (B, S, H, D), SDPA (B, H, S, D).
"""
from __future__ import annotations

import argparse
import gc
import sys
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F

from llmfast.ops.attention import attention
from llmfast_kernels import attention as fwd_kernels
from . import common
from .common import BF16_TFLOPS, bench_ms, default_device, plot_bars, print_table, save_results

# (batch, heads, seqlen, head_dim), as issue 3 and BENCHMARKS.md list them
CASES = [(16, 16, 1024, 64), (4, 32, 4096, 128), (2, 32, 8192, 128), (1, 32, 16384, 128)]
QUICK_CASES = [(1, 4, 256, 64)]
VARLEN_SEQS, VARLEN_MIN, VARLEN_MAX, VARLEN_HEADS, VARLEN_HEAD_DIM = 32, 64, 2048, 32, 128
MODES = ("fwd", "bwd")
BWD_FLOP_RATIO = 2.5
DTYPE = torch.bfloat16
OURS = "ours (triton)"
PEERS = ("flash", "cudnn", "efficient")
REFERENCE_PEER = "cudnn"  # the targets are stated against it (BENCHMARKS.md)
# the forward's launch handles (one is used per call): the config the autotuner picked is read from them
FWD_HANDLES = (fwd_kernels._attn_fwd_sm90_either, fwd_kernels._attn_fwd_sm90, fwd_kernels._attn_fwd_sm90_tma,
               fwd_kernels._attn_fwd_sm80)
ATOL = 0.03  # bf16 outputs of two correct kernels differ by a rounding or two (|o| <= max |v|)


@dataclass
class Case:
    """One timed configuration: ``make(impl)`` returns (forward closure, its leaf inputs) or raises."""
    label: str
    causal: bool
    fwd_flops: float
    make: Callable[[str], tuple[Callable[[], torch.Tensor], list[torch.Tensor]]]


def _sdpa_backend(name: str):
    from torch.nn.attention import SDPBackend

    return {"flash": SDPBackend.FLASH_ATTENTION, "cudnn": SDPBackend.CUDNN_ATTENTION,
            "efficient": SDPBackend.EFFICIENT_ATTENTION}[name]


def _sdpa(q, k, v, causal: bool, backend: str) -> torch.Tensor:
    from torch.nn.attention import sdpa_kernel

    with sdpa_kernel(_sdpa_backend(backend)):
        return F.scaled_dot_product_attention(q, k, v, is_causal=causal)


def _leaf(*shape, device) -> torch.Tensor:
    return torch.randn(*shape, dtype=DTYPE, device=device).requires_grad_()


def dense_case(batch: int, heads: int, seqlen: int, head_dim: int, causal: bool, device) -> Case:
    flops = 4 * batch * heads * seqlen**2 * head_dim / (2 if causal else 1)

    def make(impl: str):
        if impl == OURS:
            q, k, v = (_leaf(batch, seqlen, heads, head_dim, device=device) for _ in range(3))
            return (lambda: attention(q, k, v, causal=causal, backend="triton")), [q, k, v]
        q, k, v = (_leaf(batch, heads, seqlen, head_dim, device=device) for _ in range(3))
        return (lambda: _sdpa(q, k, v, causal, impl)), [q, k, v]

    return Case(f"{batch},{heads},{seqlen},{head_dim}", causal, flops, make)


def varlen_case(causal: bool, device) -> Case:
    gen = torch.Generator().manual_seed(0)
    lengths = torch.randint(VARLEN_MIN, VARLEN_MAX + 1, (VARLEN_SEQS,), generator=gen).tolist()
    heads, head_dim, longest = VARLEN_HEADS, VARLEN_HEAD_DIM, max(lengths)
    flops = sum(4 * heads * n**2 * head_dim / (2 if causal else 1) for n in lengths)
    cu_seqlens = torch.tensor([0, *lengths], device=device).cumsum(0).to(torch.int32)

    def make(impl: str):
        if impl == OURS:
            q, k, v = (_leaf(sum(lengths), heads, head_dim, device=device) for _ in range(3))
            return (lambda: attention(q, k, v, causal=causal, cu_seqlens_q=cu_seqlens, cu_seqlens_k=cu_seqlens,
                                      max_seqlen_q=longest, max_seqlen_k=longest, backend="triton")), [q, k, v]
        # padded to the longest sequence: with right padding, causal masking of the real tokens is unchanged
        q, k, v = (_leaf(VARLEN_SEQS, heads, longest, head_dim, device=device) for _ in range(3))
        return (lambda: _sdpa(q, k, v, causal, impl)), [q, k, v]

    return Case(f"varlen {VARLEN_SEQS}x{VARLEN_MIN}..{VARLEN_MAX},{heads},{head_dim}", causal, flops, make)


def check_ours(batch: int, heads: int, seqlen: int, head_dim: int, causal: bool, device) -> float:
    """Max |ours - SDPA (any backend) | on one input in (B, S, H, D); raises when clearly wrong."""
    q, k, v = (torch.randn(batch, seqlen, heads, head_dim, dtype=DTYPE, device=device) for _ in range(3))
    with torch.no_grad():
        ours = attention(q, k, v, causal=causal, backend="triton")
        peer = F.scaled_dot_product_attention(*(t.transpose(1, 2) for t in (q, k, v)), is_causal=causal)
    diff = (ours.float() - peer.transpose(1, 2).float()).abs().max().item()
    if diff > ATOL:
        raise AssertionError(f"ours differs from SDPA by {diff:.3g} (> {ATOL}) at {batch},{heads},{seqlen},{head_dim}")
    return diff


def time_case(case: Case) -> list[dict]:
    """Forward and backward ms and TFLOP/s of ours and every SDPA backend on ``case``."""
    rows = []
    for impl in (OURS, *PEERS):
        base = {"case": case.label, "causal": case.causal, "impl": impl, "ours": impl == OURS}
        try:
            fwd, inputs = case.make(impl)
            for handle in FWD_HANDLES:
                handle.best_config = None
            out = fwd()  # compiles and autotunes ours; a peer that cannot run this shape raises here
            if impl == OURS:  # on sm_90 the forward's autotuner may also choose between pointer and TMA loads
                chosen = next((h.best_config for h in FWD_HANDLES if getattr(h, "best_config", None)), None)
                base["fwd_config"] = str(chosen.all_kwargs()) if chosen else None
            dout = torch.randn_like(out)
            out.backward(dout, retain_graph=True)
            fwd_ms = bench_ms(fwd)
            bwd_ms = bench_ms(lambda: out.backward(dout, retain_graph=True), grad_to_none=inputs)
        except Exception as exc:  # a peer that fails is reported n/a; ours must work
            if impl == OURS:
                raise
            error = f"{type(exc).__name__}: {exc}"[:300]
            rows += [{**base, "mode": mode, "ms": None, "tflops": None, "error": error} for mode in MODES]
            print(f"  {impl}: n/a ({error})")
            continue
        for mode, ms in (("fwd", fwd_ms), ("bwd", bwd_ms)):
            flops = case.fwd_flops * (BWD_FLOP_RATIO if mode == "bwd" else 1)
            tflops = flops / ms / 1e9
            rows.append({**base, "mode": mode, "ms": ms, "tflops": tflops, "of_peak": tflops / BF16_TFLOPS})
            print(f"  {mode} {impl:14} {ms:9.3f} ms  {tflops:6.1f} TFLOP/s", flush=True)
        del out, dout, inputs, fwd
        gc.collect()
        torch.cuda.empty_cache()
    return rows


def add_ratios(rows: list[dict]) -> None:
    """On our rows: ``vs_<peer>`` = peer ms / our ms (above 1: we are faster), and ``vs_best_peer``."""
    groups: dict[tuple, list[dict]] = {}
    for row in rows:
        groups.setdefault((row["case"], row["causal"], row["mode"]), []).append(row)
    for group in groups.values():
        ours = next(r for r in group if r["ours"])
        peers = {r["impl"]: r for r in group if not r["ours"] and r["ms"] is not None}
        for name, peer in peers.items():
            ours[f"vs_{name}"] = peer["ms"] / ours["ms"]
        if peers:
            best = min(peers.values(), key=lambda r: r["ms"])
            ours["best_peer"], ours["vs_best_peer"] = best["impl"], best["ms"] / ours["ms"]


def _plot(name: str, rows: list[dict], device) -> None:
    panels = {}
    for mode in MODES:
        for causal in (False, True):
            sel = [r for r in rows if r["mode"] == mode and r["causal"] == causal]
            labels = list(dict.fromkeys(r["case"] for r in sel))
            tflops = {(r["impl"], r["case"]): r["tflops"] for r in sel}
            panels[f"{mode}, {'causal' if causal else 'non-causal'}, bf16"] = (
                labels, {impl: [tflops.get((impl, c)) for c in labels] for impl in (OURS, *PEERS)})
    plot_bars(name, panels, ylabel="TFLOP/s", device=device, hline=BF16_TFLOPS,
              hline_label=f"bf16 matmul, {BF16_TFLOPS:.0f} TFLOP/s",
              title=f"attention (B,H,S,D), {torch.cuda.get_device_name(device)}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="bench_attention", description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help=f"one tiny case {QUICK_CASES[0]}, no varlen")
    parser.add_argument("--causal", choices=("both", "no", "yes"), default="both",
                        help="the causal cases, the non-causal ones, or both (default; may not fit one device call)")
    parser.add_argument("--device", choices=("cuda",), help="cuda (the only device it runs on)")
    parser.add_argument("--out-dir", type=common.writable_dir, help="where JSON + PNG go (default benchmarks/results/; "
                        "with --quick a temporary folder)")
    args = parser.parse_args(argv)
    device = torch.device(args.device) if args.device else default_device()
    if device.type != "cuda" or not torch.cuda.is_available():
        print(f"{parser.prog}: needs a CUDA GPU (the SDPA peers and our kernels' timings are GPU-only); "
              "no results written", file=sys.stderr)
        return 2
    with common.results_dir(common.out_dir(args, "attention")):
        return _run(args, device)


def _run(args: argparse.Namespace, device: torch.device) -> int:
    """Times every case, saving the results after each (a run cut short keeps what it measured)."""
    cases_shapes = QUICK_CASES if args.quick else CASES
    causals = {"both": (False, True), "no": (False,), "yes": (True,)}[args.causal]
    # a quick or half run must not overwrite the full grid's results
    name = "attention_quick" if args.quick else {"both": "attention", "no": "attention_noncausal",
                                                  "yes": "attention_causal"}[args.causal]
    checks = {}
    rows = []

    def save() -> None:
        add_ratios(rows)
        save_results(name, {
            "flops": "fwd 4*B*H*S^2*D, halved when causal; bwd 2.5x fwd; varlen summed over sequences "
                     "(SDPA runs on the padded batch)",
            "dtype": "bfloat16", "peak_tflops": BF16_TFLOPS, "max_abs_diff_vs_sdpa": checks, "results": rows,
        }, device=device, packages=("llmfast",))

    for causal in causals:
        for shape in [*cases_shapes, *([] if args.quick else ["varlen"])]:
            if shape == "varlen":
                case = varlen_case(causal, device)
            else:
                checks[f"{shape} causal={causal}"] = check_ours(*shape, causal, device)
                case = dense_case(*shape, causal, device)
            print(f"{case.label} causal={causal}", flush=True)
            rows += time_case(case)
            save()
    _plot(name, rows, device)

    print()
    peak = f"% of {BF16_TFLOPS:.0f}"
    print_table([{
        "B,H,S,D": r["case"], "causal": "yes" if r["causal"] else "no", "mode": r["mode"], "impl": r["impl"],
        "ms": r["ms"], "TFLOP/s": r["tflops"], peak: None if r["ms"] is None else 100 * r["of_peak"],
        "x cudnn": r.get(f"vs_{REFERENCE_PEER}", "") if r["ours"] else "",
        "x best peer": r.get("vs_best_peer", "") if r["ours"] else "",
    } for r in rows], ["B,H,S,D", "causal", "mode", "impl", "ms", "TFLOP/s", peak, "x cudnn", "x best peer"])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
