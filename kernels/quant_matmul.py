"""Weight-only quantized matmul ``y = x @ W.T (+ bias)``: Triton kernels and their launchers.

W (N, K) arrives as llmfast.quant.QuantizedWeight stores it: int8 ``qweight (N, K)`` with ``scales
(N, groups)``, w = q * scale; or int4 ``qweight (N, K // 8)`` int32, code k in bits 4 * (k % 8) of word
k // 8, with ``scales`` and ``zeros (N, groups)``, w = (q - 8) * scale + zero. Every kernel unpacks a
(BLOCK_K, BLOCK_N) tile of codes in registers, applies its group's scale (and zero) in fp32 and rounds
once to x.dtype, which is the weight ``QuantizedWeight.dequantize()`` returns, then accumulates in fp32.

- ``quant_matmul_splitk``, small M (decode): one program per (BLOCK_N columns, slice of K, BLOCK_M rows);
  with M <= 16 every row of x is in one program, so the packed weight is streamed from HBM once.
  M == 1 is a GEMV (products summed over K); more rows use tl.dot on a 16-row tile.
- ``quant_matmul_tiled``, large M: output tiles over all of K with tl.dot, grouped ordering for L2.
- ``dequantize``: the whole weight to x.dtype, for the dequantize + cuBLAS fallback.

The launchers run inside an opaque torch custom op (llmfast/ops/quant_matmul.py). On CUDA they launch
autotuned handles; on CPU tensors (the interpreter) one fixed config, since the interpreter cannot
autotune.
"""
from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl
from torch import Tensor

from llmfast_kernels import tuning

SMALL_M_TILE = 16  # the fewest rows tl.dot takes; 2..16 rows are padded to it


