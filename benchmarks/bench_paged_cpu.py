"""Paged attention and write_kv_cache on CPU: our C++ kernels (``backend="cpu"``, the public ops as the engine
calls them, index checks included) against PyTorch given the same keys and values, measured in the same run.

    python -m benchmarks.bench_paged_cpu            # -> results/cpu_paged.json, .png (_avx2 without AVX-512)
    python -m benchmarks.bench_paged_cpu --quick    # small cases, results to a temporary folder (or --out-dir)

Peers of paged_attention:
    sdpa (contiguous cache)  F.scaled_dot_product_attention(enable_gqa=True) on (batch, kv_heads, context,
                             head_dim) tensors: attention without paging, the speed a paged kernel aims at
    gather + sdpa            each call gathers the sequences' blocks into such tensors, then runs SDPA: a
                             paged cache without a paged kernel
Decode has one query token per sequence; chunked prefill is one sequence whose last ``new`` tokens attend
causally (bottom-right) over its whole context, an explicit mask for SDPA. The caches' blocks are shuffled,
as after a while of serving. write_kv_cache's peer is ``index_copy_`` into the flattened caches.
"GB/s" counts the same bytes for every implementation, so GB/s ratios are time ratios: paged_attention,
the K + V of the context read once (2 * batch * context * kv_heads * head_dim * element size); write_kv_cache,
k and v read and written (4 * tokens * kv_heads * head_dim * element size).
Shapes: the CPU throughput benchmark's model (GQA 8/4, head_dim 64, float32), and issue 5's GQA 32/8,
head_dim 128 in float32, bfloat16 and float16. Each case is timed --repeats times, implementations interleaved.
"""
from __future__ import annotations

import argparse
import os
import statistics

import torch
import torch.nn.functional as F

import llmfast
from llmfast.ops import paged_attention, write_kv_cache
from . import common
from .common import plot_bars, print_table, save_results

BLOCK_SIZE = 16
# name -> (heads, kv_heads, head_dim, dtype)
SHAPES = {
    "engine 8/4 D64 fp32": (8, 4, 64, torch.float32),
    "32/8 D128 fp32": (32, 8, 128, torch.float32),
    "32/8 D128 bf16": (32, 8, 128, torch.bfloat16),
    "32/8 D128 fp16": (32, 8, 128, torch.float16),
}
DECODE = [(1, 4096), (32, 256), (32, 2048)]  # (batch, context)
PREFILL = [(256, 2048)]  # (new tokens, context) of one sequence
WRITE_TOKENS = [32, 2048]  # one decode step of 32 sequences; one prefill chunk
QUICK = ({"engine 8/4 D64 fp32": SHAPES["engine 8/4 D64 fp32"]}, [(2, 64)], [(16, 48)], [8])
OURS, SDPA, GATHER = "ours (cpu)", "sdpa (contiguous cache)", "gather + sdpa"
WRITE_PEER = "index_copy_"
REL_ERR = {torch.float32: 1e-4, torch.bfloat16: 2e-2, torch.float16: 3e-3}  # ||ours - sdpa|| / ||sdpa||


