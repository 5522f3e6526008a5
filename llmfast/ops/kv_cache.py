"""Writing new tokens' keys and values into the paged KV cache (vLLM layout), and what the paged ops share."""
from __future__ import annotations

from typing import Callable

import torch

from llmfast.backends import register, select
from llmfast.device import on_device
from llmfast.ops._checks import (
    FLOAT_DTYPES,
    check_same_dtype,
    check_shape,
    check_tensor,
    contiguous_index,
    value_range,
    values_readable,
)

CACHE_LAYOUT = "(num_blocks, block_size, kv_heads, head_dim)"

# In a compiled graph the index values, which torch.compile could not read when it traced the caller, are read
# by the ops when they run, if they may be then (not under CUDA-graph capture nor ``trusted_index_values``).
# Unchecked, a block id or slot out of range makes a kernel read or write outside the cache: an illegal memory
# access on the GPU, a crash of the Triton interpreter's process (the CPU C++ kernels' own checks raise a
# RuntimeError that names no argument). So in a graph each paged kernel runs inside a custom op of ours, one
# opaque node, that takes ``check_values``: true when its caller could not read the values. The Triton kernels
# always run inside theirs (``llmfast::*_triton``). The C++ kernels (csrc/cpu, csrc/cuda) do only in a traced
# call, through ``llmfast::*_cxx``, which is why the callers below pass it true; eager calls reach them
# directly, without a Python custom op's dispatch per call (the public function has read the values, or may not).


def check_block_size(k_cache: torch.Tensor) -> None:
    if k_cache.shape[1] == 0:
        raise ValueError(f"k_cache: expected {CACHE_LAYOUT} with block_size >= 1, got shape {tuple(k_cache.shape)}")


def cxx_cache_layout(k_cache: torch.Tensor, v_cache: torch.Tensor) -> bool:
    """Whether the C++ kernels can address the caches: unit head_dim stride, both strided alike."""
    return (k_cache.size(3) == 1 or k_cache.stride(3) == 1) and k_cache.stride() == v_cache.stride()


def cxx_op(name: str, device: torch.device) -> Callable:
    """``torch.ops.llmfast.<name>_cpu`` or ``_cuda``, for tensors on ``device``."""
    return getattr(torch.ops.llmfast, f"{name}_{device.type}")


def write_kv_cache(
    k: torch.Tensor,
    v: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
    *,
    backend: str = "auto",
) -> None:
    """Stores token ``t``'s key and value at cache slot ``slot_mapping[t]``, in place.

    ``k, v (tokens, kv_heads, head_dim)`` float16/bfloat16/float32; ``k_cache, v_cache
    (num_blocks, block_size, kv_heads, head_dim)`` in the same dtype; ``slot_mapping`` int64 ``(tokens,)``
    with slot = block * block_size + offset, or -1 to skip the token (e.g. padding).
    """
    _check_write_kv_cache_inputs(k, v, k_cache, v_cache, slot_mapping)
    if not torch.compiler.is_compiling():
        k, v = _apart_from_caches(k, k_cache, v_cache), _apart_from_caches(v, k_cache, v_cache)
    impl = select("write_kv_cache", backend, k.device)
    impl(k, v, k_cache, v_cache, contiguous_index(slot_mapping))


def _apart_from_caches(t: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor) -> torch.Tensor:
    """``t``, copied where it is a view into a cache (moving cached tokens): the kernels would read slots they
    have already written. The reference's index_put reads all of ``t`` first."""
    storage = t.untyped_storage().data_ptr()
    if storage in (k_cache.untyped_storage().data_ptr(), v_cache.untyped_storage().data_ptr()):
        return t.clone()
    return t


def _check_write_kv_cache_inputs(k, v, k_cache, v_cache, slot_mapping) -> None:
    check_tensor("k", k, ndim=3, dtypes=FLOAT_DTYPES)
    check_tensor("v", v, device=k.device)
    check_shape("v", v, tuple(k.shape), "(tokens, kv_heads, head_dim), the shape of k")
    check_same_dtype("v", v, "k", k)
    tokens, kv_heads, head_dim = k.shape
    for name, cache in (("k_cache", k_cache), ("v_cache", v_cache)):
        check_tensor(name, cache, device=k.device)
        check_shape(name, cache, (None, None, kv_heads, head_dim), f"{CACHE_LAYOUT} matching k")
        check_same_dtype(name, cache, "k", k)
        # written in place: the reference's index_put refuses both, the kernels would write behind autograd
        if cache.requires_grad and torch.is_grad_enabled():
            raise ValueError(f"{name}: a KV cache written in place cannot require grad (detach it, or write "
                             "under torch.no_grad())")
        if not torch.compiler.is_compiling() and cache.is_inference() and not torch.is_inference_mode_enabled():
            raise ValueError(f"{name}: an inference-mode tensor is written only inside torch.inference_mode()")
    check_shape("v_cache", v_cache, tuple(k_cache.shape), f"{CACHE_LAYOUT}, the shape of k_cache")
    check_block_size(k_cache)
    check_tensor("slot_mapping", slot_mapping, dtypes=(torch.int64,), device=k.device)
    check_shape("slot_mapping", slot_mapping, (tokens,), "(tokens,), one slot per row of k")
    if values_readable():
        _check_slot_values(slot_mapping, k_cache)


