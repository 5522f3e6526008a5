"""Matrix multiply with a weight-only quantized weight (int8 or int4, see llmfast.quant)."""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from llmfast import _ext
from llmfast.backends import register, select
from llmfast.device import on_device
from llmfast.ops._checks import FLOAT_DTYPES, check_shape, check_tensor
from llmfast.quant.weight import QuantizedWeight


def quant_matmul(
    x: torch.Tensor, w: QuantizedWeight, bias: torch.Tensor | None = None, *, backend: str = "auto"
) -> torch.Tensor:
    """``y = x @ w.dequantize().T (+ bias)``, as ``torch.nn.functional.linear``.

    ``x (..., K)`` float16/bfloat16/float32; ``w`` a ``QuantizedWeight`` of shape ``(N, K)``; ``bias (N,)`` or
    None -> ``y (..., N)`` in ``x.dtype``. When ``w`` or ``bias`` is in another dtype than ``x``, its scales
    (and zero points) and the bias are used in ``x.dtype`` (the codes are the same), as autocast would do.
    """
    _check_quant_matmul_inputs(x, w, bias)
    w, bias = _in_dtype(w, bias, x.dtype)
    impl = select("quant_matmul", backend, x.device)
    n, k = w.shape
    y = impl(x.reshape(-1, k), w, bias)  # (M, N): backends see a 2-D x
    return y.reshape(*x.shape[:-1], n)


def _check_quant_matmul_inputs(x, w, bias) -> None:
    if not isinstance(w, QuantizedWeight):
        raise TypeError(f"w: expected a llmfast.quant.QuantizedWeight (from quantize), got {type(w).__name__}")
    check_tensor("x", x, dtypes=FLOAT_DTYPES, device=w.qweight.device)
    n, k = w.shape
    if x.dim() == 0 or x.shape[-1] != k:
        raise ValueError(f"x: expected shape (..., {k}), K matching w of shape {w.shape}, got {tuple(x.shape)}")
    if bias is not None:
        check_tensor("bias", bias, dtypes=FLOAT_DTYPES, device=x.device)
        check_shape("bias", bias, (n,), "(N,), the out-features of w")


def _in_dtype(w: QuantizedWeight, bias: torch.Tensor | None, dtype: torch.dtype):
    if w.dtype != dtype:  # a new weight sharing the codes; the caller's is left as it is
        w = QuantizedWeight(w.qweight, w.scales.to(dtype), None if w.zeros is None else w.zeros.to(dtype))
    return w, None if bias is None else bias.to(dtype)


def quant_matmul_reference(x: torch.Tensor, w: QuantizedWeight, bias: torch.Tensor | None) -> torch.Tensor:
    """The oracle: ``x (M, K)`` -> ``(M, N)``, float32 math over the dequantized weight.

    Its signature is the contract for every quant_matmul backend: ``x`` arrives validated and 2-D.
    """
    with torch.autocast(x.device.type, enabled=False):  # float32 math, also inside a caller's autocast
        y = x.float() @ w.dequantize().float().T
    if bias is not None:
        y = y + bias.float()
    return y.to(x.dtype)


# Triton (kernels/quant_matmul.py): a torch custom op with a fake, so torch.compile(fullgraph=True) treats it
# as one opaque node; the path is picked inside it, from M.

# Decode batches: the split-K kernel streams the weight once for all rows (BLOCK_M = 16).
SPLITK_MAX_M = 16
# From this many rows on (CUDA), dequantize to x.dtype once and let cuBLAS run the matmul: it is then
# compute-bound, so the weight's extra write and read cost little. A guess, not yet measured on the H100.
DEQUANTIZE_MIN_M = 1024


