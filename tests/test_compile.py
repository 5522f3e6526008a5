"""torch.compile(fullgraph=True) over llmfast modules: the ops are custom ops with fake kernels."""
import pytest
import torch

import llmfast
from helpers import DEVICE, require_backend


class Block(torch.nn.Module):
    """A pre-norm residual block in the shape of a transformer layer's norm/residual traffic."""

    def __init__(self, hidden, backend):
        super().__init__()
        self.norm1 = llmfast.nn.FusedAddRMSNorm(hidden, backend=backend)
        self.proj = torch.nn.Linear(hidden, hidden)
        self.norm2 = llmfast.nn.FusedAddLayerNorm(hidden, backend=backend)
        self.final = llmfast.nn.LayerNorm(hidden, backend=backend)

    def forward(self, x, residual):
        y, h = self.norm1(x, residual)
        y, h = self.norm2(self.proj(y), h)
        return self.final(y + h)


@pytest.mark.parametrize("backend", ["reference", "cpu", "triton", "cuda"])
def test_fullgraph_compile_matches_eager_with_gradients(backend):
    device = torch.device("cuda" if backend in ("cuda", "triton") and torch.cuda.is_available() else "cpu")
    require_backend(backend, "add_rms_norm", device)
    torch.manual_seed(0)
    model = Block(64, backend).to(device)
    x, r = torch.randn(3, 5, 64, device=device), torch.randn(3, 5, 64, device=device)

    torch._dynamo.reset()
    compiled = torch.compile(model, fullgraph=True)
    out = compiled(x, r)
    out.square().sum().backward()
    grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()

    expected = model(x, r)
    expected.square().sum().backward()
    torch.testing.assert_close(out, expected, rtol=1e-4, atol=1e-4)
    for g, g_eager in zip(grads, [p.grad for p in model.parameters()]):
        torch.testing.assert_close(g, g_eager, rtol=1e-4, atol=1e-4)


