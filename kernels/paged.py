"""Paged KV cache in Triton: write new tokens into cache blocks, and attend over them (flash-decoding).

Cache layout ``(num_blocks, block_size, kv_heads, head_dim)``, any strides. One attention kernel serves
decode and chunked prefill: a program owns one (sequence, kv head, tile of query rows, split of the
keys), where a query row is one (query token, query head of the kv head's group). All rows of a group
share each K/V tile, so a block is read from memory once per group, not once per query head. Scores are
``tl.dot``s with the rows padded to at least 16: tensor cores make the wasted rows free in a
bandwidth-bound decode, whereas a broadcast multiply would hold rows x keys x head_dim products in
registers (spilling at head_dim 256) and cap the key tile. The launchers size everything from shapes,
never from device values, so a decode step can be captured in a CUDA graph.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from llmfast_kernels.limits import MAX_GRID_YZ

# Programs that fill the GPU: one per SM of an H100 (132). On CPU (the interpreter) a small number, so
# that tests reach the split path with few programs.
CPU_PROGRAMS = 4
# A split gets at least this many keys: fewer would make the reduce pass cost more than it saves.
MIN_SPLIT_KEYS = 128
MAX_SPLITS = 64
NO_SCORE = tl.constexpr(-3.4028234663852886e38)  # the lowest float32: the running max before any key
MAX_GRID_Z = MAX_GRID_YZ  # the grid's z size is tiles * splits of one sequence
# Query rows per prefill program (tokens x group heads; decode uses max(16, group) rows) and keys per
# tile: not yet tuned on the H100. The interpreter pays a fixed cost per op and program, so on CPU the
# tiles are larger and fewer.
PREFILL_ROWS = {"cuda": 64, "cpu": 256}
KEYS_PER_TILE = {"cuda": 64, "cpu": 128}
LOG2E = 1.4426950408889634
_TL_DTYPES = {torch.float16: tl.float16, torch.bfloat16: tl.bfloat16, torch.float32: tl.float32}


@triton.jit
def _write_kv_cache_kernel(
    K, V, KCache, VCache, SlotMapping,  # K, V: (tokens, kv_heads, head_dim); SlotMapping: (tokens,) int64
    stride_kt, stride_kh, stride_vt, stride_vh,
    stride_kc_block, stride_kc_slot, stride_kc_head, stride_kc_dim,
    stride_vc_block, stride_vc_slot, stride_vc_head, stride_vc_dim,
    kv_heads, head_dim,
    BLOCK_SIZE: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """One token per program: its (kv_heads, head_dim) key and value go to slot SlotMapping[t]."""
    t = tl.program_id(0)
    slot = tl.load(SlotMapping + t)
    # -1: a padding token, neither read nor written (a (1, BLOCK_D) mask: the interpreter rejects a
    # scalar one)
    keep = (slot + tl.zeros([1, BLOCK_D], dtype=tl.int64)) >= 0
    block = slot // BLOCK_SIZE
    offset = slot % BLOCK_SIZE
    heads = tl.arange(0, BLOCK_H).to(tl.int64)[:, None]  # int64: any cache strides, however large
    dims = tl.arange(0, BLOCK_D)[None, :]
    mask = (heads < kv_heads) & (dims < head_dim) & keep
    t64 = t.to(tl.int64)
    k = tl.load(K + t64 * stride_kt + heads * stride_kh + dims, mask=mask)
    v = tl.load(V + t64 * stride_vt + heads * stride_vh + dims, mask=mask)
    k_dst = KCache + block * stride_kc_block + offset * stride_kc_slot + heads * stride_kc_head + dims * stride_kc_dim
    v_dst = VCache + block * stride_vc_block + offset * stride_vc_slot + heads * stride_vc_head + dims * stride_vc_dim
    tl.store(k_dst, k, mask=mask)
    tl.store(v_dst, v, mask=mask)


def write_kv_cache(k: Tensor, v: Tensor, k_cache: Tensor, v_cache: Tensor, slot_mapping: Tensor) -> None:
    """k, v: (tokens, kv_heads, head_dim) with unit head_dim stride; caches as in the module docstring;
    slot_mapping: int64 (tokens,), validated by llmfast.ops.kv_cache. Writes the caches in place."""
    tokens, kv_heads, head_dim = k.shape
    if tokens == 0:
        return
    k, v = k.contiguous(), v.contiguous()
    _write_kv_cache_kernel[(tokens,)](
        k, v, k_cache, v_cache, slot_mapping,
        k.stride(0), k.stride(1), v.stride(0), v.stride(1),
        *k_cache.stride(), *v_cache.stride(),
        kv_heads, head_dim,
        BLOCK_SIZE=k_cache.shape[1], BLOCK_H=triton.next_power_of_2(kv_heads),
        BLOCK_D=triton.next_power_of_2(head_dim), num_warps=4,
    )


@triton.jit
def _paged_attention_kernel(
    Q, KCache, VCache, BlockTables, ContextLens, CuSeqlensQ,
    Out, PartAcc, PartMax, PartSum,  # Out like Q; PartAcc (total_q, heads, splits, head_dim) fp32; Part*: (total_q, heads, splits)
    stride_qt, stride_qh, stride_ot, stride_oh,
    stride_kc_block, stride_kc_slot, stride_kc_head, stride_kc_dim,
    stride_vc_block, stride_vc_slot, stride_vc_head, stride_vc_dim,
    stride_bt,
    heads, head_dim, group, tokens_per_tile, scale_log2,
    DECODE: tl.constexpr, NUM_SPLITS: tl.constexpr, BLOCK_SIZE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    DOT_DTYPE: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    """Program (seq, kv_head, tile * NUM_SPLITS + split): query rows r = (token r // group, head
    kv_head * group + r % group) of the tile, over keys of the split's share of their causal range.
    NUM_SPLITS == 1 writes Out; otherwise the unnormalised partial (acc, max, sum) for the reduce."""
    seq = tl.program_id(0)
    kv_head = tl.program_id(1)
    tile = tl.program_id(2) // NUM_SPLITS
    split = tl.program_id(2) % NUM_SPLITS
    context = tl.load(ContextLens + seq)
    if DECODE:
        q_start = seq
        n_q = 1
    else:
        q_start = tl.load(CuSeqlensQ + seq)
        n_q = tl.load(CuSeqlensQ + seq + 1) - q_start

    rows = tl.arange(0, BLOCK_M)
    token = tile * tokens_per_tile + rows // group  # index among the sequence's queries
    head = kv_head * group + rows % group
    row_valid = (rows < tokens_per_tile * group) & (token < n_q)
    q_pos = context - n_q + token  # queries are the last tokens of the context
    dims = tl.arange(0, BLOCK_D)
    dim_valid = dims < head_dim

    # keys this tile's last query sees, then this split's share of them in whole BLOCK_N tiles
    tile_tokens = tl.minimum(n_q - tile * tokens_per_tile, tokens_per_tile)
    kv_end = tl.where(tile_tokens > 0, context - n_q + tile * tokens_per_tile + tile_tokens, 0)
    split_len = tl.cdiv(tl.cdiv(kv_end, NUM_SPLITS), BLOCK_N) * BLOCK_N
    kv_lo = split * split_len
    kv_hi = tl.minimum(kv_lo + split_len, kv_end)

    q_rows = (q_start + token).to(tl.int64)
    q_mask = row_valid[:, None] & dim_valid[None, :]
    q = tl.load(Q + q_rows[:, None] * stride_qt + head[:, None] * stride_qh + dims[None, :], mask=q_mask, other=0.0)
    q = q.to(DOT_DTYPE)

    # finite start: a row that sees no key keeps m = NO_SCORE, l = 0, and exp2(-inf - m) stays 0 (not NaN);
    # the lowest float32, so that a row whose every score is finite but tiny (-2e36) still weighs its keys
    m_i = tl.full([BLOCK_M], NO_SCORE, dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    table = BlockTables + seq.to(tl.int64) * stride_bt
    for start in range(kv_lo, kv_hi, BLOCK_N):
        pos = start + tl.arange(0, BLOCK_N)
        key_valid = pos < kv_hi
        # entries past the context are padding (maybe -1): masked, never dereferenced
        block = tl.load(table + pos // BLOCK_SIZE, mask=key_valid, other=0).to(tl.int64)
        offset = (pos % BLOCK_SIZE).to(tl.int64)  # int64: any cache strides, however large
        kv_mask = key_valid[:, None] & dim_valid[None, :]
        k = tl.load(
            KCache + block[:, None] * stride_kc_block + offset[:, None] * stride_kc_slot
            + kv_head.to(tl.int64) * stride_kc_head + dims[None, :] * stride_kc_dim,
            mask=kv_mask, other=0.0,
        )
        s = tl.dot(q, tl.trans(k.to(DOT_DTYPE)), input_precision=DOT_PRECISION) * scale_log2  # (BLOCK_M, BLOCK_N)
        visible = row_valid[:, None] & key_valid[None, :] & (pos[None, :] <= q_pos[:, None])
        s = tl.where(visible, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        p = tl.exp2(s - m_new[:, None])
        alpha = tl.exp2(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, axis=1)
        # unused slots may hold NaN: masked loads give 0, and 0 * p stays 0
        v = tl.load(
            VCache + block[:, None] * stride_vc_block + offset[:, None] * stride_vc_slot
            + kv_head.to(tl.int64) * stride_vc_head + dims[None, :] * stride_vc_dim,
            mask=kv_mask, other=0.0,
        )
        acc = acc * alpha[:, None] + tl.dot(p.to(DOT_DTYPE), v.to(DOT_DTYPE), input_precision=DOT_PRECISION)
        m_i = m_new

    if NUM_SPLITS == 1:
        o = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]  # a row that sees no key: acc = 0, o = 0
        tl.store(Out + q_rows[:, None] * stride_ot + head[:, None] * stride_oh + dims[None, :],
                 o.to(Out.dtype.element_ty), mask=q_mask)
    else:
        part = (q_rows * heads + head) * NUM_SPLITS + split  # (BLOCK_M,) index into (total_q, heads, splits)
        tl.store(PartAcc + part[:, None] * head_dim + dims[None, :], acc, mask=q_mask)
        tl.store(PartMax + part, m_i, mask=row_valid)
        tl.store(PartSum + part, l_i, mask=row_valid)


@triton.jit
def _paged_attention_reduce_kernel(
    PartAcc, PartMax, PartSum, Out,  # as in _paged_attention_kernel
    stride_ot, stride_oh, heads, head_dim,
    NUM_SPLITS: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """Program (token, head): merges the splits' partial softmaxes into the output row."""
    token = tl.program_id(0).to(tl.int64)
    head = tl.program_id(1)
    splits = tl.arange(0, BLOCK_S)
    dims = tl.arange(0, BLOCK_D)
    split_valid = splits < NUM_SPLITS
    part = (token * heads + head) * NUM_SPLITS + splits
    m = tl.load(PartMax + part, mask=split_valid, other=NO_SCORE)
    l = tl.load(PartSum + part, mask=split_valid, other=0.0)
    mask = split_valid[:, None] & (dims[None, :] < head_dim)
    acc = tl.load(PartAcc + part[:, None] * head_dim + dims[None, :], mask=mask, other=0.0)
    weight = tl.exp2(m - tl.max(m, axis=0))  # (BLOCK_S,): empty splits have l = 0 and add nothing
    total = tl.sum(l * weight, axis=0)
    o = tl.sum(acc * weight[:, None], axis=0) / tl.where(total > 0, total, 1.0)  # no key at all: 0
    tl.store(Out + token * stride_ot + head * stride_oh + dims, o.to(Out.dtype.element_ty), mask=dims < head_dim)