@torch.library.custom_op("llmfast::quant_matmul_triton", mutates_args=(), device_types=("cuda", "cpu"))
def _quant_matmul_triton_op(
    x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, zeros: Optional[torch.Tensor],
    bias: Optional[torch.Tensor],
) -> torch.Tensor:
    from llmfast_kernels import quant_matmul as kernels

    m = x.shape[0]
    # autocast is still on inside a custom op in eager mode: F.linear would return its dtype, not x's
    with on_device(x.device), torch.autocast(x.device.type, enabled=False):
        if m <= SPLITK_MAX_M:
            return kernels.quant_matmul_splitk(x, qweight, scales, zeros, bias)
        if x.is_cuda and m >= DEQUANTIZE_MIN_M:
            return F.linear(x, kernels.dequantize(qweight, scales, zeros, x.dtype), bias)
        return kernels.quant_matmul_tiled(x, qweight, scales, zeros, bias)


@_quant_matmul_triton_op.register_fake
def _(x, qweight, scales, zeros, bias):
    return x.new_empty(x.shape[0], qweight.shape[0])


def _quant_matmul_triton(x: torch.Tensor, w: QuantizedWeight, bias: torch.Tensor | None) -> torch.Tensor:
    """``x (M, K)`` -> ``(M, N)`` through the Triton kernels, which take contiguous tensors."""
    zeros = None if w.zeros is None else w.zeros.contiguous()
    bias = None if bias is None else bias.contiguous()
    return _quant_matmul_triton_op(x.contiguous(), w.qweight.contiguous(), w.scales.contiguous(), zeros, bias)


# C++ CPU kernel (csrc/cpu/quant_matmul.cpp): a torch custom op with a fake, so torch.compile(fullgraph=True)
# treats it as one opaque node.
if _ext.has_op("quant_matmul_cpu"):
    @torch.library.register_fake("llmfast::quant_matmul_cpu")
    def _(x, qweight, scales, zeros, bias, isa="auto"):
        return x.new_empty(x.shape[0], qweight.shape[0])


def _quant_matmul_cpu(x: torch.Tensor, w: QuantizedWeight, bias: torch.Tensor | None) -> torch.Tensor:
    """``x (M, K)`` -> ``(M, N)`` through the C++ kernel, which takes contiguous tensors."""
    zeros = None if w.zeros is None else w.zeros.contiguous()
    bias = None if bias is None else bias.contiguous()
    return torch.ops.llmfast.quant_matmul_cpu(
        x.contiguous(), w.qweight.contiguous(), w.scales.contiguous(), zeros, bias
    )


# Gradients (both custom ops): to x and bias, never to the integer codes or their scales, as for a frozen
# nn.Linear. Without them a QuantLinear inside a model being trained would silently cut the gradient.
def _save_weight(ctx, inputs, output) -> None:
    x, qweight, scales, zeros, bias = inputs[:5]
    ctx.save_for_backward(qweight, scales, zeros)
    ctx.has_bias = bias is not None


def _quant_matmul_backward(ctx, grad_y):
    """``grad_y (M, N)`` -> ``grad_x = grad_y @ W (M, K)`` and ``grad_bias = grad_y.sum(0)``; None for the rest."""
    qweight, scales, zeros = ctx.saved_tensors
    grad_x = grad_bias = None
    if ctx.needs_input_grad[0]:
        weight = QuantizedWeight(qweight, scales, zeros).dequantize()  # (N, K)
        grad_x = grad_y @ weight.to(grad_y.dtype)
    if ctx.has_bias and ctx.needs_input_grad[4]:
        grad_bias = grad_y.sum(0)
    extra = len(ctx.needs_input_grad) - 5  # the C++ op's isa argument
    return (grad_x, None, None, None, grad_bias) + (None,) * extra


_quant_matmul_triton_op.register_autograd(_quant_matmul_backward, setup_context=_save_weight)
if _ext.has_op("quant_matmul_cpu"):
    torch.library.register_autograd("llmfast::quant_matmul_cpu", _quant_matmul_backward, setup_context=_save_weight)


# auto prefers them in this order
register("quant_matmul", "triton")(_quant_matmul_triton)
register("quant_matmul", "cpu", needs="quant_matmul_cpu")(_quant_matmul_cpu)
register("quant_matmul", "reference")(quant_matmul_reference)
