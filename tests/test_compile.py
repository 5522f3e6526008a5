"""torch.compile(fullgraph=True) over llmfast modules: the ops are custom ops with fake kernels."""
import pytest
import torch

import llmfast
from helpers import require_backend


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
