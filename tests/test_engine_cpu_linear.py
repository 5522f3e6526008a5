"""The CPU engine's linear layers: ``TransposedLinear`` computes what ``nn.Linear`` does."""
import pytest
import torch
from torch import nn

from llmfast.engine.cpu_linear import TransposedLinear, transpose_linears
from llmfast.nn.quant_linear import QuantLinear


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("shape", [(1, 48), (7, 48), (2, 5, 48)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_transposed_linear_matches_linear(bias, shape, dtype):
    linear = nn.Linear(48, 80, bias=bias, dtype=dtype)
    layer = TransposedLinear(linear)
    x = torch.randn(shape, dtype=dtype)
    assert layer.weight_t.shape == (48, 80) and layer.weight_t.is_contiguous()
    out = layer(x)
    assert out.shape == (*shape[:-1], 80) and out.dtype == dtype
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(out, linear(x).detach(), **tol)


def test_transpose_linears_swaps_plain_linears_only():
    class Tied(nn.Module):
        def __init__(self):
            super().__init__()
            self.embed = nn.Embedding(50, 16)
            self.proj = nn.Linear(16, 16)
            self.quant = QuantLinear.from_linear(nn.Linear(128, 16), bits=8, group_size=-1)
            self.head = nn.Linear(16, 50, bias=False)
            self.head.weight = self.embed.weight

    model = Tied()
    x = torch.randn(3, 16)
    expected = model.head(model.proj(x)).detach()
    transpose_linears(model)
    assert isinstance(model.proj, TransposedLinear) and isinstance(model.head, TransposedLinear)
    assert isinstance(model.quant, QuantLinear)
    torch.testing.assert_close(model.head(model.proj(x)), expected)
    # the tied head got its own copy: the embedding still looks tokens up
    torch.testing.assert_close(model.head.weight_t, model.embed.weight.detach().t())
