"""Fused residual-add + LayerNorm / RMSNorm: Triton kernels and their launchers, forward and backward.

Rows of x: (M, N). h = x + residual is computed in fp32, rounded to x.dtype, stored, and that rounded
value is normalized; statistics are fp32. A row of up to MAX_FUSED_N_FWD (backward: MAX_FUSED_N_BWD)
elements stays in registers, one HBM pass; a wider row is streamed in chunks. The launchers run inside
opaque torch custom ops (llmfast/ops/norm.py), so they launch directly: torch.library.wrap_triton outside
a triton_op adds ~150 us of dispatch per launch (H100, eager).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

# The widest row held whole in registers: forward 16384 (32 fp32 values per thread over 16 warps);
# backward 8192 for 16-bit dtypes, 4096 for fp32, since it keeps more values live (dy, h, xhat, g, two
# accumulators); H100: spills at 8192 for an fp32 LayerNorm backward.
MAX_FUSED_N_FWD = 16384
MAX_FUSED_N_BWD = 8192
# When N is not a multiple of 16, Triton cannot prove 16-byte alignment: loads are scalar and each value
# keeps its own 64-bit pointer. Blocks of 2048 keep programs at <= 8 warps, where a thread may use 255
# registers (H100: spills at 16 warps, whose limit is 128).
MAX_FUSED_N_UNALIGNED = 2048
# Wider rows are streamed in chunks (H100, bf16, N = 32768: forward 5-10% faster with 8192 than
# with 4096, backward 3-10% slower).
CHUNK_N_FWD = 8192
CHUNK_N_BWD = 4096


def _launch_config(
    N: int, element_size: int, device: torch.device, backward: bool
) -> tuple[int, int, int, int]:
    """(BLOCK_M, BLOCK_N, num_warps, programs) for rows of N elements of `element_size` bytes; `programs`
    (the backward's row groups x column chunks) only matters for the backward. First settings measured
    on one H100 (bf16, M*N = 2^26): forward 2.9-3.0 TB/s for N <= 16384; backward 1.1-2.6 TB/s."""
    if N % 16 != 0:
        max_fused_n = chunk_n = MAX_FUSED_N_UNALIGNED
    elif backward:
        max_fused_n = MAX_FUSED_N_BWD if element_size <= 2 else MAX_FUSED_N_BWD // 2
        chunk_n = CHUNK_N_BWD
    else:
        max_fused_n, chunk_n = MAX_FUSED_N_FWD, CHUNK_N_FWD
    block_n = triton.next_power_of_2(N) if N <= max_fused_n else chunk_n
    # narrow rows: several per program, so that each program still moves >= 2048 elements
    block_m = max(1, 2048 // block_n)
    # forward ~16 values per thread, backward ~8 (H100: 2x the warps was up to 15% faster backward)
    num_warps = min(16, max(1, block_m * block_n // (256 if backward else 512)))
    # backward: one wave of ~32 warps per SM, each program summing the weight/bias grads of a
    # contiguous row range
    sms = torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 2
    return block_m, block_n, num_warps, sms * max(1, 32 // num_warps)


@triton.jit
def _add_norm_fwd_kernel(
    X, R, W, B, Y, H, Mean, Rstd,  # X, R, Y, H: (M, N); W, B: (N,); Mean, Rstd: (M,) fp32
    M, N, eps,
    HAS_RESIDUAL: tl.constexpr, HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr, IS_RMS: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """BLOCK_M whole rows per program (BLOCK_N >= N): one read of x and residual, one write of y and h."""
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.arange(0, BLOCK_N)
    row_mask = rows < M
    mask = row_mask[:, None] & (cols[None, :] < N)
    offs = rows[:, None].to(tl.int64) * N + cols[None, :]

    h = tl.load(X + offs, mask=mask, other=0.0).to(tl.float32)
    if HAS_RESIDUAL:
        # normalize the rounded h we return, so that backward (which re-reads h) sees the same input
        h = (h + tl.load(R + offs, mask=mask, other=0.0).to(tl.float32)).to(H.dtype.element_ty)
        tl.store(H + offs, h, mask=mask)
        h = h.to(tl.float32)
    if IS_RMS:
        rstd = tl.rsqrt(tl.sum(h * h, axis=1) / N + eps)
        xhat = h * rstd[:, None]
    else:
        mean = tl.sum(h, axis=1) / N
        d = tl.where(mask, h - mean[:, None], 0.0)
        rstd = tl.rsqrt(tl.sum(d * d, axis=1) / N + eps)
        xhat = d * rstd[:, None]
        tl.store(Mean + rows, mean, mask=row_mask)
    tl.store(Rstd + rows, rstd, mask=row_mask)

    y = xhat
    if HAS_WEIGHT:
        y *= tl.load(W + cols, mask=cols < N, other=0.0).to(tl.float32)[None, :]
    if HAS_BIAS:
        y += tl.load(B + cols, mask=cols < N, other=0.0).to(tl.float32)[None, :]
    tl.store(Y + offs, y.to(Y.dtype.element_ty), mask=mask)


@triton.jit
def _add_norm_fwd_chunked_kernel(
    X, R, W, B, Y, H, Mean, Rstd,  # as in _add_norm_fwd_kernel
    N, eps,
    HAS_RESIDUAL: tl.constexpr, HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr, IS_RMS: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    """One row per program, N > BLOCK_N: pass 1 forms h and the statistics, pass 2 normalizes."""
    row = tl.program_id(0)
    base = row.to(tl.int64) * N
    mean = 0.0
    m2 = 0.0  # sum of squared deviations from the mean (LayerNorm) or of squares (RMSNorm)
    for start in range(0, N, BLOCK_N):
        cols = start + tl.arange(0, BLOCK_N)
        mask = cols < N
        h = tl.load(X + base + cols, mask=mask, other=0.0).to(tl.float32)
        if HAS_RESIDUAL:
            h = (h + tl.load(R + base + cols, mask=mask, other=0.0).to(tl.float32)).to(H.dtype.element_ty)
            tl.store(H + base + cols, h, mask=mask)
            h = h.to(tl.float32)
        if IS_RMS:
            m2 += tl.sum(h * h)
        else:
            # merge this chunk's (mean, m2) into the running pair (Chan et al.): as accurate as a
            # separate pass over (h - mean)^2, without reading the row a third time
            n_b = tl.minimum(N - start, BLOCK_N).to(tl.float32)
            mean_b = tl.sum(h) / n_b
            d = tl.where(mask, h - mean_b, 0.0)
            frac = n_b / (start + n_b)
            delta = mean_b - mean
            mean += delta * frac
            m2 += tl.sum(d * d) + delta * delta * start * frac
    rstd = tl.rsqrt(m2 / N + eps)
    if not IS_RMS:
        tl.store(Mean + row, mean)
    tl.store(Rstd + row, rstd)

    # the row was just written, so this re-read is mostly served by L2
    for start in range(0, N, BLOCK_N):
        cols = start + tl.arange(0, BLOCK_N)
        mask = cols < N
        if HAS_RESIDUAL:
            h = tl.load(H + base + cols, mask=mask, other=0.0).to(tl.float32)
        else:
            h = tl.load(X + base + cols, mask=mask, other=0.0).to(tl.float32)
        y = (h - mean) * rstd
        if HAS_WEIGHT:
            y *= tl.load(W + cols, mask=mask, other=0.0).to(tl.float32)
        if HAS_BIAS:
            y += tl.load(B + cols, mask=mask, other=0.0).to(tl.float32)
        tl.store(Y + base + cols, y.to(Y.dtype.element_ty), mask=mask)


@triton.jit
def _add_norm_bwd_row_stats_kernel(
    DY, H, W, Mean, Rstd, C1, C2,  # DY, H: (M, N); W: (N,); Mean, Rstd, C1, C2: (M,) fp32
    N,
    HAS_WEIGHT: tl.constexpr, IS_RMS: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """For rows too wide for registers: C1 = mean(g * xhat), C2 = mean(g) per row, with g = dy * w."""
    row = tl.program_id(0)
    base = row.to(tl.int64) * N
    rstd = tl.load(Rstd + row)
    if IS_RMS:
        mean = 0.0
    else:
        mean = tl.load(Mean + row)
    acc_gx = tl.zeros([BLOCK_N], dtype=tl.float32)
    acc_g = tl.zeros([BLOCK_N], dtype=tl.float32)
    for start in range(0, N, BLOCK_N):
        cols = start + tl.arange(0, BLOCK_N)
        mask = cols < N
        g = tl.load(DY + base + cols, mask=mask, other=0.0).to(tl.float32)
        if HAS_WEIGHT:
            g *= tl.load(W + cols, mask=mask, other=0.0).to(tl.float32)
        h = tl.load(H + base + cols, mask=mask, other=0.0).to(tl.float32)
        acc_gx += g * ((h - mean) * rstd)
        acc_g += g
    tl.store(C1 + row, tl.sum(acc_gx) / N)
    if not IS_RMS:
        tl.store(C2 + row, tl.sum(acc_g) / N)


@triton.jit
def _add_norm_bwd_kernel(
    DY, DH, H, W, Mean, Rstd, DX, DW, DB, C1, C2,  # DW, DB: (row groups, N) fp32 partial sums
    M, N, rows_per_program,
    HAS_DH: tl.constexpr, HAS_WEIGHT: tl.constexpr, WANT_DW: tl.constexpr, WANT_DB: tl.constexpr,
    IS_RMS: tl.constexpr, ROW_STATS_GIVEN: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """Program (i, j): rows [i * rows_per_program, ...) x columns [j * BLOCK_N, ...). Writes dx and one
    partial row of dweight/dbias where wanted (a frozen weight or bias skips its sums and their stores).
    Either BLOCK_N >= N (the row reductions are done here), or ROW_STATS_GIVEN and C1/C2 hold them from
    _add_norm_bwd_row_stats_kernel."""
    group = tl.program_id(0)
    row_start = group * rows_per_program
    row_end = tl.minimum(row_start + rows_per_program, M)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    col_mask = cols < N
    dw = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    db = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for row0 in range(row_start, row_end, BLOCK_M):
        rows = row0 + tl.arange(0, BLOCK_M)
        row_mask = rows < row_end
        mask = row_mask[:, None] & col_mask[None, :]
        offs = rows[:, None].to(tl.int64) * N + cols[None, :]
        dy = tl.load(DY + offs, mask=mask, other=0.0).to(tl.float32)
        h = tl.load(H + offs, mask=mask, other=0.0).to(tl.float32)
        rstd = tl.load(Rstd + rows, mask=row_mask, other=0.0)
        if IS_RMS:
            xhat = h * rstd[:, None]
        else:
            mean = tl.load(Mean + rows, mask=row_mask, other=0.0)
            xhat = tl.where(mask, (h - mean[:, None]) * rstd[:, None], 0.0)
        if HAS_WEIGHT:
            # loaded per row (an L1 hit) rather than held across the loop: saves registers
            g = dy * tl.load(W + cols, mask=col_mask, other=0.0).to(tl.float32)[None, :]
        else:
            g = dy
        if ROW_STATS_GIVEN:
            c1 = tl.load(C1 + rows, mask=row_mask, other=0.0)
        else:
            c1 = tl.sum(g * xhat, axis=1) / N
        dx = g - xhat * c1[:, None]
        if not IS_RMS:
            if ROW_STATS_GIVEN:
                c2 = tl.load(C2 + rows, mask=row_mask, other=0.0)
            else:
                c2 = tl.sum(g, axis=1) / N
            dx -= c2[:, None]
        dx *= rstd[:, None]
        if HAS_DH:
            dx += tl.load(DH + offs, mask=mask, other=0.0).to(tl.float32)
        tl.store(DX + offs, dx.to(DX.dtype.element_ty), mask=mask)
        if WANT_DW:
            dw += dy * xhat
        if WANT_DB:
            db += dy
    partial = group.to(tl.int64) * N + cols
    if WANT_DW:
        tl.store(DW + partial, tl.sum(dw, axis=0), mask=col_mask)
    if WANT_DB:
        tl.store(DB + partial, tl.sum(db, axis=0), mask=col_mask)


def add_norm_fwd(
    x: Tensor, residual: Tensor | None, weight: Tensor | None, bias: Tensor | None, eps: float, is_rms: bool
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """x, residual: (M, N) contiguous, same dtype (fp32/fp16/bf16); residual may be None.
    weight, bias: (N,) or None. Returns (y, h, mean, rstd): y (M, N) in x.dtype; h (M, N) in x.dtype,
    or an empty tensor of shape (0,) when residual is None (then h is x itself and nothing is written);
    mean (M,) float32 (shape (0,) empty when is_rms); rstd (M,) float32."""
    M, N = x.shape
    y = torch.empty_like(x)
    h = torch.empty_like(x) if residual is not None else x.new_empty(0)
    mean = x.new_empty(0 if is_rms else M, dtype=torch.float32)
    rstd = x.new_empty(M, dtype=torch.float32)
    if M == 0:
        return y, h, mean, rstd
    block_m, block_n, num_warps, _ = _launch_config(N, x.element_size(), x.device, backward=False)
    # absent inputs are replaced by x, never read: the HAS_* flags switch their loads off
    args = (
        x,
        x if residual is None else residual,
        x if weight is None else weight,
        x if bias is None else bias,
        y, h, mean, rstd,
    )
    flags = dict(
        HAS_RESIDUAL=residual is not None, HAS_WEIGHT=weight is not None, HAS_BIAS=bias is not None,
        IS_RMS=is_rms, BLOCK_N=block_n, num_warps=num_warps,
    )
    if block_n >= N:
        _add_norm_fwd_kernel[(triton.cdiv(M, block_m),)](*args, M, N, eps, BLOCK_M=block_m, **flags)
    else:
        _add_norm_fwd_chunked_kernel[(M,)](*args, N, eps, **flags)
    return y, h, mean, rstd


def add_norm_bwd(
    dy: Tensor, dh: Tensor | None, h: Tensor, weight: Tensor | None, want_dweight: bool, want_dbias: bool,
    mean: Tensor, rstd: Tensor, is_rms: bool,
) -> tuple[Tensor, Tensor, Tensor]:
    """dy: (M, N) contiguous in h.dtype; dh: (M, N) or None (gradient flowing into the h output);
    h: (M, N) the normalized input (x itself when there was no residual); weight (N,) or None;
    want_dweight (only with a weight) / want_dbias: whether the weight's / bias's gradient is wanted;
    mean/rstd as returned by add_norm_fwd. Returns (dx, dweight, dbias): dx (M, N) in h.dtype
    (this is also d residual); dweight (N,) float32 or shape-(0,) empty when not wanted;
    dbias (N,) float32 or shape-(0,) empty when not wanted."""
    M, N = h.shape
    dx = torch.empty_like(h)
    if M == 0:  # a sum over no rows
        dweight = h.new_zeros(N if want_dweight else 0, dtype=torch.float32)
        return dx, dweight, h.new_zeros(N if want_dbias else 0, dtype=torch.float32)
    block_m, block_n, num_warps, programs = _launch_config(N, h.element_size(), h.device, backward=True)
    num_chunks = triton.cdiv(N, block_n)  # 1: whole rows in registers
    # split the rows so that row groups x column chunks is about `programs`; whole BLOCK_M tiles each
    rows_per_program = triton.cdiv(triton.cdiv(M, max(1, programs // num_chunks)), block_m) * block_m
    num_groups = triton.cdiv(M, rows_per_program)
    dw_partial = h.new_empty((num_groups, N) if want_dweight else (0,), dtype=torch.float32)
    db_partial = h.new_empty((num_groups, N) if want_dbias else (0,), dtype=torch.float32)
    w = dy if weight is None else weight  # never read when weight is None
    row_stats_given = num_chunks > 1
    if row_stats_given:
        c1 = h.new_empty(M, dtype=torch.float32)
        c2 = h.new_empty(0 if is_rms else M, dtype=torch.float32)
        _add_norm_bwd_row_stats_kernel[(M,)](
            dy, h, w, mean, rstd, c1, c2, N,
            HAS_WEIGHT=weight is not None, IS_RMS=is_rms, BLOCK_N=block_n, num_warps=num_warps,
        )
    else:
        c1 = c2 = rstd  # never read: the kernel reduces each row itself
    _add_norm_bwd_kernel[(num_groups, num_chunks)](
        dy, dy if dh is None else dh, h, w, mean, rstd, dx, dw_partial, db_partial, c1, c2,
        M, N, rows_per_program,
        HAS_DH=dh is not None, HAS_WEIGHT=weight is not None, WANT_DW=want_dweight, WANT_DB=want_dbias,
        IS_RMS=is_rms, ROW_STATS_GIVEN=row_stats_given, BLOCK_M=block_m, BLOCK_N=block_n, num_warps=num_warps,
    )
    dweight = dw_partial.sum(0) if want_dweight else dw_partial
    dbias = db_partial.sum(0) if want_dbias else db_partial
    return dx, dweight, dbias
