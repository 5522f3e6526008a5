"""Shared test helpers: backend skipping, the 2x-error rule, output poisoning, an independent attention."""
import contextlib

import pytest
import torch
import torch.nn.functional as F

import llmfast
from llmfast.backends import resolve

BACKENDS = ["reference", "triton", "cuda", "cpu"]
DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")


def require_backend(backend, op, device=DEVICE):
    """Skips (never passes) the test when ``backend`` cannot run ``op`` on ``device`` here."""
    try:
        resolve(op, backend, torch.device(device))
    except llmfast.BackendUnavailable as exc:
        pytest.skip(str(exc))


def assert_close_2x(out, peer, ref, *, slack_ulps=1.0):
    """flash-attn's rule: ``out``'s max error against the high-precision ``ref`` is at most twice the
    error of ``peer`` (plain PyTorch in ``out``'s dtype), plus ``slack_ulps`` units of ``out``'s dtype at
    the largest reference value (so two correctly rounded results may still differ by one rounding)."""
    assert out.shape == ref.shape, (out.shape, ref.shape)
    out64, peer64, ref64 = out.double(), peer.double(), ref.double()
    assert not torch.isnan(out64).any(), "output has NaNs (unwritten or poisoned elements)"
    err = (out64 - ref64).abs().max().item() if out.numel() else 0.0
    err_peer = (peer64 - ref64).abs().max().item() if out.numel() else 0.0
    scale = ref64.abs().max().item() if out.numel() else 0.0
    slack = slack_ulps * torch.finfo(out.dtype).eps * max(scale, 1e-3)
    assert err <= 2 * err_peer + slack, f"max error {err:.3g} > 2 x peer error {err_peer:.3g} + {slack:.3g}"


def assert_close_2x_per_element(out, peer, ref):
    """The 2x rule element by element, for a low-precision ``out`` whose every element is one rounding of a
    float32 value (a norm's output): each error at most twice the peer's there, plus one unit of ``out``'s
    dtype at that element's reference value (and 1e-3 of the largest). Unlike the max-error rule, a wrong
    small element is not hidden by the rounding error of the largest one."""
    assert out.dtype in (torch.float16, torch.bfloat16), "float32 results differ by more than one rounding"
    out64, peer64, ref64 = out.double(), peer.double(), ref.double()
    err, err_peer = (out64 - ref64).abs(), (peer64 - ref64).abs()
    scale = ref64.abs().max().item() if out.numel() else 0.0
    slack = torch.finfo(out.dtype).eps * (ref64.abs() + 1e-3 * scale)
    bad = err > 2 * err_peer + slack
    if bad.any():
        i = int(torch.argmax((err - 2 * err_peer - slack).flatten()))
        raise AssertionError(f"{int(bad.sum())} of {out.numel()} elements over 2x the peer's error; the worst: "
                             f"{out64.flatten()[i].item():.6g} vs {ref64.flatten()[i].item():.6g} "
                             f"(peer {peer64.flatten()[i].item():.6g})")


def mean_pooled_embeddings(hidden, attention_mask):
    """Sentence embeddings as sentence-transformers makes them: the mask-weighted mean over tokens of
    ``hidden (batch, seqlen, hidden)``, L2-normalized."""
    weights = attention_mask[..., None].to(hidden.dtype)
    return torch.nn.functional.normalize((hidden * weights).sum(1) / weights.sum(1), dim=-1)


@contextlib.contextmanager
def poison_allocations():
    """Every float tensor allocated with torch.empty/empty_like inside the block starts as NaN, so an
    output element a kernel forgets to write shows up. C++ allocations (at::empty in the cpu/cuda ops) are
    NaN-filled too, by PyTorch's deterministic mode with fill_uninitialized_memory (warn-only, so that
    nondeterministic ops still run)."""
    real_empty, real_empty_like = torch.empty, torch.empty_like
    deterministic = (torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled())
    fill = torch.utils.deterministic.fill_uninitialized_memory

    def poison(t):
        if t.is_floating_point() and t.device.type != "meta":
            t.fill_(float("nan"))
        return t

    torch.empty = lambda *a, **k: poison(real_empty(*a, **k))
    torch.empty_like = lambda *a, **k: poison(real_empty_like(*a, **k))
    torch.use_deterministic_algorithms(True, warn_only=True)
    torch.utils.deterministic.fill_uninitialized_memory = True
    try:
        yield
    finally:
        torch.empty, torch.empty_like = real_empty, real_empty_like
        torch.use_deterministic_algorithms(deterministic[0], warn_only=deterministic[1])
        torch.utils.deterministic.fill_uninitialized_memory = fill


def attention_ref(q, k, v, *, causal=False, softmax_scale=None, upcast=True):
    """Dense attention, ``q (B, Sq, Hq, D)``, ``k, v (B, Sk, Hkv, D)``, written apart from llmfast's.

    ``upcast=True``: the oracle, float64 through PyTorch's SDPA with an explicit bottom-right causal mask
    (rows that see no key give 0). ``upcast=False``: the 2x-rule peer, naive math in the inputs' dtype.
    """
    seqlen_q, seqlen_k = q.shape[1], k.shape[1]
    visible = torch.ones(seqlen_q, seqlen_k, dtype=torch.bool, device=q.device)
    if causal:
        visible = torch.ones_like(visible).tril(diagonal=seqlen_k - seqlen_q)
    if upcast:
        q, k, v = (t.double().transpose(1, 2) for t in (q, k, v))  # (B, H, S, D)
        o = F.scaled_dot_product_attention(q, k, v, attn_mask=visible, scale=softmax_scale, enable_gqa=True)
        return o.transpose(1, 2)
    group = q.shape[2] // k.shape[2]
    k, v = k.repeat_interleave(group, dim=2), v.repeat_interleave(group, dim=2)
    scale = q.shape[-1] ** -0.5 if softmax_scale is None else softmax_scale
    scores = torch.einsum("bqhd,bkhd->bhqk", q * scale, k).masked_fill(~visible, float("-inf"))
    probs = torch.softmax(scores, dim=-1).masked_fill(~visible.any(dim=-1)[:, None], 0)
    return torch.einsum("bhqk,bkhd->bqhd", probs, v)


def tiny_decoder_configs(vocab_size):
    """transformers config kwargs of a tiny random model per decoder family llmfast implements."""
    llama_like = dict(vocab_size=vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    return {
        "llama": dict(model_type="llama", **llama_like),
        "mistral": dict(model_type="mistral", **llama_like, sliding_window=32),
        "qwen2": dict(model_type="qwen2", **llama_like, tie_word_embeddings=True),
        "qwen3": dict(model_type="qwen3", **llama_like, head_dim=32),
        # no dropout: training-mode tests compare gradients exactly
        "gpt2": dict(model_type="gpt2", vocab_size=vocab_size, n_embd=64, n_layer=2, n_head=4, n_positions=64,
                     bos_token_id=0, eos_token_id=0, attn_pdrop=0.0, resid_pdrop=0.0, embd_pdrop=0.0),
    }
