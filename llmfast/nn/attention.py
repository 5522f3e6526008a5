"""Drop-in ``torch.nn.MultiheadAttention`` whose attention runs through ``llmfast.ops.attention``."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from llmfast.ops._checks import FLOAT_DTYPES, check_positive_int, values_readable
from llmfast.ops.attention import attention


class MultiheadAttention(torch.nn.Module):
    """``torch.nn.MultiheadAttention`` with the same constructor, parameter names and state dict.

    Differences: ``batch_first`` defaults to True. ``forward`` returns ``(out, weights)`` as torch does;
    the fused path (``llmfast.ops.attention``, no ``(L, S)`` score matrix in memory) serves
    ``need_weights=False`` with no mask, a causal mask (``is_causal=True``, or an ``attn_mask`` that is
    exactly the causal one), a boolean ``key_padding_mask`` (any pattern without causal masking; right
    padding with it) and no dropout in training. Everything else — ``need_weights=True`` (torch's
    default), other or float masks, ``add_bias_kv``/``add_zero_attn``, dropout while training — falls
    back to plain PyTorch math with the same semantics as torch (a query that may see no key outputs 0 with
    ``need_weights=False`` and NaN with ``need_weights=True``, as torch's). float64 runs the math path.
    """

    def __init__(self, embed_dim: int, num_heads: int, dropout: float = 0.0, bias: bool = True,
                 add_bias_kv: bool = False, add_zero_attn: bool = False, kdim: int | None = None,
                 vdim: int | None = None, batch_first: bool = True, device=None, dtype=None,
                 backend: str = "auto") -> None:
        super().__init__()
        check_positive_int("embed_dim", embed_dim)
        if not isinstance(num_heads, int) or num_heads <= 0 or embed_dim % num_heads:
            raise ValueError(f"num_heads: expected a positive divisor of embed_dim={embed_dim}, got {num_heads!r}")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout: expected a probability in [0, 1), got {dropout!r}")
        factory = {"device": device, "dtype": dtype}
        self.embed_dim, self.num_heads, self.head_dim = embed_dim, num_heads, embed_dim // num_heads
        self.kdim = embed_dim if kdim is None else kdim
        self.vdim = embed_dim if vdim is None else vdim
        self._qkv_same_embed_dim = self.kdim == embed_dim and self.vdim == embed_dim
        self.dropout, self.batch_first, self.add_zero_attn, self.backend = dropout, batch_first, add_zero_attn, backend

        def weight(cols: int, rows: int = embed_dim) -> torch.nn.Parameter:
            return torch.nn.Parameter(torch.empty(rows, cols, **factory))

        if self._qkv_same_embed_dim:
            self.in_proj_weight = weight(embed_dim, 3 * embed_dim)
            self.register_parameter("q_proj_weight", None)
            self.register_parameter("k_proj_weight", None)
            self.register_parameter("v_proj_weight", None)
        else:
            self.q_proj_weight, self.k_proj_weight, self.v_proj_weight = weight(embed_dim), weight(self.kdim), weight(self.vdim)
            self.register_parameter("in_proj_weight", None)
        self.in_proj_bias = torch.nn.Parameter(torch.empty(3 * embed_dim, **factory)) if bias else None
        self.out_proj = torch.nn.Linear(embed_dim, embed_dim, bias=bias, **factory)
        if add_bias_kv:
            self.bias_k = torch.nn.Parameter(torch.empty(1, 1, embed_dim, **factory))
            self.bias_v = torch.nn.Parameter(torch.empty(1, 1, embed_dim, **factory))
        else:
            self.bias_k = self.bias_v = None
        self._reset_parameters()

    def _reset_parameters(self) -> None:
        """torch's initialisation, so a fresh module is distributed like a fresh torch one."""
        for w in (self.in_proj_weight, self.q_proj_weight, self.k_proj_weight, self.v_proj_weight):
            if w is not None:
                torch.nn.init.xavier_uniform_(w)
        if self.in_proj_bias is not None:
            torch.nn.init.zeros_(self.in_proj_bias)
            torch.nn.init.zeros_(self.out_proj.bias)
        for b in (self.bias_k, self.bias_v):
            if b is not None:
                torch.nn.init.xavier_normal_(b)

    def _project(self, query, key, value):
        """``(q, k, v)``, each ``(batch, seq, embed_dim)``: the input projections."""
        biases = (None, None, None) if self.in_proj_bias is None else self.in_proj_bias.chunk(3)
        if self._qkv_same_embed_dim:
            if query is key and key is value:  # self-attention: one matmul for all three
                return F.linear(query, self.in_proj_weight, self.in_proj_bias).chunk(3, dim=-1)
            weights = self.in_proj_weight.chunk(3)
        else:
            weights = (self.q_proj_weight, self.k_proj_weight, self.v_proj_weight)
        return tuple(F.linear(x, w, b) for x, w, b in zip((query, key, value), weights, biases))

    def forward(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                key_padding_mask: torch.Tensor | None = None, need_weights: bool = True,
                attn_mask: torch.Tensor | None = None, average_attn_weights: bool = True,
                is_causal: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``query (batch, L, embed_dim)``, ``key (batch, S, kdim)``, ``value (batch, S, vdim)`` (seq first
        when ``batch_first=False``; unbatched 2-D inputs too) -> ``(out like query, weights or None)``.

        ``key_padding_mask (batch, S)``: True (or a float added to the scores) marks keys to ignore.
        ``attn_mask (L, S)`` or ``(batch * num_heads, L, S)``: True forbids, a float is added.
        ``is_causal``: query ``i`` sees keys ``j <= i``; with an ``attn_mask`` it is torch's hint that
        the mask is causal, without one the causal mask is implied. ``weights``: ``(batch, L, S)``
        averaged over heads, or ``(batch, num_heads, L, S)``.
        """
        self._check_inputs(query, key, value)
        unbatched = query.dim() == 2
        if unbatched:
            query, key, value = query[None], key[None], value[None]
            key_padding_mask = None if key_padding_mask is None else key_padding_mask[None]
        elif not self.batch_first:
            query, key, value = (t.transpose(0, 1) for t in (query, key, value))
        self._check_masks(query, key, key_padding_mask, attn_mask)

        # a mask's values cannot be read under torch.compile: there an explicit mask takes the math path
        causal = is_causal or (attn_mask is not None and values_readable()
                               and _is_causal_mask(attn_mask, query.shape[1], key.shape[1]))
        fused = (
            not need_weights
            and query.dtype in FLOAT_DTYPES
            and (attn_mask is None or causal)
            # the fused padding paths gather by the mask's values, which torch.compile cannot trace
            and (key_padding_mask is None or (key_padding_mask.dtype == torch.bool and values_readable()))
            and self.bias_k is None
            and not self.add_zero_attn
            and not (self.training and self.dropout > 0)
        )
        q, k, v = self._project(query, key, value)
        out = self._fused(q, k, v, key_padding_mask, causal) if fused else None
        weights = None
        if out is None:
            if causal and attn_mask is None:
                attn_mask = torch.ones(q.shape[1], k.shape[1], dtype=torch.bool, device=q.device).triu(1)
            out, weights = self._math(q, k, v, key_padding_mask, attn_mask, need_weights, average_attn_weights)
        out = self.out_proj(out)
        if unbatched:
            return out[0], None if weights is None else weights[0]
        return (out if self.batch_first else out.transpose(0, 1)), weights

    def _fused(self, q, k, v, key_padding_mask, causal) -> torch.Tensor | None:
        """Attention through llmfast.ops.attention, ``(batch, L, embed_dim)``; None when the masks need
        the general path (causal with a padding that is not right padding, or queries and keys of
        different lengths with causal masking, where torch aligns top-left and llmfast bottom-right)."""
        batch, len_q, len_k = q.shape[0], q.shape[1], k.shape[1]
        if causal and len_q != len_k:
            return None
        heads, head_dim = self.num_heads, self.head_dim
        q = q.unflatten(-1, (heads, head_dim))  # (batch, L, heads, head_dim)
        k = k.unflatten(-1, (heads, head_dim))  # (batch, S, heads, head_dim)
        v = v.unflatten(-1, (heads, head_dim))  # (batch, S, heads, head_dim)
        if key_padding_mask is None:
            out = attention(q, k, v, causal=causal, backend=self.backend)
            return out.flatten(-2)
        keep = ~key_padding_mask  # (batch, S)
        lengths_k = keep.sum(dim=1)
        if causal:
            right_padded = torch.equal(keep, torch.arange(len_k, device=keep.device) < lengths_k[:, None])
            return self._fused_causal_right_padded(q, k, v, lengths_k) if right_padded else None
        out = self._varlen(q.flatten(0, 1), k[keep], v[keep], [len_q] * batch, lengths_k.tolist(), causal=False)
        return out.view(batch, len_q, -1)

    def _fused_causal_right_padded(self, q, k, v, lengths_k) -> torch.Tensor:
        """Causal self-attention over right-padded keys: a query at a real position ``i < len`` sees keys
        ``0..i``; a query at a padded position sees every real key (torch's mask is their intersection)."""
        seqlen = q.shape[1]
        keep = torch.arange(seqlen, device=q.device) < lengths_k[:, None]  # (batch, S)
        lengths = lengths_k.tolist()
        out = torch.empty_like(q)
        out[keep] = self._varlen(q[keep], k[keep], v[keep], lengths, lengths, causal=True)
        pad = ~keep
        if pad.any():
            pad_lengths = [seqlen - n for n in lengths]
            out[pad] = self._varlen(q[pad], k[keep], v[keep], pad_lengths, lengths, causal=False)
        return out.flatten(-2)

    def _varlen(self, q, k, v, lengths_q, lengths_k, *, causal) -> torch.Tensor:
        """Packed ``q (total_q, heads, head_dim)`` over packed ``k, v`` -> ``(total_q, heads, head_dim)``."""
        cu_q = torch.tensor([0, *lengths_q], device=q.device).cumsum(0).to(torch.int32)
        cu_k = torch.tensor([0, *lengths_k], device=q.device).cumsum(0).to(torch.int32)
        return attention(q, k, v, causal=causal, cu_seqlens_q=cu_q, cu_seqlens_k=cu_k,
                         max_seqlen_q=max(lengths_q, default=0), max_seqlen_k=max(lengths_k, default=0),
                         backend=self.backend)

    def _math(self, q, k, v, key_padding_mask, attn_mask, need_weights, average_attn_weights):
        """torch's semantics in plain PyTorch: ``(out (batch, L, embed_dim), weights or None)``."""
        batch, len_q, heads, head_dim = q.shape[0], q.shape[1], self.num_heads, self.head_dim
        if self.bias_k is not None:
            k = torch.cat([k, self.bias_k.expand(batch, 1, -1)], dim=1)
            v = torch.cat([v, self.bias_v.expand(batch, 1, -1)], dim=1)
            attn_mask = _pad_last(attn_mask)
            key_padding_mask = _pad_last(key_padding_mask)
        if self.add_zero_attn:
            k = torch.cat([k, k.new_zeros(batch, 1, k.shape[-1])], dim=1)
            v = torch.cat([v, v.new_zeros(batch, 1, v.shape[-1])], dim=1)
            attn_mask = _pad_last(attn_mask)
            key_padding_mask = _pad_last(key_padding_mask)
        q, k, v = (t.unflatten(-1, (heads, head_dim)).transpose(1, 2) for t in (q, k, v))  # (batch, heads, seq, head_dim)
        scores = (q * head_dim**-0.5) @ k.transpose(-1, -2)  # (batch, heads, L, S)
        if attn_mask is not None:
            mask = _additive(attn_mask, scores.dtype)
            scores = scores + (mask.view(batch, heads, *mask.shape[1:]) if mask.dim() == 3 else mask)
        if key_padding_mask is not None:
            scores = scores + _additive(key_padding_mask, scores.dtype)[:, None, None, :]
        if need_weights:
            probs = torch.softmax(scores, dim=-1)
        else:  # torch runs SDPA then, whose safe softmax gives a query that sees no key 0, not NaN; masking
            # those rows before the softmax as well keeps NaN out of the backward
            blind = scores.isneginf().all(dim=-1, keepdim=True)
            probs = torch.softmax(scores.masked_fill(blind, 0.0), dim=-1).masked_fill(blind, 0.0)
        if self.training and self.dropout > 0:
            probs = F.dropout(probs, p=self.dropout)  # the weights returned are these too, as torch's
        out = (probs @ v).transpose(1, 2).reshape(batch, len_q, -1)  # (batch, L, embed_dim)
        if not need_weights:
            return out, None
        return out, probs.mean(dim=1) if average_attn_weights else probs

    def _check_inputs(self, query, key, value) -> None:
        for name, t in (("query", query), ("key", key), ("value", value)):
            if not isinstance(t, torch.Tensor):
                raise TypeError(f"{name}: expected a tensor, got {type(t).__name__}")
            want = self.out_proj.weight.dtype
            if t.dtype != want and not (t.is_floating_point() and torch.is_autocast_enabled(t.device.type)):
                raise TypeError(f"{name}: expected dtype {want} (the module's parameters'), got {t.dtype}")
        if query.dim() not in (2, 3) or key.dim() != query.dim() or value.dim() != query.dim():
            raise ValueError(
                f"query, key, value: expected 3 dims (batched) or 2 (unbatched) each, got shapes "
                f"{tuple(query.shape)}, {tuple(key.shape)}, {tuple(value.shape)}"
            )
        for name, t, dim in (("query", query, self.embed_dim), ("key", key, self.kdim), ("value", value, self.vdim)):
            if t.shape[-1] != dim:
                raise ValueError(f"{name}: expected last dim {dim}, got shape {tuple(t.shape)}")
        if key.shape[:-1] != value.shape[:-1]:
            raise ValueError(f"value: expected the batch and sequence dims of key {tuple(key.shape[:-1])}, "
                             f"got shape {tuple(value.shape)}")
        batch_dim = 0 if self.batch_first or query.dim() == 2 else 1
        if query.dim() == 3 and query.shape[batch_dim] != key.shape[batch_dim]:
            raise ValueError(f"key: expected batch size {query.shape[batch_dim]} (query's), got shape {tuple(key.shape)}")

    def _check_masks(self, query, key, key_padding_mask, attn_mask) -> None:
        batch, len_q, len_k = query.shape[0], query.shape[1], key.shape[1]
        if key_padding_mask is not None and tuple(key_padding_mask.shape) != (batch, len_k):
            raise ValueError(f"key_padding_mask: expected shape {(batch, len_k)}, got {tuple(key_padding_mask.shape)}")
        if attn_mask is not None and tuple(attn_mask.shape) not in ((len_q, len_k), (batch * self.num_heads, len_q, len_k)):
            raise ValueError(f"attn_mask: expected shape {(len_q, len_k)} or {(batch * self.num_heads, len_q, len_k)}, "
                             f"got {tuple(attn_mask.shape)}")
        for name, mask in (("key_padding_mask", key_padding_mask), ("attn_mask", attn_mask)):
            if mask is not None and mask.dtype != torch.bool and not mask.is_floating_point():
                raise TypeError(f"{name}: expected a bool or float tensor, got {mask.dtype}")


def _is_causal_mask(attn_mask: torch.Tensor, len_q: int, len_k: int) -> bool:
    """Whether a 2-D mask is exactly torch's causal mask (True / -inf above the diagonal, else False / 0)."""
    if attn_mask.dim() != 2:
        return False
    upper = torch.ones(len_q, len_k, dtype=torch.bool, device=attn_mask.device).triu(1)
    if attn_mask.dtype == torch.bool:
        return torch.equal(attn_mask, upper)
    return bool(((attn_mask == float("-inf")) == upper).all() and (attn_mask[~upper] == 0).all())


def _additive(mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """A bool mask (True forbids) as 0 / -inf in ``dtype``; a float mask as is."""
    if mask.dtype == torch.bool:
        return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill(mask, float("-inf"))
    return mask.to(dtype)


def _pad_last(mask: torch.Tensor | None) -> torch.Tensor | None:
    """One more key column that nothing forbids (for ``bias_k`` or the zero key)."""
    return None if mask is None else F.pad(mask, (0, 1))
