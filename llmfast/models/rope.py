"""Rotary position embeddings (RoPE) as Hugging Face computes them, with its ``rope_scaling`` types."""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

ROPE_TYPES = ("default", "linear", "dynamic", "llama3", "yarn")


@dataclass
class RopeConfig:
    """The RoPE of one model: ``rope_type`` picks how ``inv_freq`` is derived from ``theta``."""

    head_dim: int
    theta: float = 10000.0
    rope_type: str = "default"
    factor: float = 1.0
    max_position_embeddings: int = 2048  # dynamic: the length past which the base grows
    original_max_position_embeddings: int = 2048  # llama3, yarn: the pretraining length
    low_freq_factor: float = 1.0  # llama3
    high_freq_factor: float = 4.0  # llama3
    beta_fast: float = 32.0  # yarn
    beta_slow: float = 1.0  # yarn
    attention_factor: float | None = None  # yarn: scales cos and sin (None: derived from factor)
    truncate: bool = True  # yarn

    @classmethod
    def from_hf(cls, hf: dict, head_dim: int) -> RopeConfig:
        """Reads ``rope_parameters`` (transformers >= 5) and ``rope_scaling`` + ``rope_theta`` (older); where a
        config holds both, ``rope_scaling``'s entries win, as transformers reads them (a scaling added by hand
        to a saved config)."""
        params = {**(hf.get("rope_parameters") or {}), **(hf.get("rope_scaling") or {})}
        if any(isinstance(value, dict) for value in params.values()):
            raise ValueError(f"rope_parameters: per-layer-type RoPE is not supported, got {params}")
        rope_type = params.get("rope_type", params.get("type", "default"))
        if rope_type not in ROPE_TYPES:
            raise ValueError(f"rope_scaling: rope_type {rope_type!r} is not supported; expected one of {ROPE_TYPES}")
        max_pos = hf.get("max_position_embeddings", 2048)
        original = params.get("original_max_position_embeddings") or hf.get("original_max_position_embeddings")
        original = original or max_pos
        factor = params.get("factor")
        if factor is None:  # yarn may leave it out: the ratio of the extended to the pretraining length
            factor = max_pos / original if rope_type == "yarn" else 1.0
        attention_factor = params.get("attention_factor")
        if rope_type == "yarn" and attention_factor is None and params.get("mscale") and params.get("mscale_all_dim"):
            attention_factor = _yarn_mscale(factor, params["mscale"]) / _yarn_mscale(factor, params["mscale_all_dim"])
        return cls(
            head_dim=head_dim,
            theta=float(params.get("rope_theta", hf.get("rope_theta", 10000.0))),
            rope_type=rope_type,
            factor=float(factor),
            max_position_embeddings=max_pos,
            original_max_position_embeddings=original,
            low_freq_factor=params.get("low_freq_factor", 1.0),
            high_freq_factor=params.get("high_freq_factor", 4.0),
            beta_fast=params.get("beta_fast") or 32.0,
            beta_slow=params.get("beta_slow") or 1.0,
            attention_factor=attention_factor,
            truncate=params.get("truncate", True),
        )


def _yarn_mscale(factor: float, mscale: float = 1.0) -> float:
    return 0.1 * mscale * math.log(factor) + 1.0 if factor > 1 else 1.0


def _default_inv_freq(theta: float | torch.Tensor, dim: int) -> torch.Tensor:
    return 1.0 / (theta ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim))  # (dim / 2,)


def _llama3_inv_freq(cfg: RopeConfig) -> torch.Tensor:
    """Llama 3.1: long wavelengths slowed down by ``factor``, short ones kept, a smooth ramp between."""
    inv_freq = _default_inv_freq(cfg.theta, cfg.head_dim)
    old_len = cfg.original_max_position_embeddings
    low_freq_wavelen, high_freq_wavelen = old_len / cfg.low_freq_factor, old_len / cfg.high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_freq_wavelen, inv_freq / cfg.factor, inv_freq)
    smooth = (old_len / wavelen - cfg.low_freq_factor) / (cfg.high_freq_factor - cfg.low_freq_factor)
    smoothed = (1 - smooth) * scaled / cfg.factor + smooth * scaled
    medium = (wavelen >= high_freq_wavelen) & (wavelen <= low_freq_wavelen)
    return torch.where(medium, smoothed, scaled)


