"""The forward kernel's tensor-descriptor (TMA) loads of K and V, against the reference.

On sm_90 the autotuner may pick descriptor loads for any call, so that path must be right wherever
it can run: here it is forced (use_tma=True) on the interpreter in CI and on the H100 in the gpu tests.
"""
import pytest
import torch
from llmfast_kernels.attention import attention_fwd

from helpers import DEVICE, assert_close_2x, attention_ref, poison_allocations

gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def _cu_seqlens(lengths, device=DEVICE):
    return torch.tensor([0, *lengths], device=device).cumsum(0).to(torch.int32)


def _dense(q, k, v, causal, use_tma):
    with poison_allocations():
        out, _ = attention_fwd(q, k, v, None, None, q.shape[1], k.shape[1], causal, q.shape[-1] ** -0.5, use_tma)
    return out


@pytest.mark.parametrize("seqlens", [(17, 17), (37, 53), (53, 37), (1, 100)])
@pytest.mark.parametrize("head_dim,heads", [(32, (2, 2)), (80, (4, 1)), (128, (4, 2))])
@pytest.mark.parametrize("causal", [False, True])
def test_tma_dense(causal, head_dim, heads, seqlens):
    (seqlen_q, seqlen_k), (nheads, nheads_kv) = seqlens, heads
    q = torch.randn(2, seqlen_q, nheads, head_dim, device=DEVICE)
    k, v = (torch.randn(2, seqlen_k, nheads_kv, head_dim, device=DEVICE) for _ in range(2))
    out = _dense(q, k, v, causal, use_tma=True)
    ref = attention_ref(q, k, v, causal=causal)
    torch.testing.assert_close(out, ref.float(), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_tma_dense_16bit(dtype):
    q = torch.randn(1, 70, 4, 64, dtype=dtype, device=DEVICE)
    k, v = (torch.randn(1, 90, 2, 64, dtype=dtype, device=DEVICE) for _ in range(2))
    out = _dense(q, k, v, True, use_tma=True)
    assert_close_2x(out, attention_ref(q, k, v, causal=True, upcast=False), attention_ref(q, k, v, causal=True))


@pytest.mark.parametrize("causal", [False, True])
def test_tma_varlen_ignores_rows_outside_the_sequence(causal):
    """A key tile crosses into the next sequence, and past the last one into rows of no sequence: NaN
    there must not reach any output (descriptor loads are not masked, the kernel masks them)."""
    lengths_q, lengths_k = [5, 1, 30, 17], [20, 53, 7, 17]
    q = torch.randn(sum(lengths_q), 4, 64, device=DEVICE)
    k, v = (torch.randn(sum(lengths_k) + 9, 2, 64, device=DEVICE) for _ in range(2))
    n = sum(lengths_k)
    k[n:], v[n:] = float("nan"), float("nan")
    with poison_allocations():
        out, _ = attention_fwd(q, k, v, _cu_seqlens(lengths_q), _cu_seqlens(lengths_k),
                               max(lengths_q), max(lengths_k), causal, 0.125, True)
    refs = [attention_ref(qi[None], ki[None], vi[None], causal=causal)[0]
            for qi, ki, vi in zip(q.split(lengths_q), k[:n].split(lengths_k), v[:n].split(lengths_k))]
    torch.testing.assert_close(out, torch.cat(refs).float(), atol=1e-5, rtol=1e-5)


def test_tma_refused_where_descriptors_cannot_read():
    q = torch.randn(1, 16, 2, 64, device=DEVICE)
    kv = torch.randn(1, 16, 3, 64, device=DEVICE)[:, :, :2]  # batch rows not one run: (16, 3, 64) strides
    kv_odd = torch.randn(1, 16, 2, 65, device=DEVICE)[..., :64]  # rows of 65 floats: unaligned strides
    broadcast = torch.randn(1, 1, 2, 64, device=DEVICE).expand(1, 16, 2, 64)  # row stride 0
    cases = [kv.expand(2, 16, 2, 64), kv_odd, broadcast]
    if torch.device(DEVICE).type == "cpu":  # a storage that starts 4 bytes past a 16-byte boundary (a GPU copy would not)
        buffer = bytearray(4 * (16 * 2 * 64 + 4))
        skip = (4 - torch.frombuffer(buffer, dtype=torch.float32).data_ptr() % 16) % 16 // 4
        unaligned = torch.frombuffer(buffer, dtype=torch.float32, offset=4 * skip, count=16 * 2 * 64)
        assert unaligned.data_ptr() % 16 == 4 and unaligned.storage_offset() == 0
        cases.append(unaligned.view(1, 16, 2, 64).normal_())
    for k in cases:
        with pytest.raises(ValueError, match="use_tma"):
            attention_fwd(q.expand(k.shape[0], -1, -1, -1), k, k, None, None, 16, 16, False, 0.125, True)
    # None (auto) falls back to pointer loads for the same tensors
    out, _ = attention_fwd(q, kv_odd, kv_odd, None, None, 16, 16, False, 0.125, None)
    torch.testing.assert_close(out, attention_ref(q, kv_odd, kv_odd).float(), atol=1e-5, rtol=1e-5)


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("use_tma", [True, False])
@pytest.mark.parametrize("head_dim", [64, 128, 256])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_gpu_tma_and_pointer_loads(dtype, causal, head_dim, use_tma):
    if torch.cuda.get_device_capability()[0] < 9:
        pytest.skip("tensor descriptor loads need sm_90")
    q = torch.randn(2, 2048, 16, head_dim, dtype=dtype, device="cuda")
    k, v = (torch.randn(2, 2048, 4, head_dim, dtype=dtype, device="cuda") for _ in range(2))
    out = _dense(q, k, v, causal, use_tma=use_tma)
    assert_close_2x(out, attention_ref(q, k, v, causal=causal, upcast=False), attention_ref(q, k, v, causal=causal))
