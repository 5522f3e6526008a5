"""The storage format of a quantized weight: QuantizedWeight and the int4 packing it uses."""
from __future__ import annotations

from typing import Mapping

import torch

from llmfast.ops._checks import FLOAT_DTYPES, check_tensor

GROUP_SIZES = (32, 64, 128, -1)  # -1: one group spanning the whole row (one scale per output channel)


def pack_int4(codes: torch.Tensor) -> torch.Tensor:
    """``codes (N, K)`` integers in [0, 15] -> ``(N, K // 8)`` int32.

    Code ``k`` of a row sits in bits ``4 * (k % 8)`` to ``4 * (k % 8) + 3`` of word ``k // 8``.
    """
    n, k = codes.shape
    nibbles = codes.to(torch.int64).reshape(n, k // 8, 8)
    shifts = torch.arange(0, 32, 4, dtype=torch.int64, device=codes.device)
    words = (nibbles << shifts).sum(dim=-1)  # (N, K // 8), in [0, 2**32)
    # the same 32 bits read as a two's-complement int32
    return torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)


def unpack_int4(qweight: torch.Tensor) -> torch.Tensor:
    """``qweight (N, K // 8)`` int32 -> codes ``(N, K)`` uint8 in [0, 15]; the inverse of ``pack_int4``."""
    n, words = qweight.shape
    shifts = torch.arange(0, 32, 4, dtype=torch.int32, device=qweight.device)
    codes = (qweight[..., None] >> shifts) & 0xF  # (N, K // 8, 8); the mask drops the sign extension
    return codes.reshape(n, words * 8).to(torch.uint8)


class QuantizedWeight(torch.nn.Module):
    """A weight ``(N, K)`` quantized round-to-nearest per group of ``group_size`` columns along K.

    ``groups = K // group_size`` (1 for ``group_size=-1``: one scale per output channel).
    ``bits=8``, symmetric: ``qweight (N, K)`` int8 in [-127, 127], ``scales (N, groups)``;
    ``w = qweight * scale``, scale = group absmax / 127.
    ``bits=4``, asymmetric (as tinygemm): ``qweight (N, K // 8)`` int32 packing codes ``q`` in [0, 15]
    (``pack_int4``), ``scales`` and ``zeros (N, groups)``; ``w = (q - 8) * scale + zero``, scale =
    (group max - group min) / 15, zero = the value of code 8, so codes 0 and 15 are the group min and max
    (``quantize`` widens a scale by the rounding of its stored zero point, where that is needed to reach them).

    ``scales`` and ``zeros`` are in the original weight's dtype. ``bits``, ``group_size``, ``shape`` and
    ``dtype`` are read from the buffers, so they survive ``state_dict``/safetensors round trips
    (``QuantizedWeight.from_state_dict``); a single group per row reads as ``group_size == -1``.
    """

    def __init__(self, qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor | None = None):
        super().__init__()
        _check_buffers(qweight, scales, zeros)
        self.register_buffer("qweight", qweight)
        self.register_buffer("scales", scales)
        self.register_buffer("zeros", zeros)  # None for int8: then it is left out of state_dict

    @classmethod
    def from_state_dict(cls, state_dict: Mapping[str, torch.Tensor]) -> QuantizedWeight:
        """Rebuilds a QuantizedWeight from ``state_dict()`` (or a loaded safetensors file)."""
        for key in ("qweight", "scales"):
            if key not in state_dict:
                raise ValueError(f"state_dict: expected a {key!r} entry, got keys {sorted(state_dict)}")
        return cls(state_dict["qweight"], state_dict["scales"], state_dict.get("zeros"))

    @property
    def bits(self) -> int:
        return 8 if self.qweight.dtype == torch.int8 else 4

    @property
    def shape(self) -> tuple[int, int]:
        """``(N, K)`` of the original weight."""
        n, cols = self.qweight.shape
        return n, cols * (8 if self.bits == 4 else 1)

    @property
    def group_size(self) -> int:
        groups = self.scales.shape[1]
        return -1 if groups == 1 else self.shape[1] // groups

    @property
    def dtype(self) -> torch.dtype:
        """The original weight's dtype, which ``dequantize`` returns."""
        return self.scales.dtype

    def dequantize(self) -> torch.Tensor:
        """The weight ``(N, K)`` in the original dtype (computed in float32, rounded once)."""
        n, k = self.shape
        groups = self.scales.shape[1]
        scales = self.scales.float()[..., None]  # (N, groups, 1)
        if self.bits == 8:
            codes = self.qweight.float().reshape(n, groups, k // groups)
            w = codes * scales
        else:
            codes = unpack_int4(self.qweight).float().reshape(n, groups, k // groups)
            w = (codes - 8) * scales + self.zeros.float()[..., None]
        return w.view(n, k).to(self.dtype)

    def extra_repr(self) -> str:
        return f"bits={self.bits}, group_size={self.group_size}, shape={self.shape}, dtype={self.dtype}"


def _check_buffers(qweight: object, scales: object, zeros: object) -> None:
    check_tensor("qweight", qweight, ndim=2, dtypes=(torch.int8, torch.int32))
    check_tensor("scales", scales, ndim=2, dtypes=FLOAT_DTYPES, device=qweight.device)
    bits = 8 if qweight.dtype == torch.int8 else 4
    n, cols = qweight.shape
    k = cols * (8 if bits == 4 else 1)
    groups = scales.shape[1]
    if scales.shape[0] != n or groups == 0 or k % groups != 0 or (groups > 1 and k // groups not in GROUP_SIZES):
        raise ValueError(
            f"scales: expected (N, K // group_size) = ({n}, K // group_size) with K={k} and group_size in "
            f"{GROUP_SIZES}, got {tuple(scales.shape)}"
        )
    if bits == 8 and zeros is not None:
        raise ValueError("zeros: expected None for an int8 qweight (int8 is symmetric)")
    if bits == 4:
        if zeros is None:
            raise ValueError("zeros: expected a tensor for an int4 (int32-packed) qweight")
        check_tensor("zeros", zeros, dtypes=(scales.dtype,), device=qweight.device)
        if zeros.shape != scales.shape:
            raise ValueError(
                f"zeros: expected shape {tuple(scales.shape)} (the shape of scales), got {tuple(zeros.shape)}"
            )
