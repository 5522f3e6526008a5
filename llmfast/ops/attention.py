"""Softmax attention in flash-attn's layout: dense batches and variable-length (varlen) packed batches."""
from __future__ import annotations

from typing import Optional

import torch

from llmfast.backends import register, select
from llmfast.device import on_device
from llmfast.ops._checks import (
    FLOAT_DTYPES,
    check_cu_seqlens_shape,
    check_heads,
    check_max_seqlen,
    check_positive_float,
    check_same_dtype,
    check_shape,
    check_tensor,
    check_traced_max_seqlen,
    contiguous_index,
    cu_seqlens_lengths,
    values_readable,
)

MAX_HEAD_DIM = 256


def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    causal: bool = False,
    softmax_scale: float | None = None,
    cu_seqlens_q: torch.Tensor | None = None,
    cu_seqlens_k: torch.Tensor | None = None,
    max_seqlen_q: int | None = None,
    max_seqlen_k: int | None = None,
    backend: str = "auto",
) -> torch.Tensor:
    """Attention of ``q`` over ``k, v``, as flash-attn's ``flash_attn_func`` / ``flash_attn_varlen_func``.

    Dense: ``q (batch, seqlen_q, heads, head_dim)``, ``k, v (batch, seqlen_k, kv_heads, head_dim)``
    -> ``o (batch, seqlen_q, heads, head_dim)``.
    Varlen (``cu_seqlens_q`` and ``cu_seqlens_k`` given): ``q (total_q, heads, head_dim)``,
    ``k, v (total_k, kv_heads, head_dim)``, ``cu_seqlens_*`` int32 ``(batch+1,)`` offsets of each
    sequence's tokens -> ``o (total_q, heads, head_dim)``. ``max_seqlen_*`` are the longest lengths
    (computed when None; when given, at least the longest).

    ``q, k, v`` share one dtype (float16, bfloat16 or float32) and ``head_dim <= 256``. ``heads`` is a
    multiple of ``kv_heads`` (GQA/MQA): query head ``h`` reads kv head ``h // (heads // kv_heads)``.
    ``causal``: query ``i`` sees keys ``j <= i + seqlen_k - seqlen_q`` (aligned bottom-right, as
    flash-attn >= 2.1); a query row that sees no key outputs 0. ``softmax_scale`` defaults to
    ``head_dim ** -0.5``. Differentiable with respect to ``q, k, v``. Inside ``torch.autocast``, ``q, k, v``
    are cast to its dtype first, as for ``F.scaled_dot_product_attention``.
    """
    q, k, v = autocast_inputs(q, k, v)
    softmax_scale, max_seqlen_q, max_seqlen_k = _check_attention_inputs(
        q, k, v, causal, softmax_scale, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k
    )
    impl = select("attention", backend, q.device)
    return impl(
        q,
        k,
        v,
        causal=causal,
        softmax_scale=softmax_scale,
        cu_seqlens_q=contiguous_index(cu_seqlens_q),
        cu_seqlens_k=contiguous_index(cu_seqlens_k),
        max_seqlen_q=max_seqlen_q,
        max_seqlen_k=max_seqlen_k,
    )


def autocast_inputs(*tensors) -> tuple:
    """Inside autocast, the floating tensors (not float64) in its dtype: the cast autocast gives
    scaled_dot_product_attention, which is on its lower-precision list. A custom op gets no such cast (the
    kernels would run in float32), and under autocast HF Llama's rotary embedding leaves query and key float32
    beside a bf16 value. Anything else passes through, for the checks to name."""
    first = tensors[0]
    if not isinstance(first, torch.Tensor) or first.device.type not in ("cpu", "cuda") \
            or not torch.is_autocast_enabled(first.device.type):
        return tensors
    dtype = torch.get_autocast_dtype(first.device.type)
    return tuple(t.to(dtype) if isinstance(t, torch.Tensor) and t.is_floating_point() and t.dtype != torch.float64
                 else t for t in tensors)


