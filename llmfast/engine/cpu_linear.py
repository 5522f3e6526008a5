"""Linear layers of the engine's model on CPU: float32 weights packed for the C++ ``packed_linear_cpu``.

MKL's float32 GEMM (behind ``F.linear``) runs far below this CPU's multiply-add rate at the few rows of a
decode step. ``benchmarks/results/cpu_linear.json`` (one core of the 2-core AMD EPYC CI machine, cold
weights): the 32000 x 512 output head of the CPU throughput benchmark took 13.0 ms at 8 rows and 32.7 ms
at 32 with ``F.linear``, 4.8 and 12.0 ms packed; at 1024 rows packed ranges from 7% slower to 15% faster.
"""
from __future__ import annotations

import torch
from torch import nn

from llmfast import _ext
from llmfast.nn.replace import replace_children

PANEL_COLS = 32  # kPanelCols of csrc/cpu/packed_linear.cpp


def pack_weight(weight: torch.Tensor) -> torch.Tensor:
    """``(N, K)`` -> ``(ceil(N / 32), K, 32)`` column panels, zero past ``N``: ``packed[p, k, j] = weight[32p + j, k]``."""
    n, k = weight.shape
    panels = -(-n // PANEL_COLS)
    padded = weight.new_zeros(panels * PANEL_COLS, k)
    padded[:n] = weight
    return padded.view(panels, PANEL_COLS, k).transpose(1, 2).contiguous()


class PackedLinear(nn.Module):
    """``nn.Linear`` for float32 CPU inference, its weight held as ``pack_weight`` panels."""

    def __init__(self, linear: nn.Linear):
        super().__init__()
        if linear.weight.dtype != torch.float32 or linear.weight.device.type != "cpu":
            raise TypeError(f"linear: PackedLinear needs a float32 CPU weight, got {linear.weight.dtype} "
                            f"on {linear.weight.device}")
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.register_buffer("packed", pack_weight(linear.weight.detach()))
        self.register_buffer("bias", None if linear.bias is None else linear.bias.detach().contiguous().clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, self.in_features).contiguous()
        out = torch.ops.llmfast.packed_linear_cpu(flat, self.packed, self.out_features, self.bias)
        return out.reshape(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"


def pack_linears(model: nn.Module) -> int:
    """Swaps every plain float32 ``nn.Linear`` of ``model`` (not subclasses, not quantized ones) for a
    ``PackedLinear``, when the C++ extension is built; returns how many. An output head tied to the
    embedding gets its own packed copy (``vocab x hidden`` more memory)."""
    if not _ext.has_op("packed_linear_cpu"):
        return 0

    def build(child: nn.Module) -> PackedLinear | None:
        plain = type(child) is nn.Linear and child.weight.dtype == torch.float32 and child.weight.device.type == "cpu"
        return PackedLinear(child) if plain else None

    return replace_children(model, build)
