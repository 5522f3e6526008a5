"""Hugging Face model patching: one transformers model instance runs on llmfast's norms, attention and
(optionally) quantized linear layers, with the same weights, state_dict keys and results.

Attention goes through transformers' own dispatch: ``llmfast_attention`` is registered in its
``AttentionInterface`` under ``"llmfast"`` (with ``sdpa_mask`` as its mask builder) and selected on the
patched model's config alone. What llmfast's attention cannot express (a sliding window that bites, packed
sequences, a float or per-head mask, dropout, softcap, ...) is handed to transformers' SDPA path, so every
call keeps transformers' results; ``output_attentions=True`` runs a plain-PyTorch attention that returns its
probabilities, as transformers' eager attention does.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
from torch import nn

from llmfast import ops
from llmfast.nn import FusedAddLayerNorm, FusedAddRMSNorm, LayerNorm, RMSNorm
from llmfast.nn.replace import replace_children
from llmfast.ops._checks import FLOAT_DTYPES, values_readable
from llmfast.ops.attention import MAX_HEAD_DIM, autocast_inputs

ATTENTION_NAME = "llmfast"
QUANTIZE_BITS = (4, 8)
_SDPA_ONLY_KWARGS = ("softcap", "s_aux", "position_bias", "cache")  # features llmfast's attention lacks


@dataclass(frozen=True)
class Family:
    """What ``patch`` swaps in one model family (every ``torch.nn.LayerNorm`` is swapped in all of them)."""

    rms_norms: tuple[str, ...] = ()  # RMSNorm classes (``weight``, ``variance_epsilon``) -> llmfast.nn.RMSNorm
    post_ln: tuple[str, ...] = ()  # modules computing LayerNorm(dropout(dense(x)) + input): add fused into norm


# config.model_type -> its family: every transformers class of these types (ForCausalLM, Model, ...) is supported
SUPPORTED: dict[str, Family] = {
    "llama": Family(rms_norms=("LlamaRMSNorm",)),
    "mistral": Family(rms_norms=("MistralRMSNorm",)),
    "qwen2": Family(rms_norms=("Qwen2RMSNorm",)),
    "qwen3": Family(rms_norms=("Qwen3RMSNorm",)),
    "gpt2": Family(),
    "bert": Family(post_ln=("BertSelfOutput", "BertOutput")),
}


def patch(model: nn.Module, *, attention: bool = True, norm: bool = True, quantize: int | None = None) -> nn.Module:
    """Swaps the norms, attention and (``quantize=4|8``) linear layers of the transformers ``model`` in place.

    Only this instance changes (not its class, not other models, even ones built from the same config: the
    model gets its own copy of its config). Parameters are shared with the swapped modules, so ``state_dict``
    keys and values stay, and forward, ``generate`` and ``loss.backward()`` give the same results within
    dtype tolerance. ``quantize``: weight-only round-to-nearest ``llmfast.nn.QuantLinear`` for every linear
    layer except the output head (their weights frozen; their biases stay the model's parameters, trainable as
    before; gradients still pass through them to the layers below).
    A quantized layer keeps its ``state_dict`` key: it saves its dequantized weight as ``weight`` and quantizes
    a ``weight`` it loads.
    Returns ``model``. Raises ValueError for a model whose class is not of a ``SUPPORTED`` type.
    """
    family = _family(model)
    if quantize is not None and (type(quantize) is not int or quantize not in QUANTIZE_BITS):  # 8.0 == 8 too
        raise ValueError(f"quantize: expected None or one of {QUANTIZE_BITS}, got {quantize!r}")
    if attention:
        _use_llmfast_attention(model)
    if norm:
        _swap_norms(model, family)
    if quantize is not None:
        _quantize_linears(model, quantize)
    return model


def _family(model: nn.Module) -> Family:
    from transformers import PreTrainedModel  # transformers is needed only to patch its models

    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if not isinstance(model, PreTrainedModel) or model_type not in SUPPORTED:
        raise ValueError(
            f"model: llmfast.patch does not support {type(model).__name__}; it supports transformers models "
            f"of type {', '.join(SUPPORTED)}"
        )
    return SUPPORTED[model_type]


# ---------------------------------------------------------------------------------------------------
# attention


class _AttentionRegistration:
    """Held by a patched model (a plain attribute: no state_dict key, no submodule) so that unpickling the
    model (``torch.load`` of a ``torch.save``d model, in a process that never called ``patch``) registers
    llmfast's attention with transformers before the model's first forward."""

    def __reduce__(self):
        return _register_attention, ()


def _register_attention() -> _AttentionRegistration:
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(ATTENTION_NAME, llmfast_attention)
    # SDPA's boolean masks, or None where SDPA would pass is_causal: llmfast_attention reads either exactly
    AttentionMaskInterface.register(ATTENTION_NAME, sdpa_mask)
    return _AttentionRegistration()


def _use_llmfast_attention(model) -> None:
    model._llmfast_attention = _register_attention()
    # Models built from one config object share it, and the implementation is read from the config at
    # every call: this model gets its own copy, so that switching it leaves the others alone.
    shared, own = model.config, copy.deepcopy(model.config)
    for module in model.modules():
        if getattr(module, "config", None) is shared:
            module.config = own
    model.set_attn_implementation(ATTENTION_NAME)


def llmfast_attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None, is_causal=None,
                      **kwargs) -> tuple[torch.Tensor, torch.Tensor | None]:
    """transformers' attention-function signature, on ``llmfast.ops.attention``.

    ``query (batch, heads, seqlen_q, head_dim)``, ``key, value (batch, kv_heads, seqlen_k, head_dim)``;
    ``attention_mask``: None (causal as SDPA's ``is_causal``, or full) or a boolean ``(batch, 1, seqlen_q,
    seqlen_k)`` mask. Returns ``(o (batch, seqlen_q, heads, head_dim), None)``, or the probabilities ``(batch,
    heads, seqlen_q, seqlen_k)`` in place of None when the caller asked for them.
    """
    causal = getattr(module, "is_causal", True) if is_causal is None else is_causal
    if _attentions_requested(kwargs):  # a fused kernel never forms the probabilities the caller asks for
        return _attention_with_probs(module, query, key, value, attention_mask, dropout, scaling, causal)
    query, key, value = autocast_inputs(query, key, value)
    supported = (
        dropout == 0.0 and query.dtype in FLOAT_DTYPES and key.dtype == value.dtype == query.dtype
        and query.shape[-1] == value.shape[-1] <= MAX_HEAD_DIM
        and all(kwargs.get(name) is None for name in _SDPA_ONLY_KWARGS)
    )
    key_valid = None
    if supported and attention_mask is not None:
        # the mask's pattern is read from its values, which torch.compile cannot trace: SDPA takes it then
        key_valid = _key_padding(attention_mask, causal, query.shape[0]) if values_readable() else None
        supported = key_valid is not None
    if not supported:
        from transformers.integrations.sdpa_attention import sdpa_attention_forward

        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      is_causal=is_causal, **kwargs)
    q, k, v = (t.transpose(1, 2).contiguous() for t in (query, key, value))  # (batch, seqlen, heads, head_dim)
    if key_valid is not None:
        return _padded_attention(q, k, v, key_valid, causal, scaling), None
    seqlen_q = q.shape[1]
    causal = causal and seqlen_q > 1  # as SDPA: one query sees every key
    if causal and k.shape[1] > seqlen_q:  # as SDPA: a static cache's first chunk reads its first keys only
        k, v = k[:, :seqlen_q], v[:, :seqlen_q]
    return ops.attention(q, k, v, causal=causal, softmax_scale=scaling), None


def _attentions_requested(kwargs: dict) -> bool:
    """Whether the caller asked for attention probabilities (``output_attentions=True``).

    Llama-like models pass the flag down to the attention function; GPT-2 drops it and only records each
    attention module's second output through transformers' output collector, so that is read as well.
    """
    if kwargs.get("output_attentions"):
        return True
    if torch.compiler.is_compiling():  # Dynamo cannot trace the collector's ContextVar: the flag alone counts
        return False
    try:
        from transformers.utils.output_capturing import _active_collector

        collected = _active_collector.get()
    except (ImportError, LookupError):
        return False
    return isinstance(collected, dict) and "attentions" in collected


def _attention_with_probs(module, query, key, value, mask, dropout, scaling, causal):
    """Plain-PyTorch attention that also returns its probabilities ``(batch, heads, seqlen_q, seqlen_k)``, as
    transformers' eager attention does for ``output_attentions=True``; masks as ``llmfast_attention`` reads
    them (None: SDPA's ``is_causal``, top-left aligned)."""
    groups = query.shape[1] // key.shape[1]
    key, value = (t.repeat_interleave(groups, dim=1) for t in (key, value))  # (batch, heads, seqlen_k, head_dim)
    scale = query.shape[-1] ** -0.5 if scaling is None else scaling
    scores = (query @ key.transpose(-1, -2)).float() * scale  # (batch, heads, seqlen_q, seqlen_k)
    seqlen_q, seqlen_k = scores.shape[-2:]
    if mask is None and causal and seqlen_q > 1:
        mask = torch.ones(seqlen_q, seqlen_k, dtype=torch.bool, device=scores.device).tril()
    if mask is not None and mask.dtype == torch.bool:
        scores = scores.masked_fill(~mask, torch.finfo(scores.dtype).min)  # a padded query row stays finite
    elif mask is not None:
        scores = scores + mask
    probs = torch.nn.functional.dropout(scores.softmax(dim=-1).to(query.dtype), p=dropout, training=module.training)
    return (probs @ value).transpose(1, 2).contiguous(), probs  # o (batch, seqlen_q, heads, head_dim)


def _key_padding(mask: torch.Tensor, causal: bool, batch: int) -> torch.Tensor | None:
    """``valid (batch, seqlen_k)`` bool such that ``mask`` is exactly "query i sees the valid keys j <= i +
    seqlen_k - seqlen_q" (causal) or "... all valid keys", each row's valid keys one contiguous, non-empty
    run; None when ``mask`` is any other pattern."""
    if mask.dtype != torch.bool or mask.dim() != 4 or mask.shape[0] != batch or mask.shape[1] != 1:
        return None
    mask = mask[:, 0]  # (batch, seqlen_q, seqlen_k)
    seqlen_q, seqlen_k = mask.shape[1:]
    valid = mask.any(dim=1)  # (batch, seqlen_k): the keys some query sees
    expected = valid[:, None, :]
    if causal:
        expected = expected & torch.ones(seqlen_q, seqlen_k, dtype=torch.bool, device=mask.device).tril(
            seqlen_k - seqlen_q)
    runs = valid[:, 0].int() + (valid[:, 1:] & ~valid[:, :-1]).sum(dim=1)  # (batch,) runs of valid keys
    if not torch.equal(mask, expected.expand_as(mask)) or not (runs == 1).all():
        return None
    return valid


def _padded_attention(q, k, v, valid, causal, scale) -> torch.Tensor:
    """Attention over the ``valid (batch, seqlen_k)`` keys only, as two varlen calls over the packed keys.

    ``q (batch, seqlen_q, heads, head_dim)``, ``k, v (batch, seqlen_k, kv_heads, head_dim)``. Causal: query
    i sees the valid keys j <= i + seqlen_k - seqlen_q. The queries before a row's last valid key see a causal
    prefix of its keys (bottom-right aligned once packed); the later ones (right padding) see all of them.
    """
    batch, seqlen_q, seqlen_k = q.shape[0], q.shape[1], k.shape[1]
    lengths_k = valid.sum(dim=1)  # (batch,)
    end_k = seqlen_k - valid.flip(1).int().argmax(dim=1)  # (batch,) one past each row's last valid key
    query_pos = torch.arange(seqlen_q, device=q.device)
    if causal:
        prefix = query_pos[None, :] < (end_k - (seqlen_k - seqlen_q))[:, None]  # (batch, seqlen_q)
    else:
        prefix = torch.zeros(batch, seqlen_q, dtype=torch.bool, device=q.device)
    k_packed, v_packed = k[valid], v[valid]  # (total_k, kv_heads, head_dim)
    out = q.new_zeros(q.shape)
    for group_causal, rows in ((True, prefix), (False, ~prefix)):
        lengths_q = rows.sum(dim=1)  # (batch,)
        if not rows.any():
            continue
        out[rows] = ops.attention(
            q[rows], k_packed, v_packed, causal=group_causal, softmax_scale=scale,
            cu_seqlens_q=_cu_seqlens(lengths_q), cu_seqlens_k=_cu_seqlens(lengths_k),
            max_seqlen_q=int(lengths_q.max()), max_seqlen_k=int(lengths_k.max()),
        )  # (tokens, heads, head_dim)
    return out


def _cu_seqlens(lengths: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.pad(lengths.cumsum(0), (1, 0)).to(torch.int32)  # (batch+1,)


# ---------------------------------------------------------------------------------------------------
# norms and linear layers


def _swap_norms(model: nn.Module, family: Family) -> None:
    # post-LN blocks first: their nn.LayerNorm becomes a FusedAddLayerNorm, which the second pass leaves alone
    replace_children(model, lambda m: FusedPostLN(m) if type(m).__name__ in family.post_ln else None)
    replace_children(model, lambda m: _rms_norm(m) if type(m).__name__ in family.rms_norms else None)
    replace_children(model, lambda m: _layer_norm(m, LayerNorm) if type(m) is nn.LayerNorm else None)


class HFRMSNorm(RMSNorm):
    """``RMSNorm`` as Hugging Face's RMSNorm classes compute it: plain PyTorch, not torch's ``rms_norm``, so
    CUDA autocast does not take it to float32 (which llmfast's RMSNorm does where torch's would)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return FusedAddRMSNorm.forward(self, x)[0]


def _rms_norm(norm: nn.Module) -> RMSNorm:
    """An llmfast RMSNorm sharing the ``weight`` Parameter of a Hugging Face one."""
    new = HFRMSNorm(tuple(norm.weight.shape), eps=norm.variance_epsilon, device="meta")
    new.weight = norm.weight
    return new


def _layer_norm(norm: nn.LayerNorm, cls: type[FusedAddLayerNorm]) -> FusedAddLayerNorm:
    """An llmfast ``cls`` sharing the ``weight`` and ``bias`` Parameters of ``norm``."""
    new = cls(norm.normalized_shape, eps=norm.eps, elementwise_affine=norm.elementwise_affine,
              bias=norm.bias is not None, device="meta")
    new.weight, new.bias = norm.weight, norm.bias
    return new


class FusedPostLN(nn.Module):
    """BERT's ``BertSelfOutput``/``BertOutput``, ``LayerNorm(dropout(dense(x)) + input)``, with the residual add
    fused into llmfast's norm. It takes over the block's submodules, names included (same state_dict keys)."""

    def __init__(self, block: nn.Module):
        super().__init__()
        self.dense = block.dense
        self.LayerNorm = _layer_norm(block.LayerNorm, FusedAddLayerNorm)
        self.dropout = block.dropout

    def forward(self, hidden_states: torch.Tensor, input_tensor: torch.Tensor) -> torch.Tensor:
        x = self.dropout(self.dense(hidden_states))
        # Under autocast the dense output is bf16/fp16 while the residual stream stays float32; the unfused
        # ``x + input_tensor`` promotes, so the fused add must too (not round the residual to x's dtype).
        dtype = torch.promote_types(x.dtype, input_tensor.dtype)
        return self.LayerNorm(x.to(dtype), input_tensor.to(dtype))[0]


def _quantize_linears(model: nn.Module, bits: int) -> None:
    from transformers.pytorch_utils import Conv1D

    from llmfast.nn.quant_linear import QuantLinear, warn_kept_in_full_precision

    head = model.get_output_embeddings()  # kept in full precision: often tied to the input embedding
    kept: list[int] = []  # in_features of the layers int4 cannot pack

    def build(child: nn.Module) -> QuantLinear | None:
        if child is head or not isinstance(child, (nn.Linear, Conv1D)):
            return None
        linear = child
        if isinstance(child, Conv1D):  # GPT-2's weight is (in, out); QuantLinear takes a Linear's (out, in)
            linear = nn.Linear(*child.weight.shape, bias=child.bias is not None, device="meta")
            linear.weight = nn.Parameter(child.weight.detach().t().contiguous(), requires_grad=False)
            linear.bias = child.bias
        layer = QuantLinear.from_linear_auto(linear, bits)
        if layer is None:
            kept.append(linear.in_features)
            return None
        if child.bias is not None and child.bias.dtype == layer.bias.dtype:
            layer.bias = child.bias  # the model's own parameter, trainable as before (from_linear freezes a copy)
        _keep_state_dict_keys(layer, transposed=isinstance(child, Conv1D))
        return layer

    replace_children(model, build)
    warn_kept_in_full_precision(kept, bits, "quantize")


def _keep_state_dict_keys(layer: nn.Module, transposed: bool) -> None:
    """Gives the quantized ``layer`` the state_dict of the layer it replaced: it saves its dequantized weight
    as ``weight`` (in Conv1D's (in, out) layout when ``transposed``) and quantizes a ``weight`` it loads, so
    the model's keys stay those of transformers (``save_pretrained`` writes a checkpoint transformers reads)."""
    from llmfast.quant.quantize import quantize

    stored = [f"weight_q.{name}" for name in layer.weight_q.state_dict()]

    def save(module, state_dict, prefix, local_metadata):
        for name in stored:
            del state_dict[prefix + name]
        bias = state_dict.pop(prefix + "bias", None)  # re-added after the weight, in nn.Linear's order
        state_dict[prefix + "weight"] = module.weight.t() if transposed else module.weight
        if bias is not None:
            state_dict[prefix + "bias"] = bias

    def load(module, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs):
        weight = state_dict.pop(prefix + "weight", None)
        if weight is not None:
            weight = weight.t() if transposed else weight
            expected = (module.out_features, module.in_features)
            if tuple(weight.shape) != expected:
                error_msgs.append(f"size mismatch for {prefix}weight: expected {expected}, got {tuple(weight.shape)}")
                return
            quantized = quantize(weight.to(module.weight_q.dtype), module.weight_q.bits, module.weight_q.group_size)
            for name, tensor in quantized.state_dict().items():
                state_dict[f"{prefix}weight_q.{name}"] = tensor

    layer.register_state_dict_post_hook(save)
    layer.register_load_state_dict_pre_hook(load)