def _check_attention_inputs(
    q, k, v, causal, softmax_scale, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k
) -> tuple[float, int | None, int | None]:
    """Validates everything; returns (softmax_scale, max_seqlen_q, max_seqlen_k) with defaults filled in."""
    if not isinstance(causal, bool):
        raise TypeError(f"causal: expected a bool, got {type(causal).__name__}")
    if (cu_seqlens_q is None) != (cu_seqlens_k is None):
        given, missing = ("cu_seqlens_q", "cu_seqlens_k") if cu_seqlens_k is None else ("cu_seqlens_k", "cu_seqlens_q")
        raise ValueError(f"{missing}: expected a tensor since {given} is given (varlen attention needs both)")
    varlen = cu_seqlens_q is not None
    if not varlen:
        for name, value in (("max_seqlen_q", max_seqlen_q), ("max_seqlen_k", max_seqlen_k)):
            if value is not None:
                raise ValueError(f"{name}: only used by varlen attention (with cu_seqlens_q/cu_seqlens_k), got {value}")

    check_tensor("q", q, dtypes=FLOAT_DTYPES)
    check_tensor("k", k, device=q.device)
    check_tensor("v", v, device=q.device)
    if varlen:
        q_layout, kv_layout = "(total_q, heads, head_dim)", "(total_k, kv_heads, head_dim)"
    else:
        q_layout, kv_layout = "(batch, seqlen_q, heads, head_dim)", "(batch, seqlen_k, kv_heads, head_dim)"
    rank = 3 if varlen else 4
    if q.dim() != rank:
        hint = "" if varlen else " (or 3 dims with cu_seqlens_q/cu_seqlens_k for varlen)"
        raise ValueError(f"q: expected {rank} dims {q_layout}{hint}, got shape {tuple(q.shape)}")
    head_dim = q.shape[-1]
    if not 0 < head_dim <= MAX_HEAD_DIM:
        raise ValueError(f"q: expected head_dim in [1, {MAX_HEAD_DIM}], got {head_dim}")
    batch = () if varlen else (q.shape[0],)
    check_shape("k", k, (*batch, None, None, head_dim), f"{kv_layout} matching q")
    check_shape("v", v, tuple(k.shape), f"{kv_layout}, the shape of k")
    check_same_dtype("k", k, "q", q)
    check_same_dtype("v", v, "q", q)
    check_heads("q", q.shape[-2], "k", k.shape[-2])

    if varlen:
        check_cu_seqlens_shape("cu_seqlens_q", cu_seqlens_q, q.device)
        check_cu_seqlens_shape("cu_seqlens_k", cu_seqlens_k, q.device)
        if values_readable():
            max_seqlen_q, max_seqlen_k = _check_varlen_values(q, k, cu_seqlens_q, cu_seqlens_k, max_seqlen_q,
                                                              max_seqlen_k)
        else:  # traced by torch.compile
            max_seqlen_q = check_traced_max_seqlen("max_seqlen_q", max_seqlen_q, "cu_seqlens_q")
            max_seqlen_k = check_traced_max_seqlen("max_seqlen_k", max_seqlen_k, "cu_seqlens_k")
        if cu_seqlens_k.shape != cu_seqlens_q.shape:
            raise ValueError(
                f"cu_seqlens_k: expected shape {tuple(cu_seqlens_q.shape)}, as cu_seqlens_q, "
                f"got {tuple(cu_seqlens_k.shape)}"
            )

    if softmax_scale is None:
        softmax_scale = head_dim**-0.5
    return check_positive_float("softmax_scale", softmax_scale), max_seqlen_q, max_seqlen_k


def _check_varlen_values(q, k, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k) -> tuple[int, int]:
    """The cu_seqlens values (host reads) of inputs whose shapes are valid; returns the max_seqlen_* to use."""
    lengths_q = cu_seqlens_lengths("cu_seqlens_q", cu_seqlens_q, q.shape[0])
    lengths_k = cu_seqlens_lengths("cu_seqlens_k", cu_seqlens_k, k.shape[0])
    return (check_max_seqlen("max_seqlen_q", max_seqlen_q, max(lengths_q, default=0)),
            check_max_seqlen("max_seqlen_k", max_seqlen_k, max(lengths_k, default=0)))


# triton ---------------------------------------------------------------------------------------
# Forward and backward are torch custom ops with fake implementations, so torch.compile(fullgraph=True)
# keeps each one as an opaque node; the forward returns the log-sum-exp that the backward needs.
# ``check_values``: the caller could not read cu_seqlens (torch.compile traced it), so the forward reads them
# when it runs, if it may then (not under CUDA-graph capture nor ``trusted_index_values``): offsets past the
# tokens would send the kernels outside q, k and v.


