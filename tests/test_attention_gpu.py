"""attention on a CUDA GPU at real sizes in bf16/fp16 (Triton, forward and backward, against float64 SDPA
with the 2x-error rule): head dims 64-256 and padded ones, GQA with more keys than queries, varlen."""
import pytest
import torch

from llmfast.ops.attention import attention
from helpers import attention_ref, require_backend
from attention_cases import _check_grads, _varlen_ref


gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def _gpu_randn(*shape, dtype):
    return torch.randn(*shape, dtype=dtype, device="cuda")


def _check_dense(q_shape, kv_shape, dtype, causal):
    """Triton's output and gradients on fresh q (q_shape), k, v (kv_shape) against the reference."""
    require_backend("triton", "attention", torch.device("cuda"))
    q, k, v = _gpu_randn(*q_shape, dtype=dtype), _gpu_randn(*kv_shape, dtype=dtype), _gpu_randn(*kv_shape, dtype=dtype)
    _check_grads(
        lambda q, k, v: attention(q, k, v, causal=causal, backend="triton"),
        lambda q, k, v, upcast=True: attention_ref(q, k, v, causal=causal, upcast=upcast),
        q, k, v, _gpu_randn(*q_shape, dtype=torch.float32),
    )


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("head_dim", [64, 128, 256])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_gpu_attention_dense(dtype, causal, head_dim):
    _check_dense((2, 2048, 16, head_dim), (2, 2048, 16, head_dim), dtype, causal)


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("head_dim, causal", [(80, True), (96, False), (192, True)])
def test_gpu_attention_padded_head_dims(head_dim, causal):
    """Head dims the kernels pad to a power of two, on the tensor cores in bf16, with GQA 8."""
    _check_dense((2, 1024, 16, head_dim), (2, 1024, 2, head_dim), torch.bfloat16, causal)


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_gpu_attention_gqa_cross(dtype, causal):
    """GQA 32/8 with more keys than queries (bottom-right causal), as in chunked prefill."""
    _check_dense((2, 1000, 32, 128), (2, 3000, 8, 128), dtype, causal)


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
