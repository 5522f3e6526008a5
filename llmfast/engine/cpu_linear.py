"""Linear layers laid out for CPU inference.

On the CPU benchmark (``benchmarks/bench_throughput.py``: 32 requests on a 512-wide float32 Llama, one
thread) every ``nn.Linear`` of the engine's model stored as ``(in_features, out_features)`` and run as
``x @ W`` took the whole run from 7.4 s to 4.7 s with the same greedy tokens. torch's ``F.linear`` hands
MKL an ``(out, in)`` weight to multiply transposed, which costs most at the few rows of a decode step
(12.7 ms against 7.1 ms for a one-row step through all of that model's weights).
"""
from __future__ import annotations

import torch
from torch import nn


class TransposedLinear(nn.Module):
    """``nn.Linear`` for inference with its weight kept transposed: ``(in_features, out_features)``, contiguous."""

    def __init__(self, linear: nn.Linear):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.register_buffer("weight_t", linear.weight.detach().t().contiguous())
        self.register_buffer("bias", None if linear.bias is None else linear.bias.detach().clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, self.in_features)
        out = torch.mm(flat, self.weight_t) if self.bias is None else torch.addmm(self.bias, flat, self.weight_t)
        return out.reshape(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"


def transpose_linears(model: nn.Module) -> None:
    """Swaps every plain ``nn.Linear`` of ``model`` (not subclasses, not quantized ones) for a ``TransposedLinear``.
    An output head tied to the embedding gets its own transposed copy (``vocab x hidden`` more memory)."""
    for module in list(model.modules()):
        for name, child in list(module.named_children()):
            if type(child) is nn.Linear:
                setattr(module, name, TransposedLinear(child))