@torch.library.custom_op("llmfast::attention_fwd_triton", mutates_args=(), device_types=("cuda", "cpu"))
def _attention_fwd_triton(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
    cu_seqlens_q: Optional[torch.Tensor], cu_seqlens_k: Optional[torch.Tensor],
    max_seqlen_q: int, max_seqlen_k: int, causal: bool, softmax_scale: float, check_values: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    from llmfast_kernels.attention import attention_fwd

    if check_values and values_readable():
        _check_varlen_values(q, k, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k)
    with on_device(q.device):
        return attention_fwd(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, causal, softmax_scale)


@_attention_fwd_triton.register_fake
def _(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, causal, softmax_scale, check_values):
    rows = q.shape[0] if cu_seqlens_q is not None else q.shape[0] * q.shape[1]
    o = q.new_empty(q.shape)  # contiguous, as the kernel writes it
    return o, q.new_empty((q.shape[-2], rows), dtype=torch.float32)  # lse: (heads, rows)


@torch.library.custom_op("llmfast::attention_bwd_triton", mutates_args=(), device_types=("cuda", "cpu"))
def _attention_bwd_triton(
    do: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, o: torch.Tensor, lse: torch.Tensor,
    cu_seqlens_q: Optional[torch.Tensor], cu_seqlens_k: Optional[torch.Tensor],
    max_seqlen_q: int, max_seqlen_k: int, causal: bool, softmax_scale: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    from llmfast_kernels.attention_bwd import attention_bwd

    with on_device(q.device):
        return attention_bwd(
            do, q, k, v, o, lse, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, causal, softmax_scale
        )


@_attention_bwd_triton.register_fake
def _(do, q, k, v, o, lse, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, causal, softmax_scale):
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)


def _setup_attention_triton(ctx, inputs, output):
    q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, causal, softmax_scale, _ = inputs
    o, lse = output
    ctx.mark_non_differentiable(lse)
    ctx.save_for_backward(q, k, v, o, lse, cu_seqlens_q, cu_seqlens_k)
    ctx.max_seqlen_q, ctx.max_seqlen_k = max_seqlen_q, max_seqlen_k
    ctx.causal, ctx.softmax_scale = causal, softmax_scale


def _backward_attention_triton(ctx, do, _dlse):
    q, k, v, o, lse, cu_seqlens_q, cu_seqlens_k = ctx.saved_tensors
    dq, dk, dv = _attention_bwd_triton(
        do, q, k, v, o, lse, cu_seqlens_q, cu_seqlens_k,
        ctx.max_seqlen_q, ctx.max_seqlen_k, ctx.causal, ctx.softmax_scale,
    )
    return dq, dk, dv, None, None, None, None, None, None, None


_attention_fwd_triton.register_autograd(_backward_attention_triton, setup_context=_setup_attention_triton)


@register("attention", "triton")  # registered first: "auto" prefers it wherever it can run
def attention_triton(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    causal: bool,
    softmax_scale: float,
    cu_seqlens_q: torch.Tensor | None,
    cu_seqlens_k: torch.Tensor | None,
    max_seqlen_q: int | None,
    max_seqlen_k: int | None,
) -> torch.Tensor:
    """Flash attention in Triton (llmfast_kernels.attention, .attention_bwd); the reference's contract."""
    if cu_seqlens_q is None:  # dense: the kernels read the lengths from the shapes
        max_seqlen_q, max_seqlen_k = q.shape[1], k.shape[1]
    o, _ = _attention_fwd_triton(
        q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, causal, softmax_scale,
        cu_seqlens_q is not None and not values_readable(),
    )
    return o


@register("attention", "reference")
def attention_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    causal: bool,
    softmax_scale: float,
    cu_seqlens_q: torch.Tensor | None,
    cu_seqlens_k: torch.Tensor | None,
    max_seqlen_q: int | None,
    max_seqlen_k: int | None,
) -> torch.Tensor:
    """The oracle: plain PyTorch in float32, one sequence at a time for varlen.

    Its signature is the contract for every attention backend: inputs arrive validated, with
    ``softmax_scale`` resolved to a float and, for varlen, ``max_seqlen_*`` to ints.
    """
    if cu_seqlens_q is None:
        return dense_attention_reference(q, k, v, causal=causal, softmax_scale=softmax_scale)
    if not values_readable():  # traced: cu_seqlens cannot be read to slice the sequences
        return _varlen_attention_masked(q, k, v, causal, softmax_scale, cu_seqlens_q, cu_seqlens_k)
    offsets_q, offsets_k = cu_seqlens_q.tolist(), cu_seqlens_k.tolist()
    outs = []
    for start_q, end_q, start_k, end_k in zip(offsets_q, offsets_q[1:], offsets_k, offsets_k[1:]):
        o = dense_attention_reference(
            q[None, start_q:end_q], k[None, start_k:end_k], v[None, start_k:end_k],
            causal=causal, softmax_scale=softmax_scale,
        )  # (1, seqlen_q, heads, head_dim)
        outs.append(o[0])
    return torch.cat(outs) if outs else torch.zeros_like(q)