def _check_slot_values(slot_mapping: torch.Tensor, k_cache: torch.Tensor) -> None:
    """Every slot is -1 or inside the cache (one host read)."""
    num_slots = k_cache.shape[0] * k_cache.shape[1]
    if slot_mapping.numel() > 0:
        lo, hi = value_range(slot_mapping)
        if lo < -1 or hi >= num_slots:
            raise ValueError(
                f"slot_mapping: expected slots in [0, {num_slots}) (num_blocks * block_size) or -1, "
                f"got values from {lo} to {hi}"
            )


def _write_kv_cache_op(kernel: str, launch: Callable):
    """The custom op ``llmfast::write_kv_cache_<kernel>``: checks the slots when asked to, then launches."""

    @torch.library.custom_op(
        f"llmfast::write_kv_cache_{kernel}", mutates_args=("k_cache", "v_cache"), device_types=("cuda", "cpu")
    )
    def op(
        k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, slot_mapping: torch.Tensor,
        check_values: bool,
    ) -> None:
        if check_values and values_readable():
            _check_slot_values(slot_mapping, k_cache)
        launch(k, v, k_cache, v_cache, slot_mapping)

    op.register_fake(lambda *args, **kwargs: None)
    return op


def _launch_triton(k, v, k_cache, v_cache, slot_mapping) -> None:
    from llmfast_kernels.paged import write_kv_cache as launch

    with on_device(k.device):
        launch(k, v, k_cache, v_cache, slot_mapping)


def _launch_cxx(k, v, k_cache, v_cache, slot_mapping) -> None:
    cxx_op("write_kv_cache", k.device)(k, v, k_cache, v_cache, slot_mapping)


_write_kv_cache_triton_op = _write_kv_cache_op("triton", _launch_triton)
_write_kv_cache_cxx_op = _write_kv_cache_op("cxx", _launch_cxx)


def _write_kv_cache_triton(
    k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, slot_mapping: torch.Tensor
) -> None:
    _write_kv_cache_triton_op(k, v, k_cache, v_cache, slot_mapping, not values_readable())


def _write_kv_cache_cxx(
    k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, slot_mapping: torch.Tensor
) -> None:
    """write_kv_cache through ``torch.ops.llmfast.write_kv_cache_{cpu,cuda}``."""
    if not cxx_cache_layout(k_cache, v_cache):
        # the caches are written in place, so a layout the kernel cannot address goes the reference's way
        write_kv_cache_reference(k, v, k_cache, v_cache, slot_mapping)
        return
    args = (k.contiguous(), v.contiguous(), k_cache, v_cache, slot_mapping)  # slot_mapping: contiguous_index'd
    if torch.compiler.is_compiling():
        _write_kv_cache_cxx_op(*args, True)
    else:
        _launch_cxx(*args)


def write_kv_cache_reference(
    k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, slot_mapping: torch.Tensor
) -> None:
    """The oracle (and the signature every write_kv_cache backend registers with)."""
    block_size = k_cache.shape[1]
    keep = slot_mapping >= 0
    slots = slot_mapping[keep]
    blocks, offsets = slots // block_size, slots % block_size
    # index by (block, offset) rather than a flattened view, so non-contiguous caches are written in place
    k_cache[blocks, offsets] = k[keep]
    v_cache[blocks, offsets] = v[keep]


# "auto" takes triton on CUDA, then cuda, then the C++ CPU kernel on CPU tensors, then the reference
# (the order of llmfast/ops/paged.py, which says why).
register("write_kv_cache", "triton")(_write_kv_cache_triton)
for _device in ("cuda", "cpu"):
    register("write_kv_cache", _device, needs=f"write_kv_cache_{_device}")(_write_kv_cache_cxx)
register("write_kv_cache", "reference")(write_kv_cache_reference)
