"""Fused residual-add + LayerNorm / RMSNorm: validation, dispatch, the reference, and the custom ops.

Every backend computes the same function: ``h = x + residual`` in float32, rounded to ``x.dtype``
(that rounded ``h`` is returned and normalised, as a transformer block would see it), statistics
in float32, ``y`` in ``x.dtype``.
"""
from __future__ import annotations

import math
from typing import Optional

import torch

from llmfast import _ext
from llmfast.backends import register, select
from llmfast.device import on_device
from llmfast.ops._checks import FLOAT_DTYPES, check_shape, check_tensor

Tensor = torch.Tensor


def add_layer_norm(
    x: Tensor,
    residual: Tensor | None = None,
    weight: Tensor | None = None,
    bias: Tensor | None = None,
    eps: float = 1e-5,
    *,
    backend: str = "auto",
) -> tuple[Tensor, Tensor]:
    """``h = x + residual``; ``y = layer_norm(h) * weight + bias`` over the last dim.

    x, residual: (..., hidden) float16/bfloat16/float32, same shape; residual may be None (then ``h`` is
    ``x``), or in another dtype (e.g. a float32 residual stream: it is rounded to ``x.dtype`` first).
    weight, bias: (hidden,) or None. Returns ``(y, h)``, both in ``x.dtype``. Differentiable in x, residual,
    weight and bias.
    """
    residual = _check_norm_inputs(x, residual, weight, bias, eps)
    impl = select("add_layer_norm", backend, x.device)
    return impl(x, residual, weight, bias, float(eps), False)


def add_rms_norm(
    x: Tensor,
    residual: Tensor | None = None,
    weight: Tensor | None = None,
    eps: float = 1e-6,
    *,
    backend: str = "auto",
) -> tuple[Tensor, Tensor]:
    """``h = x + residual``; ``y = h / sqrt(mean(h^2) + eps) * weight`` over the last dim.

    Shapes and dtypes as in :func:`add_layer_norm`. Returns ``(y, h)``. Differentiable.
    """
    residual = _check_norm_inputs(x, residual, weight, None, eps)
    impl = select("add_rms_norm", backend, x.device)
    return impl(x, residual, weight, None, float(eps), True)


def _check_norm_inputs(x, residual, weight, bias, eps) -> Tensor | None:
    """Raises for bad inputs; returns ``residual`` in ``x.dtype``."""
    check_tensor("x", x, dtypes=FLOAT_DTYPES)
    if x.dim() == 0:
        raise ValueError("x: expected at least 1 dim (..., hidden), got a scalar")
    hidden = x.shape[-1]
    if hidden == 0:
        raise ValueError(f"x: expected a hidden size (last dim) >= 1, got shape {tuple(x.shape)}")
    if residual is not None:
        check_tensor("residual", residual, dtypes=FLOAT_DTYPES, device=x.device)
        check_shape("residual", residual, tuple(x.shape), "(the shape of x)")
    for name, t in (("weight", weight), ("bias", bias)):
        if t is not None:
            check_tensor(name, t, dtypes=FLOAT_DTYPES, device=x.device)
            check_shape(name, t, (hidden,), "(hidden,)")
    if isinstance(eps, bool) or not isinstance(eps, (int, float)):
        raise TypeError(f"eps: expected a float, got {type(eps).__name__}")
    if not 0 <= eps < math.inf:  # comparisons, not math.isfinite: torch.compile(dynamic=True) passes a SymFloat
        raise ValueError(f"eps: expected a non-negative finite number, got {eps}")
    return None if residual is None else residual.to(x.dtype)


# ----------------------------------------------------------------------------------------------
# reference: plain PyTorch, float32 math, differentiable by autograd


def add_norm_reference(x, residual, weight, bias, eps: float, is_rms: bool):
    h = x if residual is None else (x.float() + residual.float()).to(x.dtype)
    hf = h.float()
    if is_rms:
        y = hf * torch.rsqrt(hf.pow(2).mean(-1, keepdim=True) + eps)
    else:
        mean = hf.mean(-1, keepdim=True)
        var = (hf - mean).pow(2).mean(-1, keepdim=True)
        y = (hf - mean) * torch.rsqrt(var + eps)
    if weight is not None:
        y = y * weight.float()
    if bias is not None:
        y = y + bias.float()
    return y.to(x.dtype), h


