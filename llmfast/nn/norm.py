"""Drop-in norm modules: same constructors and parameter names as torch.nn, so state dicts load."""
from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn.functional as F

from llmfast.ops._checks import check_positive_int
from llmfast.ops.norm import add_layer_norm, add_rms_norm


def _as_shape(name: str, normalized_shape: int | Sequence[int]) -> tuple[int, ...]:
    is_sequence = isinstance(normalized_shape, (tuple, list, torch.Size))
    shape = tuple(normalized_shape) if is_sequence else (normalized_shape,)
    if not shape:
        raise ValueError(f"{name}: expected at least one dim, got {normalized_shape!r}")
    for size in shape:
        check_positive_int(name, size)
    return shape


class _NormBase(torch.nn.Module):
    """Normalises the trailing ``normalized_shape`` dims, flattened into one hidden dim."""

    def __init__(self, shape_name, normalized_shape, eps, elementwise_affine, bias, device, dtype, backend):
        # not super(): LayerNorm and RMSNorm below are also torch's classes, whose __init__ this one stands in for
        # (it sets the same attributes and parameters)
        torch.nn.Module.__init__(self)
        self.normalized_shape = _as_shape(shape_name, normalized_shape)
        self.eps = eps
        self.elementwise_affine = elementwise_affine
        self.backend = backend
        factory = {"device": device, "dtype": dtype}
        self.weight = self.bias = None
        if elementwise_affine:
            self.weight = torch.nn.Parameter(torch.ones(self.normalized_shape, **factory))
            if bias:
                self.bias = torch.nn.Parameter(torch.zeros(self.normalized_shape, **factory))

    def _flat(self, x: torch.Tensor, residual: torch.Tensor | None):
        """(x, residual) with the normalised dims flattened into one, and x's original shape."""
        n = len(self.normalized_shape)
        if not isinstance(x, torch.Tensor) or tuple(x.shape[x.dim() - n:]) != self.normalized_shape:
            got = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
            raise ValueError(f"x: expected trailing dims {self.normalized_shape}, got {got}")
        if residual is not None and (not isinstance(residual, torch.Tensor) or residual.shape != x.shape):
            got = tuple(residual.shape) if isinstance(residual, torch.Tensor) else type(residual).__name__
            raise ValueError(f"residual: expected shape {tuple(x.shape)} (the shape of x), got {got}")
        flat = (*x.shape[: x.dim() - n], math.prod(self.normalized_shape))
        r2 = None if residual is None else residual.reshape(flat)
        return x.reshape(flat), r2, tuple(x.shape)

    def _torch_float64(self, x, residual, norm):
        """(y, h) by torch's own ``norm`` in float64, which no llmfast kernel takes (``module.double()``)."""
        self._flat(x, residual)  # the same shape checks
        h = x if residual is None else x + residual.to(x.dtype)
        return norm(h), h

    @staticmethod
    def _param(p: torch.Tensor | None) -> torch.Tensor | None:
        return None if p is None else p.reshape(-1)

    def extra_repr(self) -> str:
        return f"{self.normalized_shape}, eps={self.eps}, elementwise_affine={self.elementwise_affine}"


class FusedAddLayerNorm(_NormBase):
    """``forward(x, residual=None) -> (y, h)`` with ``h = x + residual``, ``y = LayerNorm(h)``."""

    def __init__(self, normalized_shape, eps=1e-5, elementwise_affine=True, bias=True,
                 device=None, dtype=None, *, backend: str = "auto"):
        super().__init__("normalized_shape", normalized_shape, eps, elementwise_affine, bias, device, dtype, backend)

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None):
        if isinstance(x, torch.Tensor) and x.dtype == torch.float64:
            return self._torch_float64(
                x, residual, lambda h: F.layer_norm(h, self.normalized_shape, self.weight, self.bias, self.eps))
        x2, r2, shape = self._flat(x, residual)
        y, h = add_layer_norm(x2, r2, self._param(self.weight), self._param(self.bias), self.eps,
                              backend=self.backend)
        return y.view(shape), h.view(shape)


# torch's norms that CUDA autocast runs in float32 (they have an AutocastCUDA kernel): layer_norm always,
# rms_norm from torch 2.12 on. Looked up once, not per forward (torch.compile cannot trace the lookup).
_CUDA_AUTOCAST_FLOAT32 = frozenset(
    op for op in ("aten::layer_norm", "aten::rms_norm")
    if torch._C._dispatch_has_kernel_for_dispatch_key(op, "AutocastCUDA"))


def _as_torch_under_cuda_autocast(x: torch.Tensor, aten_op: str) -> torch.Tensor:
    """``x`` in float32 where torch's ``aten_op`` would take it so: a float16/bfloat16 input inside CUDA
    autocast, with the op on autocast's float32 list. CPU autocast keeps the input dtype."""
    if (aten_op in _CUDA_AUTOCAST_FLOAT32 and isinstance(x, torch.Tensor) and x.device.type == "cuda"
            and x.dtype in (torch.float16, torch.bfloat16) and torch.is_autocast_enabled("cuda")):
        return x.float()
    return x


class LayerNorm(FusedAddLayerNorm, torch.nn.LayerNorm):
    """Drop-in for ``torch.nn.LayerNorm`` (parameters ``weight`` and ``bias``). Inside CUDA autocast it
    returns float32 for a float16/bfloat16 input, as torch's (``layer_norm`` is on autocast's float32 list;
    CPU autocast keeps the input dtype).

    A subclass of ``torch.nn.LayerNorm``, so code that finds norms by type treats it as one: Hugging Face's
    Trainer leaves LayerNorm weights out of weight decay that way, and ``_init_weights`` resets them."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(_as_torch_under_cuda_autocast(x, "aten::layer_norm"))[0]


class FusedAddRMSNorm(_NormBase):
    """``forward(x, residual=None) -> (y, h)`` with ``h = x + residual``, ``y = RMSNorm(h)``.

    ``eps=None`` uses the machine epsilon of the dtype the norm is computed in, as ``torch.nn.RMSNorm``
    does: float32's for float16/bfloat16/float32 input (not the input dtype's: bf16's is 65536x larger).
    """

    def __init__(self, hidden_size, eps: float | None = 1e-6, elementwise_affine=True,
                 device=None, dtype=None, *, backend: str = "auto"):
        super().__init__("hidden_size", hidden_size, eps, elementwise_affine, False, device, dtype, backend)

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None):
        if isinstance(x, torch.Tensor) and x.dtype == torch.float64:
            return self._torch_float64(x, residual, lambda h: F.rms_norm(h, self.normalized_shape, self.weight, self.eps))
        x2, r2, shape = self._flat(x, residual)
        eps = torch.finfo(torch.float32).eps if self.eps is None else self.eps  # float64 went to torch above
        y, h = add_rms_norm(x2, r2, self._param(self.weight), eps, backend=self.backend)
        return y.view(shape), h.view(shape)


class RMSNorm(FusedAddRMSNorm, torch.nn.RMSNorm):
    """Drop-in for ``torch.nn.RMSNorm`` and HF ``LlamaRMSNorm`` (parameter ``weight``), and a subclass of
    ``torch.nn.RMSNorm``. Inside CUDA autocast it returns what torch's returns: float32 for a float16/bfloat16
    input where ``rms_norm`` is on autocast's float32 list (torch 2.12 on), the input dtype before."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(_as_torch_under_cuda_autocast(x, "aten::rms_norm"))[0]
