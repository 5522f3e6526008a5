"""attention backward (dense and varlen): the output and q, k, v gradients of every backend against float64
SDPA with the 2x-error rule, over dtypes, head dims, a long sequence, and rows that see no key."""
import pytest
import torch

from llmfast.ops.attention import attention
from helpers import BACKENDS, assert_close_2x, attention_ref, require_backend
from attention_cases import DTYPES, SHAPES, _check_grads, _cu_seqlens, _randn, _varlen_ref


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
