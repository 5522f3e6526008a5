"""Loads the compiled extensions once; a missing one leaves its backend out instead of failing import."""
from __future__ import annotations

import importlib

import torch

_errors: dict[str, str | None] = {}


def _load(module: str) -> bool:
    if module not in _errors:
        try:
            importlib.import_module(module)
            _errors[module] = None
        except (ImportError, OSError) as exc:  # not built, or built against another torch
            _errors[module] = f"{type(exc).__name__}: {exc}"
    return _errors[module] is None


def cpu_loaded() -> bool:
    return _load("llmfast._C")


def cuda_loaded() -> bool:
    return _load("llmfast._C_cuda")


def cpu_error() -> str | None:
    cpu_loaded()
    return _errors["llmfast._C"]


def cuda_error() -> str | None:
    cuda_loaded()
    return _errors["llmfast._C_cuda"]


def has_op(name: str) -> bool:
    """Whether ``torch.ops.llmfast.<name>`` is registered (after loading whatever extensions exist)."""
    cpu_loaded()
    cuda_loaded()
    return hasattr(torch.ops.llmfast, name)