def _norm_backward_torch(dy, dh, h, weight, want_dweight: bool, want_dbias: bool, eps: float, is_rms: bool):
    """Closed-form backward of the normalisation (float32), for the ops whose kernels are forward-only.

    h: (M, N) the normalised input; dy: (M, N); dh: (M, N) or None. Returns (dx, dweight, dbias) in
    float32; dweight/dbias are None when not wanted (no weight/bias, or one that needs no gradient).
    """
    hf, g_out = h.float(), dy.float()
    if is_rms:
        rstd = torch.rsqrt(hf.pow(2).mean(-1, keepdim=True) + eps)
        xhat = hf * rstd
    else:
        mean = hf.mean(-1, keepdim=True)
        rstd = torch.rsqrt((hf - mean).pow(2).mean(-1, keepdim=True) + eps)
        xhat = (hf - mean) * rstd
    g = g_out if weight is None else g_out * weight.float()
    dx = g - xhat * (g * xhat).mean(-1, keepdim=True)
    if not is_rms:
        dx = dx - g.mean(-1, keepdim=True)
    dx = dx * rstd
    if dh is not None:
        dx = dx + dh.float()
    dweight = (g_out * xhat).sum(0) if want_dweight else None
    dbias = g_out.sum(0) if want_dbias else None
    return dx, dweight, dbias


# ----------------------------------------------------------------------------------------------
# compiled backends: each runs on (rows, hidden) views and is a torch custom op with a fake
# implementation, so torch.compile(fullgraph=True) treats it as one opaque node.


def _flat_call(op, x, residual, weight, bias, eps, is_rms, cast_params):
    """Runs ``op`` on 2-D contiguous views; returns (y, h) shaped like x (h is x without a residual)."""
    hidden = x.shape[-1]
    x2 = x.reshape(-1, hidden).contiguous()
    r2 = None if residual is None else residual.reshape(-1, hidden).contiguous()
    if cast_params:  # the C++ kernels take float32 parameters
        weight = None if weight is None else weight.float()
        bias = None if bias is None else bias.float()
    weight = None if weight is None else weight.contiguous()
    bias = None if bias is None else bias.contiguous()
    out = op(x2, r2, weight, bias, eps, is_rms)
    y = out[0].view(x.shape)
    h = x if residual is None else out[1].view(x.shape)
    return y, h


def _fake_outputs(x, residual, is_rms, with_stats):
    rows = x.shape[0]
    outs = [torch.empty_like(x), torch.empty_like(x) if residual is not None else x.new_empty(0)]
    if with_stats:
        outs.append(x.new_empty(0 if is_rms else rows, dtype=torch.float32))
        outs.append(x.new_empty(rows, dtype=torch.float32))
    return tuple(outs)


def _grads_to_inputs(ctx, dx, dweight, dbias):
    """Input gradients for (x, residual, weight, bias, eps, is_rms) from float32 parts."""
    dres = dx.to(ctx.x_dtype) if ctx.has_residual else None
    dw = None if dweight is None or dweight.numel() == 0 else dweight.to(ctx.w_dtype)
    db = None if dbias is None or dbias.numel() == 0 else dbias.to(ctx.b_dtype)
    return dx.to(ctx.x_dtype), dres, dw, db, None, None


def _save_common(ctx, x, residual, weight, bias, eps, is_rms):
    ctx.x_dtype = x.dtype
    ctx.has_residual = residual is not None
    ctx.w_dtype = None if weight is None else weight.dtype
    ctx.b_dtype = None if bias is None else bias.dtype
    ctx.eps, ctx.is_rms = eps, is_rms


def _wanted_param_grads(ctx) -> tuple[bool, bool]:
    """Whether the weight's and the bias's gradients are wanted: a frozen one (or none) skips its sums."""
    return (ctx.w_dtype is not None and ctx.needs_input_grad[2],
            ctx.b_dtype is not None and ctx.needs_input_grad[3])


def _live_grad(grad, has_residual):
    """The gradient flowing into the h output, or None when h is not ours (no residual) or unused."""
    if not has_residual or grad is None or grad.numel() == 0:
        return None
    return grad.contiguous()


# triton -------------------------------------------------------------------------------------


