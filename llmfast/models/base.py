"""What the model classes share: building from a Hugging Face config, and the causal LMs' head and forward."""
from __future__ import annotations

from typing import ClassVar, Sequence, TypeVar

import torch
from torch import nn

from llmfast.models.layers import KVCache, check_embedding_indices, check_forward_inputs
from llmfast.models.metadata import AttentionMetadata

_M = TypeVar("_M", bound="HFModel")


class HFModel(nn.Module):
    """A model built from a Hugging Face ``config.json`` dict, which ``config_class.from_hf`` reads into ``config``."""

    config_class: ClassVar[type]  # a config dataclass with ``from_hf(hf: dict)``

    def __init__(self, cfg):
        super().__init__()
        self.config = cfg

    @classmethod
    def from_hf_config(cls: type[_M], hf: dict) -> _M:
        return cls(cls.config_class.from_hf(hf))


class CausalLM(HFModel):
    """A decoder on flattened tokens: ``forward`` -> hidden states, ``compute_logits`` -> logits.

    A subclass builds its decoder body under ``base_model_prefix`` (Hugging Face's attribute name, so that
    checkpoint names map onto parameters), then calls ``add_lm_head`` with the body's token embedding.
    """

    base_model_prefix: ClassVar[str]
    # True where positions index a learned table (GPT-2's wpe): one past its end would be an out-of-range
    # lookup, so they are bounds-checked like token ids. RoPE has no table to run past.
    learned_positions: ClassVar[bool] = False

    def add_lm_head(self, embedding: nn.Embedding) -> None:
        # after the body: named_parameters() lists a tied weight once, under its first name, and the loader
        # fills it from the embedding's checkpoint tensor
        self.lm_head = nn.Linear(self.config.hidden_size, self.config.vocab_size, bias=False)
        if self.config.tie_word_embeddings:
            self.lm_head.weight = embedding.weight

    def forward(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        meta: AttentionMetadata,
        kv_caches: Sequence[KVCache] | None = None,
    ) -> torch.Tensor:
        """``input_ids, positions (tokens,)`` int64 of flattened sequences laid out as ``meta`` says;
        ``kv_caches``: per layer ``(k_cache, v_cache)``, each ``(num_blocks, block_size, kv_heads, head_dim)``
        (needed by the paged modes). Returns the final hidden states ``(tokens, hidden)``."""
        cfg = self.config
        window = getattr(cfg, "sliding_window", None)  # GPT-2's config has none: every layer sees all keys
        check_forward_inputs(input_ids, positions, meta, kv_caches, cfg.num_layers, window)
        bounded = {"input_ids": (input_ids, cfg.vocab_size)}
        if self.learned_positions:
            bounded["positions"] = (positions, cfg.max_position_embeddings)
        check_embedding_indices(**bounded)
        return getattr(self, self.base_model_prefix)(input_ids, positions, meta, kv_caches)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """``hidden (..., hidden)`` -> ``logits (..., vocab)`` (select the tokens to sample first)."""
        return self.lm_head(hidden)
