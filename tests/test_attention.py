"""attention (dense and varlen): every backend against float64 SDPA with the 2x-error rule."""
import pytest
import torch

from llmfast.ops.attention import attention
from helpers import BACKENDS, DEVICE, assert_close_2x, attention_ref, require_backend

DTYPES = [torch.float16, torch.bfloat16, torch.float32]
# (seqlen_q, seqlen_k); seqlen_q > seqlen_k leaves causal rows that see no key
SEQLENS = [(1, 1), (17, 17), (37, 53), (53, 37), (1, 53)]
# (head_dim, (heads, kv_heads)): every head dim once, GQA ratios 1, 2, 4, 8 among them
SHAPES = [(32, (4, 4)), (40, (8, 1)), (64, (4, 2)), (128, (8, 2)), (256, (8, 8)), (256, (8, 1))]
HEADS = [(4, 4), (4, 2), (8, 2), (8, 1)]
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
    """``(o, dq, dk, dv)`` of ``o = fn(q, k, v)`` and upstream gradient ``dout``, on fresh leaves."""
    q, k, v = (t.detach().requires_grad_() for t in (q, k, v))
    out = fn(q, k, v)
    return (out, *torch.autograd.grad(out, (q, k, v), dout.to(out.dtype)))


def _check_grads(fn, fn_ref, q, k, v, dout):
    """The 2x rule on the output and each gradient: ``fn`` vs float64 ``fn_ref``, peer ``fn_ref`` in dtype."""
    results = _forward_backward(fn, q, k, v, dout)
    refs = _forward_backward(fn_ref, q.double(), k.double(), v.double(), dout)
    peers = _forward_backward(lambda *qkv: fn_ref(*qkv, upcast=False), q, k, v, dout)
    for result, peer, ref in zip(results, peers, refs):
        assert_close_2x(result, peer, ref, slack_ulps=SLACK_ULPS[q.dtype])


@pytest.mark.parametrize("seqlens", SEQLENS)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("backend", BACKENDS)
def test_attention_dense(backend, dtype, causal, shape, seqlens):
    require_backend(backend, "attention")
    (head_dim, (nheads, nheads_kv)), (seqlen_q, seqlen_k) = shape, seqlens
    q = _randn(2, seqlen_q, nheads, head_dim, dtype=dtype)
    k = _randn(2, seqlen_k, nheads_kv, head_dim, dtype=dtype)
    v = _randn(2, seqlen_k, nheads_kv, head_dim, dtype=dtype)
    out = attention(q, k, v, causal=causal, backend=backend)
    assert out.dtype == dtype
    ref = attention_ref(q, k, v, causal=causal)
    peer = attention_ref(q, k, v, causal=causal, upcast=False)
    assert_close_2x(out, peer, ref, slack_ulps=SLACK_ULPS[dtype])


@pytest.mark.parametrize("heads", HEADS)
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("backend", BACKENDS)
def test_attention_gqa(backend, dtype, causal, heads):
    require_backend(backend, "attention")
    nheads, nheads_kv = heads
    q = _randn(2, 37, nheads, 64, dtype=dtype)
    k = _randn(2, 113, nheads_kv, 64, dtype=dtype)
    v = _randn(2, 113, nheads_kv, 64, dtype=dtype)
    out = attention(q, k, v, causal=causal, backend=backend)
    ref = attention_ref(q, k, v, causal=causal)
    peer = attention_ref(q, k, v, causal=causal, upcast=False)
    assert_close_2x(out, peer, ref, slack_ulps=SLACK_ULPS[dtype])


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("backend", BACKENDS)
def test_attention_dense_grad(backend, dtype, causal):
    require_backend(backend, "attention")
    q, k, v = _randn(2, 37, 8, 64, dtype=dtype), _randn(2, 53, 2, 64, dtype=dtype), _randn(2, 53, 2, 64, dtype=dtype)
    _check_grads(
        lambda q, k, v: attention(q, k, v, causal=causal, softmax_scale=0.3, backend=backend),
        lambda q, k, v, upcast=True: attention_ref(q, k, v, causal=causal, softmax_scale=0.3, upcast=upcast),
        q, k, v, _randn(2, 37, 8, 64),
    )


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
@pytest.mark.parametrize("backend", BACKENDS)
def test_attention_long(backend, dtype, causal):
    require_backend(backend, "attention")
    q = _randn(1, 1000, 2, 64, dtype=dtype)
    k, v = _randn(1, 1000, 1, 64, dtype=dtype), _randn(1, 1000, 1, 64, dtype=dtype)
    _check_grads(
        lambda q, k, v: attention(q, k, v, causal=causal, backend=backend),
        lambda q, k, v, upcast=True: attention_ref(q, k, v, causal=causal, upcast=upcast),
        q, k, v, _randn(1, 1000, 2, 64),
    )


