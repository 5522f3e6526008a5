"""GPT-2: learned absolute positions, pre-LayerNorm, GELU MLP, tied input/output embeddings.

Parameter names are Hugging Face's; its ``Conv1D`` weights, stored ``(in, out)``, are transposed at load
into ``nn.Linear``'s ``(out, in)``.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from llmfast.models.base import CausalLM
from llmfast.models.layers import KVCache, activation, attend
from llmfast.models.metadata import AttentionMetadata
from llmfast.nn import FusedAddLayerNorm

_CONV1D_WEIGHTS = (".attn.c_attn.weight", ".attn.c_proj.weight", ".mlp.c_fc.weight", ".mlp.c_proj.weight")
_UNUSED = (".attn.bias", ".attn.masked_bias")  # causal-mask buffers that old checkpoints saved


@dataclass
class GPT2Config:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    max_position_embeddings: int
    layer_norm_eps: float
    activation: str
    scale_attn_weights: bool  # scores divided by sqrt(head_dim)
    scale_attn_by_inverse_layer_idx: bool  # and by layer index + 1
    tie_word_embeddings: bool

    @property
    def num_kv_heads(self) -> int:
        return self.num_heads

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @classmethod
    def from_hf(cls, hf: dict) -> GPT2Config:
        if hf.get("add_cross_attention"):
            raise ValueError("add_cross_attention: GPT-2 with cross-attention is not supported")
        hidden = hf.get("n_embd", 768)
        return cls(
            vocab_size=hf.get("vocab_size", 50257),
            hidden_size=hidden,
            intermediate_size=hf.get("n_inner") or 4 * hidden,
            num_layers=hf.get("n_layer", 12),
            num_heads=hf.get("n_head", 12),
            max_position_embeddings=hf.get("n_positions", 1024),
            layer_norm_eps=hf.get("layer_norm_epsilon", 1e-5),
            activation=hf.get("activation_function", "gelu_new"),
            scale_attn_weights=hf.get("scale_attn_weights", True),
            scale_attn_by_inverse_layer_idx=hf.get("scale_attn_by_inverse_layer_idx", False),
            tie_word_embeddings=hf.get("tie_word_embeddings", True),
        )


class GPT2Attention(nn.Module):
    def __init__(self, cfg: GPT2Config, layer_idx: int):
        super().__init__()
        self.num_heads, self.head_dim = cfg.num_heads, cfg.head_dim
        self.c_attn = nn.Linear(cfg.hidden_size, 3 * cfg.hidden_size)
        self.c_proj = nn.Linear(cfg.hidden_size, cfg.hidden_size)
        scale = cfg.head_dim**-0.5 if cfg.scale_attn_weights else 1.0
        self.softmax_scale = scale / (layer_idx + 1) if cfg.scale_attn_by_inverse_layer_idx else scale

    def forward(self, x, meta: AttentionMetadata, kv_cache: KVCache | None) -> torch.Tensor:
        tokens = x.shape[0]
        qkv = self.c_attn(x).view(tokens, 3, self.num_heads, self.head_dim)  # (tokens, 3, heads, head_dim)
        q, k, v = (t.contiguous() for t in qkv.unbind(dim=1))  # (tokens, heads, head_dim) each
        o = attend(q, k, v, meta, kv_cache, causal=True, softmax_scale=self.softmax_scale)
        return self.c_proj(o.reshape(tokens, self.num_heads * self.head_dim))


class GPT2MLP(nn.Module):
    def __init__(self, cfg: GPT2Config):
        super().__init__()
        self.c_fc = nn.Linear(cfg.hidden_size, cfg.intermediate_size)
        self.c_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size)
        self.act = activation(cfg.activation)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.c_proj(self.act(self.c_fc(x)))


class GPT2Block(nn.Module):
    def __init__(self, cfg: GPT2Config, layer_idx: int):
        super().__init__()
        self.ln_1 = FusedAddLayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.attn = GPT2Attention(cfg, layer_idx)
        self.ln_2 = FusedAddLayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.mlp = GPT2MLP(cfg)

    def forward(self, x, residual, meta, kv_cache) -> tuple[torch.Tensor, torch.Tensor]:
        """``(x, residual) -> (x', residual')``, the residual add fused into the next LayerNorm."""
        x, residual = self.ln_1(x, residual)
        x = self.attn(x, meta, kv_cache)
        x, residual = self.ln_2(x, residual)
        return self.mlp(x), residual


class GPT2Model(nn.Module):
    def __init__(self, cfg: GPT2Config):
        super().__init__()
        self.wte = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.wpe = nn.Embedding(cfg.max_position_embeddings, cfg.hidden_size)
        self.h = nn.ModuleList(GPT2Block(cfg, i) for i in range(cfg.num_layers))
        self.ln_f = FusedAddLayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)

    def forward(self, input_ids, positions, meta, kv_caches) -> torch.Tensor:
        x, residual = self.wte(input_ids) + self.wpe(positions), None  # (tokens, hidden)
        for i, block in enumerate(self.h):
            x, residual = block(x, residual, meta, None if kv_caches is None else kv_caches[i])
        return self.ln_f(x, residual)[0]


class GPT2LMHeadModel(CausalLM):
    """GPT-2 on flattened tokens: ``forward`` -> hidden states, ``compute_logits`` -> logits; ``positions``
    must be below ``max_position_embeddings`` (the learned table's length)."""

    config_class = GPT2Config
    base_model_prefix = "transformer"
    learned_positions = True

    def __init__(self, cfg: GPT2Config):
        super().__init__(cfg)
        self.transformer = GPT2Model(cfg)
        self.add_lm_head(self.transformer.wte)

    def load_hf_tensor(self, name: str, tensor: torch.Tensor) -> tuple[str, torch.Tensor] | None:
        """A checkpoint tensor as (parameter name, value), or None for one this model does not use."""
        if name.endswith(_UNUSED):
            return None
        if not name.startswith(("transformer.", "lm_head.")):  # saved from GPT2Model, as openai-community/gpt2
            name = "transformer." + name
        if name.endswith(_CONV1D_WEIGHTS):
            tensor = tensor.t()  # Conv1D (in, out) -> Linear (out, in)
        return name, tensor