def _compiled_matches_eager(fn, *args):
    torch._dynamo.reset()
    out = torch.compile(fn, fullgraph=True, backend="aot_eager")(*args)
    torch.testing.assert_close(out, fn(*args), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_fullgraph_compile_of_varlen_attention_with_gradients(backend):
    """Traced, the cu_seqlens values cannot be read: max_seqlen_q/k must be given, and only shapes are checked."""
    require_backend(backend, "attention", DEVICE)
    torch.manual_seed(0)
    q, k, v = (torch.randn(n, h, 32, device=DEVICE, requires_grad=True) for n, h in ((10, 4), (12, 2), (12, 2)))
    cu_q, cu_k = (torch.tensor(c, dtype=torch.int32, device=DEVICE) for c in ([0, 4, 10], [0, 5, 12]))

    def fn(q, k, v):
        return llmfast.ops.attention(q, k, v, cu_seqlens_q=cu_q, cu_seqlens_k=cu_k, max_seqlen_q=6, max_seqlen_k=7,
                                     causal=True, backend=backend)

    torch._dynamo.reset()
    out = torch.compile(fn, fullgraph=True, backend="aot_eager")(q, k, v)
    grads = torch.autograd.grad(out.square().sum(), (q, k, v))
    expected = fn(q, k, v)
    torch.testing.assert_close(out, expected, rtol=1e-4, atol=1e-4)
    for g, g_eager in zip(grads, torch.autograd.grad(expected.square().sum(), (q, k, v))):
        torch.testing.assert_close(g, g_eager, rtol=1e-4, atol=1e-4)
    torch._dynamo.reset()
    with pytest.raises(Exception, match="max_seqlen_q: expected an int under torch.compile"):
        torch.compile(lambda q: llmfast.ops.attention(q, k, v, cu_seqlens_q=cu_q, cu_seqlens_k=cu_k, backend=backend),
                      fullgraph=True, backend="aot_eager")(q)


@pytest.mark.parametrize("backend", ["reference", "cpu", "triton", "cuda"])
def test_fullgraph_compile_of_the_paged_ops(backend):
    require_backend(backend, "paged_attention", DEVICE)
    torch.manual_seed(0)
    k_cache, v_cache = (torch.randn(6, 4, 2, 32, device=DEVICE) for _ in range(2))
    block_tables = torch.tensor([[0, 1, 2], [3, 4, 5]], dtype=torch.int32, device=DEVICE)
    context_lens = torch.tensor([9, 11], dtype=torch.int32, device=DEVICE)
    cu_q = torch.tensor([0, 4, 10], dtype=torch.int32, device=DEVICE)
    ops = llmfast.ops

    def write(k):
        caches = k_cache.clone(), v_cache.clone()
        ops.write_kv_cache(k, 2 * k, *caches, torch.tensor([0, 5, -1], device=DEVICE), backend=backend)
        return torch.stack(caches)

    _compiled_matches_eager(lambda q: ops.paged_attention(q, k_cache, v_cache, block_tables, context_lens,
                                                          backend=backend), torch.randn(2, 4, 32, device=DEVICE))
    _compiled_matches_eager(lambda q: ops.paged_attention(q, k_cache, v_cache, block_tables, context_lens,
                                                          cu_seqlens_q=cu_q, max_seqlen_q=6, backend=backend),
                            torch.randn(10, 4, 32, device=DEVICE))
    _compiled_matches_eager(write, torch.randn(3, 2, 32, device=DEVICE))


@pytest.mark.parametrize("causal", [False, True])
def test_fullgraph_compile_of_multihead_attention_with_a_key_padding_mask(causal):
    """The fused padding paths gather by the mask's values; traced, the module takes its general path."""
    torch.manual_seed(0)
    module = llmfast.nn.MultiheadAttention(64, 4, batch_first=True).to(DEVICE).eval()
    padding = torch.zeros(2, 7, dtype=torch.bool, device=DEVICE)
    padding[1, 5:] = True
    mask = torch.ones(7, 7, dtype=torch.bool, device=DEVICE).triu(1) if causal else None
    _compiled_matches_eager(lambda x: module(x, x, x, need_weights=False, key_padding_mask=padding, attn_mask=mask,
                                             is_causal=causal)[0], torch.randn(2, 7, 64, device=DEVICE))


@pytest.mark.parametrize("mask_dtype", [torch.bool, torch.float32])
def test_fullgraph_compile_of_multihead_attention_with_an_explicit_mask(mask_dtype):
    """Whether a mask is torch's causal one is read from its values: traced, an explicit mask (without
    is_causal) takes the general path."""
    torch.manual_seed(0)
    module = llmfast.nn.MultiheadAttention(64, 4, batch_first=True).to(DEVICE).eval()
    causal = torch.ones(7, 7, dtype=torch.bool, device=DEVICE).triu(1)
    mask = causal if mask_dtype == torch.bool else torch.zeros(7, 7, device=DEVICE).masked_fill(causal, float("-inf"))
    _compiled_matches_eager(lambda x: module(x, x, x, need_weights=False, attn_mask=mask)[0],
                            torch.randn(2, 7, 64, device=DEVICE))


@pytest.mark.parametrize("causal", [False, True])
def test_inductor_compiles_the_varlen_reference(causal):
    """Traced, the reference masks every query to its own sequence's keys instead of slicing by cu_seqlens
    (which Inductor cannot lower: a data-dependent bmm); an empty sequence and Sq != Sk included."""
    torch.manual_seed(0)
    q, k, v = (torch.randn(n, h, 32) for n, h in ((10, 4), (12, 2), (12, 2)))
    cu_q, cu_k = torch.tensor([0, 4, 4, 10], dtype=torch.int32), torch.tensor([0, 5, 6, 12], dtype=torch.int32)

    def fn(q, k, v):
        return llmfast.ops.attention(q, k, v, cu_seqlens_q=cu_q, cu_seqlens_k=cu_k, max_seqlen_q=6, max_seqlen_k=6,
                                     causal=causal, backend="reference")

    torch._dynamo.reset()
    torch.testing.assert_close(torch.compile(fn, fullgraph=True)(q, k, v), fn(q, k, v), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("backend", ["reference", "cpu", "triton", "cuda"])
def test_dynamic_fullgraph_compile_of_the_ops_with_their_float_arguments(backend):
    """compile(dynamic=True) passes eps and softmax_scale as symbolic floats: the checks compare them instead
    of calling math.isfinite (which broke the graph)."""
    require_backend(backend, "paged_attention", DEVICE)
    ops, dynamic = llmfast.ops, dict(fullgraph=True, dynamic=True, backend="aot_eager")
    torch.manual_seed(0)
    x = torch.randn(3, 16, device=DEVICE)
    q = torch.randn(2, 4, 32, device=DEVICE)
    k_cache = torch.randn(4, 4, 2, 32, device=DEVICE)
    block_tables = torch.tensor([[0, 1], [2, 3]], dtype=torch.int32, device=DEVICE)
    context_lens = torch.tensor([3, 8], dtype=torch.int32, device=DEVICE)
    calls = [
        (lambda x, eps: ops.add_rms_norm(x, x, None, eps=eps, backend=backend)[0], x, 1e-3),
        (lambda x, eps: ops.add_layer_norm(x, None, None, None, eps=eps, backend=backend)[0], x, 1e-3),
        (lambda q, scale: ops.paged_attention(q, k_cache, k_cache, block_tables, context_lens, softmax_scale=scale,
                                              backend=backend), q, 0.3),
    ]
    if backend in llmfast.available_backends("attention"):
        calls.append((lambda q, scale: ops.attention(q[None], q[None], q[None], softmax_scale=scale,
                                                     backend=backend), q, 0.3))
    for fn, tensor, value in calls:
        torch._dynamo.reset()
        torch.testing.assert_close(torch.compile(fn, **dynamic)(tensor, value), fn(tensor, value), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("chunked", [False, True], ids=["decode", "chunked_prefill"])
def test_inductor_compiles_the_paged_reference(chunked):
    """Traced, the paged reference masks each query to the slots its block table holds instead of slicing by
    context_lens (which Inductor could not lower); an empty context, unused -1 entries and NaN in unused
    slots included."""
    torch.manual_seed(0)
    k_cache, v_cache = torch.randn(8, 4, 2, 16), torch.randn(8, 4, 2, 16)
    k_cache[7], v_cache[7] = float("nan"), float("nan")  # a block no sequence uses
    block_tables = torch.tensor([[3, 0, -1], [7, -1, -1], [1, 2, 5]], dtype=torch.int32)
    context_lens = torch.tensor([6, 0, 11], dtype=torch.int32)
    ops = llmfast.ops
    if chunked:
        q, cu_q = torch.randn(7, 4, 16), torch.tensor([0, 3, 3, 7], dtype=torch.int32)

        def fn(q):
            return ops.paged_attention(q, k_cache, v_cache, block_tables, context_lens, cu_seqlens_q=cu_q,
                                       max_seqlen_q=4, backend="reference")
    else:
        q = torch.randn(3, 4, 16)

        def fn(q):
            return ops.paged_attention(q, k_cache, v_cache, block_tables, context_lens, backend="reference")

    torch._dynamo.reset()
    torch.testing.assert_close(torch.compile(fn, fullgraph=True)(q), fn(q), rtol=1e-5, atol=1e-5)