@pytest.mark.parametrize("backend", BACKENDS)
def test_attention_rows_without_keys_are_zero(backend):
    require_backend(backend, "attention")
    q, k, v = _randn(1, 5, 2, 32), _randn(1, 2, 2, 32), _randn(1, 2, 2, 32)
    out = attention(q, k, v, causal=True, backend=backend)
    # bottom-right: query i sees keys j <= i - 3, so queries 0..2 see none
    assert torch.equal(out[:, :3], torch.zeros_like(out[:, :3]))
    assert_close_2x(out, attention_ref(q, k, v, causal=True, upcast=False), attention_ref(q, k, v, causal=True))


# per-sequence (query, key) lengths, with sequences of length 1 and queries that outnumber keys
VARLEN = [
    ([1], [1]),
    ([1, 1, 1], [1, 1, 1]),
    ([17, 1, 37, 53], [17, 1, 37, 53]),
    ([5, 1, 30, 1], [20, 53, 7, 1]),
]


@pytest.mark.parametrize("lengths", VARLEN)
@pytest.mark.parametrize("shape", [(32, (4, 4)), (64, (4, 2)), (128, (8, 2)), (256, (8, 1))])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("backend", BACKENDS)
def test_attention_varlen(backend, dtype, causal, shape, lengths):
    require_backend(backend, "attention")
    (lengths_q, lengths_k), (head_dim, (nheads, nheads_kv)) = lengths, shape
    q = _randn(sum(lengths_q), nheads, head_dim, dtype=dtype)
    k = _randn(sum(lengths_k), nheads_kv, head_dim, dtype=dtype)
    v = _randn(sum(lengths_k), nheads_kv, head_dim, dtype=dtype)
    out = attention(
        q, k, v, causal=causal, cu_seqlens_q=_cu_seqlens(lengths_q), cu_seqlens_k=_cu_seqlens(lengths_k),
        max_seqlen_q=max(lengths_q), max_seqlen_k=max(lengths_k) + 3, backend=backend,
    )
    ref = _varlen_ref(q, k, v, lengths_q, lengths_k, causal=causal, upcast=True)
    peer = _varlen_ref(q, k, v, lengths_q, lengths_k, causal=causal, upcast=False)
    assert_close_2x(out, peer, ref, slack_ulps=SLACK_ULPS[dtype])


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("backend", BACKENDS)
def test_attention_varlen_grad(backend, dtype, causal):
    require_backend(backend, "attention")
    lengths_q, lengths_k = [5, 1, 30, 17], [20, 53, 7, 17]
    q, k, v = _randn(53, 4, 64, dtype=dtype), _randn(97, 2, 64, dtype=dtype), _randn(97, 2, 64, dtype=dtype)
    cu_seqlens_q, cu_seqlens_k = _cu_seqlens(lengths_q), _cu_seqlens(lengths_k)
    _check_grads(
        lambda q, k, v: attention(
            q, k, v, causal=causal, cu_seqlens_q=cu_seqlens_q, cu_seqlens_k=cu_seqlens_k, backend=backend
        ),
        lambda q, k, v, upcast=True: _varlen_ref(q, k, v, lengths_q, lengths_k, causal=causal, upcast=upcast),
        q, k, v, _randn(53, 4, 64),
    )


def _dense_args(**changes):
    args = dict(q=_randn(2, 5, 4, 32), k=_randn(2, 7, 2, 32), v=_randn(2, 7, 2, 32))
    return {**args, **changes}


