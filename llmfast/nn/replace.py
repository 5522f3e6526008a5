"""Swapping submodules in place: how llmfast.patch and the engine put llmfast modules into a model."""
from __future__ import annotations

from typing import Callable

from torch import nn


def replace_children(model: nn.Module, build: Callable[[nn.Module], nn.Module | None]) -> int:
    """Puts ``build(child)`` in place of every submodule of ``model`` for which it is not None; returns how
    many were replaced."""
    replaced = 0
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            new = build(child)
            if new is not None:
                setattr(parent, name, new)
                replaced += 1
    return replaced
