"""QuantLinear: a drop-in for torch.nn.Linear with a frozen, weight-only quantized weight."""
from __future__ import annotations

import warnings

import torch

from llmfast.ops._checks import check_positive_int
from llmfast.ops.quant_matmul import quant_matmul
from llmfast.quant.quantize import BITS, quantize
from llmfast.quant.weight import GROUP_SIZES, QuantizedWeight


class QuantLinear(torch.nn.Module):
    """``y = x @ W.T + bias`` with ``W (out_features, in_features)`` quantized (see ``llmfast.quant``).

    Built from a trained layer with ``QuantLinear.from_linear(linear, bits=4, group_size=128)``, or empty
    from the shapes (zero codes, unit scales) to ``load_state_dict`` a saved one into. ``state_dict`` keys:
    ``weight_q.qweight``, ``weight_q.scales``, ``weight_q.zeros`` (4 bits only) and ``bias``.
    ``forward`` takes ``x (..., in_features)``, usually in ``dtype`` (the dtype of the quantized weight's
    scales; another float dtype uses the scales and bias cast to it, as ``quant_matmul`` says), and returns
    ``(..., out_features)`` in ``x.dtype`` (inside autocast, in the autocast dtype, as nn.Linear). The weight
    is frozen: backward gives ``x`` (and ``bias``, if it is made trainable) their gradients, as a frozen
    nn.Linear would, and none to the quantized weight.
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True, bits: int = 4,
                 group_size: int = 128, device=None, dtype=None, *, backend: str = "auto"):
        super().__init__()
        _check_layout(in_features, out_features, bits, group_size)
        self.in_features, self.out_features, self.backend = in_features, out_features, backend
        dtype = dtype or torch.get_default_dtype()
        groups = 1 if group_size == -1 else in_features // group_size
        scales = torch.ones(out_features, groups, dtype=dtype, device=device)
        if bits == 8:
            qweight = torch.zeros(out_features, in_features, dtype=torch.int8, device=device)
            self.weight_q = QuantizedWeight(qweight, scales)
        else:
            qweight = torch.zeros(out_features, in_features // 8, dtype=torch.int32, device=device)
            self.weight_q = QuantizedWeight(qweight, scales, torch.zeros_like(scales))
        self.bias = None
        if bias:
            self.bias = torch.nn.Parameter(torch.zeros(out_features, dtype=dtype, device=device), requires_grad=False)

    @classmethod
    def from_linear(cls, linear: torch.nn.Linear, bits: int = 4, group_size: int = 128, *,
                    backend: str = "auto") -> QuantLinear:
        """Quantizes ``linear.weight`` round-to-nearest (``llmfast.quant.quantize``); keeps its bias, dtype, device."""
        if not isinstance(linear, torch.nn.Linear):
            raise TypeError(f"linear: expected a torch.nn.Linear, got {type(linear).__name__}")
        weight = linear.weight.detach()
        # built on the meta device (no allocation), then given the real tensors
        module = cls(linear.in_features, linear.out_features, linear.bias is not None, bits, group_size,
                     device="meta", dtype=weight.dtype, backend=backend)
        module.weight_q = quantize(weight, bits, group_size)
        if linear.bias is not None:
            bias = linear.bias.detach().to(weight.dtype, copy=True)
            module.bias = torch.nn.Parameter(bias, requires_grad=False)
        return module

    @classmethod
    def from_linear_auto(cls, linear: torch.nn.Linear, bits: int) -> QuantLinear | None:
        """``from_linear`` with the largest of 128, 64, 32 that divides ``in_features`` as the group size,
        else one scale per output channel; None where int4 cannot pack the rows (``in_features`` not a
        multiple of 8). How llmfast.patch and the engine quantize a model's layers."""
        if bits == 4 and linear.in_features % 8 != 0:
            return None
        group_size = next((g for g in (128, 64, 32) if linear.in_features % g == 0), -1)
        return cls.from_linear(linear, bits, group_size)

    @property
    def weight(self) -> torch.Tensor:
        """The dequantized ``(out_features, in_features)`` weight, for code written against nn.Linear that
        reads ``layer.weight`` (its dtype, device or shape). Computed on each access; neither a parameter nor
        in the state dict, which hold ``weight_q``."""
        return self.weight_q.dequantize()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if isinstance(x, torch.Tensor) and x.is_floating_point() and torch.is_autocast_enabled(x.device.type):
            x = x.to(torch.get_autocast_dtype(x.device.type))  # as nn.Linear runs (and returns) under autocast
        return quant_matmul(x, self.weight_q, self.bias, backend=self.backend)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"bits={self.weight_q.bits}, group_size={self.weight_q.group_size}")


def _check_layout(in_features, out_features, bits, group_size) -> None:
    check_positive_int("in_features", in_features)
    check_positive_int("out_features", out_features)
    if isinstance(bits, bool) or bits not in BITS:
        raise ValueError(f"bits: expected one of {BITS}, got {bits!r}")
    if isinstance(group_size, bool) or group_size not in GROUP_SIZES:
        raise ValueError(f"group_size: expected one of {GROUP_SIZES}, got {group_size!r}")
    if group_size != -1 and in_features % group_size != 0:
        raise ValueError(f"group_size: in_features = {in_features} is not a multiple of group_size={group_size}")
    if bits == 4 and in_features % 8 != 0:
        raise ValueError(f"in_features: 4-bit packing needs a multiple of 8, got {in_features}")


def warn_kept_in_full_precision(in_features: list[int], bits: int, asked: str) -> None:
    """Says which layers ``from_linear_auto`` left as they were (none for int8), so that ``asked`` (the
    argument that asked for quantization) is not silently only partly honoured."""
    if in_features:
        sizes = ", ".join(str(n) for n in sorted(set(in_features)))
        warnings.warn(f"{asked}: {len(in_features)} linear layers kept in full precision: int{bits} packs 8 input "
                      f"features per int32 and their in_features ({sizes}) are not multiples of 8", stacklevel=4)
