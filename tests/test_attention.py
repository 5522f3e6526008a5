"""attention (dense and varlen): every backend against float64 SDPA with the 2x-error rule."""
import pytest
import torch

import llmfast
from llmfast.backends import resolve
from llmfast.ops.attention import attention
from helpers import BACKENDS, DEVICE, assert_close_2x, attention_ref, poison_allocations, require_backend

DTYPES = [torch.float16, torch.bfloat16, torch.float32]
# (seqlen_q, seqlen_k); seqlen_q > seqlen_k leaves causal rows that see no key
SEQLENS = [(1, 1), (17, 17), (37, 53), (53, 37), (1, 53)]
# (head_dim, (heads, kv_heads)): every head dim the kernels are built for once (80, 96, 192 are padded
# to a power of two inside them), GQA ratios 1, 2, 4 among them (8 in HEADS); few heads keep the
# interpreter fast
SHAPES = [(32, (2, 2)), (64, (4, 2)), (80, (4, 1)), (96, (2, 2)), (128, (4, 2)), (192, (2, 1)), (256, (2, 2))]
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
    with poison_allocations():
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
    with poison_allocations():
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


@pytest.mark.parametrize("shape", [s for s in SHAPES if s[0] != 64], ids=lambda s: f"d{s[0]}")
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("backend", BACKENDS)
def test_attention_grad_head_dims(backend, causal, shape):
    """The backward kernels at every other head dim they are built for (padded ones included), GQA too."""
    require_backend(backend, "attention")
    head_dim, (heads, kv_heads) = shape
    q = _randn(2, 17, heads, head_dim, dtype=torch.float16)
    k, v = (_randn(2, 29, kv_heads, head_dim, dtype=torch.float16) for _ in range(2))
    _check_grads(
        lambda q, k, v: attention(q, k, v, causal=causal, backend=backend),
        lambda q, k, v, upcast=True: attention_ref(q, k, v, causal=causal, upcast=upcast),
        q, k, v, _randn(2, 17, heads, head_dim),
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
    # their gradients are 0, not NaN (the kernels keep a log-sum-exp of -inf for them)
    _check_grads(
        lambda q, k, v: attention(q, k, v, causal=True, backend=backend),
        lambda q, k, v, upcast=True: attention_ref(q, k, v, causal=True, upcast=upcast),
        q, k, v, _randn(1, 5, 2, 32),
    )


# per-sequence (query, key) lengths, with sequences of length 1 and queries that outnumber keys
VARLEN = [
    ([1], [1]),
    ([1, 1, 1], [1, 1, 1]),
    ([17, 1, 37, 53], [17, 1, 37, 53]),
    ([5, 1, 30, 1], [20, 53, 7, 1]),
]


@pytest.mark.parametrize("lengths", VARLEN)
@pytest.mark.parametrize("shape", [(32, (2, 2)), (128, (4, 2)), (256, (4, 1))])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("backend", BACKENDS)
def test_attention_varlen(backend, dtype, causal, shape, lengths):
    require_backend(backend, "attention")
    (lengths_q, lengths_k), (head_dim, (nheads, nheads_kv)) = lengths, shape
    q = _randn(sum(lengths_q), nheads, head_dim, dtype=dtype)
    k = _randn(sum(lengths_k), nheads_kv, head_dim, dtype=dtype)
    v = _randn(sum(lengths_k), nheads_kv, head_dim, dtype=dtype)
    with poison_allocations():
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


def _strided_qkv(layout, dtype):
    """(q, k, v, cu_seqlens or None) as views with non-unit strides on the sequence and head dims:
    "packed": q, k, v sliced out of one fused (batch, seqlen, heads + 2 * kv_heads, head_dim) projection;
    "heads_first": (batch, heads, seqlen, head_dim) tensors transposed; "varlen": packed, varlen."""
    if layout == "heads_first":
        q = _randn(2, 4, 37, 64, dtype=dtype).transpose(1, 2)  # (batch, seqlen, heads, head_dim)
        k, v = (_randn(2, 2, 53, 64, dtype=dtype).transpose(1, 2) for _ in range(2))
        return q, k, v, None
    if layout == "packed":
        qkv = _randn(2, 37, 4 + 2 + 2, 64, dtype=dtype)
        return qkv[:, :, :4], qkv[:, :, 4:6], qkv[:, :, 6:], None
    qkv = _randn(53, 4 + 2 + 2, 64, dtype=dtype)  # (tokens, heads + 2 * kv_heads, head_dim)
    return qkv[:, :4], qkv[:, 4:6], qkv[:, 6:], _cu_seqlens([17, 1, 35])


@pytest.mark.parametrize("layout", ["packed", "heads_first", "varlen"])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
@pytest.mark.parametrize("backend", BACKENDS)
def test_attention_strided(backend, dtype, causal, layout):
    require_backend(backend, "attention")
    q, k, v, cu_seqlens = _strided_qkv(layout, dtype)
    assert not (q.is_contiguous() or k.is_contiguous() or v.is_contiguous())
    if cu_seqlens is None:
        fn_ref = lambda q, k, v, upcast=True: attention_ref(q, k, v, causal=causal, upcast=upcast)  # noqa: E731
        kwargs = {}
    else:
        lengths = torch.diff(cu_seqlens).tolist()
        fn_ref = lambda q, k, v, upcast=True: _varlen_ref(  # noqa: E731
            q, k, v, lengths, lengths, causal=causal, upcast=upcast
        )
        kwargs = dict(cu_seqlens_q=cu_seqlens, cu_seqlens_k=cu_seqlens)
    _check_grads(
        lambda q, k, v: attention(q, k, v, causal=causal, backend=backend, **kwargs),
        fn_ref, q, k, v, torch.randn(q.shape, device=DEVICE),
    )


@pytest.mark.parametrize("backend", BACKENDS)
def test_varlen_strided_cu_seqlens_and_a_generous_max_seqlen(backend):
    """cu_seqlens given as strided views are read through their strides (the kernels read the storage:
    other, valid offsets here; far-off ones crashed), forward and backward; a max_seqlen far above the
    longest sequence (allowed, as flash-attn) gives the same result, on a grid sized by the longest."""
    require_backend(backend, "attention")
    lengths_q, lengths_k = [5, 1, 9], [7, 3, 9]
    q, k, v = _randn(15, 4, 32), _randn(19, 2, 32), _randn(19, 2, 32)
    dout = _randn(15, 4, 32)
    cu_q, cu_k = _cu_seqlens(lengths_q), _cu_seqlens(lengths_k)

    def run(cu_q, cu_k, max_q=None, max_k=None):
        fn = lambda q, k, v: attention(q, k, v, causal=True, cu_seqlens_q=cu_q, cu_seqlens_k=cu_k,  # noqa: E731
                                       max_seqlen_q=max_q, max_seqlen_k=max_k, backend=backend)
        return _forward_backward(fn, q, k, v, dout)

    expected = run(cu_q, cu_k)
    junk = torch.tensor([0, 2, 3, 4], dtype=torch.int32, device=DEVICE)
    strided = [torch.stack([cu, junk], dim=-1)[:, 0] for cu in (cu_q, cu_k)]
    assert strided[0].stride() == (2,)
    for got, want in zip(run(*strided), expected):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    for got, want in zip(run(cu_q, cu_k, 10**8, 10**8), expected):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_attention_auto_prefers_triton():
    """"auto" takes the Triton kernels wherever they can run (on CUDA tensors; never the interpreter)."""
    require_backend("triton", "attention")
    assert llmfast.available_backends("attention")[0] == "triton"
    assert resolve("attention", "auto", torch.device("cuda")) == "triton"
    assert resolve("attention", "auto", torch.device("cpu")) == "reference"  # not the interpreter


@pytest.mark.parametrize("backend", BACKENDS)
def test_attention_compiles_fullgraph(backend):
    """torch.compile(fullgraph=True) traces the op (the triton kernels as opaque custom ops), forward
    and backward, and gives the eager result."""
    require_backend(backend, "attention")
    q, k, v = _randn(1, 17, 4, 32, grad=True), _randn(1, 23, 2, 32, grad=True), _randn(1, 23, 2, 32, grad=True)
    fn = lambda q, k, v: attention(q, k, v, causal=True, backend=backend)  # noqa: E731
    out = torch.compile(fn, fullgraph=True, backend="aot_eager")(q, k, v)
    out.sum().backward()
    grads = [t.grad for t in (q, k, v)]
    for t in (q, k, v):
        t.grad = None
    fn(q, k, v).sum().backward()
    for compiled, eager in zip((out, *grads), (fn(q, k, v), q.grad, k.grad, v.grad)):
        torch.testing.assert_close(compiled, eager)


@pytest.mark.parametrize("backend", BACKENDS)
def test_attention_under_autocast_runs_in_its_dtype(backend):
    """Inside torch.autocast, float32 (or mixed) q, k, v are cast to autocast's dtype first, as SDPA's inputs
    are: the output is in that dtype and equals the op on cast inputs; gradients reach the float32 leaves."""
    require_backend(backend, "attention")
    q, k = _randn(1, 17, 4, 32, grad=True), _randn(1, 23, 2, 32, grad=True)
    v = _randn(1, 23, 2, 32, dtype=torch.bfloat16, grad=True)
    with torch.autocast(DEVICE.type, dtype=torch.bfloat16):
        out = attention(q, k, v, causal=True, backend=backend)
    assert out.dtype == torch.bfloat16
    expected = attention(*(t.detach().bfloat16() for t in (q, k, v)), causal=True, backend=backend)
    torch.testing.assert_close(out, expected, rtol=0, atol=0)
    dout = torch.randn_like(out)
    out.backward(dout)
    assert q.grad.dtype == k.grad.dtype == torch.float32 and v.grad.dtype == torch.bfloat16
    cast = [t.detach().bfloat16().requires_grad_() for t in (q, k, v)]
    attention(*cast, causal=True, backend=backend).backward(dout)
    for leaf, bf16_leaf in zip((q, k, v), cast):
        torch.testing.assert_close(leaf.grad, bf16_leaf.grad.to(leaf.dtype), rtol=0, atol=0)


def test_compiled_varlen_triton_checks_cu_seqlens_when_it_runs():
    """torch.compile traces varlen attention without reading cu_seqlens; the compiled graph's Triton forward
    reads them when it runs: offsets past the tokens would send the kernels outside q, k and v. Valid ones
    give the eager result, forward and backward."""
    require_backend("triton", "attention")
    fn = lambda q, k, v, cu_q, cu_k: attention(q, k, v, causal=True, cu_seqlens_q=cu_q, cu_seqlens_k=cu_k,  # noqa: E731
                                                max_seqlen_q=4, max_seqlen_k=5, backend="triton")
    compiled = torch.compile(fn, fullgraph=True, backend="aot_eager")
    args = _varlen_args()
    q, k, v = (args[name].requires_grad_() for name in ("q", "k", "v"))
    out = compiled(q, k, v, args["cu_seqlens_q"], args["cu_seqlens_k"])
    out.sum().backward()
    grads = [t.grad for t in (q, k, v)]
    for t in (q, k, v):
        t.grad = None
    eager = fn(q, k, v, args["cu_seqlens_q"], args["cu_seqlens_k"])
    eager.sum().backward()
    for got, expected in zip((out, *grads), (eager, q.grad, k.grad, v.grad)):
        torch.testing.assert_close(got, expected)
    with torch.no_grad():
        with pytest.raises(ValueError, match="cu_seqlens_k: expected to end at the number of tokens 9, got 4000"):
            compiled(q, k, v, args["cu_seqlens_q"], _cu_seqlens([4, 3996]))
        with pytest.raises(ValueError, match="max_seqlen_q: expected at least the longest sequence length 5"):
            compiled(q, k, v, _cu_seqlens([1, 5]), args["cu_seqlens_k"])


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
    (lambda: _dense_args(softmax_scale=float("inf")), ValueError, "softmax_scale"),
    (lambda: _dense_args(softmax_scale=float("nan")), ValueError, "softmax_scale"),
    (lambda: _dense_args(q=_randn(2, 5, 0, 32)), ValueError, "q: expected at least one head"),
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
@pytest.mark.parametrize("backend", BACKENDS)
def test_attention_bad_inputs(backend, make_args, error, match):
    require_backend(backend, "attention")
    with pytest.raises(error, match=match):
        attention(**make_args(), backend=backend)


# --- GPU: real sizes in bf16/fp16 ----------------------------------------------------------------

gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def _gpu_randn(*shape, dtype):
    return torch.randn(*shape, dtype=dtype, device="cuda")


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("head_dim", [64, 128, 256])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_gpu_attention_dense(dtype, causal, head_dim):
    require_backend("triton", "attention", torch.device("cuda"))
    q = _gpu_randn(2, 2048, 16, head_dim, dtype=dtype)
    k, v = _gpu_randn(2, 2048, 16, head_dim, dtype=dtype), _gpu_randn(2, 2048, 16, head_dim, dtype=dtype)
    _check_grads(
        lambda q, k, v: attention(q, k, v, causal=causal, backend="triton"),
        lambda q, k, v, upcast=True: attention_ref(q, k, v, causal=causal, upcast=upcast),
        q, k, v, _gpu_randn(2, 2048, 16, head_dim, dtype=torch.float32),
    )


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("head_dim, causal", [(80, True), (96, False), (192, True)])
def test_gpu_attention_padded_head_dims(head_dim, causal):
    """Head dims the kernels pad to a power of two, on the tensor cores in bf16, with GQA 8."""
    require_backend("triton", "attention", torch.device("cuda"))
    q = _gpu_randn(2, 1024, 16, head_dim, dtype=torch.bfloat16)
    k, v = (_gpu_randn(2, 1024, 2, head_dim, dtype=torch.bfloat16) for _ in range(2))
    _check_grads(
        lambda q, k, v: attention(q, k, v, causal=causal, backend="triton"),
        lambda q, k, v, upcast=True: attention_ref(q, k, v, causal=causal, upcast=upcast),
        q, k, v, _gpu_randn(2, 1024, 16, head_dim, dtype=torch.float32),
    )


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_gpu_attention_gqa_cross(dtype, causal):
    """GQA 32/8 with more keys than queries (bottom-right causal), as in chunked prefill."""
    require_backend("triton", "attention", torch.device("cuda"))
    q = _gpu_randn(2, 1000, 32, 128, dtype=dtype)
    k, v = _gpu_randn(2, 3000, 8, 128, dtype=dtype), _gpu_randn(2, 3000, 8, 128, dtype=dtype)
    _check_grads(
        lambda q, k, v: attention(q, k, v, causal=causal, backend="triton"),
        lambda q, k, v, upcast=True: attention_ref(q, k, v, causal=causal, upcast=upcast),
        q, k, v, _gpu_randn(2, 1000, 32, 128, dtype=torch.float32),
    )


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_gpu_attention_varlen(dtype, causal):
    require_backend("triton", "attention", torch.device("cuda"))
    lengths = [2048, 1, 777, 1300, 64]
    cu_seqlens = torch.tensor([0, *lengths], device="cuda").cumsum(0).to(torch.int32)
    q, k, v = (_gpu_randn(sum(lengths), 16, 128, dtype=dtype) for _ in range(3))
    _check_grads(
        lambda q, k, v: attention(
            q, k, v, causal=causal, cu_seqlens_q=cu_seqlens, cu_seqlens_k=cu_seqlens, backend="triton"
        ),
        lambda q, k, v, upcast=True: _varlen_ref(q, k, v, lengths, lengths, causal=causal, upcast=upcast),
        q, k, v, _gpu_randn(sum(lengths), 16, 128, dtype=torch.float32),
    )


def test_triton_batches_past_the_grid_limit_are_refused():
    """The kernels' grid z size is the batch, at most 65535 on CUDA (checked before any launch)."""
    from llmfast_kernels.attention import MAX_GRID_YZ, launch_shape

    q = torch.empty(MAX_GRID_YZ + 1, 1, 1, 16)
    with pytest.raises(ValueError, match="q: the Triton kernels take at most 65535 sequences"):
        launch_shape(q, q, None, 1, 1)
    cu_seqlens = torch.arange(MAX_GRID_YZ + 2, dtype=torch.int32)
    with pytest.raises(ValueError, match="cu_seqlens_q: the Triton kernels take at most 65535 sequences"):
        launch_shape(q[:, 0], q[:, 0], cu_seqlens, 1, 1)
    assert launch_shape(q[:MAX_GRID_YZ], q[:MAX_GRID_YZ], None, 1, 1)[0] == MAX_GRID_YZ