def _yarn_inv_freq(cfg: RopeConfig) -> tuple[torch.Tensor, float]:
    """YaRN: interpolate low frequencies, extrapolate high ones, with a linear ramp between."""
    dim, base = cfg.head_dim, cfg.theta

    def correction_dim(rotations: float) -> float:  # the dimension that turns ``rotations`` times
        return dim * math.log(cfg.original_max_position_embeddings / (rotations * 2 * math.pi)) / (2 * math.log(base))

    low, high = correction_dim(cfg.beta_fast), correction_dim(cfg.beta_slow)
    if cfg.truncate:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001  # avoids a zero-width ramp
    ramp = ((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low)).clamp(0, 1)
    extrapolation = 1 - ramp
    pos_freqs = base ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim)
    inv_freq = (1 / (cfg.factor * pos_freqs)) * (1 - extrapolation) + (1 / pos_freqs) * extrapolation
    attention_factor = _yarn_mscale(cfg.factor) if cfg.attention_factor is None else cfg.attention_factor
    return inv_freq, attention_factor


def rope_inv_freq(cfg: RopeConfig) -> tuple[torch.Tensor, float]:
    """``(inv_freq (head_dim / 2,) float32, attention_scaling)`` for positions within the configured length."""
    if cfg.rope_type == "llama3":
        return _llama3_inv_freq(cfg), 1.0
    if cfg.rope_type == "yarn":
        return _yarn_inv_freq(cfg)
    inv_freq = _default_inv_freq(cfg.theta, cfg.head_dim)
    return (inv_freq / cfg.factor if cfg.rope_type == "linear" else inv_freq), 1.0


class RotaryEmbedding(torch.nn.Module):
    """``forward(positions (tokens,)) -> (cos, sin)``, each ``(tokens, head_dim)`` float32."""

    def __init__(self, cfg: RopeConfig):
        super().__init__()
        self.cfg = cfg
        self.register_buffer("inv_freq", torch.empty(cfg.head_dim // 2), persistent=False)
        self.reset_inv_freq()

    def reset_inv_freq(self) -> None:
        """Recomputes ``inv_freq`` (float32, on the module's device), e.g. after ``to_empty``."""
        inv_freq, self.attention_scaling = rope_inv_freq(self.cfg)
        self.inv_freq = inv_freq.to(self.inv_freq.device)

    def _dynamic_inv_freq(self, positions: torch.Tensor) -> torch.Tensor:
        """Dynamic NTK, as transformers: past ``max_position_embeddings`` the base grows with the longest
        position of this call (of any sequence in it), so cached keys keep the frequencies they had."""
        cfg, dim = self.cfg, self.cfg.head_dim
        max_pos = cfg.max_position_embeddings
        seq_len = (positions.max() + 1).clamp(min=max_pos).float()  # stays on device: no sync
        base = cfg.theta * ((cfg.factor * seq_len / max_pos) - (cfg.factor - 1)) ** (dim / (dim - 2))
        return 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.float32, device=positions.device) / dim))

    def forward(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        dynamic = self.cfg.rope_type == "dynamic" and positions.numel() > 0
        inv_freq = self._dynamic_inv_freq(positions) if dynamic else self.inv_freq
        freqs = positions[:, None].float() * inv_freq  # (tokens, head_dim / 2)
        emb = torch.cat((freqs, freqs), dim=-1)  # (tokens, head_dim)
        return emb.cos() * self.attention_scaling, emb.sin() * self.attention_scaling


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotates ``x (tokens, heads, head_dim)`` by ``cos, sin (tokens, head_dim)`` (GPT-NeoX halves layout)."""
    cos, sin = cos[:, None, :].to(x.dtype), sin[:, None, :].to(x.dtype)  # (tokens, 1, head_dim)
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat((-x2, x1), dim=-1) * sin
