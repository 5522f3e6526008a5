"""Which device a model runs on, checked before anything is allocated there."""
from __future__ import annotations

import contextlib

import torch


def resolve_device(device: str | torch.device, name: str = "device") -> torch.device:
    """``"auto"`` (a CUDA GPU when one is visible, else the CPU), ``"cpu"``, ``"cuda"`` or ``"cuda:N"``, or a
    torch.device of those; a ValueError naming ``name`` for anything else or for a GPU this machine lacks.
    A GPU comes back with its index (``"cuda"``: the current one), so that work done later from another
    thread, whose current GPU is 0, still goes to it (``on_device``)."""
    if isinstance(device, str) and device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(device)
    except (RuntimeError, TypeError):
        raise ValueError(f"{name}: expected 'auto', 'cpu', 'cuda' or a torch.device, got {device!r}") from None
    if device.type not in ("cpu", "cuda"):
        raise ValueError(f"{name}: llmfast models run on cpu or cuda, got {device}")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"{name}: {device} was asked for, but no CUDA GPU is available")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise ValueError(f"{name}: {device} was asked for, but only {torch.cuda.device_count()} GPU(s) are visible")
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    return device


def on_device(device: torch.device) -> contextlib.AbstractContextManager:
    """Makes ``device`` the current GPU inside (a no-op on the CPU): Triton launches its kernels and
    torch.cuda.graph captures on the current GPU, whatever device the tensors live on."""
    return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()