def _varlen_args(**changes):
    args = dict(
        q=_randn(6, 4, 32), k=_randn(9, 2, 32), v=_randn(9, 2, 32),
        cu_seqlens_q=_cu_seqlens([2, 4]), cu_seqlens_k=_cu_seqlens([4, 5]),
    )
    return {**args, **changes}


BAD_INPUTS = [
    (lambda: _dense_args(q=_randn(5, 4, 32)), ValueError, "q: expected 4 dims"),
    (lambda: _dense_args(q=_randn(2, 5, 4, 32).long()), TypeError, "q: expected dtype"),
    (lambda: _dense_args(k="k"), TypeError, "k: expected a torch.Tensor"),
    (lambda: _dense_args(k=_randn(2, 7, 2, 32, dtype=torch.float16)), TypeError, "k: expected dtype"),
    (lambda: _dense_args(k=_randn(2, 7, 2, 32).to("meta")), ValueError, "k: expected a tensor on"),
    (lambda: _dense_args(k=_randn(2, 7, 2, 16), v=_randn(2, 7, 2, 16)), ValueError, "k: expected shape"),
    (lambda: _dense_args(k=_randn(3, 7, 2, 32), v=_randn(3, 7, 2, 32)), ValueError, "k: expected shape"),
    (lambda: _dense_args(v=_randn(2, 6, 2, 32)), ValueError, "v: expected shape"),
    (lambda: _dense_args(k=_randn(2, 7, 3, 32), v=_randn(2, 7, 3, 32)), ValueError, "q: .*divisible"),
    (lambda: _dense_args(q=_randn(2, 5, 4, 512), k=_randn(2, 7, 2, 512), v=_randn(2, 7, 2, 512)),
     ValueError, "q: expected head_dim"),
    (lambda: _dense_args(softmax_scale=0.0), ValueError, "softmax_scale"),
    (lambda: _dense_args(softmax_scale=-1.0), ValueError, "softmax_scale"),
    (lambda: _dense_args(softmax_scale="0.1"), TypeError, "softmax_scale"),
    (lambda: _dense_args(causal=1), TypeError, "causal"),
    (lambda: _dense_args(max_seqlen_q=5), ValueError, "max_seqlen_q"),
    (lambda: _varlen_args(q=_randn(1, 6, 4, 32)), ValueError, "q: expected 3 dims"),
    (lambda: _varlen_args(cu_seqlens_k=None), ValueError, "cu_seqlens_k"),
    (lambda: _varlen_args(cu_seqlens_q=None), ValueError, "cu_seqlens_q"),
    (lambda: _varlen_args(cu_seqlens_q=_cu_seqlens([2, 4]).long()), TypeError, "cu_seqlens_q: expected dtype"),
    (lambda: _varlen_args(cu_seqlens_q=_cu_seqlens([2, 4])[None]), ValueError, "cu_seqlens_q: expected 1 dims"),
    (lambda: _varlen_args(cu_seqlens_q=_cu_seqlens([2, 4]) + 1), ValueError, "cu_seqlens_q: expected to start"),
    (lambda: _varlen_args(cu_seqlens_q=_cu_seqlens([4, -2, 4])), ValueError, "cu_seqlens_q: .*non-decreasing"),
    (lambda: _varlen_args(cu_seqlens_q=_cu_seqlens([2, 3])), ValueError, "cu_seqlens_q: .*do not cover"),
    (lambda: _varlen_args(cu_seqlens_k=_cu_seqlens([4, 6])), ValueError, "cu_seqlens_k: .*do not cover"),
    (lambda: _varlen_args(cu_seqlens_k=_cu_seqlens([4, 2, 3])), ValueError, "cu_seqlens_k: expected shape"),
    (lambda: _varlen_args(max_seqlen_q=3), ValueError, "max_seqlen_q: expected at least"),
    (lambda: _varlen_args(max_seqlen_k=5.0), TypeError, "max_seqlen_k"),
]


@pytest.mark.parametrize("make_args, error, match", BAD_INPUTS)
def test_attention_bad_inputs(make_args, error, match):
    with pytest.raises(error, match=match):
        attention(**make_args(), backend="reference")
