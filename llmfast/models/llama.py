"""Llama-style decoders (Llama 2/3, Mistral, Qwen2, Qwen3): pre-RMSNorm, RoPE, GQA, SwiGLU.

The families differ only in flags of ``LlamaConfig``: Qwen2 has q/k/v biases, Qwen3 RMS-normalises each
query and key head before RoPE, Mistral may have a sliding window. Parameter names are Hugging Face's.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from llmfast.models.base import CausalLM
from llmfast.models.layers import KVCache, activation, attend
from llmfast.models.metadata import AttentionMetadata
from llmfast.models.rope import RopeConfig, RotaryEmbedding, apply_rotary
from llmfast.nn import FusedAddRMSNorm, RMSNorm

MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3")


@dataclass
class LlamaConfig:
    model_type: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    hidden_act: str
    max_position_embeddings: int
    tie_word_embeddings: bool
    qkv_bias: bool  # biases on q_proj, k_proj, v_proj
    o_bias: bool  # bias on o_proj
    mlp_bias: bool
    qk_norm: bool  # Qwen3: RMSNorm over head_dim of each query and key head
    sliding_window: int | None  # the window of the layers that have one (None: no layer has)
    rope: RopeConfig

    @classmethod
    def from_hf(cls, hf: dict) -> LlamaConfig:
        """Reads a Hugging Face ``config.json`` dict of one of ``MODEL_TYPES``."""
        model_type = hf["model_type"]
        if model_type not in MODEL_TYPES:
            raise ValueError(f"model_type: expected one of {MODEL_TYPES}, got {model_type!r}")
        num_heads, num_layers = hf["num_attention_heads"], hf["num_hidden_layers"]
        head_dim = hf.get("head_dim") or hf["hidden_size"] // num_heads
        attention_bias = hf.get("attention_bias", False)
        return cls(
            model_type=model_type,
            vocab_size=hf["vocab_size"],
            hidden_size=hf["hidden_size"],
            intermediate_size=hf["intermediate_size"],
            num_layers=num_layers,
            num_heads=num_heads,
            num_kv_heads=hf.get("num_key_value_heads") or num_heads,
            head_dim=head_dim,
            rms_norm_eps=hf.get("rms_norm_eps", 1e-6),
            hidden_act=hf.get("hidden_act", "silu"),
            max_position_embeddings=hf.get("max_position_embeddings", 2048),
            tie_word_embeddings=hf.get("tie_word_embeddings", False),
            # which biases each family's transformers class builds (the others ignore these config fields)
            qkv_bias={"qwen2": True, "mistral": False}.get(model_type, attention_bias),
            o_bias=attention_bias if model_type in ("llama", "qwen3") else False,
            mlp_bias=hf.get("mlp_bias", False) if model_type == "llama" else False,
            qk_norm=model_type == "qwen3",
            sliding_window=_sliding_window(hf, model_type, num_layers),
            rope=RopeConfig.from_hf(hf, head_dim),
        )


def _sliding_window(hf: dict, model_type: str, num_layers: int) -> int | None:
    """The window of the sliding-window layers, or None when every layer attends over all keys."""
    window = hf.get("sliding_window")
    if window is None:
        return None
    if hf.get("layer_types") is not None:  # transformers >= 4.54 lists each layer's kind
        return window if "sliding_attention" in hf["layer_types"] else None
    if model_type in ("qwen2", "qwen3"):  # older Qwen configs: a switch, and the layers from which it applies
        slides = hf.get("use_sliding_window", False) and hf.get("max_window_layers", num_layers) < num_layers
        return window if slides else None
    return window


class LlamaAttention(nn.Module):
    def __init__(self, cfg: LlamaConfig):
        super().__init__()
        self.num_heads, self.num_kv_heads, self.head_dim = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        self.q_proj = nn.Linear(cfg.hidden_size, cfg.num_heads * cfg.head_dim, bias=cfg.qkv_bias)
        self.k_proj = nn.Linear(cfg.hidden_size, cfg.num_kv_heads * cfg.head_dim, bias=cfg.qkv_bias)
        self.v_proj = nn.Linear(cfg.hidden_size, cfg.num_kv_heads * cfg.head_dim, bias=cfg.qkv_bias)
        self.o_proj = nn.Linear(cfg.num_heads * cfg.head_dim, cfg.hidden_size, bias=cfg.o_bias)
        self.q_norm = RMSNorm(cfg.head_dim, eps=cfg.rms_norm_eps) if cfg.qk_norm else None
        self.k_norm = RMSNorm(cfg.head_dim, eps=cfg.rms_norm_eps) if cfg.qk_norm else None

    def forward(self, x, cos, sin, meta: AttentionMetadata, kv_cache: KVCache | None) -> torch.Tensor:
        tokens = x.shape[0]
        q = self.q_proj(x).view(tokens, self.num_heads, self.head_dim)  # (tokens, heads, head_dim)
        k = self.k_proj(x).view(tokens, self.num_kv_heads, self.head_dim)  # (tokens, kv_heads, head_dim)
        v = self.v_proj(x).view(tokens, self.num_kv_heads, self.head_dim)  # (tokens, kv_heads, head_dim)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        o = attend(q, k, v, meta, kv_cache, causal=True)  # (tokens, heads, head_dim)
        return self.o_proj(o.reshape(tokens, self.num_heads * self.head_dim))


class LlamaMLP(nn.Module):
    """SwiGLU: ``down(act(gate(x)) * up(x))``."""

    def __init__(self, cfg: LlamaConfig):
        super().__init__()
        self.gate_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=cfg.mlp_bias)
        self.up_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=cfg.mlp_bias)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=cfg.mlp_bias)
        self.act = activation(cfg.hidden_act)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act(self.gate_proj(x)) * self.up_proj(x))


class LlamaDecoderLayer(nn.Module):
    def __init__(self, cfg: LlamaConfig):
        super().__init__()
        self.self_attn = LlamaAttention(cfg)
        self.mlp = LlamaMLP(cfg)
        self.input_layernorm = FusedAddRMSNorm(cfg.hidden_size, eps=cfg.rms_norm_eps)
        self.post_attention_layernorm = FusedAddRMSNorm(cfg.hidden_size, eps=cfg.rms_norm_eps)

    def forward(self, x, residual, cos, sin, meta, kv_cache) -> tuple[torch.Tensor, torch.Tensor]:
        """``(x, residual) -> (x', residual')``: the residual add is fused into the next norm, so the
        stream is ``residual' + x'`` (the first layer gets ``residual=None``)."""
        x, residual = self.input_layernorm(x, residual)
        x = self.self_attn(x, cos, sin, meta, kv_cache)
        x, residual = self.post_attention_layernorm(x, residual)
        return self.mlp(x), residual


class LlamaModel(nn.Module):
    def __init__(self, cfg: LlamaConfig):
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(LlamaDecoderLayer(cfg) for _ in range(cfg.num_layers))
        self.norm = FusedAddRMSNorm(cfg.hidden_size, eps=cfg.rms_norm_eps)
        self.rotary_emb = RotaryEmbedding(cfg.rope)

    def forward(self, input_ids, positions, meta, kv_caches) -> torch.Tensor:
        x, residual = self.embed_tokens(input_ids), None  # (tokens, hidden)
        cos, sin = self.rotary_emb(positions)  # (tokens, head_dim) each, shared by every layer
        for i, layer in enumerate(self.layers):
            x, residual = layer(x, residual, cos, sin, meta, None if kv_caches is None else kv_caches[i])
        return self.norm(x, residual)[0]


class LlamaForCausalLM(CausalLM):
    """A Llama-family decoder on flattened tokens: ``forward`` -> hidden states, ``compute_logits`` -> logits."""

    config_class = LlamaConfig
    base_model_prefix = "model"

    def __init__(self, cfg: LlamaConfig):
        super().__init__(cfg)
        self.model = LlamaModel(cfg)
        self.add_lm_head(self.model.embed_tokens)

    def load_hf_tensor(self, name: str, tensor: torch.Tensor) -> tuple[str, torch.Tensor] | None:
        """A checkpoint tensor as (parameter name, value), or None for one this model does not use."""
        if name.endswith("rotary_emb.inv_freq"):  # saved by old transformers; recomputed here
            return None
        return name, tensor