@torch.library.custom_op("llmfast::add_norm_fwd_triton", mutates_args=(), device_types=("cuda", "cpu"))
def _add_norm_fwd_triton(
    x: Tensor, residual: Optional[Tensor], weight: Optional[Tensor], bias: Optional[Tensor],
    eps: float, is_rms: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    from llmfast_kernels.norm import add_norm_fwd

    with on_device(x.device):
        return add_norm_fwd(x, residual, weight, bias, eps, is_rms)


@_add_norm_fwd_triton.register_fake
def _(x, residual, weight, bias, eps, is_rms):
    return _fake_outputs(x, residual, is_rms, with_stats=True)


@torch.library.custom_op("llmfast::add_norm_bwd_triton", mutates_args=(), device_types=("cuda", "cpu"))
def _add_norm_bwd_triton(
    dy: Tensor, dh: Optional[Tensor], h: Tensor, weight: Optional[Tensor], want_dweight: bool, want_dbias: bool,
    mean: Tensor, rstd: Tensor, is_rms: bool,
) -> tuple[Tensor, Tensor, Tensor]:
    from llmfast_kernels.norm import add_norm_bwd

    with on_device(h.device):
        return add_norm_bwd(dy, dh, h, weight, want_dweight, want_dbias, mean, rstd, is_rms)


@_add_norm_bwd_triton.register_fake
def _(dy, dh, h, weight, want_dweight, want_dbias, mean, rstd, is_rms):
    hidden = h.shape[1]
    dweight = h.new_empty(hidden if want_dweight else 0, dtype=torch.float32)
    dbias = h.new_empty(hidden if want_dbias else 0, dtype=torch.float32)
    return torch.empty_like(h), dweight, dbias


def _setup_triton(ctx, inputs, output):
    x, residual, weight, bias, eps, is_rms = inputs
    _, h, mean, rstd = output
    ctx.mark_non_differentiable(mean, rstd)
    ctx.save_for_backward(h if residual is not None else x, weight, mean, rstd)
    _save_common(ctx, x, residual, weight, bias, eps, is_rms)


def _backward_triton(ctx, dy, dh, _dmean, _drstd):
    h, weight, mean, rstd = ctx.saved_tensors
    dh = _live_grad(dh, ctx.has_residual)
    dx, dweight, dbias = _add_norm_bwd_triton(dy.contiguous(), dh, h, weight, *_wanted_param_grads(ctx),
                                              mean, rstd, ctx.is_rms)
    return _grads_to_inputs(ctx, dx, dweight, dbias)


_add_norm_fwd_triton.register_autograd(_backward_triton, setup_context=_setup_triton)


def _add_norm_triton(x, residual, weight, bias, eps, is_rms):
    return _flat_call(_add_norm_fwd_triton, x, residual, weight, bias, eps, is_rms, cast_params=False)


# C++ (cpu, cuda): forward kernels; the backward is the closed form above in PyTorch ------------


def _setup_cxx(ctx, inputs, output):
    x, residual, weight, bias, eps, is_rms = inputs
    ctx.save_for_backward(output[1] if residual is not None else x, weight)
    _save_common(ctx, x, residual, weight, bias, eps, is_rms)


def _backward_cxx(ctx, dy, dh):
    h, weight = ctx.saved_tensors
    dh = _live_grad(dh, ctx.has_residual)
    dx, dweight, dbias = _norm_backward_torch(dy, dh, h, weight, *_wanted_param_grads(ctx), ctx.eps, ctx.is_rms)
    return _grads_to_inputs(ctx, dx, dweight, dbias)


def _register_cxx(name: str):
    """Fake and autograd for ``torch.ops.llmfast.<name>`` when its extension is built."""
    if not _ext.has_op(name):
        return
    qualname = f"llmfast::{name}"
    torch.library.register_fake(qualname)(lambda x, residual, weight, bias, eps, is_rms: _fake_outputs(x, residual, is_rms, False))
    torch.library.register_autograd(qualname, _backward_cxx, setup_context=_setup_cxx)


_register_cxx("add_norm_cpu")
_register_cxx("add_norm_cuda")


def _add_norm_cpu(x, residual, weight, bias, eps, is_rms):
    return _flat_call(torch.ops.llmfast.add_norm_cpu, x, residual, weight, bias, eps, is_rms, cast_params=True)


def _add_norm_cuda(x, residual, weight, bias, eps, is_rms):
    return _flat_call(torch.ops.llmfast.add_norm_cuda, x, residual, weight, bias, eps, is_rms, cast_params=True)


# auto prefers them in this order
for _op in ("add_layer_norm", "add_rms_norm"):
    register(_op, "triton")(_add_norm_triton)
    register(_op, "cuda", needs="add_norm_cuda")(_add_norm_cuda)
    register(_op, "cpu", needs="add_norm_cpu")(_add_norm_cpu)
    register(_op, "reference")(add_norm_reference)
