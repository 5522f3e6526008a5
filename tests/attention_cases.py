"""Inputs and checks shared by the attention tests (test_attention*.py): the dtype and head-dim grids, random
tensors, cu_seqlens, a per-sequence varlen reference, and the 2x rule on the output and each gradient."""
import torch

from helpers import DEVICE, assert_close_2x, attention_ref, poison_allocations

DTYPES = [torch.float16, torch.bfloat16, torch.float32]
# (head_dim, (heads, kv_heads)): every head dim the kernels are built for once (80, 96, 192 are padded
# to a power of two inside them), GQA ratios 1, 2, 4 among them (8 in test_attention.py's HEADS); few heads
# keep the interpreter fast
SHAPES = [(32, (2, 2)), (64, (4, 2)), (80, (4, 1)), (96, (2, 2)), (128, (4, 2)), (192, (2, 1)), (256, (2, 2))]
# float32 results differ from float64 by accumulation order, not by a rounding the peer also makes
SLACK_ULPS = {torch.float16: 1.0, torch.bfloat16: 1.0, torch.float32: 16.0}


def _randn(*shape, dtype=torch.float32, grad=False):
    return torch.randn(*shape, dtype=dtype, device=DEVICE).requires_grad_(grad)


def _varlen_ref(q, k, v, lengths_q, lengths_k, *, causal, upcast):
    """Per-sequence dense attention_ref over the packed tokens, concatenated."""
    outs = []
    for q_i, k_i, v_i in zip(q.split(lengths_q), k.split(lengths_k), v.split(lengths_k)):
        outs.append(attention_ref(q_i[None], k_i[None], v_i[None], causal=causal, upcast=upcast)[0])
    return torch.cat(outs)


def _cu_seqlens(lengths):
    return torch.tensor([0, *lengths], device=DEVICE).cumsum(0).to(torch.int32)


def _forward_backward(fn, q, k, v, dout):
    """``(o, dq, dk, dv)`` of ``o = fn(q, k, v)`` and upstream gradient ``dout``, on fresh leaves (views
    keep their strides)."""
    q, k, v = (t.detach().requires_grad_() for t in (q, k, v))
    out = fn(q, k, v)
    return (out, *torch.autograd.grad(out, (q, k, v), dout.to(out.dtype)))


def _check_grads(fn, fn_ref, q, k, v, dout):
    """The 2x rule on the output and each gradient: ``fn`` vs float64 ``fn_ref``, peer ``fn_ref`` in dtype.
    ``fn``'s outputs and gradients start as NaN, so an element it forgets to write fails."""
    with poison_allocations():
        results = _forward_backward(fn, q, k, v, dout)
    refs = _forward_backward(fn_ref, q.double(), k.double(), v.double(), dout)
    peers = _forward_backward(lambda *qkv: fn_ref(*qkv, upcast=False), q, k, v, dout)
    for result, peer, ref in zip(results, peers, refs):
        assert_close_2x(result, peer, ref, slack_ulps=SLACK_ULPS[q.dtype])


def _varlen_args(**changes):
    args = dict(
        q=_randn(6, 4, 32), k=_randn(9, 2, 32), v=_randn(9, 2, 32),
        cu_seqlens_q=_cu_seqlens([2, 4]), cu_seqlens_k=_cu_seqlens([4, 5]),
    )
    return {**args, **changes}
