"""Paged attention (vLLM layout): each sequence's newest queries over its whole context in the KV cache."""
from __future__ import annotations

from typing import Callable, Optional

import torch

from llmfast import _ext
from llmfast.backends import register, select
from llmfast.device import on_device
from llmfast.ops._checks import (
    FLOAT_DTYPES,
    check_cu_seqlens_shape,
    check_heads,
    check_max_seqlen,
    check_positive_float,
    check_same_dtype,
    check_shape,
    check_tensor,
    check_traced_max_seqlen,
    contiguous_index,
    cu_seqlens_lengths,
    value_range,
    values_readable,
)
from llmfast.ops.attention import MAX_HEAD_DIM, dense_attention_reference
from llmfast.ops.kv_cache import CACHE_LAYOUT, check_block_size, cxx_cache_layout, cxx_op


def paged_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    context_lens: torch.Tensor,
    *,
    cu_seqlens_q: torch.Tensor | None = None,
    max_seqlen_q: int | None = None,
    softmax_scale: float | None = None,
    backend: str = "auto",
) -> torch.Tensor:
    """Attention of each sequence's newest query tokens over its whole context in the paged KV cache.

    ``k_cache, v_cache (num_blocks, block_size, kv_heads, head_dim)``; ``block_tables`` int32
    ``(num_seqs, max_blocks)``: token ``t`` of sequence ``i`` lives at offset ``t % block_size`` of block
    ``block_tables[i, t // block_size]``; ``context_lens`` int32 ``(num_seqs,)`` counts its cached tokens,
    the new ones included (already written with ``write_kv_cache``). Entries of a row past the blocks
    its context uses are never read.

    Decode (``cu_seqlens_q`` None): ``q (num_seqs, heads, head_dim)``, one query per sequence, its last
    token (a sequence with context length 0 outputs 0). Chunked prefill: ``q (total_q, heads, head_dim)``
    with ``cu_seqlens_q`` int32 ``(num_seqs+1,)``; sequence ``i``'s queries are the last tokens of its
    context and attend causally (aligned bottom-right). Returns ``o`` shaped like ``q``, in ``q.dtype``.
    GQA as in ``attention``; ``softmax_scale`` defaults to ``head_dim ** -0.5``.
    """
    softmax_scale, max_seqlen_q = _check_paged_attention_inputs(
        q, k_cache, v_cache, block_tables, context_lens, cu_seqlens_q, max_seqlen_q, softmax_scale
    )
    impl = select("paged_attention", backend, q.device)
    return impl(
        q,
        k_cache,
        v_cache,
        contiguous_index(block_tables),
        contiguous_index(context_lens),
        cu_seqlens_q=contiguous_index(cu_seqlens_q),
        max_seqlen_q=max_seqlen_q,
        softmax_scale=softmax_scale,
    )


