"""BERT encoder: absolute positions, bidirectional attention, post-LN ``LayerNorm(x + sublayer(x))``.

Each post-LN residual is one ``ops.add_layer_norm(sublayer_out, x, ...)`` call. ``forward`` returns the
last hidden states (``BertModel``'s ``last_hidden_state``); the pooler and pretraining heads are not kept.
"""
from __future__ import annotations

import re
from dataclasses import dataclass

import torch
from torch import nn

from llmfast.models.base import HFModel
from llmfast.models.layers import activation, attend, check_embedding_indices, check_forward_inputs
from llmfast.models.metadata import AttentionMetadata
from llmfast.nn import FusedAddLayerNorm

# Hugging Face names inside encoder.layer.{i} -> ours
_LAYER_NAMES = {
    "attention.self.query": "query",
    "attention.self.key": "key",
    "attention.self.value": "value",
    "attention.output.dense": "attention_output",
    "attention.output.LayerNorm": "attention_norm",
    "intermediate.dense": "intermediate",
    "output.dense": "output",
    "output.LayerNorm": "output_norm",
}
# buffers, and the heads of BertFor* checkpoints (pretraining, classification, question answering), which
# BertModel does not have, as transformers' AutoModel leaves them out
_UNUSED = ("embeddings.position_ids", "embeddings.token_type_ids", "pooler.", "cls.", "classifier.", "qa_outputs.")


@dataclass
class BertConfig:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    max_position_embeddings: int
    type_vocab_size: int
    layer_norm_eps: float
    hidden_act: str

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @classmethod
    def from_hf(cls, hf: dict) -> BertConfig:
        kind = hf.get("position_embedding_type", "absolute")
        if kind != "absolute":
            raise ValueError(f"position_embedding_type: only 'absolute' is supported, got {kind!r}")
        if hf.get("is_decoder") or hf.get("add_cross_attention"):
            raise ValueError("is_decoder: BERT as a decoder (causal, cross-attention) is not supported; "
                             "llmfast's BertModel is the bidirectional encoder")
        return cls(
            vocab_size=hf["vocab_size"],
            hidden_size=hf["hidden_size"],
            intermediate_size=hf["intermediate_size"],
            num_layers=hf["num_hidden_layers"],
            num_heads=hf["num_attention_heads"],
            max_position_embeddings=hf.get("max_position_embeddings", 512),
            type_vocab_size=hf.get("type_vocab_size", 2),
            layer_norm_eps=hf.get("layer_norm_eps", 1e-12),
            hidden_act=hf.get("hidden_act", "gelu"),
        )


class BertEmbeddings(nn.Module):
    def __init__(self, cfg: BertConfig):
        super().__init__()
        self.word_embeddings = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.position_embeddings = nn.Embedding(cfg.max_position_embeddings, cfg.hidden_size)
        self.token_type_embeddings = nn.Embedding(cfg.type_vocab_size, cfg.hidden_size)
        self.LayerNorm = FusedAddLayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)

    def forward(self, input_ids, positions, token_type_ids) -> torch.Tensor:
        x = self.word_embeddings(input_ids) + self.token_type_embeddings(token_type_ids)  # (tokens, hidden)
        return self.LayerNorm(self.position_embeddings(positions), x)[0]


class BertLayer(nn.Module):
    def __init__(self, cfg: BertConfig):
        super().__init__()
        self.num_heads, self.head_dim = cfg.num_heads, cfg.head_dim
        self.query = nn.Linear(cfg.hidden_size, cfg.hidden_size)
        self.key = nn.Linear(cfg.hidden_size, cfg.hidden_size)
        self.value = nn.Linear(cfg.hidden_size, cfg.hidden_size)
        self.attention_output = nn.Linear(cfg.hidden_size, cfg.hidden_size)
        self.attention_norm = FusedAddLayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.intermediate = nn.Linear(cfg.hidden_size, cfg.intermediate_size)
        self.output = nn.Linear(cfg.intermediate_size, cfg.hidden_size)
        self.output_norm = FusedAddLayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.act = activation(cfg.hidden_act)

    def forward(self, x: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        tokens = x.shape[0]
        q = self.query(x).view(tokens, self.num_heads, self.head_dim)  # (tokens, heads, head_dim)
        k = self.key(x).view(tokens, self.num_heads, self.head_dim)  # (tokens, heads, head_dim)
        v = self.value(x).view(tokens, self.num_heads, self.head_dim)  # (tokens, heads, head_dim)
        o = attend(q, k, v, meta, None, causal=False)  # (tokens, heads, head_dim)
        a = self.attention_output(o.reshape(tokens, self.num_heads * self.head_dim))
        x = self.attention_norm(a, x)[0]  # LayerNorm(x + attention(x))
        return self.output_norm(self.output(self.act(self.intermediate(x))), x)[0]  # LayerNorm(x + mlp(x))


class BertEncoder(nn.Module):
    def __init__(self, cfg: BertConfig):
        super().__init__()
        self.layer = nn.ModuleList(BertLayer(cfg) for _ in range(cfg.num_layers))


class BertModel(HFModel):
    """The BERT encoder on flattened sequences: ``forward`` -> last hidden states ``(tokens, hidden)``."""

    config_class = BertConfig

    def __init__(self, cfg: BertConfig):
        super().__init__(cfg)
        self.embeddings = BertEmbeddings(cfg)
        self.encoder = BertEncoder(cfg)

    def forward(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        meta: AttentionMetadata,
        token_type_ids: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """``input_ids, positions (tokens,)`` int64 and optional ``token_type_ids (tokens,)`` (default 0) of
        whole sequences laid out by ``meta`` (prefill mode: each attends over itself, both ways)."""
        check_forward_inputs(input_ids, positions, meta, None, self.config.num_layers)
        if meta.is_paged:
            raise ValueError("meta: BERT attends over whole sequences; expected prefill metadata, got block_tables")
        if token_type_ids is not None and getattr(token_type_ids, "shape", None) != input_ids.shape:
            got = getattr(token_type_ids, "shape", type(token_type_ids).__name__)
            raise ValueError(f"token_type_ids: expected None or a tensor of shape {tuple(input_ids.shape)} "
                             f"(one per token), got {got}")
        check_embedding_indices(input_ids=(input_ids, self.config.vocab_size),
                                positions=(positions, self.config.max_position_embeddings),
                                token_type_ids=(token_type_ids, self.config.type_vocab_size))
        if token_type_ids is None:
            token_type_ids = torch.zeros_like(input_ids)
        x = self.embeddings(input_ids, positions, token_type_ids)  # (tokens, hidden)
        for layer in self.encoder.layer:
            x = layer(x, meta)
        return x

    def load_hf_tensor(self, name: str, tensor: torch.Tensor) -> tuple[str, torch.Tensor] | None:
        """A checkpoint tensor as (parameter name, value), or None for one this model does not use."""
        name = name.removeprefix("bert.")  # saved from BertFor* models
        if name.startswith(_UNUSED):
            return None
        name = re.sub(r"LayerNorm\.gamma$", "LayerNorm.weight", name)  # names of TF-converted checkpoints
        name = re.sub(r"LayerNorm\.beta$", "LayerNorm.bias", name)
        match = re.fullmatch(r"encoder\.layer\.(\d+)\.(.+)\.(weight|bias)", name)
        if match and match[2] in _LAYER_NAMES:
            name = f"encoder.layer.{match[1]}.{_LAYER_NAMES[match[2]]}.{match[3]}"
        return name, tensor
