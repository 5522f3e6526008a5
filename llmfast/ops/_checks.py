"""Input validation shared by every op: each check names the argument and says what was expected."""
from __future__ import annotations

import contextlib
import math
import threading
from typing import Iterator, Sequence

import torch

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def _dtype_names(dtypes: Sequence[torch.dtype]) -> str:
    return "/".join(str(d).replace("torch.", "") for d in dtypes)


def check_tensor(
    name: str,
    t: object,
    *,
    ndim: int | Sequence[int] | None = None,
    dtypes: Sequence[torch.dtype] | None = None,
    device: torch.device | None = None,
) -> torch.Tensor:
    """``t`` is a tensor with the given rank(s), one of ``dtypes``, on ``device``; returns it."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(t).__name__}")
    if ndim is not None:
        allowed = (ndim,) if isinstance(ndim, int) else tuple(ndim)
        if t.dim() not in allowed:
            want = " or ".join(str(n) for n in allowed)
            raise ValueError(f"{name}: expected {want} dims, got shape {tuple(t.shape)}")
    if dtypes is not None and t.dtype not in dtypes:
        raise TypeError(f"{name}: expected dtype {_dtype_names(dtypes)}, got {t.dtype}")
    if device is not None and t.device != device:
        raise ValueError(f"{name}: expected a tensor on {device}, got one on {t.device}")
    return t


def check_shape(name: str, t: torch.Tensor, expected: Sequence[int | None], what: str = "") -> None:
    """``t.shape`` matches ``expected`` (None matches any size); ``what`` describes the layout."""
    ok = t.dim() == len(expected) and all(e is None or e == s for e, s in zip(expected, t.shape))
    if not ok:
        want = "(" + ", ".join("*" if e is None else str(e) for e in expected) + ")"
        layout = f" {what}" if what else ""
        raise ValueError(f"{name}: expected shape {want}{layout}, got {tuple(t.shape)}")


def check_same_dtype(name: str, t: torch.Tensor, ref_name: str, ref: torch.Tensor) -> None:
    if t.dtype != ref.dtype:
        raise TypeError(f"{name}: expected dtype {ref.dtype} (the dtype of {ref_name}), got {t.dtype}")


def check_positive_float(name: str, value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name}: expected a float, got {type(value).__name__}")
    if not 0 < value < math.inf:  # comparisons, not math.isfinite: torch.compile(dynamic=True) passes a SymFloat
        raise ValueError(f"{name}: expected a positive finite number, got {value}")
    return float(value)


def check_positive_int(name: str, value: object, allow_none: bool = False) -> None:
    """A count (sizes, lengths, limits): an int >= 1, or None where ``allow_none``."""
    if value is None and allow_none:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name}: expected a positive int{' or None' if allow_none else ''}, got {value!r}")


def check_int(name: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name}: expected an int, got {type(value).__name__}")
    return value


def check_heads(q_name: str, q_heads: int, kv_name: str, kv_heads: int) -> None:
    """GQA/MQA: the query heads split evenly over the kv heads."""
    for name, heads in ((q_name, q_heads), (kv_name, kv_heads)):
        if heads == 0:
            raise ValueError(f"{name}: expected at least one head, got 0")
    if q_heads % kv_heads != 0:
        raise ValueError(
            f"{q_name}: expected a number of heads divisible by the {kv_heads} heads of {kv_name}, got {q_heads}"
        )


_trusted = threading.local()


def values_readable() -> bool:
    """Whether checks may read tensor values back to the host. Not while torch.compile traces: its fake
    tensors have no values, so only dtypes and shapes are checked then (flash-attn checks no more); nor
    while a CUDA graph is captured (a host read would end the capture), nor inside ``trusted_index_values``."""
    return not (torch.compiler.is_compiling() or getattr(_trusted, "active", False)
                or (torch.cuda.is_initialized() and torch.cuda.is_current_stream_capturing()))


@contextlib.contextmanager
def trusted_index_values() -> Iterator[None]:
    """On this thread, inside: the ops check dtypes and shapes only, not index values (slots, block ids,
    context lengths, cu_seqlens, token ids), as under torch.compile. For a caller that built the indices
    itself, like the engine on a GPU, where each value check is a host sync per layer."""
    before = getattr(_trusted, "active", False)
    _trusted.active = True
    try:
        yield
    finally:
        _trusted.active = before


def check_traced_max_seqlen(name: str, value: object, cu_name: str) -> int:
    """Under torch.compile the longest sequence cannot be read from ``cu_name``: ``value`` must give it."""
    if value is None:
        raise ValueError(f"{name}: expected an int under torch.compile, which cannot read {cu_name} to find the "
                         "longest sequence (pass it, as flash-attn's varlen functions require)")
    check_int(name, value)
    return value


def check_cu_seqlens_shape(name: str, cu_seqlens: object, device: torch.device) -> None:
    """``cu_seqlens`` is an int32 ``(batch+1,)`` tensor on ``device`` (its values unread)."""
    check_tensor(name, cu_seqlens, ndim=1, dtypes=(torch.int32,), device=device)
    if cu_seqlens.numel() == 0:
        raise ValueError(f"{name}: expected shape (batch+1,) starting with 0, got an empty tensor")


def cu_seqlens_lengths(name: str, cu_seqlens: torch.Tensor, num_tokens: int) -> list[int]:
    """The per-sequence lengths of a ``cu_seqlens`` of valid shape (one host read), after checking its values:
    0, then non-decreasing, ending at ``num_tokens``."""
    offsets = cu_seqlens.tolist()
    if offsets[0] != 0:
        raise ValueError(f"{name}: expected to start at 0, got {offsets[0]}")
    lengths = [end - start for start, end in zip(offsets, offsets[1:])]
    for i, n in enumerate(lengths):
        if n < 0:
            raise ValueError(f"{name}: expected non-decreasing offsets, got {offsets[i + 1]} after {offsets[i]}")
    if offsets[-1] != num_tokens:
        raise ValueError(
            f"{name}: expected to end at the number of tokens {num_tokens}, got {offsets[-1]} "
            "(the sequences do not cover the tokens)"
        )
    return lengths


def check_max_seqlen(name: str, value: object, actual: int) -> int:
    """``value`` (None: use ``actual``) is an int no smaller than the longest sequence. Returns ``actual``:
    the kernels size their grids by it, and a far larger ``value`` (allowed, as flash-attn) would launch
    programs by the million with nothing to do."""
    if value is None:
        return actual
    check_int(name, value)
    if value < actual:
        raise ValueError(f"{name}: expected at least the longest sequence length {actual}, got {value}")
    return actual


def value_range(t: torch.Tensor) -> tuple[int, int]:
    """The least and greatest values of a non-empty integer tensor, in one host read."""
    least, most = torch.stack(torch.aminmax(t)).tolist()
    return least, most


def contiguous_index(index: torch.Tensor | None) -> torch.Tensor | None:
    """An index tensor (cu_seqlens, slots, block tables, lengths) with unit stride: the kernels read it from
    its storage, not through its strides (a strided view passed the checks, which read through the view,
    then sent the kernels to other offsets)."""
    return None if index is None else index.contiguous()
