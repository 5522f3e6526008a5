"""The C++ CPU paged attention op's copies per instruction set (AVX-512, AVX2, the SSE baseline), called directly
with ``isa``: ``backend="cpu"`` runs only the widest copy this CPU has, and each copy has its own score sums
(csrc/cpu/hsum.h) and vector widths. Shapes cover every kv-head group block (4, 2, 1 rows), head dims that are
and are not multiples of each width, steps of 16 keys that cross blocks and contexts that end mid-step."""
import pytest
import torch

from helpers import assert_close_2x, poison_allocations, require_backend
from paged_cases import _int32, _paged_cache, _paged_ref, _randn

ISAS = ["avx512", "avx2", "baseline"]
SLACK_ULPS = {torch.float16: 1.0, torch.bfloat16: 1.0, torch.float32: 16.0}
# (heads, kv_heads, head_dim): groups 1, 2, 3 (2 + 1 rows), 4, 7 (4 + 2 + 1 rows); head dims 40 and 18 leave
# a tail past the last whole vector of 16 lanes (40, 18), of 8 (18) and of 4 (18)
SHAPES = [(2, 2, 64), (8, 4, 64), (6, 2, 40), (8, 2, 128), (7, 1, 18), (4, 4, 256)]


@pytest.fixture(autouse=True)
def _cpu_backend():
    require_backend("cpu", "paged_attention", torch.device("cpu"))


def _run(isa, q, k_cache, v_cache, block_tables, contexts, cu_seqlens_q):
    try:
        with poison_allocations():  # an output element left unwritten shows up as NaN
            return torch.ops.llmfast.paged_attention_cpu(q, k_cache, v_cache, block_tables, _int32(*contexts),
                                                         cu_seqlens_q, q.shape[-1] ** -0.5, isa)
    except RuntimeError as exc:
        if "which this CPU lacks" in str(exc):
            pytest.skip(str(exc))
        raise


@pytest.mark.parametrize("threads", [1, 4])
@pytest.mark.parametrize("shape", SHAPES, ids=[f"{h}-{kv}-d{d}" for h, kv, d in SHAPES])
@pytest.mark.parametrize("block_size", [5, 16])
@pytest.mark.parametrize("chunked", [False, True], ids=["decode", "chunked_prefill"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("isa", ISAS)
def test_every_instruction_set(isa, dtype, chunked, block_size, shape, threads):
    """Contexts of 1, 15, 16, 17 and 70 tokens (inside one step, ending on a step, crossing steps), with 1
    thread (whole sequences per task) and 4 (decode split by kv head, one sequence per thread or fewer)."""
    heads, kv_heads, head_dim = shape
    contexts = [1, 15, 16, 17, 70]
    k_seqs, v_seqs, k_cache, v_cache, block_tables = _paged_cache(contexts, block_size, kv_heads, head_dim, dtype)
    query_lens = [1, 15, 3, 17, 36] if chunked else [1] * len(contexts)
    q_seqs = [_randn(n, heads, head_dim, dtype=dtype) for n in query_lens]
    cu_seqlens_q = _int32(0, *query_lens).cumsum(0).to(torch.int32) if chunked else None
    saved = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        out = _run(isa, torch.cat(q_seqs), k_cache, v_cache, block_tables, contexts, cu_seqlens_q)
    finally:
        torch.set_num_threads(saved)
    assert out.dtype == dtype and out.shape == (sum(query_lens), heads, head_dim)
    ref = _paged_ref(q_seqs, k_seqs, v_seqs, upcast=True)
    peer = _paged_ref(q_seqs, k_seqs, v_seqs, upcast=False)
    assert_close_2x(out, peer, ref, slack_ulps=SLACK_ULPS[dtype])


@pytest.mark.parametrize("isa", ISAS)
def test_empty_context_outputs_zero(isa):
    contexts = [0, 33]
    _, _, k_cache, v_cache, block_tables = _paged_cache(contexts, 16, 2, 64, torch.float32)
    out = _run(isa, _randn(2, 4, 64), k_cache, v_cache, block_tables, contexts, None)
    assert torch.equal(out[0], torch.zeros_like(out[0])) and out[1].isfinite().all()


@pytest.mark.parametrize("chunked", [False, True], ids=["decode", "chunked_prefill"])
@pytest.mark.parametrize("isa", ISAS)
def test_no_sequences(isa, chunked):
    """An empty batch returns an empty output (the decode split once divided by the number of sequences)."""
    _, _, k_cache, v_cache, _ = _paged_cache([3], 16, 2, 64, torch.float32)
    block_tables = torch.zeros(0, 2, dtype=torch.int32)
    out = _run(isa, _randn(0, 4, 64), k_cache, v_cache, block_tables, [], _int32(0) if chunked else None)
    assert out.shape == (0, 4, 64)


def test_unknown_instruction_set_is_refused():
    _, _, k_cache, v_cache, block_tables = _paged_cache([3], 16, 2, 64, torch.float32)
    with pytest.raises(RuntimeError, match="isa must be"):
        _run("sse9", _randn(1, 4, 64), k_cache, v_cache, block_tables, [3], None)


def test_fp16_rows_widen_inside_the_kernel_copies():
    """csrc/cpu/paged_steps.h's widen_half16/8 cannot be forced inline (they carry target options that load_vec
    lacks); GCC inlines them into the AVX-512 and AVX2 copies, where a call per 16 or 8 values would cost more
    than the conversion. An out-of-line copy of either would show up as a symbol of llmfast._C."""
    import shutil
    import subprocess

    import llmfast._C

    if shutil.which("nm") is None:
        pytest.skip("nm (binutils) is not installed")
    symbols = subprocess.run(["nm", "-C", llmfast._C.__file__], capture_output=True, text=True, check=True).stdout
    assert "paged_attention_cpu" in symbols  # the listing is of the right library
    assert "widen_half" not in symbols
