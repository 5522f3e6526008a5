"""Inputs and checks shared by the quant_matmul tests (test_quant*.py): the dtypes, random tensors, and the
2x rule against float64 x @ w.dequantize().T."""
import torch
import torch.nn.functional as F

from helpers import DEVICE, assert_close_2x

DTYPES = [torch.float16, torch.bfloat16, torch.float32]


def _randn(*shape, dtype=torch.float32):
    return torch.randn(*shape, dtype=dtype, device=DEVICE)


def _check_matmul(y, x, qw, bias):
    """``y`` against float64 ``x @ w.dequantize().T (+ bias)``, by the 2x rule against torch in x.dtype."""
    assert y.dtype == x.dtype and y.shape == (x.shape[0], qw.shape[0])
    w = qw.dequantize()
    ref = F.linear(x.double(), w.double(), None if bias is None else bias.double())
    assert_close_2x(y, F.linear(x, w, bias), ref, slack_ulps=1.0 if x.dtype != torch.float32 else 16.0)