@triton.jit
def _dequantized_tile(
    Q, S, Z,  # Q: int8 (N, K) or int32 (N, K // 8); S, Z: (N, groups)
    k_start, offs_n, N, K, groups,
    BITS: tl.constexpr, GROUP_SIZE: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """The fp32 weight at rows [k_start, k_start + BLOCK_K) of K and columns ``offs_n`` (BLOCK_N,) of N, as
    a (BLOCK_K, BLOCK_N) tile. GROUP_SIZE 0 means one group per row of W (per channel); otherwise BLOCK_K
    divides GROUP_SIZE and ``k_start`` is a multiple of BLOCK_K, so the tile lies in one group and needs
    one scale per column."""
    n_mask = offs_n < N
    n_rows = offs_n[None, :].to(tl.int64)
    if BITS == 8:
        offs_k = k_start + tl.arange(0, BLOCK_K)
        mask = (offs_k[:, None] < K) & n_mask[None, :]
        q = tl.load(Q + n_rows * K + offs_k[:, None], mask=mask, other=0).to(tl.float32)
    else:
        # each int32 word read once, then its 8 nibbles spread over 8 rows of k (K is a multiple of 8);
        # the arithmetic shift sign-extends the top nibble, which the mask drops
        offs_w = k_start // 8 + tl.arange(0, BLOCK_K // 8)
        mask = (offs_w[:, None] < K // 8) & n_mask[None, :]
        words = tl.load(Q + n_rows * (K // 8) + offs_w[:, None], mask=mask, other=0)  # (BLOCK_K // 8, BLOCK_N)
        shifts = tl.arange(0, 8) * 4
        nibbles = (words[:, None, :] >> shifts[None, :, None]) & 0xF  # (BLOCK_K // 8, 8, BLOCK_N)
        q = tl.reshape(nibbles, (BLOCK_K, BLOCK_N)).to(tl.float32)  # row 8 * word + nibble = k - k_start
    if GROUP_SIZE == 0:
        s_offs = offs_n
    else:
        s_offs = offs_n * groups + k_start // GROUP_SIZE
    scale = tl.load(S + s_offs, mask=n_mask, other=0.0).to(tl.float32)
    if BITS == 8:
        w = q * scale[None, :]
    else:
        zero = tl.load(Z + s_offs, mask=n_mask, other=0.0).to(tl.float32)
        w = (q - 8.0) * scale[None, :] + zero[None, :]
    return w


@triton.jit
def _dot(x, w, acc, UPCAST_DOT: tl.constexpr):
    """acc += x @ w, in fp32. fp32 inputs in full precision (tl.dot would otherwise round them to tf32).
    UPCAST_DOT (the interpreter, on CPU tensors): 16-bit inputs go in as fp32, exact products of the
    same values, since the interpreter's tl.dot multiplies the raw bits of bf16 (Triton 3.6 to 3.9)."""
    if UPCAST_DOT:
        acc = tl.dot(x.to(tl.float32), w.to(tl.float32), acc, input_precision="ieee")
    elif x.dtype == tl.float32:
        acc = tl.dot(x, w, acc, input_precision="ieee")
    else:
        acc = tl.dot(x, w, acc)
    return acc


@triton.jit
def _quant_matmul_splitk_kernel(
    X, Q, S, Z, B, Y, P,  # X (M, K); B (N,); Y (M, N); P (SPLIT_K, M, N) fp32, written when SPLIT_K > 1
    M, N, K, groups,
    BITS: tl.constexpr, GROUP_SIZE: tl.constexpr, HAS_BIAS: tl.constexpr, SPLIT_K: tl.constexpr,
    UPCAST_DOT: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """Program (n, s, m): rows [m * BLOCK_M, ...) x columns [n * BLOCK_N, ...) over slice s of K. One
    split writes y (+ bias) directly; several write fp32 partial sums for _splitk_reduce_kernel."""
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    pid_m = tl.program_id(2)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    # whole BLOCK_K tiles per split, so that no tile straddles two groups
    k_per_split = tl.cdiv(tl.cdiv(K, BLOCK_K), SPLIT_K) * BLOCK_K
    k_begin = pid_k * k_per_split
    k_end = tl.minimum(k_begin + k_per_split, K)
    x_rows = X + offs_m[:, None].to(tl.int64) * K
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for k0 in range(k_begin, k_end, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        x = tl.load(x_rows + offs_k[None, :], mask=(offs_m[:, None] < M) & (offs_k[None, :] < K), other=0.0)
        w = _dequantized_tile(Q, S, Z, k0, offs_n, N, K, groups, BITS, GROUP_SIZE, BLOCK_K, BLOCK_N).to(x.dtype)
        if BLOCK_M == 1:
            # a GEMV: CUDA-core products summed over K, no tensor-core padding of one row to 16
            acc += tl.sum(x.to(tl.float32)[:, :, None] * w.to(tl.float32)[None, :, :], axis=1)
        else:
            acc = _dot(x, w, acc, UPCAST_DOT)
    mask = (offs_m[:, None] < M) & (offs_n[None, :] < N)
    if SPLIT_K == 1:
        if HAS_BIAS:
            acc += tl.load(B + offs_n, mask=offs_n < N, other=0.0).to(tl.float32)[None, :]
        tl.store(Y + offs_m[:, None].to(tl.int64) * N + offs_n[None, :], acc.to(Y.dtype.element_ty), mask=mask)
    else:
        p_rows = (pid_k * M + offs_m[:, None]).to(tl.int64) * N
        tl.store(P + p_rows + offs_n[None, :], acc, mask=mask)


@triton.jit
def _splitk_reduce_kernel(
    P, B, Y,  # P (SPLIT_K, M, N) fp32; B (N,); Y (M, N)
    M, N,
    HAS_BIAS: tl.constexpr, SPLIT_K: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """y = sum of the splits' partial sums (+ bias), added in a fixed order: the result is reproducible."""
    row = tl.program_id(0)
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask = offs_n < N
    acc = tl.zeros([BLOCK_N], dtype=tl.float32)
    for s in tl.static_range(SPLIT_K):
        acc += tl.load(P + (s * M + row).to(tl.int64) * N + offs_n, mask=mask, other=0.0)
    if HAS_BIAS:
        acc += tl.load(B + offs_n, mask=mask, other=0.0).to(tl.float32)
    tl.store(Y + row.to(tl.int64) * N + offs_n, acc.to(Y.dtype.element_ty), mask=mask)


@triton.jit
def _quant_matmul_tiled_kernel(
    X, Q, S, Z, B, Y,  # X (M, K); B (N,); Y (M, N)
    M, N, K, groups,
    m_bucket,  # next power of 2 of M: read only by the autotuner (its key), so each M does not retune
    BITS: tl.constexpr, GROUP_SIZE: tl.constexpr, HAS_BIAS: tl.constexpr, UPCAST_DOT: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    """One (BLOCK_M, BLOCK_N) tile of y per program, over all of K."""
    pid = tl.program_id(0)
    tiles_m = tl.cdiv(M, BLOCK_M)
    tiles_n = tl.cdiv(N, BLOCK_N)
    # consecutive programs walk down GROUP_M row tiles of one column tile: they share its weight in L2
    per_band = GROUP_M * tiles_n
    first_m = (pid // per_band) * GROUP_M
    band_m = tl.minimum(tiles_m - first_m, GROUP_M)
    pid_m = first_m + (pid % per_band) % band_m
    pid_n = (pid % per_band) // band_m
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    x_rows = X + offs_m[:, None].to(tl.int64) * K
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        x = tl.load(x_rows + offs_k[None, :], mask=(offs_m[:, None] < M) & (offs_k[None, :] < K), other=0.0)
        w = _dequantized_tile(Q, S, Z, k0, offs_n, N, K, groups, BITS, GROUP_SIZE, BLOCK_K, BLOCK_N).to(x.dtype)
        acc = _dot(x, w, acc, UPCAST_DOT)
    if HAS_BIAS:
        acc += tl.load(B + offs_n, mask=offs_n < N, other=0.0).to(tl.float32)[None, :]
    mask = (offs_m[:, None] < M) & (offs_n[None, :] < N)
    tl.store(Y + offs_m[:, None].to(tl.int64) * N + offs_n[None, :], acc.to(Y.dtype.element_ty), mask=mask)


@triton.jit
def _dequantize_kernel(
    Q, S, Z, W,  # W (N, K)
    N, K, groups,
    BITS: tl.constexpr, GROUP_SIZE: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    k0 = tl.program_id(1) * BLOCK_K
    offs_k = k0 + tl.arange(0, BLOCK_K)
    w = _dequantized_tile(Q, S, Z, k0, offs_n, N, K, groups, BITS, GROUP_SIZE, BLOCK_K, BLOCK_N)
    mask = (offs_k[:, None] < K) & (offs_n[None, :] < N)
    tl.store(W + offs_n[None, :].to(tl.int64) * K + offs_k[:, None], w.to(W.dtype.element_ty), mask=mask)


# ----------------------------------------------------------------------------------------------
# configs: autotuned on CUDA (first lists for sm_90, not yet measured on the H100); fixed on CPU


def _splitk_cuda_configs() -> list[triton.Config]:
    return [
        triton.Config({"BLOCK_N": bn, "BLOCK_K": bk}, num_warps=w, num_stages=s)
        for bn, bk, w, s in [
            (32, 128, 4, 4), (64, 64, 4, 4), (64, 128, 4, 3), (64, 256, 8, 3), (128, 128, 8, 3),
            (128, 64, 4, 4), (32, 256, 4, 3), (64, 32, 4, 4), (128, 32, 4, 4),
        ]
    ]


def _tiled_cuda_configs() -> list[triton.Config]:
    return [
        triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "GROUP_M": 8}, num_warps=w, num_stages=s)
        for bm, bn, bk, w, s in [
            (32, 64, 128, 4, 4), (64, 64, 128, 4, 4), (64, 128, 64, 4, 4), (128, 128, 64, 8, 3),
            (64, 64, 64, 4, 4), (64, 256, 64, 8, 3), (64, 128, 32, 4, 4), (128, 128, 32, 8, 4),
        ]
    ]


# the interpreter runs one program after another: few, large programs; BLOCK_K 32 fits every group size
_SPLITK_CPU_CONFIG = {"BLOCK_N": 64, "BLOCK_K": 32}
_TILED_CPU_CONFIG = {"BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_K": 32, "GROUP_M": 4}
# (64 x up to 128) values over 8 warps: ptxas for sm_90 gives 88 registers a thread for int4, 254 with
# 4 warps (compiled, not yet timed on the H100)
_DEQUANTIZE_BLOCK_N = 64
_DEQUANTIZE_WARPS = 8


@functools.cache
def _autotuned(kernel_name: str, group_size: int):
    """The autotuned handle of one kernel, over the configs whose K tiles lie inside one group
    (``tuning.limit``: read once, at the first call for this kernel and group size)."""
    kernel, configs, key = {
        "splitk": (_quant_matmul_splitk_kernel, _splitk_cuda_configs(),
                   ["N", "K", "GROUP_SIZE", "BLOCK_M", "SPLIT_K"]),
        "tiled": (_quant_matmul_tiled_kernel, _tiled_cuda_configs(), ["m_bucket", "N", "K", "GROUP_SIZE"]),
    }[kernel_name]
    fitting = [c for c in configs if group_size == 0 or c.kwargs["BLOCK_K"] <= group_size]
    return triton.autotune(configs=tuning.limit(fitting), key=key)(kernel)


# ----------------------------------------------------------------------------------------------
# launchers


def _layout(x: Tensor | None, qweight: Tensor, scales: Tensor, zeros: Tensor | None, bias: Tensor | None):
    """(bits, N, K, groups, GROUP_SIZE) after checking what the kernels assume: contiguous tensors, the
    QuantizedWeight shapes, int4 with zeros, group sizes powers of 2 (so BLOCK_K divides them)."""
    bits = 8 if qweight.dtype == torch.int8 else 4
    n, cols = qweight.shape
    k = cols if bits == 8 else cols * 8
    groups = scales.shape[1]
    group_size = 0 if groups == 1 else k // groups
    tensors = {"x": x, "qweight": qweight, "scales": scales, "zeros": zeros, "bias": bias}
    for name, t in tensors.items():
        if t is not None and not t.is_contiguous():
            raise ValueError(f"{name}: expected a contiguous tensor, got strides {t.stride()}")
    if qweight.dtype not in (torch.int8, torch.int32) or scales.shape[0] != n or k % groups:
        raise ValueError(f"qweight, scales: expected int8 (N, K) or int32 (N, K // 8) and (N, groups), "
                         f"got {qweight.dtype} {tuple(qweight.shape)} and {tuple(scales.shape)}")
    if group_size & (group_size - 1) or (group_size and group_size < 16):
        raise ValueError(f"scales: expected a power-of-2 group size >= 16 or one group per row, got {group_size}")
    if (bits == 4) != (zeros is not None) or (zeros is not None and zeros.shape != scales.shape):
        raise ValueError("zeros: expected (N, groups) like scales for int4 and None for int8")
    if x is not None and (x.dim() != 2 or x.shape[1] != k):
        raise ValueError(f"x: expected (M, {k}), got {tuple(x.shape)}")
    if bias is not None and bias.shape != (n,):
        raise ValueError(f"bias: expected ({n},), got {tuple(bias.shape)}")
    return bits, n, k, groups, group_size


@functools.cache
def _multiprocessors(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def default_split_k(n: int, k: int, device: torch.device) -> int:
    """Slices of K for the small-M kernel: on CUDA, enough (N / 64) x splits programs for about two per SM,
    each slice keeping >= 512 of K so the fp32 partial sums stay a small part of the traffic (a first
    guess, not yet measured on the H100). On CPU 1: the interpreter gains nothing from splitting."""
    if device.type != "cuda":
        return 1
    sms = _multiprocessors(device.index if device.index is not None else torch.cuda.current_device())
    tiles_n = triton.cdiv(n, 64)
    split = 1
    while split < 16 and 2 * split * tiles_n <= 2 * sms and k // (2 * split) >= 512:
        split *= 2
    return split


def quant_matmul_splitk(
    x: Tensor, qweight: Tensor, scales: Tensor, zeros: Tensor | None, bias: Tensor | None,
    split_k: int | None = None,
) -> Tensor:
    """Small-M path: ``x (M, K)`` -> ``y (M, N)`` in x.dtype. ``split_k`` slices of K (None: default_split_k).
    Any M works; the weight is read once per 16 rows (once in all for M == 1)."""
    bits, n, k, groups, group_size = _layout(x, qweight, scales, zeros, bias)
    m = x.shape[0]
    split_k = default_split_k(n, k, x.device) if split_k is None else split_k
    if split_k < 1:
        raise ValueError(f"split_k: expected >= 1, got {split_k}")
    y = torch.empty(m, n, dtype=x.dtype, device=x.device)
    if m == 0:
        return y
    block_m = 1 if m == 1 else SMALL_M_TILE
    partial = torch.empty((split_k, m, n) if split_k > 1 else (0,), dtype=torch.float32, device=x.device)
    # absent zeros and bias are replaced by scales, never read: BITS and HAS_BIAS switch their loads off
    args = (x, qweight, scales, zeros if zeros is not None else scales, bias if bias is not None else scales,
            y, partial, m, n, k, groups)
    flags = dict(BITS=bits, GROUP_SIZE=group_size, HAS_BIAS=bias is not None and split_k == 1,
                 SPLIT_K=split_k, UPCAST_DOT=not x.is_cuda, BLOCK_M=block_m)
    if x.is_cuda:
        grid = lambda meta: (triton.cdiv(n, meta["BLOCK_N"]), split_k, triton.cdiv(m, block_m))  # noqa: E731
        _autotuned("splitk", group_size)[grid](*args, **flags)
    else:
        grid = (triton.cdiv(n, _SPLITK_CPU_CONFIG["BLOCK_N"]), split_k, triton.cdiv(m, block_m))
        _quant_matmul_splitk_kernel[grid](*args, **flags, **_SPLITK_CPU_CONFIG)
    if split_k > 1:
        block_n = min(1024, triton.next_power_of_2(n))
        _splitk_reduce_kernel[(m, triton.cdiv(n, block_n))](
            partial, bias if bias is not None else partial, y, m, n,
            HAS_BIAS=bias is not None, SPLIT_K=split_k, BLOCK_N=block_n,
        )
    return y


def quant_matmul_tiled(
    x: Tensor, qweight: Tensor, scales: Tensor, zeros: Tensor | None, bias: Tensor | None
) -> Tensor:
    """Large-M path: ``x (M, K)`` -> ``y (M, N)`` in x.dtype, tensor-core tiles over dequantized weight."""
    bits, n, k, groups, group_size = _layout(x, qweight, scales, zeros, bias)
    m = x.shape[0]
    y = torch.empty(m, n, dtype=x.dtype, device=x.device)
    if m == 0:
        return y
    args = (x, qweight, scales, zeros if zeros is not None else scales, bias if bias is not None else scales,
            y, m, n, k, groups, triton.next_power_of_2(m))
    flags = dict(BITS=bits, GROUP_SIZE=group_size, HAS_BIAS=bias is not None, UPCAST_DOT=not x.is_cuda)
    if x.is_cuda:
        grid = lambda meta: (triton.cdiv(m, meta["BLOCK_M"]) * triton.cdiv(n, meta["BLOCK_N"]),)  # noqa: E731
        _autotuned("tiled", group_size)[grid](*args, **flags)
    else:
        cfg = _TILED_CPU_CONFIG
        grid = (triton.cdiv(m, cfg["BLOCK_M"]) * triton.cdiv(n, cfg["BLOCK_N"]),)
        _quant_matmul_tiled_kernel[grid](*args, **flags, **cfg)
    return y


def dequantize(qweight: Tensor, scales: Tensor, zeros: Tensor | None, dtype: torch.dtype) -> Tensor:
    """The weight ``(N, K)`` in ``dtype``, equal to ``QuantizedWeight.dequantize()`` in scales.dtype."""
    bits, n, k, groups, group_size = _layout(None, qweight, scales, zeros, None)
    w = torch.empty(n, k, dtype=dtype, device=scales.device)
    # a K tile must not straddle two groups
    block_k = min(128, group_size or 128)
    grid = (triton.cdiv(n, _DEQUANTIZE_BLOCK_N), triton.cdiv(k, block_k))
    _dequantize_kernel[grid](
        qweight, scales, zeros if zeros is not None else scales, w, n, k, groups,
        BITS=bits, GROUP_SIZE=group_size, BLOCK_N=_DEQUANTIZE_BLOCK_N, BLOCK_K=block_k, num_warps=_DEQUANTIZE_WARPS,
    )
    return w