def _caches(seqs: int, context: int, kv_heads: int, head_dim: int, dtype: torch.dtype):
    """Shuffled paged caches holding ``seqs`` sequences of ``context`` tokens, and their block tables."""
    blocks_per_seq = -(-context // BLOCK_SIZE)
    num_blocks = seqs * blocks_per_seq
    k_cache = torch.randn(num_blocks, BLOCK_SIZE, kv_heads, head_dim, dtype=dtype)
    v_cache = torch.randn_like(k_cache)
    block_tables = torch.randperm(num_blocks, dtype=torch.int32).view(seqs, blocks_per_seq)
    return k_cache, v_cache, block_tables


def _gather(cache: torch.Tensor, block_tables: torch.Tensor, context: int) -> torch.Tensor:
    """(seqs, kv_heads, context, head_dim), contiguous."""
    seqs, kv_heads, head_dim = block_tables.shape[0], cache.shape[2], cache.shape[3]
    blocks = cache[block_tables.long()].view(seqs, -1, kv_heads, head_dim)[:, :context]
    return blocks.transpose(1, 2).contiguous()


def attention_impls(shape: tuple, batch: int, context: int, new: int | None) -> tuple[dict, torch.Tensor, int]:
    """name -> fn() -> output (queries, heads, head_dim); the expected output (SDPA); the K + V bytes.
    ``new`` None: decode of ``batch`` sequences; else chunked prefill of one sequence's last ``new`` tokens."""
    heads, kv_heads, head_dim, dtype = shape
    torch.manual_seed(0)
    k_cache, v_cache, block_tables = _caches(batch, context, kv_heads, head_dim, dtype)
    context_lens = torch.full((batch,), context, dtype=torch.int32)
    queries = batch if new is None else new
    q = torch.randn(queries, heads, head_dim, dtype=dtype)
    scale = head_dim ** -0.5
    if new is None:
        extra, q_sdpa, mask = {}, q[:, :, None], None  # (batch, heads, 1, head_dim)
    else:
        extra = {"cu_seqlens_q": torch.tensor([0, new], dtype=torch.int32), "max_seqlen_q": new}
        q_sdpa = q.transpose(0, 1)[None]  # (1, heads, new, head_dim)
        rows, cols = torch.arange(new)[:, None], torch.arange(context)[None]
        mask = cols <= rows + (context - new)  # bottom-right causal

    def sdpa(k, v):
        out = F.scaled_dot_product_attention(q_sdpa, k, v, attn_mask=mask, scale=scale, enable_gqa=True)
        return out[:, :, 0] if new is None else out[0].transpose(0, 1)

    k, v = _gather(k_cache, block_tables, context), _gather(v_cache, block_tables, context)
    impls = {
        OURS: lambda: paged_attention(q, k_cache, v_cache, block_tables, context_lens, softmax_scale=scale,
                                      backend="cpu", **extra),
        SDPA: lambda: sdpa(k, v),
        GATHER: lambda: sdpa(_gather(k_cache, block_tables, context), _gather(v_cache, block_tables, context)),
    }
    return impls, impls[SDPA](), 2 * k.numel() * k.element_size()


def write_impls(shape: tuple, tokens: int) -> tuple[dict, tuple, int]:
    """name -> fn() writing ``tokens`` keys and values at shuffled slots; (k, v, caches, slots); the bytes."""
    _, kv_heads, head_dim, dtype = shape
    torch.manual_seed(0)
    num_blocks = 2 * tokens // BLOCK_SIZE + 1
    k = torch.randn(tokens, kv_heads, head_dim, dtype=dtype)
    v = torch.randn_like(k)
    k_cache = torch.zeros(num_blocks, BLOCK_SIZE, kv_heads, head_dim, dtype=dtype)
    v_cache = torch.zeros_like(k_cache)
    slots = torch.randperm(num_blocks * BLOCK_SIZE)[:tokens]
    flat_k, flat_v = k_cache.view(-1, kv_heads, head_dim), v_cache.view(-1, kv_heads, head_dim)
    impls = {
        OURS: lambda: write_kv_cache(k, v, k_cache, v_cache, slots, backend="cpu"),
        WRITE_PEER: lambda: (flat_k.index_copy_(0, slots, k), flat_v.index_copy_(0, slots, v)),
    }
    return impls, (k, v, k_cache, v_cache, slots), 4 * k.numel() * k.element_size()


def check_attention(out: torch.Tensor, expected: torch.Tensor, case: str) -> float:
    rel = ((out.double() - expected.double()).norm() / expected.double().norm()).item()
    if not rel <= REL_ERR[expected.dtype]:
        raise AssertionError(f"paged_attention (cpu), {case}: relative error {rel:.3g} from SDPA")
    return rel


def check_write(fn, k, v, k_cache, v_cache, slots, case: str) -> None:
    k_cache.zero_(), v_cache.zero_()
    fn()
    blocks, offsets = slots // BLOCK_SIZE, slots % BLOCK_SIZE
    if not (torch.equal(k_cache[blocks, offsets], k) and torch.equal(v_cache[blocks, offsets], v)):
        raise AssertionError(f"write_kv_cache (cpu), {case}: wrong values in the caches")


def timed_rows(impls: dict, nbytes: int, repeats: int, base: dict) -> list[dict]:
    times = common.interleaved_ms(impls, repeats)
    rows = []
    for name, ms_list in times.items():
        ms = statistics.median(ms_list)
        rows.append({**base, "impl": name, "ours": name == OURS, "bytes": nbytes, "ms": ms,
                     "ms_min": min(ms_list), "ms_max": max(ms_list), "gb_s": nbytes / ms / 1e6})
    ours = next(r for r in rows if r["ours"])
    for row in rows:
        row["ours_x"] = row["ms"] / ours["ms"]  # > 1: ours is faster than this implementation
    for row in rows:
        print(f"  {base['op']:14} {base['case']:12} {row['impl']:24} {row['ms']:9.3f} ms "
              f"({row['ms_min']:.3g}..{row['ms_max']:.3g})  {row['gb_s']:6.1f} GB/s", flush=True)
    return rows


def run(shapes: dict, decode: list, prefill: list, write_tokens: list, repeats: int) -> list[dict]:
    rows = []
    for shape_name, shape in shapes.items():
        print(f"{shape_name} (heads, kv_heads, head_dim, dtype = {shape})", flush=True)
        cases = [("decode", f"{b}x{c}", b, c, None) for b, c in decode]
        cases += [("prefill", f"{n} of {c}", 1, c, n) for n, c in prefill]
        for op, case, batch, context, new in cases:
            impls, expected, nbytes = attention_impls(shape, batch, context, new)
            rel = check_attention(impls[OURS](), expected, f"{shape_name} {op} {case}")
            base = {"shape": shape_name, "op": op, "case": case, "batch": batch, "context": context, "new": new}
            rows += [{**r, "rel_err_vs_sdpa": rel} if r["ours"] else r
                     for r in timed_rows(impls, nbytes, repeats, base)]
        for tokens in write_tokens:
            impls, tensors, nbytes = write_impls(shape, tokens)
            for fn in impls.values():
                check_write(fn, *tensors, f"{shape_name}, {tokens} tokens")
            rows += timed_rows(impls, nbytes, repeats, {"shape": shape_name, "op": "write_kv_cache",
                                                        "case": f"{tokens} tokens", "tokens": tokens})
    return rows


def save(rows: list[dict], shapes: dict, repeats: int) -> None:
    """results/cpu_paged.json and .png: every row; ours' speed over each peer per shape and case."""
    save_results("paged", {
        "what": "llmfast paged_attention / write_kv_cache backend='cpu' (public ops) against PyTorch",
        "bytes": "paged_attention: K + V of the context; write_kv_cache: k, v read + written",
        "shapes": {name: {"heads": h, "kv_heads": kv, "head_dim": d, "dtype": str(dt)}
                   for name, (h, kv, d, dt) in shapes.items()},
        "block_size": BLOCK_SIZE, "threads": torch.get_num_threads(), "cpu_count": os.cpu_count(),
        "repeats": repeats, "results": rows,
    }, device="cpu", packages=("llmfast",))
    panels = {}
    for shape_name in shapes:
        case_rows = [r for r in rows if r["shape"] == shape_name and not r["ours"]]
        # two lines a label: one line overlapped its neighbours
        labels = list(dict.fromkeys(f"{r['op']}\n{r['case']}" for r in case_rows))
        speed = {(r["impl"], f"{r['op']}\n{r['case']}"): r["ours_x"] for r in case_rows}
        peers = dict.fromkeys(r["impl"] for r in case_rows)
        panels[shape_name] = (labels, {f"vs {p}": [speed.get((p, x)) for x in labels] for p in peers})
    plot_bars("paged", panels, ylabel="ours' speed over the peer (higher is better)", hline=1.0,
              hline_label="as fast", device="cpu", title="paged KV cache on CPU, C++ kernels")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="bench_paged_cpu", description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="one small shape and case of each op: a smoke run")
    parser.add_argument("--repeats", type=common.positive_int, default=3,
                        help="timings per case, implementations interleaved")
    parser.add_argument("--threads", type=common.positive_int, help="torch CPU threads (default: torch's own)")
    parser.add_argument("--out-dir", type=common.writable_dir, help="where JSON + PNG go (default benchmarks/results/; "
                        "--quick: a temporary folder)")
    args = parser.parse_args(argv)
    missing = [op for op in ("paged_attention", "write_kv_cache") if "cpu" not in llmfast.available_backends(op)]
    if missing:
        raise SystemExit(f"llmfast._C lacks the C++ CPU {' and '.join(missing)} here: nothing of ours to time")
    shapes, decode, prefill, write_tokens = QUICK if args.quick else (SHAPES, DECODE, PREFILL, WRITE_TOKENS)
    with common.torch_threads(args.threads):
        print(f"CPU, {torch.get_num_threads()} threads, blocks of {BLOCK_SIZE}")
        rows = run(shapes, decode, prefill, write_tokens, args.repeats)
        with common.results_dir(common.out_dir(args, "paged")):
            save(rows, shapes, args.repeats)

    print()
    print_table([{
        "shape": r["shape"], "op": r["op"], "case": r["case"], "impl": r["impl"], "ms": r["ms"],
        "spread ms": f"{r['ms_min']:.3g}..{r['ms_max']:.3g}", "GB/s": r["gb_s"],
        "ours x": "" if r["ours"] else r["ours_x"],
    } for r in rows], ["shape", "op", "case", "impl", "ms", "spread ms", "GB/s", "ours x"])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