def _varlen_attention_masked(q, k, v, causal, softmax_scale, cu_seqlens_q, cu_seqlens_k) -> torch.Tensor:
    """Varlen attention that never reads ``cu_seqlens`` on the host (for torch.compile): every query against
    every key, masked to its own sequence's keys (bottom-right causal within it); O(Tq x Tk) memory."""
    cu_q, cu_k = cu_seqlens_q.long(), cu_seqlens_k.long()
    tokens_q = torch.arange(q.shape[0], device=q.device)
    tokens_k = torch.arange(k.shape[0], device=q.device)
    seq_q = torch.searchsorted(cu_q[1:], tokens_q, right=True)  # (Tq,) the sequence of each query
    seq_k = torch.searchsorted(cu_k[1:], tokens_k, right=True)  # (Tk,)
    visible = seq_q[:, None] == seq_k[None, :]
    if causal:  # key j of the query's sequence is seen when j <= i + len_k - len_q (positions within it)
        pos_q, pos_k = tokens_q - cu_q[seq_q], tokens_k - cu_k[seq_k]
        shift = (cu_k[seq_q + 1] - cu_k[seq_q]) - (cu_q[seq_q + 1] - cu_q[seq_q])  # (Tq,)
        visible = visible & (pos_k[None, :] <= (pos_q + shift)[:, None])
    return _masked_attention(q[None], k[None], v[None], visible, softmax_scale)[0]


def dense_attention_reference(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, causal: bool, softmax_scale: float
) -> torch.Tensor:
    """``q (batch, seqlen_q, heads, head_dim)``, ``k, v (batch, seqlen_k, kv_heads, head_dim)`` -> like ``q``."""
    seqlen_q, seqlen_k = q.shape[1], k.shape[1]
    visible = torch.ones(seqlen_q, seqlen_k, dtype=torch.bool, device=q.device)
    if causal:
        row = torch.arange(seqlen_q, device=q.device)[:, None]
        col = torch.arange(seqlen_k, device=q.device)[None, :]
        visible = col <= row + (seqlen_k - seqlen_q)  # bottom-right alignment
    return _masked_attention(q, k, v, visible, softmax_scale)


def _masked_attention(q, k, v, visible: torch.Tensor, softmax_scale: float) -> torch.Tensor:
    """Float32 attention of ``q (batch, seqlen_q, heads, head_dim)`` over the keys ``visible (seqlen_q,
    seqlen_k)`` lets each query see; ``k, v (batch, seqlen_k, kv_heads, head_dim)``. Returns like ``q``."""
    heads, kv_heads = q.shape[2], k.shape[2]
    # query head h reads kv head h // (heads // kv_heads), as flash-attn
    k = k.float().repeat_interleave(heads // kv_heads, dim=2)  # (batch, seqlen_k, heads, head_dim)
    v = v.float().repeat_interleave(heads // kv_heads, dim=2)  # (batch, seqlen_k, heads, head_dim)
    autocast_off = torch.autocast(q.device.type, enabled=False)  # float32 math, also inside a caller's autocast
    with autocast_off:
        scores = torch.einsum("bqhd,bkhd->bhqk", q.float(), k) * softmax_scale  # (batch, heads, seqlen_q, seqlen_k)
    # A finite fill keeps a row that sees no key free of NaN (in values and gradients); multiplying by
    # `visible` then gives it zero weights, so it outputs 0 as in flash-attn.
    scores = scores.masked_fill(~visible, torch.finfo(torch.float32).min)
    probs = torch.softmax(scores, dim=-1) * visible
    with autocast_off:
        o = torch.einsum("bhqk,bkhd->bqhd", probs, v)  # (batch, seqlen_q, heads, head_dim)
    return o.to(q.dtype)
