"""write_kv_cache (llmfast/ops/kv_cache.py; its kernels are in the paged family): every backend against an
explicit loop over the slots, the engine's write-then-attend path, caches it cannot write in place, and its
refused inputs."""
import pytest
import torch

from llmfast.ops import paged_attention, write_kv_cache
from helpers import BACKENDS, DEVICE, assert_close_2x, poison_allocations, require_backend
from paged_cases import BLOCK_SIZES, DTYPES, _paged_cache, _paged_ref, _randn, _write_args


@pytest.mark.parametrize("head_major", [False, True], ids=["slot_major", "head_major"])
@pytest.mark.parametrize("kv_heads", [1, 2, 8])
@pytest.mark.parametrize("block_size", BLOCK_SIZES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("backend", BACKENDS)
def test_write_kv_cache(backend, dtype, block_size, kv_heads, head_major):
    _check_write_kv_cache(backend, dtype, block_size, kv_heads, 64, head_major)


@pytest.mark.parametrize("head_dim, kv_heads", [(80, 3), (128, 8), (256, 2)])
@pytest.mark.parametrize("backend", BACKENDS)
def test_write_kv_cache_head_dims(backend, head_dim, kv_heads):
    _check_write_kv_cache(backend, torch.bfloat16, 16, kv_heads, head_dim, head_major=False)


def _check_write_kv_cache(backend, dtype, block_size, kv_heads, head_dim, head_major):
    require_backend(backend, "write_kv_cache")
    num_blocks, tokens = 64 // block_size + 3, 37
    k, v = _randn(tokens, kv_heads, head_dim, dtype=dtype), _randn(tokens, kv_heads, head_dim, dtype=dtype)
    slots = torch.randperm(num_blocks * block_size)[:tokens]
    slots[::5] = -1  # padding tokens: skipped
    slot_mapping = slots.to(DEVICE)
    if head_major:  # a strided view of the layout, written in place through its strides
        shape = (num_blocks, kv_heads, block_size, head_dim)
        k_cache = torch.full(shape, float("nan"), dtype=dtype, device=DEVICE).transpose(1, 2)
        v_cache = torch.full(shape, float("nan"), dtype=dtype, device=DEVICE).transpose(1, 2)
    else:
        k_cache = torch.full((num_blocks, block_size, kv_heads, head_dim), float("nan"), dtype=dtype, device=DEVICE)
        v_cache = torch.full_like(k_cache, float("nan"))
    k_expected, v_expected = k_cache.clone(), v_cache.clone()
    for t, slot in enumerate(slots.tolist()):
        if slot != -1:
            k_expected[slot // block_size, slot % block_size] = k[t]
            v_expected[slot // block_size, slot % block_size] = v[t]

    assert write_kv_cache(k, v, k_cache, v_cache, slot_mapping, backend=backend) is None
    torch.testing.assert_close(k_cache, k_expected, rtol=0, atol=0, equal_nan=True)
    torch.testing.assert_close(v_cache, v_expected, rtol=0, atol=0, equal_nan=True)


@pytest.mark.parametrize("backend", BACKENDS)
def test_write_then_attend(backend):
    """The engine's path: write the new tokens with write_kv_cache, then decode over the cache."""
    require_backend(backend, "write_kv_cache")
    require_backend(backend, "paged_attention")
    block_size, contexts = 16, [5, 40]
    k_seqs, v_seqs, k_cache, v_cache, block_tables = _paged_cache([4, 39], block_size, 2, 64, torch.float32)
    new_k, new_v = _randn(2, 2, 64), _randn(2, 2, 64)
    slots = [int(block_tables[i, (n - 1) // block_size]) * block_size + (n - 1) % block_size
             for i, n in enumerate(contexts)]
    write_kv_cache(new_k, new_v, k_cache, v_cache, torch.tensor(slots, device=DEVICE), backend=backend)
    q = _randn(2, 4, 64)
    context_lens = torch.tensor(contexts, dtype=torch.int32, device=DEVICE)
    with poison_allocations():
        out = paged_attention(q, k_cache, v_cache, block_tables, context_lens, backend=backend)
    k_seqs = [torch.cat([k_seqs[i], new_k[i : i + 1]]) for i in range(2)]
    v_seqs = [torch.cat([v_seqs[i], new_v[i : i + 1]]) for i in range(2)]
    q_seqs = [q[i : i + 1] for i in range(2)]
    ref = _paged_ref(q_seqs, k_seqs, v_seqs, upcast=True)
    assert_close_2x(out, _paged_ref(q_seqs, k_seqs, v_seqs, upcast=False), ref, slack_ulps=16.0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_moving_tokens_within_the_cache_reads_them_before_writing(backend):
    """k and v that are views of the caches' own slots (moving cached tokens): every backend as the reference,
    which reads k and v whole before writing. The kernels read slots they had already overwritten."""
    require_backend(backend, "write_kv_cache")
    k_cache, v_cache = torch.randn(3, 4, 2, 8, device=DEVICE), torch.randn(3, 4, 2, 8, device=DEVICE)
    k_slots, v_slots = k_cache.view(12, 2, 8), v_cache.view(12, 2, 8)
    expected_k, expected_v = k_slots.clone(), v_slots.clone()
    expected_k[1:5], expected_v[1:5] = k_slots[0:4], v_slots[2:6]  # one slot on, and one slot back
    write_kv_cache(k_slots[0:4], v_slots[2:6], k_cache, v_cache, torch.tensor([1, 2, 3, 4], device=DEVICE),
                   backend=backend)
    torch.testing.assert_close(k_slots, expected_k, rtol=0, atol=0)
    torch.testing.assert_close(v_slots, expected_v, rtol=0, atol=0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_caches_that_cannot_be_written_in_place_are_refused(backend):
    """A cache that requires grad, or an inference tensor outside inference mode: the reference's in-place
    write raised torch's RuntimeError while the kernels wrote silently; now every backend names the cache."""
    require_backend(backend, "write_kv_cache")
    args = {name: t.to(DEVICE) for name, t in _write_args().items()}
    with pytest.raises(ValueError, match="k_cache: a KV cache written in place cannot require grad"):
        write_kv_cache(**dict(args, k_cache=args["k_cache"].clone().requires_grad_()), backend=backend)
    with torch.inference_mode():
        v_cache = args["v_cache"].clone()
    with pytest.raises(ValueError, match="v_cache: an inference-mode tensor is written only inside"):
        write_kv_cache(**dict(args, v_cache=v_cache), backend=backend)
    with torch.inference_mode():
        write_kv_cache(**dict(args, v_cache=v_cache), backend=backend)  # inside it, as the engine writes


BAD_WRITES = [
    (lambda: _write_args(k=_randn(5, 64)), ValueError, "k: expected 3 dims"),
    (lambda: _write_args(k=_randn(5, 2, 32).long()), TypeError, "k: expected dtype"),
    (lambda: _write_args(v=_randn(5, 2, 16)), ValueError, "v: expected shape"),
    (lambda: _write_args(v=_randn(5, 2, 32, dtype=torch.float16)), TypeError, "v: expected dtype"),
    (lambda: _write_args(k_cache=_randn(4, 8, 2, 16)), ValueError, "k_cache: expected shape"),
    (lambda: _write_args(k_cache=_randn(4, 8, 32)), ValueError, "k_cache: expected shape"),
    (lambda: _write_args(v_cache=_randn(4, 8, 2, 32, dtype=torch.bfloat16)), TypeError, "v_cache: expected dtype"),
    (lambda: _write_args(v_cache=_randn(5, 8, 2, 32)), ValueError, "v_cache: expected shape"),
    (lambda: _write_args(k_cache=_randn(4, 8, 2, 32).to("meta")), ValueError, "k_cache: expected a tensor on"),
    (lambda: _write_args(slot_mapping=torch.tensor([0, 3, -1, 31, 8], dtype=torch.int32)), TypeError,
     "slot_mapping: expected dtype"),
    (lambda: _write_args(slot_mapping=torch.tensor([0, 3, 31, 8])), ValueError, "slot_mapping: expected shape"),
    (lambda: _write_args(slot_mapping=torch.tensor([0, 3, -1, 32, 8])), ValueError, "slot_mapping: expected slots"),
    (lambda: _write_args(slot_mapping=torch.tensor([0, 3, -2, 31, 8])), ValueError, "slot_mapping: expected slots"),
    (lambda: _write_args(k_cache=_randn(4, 0, 2, 32), v_cache=_randn(4, 0, 2, 32),
                         slot_mapping=torch.full((5,), -1)), ValueError, "k_cache: .*block_size >= 1"),
]


@pytest.mark.parametrize("make_args, error, match", BAD_WRITES)
@pytest.mark.parametrize("backend", BACKENDS)
def test_write_kv_cache_bad_inputs(backend, make_args, error, match):
    require_backend(backend, "write_kv_cache", torch.device("cpu"))
    # on CPU tensors: _randn makes them on DEVICE (a GPU where there is one) and slot_mapping on the CPU, and a
    # device mismatch would be refused before the case's own error
    args = {name: t.cpu() if torch.is_tensor(t) and t.device.type == "cuda" else t for name, t in make_args().items()}
    with pytest.raises(error, match=match):
        write_kv_cache(**args, backend=backend)


gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("backend", ["triton", "cuda"])
def test_gpu_write_kv_cache(backend, dtype):
    """A decode step's worth of writes (256 tokens, 8 kv heads, head_dim 128) into a 4096-block cache."""
    require_backend(backend, "write_kv_cache", torch.device("cuda"))
    num_blocks, block_size = 4096, 16
    k, v = _randn(256, 8, 128, dtype=dtype), _randn(256, 8, 128, dtype=dtype)
    slots = torch.randperm(num_blocks * block_size, device=DEVICE)[:256]
    slots[::7] = -1
    k_cache = torch.full((num_blocks, block_size, 8, 128), float("nan"), dtype=dtype, device=DEVICE)
    v_cache = torch.full_like(k_cache, float("nan"))
    k_expected, v_expected = k_cache.clone(), v_cache.clone()
    write_kv_cache(k, v, k_expected, v_expected, slots, backend="reference")
    write_kv_cache(k, v, k_cache, v_cache, slots, backend=backend)
    torch.testing.assert_close(k_cache, k_expected, rtol=0, atol=0, equal_nan=True)
    torch.testing.assert_close(v_cache, v_expected, rtol=0, atol=0, equal_nan=True)