def _check_paged_attention_inputs(
    q, k_cache, v_cache, block_tables, context_lens, cu_seqlens_q, max_seqlen_q, softmax_scale
) -> tuple[float, int | None]:
    """Validates everything; returns (softmax_scale, max_seqlen_q) with defaults filled in."""
    decode = cu_seqlens_q is None
    q_layout = "(num_seqs, heads, head_dim)" if decode else "(total_q, heads, head_dim)"
    check_tensor("q", q, dtypes=FLOAT_DTYPES)
    if q.dim() != 3:
        raise ValueError(f"q: expected 3 dims {q_layout}, got shape {tuple(q.shape)}")
    head_dim = q.shape[-1]
    if not 0 < head_dim <= MAX_HEAD_DIM:
        raise ValueError(f"q: expected head_dim in [1, {MAX_HEAD_DIM}], got {head_dim}")
    for name, cache in (("k_cache", k_cache), ("v_cache", v_cache)):
        check_tensor(name, cache, device=q.device)
        check_shape(name, cache, (None, None, None, head_dim), f"{CACHE_LAYOUT} matching q's head_dim")
        check_same_dtype(name, cache, "q", q)
    check_shape("v_cache", v_cache, tuple(k_cache.shape), f"{CACHE_LAYOUT}, the shape of k_cache")
    check_block_size(k_cache)
    check_heads("q", q.shape[1], "k_cache", k_cache.shape[2])
    num_blocks, block_size = k_cache.shape[:2]

    check_tensor("block_tables", block_tables, ndim=2, dtypes=(torch.int32,), device=q.device)
    num_seqs, max_blocks = block_tables.shape
    check_tensor("context_lens", context_lens, dtypes=(torch.int32,), device=q.device)
    check_shape("context_lens", context_lens, (num_seqs,), "(num_seqs,), one per row of block_tables")
    if decode:
        if max_seqlen_q is not None:
            raise ValueError(f"max_seqlen_q: only used with cu_seqlens_q (chunked prefill), got {max_seqlen_q}")
        check_shape("q", q, (num_seqs, None, None), f"{q_layout}, one query per row of block_tables")
    else:
        check_cu_seqlens_shape("cu_seqlens_q", cu_seqlens_q, q.device)
        if cu_seqlens_q.shape[0] != num_seqs + 1:
            raise ValueError(
                f"cu_seqlens_q: expected shape ({num_seqs + 1},) (num_seqs+1,), got {tuple(cu_seqlens_q.shape)}"
            )
    if softmax_scale is None:
        softmax_scale = head_dim**-0.5
    softmax_scale = check_positive_float("softmax_scale", softmax_scale)
    if not values_readable():  # traced by torch.compile: the shapes are all that can be checked
        if not decode:
            max_seqlen_q = check_traced_max_seqlen("max_seqlen_q", max_seqlen_q, "cu_seqlens_q")
        return softmax_scale, max_seqlen_q
    return softmax_scale, _check_paged_index_values(q, k_cache, block_tables, context_lens, cu_seqlens_q, max_seqlen_q)


def _check_paged_index_values(q, k_cache, block_tables, context_lens, cu_seqlens_q, max_seqlen_q) -> int | None:
    """The index values (host reads) of inputs whose shapes are valid; returns max_seqlen_q filled in."""
    decode = cu_seqlens_q is None
    num_blocks, block_size = k_cache.shape[:2]
    max_blocks = block_tables.shape[1]
    lengths_q = None if decode else cu_seqlens_lengths("cu_seqlens_q", cu_seqlens_q, q.shape[0])
    context = context_lens.tolist()
    capacity = max_blocks * block_size  # the most tokens one row of block_tables can address
    for i, n in enumerate(context):
        if not 0 <= n <= capacity:
            raise ValueError(
                f"context_lens: expected lengths in [0, {capacity}] (max_blocks * block_size), "
                f"got {n} for sequence {i}"
            )
    if not decode:
        for i, (n_q, n) in enumerate(zip(lengths_q, context)):
            if n_q > n:
                raise ValueError(
                    f"cu_seqlens_q: sequence {i} has {n_q} query tokens but context_lens[{i}] = {n}; "
                    "queries are the last tokens of their context"
                )
        max_seqlen_q = check_max_seqlen("max_seqlen_q", max_seqlen_q, max(lengths_q, default=0))

    # Only the blocks a context uses must be valid; the rest of a row is padding and never read. A table
    # whose every entry is valid (as the engine's are) needs no mask: one read instead of eight ops.
    if block_tables.numel() > 0:
        lo, hi = value_range(block_tables)
        if 0 <= lo and hi < num_blocks:
            return max_seqlen_q
    blocks_used = (context_lens.long() + block_size - 1) // block_size  # (num_seqs,)
    used = torch.arange(max_blocks, device=q.device)[None, :] < blocks_used[:, None]  # (num_seqs, max_blocks)
    block_ids = block_tables[used]
    if block_ids.numel() > 0:
        lo, hi = value_range(block_ids)
        if lo < 0 or hi >= num_blocks:
            raise ValueError(
                f"block_tables: expected block ids in [0, {num_blocks}) (num_blocks) in the blocks the "
                f"contexts use, got ids from {lo} to {hi}"
            )
    return max_seqlen_q


