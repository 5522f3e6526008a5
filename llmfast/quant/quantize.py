"""Round-to-nearest weight-only quantization to int8 or int4 (formats in llmfast.quant.weight)."""
from __future__ import annotations

import torch

from llmfast.ops._checks import FLOAT_DTYPES, check_tensor
from llmfast.quant.weight import GROUP_SIZES, QuantizedWeight, pack_int4

BITS = (4, 8)


def quantize(weight: torch.Tensor, bits: int, group_size: int = 128) -> QuantizedWeight:
    """Round-to-nearest quantization of ``weight (N, K)`` (float16/bfloat16/float32) to ``bits`` 8 or 4.

    ``group_size`` in (32, 64, 128) columns of K per scale, or -1 for one scale per output channel.
    K must be a multiple of ``group_size`` (and of 8 for 4 bits); ``group_size == K`` is the same
    quantization as -1 and reads back as -1. See ``QuantizedWeight`` for the formats.
    """
    check_tensor("weight", weight, ndim=2, dtypes=FLOAT_DTYPES)
    if isinstance(bits, bool) or not isinstance(bits, int) or bits not in BITS:
        raise ValueError(f"bits: expected one of {BITS}, got {bits!r}")
    if isinstance(group_size, bool) or not isinstance(group_size, int) or group_size not in GROUP_SIZES:
        raise ValueError(f"group_size: expected one of {GROUP_SIZES}, got {group_size!r}")
    n, k = weight.shape
    if n == 0 or k == 0:
        raise ValueError(f"weight: expected a non-empty (N, K) matrix, got shape {tuple(weight.shape)}")
    if group_size != -1 and k % group_size != 0:
        raise ValueError(f"group_size: K = weight.shape[1] = {k} is not a multiple of group_size={group_size}")
    if bits == 4 and k % 8 != 0:
        raise ValueError(f"weight: 4-bit packing needs K = weight.shape[1] a multiple of 8, got {k}")
    if not torch.isfinite(weight).all():
        raise ValueError("weight: expected finite values, got NaN or inf")

    groups = 1 if group_size == -1 else k // group_size
    w = weight.detach().float().reshape(n, groups, k // groups)  # (N, groups, group_size)
    # scales and zero points are stored in the weight's dtype; the codes are rounded against those stored
    # values, and each scale is rounded up so that its grid covers the whole group: every element then
    # lies within half a step of its dequantized value (but those within a step of the dtype's largest value)
    if bits == 8:
        scales = _rounded_up(w.abs().amax(dim=-1) / 127, weight.dtype)  # (N, groups)
        # near the dtype's largest value, 127 * (a scale rounded up) overflows: one ulp down, the top code
        # then covers it (a 16-bit ulp moves the top code by well under a step: fp16 0.12, bf16 at most 1)
        overflows = (127 * scales.float()).to(weight.dtype).isinf()
        scales = torch.where(overflows, torch.nextafter(scales, torch.zeros_like(scales)), scales)
        codes = torch.round(w / _nonzero(scales)).clamp(-127, 127)
        codes = _finite(codes, codes * scales.float()[..., None], weight.dtype)
        return QuantizedWeight(codes.to(torch.int8).view(n, k), scales)
    lo, hi = w.amin(dim=-1), w.amax(dim=-1)  # (N, groups)
    scales = _rounded_up(hi / 15 - lo / 15, weight.dtype)  # (hi - lo) overflows float32 near its max
    zeros = (lo + 8 * scales.float()).to(weight.dtype)
    # rounding the zero point shifts the grid by up to half its ulp, which can exceed a step when a group
    # sits far from 0 (bf16): widen the step until codes 0..15 around the stored zero reach lo and hi
    z = zeros.float()
    scales = _rounded_up(torch.maximum(scales.float(), torch.maximum((z - lo) / 8, (hi - z) / 7)), weight.dtype)
    codes = (torch.round((w - z[..., None]) / _nonzero(scales)) + 8).clamp(0, 15)
    codes = _finite(codes, (codes - 8) * scales.float()[..., None] + z[..., None], weight.dtype)
    return QuantizedWeight(pack_int4(codes.view(n, k)), scales, zeros)


def _finite(codes: torch.Tensor, dequantized: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``codes`` moved one step inward where their float32 ``dequantized`` value (as ``dequantize`` computes
    it) rounds to inf in ``dtype``: a weight within a step of the dtype's largest value, whose rounded-up
    scale put its code past it. Such elements are off by up to one step instead of half."""
    overflow = dequantized.to(dtype).isinf()
    return torch.where(overflow, codes - torch.sign(dequantized), codes)


def _rounded_up(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """float32 ``x >= 0`` in ``dtype``, never below ``x``: round-to-nearest, then one ulp up where that went
    down (so a tiny nonzero scale does not underflow to 0 in float16 either)."""
    y = x.to(dtype)
    return torch.where(y.float() < x, torch.nextafter(y, torch.full_like(y, float("inf"))), y)


def _nonzero(scales: torch.Tensor) -> torch.Tensor:
    """``scales (N, groups)`` as float32 ``(N, groups, 1)``, with 1 where a scale is 0 (a constant group)."""
    scales = scales.float()[..., None]
    return torch.where(scales == 0, torch.ones_like(scales), scales)
