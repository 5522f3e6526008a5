"""Pieces every model family shares: attention over the metadata's layout, activations, input checks."""
from __future__ import annotations

from typing import Callable, Sequence

import torch
import torch.nn.functional as F

from llmfast.models.metadata import AttentionMetadata
from llmfast.ops import attention, paged_attention, write_kv_cache
from llmfast.ops._checks import values_readable

KVCache = tuple[torch.Tensor, torch.Tensor]  # k_cache, v_cache: (num_blocks, block_size, kv_heads, head_dim)

_ACTIVATIONS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "silu": F.silu,
    "swish": F.silu,
    "gelu": F.gelu,
    "gelu_new": lambda x: F.gelu(x, approximate="tanh"),
    "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "gelu_fast": lambda x: F.gelu(x, approximate="tanh"),
    "relu": F.relu,
}


def activation(name: str) -> Callable[[torch.Tensor], torch.Tensor]:
    """The function a Hugging Face config's ``hidden_act``/``activation_function`` names."""
    if name not in _ACTIVATIONS:
        raise ValueError(f"hidden_act: {name!r} is not supported; expected one of {sorted(_ACTIVATIONS)}")
    return _ACTIVATIONS[name]


def attend(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    meta: AttentionMetadata,
    kv_cache: KVCache | None,
    *,
    causal: bool,
    softmax_scale: float | None = None,
) -> torch.Tensor:
    """Attention of this call's tokens, laid out as ``meta`` says -> ``o (tokens, heads, head_dim)``.

    ``q (tokens, heads, head_dim)``, ``k, v (tokens, kv_heads, head_dim)`` of the new tokens. With a
    ``kv_cache`` the new keys and values are stored first, then (paged modes) read back with the context.
    """
    if kv_cache is not None:
        write_kv_cache(k, v, kv_cache[0], kv_cache[1], meta.slot_mapping)
    if meta.is_paged:
        return paged_attention(
            q, kv_cache[0], kv_cache[1], meta.block_tables, meta.context_lens,
            cu_seqlens_q=meta.cu_seqlens_q, max_seqlen_q=meta.max_seqlen_q, softmax_scale=softmax_scale,
        )
    return attention(
        q, k, v, causal=causal, softmax_scale=softmax_scale,
        cu_seqlens_q=meta.cu_seqlens_q, cu_seqlens_k=meta.cu_seqlens_q,
        max_seqlen_q=meta.max_seqlen_q, max_seqlen_k=meta.max_seqlen_q,
    )


def check_forward_inputs(
    input_ids: torch.Tensor,
    positions: torch.Tensor,
    meta: AttentionMetadata,
    kv_caches: Sequence[KVCache] | None,
    num_layers: int,
    sliding_window: int | None = None,
) -> None:
    """Validates what a model's forward gets once, so that each layer can trust it (no device syncs
    unless a sliding window must be checked)."""
    if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 1:
        got = tuple(input_ids.shape) if isinstance(input_ids, torch.Tensor) else type(input_ids).__name__
        raise ValueError(f"input_ids: expected a 1-dim tensor (tokens,) of flattened sequences, got {got}")
    if not isinstance(positions, torch.Tensor) or positions.shape != input_ids.shape:
        got = tuple(positions.shape) if isinstance(positions, torch.Tensor) else type(positions).__name__
        raise ValueError(f"positions: expected shape {tuple(input_ids.shape)} (one per token of input_ids), got {got}")
    if not isinstance(meta, AttentionMetadata):
        raise TypeError(f"meta: expected an AttentionMetadata, got {type(meta).__name__}")
    if meta.cu_seqlens_q is None and not meta.is_paged:
        raise ValueError("meta: expected cu_seqlens_q (prefill) or block_tables (decode), got neither")
    if kv_caches is None:
        if meta.is_paged:
            raise ValueError("kv_caches: expected one (k_cache, v_cache) per layer, since meta.block_tables is set")
    else:
        if len(kv_caches) != num_layers:
            raise ValueError(
                f"kv_caches: expected {num_layers} (k_cache, v_cache) pairs (one per layer), got {len(kv_caches)}"
            )
        if meta.slot_mapping is None:
            raise ValueError("meta.slot_mapping: expected a tensor (tokens,), since kv_caches are given")
    if sliding_window is not None and meta.longest_context() > sliding_window:
        raise ValueError(
            f"a sequence has {meta.longest_context()} tokens, more than the model's sliding_window "
            f"({sliding_window}); llmfast's attention has no sliding-window mask, so contexts are limited to it"
        )


def check_embedding_indices(**bounded: tuple[torch.Tensor | None, int]) -> None:
    """Each ``name=(tensor, table_size)``: an integer tensor with values in ``[0, table_size)``, or None.

    A lookup past an embedding table is an IndexError on the CPU and a device-side assert on CUDA, which
    ends the process's CUDA context. One host read for all of them; skipped while a CUDA graph is captured,
    torch.compile traces or ``trusted_index_values`` is on (the engine bounds what it feeds then: token ids
    by the vocabulary, positions by its max_model_len)."""
    checked = []
    for name, (tensor, size) in bounded.items():
        if tensor is None:
            continue
        if tensor.dtype not in (torch.int32, torch.int64):
            raise TypeError(f"{name}: expected an int64 or int32 tensor (embedding indices), got {tensor.dtype}")
        if tensor.numel():
            checked.append((name, tensor, size))
    if not checked or not values_readable():
        return
    extremes = torch.stack([v.long() for _, t, _ in checked for v in torch.aminmax(t)]).tolist()
    for i, (name, _, size) in enumerate(checked):
        lo, hi = extremes[2 * i], extremes[2 * i + 1]
        if lo < 0 or hi >= size:
            raise ValueError(f"{name}: expected values in [0, {size}) (the embedding table's size), got [{lo}, {hi}]")
