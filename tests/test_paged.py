"""paged_attention: every backend against per-sequence float64 SDPA (decode and chunked prefill, block sizes,
GQA/MQA groups, strided caches and index tensors), its refused inputs, and the gpu-marked benchmark shapes."""
import random

import pytest
import torch

from llmfast.ops import paged_attention, write_kv_cache
from helpers import BACKENDS, DEVICE, assert_close_2x, attention_ref, poison_allocations, require_backend
from paged_cases import (BLOCK_SIZES, DTYPES, _chunked_args, _int32, _paged_args, _paged_cache, _paged_ref, _randn,
                         _write_args)

# (head_dim, (heads, kv_heads)): GQA ratios 1, 2, 4, 8
SHAPES = [(80, (4, 4)), (64, (4, 2)), (128, (8, 2)), (256, (8, 1))]
SLACK_ULPS = {torch.float16: 1.0, torch.bfloat16: 1.0, torch.float32: 16.0}


def _context_lens(block_size):
    """Lengths around the block edges, and one long context spanning many blocks."""
    return [1, max(block_size - 1, 1), block_size, block_size + 1, 133]


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("block_size", BLOCK_SIZES)
@pytest.mark.parametrize("chunked", [False, True], ids=["decode", "chunked_prefill"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("backend", BACKENDS)
def test_paged_attention(backend, dtype, chunked, block_size, shape):
    require_backend(backend, "paged_attention")
    head_dim, (nheads, nheads_kv) = shape
    contexts = _context_lens(block_size)
    k_seqs, v_seqs, k_cache, v_cache, block_tables = _paged_cache(contexts, block_size, nheads_kv, head_dim, dtype)
    if chunked:
        rng = random.Random(block_size * head_dim)
        # a whole-prompt prefill, a single new token, and chunks in between
        query_lens = [contexts[0], 1] + [rng.randint(1, n) for n in contexts[2:]]
    else:
        query_lens = [1] * len(contexts)
    q_seqs = [_randn(n, nheads, head_dim, dtype=dtype) for n in query_lens]
    q = torch.cat(q_seqs)
    cu_seqlens_q = torch.tensor([0, *query_lens], device=DEVICE).cumsum(0).to(torch.int32) if chunked else None
    context_lens = torch.tensor(contexts, dtype=torch.int32, device=DEVICE)

    with poison_allocations():  # an output element left unwritten shows up as NaN
        out = paged_attention(
            q, k_cache, v_cache, block_tables, context_lens, cu_seqlens_q=cu_seqlens_q, backend=backend
        )
    assert out.dtype == dtype and out.shape == q.shape
    ref = _paged_ref(q_seqs, k_seqs, v_seqs, upcast=True)
    peer = _paged_ref(q_seqs, k_seqs, v_seqs, upcast=False)
    assert_close_2x(out, peer, ref, slack_ulps=SLACK_ULPS[dtype])


@pytest.mark.parametrize("head_dim", [64, 40])
@pytest.mark.parametrize("chunked", [False, True], ids=["decode", "chunked_prefill"])
@pytest.mark.parametrize("num_seqs", [1, 3])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("backend", BACKENDS)
def test_few_sequences_under_many_threads(backend, dtype, num_seqs, chunked, head_dim):
    """Fewer sequences than threads (4 here, whatever the machine): the C++ CPU kernel then splits each decode
    sequence by kv head, and each part must write its own heads. head_dim 40 is not a multiple of the
    kernels' 16 lanes."""
    require_backend(backend, "paged_attention")
    threads = torch.get_num_threads()
    torch.set_num_threads(4)
    try:
        contexts = [133, 40, 17][:num_seqs]
        k_seqs, v_seqs, k_cache, v_cache, block_tables = _paged_cache(contexts, 16, 4, head_dim, dtype)
        query_lens = [min(n, 37) if chunked else 1 for n in contexts]
        q_seqs = [_randn(n, 8, head_dim, dtype=dtype) for n in query_lens]
        cu_seqlens_q = _int32(0, *query_lens).cumsum(0).to(torch.int32).to(DEVICE) if chunked else None
        with poison_allocations():
            out = paged_attention(torch.cat(q_seqs), k_cache, v_cache, block_tables,
                                  torch.tensor(contexts, dtype=torch.int32, device=DEVICE), cu_seqlens_q=cu_seqlens_q,
                                  backend=backend)
    finally:
        torch.set_num_threads(threads)
    assert_close_2x(out, _paged_ref(q_seqs, k_seqs, v_seqs, upcast=False), _paged_ref(q_seqs, k_seqs, v_seqs, upcast=True),
                    slack_ulps=SLACK_ULPS[dtype])


@pytest.mark.parametrize("head_major", [False, True], ids=["slot_major", "head_major"])
@pytest.mark.parametrize("block_size", [64, 256])
@pytest.mark.parametrize("chunked", [False, True], ids=["decode", "chunked_prefill"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("backend", BACKENDS)
def test_paged_attention_large_blocks_and_strided_cache(backend, dtype, chunked, block_size, head_major):
    """Blocks up to 256 tokens, head_dim 80, and caches stored head-major (a strided view of the layout)."""
    require_backend(backend, "paged_attention")
    contexts, head_dim = [1, block_size - 1, block_size + 3, 2 * block_size + 17], 80
    k_seqs, v_seqs, k_cache, v_cache, block_tables = _paged_cache(contexts, block_size, 2, head_dim, dtype)
    if head_major:
        # (num_blocks, kv_heads, block_size, head_dim) in memory, seen as (num_blocks, block_size, kv_heads, head_dim)
        k_cache, v_cache = (c.transpose(1, 2).contiguous().transpose(1, 2) for c in (k_cache, v_cache))
    query_lens = [1, 7, block_size // 2 + 1, 40] if chunked else [1] * len(contexts)
    q_seqs = [_randn(n, 8, head_dim, dtype=dtype) for n in query_lens]
    cu_seqlens_q = torch.tensor([0, *query_lens], device=DEVICE).cumsum(0).to(torch.int32) if chunked else None
    context_lens = torch.tensor(contexts, dtype=torch.int32, device=DEVICE)
    with poison_allocations():
        out = paged_attention(torch.cat(q_seqs), k_cache, v_cache, block_tables, context_lens,
                              cu_seqlens_q=cu_seqlens_q, backend=backend)
    ref = _paged_ref(q_seqs, k_seqs, v_seqs, upcast=True)
    peer = _paged_ref(q_seqs, k_seqs, v_seqs, upcast=False)
    assert_close_2x(out, peer, ref, slack_ulps=SLACK_ULPS[dtype])


@pytest.mark.parametrize("chunked", [False, True], ids=["decode", "chunked_prefill"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_triton_paged_attention_splits_long_contexts(dtype, chunked):
    """Flash-decoding: few (sequence, kv head) programs and long contexts make the launcher split each
    context across programs and merge the partial softmaxes with the reduce kernel."""
    require_backend("triton", "paged_attention")
    from llmfast_kernels.paged import num_splits

    block_size, head_dim, contexts = 16, 64, [700, 3, 0]
    k_seqs, v_seqs, k_cache, v_cache, block_tables = _paged_cache(contexts, block_size, 1, head_dim, dtype)
    assert num_splits(len(contexts), block_tables.shape[1] * block_size, k_cache.device) > 1
    query_lens = [5, 3, 0] if chunked else [1, 1, 1]
    q_seqs = [_randn(n, 4, head_dim, dtype=dtype) for n in query_lens]
    cu_seqlens_q = torch.tensor([0, *query_lens], device=DEVICE).cumsum(0).to(torch.int32) if chunked else None
    context_lens = torch.tensor(contexts, dtype=torch.int32, device=DEVICE)
    with poison_allocations():
        out = paged_attention(
            torch.cat(q_seqs), k_cache, v_cache, block_tables, context_lens, cu_seqlens_q=cu_seqlens_q,
            backend="triton",
        )
    if not chunked:  # the empty context's decode query outputs 0
        assert torch.equal(out[2], torch.zeros_like(out[2]))
        q_seqs, k_seqs, v_seqs, out = q_seqs[:2], k_seqs[:2], v_seqs[:2], out[:2]
    ref = _paged_ref(q_seqs, k_seqs, v_seqs, upcast=True)
    assert_close_2x(out, _paged_ref(q_seqs, k_seqs, v_seqs, upcast=False), ref, slack_ulps=SLACK_ULPS[dtype])


def test_triton_prefill_past_the_grid_limit_is_refused_and_splits_stay_under_it(monkeypatch):
    """A grid's z size is at most 65535 on CUDA: a chunk of one sequence with more query tiles than that is
    a ValueError, and flash-decoding splits never take the tiles past it (a limit of 4 stands in here)."""
    require_backend("triton", "paged_attention")
    from llmfast_kernels import paged as kernels

    # 4 and 3 query tokens; 4 query heads over 2 kv heads (the index tensors moved to q's device)
    args = {name: t.to(DEVICE) if torch.is_tensor(t) else t for name, t in _chunked_args().items()}
    monkeypatch.setattr(kernels, "PREFILL_ROWS", {"cuda": 2, "cpu": 2})  # one token a tile at group 2
    monkeypatch.setattr(kernels, "MAX_GRID_Z", 3)
    with pytest.raises(ValueError, match="max_seqlen_q: the Triton kernel takes at most 3 query tokens"):
        paged_attention(**args, backend="triton")
    monkeypatch.setattr(kernels, "MAX_GRID_Z", 4)
    launched = []
    real = kernels._paged_attention_kernel

    class Spy:
        def __getitem__(self, grid):
            launched.append(grid)
            return real[grid]

    monkeypatch.setattr(kernels, "_paged_attention_kernel", Spy())
    monkeypatch.setattr(kernels, "num_splits", lambda *a: 8)  # as many splits as a long context would get
    out = paged_attention(**args, backend="triton")
    assert launched and launched[0][2] <= 4
    torch.testing.assert_close(out, paged_attention(**args, backend="reference"), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
def test_paged_attention_softmax_scale_and_empty_context(backend):
    require_backend(backend, "paged_attention")
    contexts = [0, 9, 40]
    k_seqs, v_seqs, k_cache, v_cache, block_tables = _paged_cache(contexts, 8, 2, 64, torch.float32)
    q = _randn(3, 4, 64)
    context_lens = torch.tensor(contexts, dtype=torch.int32, device=DEVICE)
    with poison_allocations():
        out = paged_attention(q, k_cache, v_cache, block_tables, context_lens, softmax_scale=0.5, backend=backend)
    # a decode query with no cached token sees no key and outputs 0, as a causal row with no key
    assert torch.equal(out[0], torch.zeros_like(out[0]))
    for i in (1, 2):
        ref = attention_ref(q[None, i : i + 1], k_seqs[i][None], v_seqs[i][None], softmax_scale=0.5)[0]
        peer = attention_ref(q[None, i : i + 1], k_seqs[i][None], v_seqs[i][None], softmax_scale=0.5, upcast=False)[0]
        assert_close_2x(out[i : i + 1], peer, ref, slack_ulps=16.0)


@pytest.mark.parametrize("splits", [1, 4])
@pytest.mark.parametrize("backend", BACKENDS)
def test_finite_scores_below_minus_1e30_still_weigh_their_keys(backend, splits, monkeypatch):
    """Every score -2e36 (finite): a softmax over equal scores, the mean of the visible values. The Triton and
    CUDA kernels started their running max at -1e30, above every score, and gave 0."""
    require_backend(backend, "paged_attention")
    if splits > 1:
        if backend != "triton":
            pytest.skip("splits are the Triton kernel's")
        import llmfast_kernels.paged as kernels
        monkeypatch.setattr(kernels, "num_splits", lambda *a: splits)
    q = torch.full((2, 2, 8), 1e18, device=DEVICE)
    k_cache = torch.full((4, 4, 1, 8), -1e18, device=DEVICE)
    v_cache = _randn(4, 4, 1, 8)
    block_tables = torch.tensor([[0, 1], [2, 3]], dtype=torch.int32, device=DEVICE)
    out = paged_attention(q, k_cache, v_cache, block_tables, torch.tensor([3, 7], dtype=torch.int32, device=DEVICE),
                          softmax_scale=2**-5, backend=backend)
    means = [v_cache[0, :3, 0].mean(0), v_cache[2:4].reshape(8, 8)[:7].mean(0)]
    for seq, mean in enumerate(means):
        torch.testing.assert_close(out[seq], mean.expand(2, 8), rtol=1e-5, atol=1e-5)


def _strided(index: torch.Tensor, junk: torch.Tensor) -> torch.Tensor:
    """``index`` as a view with stride 2 whose skipped elements hold ``junk`` (other valid values), so a
    kernel that reads the storage with unit stride gets a wrong, not an out-of-range, index."""
    return torch.stack([index, junk.to(index.dtype)], dim=-1)[..., 0]


@pytest.mark.parametrize("backend", BACKENDS)
def test_strided_index_tensors_are_read_through_their_strides(backend):
    """A strided slot_mapping, block_tables, context_lens or cu_seqlens_q gives what its contiguous copy
    gives (the kernels read their storage with unit stride: wrong slots, or a crash for far-off values)."""
    require_backend(backend, "paged_attention")
    args = {name: t.to(DEVICE) for name, t in _write_args().items()}
    contiguous = [t.clone() for t in (args["k_cache"], args["v_cache"])]
    write_kv_cache(args["k"], args["v"], *contiguous, args["slot_mapping"], backend=backend)
    strided_slots = _strided(args["slot_mapping"], torch.tensor([1, 2, 4, 5, 6], device=DEVICE))
    write_kv_cache(args["k"], args["v"], args["k_cache"], args["v_cache"], strided_slots, backend=backend)
    assert torch.equal(args["k_cache"], contiguous[0]) and torch.equal(args["v_cache"], contiguous[1])

    for make_args, junk_lens in ((_paged_args, [3, 2]), (lambda: _chunked_args(max_seqlen_q=4), [12, 4])):
        paged = {name: t.to(DEVICE) if torch.is_tensor(t) else t for name, t in make_args().items()}
        expected = paged_attention(**paged, backend="reference")
        strided = dict(paged, context_lens=_strided(paged["context_lens"], torch.tensor(junk_lens, device=DEVICE)),
                       block_tables=paged["block_tables"].t().contiguous().t())  # column-major
        if "cu_seqlens_q" in paged:
            strided["cu_seqlens_q"] = _strided(paged["cu_seqlens_q"], torch.tensor([0, 1, 2], device=DEVICE))
        torch.testing.assert_close(paged_attention(**strided, backend=backend), expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
def test_backward_through_paged_attention(backend):
    """The reference is differentiable; the kernels have no backward and say so (the cpu backend returned
    an output that required grad and then left q.grad None, with only an autograd warning)."""
    require_backend(backend, "paged_attention")
    args = {name: t.to(DEVICE) for name, t in _paged_args().items()}
    q = args.pop("q").requires_grad_()
    out = paged_attention(q, **args, backend=backend)
    if backend == "reference":
        out.sum().backward()
        assert q.grad is not None and torch.isfinite(q.grad).all()
    else:
        with pytest.raises(RuntimeError, match="paged_attention: .* have no backward"):
            out.sum().backward()


@pytest.mark.parametrize("backend", BACKENDS)
def test_mqa_caches_whose_head_dim_strides_differ(backend):
    """kv_heads = 1: the size-1 head dim's stride can differ between k_cache and v_cache (it is never
    stepped along); the cpu backend refused such caches as of unequal layout."""
    require_backend(backend, "paged_attention")
    k_cache = _randn(4, 4, 1, 8)  # strides (32, 8, 8, 1)
    v_cache = _randn(4, 1, 4, 8).permute(0, 2, 1, 3)  # strides (32, 8, 32, 1), still "contiguous"
    q, tables, lens = _randn(1, 2, 8), _int32([0, 1]).view(1, 2).to(DEVICE), _int32(6).to(DEVICE)
    expected = paged_attention(q, k_cache, v_cache, tables, lens, backend="reference")
    torch.testing.assert_close(paged_attention(q, k_cache, v_cache, tables, lens, backend=backend), expected,
                               atol=1e-5, rtol=1e-5)


BAD_PAGED = [
    (lambda: _paged_args(q=_randn(2, 1, 4, 32)), ValueError, "q: expected 3 dims"),
    (lambda: _paged_args(q=_randn(3, 4, 32)), ValueError, "q: expected shape"),
    (lambda: _paged_args(q=_randn(2, 4, 32, dtype=torch.float16)), TypeError, "k_cache: expected dtype"),
    (lambda: _paged_args(q=_randn(2, 3, 32)), ValueError, "q: .*divisible"),
    (lambda: _paged_args(k_cache=_randn(6, 8, 2, 64)), ValueError, "k_cache: expected shape"),
    (lambda: _paged_args(v_cache=_randn(6, 4, 2, 32)), ValueError, "v_cache: expected shape"),
    (lambda: _paged_args(block_tables=torch.tensor([[0, 3, 5], [2, 1, 4]])), TypeError, "block_tables: expected dtype"),
    (lambda: _paged_args(block_tables=torch.tensor([0, 3, 5], dtype=torch.int32)), ValueError,
     "block_tables: expected 2 dims"),
    (lambda: _paged_args(block_tables=torch.tensor([[0, 3, 6], [2, 1, 4]], dtype=torch.int32)), ValueError,
     "block_tables: expected block ids"),
    (lambda: _paged_args(block_tables=torch.tensor([[0, -1, 5], [2, 1, 4]], dtype=torch.int32)), ValueError,
     "block_tables: expected block ids"),
    (lambda: _paged_args(context_lens=torch.tensor([20, 9])), TypeError, "context_lens: expected dtype"),
    (lambda: _paged_args(context_lens=torch.tensor([20, 9, 1], dtype=torch.int32)), ValueError,
     "context_lens: expected shape"),
    (lambda: _paged_args(context_lens=torch.tensor([25, 9], dtype=torch.int32)), ValueError,
     "context_lens: expected lengths in \\[0, 24\\]"),
    (lambda: _paged_args(context_lens=torch.tensor([20, -1], dtype=torch.int32)), ValueError,
     "context_lens: expected lengths"),
    (lambda: _paged_args(softmax_scale=-0.1), ValueError, "softmax_scale"),
    (lambda: _paged_args(softmax_scale=float("inf")), ValueError, "softmax_scale"),
    (lambda: _paged_args(q=_randn(2, 0, 32)), ValueError, "q: expected at least one head"),
    (lambda: _paged_args(k_cache=_randn(6, 0, 2, 32), v_cache=_randn(6, 0, 2, 32),
                         context_lens=torch.zeros(2, dtype=torch.int32)), ValueError, "k_cache: .*block_size >= 1"),
    (lambda: _chunked_args(q=_randn(7, 0, 32)), ValueError, "q: expected at least one head"),
    (lambda: _paged_args(max_seqlen_q=1), ValueError, "max_seqlen_q"),
    (lambda: _chunked_args(cu_seqlens_q=torch.tensor([0, 4, 7])), TypeError, "cu_seqlens_q: expected dtype"),
    (lambda: _chunked_args(cu_seqlens_q=torch.tensor([0, 7], dtype=torch.int32)), ValueError,
     "cu_seqlens_q: expected shape"),
    (lambda: _chunked_args(cu_seqlens_q=torch.tensor([0, 4, 6], dtype=torch.int32)), ValueError,
     "cu_seqlens_q: .*do not cover"),
    (lambda: _chunked_args(cu_seqlens_q=torch.tensor([0, 5, 4], dtype=torch.int32)), ValueError,
     "cu_seqlens_q: .*non-decreasing"),
    (lambda: _chunked_args(q=_randn(12, 4, 32), cu_seqlens_q=torch.tensor([0, 2, 12], dtype=torch.int32)),
     ValueError, "cu_seqlens_q: sequence 1 has 10 query tokens but context_lens\\[1\\] = 9"),
    (lambda: _chunked_args(max_seqlen_q=3), ValueError, "max_seqlen_q: expected at least"),
]


def _on_cpu(args):
    """The bad-input cases run on CPU tensors: _randn makes its tensors on DEVICE (a GPU where there is one),
    the index tensors are CPU ones, and a device mismatch would be refused before the case's own error."""
    return {name: t.cpu() if torch.is_tensor(t) and t.device.type == "cuda" else t for name, t in args.items()}


@pytest.mark.parametrize("make_args, error, match", BAD_PAGED)
@pytest.mark.parametrize("backend", BACKENDS)
def test_paged_attention_bad_inputs(backend, make_args, error, match):
    require_backend(backend, "paged_attention", torch.device("cpu"))
    args = _on_cpu(make_args())
    with pytest.raises(error, match=match):
        paged_attention(**args, backend=backend)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("make_args", [_paged_args, lambda: _chunked_args(max_seqlen_q=4)], ids=["decode", "chunked"])
def test_paged_attention_ignores_unused_block_table_entries(backend, make_args):
    """Entries past a context's blocks are padding (here -1) and are neither validated nor read: the output
    equals the one with the padding replaced by a real block id."""
    require_backend(backend, "paged_attention")
    args = {name: t.to(DEVICE) if torch.is_tensor(t) else t for name, t in make_args().items()}
    with poison_allocations():
        out = paged_attention(**args, backend=backend)
    tables = args["block_tables"]
    filled = dict(args, block_tables=torch.where(tables < 0, 4, tables).to(tables.dtype))  # -1 -> unused block 4
    expected = paged_attention(**filled, backend="reference")
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)


def _large_group_case(group, head_dim, chunked, dtype, contexts=(41, 9)):
    """(q, k_cache, v_cache, block_tables, context_lens, cu_seqlens_q, q_seqs, k_seqs, v_seqs) for 2 kv heads of
    ``group`` query heads each: decode, or chunks of 3 and 1 queries."""
    query_lens = [3, 1] if chunked else [1, 1]
    k_seqs, v_seqs, k_cache, v_cache, block_tables = _paged_cache(contexts, 8, 2, head_dim, dtype)
    q_seqs = [_randn(n, 2 * group, head_dim, dtype=dtype) for n in query_lens]
    cu_seqlens_q = torch.tensor([0, *query_lens], device=DEVICE).cumsum(0).to(torch.int32) if chunked else None
    context_lens = torch.tensor(contexts, dtype=torch.int32, device=DEVICE)
    return torch.cat(q_seqs), k_cache, v_cache, block_tables, context_lens, cu_seqlens_q, q_seqs, k_seqs, v_seqs


@pytest.mark.parametrize("chunked", [False, True], ids=["decode", "chunked"])
@pytest.mark.parametrize("group", [17, 71])
@pytest.mark.parametrize("backend", BACKENDS)
def test_paged_attention_groups_larger_than_a_program(backend, group, chunked):
    """MQA-like groups of more query heads per kv head than one CUDA program takes (16, or 64: 71 is
    Falcon-7B's), and than the ratios above: every head of the group is computed."""
    require_backend(backend, "paged_attention")
    q, k_cache, v_cache, block_tables, context_lens, cu_seqlens_q, q_seqs, k_seqs, v_seqs = _large_group_case(
        group, 64, chunked, torch.float32)
    with poison_allocations():
        out = paged_attention(q, k_cache, v_cache, block_tables, context_lens, cu_seqlens_q=cu_seqlens_q,
                              backend=backend)
    expected = _paged_ref(q_seqs, k_seqs, v_seqs, upcast=True).float()
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)


gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("num_seqs, context", [(1, 32768), (4, 4096), (64, 1024)])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("backend", ["triton", "cuda"])
def test_gpu_paged_decode(backend, dtype, num_seqs, context):
    """The benchmark's decode shapes (GQA 32/8, head_dim 128, blocks of 16): one long context (split across
    programs) and a batch that alone fills the GPU (a single pass)."""
    require_backend(backend, "paged_attention", torch.device("cuda"))
    contexts = [context - 37 * (i % 16) for i in range(num_seqs)]  # uneven, the longest at the shape's length
    assert min(contexts) > 0
    k_seqs, v_seqs, k_cache, v_cache, block_tables = _paged_cache(contexts, 16, 8, 128, dtype)
    q = _randn(num_seqs, 32, 128, dtype=dtype)
    context_lens = torch.tensor(contexts, dtype=torch.int32, device=DEVICE)
    with poison_allocations():
        out = paged_attention(q, k_cache, v_cache, block_tables, context_lens, backend=backend)
    q_seqs = list(q[:, None])
    ref = _paged_ref(q_seqs, k_seqs, v_seqs, upcast=True)
    assert_close_2x(out, _paged_ref(q_seqs, k_seqs, v_seqs, upcast=False), ref)


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("head_dim", [64, 80, 128, 256])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("backend", ["triton", "cuda"])
def test_gpu_paged_chunked_prefill(backend, dtype, head_dim):
    """Prefix reuse and chunked prefill: chunks of 1 to 2048 queries over contexts up to 6000 tokens."""
    require_backend(backend, "paged_attention", torch.device("cuda"))
    contexts, query_lens = [6000, 2048, 513, 1, 3000], [512, 2048, 100, 1, 1]
    k_seqs, v_seqs, k_cache, v_cache, block_tables = _paged_cache(contexts, 16, 4, head_dim, dtype)
    q_seqs = [_randn(n, 16, head_dim, dtype=dtype) for n in query_lens]
    cu_seqlens_q = torch.tensor([0, *query_lens], device=DEVICE).cumsum(0).to(torch.int32)
    context_lens = torch.tensor(contexts, dtype=torch.int32, device=DEVICE)
    with poison_allocations():
        out = paged_attention(
            torch.cat(q_seqs), k_cache, v_cache, block_tables, context_lens, cu_seqlens_q=cu_seqlens_q,
            backend=backend,
        )
    ref = _paged_ref(q_seqs, k_seqs, v_seqs, upcast=True)
    assert_close_2x(out, _paged_ref(q_seqs, k_seqs, v_seqs, upcast=False), ref)


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("chunked", [False, True], ids=["decode", "chunked"])
@pytest.mark.parametrize("head_dim", [128, 256])
@pytest.mark.parametrize("group", [17, 32, 64, 71])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("backend", ["triton", "cuda"])
def test_gpu_paged_attention_groups_larger_than_a_program(backend, dtype, group, head_dim, chunked):
    """The CUDA kernel's 64-row programs (one per group of 17 to 64 heads, past 48 KB of shared memory at
    head_dim 256) and a group of 71 split over two; a 4000-token context is split across programs too."""
    require_backend(backend, "paged_attention", torch.device("cuda"))
    q, k_cache, v_cache, block_tables, context_lens, cu_seqlens_q, q_seqs, k_seqs, v_seqs = _large_group_case(
        group, head_dim, chunked, dtype, contexts=(4000, 9))
    with poison_allocations():
        out = paged_attention(q, k_cache, v_cache, block_tables, context_lens, cu_seqlens_q=cu_seqlens_q,
                              backend=backend)
    ref = _paged_ref(q_seqs, k_seqs, v_seqs, upcast=True)
    assert_close_2x(out, _paged_ref(q_seqs, k_seqs, v_seqs, upcast=False), ref)
