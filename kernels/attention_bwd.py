"""Flash attention backward (FlashAttention-2): delta, then dk/dv key-block-major, then dq.

With P = exp(S * scale - lse) recomputed from the forward's log-sum-exp and delta = rowsum(dO * O):
    dV = P^T dO,   dP = dO V^T,   dS = P * (dP - delta),   dK = scale * dS^T Q,   dQ = scale * dS K.
dk/dv: one program per key block of one kv head, looping over the query blocks of every query head
of its GQA group, so each kv head's gradient is summed in registers and stored once (no atomics).
dq: one program per query block, looping over key blocks, as the forward. A row that saw no key
(lse = -inf) gets P = 0: its lse is read as +inf.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from llmfast_kernels.attention import (
    LOG2_E,
    autotuned,
    block_d,
    dot_meta,
    interpreter_block,
    launch_shape,
    layout,
    pick,
    seqlen_bucket,
    sequence_bounds,
)

PREPROCESS_BLOCK_M = 64
# CUDA configs (BLOCK_M, BLOCK_N, num_warps, num_stages). Each kernel keeps two fp32 tiles live beside
# its inputs (dk and dv; dq and the scores), so its inner tiles are smaller than the forward's, as in
# FA2: dk/dv hold 64-128 keys and step through 32-64 queries; dq holds 64-128 queries and steps through
# 32-64 keys. The sm_80 sets are the subsets that fit 164 KB of shared memory at head dim 128. Like the
# forward's, each set ends with a small config that fits everywhere (tests/compile_kernels.py checks it).
# Compiled for sm_90 at head dim 256 (bf16), every dk/dv config of the grid spills; 32 x 32 with 8 warps
# is the one that does not (214 registers, 66 KB of shared memory), so it ends that set.
SM90_DKDV_CONFIGS = [(m, n, w, s) for m in (64, 32) for n in (128, 64) for w in (4, 8) for s in (3, 2)] + [
    (32, 32, 8, 2)
]
SM80_DKDV_CONFIGS = [(64, 64, 4, 2), (32, 128, 8, 2), (32, 64, 4, 2), (32, 32, 4, 1)]
SM90_DQ_CONFIGS = [(m, n, w, s) for m in (128, 64) for n in (64, 32) for w in (4, 8) for s in (3, 2)]
SM80_DQ_CONFIGS = [(64, 64, 4, 2), (128, 32, 8, 2), (64, 32, 4, 2), (32, 32, 4, 1)]


@triton.jit(do_not_specialize=["seqlen_q"])  # as the forward kernel
def _attn_bwd_delta_kernel(
    O, DO, Delta,  # O, DO: (batch, seq, heads, head_dim) or (tokens, heads, head_dim); Delta: (heads, total_q) fp32
    Cu_seqlens_q,
    stride_ob, stride_os, stride_oh, stride_dob, stride_dos, stride_doh, stride_delta_h,
    seqlen_q,
    HEAD_DIM: tl.constexpr, IS_VARLEN: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """Grid (cdiv(max_seqlen_q, BLOCK_M), heads, batch): delta = rowsum(dO * O) in fp32."""
    start_m = tl.program_id(0) * BLOCK_M
    h = tl.program_id(1)
    b = tl.program_id(2)
    tok_q, seqlen_q, q_seq0 = sequence_bounds(b, Cu_seqlens_q, seqlen_q, IS_VARLEN)
    if start_m >= seqlen_q:
        return
    b64 = b.to(tl.int64)
    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    mask = (offs_m[:, None] < seqlen_q) & (offs_d[None, :] < HEAD_DIM)
    o = tl.load(O + b64 * stride_ob + (q_seq0 + offs_m[:, None]) * stride_os + h * stride_oh + offs_d[None, :],
                mask=mask, other=0.0)
    do = tl.load(DO + b64 * stride_dob + (q_seq0 + offs_m[:, None]) * stride_dos + h * stride_doh + offs_d[None, :],
                 mask=mask, other=0.0)
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), axis=1)
    tl.store(Delta + h.to(tl.int64) * stride_delta_h + tok_q + offs_m, delta, mask=offs_m < seqlen_q)


@triton.jit(do_not_specialize=["seqlen_q", "seqlen_k"])
def _attn_bwd_dkdv_kernel(
    Q, K, V, DO, LSE, Delta, DK, DV,
    Cu_seqlens_q, Cu_seqlens_k,
    stride_qb, stride_qs, stride_qh, stride_kb, stride_ks, stride_kh, stride_vb, stride_vs, stride_vh,
    stride_dob, stride_dos, stride_doh, stride_dkb, stride_dks, stride_dkh, stride_dvb, stride_dvs, stride_dvh,
    stride_lse_h,
    seqlen_q, seqlen_k, qk_scale, softmax_scale,
    SEQ_BUCKET,  # only an autotuning key
    GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, IS_CAUSAL: tl.constexpr, IS_VARLEN: tl.constexpr,
    DOT_DTYPE: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """Grid (cdiv(max_seqlen_k, BLOCK_N), kv_heads, batch): dK, dV of BLOCK_N keys of one kv head."""
    start_n = tl.program_id(0) * BLOCK_N
    kv_h = tl.program_id(1)
    b = tl.program_id(2)
    tok_q, seqlen_q, q_seq0 = sequence_bounds(b, Cu_seqlens_q, seqlen_q, IS_VARLEN)
    _, seqlen_k, k_seq0 = sequence_bounds(b, Cu_seqlens_k, seqlen_k, IS_VARLEN)
    if start_n >= seqlen_k:
        return
    b64 = b.to(tl.int64)
    offs_n = start_n + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    kv_mask = (offs_n[:, None] < seqlen_k) & (offs_d[None, :] < HEAD_DIM)
    rows_n = offs_n.to(tl.int64)[:, None]  # int64: a long sequence's row times its stride can pass 2**31
    kv_offs = rows_n * stride_ks + offs_d[None, :]
    k = tl.load(K + b64 * stride_kb + k_seq0 * stride_ks + kv_h * stride_kh + kv_offs, mask=kv_mask, other=0.0)
    kv_offs = rows_n * stride_vs + offs_d[None, :]
    v = tl.load(V + b64 * stride_vb + k_seq0 * stride_vs + kv_h * stride_vh + kv_offs, mask=kv_mask, other=0.0)
    k, v = k.to(DOT_DTYPE), v.to(DOT_DTYPE)
    dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)

    # bottom-right causal: key j is seen by queries i >= j - causal_shift; earlier query blocks are skipped
    causal_shift = seqlen_k - seqlen_q
    lo = 0
    if IS_CAUSAL:
        lo = tl.maximum(start_n - causal_shift, 0) // BLOCK_M * BLOCK_M
    d_mask = offs_d[None, :] < HEAD_DIM
    for g in range(GROUP):
        h = kv_h * GROUP + g
        Q_head = Q + b64 * stride_qb + q_seq0 * stride_qs + h * stride_qh
        DO_head = DO + b64 * stride_dob + q_seq0 * stride_dos + h * stride_doh
        LSE_head = LSE + h.to(tl.int64) * stride_lse_h + tok_q
        Delta_head = Delta + h.to(tl.int64) * stride_lse_h + tok_q
        for start_m in range(lo, seqlen_q, BLOCK_M):
            offs_m = start_m + tl.arange(0, BLOCK_M)
            rows_m = offs_m.to(tl.int64)[:, None]
            q_mask = (offs_m[:, None] < seqlen_q) & d_mask
            q = tl.load(Q_head + rows_m * stride_qs + offs_d[None, :], mask=q_mask, other=0.0)
            do = tl.load(DO_head + rows_m * stride_dos + offs_d[None, :], mask=q_mask, other=0.0)
            q, do = q.to(DOT_DTYPE), do.to(DOT_DTYPE)
            # lse in log2 units; rows that saw no key (-inf) and padding rows read +inf, so P = 0 there
            lse = tl.load(LSE_head + offs_m, mask=offs_m < seqlen_q, other=float("inf"))
            lse2 = tl.where(lse == float("-inf"), float("inf"), lse * 1.4426950408889634)
            delta = tl.load(Delta_head + offs_m, mask=offs_m < seqlen_q, other=0.0)
            # transposed scores (BLOCK_N, BLOCK_M): dK and dV come out key-major without a transpose
            s_t = tl.dot(k, tl.trans(q), input_precision=DOT_PRECISION) * qk_scale
            p_t = tl.math.exp2(s_t - lse2[None, :])
            visible = offs_n[:, None] < seqlen_k
            if IS_CAUSAL:
                visible = visible & (offs_n[:, None] <= offs_m[None, :] + causal_shift)
            p_t = tl.where(visible, p_t, 0.0)
            # P and dS are rounded to the input dtype, as the tensor cores take them
            dv += tl.dot(p_t.to(DO.dtype.element_ty).to(DOT_DTYPE), do, input_precision=DOT_PRECISION)
            dp_t = tl.dot(v, tl.trans(do), input_precision=DOT_PRECISION)
            ds_t = p_t * (dp_t - delta[None, :])
            dk += tl.dot(ds_t.to(Q.dtype.element_ty).to(DOT_DTYPE), q, input_precision=DOT_PRECISION)
    dk *= softmax_scale
    dk_offs = rows_n * stride_dks + offs_d[None, :]
    tl.store(DK + b64 * stride_dkb + k_seq0 * stride_dks + kv_h * stride_dkh + dk_offs,
             dk.to(DK.dtype.element_ty), mask=kv_mask)
    dv_offs = rows_n * stride_dvs + offs_d[None, :]
    tl.store(DV + b64 * stride_dvb + k_seq0 * stride_dvs + kv_h * stride_dvh + dv_offs,
             dv.to(DV.dtype.element_ty), mask=kv_mask)


@triton.jit(do_not_specialize=["seqlen_q", "seqlen_k"])
def _attn_bwd_dq_kernel(
    Q, K, V, DO, LSE, Delta, DQ,
    Cu_seqlens_q, Cu_seqlens_k,
    stride_qb, stride_qs, stride_qh, stride_kb, stride_ks, stride_kh, stride_vb, stride_vs, stride_vh,
    stride_dob, stride_dos, stride_doh, stride_dqb, stride_dqs, stride_dqh,
    stride_lse_h,
    seqlen_q, seqlen_k, qk_scale, softmax_scale,
    SEQ_BUCKET,  # only an autotuning key
    GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, IS_CAUSAL: tl.constexpr, IS_VARLEN: tl.constexpr,
    DOT_DTYPE: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """Grid (cdiv(max_seqlen_q, BLOCK_M), heads, batch): dQ of BLOCK_M query rows of one head."""
    start_m = tl.program_id(0) * BLOCK_M
    h = tl.program_id(1)
    b = tl.program_id(2)
    tok_q, seqlen_q, q_seq0 = sequence_bounds(b, Cu_seqlens_q, seqlen_q, IS_VARLEN)
    _, seqlen_k, k_seq0 = sequence_bounds(b, Cu_seqlens_k, seqlen_k, IS_VARLEN)
    if start_m >= seqlen_q:
        return
    kv_h = h // GROUP
    b64 = b.to(tl.int64)
    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    d_mask = offs_d[None, :] < HEAD_DIM
    q_mask = (offs_m[:, None] < seqlen_q) & d_mask
    q = tl.load(Q + b64 * stride_qb + (q_seq0 + offs_m[:, None]) * stride_qs + h * stride_qh + offs_d[None, :],
                mask=q_mask, other=0.0)
    do = tl.load(DO + b64 * stride_dob + (q_seq0 + offs_m[:, None]) * stride_dos + h * stride_doh + offs_d[None, :],
                 mask=q_mask, other=0.0)
    q, do = q.to(DOT_DTYPE), do.to(DOT_DTYPE)
    lse = tl.load(LSE + h.to(tl.int64) * stride_lse_h + tok_q + offs_m, mask=offs_m < seqlen_q, other=float("inf"))
    lse2 = tl.where(lse == float("-inf"), float("inf"), lse * 1.4426950408889634)  # as in the dk/dv kernel
    delta = tl.load(Delta + h.to(tl.int64) * stride_lse_h + tok_q + offs_m, mask=offs_m < seqlen_q, other=0.0)
    K_head = K + b64 * stride_kb + k_seq0 * stride_ks + kv_h * stride_kh
    V_head = V + b64 * stride_vb + k_seq0 * stride_vs + kv_h * stride_vh
    dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)

    causal_shift = seqlen_k - seqlen_q
    hi = seqlen_k
    if IS_CAUSAL:  # keys past the block's last row's diagonal are skipped
        hi = tl.maximum(tl.minimum(seqlen_k, start_m + BLOCK_M + causal_shift), 0)
    for start_n in range(0, hi, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        rows_n = offs_n.to(tl.int64)[:, None]  # int64: a long sequence's row times its stride can pass 2**31
        kv_mask = (offs_n[:, None] < seqlen_k) & d_mask
        k = tl.load(K_head + rows_n * stride_ks + offs_d[None, :], mask=kv_mask, other=0.0).to(DOT_DTYPE)
        v = tl.load(V_head + rows_n * stride_vs + offs_d[None, :], mask=kv_mask, other=0.0).to(DOT_DTYPE)
        s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * qk_scale
        p = tl.math.exp2(s - lse2[:, None])
        visible = offs_n[None, :] < seqlen_k
        if IS_CAUSAL:
            visible = visible & (offs_n[None, :] <= offs_m[:, None] + causal_shift)
        p = tl.where(visible, p, 0.0)
        dp = tl.dot(do, tl.trans(v), input_precision=DOT_PRECISION)
        ds = p * (dp - delta[:, None])
        dq += tl.dot(ds.to(K.dtype.element_ty).to(DOT_DTYPE), k, input_precision=DOT_PRECISION)
    dq *= softmax_scale
    tl.store(DQ + b64 * stride_dqb + (q_seq0 + offs_m[:, None]) * stride_dqs + h * stride_dqh + offs_d[None, :],
             dq.to(DQ.dtype.element_ty), mask=q_mask)


BWD_KEY = ["BLOCK_D", "GROUP", "IS_CAUSAL", "IS_VARLEN", "SEQ_BUCKET"]


def dkdv_tiles(block_m: int, block_n: int) -> tuple[int, int]:
    return 2 * block_n, block_m  # K and V held; Q and dO streamed


def dq_tiles(block_m: int, block_n: int) -> tuple[int, int]:
    return 2 * block_m, block_n  # Q and dO held; K and V streamed


_attn_bwd_dkdv_sm90 = autotuned(_attn_bwd_dkdv_kernel, SM90_DKDV_CONFIGS, BWD_KEY, dkdv_tiles)
_attn_bwd_dkdv_sm80 = autotuned(_attn_bwd_dkdv_kernel, SM80_DKDV_CONFIGS, BWD_KEY, dkdv_tiles)
_attn_bwd_dq_sm90 = autotuned(_attn_bwd_dq_kernel, SM90_DQ_CONFIGS, BWD_KEY, dq_tiles)
_attn_bwd_dq_sm80 = autotuned(_attn_bwd_dq_kernel, SM80_DQ_CONFIGS, BWD_KEY, dq_tiles)


def attention_bwd(
    do: Tensor, q: Tensor, k: Tensor, v: Tensor, o: Tensor, lse: Tensor,
    cu_seqlens_q: Tensor | None, cu_seqlens_k: Tensor | None,
    max_seqlen_q: int, max_seqlen_k: int, causal: bool, softmax_scale: float,
) -> tuple[Tensor, Tensor, Tensor]:
    """Gradients of attention_fwd. do, o: like q; lse: (heads, rows) from attention_fwd; the rest as
    attention_fwd takes them. Returns (dq, dk, dv), contiguous, shaped and typed like q, k, v."""
    varlen = cu_seqlens_q is not None
    heads, kv_heads, head_dim = q.shape[-2], k.shape[-2], q.shape[-1]
    batch, grid_sq, grid_sk, seqlen_q, seqlen_k = launch_shape(q, k, cu_seqlens_q, max_seqlen_q, max_seqlen_k)
    (q, q_strides), (k, k_strides), (v, v_strides) = layout(q, varlen), layout(k, varlen), layout(v, varlen)
    (do, do_strides), (o, o_strides) = layout(do, varlen), layout(o, varlen)
    dq = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    dk = torch.empty(k.shape, dtype=k.dtype, device=k.device)
    dv = torch.empty(v.shape, dtype=v.dtype, device=v.device)
    if dq.numel() == 0 or dk.numel() == 0:  # no query or no key: nothing flows, every gradient is 0
        return dq.zero_(), dk.zero_(), dv.zero_()
    delta = torch.empty_like(lse)
    cu_q = cu_seqlens_q if varlen else lse  # never read when dense
    cu_k = cu_seqlens_k if varlen else lse
    common = dict(HEAD_DIM=head_dim, IS_VARLEN=varlen, BLOCK_D=block_d(head_dim))
    _attn_bwd_delta_kernel[(triton.cdiv(grid_sq, PREPROCESS_BLOCK_M), heads, batch)](
        o, do, delta, cu_q, *o_strides, *do_strides, delta.stride(0), seqlen_q,
        BLOCK_M=PREPROCESS_BLOCK_M, **common,
    )

    meta = dict(GROUP=heads // kv_heads, IS_CAUSAL=causal, **dot_meta(q.dtype, q.device), **common)
    scalars = (lse.stride(0), seqlen_q, seqlen_k, softmax_scale * LOG2_E, softmax_scale,
               seqlen_bucket(max(grid_sq, grid_sk)))
    inputs = (*q_strides, *k_strides, *v_strides, *do_strides)
    dkdv = pick(q.device, _attn_bwd_dkdv_kernel, _attn_bwd_dkdv_sm90, _attn_bwd_dkdv_sm80)
    dq_kernel = pick(q.device, _attn_bwd_dq_kernel, _attn_bwd_dq_sm90, _attn_bwd_dq_sm80)
    fixed = {}
    if dkdv is _attn_bwd_dkdv_kernel:
        block = interpreter_block(max(grid_sq, grid_sk))
        fixed = dict(BLOCK_M=block, BLOCK_N=block)
    _, dk_strides = layout(dk, varlen)
    _, dv_strides = layout(dv, varlen)
    _, dq_strides = layout(dq, varlen)
    dkdv[lambda META: (triton.cdiv(grid_sk, META["BLOCK_N"]), kv_heads, batch)](
        q, k, v, do, lse, delta, dk, dv, cu_q, cu_k, *inputs, *dk_strides, *dv_strides, *scalars,
        **meta, **fixed,
    )
    dq_kernel[lambda META: (triton.cdiv(grid_sq, META["BLOCK_M"]), heads, batch)](
        q, k, v, do, lse, delta, dq, cu_q, cu_k, *inputs, *dq_strides, *scalars, **meta, **fixed,
    )
    return dq, dk, dv
