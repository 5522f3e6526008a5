"""Kernel-level probe of the Triton add+norm launchers (a tuning aid, not the peer benchmark).

Calls llmfast_kernels.norm's launchers directly and times them with CUDA graphs
(``triton.testing.do_bench_cudagraph``, median), so the numbers are the kernels' own bandwidth without
dispatch or launch overhead; then lists register use and spills of every compiled variant.
bench_norm.py is the benchmark that measures the public ops against their peers in the same run.

    python -m benchmarks.probe_norm_kernels        # on a GPU; prints a table, writes results/{gpu}_norm_kernels.json
"""
from __future__ import annotations

import torch
import triton

import llmfast_kernels.norm as kernels

from .common import COPY_TB_S, gpu_name, save_results, tb_per_s

# (M, N) with M * N = 2^26 bf16 values per tensor, plus an unaligned hidden size
SHAPES = [(16384, 4096), (16384, 1024), (65536, 128), (8192, 8192), (16384, 5120), (4096, 16384),
          (2048, 32768), (1024, 65536), (4096, 11008)]


def probe(m: int, n: int, is_rms: bool, dtype: torch.dtype = torch.bfloat16) -> dict:
    x, r, dy, dh = (torch.randn(m, n, dtype=dtype, device="cuda") for _ in range(4))
    w = torch.rand(n, dtype=dtype, device="cuda") + 0.5
    b = None if is_rms else torch.randn(n, dtype=dtype, device="cuda")
    _, h, mean, rstd = kernels.add_norm_fwd(x, r, w, b, 1e-5, is_rms)
    tensor_bytes = m * n * x.element_size()
    bench = lambda fn: triton.testing.do_bench_cudagraph(fn, rep=100, return_mode="median")  # noqa: E731
    fwd = bench(lambda: kernels.add_norm_fwd(x, r, w, b, 1e-5, is_rms))
    bwd_dh = bench(lambda: kernels.add_norm_bwd(dy, dh, h, w, w is not None, b is not None, mean, rstd, is_rms))
    bwd = bench(lambda: kernels.add_norm_bwd(dy, None, h, w, w is not None, b is not None, mean, rstd, is_rms))
    return {
        "op": "rmsnorm" if is_rms else "layernorm", "M": m, "N": n, "dtype": str(dtype).replace("torch.", ""),
        "fwd_us": 1e3 * fwd,
        "fwd_tb_s": tb_per_s(4 * tensor_bytes, fwd),          # read x, residual; write y, h
        "bwd_with_dh_tb_s": tb_per_s(4 * tensor_bytes, bwd_dh),  # read dy, dh, h; write dx
        "bwd_tb_s": tb_per_s(3 * tensor_bytes, bwd),          # read dy, h; write dx
    }


def compiled_variants() -> list[dict]:
    rows = []
    for name in ("_add_norm_fwd_kernel", "_add_norm_fwd_chunked_kernel", "_add_norm_bwd_row_stats_kernel",
                 "_add_norm_bwd_kernel"):
        for cache in getattr(kernels, name).device_caches.values():
            for compiled in cache[0].values():
                compiled._init_handles()
                rows.append({"kernel": name, "regs": compiled.n_regs, "spills": compiled.n_spills,
                             "num_warps": compiled.metadata.num_warps})
    return rows


def main(argv: list[str] | None = None) -> None:
    if not torch.cuda.is_available():
        raise SystemExit("probe_norm_kernels needs a CUDA GPU")
    rows = [probe(m, n, is_rms) for m, n in SHAPES for is_rms in (True, False)]
    rows += [probe(m, n, True, dtype) for dtype in (torch.float32, torch.float16) for m, n in [(8192, 8192), (4096, 16384)]]
    print(f"{'op':<10} {'dtype':<9} {'M':>6} {'N':>6} {'fwd us':>8} {'fwd TB/s':>9} {'bwd+dh TB/s':>12} {'bwd TB/s':>9}")
    for row in rows:
        print(f"{row['op']:<10} {row['dtype']:<9} {row['M']:>6} {row['N']:>6} {row['fwd_us']:>8.1f} "
              f"{row['fwd_tb_s']:>9.2f} {row['bwd_with_dh_tb_s']:>12.2f} {row['bwd_tb_s']:>9.2f}")
    variants = compiled_variants()
    spilling = [v for v in variants if v["spills"]]
    print(f"{len(variants)} compiled variants, {len(spilling)} with spills: {spilling}")
    save_results("norm_kernels", {"roofline_tb_s": COPY_TB_S, "rows": rows, "compiled_variants": variants})
    print(f"wrote results/{gpu_name()}_norm_kernels.json")


if __name__ == "__main__":
    main()