def _paged_attention_op(kernel: str, launch: Callable):
    """The custom op ``llmfast::paged_attention_<kernel>``: checks the index values when asked to (see
    llmfast/ops/kv_cache.py: why a compiled graph's ops read them), then launches."""

    @torch.library.custom_op(f"llmfast::paged_attention_{kernel}", mutates_args=(), device_types=("cuda", "cpu"))
    def op(
        q: torch.Tensor,
        k_cache: torch.Tensor,
        v_cache: torch.Tensor,
        block_tables: torch.Tensor,
        context_lens: torch.Tensor,
        cu_seqlens_q: Optional[torch.Tensor],
        max_seqlen_q: Optional[int],
        softmax_scale: float,
        check_values: bool,
    ) -> torch.Tensor:
        if check_values and values_readable():
            _check_paged_index_values(q, k_cache, block_tables, context_lens, cu_seqlens_q, max_seqlen_q)
        return launch(q, k_cache, v_cache, block_tables, context_lens, cu_seqlens_q, max_seqlen_q, softmax_scale)

    op.register_fake(lambda q, *args, **kwargs: q.new_empty(q.shape))  # contiguous, as the launchers allocate it
    # without this, a backward through the kernels left q.grad None with only a warning from autograd's fallback
    op.register_autograd(_no_backward)
    return op


def _no_backward(ctx, grad_out):
    raise RuntimeError("paged_attention: the triton, cpu and cuda backends have no backward (an inference op); "
                       "backend='reference' is differentiable")


def _launch_triton(q, k_cache, v_cache, block_tables, context_lens, cu_seqlens_q, max_seqlen_q, softmax_scale):
    from llmfast_kernels.paged import paged_attention as launch

    with on_device(q.device):
        return launch(q, k_cache, v_cache, block_tables, context_lens, cu_seqlens_q, max_seqlen_q, softmax_scale)


def _launch_cxx(q, k_cache, v_cache, block_tables, context_lens, cu_seqlens_q, max_seqlen_q, softmax_scale):
    op = cxx_op("paged_attention", q.device)
    return op(q, k_cache, v_cache, block_tables, context_lens, cu_seqlens_q, softmax_scale)


_paged_attention_triton_op = _paged_attention_op("triton", _launch_triton)
_paged_attention_cxx_op = _paged_attention_op("cxx", _launch_cxx)
for _device in ("cpu", "cuda"):  # the C++ ops themselves, called directly when eager
    if _ext.has_op(f"paged_attention_{_device}"):
        torch.library.register_autograd(f"llmfast::paged_attention_{_device}", _no_backward)


def _paged_attention_triton(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    context_lens: torch.Tensor,
    *,
    cu_seqlens_q: torch.Tensor | None,
    max_seqlen_q: int | None,
    softmax_scale: float,
) -> torch.Tensor:
    return _paged_attention_triton_op(
        q, k_cache, v_cache, block_tables, context_lens, cu_seqlens_q, max_seqlen_q, softmax_scale,
        not values_readable(),
    )


def _paged_attention_cxx(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    context_lens: torch.Tensor,
    *,
    cu_seqlens_q: torch.Tensor | None,
    max_seqlen_q: int | None,
    softmax_scale: float,
) -> torch.Tensor:
    """paged_attention through ``torch.ops.llmfast.paged_attention_{cpu,cuda}``, which take contiguous inputs
    and caches strided alike with a unit head_dim stride."""
    if not cxx_cache_layout(k_cache, v_cache):
        k_cache, v_cache = k_cache.contiguous(), v_cache.contiguous()
    # the index tensors arrive contiguous (paged_attention's contiguous_index)
    args = (q.contiguous(), k_cache, v_cache, block_tables, context_lens, cu_seqlens_q, max_seqlen_q, softmax_scale)
    if torch.compiler.is_compiling():
        return _paged_attention_cxx_op(*args, True)
    return _launch_cxx(*args)


