"""attention's refused inputs: every backend raises a ValueError or TypeError naming the argument, dense and
varlen; the Triton launcher refuses batches past the CUDA grid limit before any launch."""
import pytest
import torch

from llmfast.ops.attention import attention
from helpers import BACKENDS, require_backend
from attention_cases import _cu_seqlens, _randn, _varlen_args


def _dense_args(**changes):
    args = dict(q=_randn(2, 5, 4, 32), k=_randn(2, 7, 2, 32), v=_randn(2, 7, 2, 32))
    return {**args, **changes}


BAD_INPUTS = [
    (lambda: _dense_args(q=_randn(5, 4, 32)), ValueError, "q: expected 4 dims"),
    (lambda: _dense_args(q=_randn(2, 5, 4, 32).long()), TypeError, "q: expected dtype"),
    (lambda: _dense_args(k="k"), TypeError, "k: expected a torch.Tensor"),
    (lambda: _dense_args(k=_randn(2, 7, 2, 32, dtype=torch.float16)), TypeError, "k: expected dtype"),
    (lambda: _dense_args(k=_randn(2, 7, 2, 32).to("meta")), ValueError, "k: expected a tensor on"),
    (lambda: _dense_args(k=_randn(2, 7, 2, 16), v=_randn(2, 7, 2, 16)), ValueError, "k: expected shape"),
    (lambda: _dense_args(k=_randn(3, 7, 2, 32), v=_randn(3, 7, 2, 32)), ValueError, "k: expected shape"),
    (lambda: _dense_args(v=_randn(2, 6, 2, 32)), ValueError, "v: expected shape"),
    (lambda: _dense_args(k=_randn(2, 7, 3, 32), v=_randn(2, 7, 3, 32)), ValueError, "q: .*divisible"),
    (lambda: _dense_args(q=_randn(2, 5, 4, 512), k=_randn(2, 7, 2, 512), v=_randn(2, 7, 2, 512)),
     ValueError, "q: expected head_dim"),
    (lambda: _dense_args(softmax_scale=0.0), ValueError, "softmax_scale"),
    (lambda: _dense_args(softmax_scale=-1.0), ValueError, "softmax_scale"),
    (lambda: _dense_args(softmax_scale=float("inf")), ValueError, "softmax_scale"),
    (lambda: _dense_args(softmax_scale=float("nan")), ValueError, "softmax_scale"),
    (lambda: _dense_args(q=_randn(2, 5, 0, 32)), ValueError, "q: expected at least one head"),
    (lambda: _dense_args(softmax_scale="0.1"), TypeError, "softmax_scale"),
    (lambda: _dense_args(causal=1), TypeError, "causal"),
    (lambda: _dense_args(max_seqlen_q=5), ValueError, "max_seqlen_q"),
    (lambda: _varlen_args(q=_randn(1, 6, 4, 32)), ValueError, "q: expected 3 dims"),
    (lambda: _varlen_args(cu_seqlens_k=None), ValueError, "cu_seqlens_k"),
    (lambda: _varlen_args(cu_seqlens_q=None), ValueError, "cu_seqlens_q"),
    (lambda: _varlen_args(cu_seqlens_q=_cu_seqlens([2, 4]).long()), TypeError, "cu_seqlens_q: expected dtype"),
    (lambda: _varlen_args(cu_seqlens_q=_cu_seqlens([2, 4])[None]), ValueError, "cu_seqlens_q: expected 1 dims"),
    (lambda: _varlen_args(cu_seqlens_q=_cu_seqlens([2, 4]) + 1), ValueError, "cu_seqlens_q: expected to start"),
    (lambda: _varlen_args(cu_seqlens_q=_cu_seqlens([4, -2, 4])), ValueError, "cu_seqlens_q: .*non-decreasing"),
    (lambda: _varlen_args(cu_seqlens_q=_cu_seqlens([2, 3])), ValueError, "cu_seqlens_q: .*do not cover"),
    (lambda: _varlen_args(cu_seqlens_k=_cu_seqlens([4, 6])), ValueError, "cu_seqlens_k: .*do not cover"),
    (lambda: _varlen_args(cu_seqlens_k=_cu_seqlens([4, 2, 3])), ValueError, "cu_seqlens_k: expected shape"),
    (lambda: _varlen_args(max_seqlen_q=3), ValueError, "max_seqlen_q: expected at least"),
    (lambda: _varlen_args(max_seqlen_k=5.0), TypeError, "max_seqlen_k"),
]


@pytest.mark.parametrize("make_args, error, match", BAD_INPUTS)
@pytest.mark.parametrize("backend", BACKENDS)
def test_attention_bad_inputs(backend, make_args, error, match):
    require_backend(backend, "attention")
    with pytest.raises(error, match=match):
        attention(**make_args(), backend=backend)


def test_triton_batches_past_the_grid_limit_are_refused():
    """The kernels' grid z size is the batch, at most 65535 on CUDA (checked before any launch)."""
    from llmfast_kernels.attention import MAX_GRID_YZ, launch_shape

    q = torch.empty(MAX_GRID_YZ + 1, 1, 1, 16)
    with pytest.raises(ValueError, match="q: the Triton kernels take at most 65535 sequences"):
        launch_shape(q, q, None, 1, 1)
    cu_seqlens = torch.arange(MAX_GRID_YZ + 2, dtype=torch.int32)
    with pytest.raises(ValueError, match="cu_seqlens_q: the Triton kernels take at most 65535 sequences"):
        launch_shape(q[:, 0], q[:, 0], cu_seqlens, 1, 1)
    assert launch_shape(q[:MAX_GRID_YZ], q[:MAX_GRID_YZ], None, 1, 1)[0] == MAX_GRID_YZ
