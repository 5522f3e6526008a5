"""attention under torch.compile (fullgraph, forward and backward, the eager result; compiled varlen Triton
checking cu_seqlens when it runs) and under torch.autocast (run in autocast's dtype)."""
import pytest
import torch

from llmfast.ops.attention import attention
from helpers import BACKENDS, DEVICE, require_backend
from attention_cases import _cu_seqlens, _randn, _varlen_args


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
