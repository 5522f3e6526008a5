"""Backend registry: which implementations of each op exist, which can run here, and which one to call.

Every public op in ``llmfast.ops`` validates its inputs and then calls ``select(op, backend, device)``
once; kernels never pick backends or read the environment themselves (how much the Triton autotuners
search is set here too, from LLMFAST_AUTOTUNE).
"""
from __future__ import annotations

import importlib.util
import os
import warnings
from typing import Callable

import torch

from llmfast import _ext

BACKENDS = ("triton", "cuda", "cpu", "reference")
ENV_VAR = "LLMFAST_BACKEND"
AUTOTUNE_ENV_VAR = "LLMFAST_AUTOTUNE"  # "all" (default) or "first": see kernels/tuning.py


class BackendUnavailable(RuntimeError):
    """The requested backend cannot run this op here (missing extension, no GPU, no Triton)."""


# op name -> backend -> (implementation, torch.ops.llmfast op it needs or None); insertion order is
# the preference order that "auto" follows.
_REGISTRY: dict[str, dict[str, tuple[Callable, str | None]]] = {}


def register(op: str, backend: str, *, needs: str | None = None) -> Callable[[Callable], Callable]:
    """Decorator: ``fn`` implements ``op`` on ``backend``; ``needs`` names the compiled op it calls."""
    if backend not in BACKENDS:
        raise ValueError(f"backend: expected one of {BACKENDS}, got {backend!r}")

    def decorate(fn: Callable) -> Callable:
        _REGISTRY.setdefault(op, {})[backend] = (fn, needs)
        return fn

    return decorate


# find_spec walks sys.path (~30 us) and this is asked on every op call that considers triton, so it is
# asked once, at import (a plain bool, which torch.compile traces through without a warning).
_TRITON_INSTALLED = importlib.util.find_spec("triton") is not None


def _triton_installed() -> bool:
    return _TRITON_INSTALLED


def _triton_interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def _missing(op: str, backend: str, device: torch.device | None) -> str | None:
    """Why ``backend`` cannot run ``op`` on ``device`` (None: any device here), or None if it can."""
    impls = _REGISTRY.get(op, {})
    if backend not in impls:
        have = ", ".join(impls) or "none"
        return f"llmfast has no {backend!r} implementation of {op} (it has: {have})"
    needs = impls[backend][1]
    if backend == "triton":
        if not _triton_installed():
            return "the triton package is not installed"
        on_cpu = device is not None and device.type == "cpu"
        if on_cpu and not _triton_interpreting():
            return "triton runs on CPU tensors only under TRITON_INTERPRET=1"
        if device is None and not (torch.cuda.is_available() or _triton_interpreting()):
            return "triton needs a CUDA GPU (or TRITON_INTERPRET=1 for CPU tensors)"
        if device is not None and device.type not in ("cpu", "cuda"):
            return f"triton does not run on {device.type} tensors"
    elif backend == "cuda":
        if not _ext.cuda_loaded():
            return f"the CUDA extension llmfast._C_cuda is not built ({_ext.cuda_error()})"
        if not torch.cuda.is_available():
            return "no CUDA GPU is available"
        if device is not None and device.type != "cuda":
            return f"the cuda backend needs CUDA tensors, got {device.type} tensors"
    elif backend == "cpu":
        if not _ext.cpu_loaded():
            return f"the C++ extension llmfast._C is not built ({_ext.cpu_error()})"
        if device is not None and device.type != "cpu":
            return f"the cpu backend needs CPU tensors, got {device.type} tensors"
    if needs is not None and not _ext.has_op(needs):
        return f"the compiled extension lacks torch.ops.llmfast.{needs}"
    return None


def available_backends(op_name: str) -> list[str]:
    """Backends that can run ``op_name`` on this machine, in the order "auto" prefers them."""
    if op_name not in _REGISTRY:
        raise ValueError(f"op_name: unknown op {op_name!r}; known ops: {sorted(_REGISTRY)}")
    return [b for b in _REGISTRY[op_name] if _missing(op_name, b, None) is None]


def _auto(op: str, device: torch.device) -> str:
    for backend in _REGISTRY[op]:
        # The interpreter is a test vehicle, orders of magnitude slower than the C++ or reference path.
        if backend == "triton" and device.type == "cpu":
            continue
        if _missing(op, backend, device) is None:
            return backend
    return "reference"


def resolve(op: str, backend: str, device: torch.device) -> str:
    """The concrete backend name that ``select`` would use (after "auto" and LLMFAST_BACKEND).

    LLMFAST_BACKEND stands for "auto" in every op that has that backend; the others keep "auto"."""
    if not isinstance(backend, str):
        raise TypeError(f"backend: expected a str, got {type(backend).__name__}")
    if backend == "auto":
        forced = os.environ.get(ENV_VAR, "").strip()
        if forced and forced != "auto":
            if forced not in BACKENDS:
                raise ValueError(f"{ENV_VAR}: expected one of {BACKENDS + ('auto',)}, got {forced!r}")
            if forced not in _REGISTRY[op]:  # e.g. cpu for attention: no such kernel exists to force
                return _auto(op, device)
            backend = forced
        else:
            return _auto(op, device)
    elif backend not in BACKENDS:
        raise ValueError(f"backend: expected 'auto' or one of {BACKENDS}, got {backend!r}")
    reason = _missing(op, backend, device)
    if reason is not None:
        raise BackendUnavailable(f"backend {backend!r} cannot run {op}: {reason}")
    return backend


def select(op: str, backend: str, device: torch.device) -> Callable:
    """The implementation of ``op`` to call for tensors on ``device``."""
    return _REGISTRY[op][resolve(op, backend, device)][0]


def autotune_first_only() -> bool:
    """Whether LLMFAST_AUTOTUNE asks the Triton autotuners for the first config of each kind only."""
    value = os.environ.get(AUTOTUNE_ENV_VAR, "all")
    if value not in ("all", "first"):
        raise ValueError(f"{AUTOTUNE_ENV_VAR}: expected 'all' or 'first', got {value!r}")
    return value == "first"


def configure_triton_autotune() -> None:
    """Sets the kernels' autotune search from LLMFAST_AUTOTUNE (read here, once, at import: it is set for a
    whole test run; importing the setting's module needs no Triton). A bad value is a warning, not an
    import that fails: it only matters where an autotuned kernel runs."""
    from llmfast_kernels import tuning

    try:
        tuning.FIRST_ONLY = autotune_first_only()
    except ValueError as exc:
        warnings.warn(f"{exc}; searching every config", stacklevel=2)
        tuning.FIRST_ONLY = False


configure_triton_autotune()
if _triton_interpreting():
    from llmfast import triton_interpreter

    triton_interpreter.squeeze_before_index()
