"""What a model needs to know about a flattened batch: where each sequence starts and where its keys live."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch


@dataclass
class AttentionMetadata:
    """How the flattened tokens of one forward split into sequences, and where their keys and values live.

    The mode follows from which fields are set (the conventions of ``llmfast.ops``):

    - **prefill** (``block_tables`` None): sequence ``i`` is tokens ``cu_seqlens_q[i]:cu_seqlens_q[i+1]``,
      attending over themselves only (``ops.attention`` varlen). With a KV cache their keys and values are
      also written at ``slot_mapping``, so later calls can read them.
    - **paged prefill** (``block_tables`` and ``cu_seqlens_q``): sequence ``i``'s tokens are the last ones
      of its ``context_lens[i]`` cached tokens (chunked prefill, prefix reuse, decodes mixed in): they are
      written at ``slot_mapping``, then attend over the whole cached context (``ops.paged_attention``).
    - **decode** (``block_tables``, ``cu_seqlens_q`` None): one token per sequence, in the order of
      ``block_tables``' rows.

    Fields: ``cu_seqlens_q`` int32 ``(num_seqs+1,)``; ``max_seqlen_q`` the most tokens of one sequence in
    this call; ``slot_mapping`` int64 ``(tokens,)``, slot = block * block_size + offset (-1 skips a token);
    ``block_tables`` int32 ``(num_seqs, max_blocks)``; ``context_lens`` int32 ``(num_seqs,)``, the new
    tokens included; ``max_context_len`` the longest context, when the caller knows it (only read by models
    with a sliding window, which otherwise compute it with a device sync).
    """

    cu_seqlens_q: torch.Tensor | None = None
    max_seqlen_q: int | None = None
    slot_mapping: torch.Tensor | None = None
    block_tables: torch.Tensor | None = None
    context_lens: torch.Tensor | None = None
    max_context_len: int | None = None

    @classmethod
    def prefill(
        cls, seq_lens: Sequence[int], device: torch.device | str, slot_mapping: torch.Tensor | None = None
    ) -> AttentionMetadata:
        """Metadata for whole sequences of ``seq_lens`` tokens, laid out one after another."""
        offsets = [0]
        for n in seq_lens:
            offsets.append(offsets[-1] + n)
        return cls(
            cu_seqlens_q=torch.tensor(offsets, dtype=torch.int32, device=device),
            max_seqlen_q=max(seq_lens, default=0),
            slot_mapping=slot_mapping,
        )

    @property
    def is_paged(self) -> bool:
        """Attention reads keys from the paged KV cache (paged prefill or decode)."""
        return self.block_tables is not None

    def longest_context(self) -> int:
        """The most keys one query of this call attends over (syncs with the device when not given)."""
        if not self.is_paged:
            if self.max_seqlen_q is not None:
                return self.max_seqlen_q
            return int((self.cu_seqlens_q[1:] - self.cu_seqlens_q[:-1]).max()) if len(self.cu_seqlens_q) > 1 else 0
        if self.max_context_len is not None:
            return self.max_context_len
        return int(self.context_lens.max()) if self.context_lens.numel() else 0


def padded_forward(
    model: torch.nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    **per_token: torch.Tensor,
) -> torch.Tensor:
    """Runs ``model`` (any llmfast model) on a padded batch, the way Hugging Face models are called.

    ``input_ids (batch, seqlen)``; ``attention_mask (batch, seqlen)`` 1 for tokens, 0 for padding (left
    or right; None: no padding); ``per_token`` tensors ``(batch, seqlen)`` such as BERT's ``token_type_ids``.
    Each row's tokens are numbered 0, 1, ... from its first unpadded token, as ``generate`` numbers them
    (HF's BERT numbers the columns instead, whatever the mask: for it, left padding gives other results).
    Returns the hidden states ``(batch, seqlen, hidden)``, zero at padding; decoders turn them into logits
    with ``model.compute_logits``.
    """
    if input_ids.dim() != 2:
        raise ValueError(f"input_ids: expected 2 dims (batch, seqlen), got shape {tuple(input_ids.shape)}")
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    if attention_mask.shape != input_ids.shape:
        raise ValueError(
            f"attention_mask: expected shape {tuple(input_ids.shape)} (the shape of input_ids), "
            f"got {tuple(attention_mask.shape)}"
        )
    keep = attention_mask.bool()  # (batch, seqlen)
    positions = (keep.long().cumsum(dim=1) - 1)[keep]  # (tokens,)
    meta = AttentionMetadata.prefill(keep.sum(dim=1).tolist(), input_ids.device)
    packed = {name: t[keep] for name, t in per_token.items()}
    hidden = model(input_ids[keep], positions, meta, **packed)  # (tokens, hidden)
    out = hidden.new_zeros(*input_ids.shape, hidden.shape[-1])  # (batch, seqlen, hidden)
    out[keep] = hidden
    return out