def paged_attention_reference(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    context_lens: torch.Tensor,
    *,
    cu_seqlens_q: torch.Tensor | None,
    max_seqlen_q: int | None,
    softmax_scale: float,
) -> torch.Tensor:
    """The oracle: gather each sequence's context into contiguous K/V, then dense causal attention.

    Its signature is the contract for every paged_attention backend: inputs arrive validated, with
    ``softmax_scale`` resolved to a float and, for chunked prefill, ``max_seqlen_q`` to an int.
    """
    if not values_readable():  # traced: the lengths cannot be read to slice each sequence's context
        return _paged_attention_masked(q, k_cache, v_cache, block_tables, context_lens, cu_seqlens_q, softmax_scale)
    num_seqs, block_size = block_tables.shape[0], k_cache.shape[1]
    offsets_q = list(range(num_seqs + 1)) if cu_seqlens_q is None else cu_seqlens_q.tolist()
    outs = []
    for i, context in enumerate(context_lens.tolist()):
        blocks = block_tables[i, : -(-context // block_size)].long()
        k = k_cache[blocks].flatten(0, 1)[:context]  # (context, kv_heads, head_dim)
        v = v_cache[blocks].flatten(0, 1)[:context]  # (context, kv_heads, head_dim)
        o = dense_attention_reference(
            q[None, offsets_q[i] : offsets_q[i + 1]], k[None], v[None], causal=True, softmax_scale=softmax_scale
        )  # (1, queries, heads, head_dim)
        outs.append(o[0])
    return torch.cat(outs) if outs else torch.zeros_like(q)


def _paged_attention_masked(q, k_cache, v_cache, block_tables, context_lens, cu_seqlens_q, softmax_scale):
    """``paged_attention_reference`` without reading any index value on the host (for torch.compile): each
    query against every slot its sequence's block table can hold, masked to the context it sees."""
    max_blocks = block_tables.shape[1]
    num_blocks, block_size, kv_heads = k_cache.shape[:3]
    tokens = q.shape[0]
    seq = torch.arange(tokens, device=q.device)  # decode: query t is sequence t's newest token
    context = context_lens.long()
    if cu_seqlens_q is None:
        pos = context - 1
    else:
        cu_q = cu_seqlens_q.long()
        seq = torch.searchsorted(cu_q[1:], seq, right=True)  # (tokens,) the sequence of each query
        pos = context[seq] - (cu_q[seq + 1] - torch.arange(tokens, device=q.device))  # the last query is context-1
    # unused table entries may hold anything (-1): clamped to a real block, and masked out below
    blocks = block_tables.long().clamp(0, max(num_blocks - 1, 0))[seq]  # (tokens, max_blocks)
    slots = torch.arange(max_blocks * block_size, device=q.device)
    visible = (slots[None, :] < context[seq][:, None]) & (slots[None, :] <= pos[:, None])  # (tokens, slots)
    k = k_cache[blocks].flatten(1, 2)  # (tokens, slots, kv_heads, head_dim)
    v = torch.where(visible[..., None, None], v_cache[blocks].flatten(1, 2), 0)  # unused slots may hold NaN
    group = q.shape[1] // kv_heads
    k, v = k.float().repeat_interleave(group, dim=2), v.float().repeat_interleave(group, dim=2)
    with torch.autocast(q.device.type, enabled=False):
        scores = torch.einsum("thd,tkhd->thk", q.float(), k) * softmax_scale  # (tokens, heads, slots)
        scores = scores.masked_fill(~visible[:, None, :], torch.finfo(torch.float32).min)
        probs = torch.softmax(scores, dim=-1) * visible[:, None, :]  # a query that sees no key: 0
        o = torch.einsum("thk,tkhd->thd", probs, v)
    return o.to(q.dtype)


# "auto" follows this order (write_kv_cache's too): triton first on CUDA, because its kernel runs the scores and
# P @ V on tensor cores for a whole GQA group or prefill tile, while the CUDA C++ kernel uses fp32 FMAs (fine
# for decode, slower for chunked prefill); then cuda; then the C++ CPU kernels (csrc/cpu/paged.cpp), which
# "auto" takes on CPU tensors (it skips the Triton interpreter there); the reference last.
register("paged_attention", "triton")(_paged_attention_triton)
for _device in ("cuda", "cpu"):
    register("paged_attention", _device, needs=f"paged_attention_{_device}")(_paged_attention_cxx)
register("paged_attention", "reference")(paged_attention_reference)
