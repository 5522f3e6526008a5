"""attention forward (dense and varlen): every backend over dtype, causal, head-dim, GQA and length grids
against float64 SDPA with the 2x-error rule, and "auto"'s backend choice (gradients: test_attention_grad.py;
strided views: test_attention_strided.py; torch.compile and autocast: test_attention_compile.py; refused
inputs: test_attention_bad_inputs.py; real sizes on CUDA: test_attention_gpu.py)."""
import pytest
import torch

import llmfast
from llmfast.backends import resolve
from llmfast.ops.attention import attention
from helpers import BACKENDS, assert_close_2x, attention_ref, poison_allocations, require_backend
from attention_cases import DTYPES, SHAPES, SLACK_ULPS, _cu_seqlens, _randn, _varlen_ref

# (seqlen_q, seqlen_k); seqlen_q > seqlen_k leaves causal rows that see no key
SEQLENS = [(1, 1), (17, 17), (37, 53), (53, 37), (1, 53)]
HEADS = [(4, 4), (4, 2), (8, 2), (8, 1)]


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


def test_attention_auto_prefers_triton():
    """"auto" takes the Triton kernels wherever they can run (on CUDA tensors; never the interpreter)."""
    require_backend("triton", "attention")
    assert llmfast.available_backends("attention")[0] == "triton"
    assert resolve("attention", "auto", torch.device("cuda")) == "triton"
    assert resolve("attention", "auto", torch.device("cpu")) == "reference"  # not the interpreter