def num_splits(programs: int, max_keys: int, device: torch.device) -> int:
    """Splits of each sequence's keys so that programs x splits fills the GPU; 1 (a single pass, no
    reduce) when the other grid dimensions already do. ``max_keys`` bounds every context (the block
    table's capacity), so the count depends on shapes only and a captured graph stays valid."""
    target = torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else CPU_PROGRAMS
    if programs >= target:
        return 1
    return max(1, min(triton.cdiv(target, programs), max_keys // MIN_SPLIT_KEYS, MAX_SPLITS))


def paged_attention(
    q: Tensor, k_cache: Tensor, v_cache: Tensor, block_tables: Tensor, context_lens: Tensor,
    cu_seqlens_q: Tensor | None, max_seqlen_q: int | None, softmax_scale: float,
) -> Tensor:
    """q: (total_q, heads, head_dim); caches (num_blocks, block_size, kv_heads, head_dim), any strides;
    block_tables int32 (num_seqs, max_blocks); context_lens int32 (num_seqs,); cu_seqlens_q int32
    (num_seqs+1,) or None (decode: one query per sequence). Inputs validated by llmfast.ops.paged.
    Returns o like q."""
    q = q.contiguous() if q.stride(2) != 1 else q
    total_q, heads, head_dim = q.shape
    num_seqs, max_blocks = block_tables.shape
    block_size, kv_heads = k_cache.shape[1], k_cache.shape[2]
    group = heads // kv_heads
    out = q.new_empty(q.shape)  # contiguous, as the fake says, whatever q's strides
    if total_q == 0 or num_seqs == 0:
        return out
    block_tables = block_tables.contiguous()
    decode = cu_seqlens_q is None
    if decode:
        block_m = max(16, triton.next_power_of_2(group))
        tokens_per_tile, tiles = 1, 1
    else:
        block_m = max(PREFILL_ROWS[q.device.type], triton.next_power_of_2(group))
        tokens_per_tile = block_m // group
        tiles = triton.cdiv(max_seqlen_q, tokens_per_tile)
    block_d = max(16, triton.next_power_of_2(head_dim))
    # K and V tiles of <= 16 KB in 16-bit dtypes on the GPU
    block_n = KEYS_PER_TILE[q.device.type] // (1 if block_d <= 128 else 2)
    if tiles > MAX_GRID_Z:
        raise ValueError(f"max_seqlen_q: the Triton kernel takes at most {MAX_GRID_Z * tokens_per_tile} query "
                         f"tokens of one sequence a call here (a CUDA grid dimension), got {max_seqlen_q}")
    splits = num_splits(num_seqs * kv_heads * tiles, max_blocks * block_size, q.device)
    splits = min(splits, MAX_GRID_Z // tiles)
    # On CPU (the interpreter) dots run in fp32: Triton 3.9's interpreter returns garbage from bf16
    # tl.dot, and numpy has no BLAS for 16-bit matmuls (20 ms for one 256x128x256 fp16 dot).
    dot_dtype = tl.float32 if q.device.type == "cpu" else _TL_DTYPES[q.dtype]
    if splits > 1:
        part_acc = q.new_empty((total_q, heads, splits, head_dim), dtype=torch.float32)
        part_max = q.new_empty((total_q, heads, splits), dtype=torch.float32)
        part_sum = q.new_empty((total_q, heads, splits), dtype=torch.float32)
    else:
        part_acc = part_max = part_sum = out  # never touched: the single pass writes out directly
    _paged_attention_kernel[(num_seqs, kv_heads, tiles * splits)](
        q, k_cache, v_cache, block_tables, context_lens, context_lens if decode else cu_seqlens_q,
        out, part_acc, part_max, part_sum,
        q.stride(0), q.stride(1), out.stride(0), out.stride(1),
        *k_cache.stride(), *v_cache.stride(),
        block_tables.stride(0),
        heads, head_dim, group, tokens_per_tile, softmax_scale * LOG2E,
        DECODE=decode, NUM_SPLITS=splits, BLOCK_SIZE=block_size,
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_D=block_d,
        DOT_DTYPE=dot_dtype, DOT_PRECISION="ieee" if dot_dtype == tl.float32 else "tf32",
        # 8 warps once the fp32 accumulator tile reaches 8K elements: at 4 warps a 64 x 128 prefill tile
        # took 243-255 registers a thread on sm_90 and spilled on sm_80 (tests/compile_kernels.py)
        num_warps=4 if block_m * block_d < 64 * 128 else 8, num_stages=2,
    )
    if splits > 1:
        _paged_attention_reduce_kernel[(total_q, heads)](
            part_acc, part_max, part_sum, out, out.stride(0), out.stride(1), heads, head_dim,
            NUM_SPLITS=splits, BLOCK_S=triton.next_power_of_2(splits), BLOCK_D=block_d, num_warps=4,
        )
    return out
