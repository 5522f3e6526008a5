"""attention on strided views, forward and backward: q, k, v sliced out of a fused projection or transposed
from heads-first, cu_seqlens given as strided views, and a max_seqlen far above the longest sequence."""
import pytest
import torch

from llmfast.ops.attention import attention
from helpers import BACKENDS, DEVICE, attention_ref, require_backend
from attention_cases import _check_grads, _cu_seqlens, _forward_backward, _randn, _varlen_ref


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
