"""llmfast.nn.MultiheadAttention is a drop-in for torch.nn.MultiheadAttention: same parameters, state dict
and outputs, on the fused path (need_weights=False) and on the math fallback."""
import pytest
import torch

import llmfast
from helpers import DEVICE, assert_close_2x, require_backend

BACKENDS = ["reference", "triton"]
EMBED, HEADS = 32, 4


def _pair(backend="auto", **kwargs):
    """(ours, theirs) with theirs' random weights loaded into ours. Theirs runs in train mode with no
    dropout: torch's eval-mode fast path returns 0 at padded query positions instead of its own math."""
    torch.manual_seed(0)
    theirs = torch.nn.MultiheadAttention(EMBED, HEADS, batch_first=kwargs.pop("batch_first", True), **kwargs)
    with torch.no_grad():
        for p in theirs.parameters():
            p.copy_(torch.randn_like(p) * 0.3)
    ours = llmfast.nn.MultiheadAttention(EMBED, HEADS, batch_first=theirs.batch_first, backend=backend, **kwargs)
    assert list(ours.state_dict()) == list(theirs.state_dict())
    ours.load_state_dict(theirs.state_dict())
    return ours.to(DEVICE).eval(), theirs.to(DEVICE).train()


def _x(*shape):
    return torch.randn(*shape, device=DEVICE)


def _right_padding(lengths, seqlen):
    return torch.arange(seqlen, device=DEVICE)[None, :] >= torch.tensor(lengths, device=DEVICE)[:, None]


def _check(ours, theirs, args, kwargs, ours_kwargs=None):
    out, weights = ours(*args, **{**kwargs, **(ours_kwargs or {})})
    expected, expected_weights = theirs(*args, **kwargs)
    torch.testing.assert_close(out, expected, rtol=1e-4, atol=1e-4)
    if expected_weights is None:
        assert weights is None
    else:
        torch.testing.assert_close(weights, expected_weights, rtol=1e-4, atol=1e-5)


def test_batch_first_defaults_to_true():
    """Unlike torch's module (API.md: batch_first=True); (batch, seq, embed) in and out."""
    _, theirs = _pair(batch_first=True)
    ours = llmfast.nn.MultiheadAttention(EMBED, HEADS).to(DEVICE)
    assert ours.batch_first
    ours.load_state_dict(theirs.state_dict())
    x = _x(2, 5, EMBED)
    with torch.no_grad():
        torch.testing.assert_close(ours(x, x, x, need_weights=False)[0], theirs(x, x, x, need_weights=False)[0],
                                   atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("need_weights", [False, True])
def test_self_attention(backend, need_weights):
    require_backend(backend, "attention")
    ours, theirs = _pair(backend)
    x = _x(2, 17, EMBED)
    _check(ours, theirs, (x, x, x), {"need_weights": need_weights})


@pytest.mark.parametrize("backend", BACKENDS)
def test_cross_attention_with_other_key_dims(backend):
    require_backend(backend, "attention")
    ours, theirs = _pair(backend, kdim=12, vdim=20)
    _check(ours, theirs, (_x(2, 5, EMBED), _x(2, 9, 12), _x(2, 9, 20)), {"need_weights": False})
    ours, theirs = _pair(backend)
    _check(ours, theirs, (_x(2, 5, EMBED), _x(2, 9, EMBED), _x(2, 9, EMBED)), {"need_weights": False})


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("mask_kind", ["is_causal", "bool", "float"])
def test_causal(backend, mask_kind):
    """torch needs the mask with its is_causal hint; ours also takes is_causal alone or recognises the mask."""
    require_backend(backend, "attention")
    ours, theirs = _pair(backend)
    x = _x(2, 13, EMBED)
    upper = torch.ones(13, 13, dtype=torch.bool, device=DEVICE).triu(1)
    mask = upper if mask_kind != "float" else torch.zeros(13, 13, device=DEVICE).masked_fill(upper, float("-inf"))
    ours_kwargs = {"attn_mask": None} if mask_kind == "is_causal" else None
    _check(ours, theirs, (x, x, x), {"need_weights": False, "attn_mask": mask, "is_causal": mask_kind == "is_causal"},
           ours_kwargs)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("causal", [False, True])
def test_key_padding_mask(backend, causal):
    """Random padding without causal masking; right padding with it (lengths include a full row)."""
    require_backend(backend, "attention")
    ours, theirs = _pair(backend)
    x = _x(3, 11, EMBED)
    if causal:
        padding = _right_padding([11, 4, 1], 11)
    else:
        padding = torch.rand(3, 11, device=DEVICE) < 0.4
        padding[:, 0] = False  # every row keeps a key (torch gives NaN for a row with none)
    mask = torch.ones(11, 11, dtype=torch.bool, device=DEVICE).triu(1) if causal else None
    _check(ours, theirs, (x, x, x), {"need_weights": False, "key_padding_mask": padding, "attn_mask": mask,
                                     "is_causal": causal})


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("need_weights", [False, True])
def test_causal_left_padding_falls_back_to_math(backend, need_weights):
    """A query that sees no key (left padding under a causal mask) outputs what torch's does: 0 with
    need_weights=False (torch's SDPA path), NaN with need_weights=True (its softmax)."""
    require_backend(backend, "attention")
    ours, theirs = _pair(backend)
    x = _x(2, 7, EMBED)
    padding = torch.arange(7, device=DEVICE)[None, :] < torch.tensor([0, 2], device=DEVICE)[:, None]  # left
    mask = torch.ones(7, 7, dtype=torch.bool, device=DEVICE).triu(1)
    kwargs = {"need_weights": need_weights, "key_padding_mask": padding, "attn_mask": mask}
    (out, weights), (expected, expected_weights) = ours(x, x, x, **kwargs), theirs(x, x, x, **kwargs)
    assert padding.any() and out[padding].isnan().all() == need_weights
    torch.testing.assert_close(out, expected, rtol=1e-4, atol=1e-4, equal_nan=True)
    if need_weights:
        torch.testing.assert_close(weights, expected_weights, rtol=1e-4, atol=1e-5, equal_nan=True)


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_query_that_sees_no_key_has_torchs_finite_gradients(backend):
    """need_weights=False: the blind row's output is 0 and its gradients finite, as torch's (a softmax over
    an all -inf row gave NaN gradients even though the row was zeroed after it)."""
    require_backend(backend, "attention")
    ours, theirs = _pair(backend)
    x = _x(2, 7, EMBED)
    padding = torch.arange(7, device=DEVICE)[None, :] < torch.tensor([0, 2], device=DEVICE)[:, None]  # left
    mask = torch.ones(7, 7, dtype=torch.bool, device=DEVICE).triu(1)
    grads = []
    for module in (ours, theirs):
        xg = x.clone().requires_grad_()
        module.zero_grad()
        out = module(xg, xg, xg, need_weights=False, key_padding_mask=padding, attn_mask=mask)[0]
        projection = torch.randn(out.shape, generator=torch.Generator().manual_seed(0)).to(DEVICE)
        (out * projection).sum().backward()
        grads.append((xg.grad, module.in_proj_weight.grad))
    for got, expected in zip(*grads):
        assert torch.isfinite(got).all()
        torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)


def test_dropout_applies_to_the_returned_weights_as_torchs():
    """need_weights=True in training: torch returns the weights after dropout (zeros, rows not summing to 1)."""
    ours = llmfast.nn.MultiheadAttention(EMBED, HEADS, dropout=0.5).to(DEVICE).train()
    x = _x(2, 8, EMBED)
    out, weights = ours(x, x, x, need_weights=True, average_attn_weights=False)
    dropped = (weights == 0).float().mean().item()
    assert 0.3 < dropped < 0.7 and not torch.allclose(weights.sum(-1), torch.ones(()))
    v = ours.in_proj_weight[2 * EMBED:] @ x.transpose(-1, -2) + ours.in_proj_bias[2 * EMBED:, None]  # (2, E, 8)
    v = v.view(2, HEADS, EMBED // HEADS, 8).transpose(-1, -2)  # (batch, heads, keys, head_dim)
    expected = ours.out_proj((weights @ v).transpose(1, 2).reshape(2, 8, EMBED))
    torch.testing.assert_close(out, expected, rtol=1e-4, atol=1e-5)  # the output used those same weights


@pytest.mark.parametrize("need_weights", [False, True])
def test_float64_runs_as_torch(need_weights):
    ours, theirs = _pair()
    ours, theirs = ours.double(), theirs.double()
    x = _x(2, 5, EMBED).double()
    out, _ = ours(x, x, x, need_weights=need_weights, is_causal=True,
                  attn_mask=torch.ones(5, 5, dtype=torch.bool, device=DEVICE).triu(1))
    assert out.dtype == torch.float64
    _check(ours, theirs, (x, x, x), {"need_weights": need_weights})


@pytest.mark.parametrize("kwargs", [
    {"need_weights": True, "average_attn_weights": False},
    {"need_weights": True, "attn_mask": "random_float"},
    {"need_weights": False, "attn_mask": "random_bool_per_head"},
    {"need_weights": False, "key_padding_mask": "float"},
])
def test_math_fallback(kwargs):
    ours, theirs = _pair()
    x = _x(2, 6, EMBED)
    kwargs = dict(kwargs)
    if kwargs.get("attn_mask") == "random_float":
        kwargs["attn_mask"] = _x(6, 6)
    elif kwargs.get("attn_mask") == "random_bool_per_head":
        mask = torch.rand(2 * HEADS, 6, 6, device=DEVICE) < 0.3
        mask[..., 0] = False
        kwargs["attn_mask"] = mask
    if kwargs.get("key_padding_mask") == "float":
        kwargs["key_padding_mask"] = _x(2, 6)
    _check(ours, theirs, (x, x, x), kwargs)


@pytest.mark.parametrize("kwargs", [{"add_bias_kv": True}, {"add_zero_attn": True}, {"bias": False}])
def test_constructor_options(kwargs):
    ours, theirs = _pair(**kwargs)
    x = _x(2, 6, EMBED)
    padding = _right_padding([6, 3], 6)
    _check(ours, theirs, (x, x, x), {"need_weights": False, "key_padding_mask": padding})


def test_seq_first_and_unbatched():
    ours, theirs = _pair(batch_first=False)
    x = _x(9, 2, EMBED)  # (seq, batch, embed)
    _check(ours, theirs, (x, x, x), {"need_weights": False})
    x = _x(9, EMBED)  # unbatched
    _check(ours, theirs, (x, x, x), {"need_weights": True})


def test_gradients_flow_to_every_parameter():
    ours, theirs = _pair()
    ours.train()
    x = _x(2, 8, EMBED)
    ours(x, x, x, need_weights=False, is_causal=True)[0].square().sum().backward()
    theirs(x, x, x, need_weights=False, is_causal=True,
           attn_mask=torch.ones(8, 8, dtype=torch.bool, device=DEVICE).triu(1))[0].square().sum().backward()
    theirs_grads = dict(theirs.named_parameters())
    for name, p in ours.named_parameters():
        torch.testing.assert_close(p.grad, theirs_grads[name].grad, rtol=1e-4, atol=1e-4)


def test_dropout_in_training_uses_torch_dropout_semantics():
    ours = llmfast.nn.MultiheadAttention(EMBED, HEADS, dropout=0.5).to(DEVICE).train()
    x = _x(2, 8, EMBED)
    torch.manual_seed(1)
    a = ours(x, x, x, need_weights=False)[0]
    torch.manual_seed(2)
    b = ours(x, x, x, need_weights=False)[0]
    assert not torch.allclose(a, b)  # dropout is applied in training
    ours.eval()
    torch.testing.assert_close(ours(x, x, x, need_weights=False)[0], ours(x, x, x, need_weights=False)[0])


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("need_weights", [False, True])
def test_autocast_bfloat16_within_twice_the_error_of_torch(backend, need_weights):
    """A float32 module inside torch.autocast(bfloat16), next to torch's module under the same autocast."""
    require_backend(backend, "attention")
    ours, theirs = _pair(backend)
    x = _x(2, 9, EMBED)
    kwargs = {"need_weights": need_weights, "is_causal": True,
              "attn_mask": torch.ones(9, 9, dtype=torch.bool, device=DEVICE).triu(1)}
    expected = ours(x, x, x, **kwargs)[0]  # float32, outside autocast
    with torch.autocast(DEVICE.type, dtype=torch.bfloat16):
        out, peer = ours(x, x, x, **kwargs)[0], theirs(x, x, x, **kwargs)[0]
    assert out.dtype == peer.dtype == torch.bfloat16
    assert_close_2x(out, peer, expected, slack_ulps=2.0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_half_precision_within_twice_the_error_of_torch(backend):
    """The fused path in fp16 against the float64 module, next to torch's module in fp16."""
    require_backend(backend, "attention")
    ours, theirs = _pair(backend)
    ours, theirs = ours.half(), theirs.half()
    ref = torch.nn.MultiheadAttention(EMBED, HEADS, batch_first=True).to(DEVICE).double()
    ref.load_state_dict(theirs.state_dict())
    x = _x(2, 19, EMBED).half()
    padding = _right_padding([19, 10], 19)
    mask = torch.ones(19, 19, dtype=torch.bool, device=DEVICE).triu(1)
    kwargs = {"need_weights": False, "key_padding_mask": padding, "attn_mask": mask}
    out = ours(x, x, x, **kwargs)[0]
    peer = theirs(x, x, x, **kwargs)[0]
    expected = ref(x.double(), x.double(), x.double(), **kwargs)[0]
    assert_close_2x(out, peer, expected, slack_ulps=2.0)


@pytest.mark.parametrize("make_call, error, match", [
    (lambda m, x: m(x, x, x[..., :8]), ValueError, "value: expected last dim"),
    (lambda m, x: m(x, x[:1], x[:1]), ValueError, "key: expected batch size"),
    (lambda m, x: m(x, x, x, key_padding_mask=torch.zeros(2, 3, dtype=torch.bool)), ValueError, "key_padding_mask"),
    (lambda m, x: m(x, x, x, attn_mask=torch.zeros(4, 4, dtype=torch.bool)), ValueError, "attn_mask"),
    (lambda m, x: m(x, x, x, attn_mask=torch.zeros(5, 5, dtype=torch.int32)), TypeError, "attn_mask"),
    (lambda m, x: m(x[0, 0], x, x), ValueError, "query, key, value"),
    (lambda m, x: m(x.tolist(), x, x), TypeError, "query"),
    (lambda m, x: m(x.long(), x.long(), x.long()), TypeError, "query: expected dtype torch.float32"),
    (lambda m, x: m(x, x.half(), x), TypeError, "key: expected dtype"),
])
def test_bad_inputs(make_call, error, match):
    module = llmfast.nn.MultiheadAttention(EMBED, HEADS)
    with pytest.raises(error, match=match):
        make_call(module, torch.randn(2, 5, EMBED))


@pytest.mark.parametrize("kwargs, match", [
    ({"embed_dim": 30, "num_heads": 4}, "num_heads"),
    ({"embed_dim": 0, "num_heads": 1}, "embed_dim"),
    ({"embed_dim": 8, "num_heads": 2, "dropout": 1.0}, "dropout"),
])
def test_bad_constructor_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        llmfast.nn.MultiheadAttention(**kwargs)


@pytest.mark.parametrize("case, fused", [
    ({"need_weights": False}, True),
    ({"need_weights": False, "is_causal": True}, True),
    ({"need_weights": False, "key_padding_mask": "right", "is_causal": True}, True),
    ({"need_weights": False, "key_padding_mask": "right"}, True),
    ({"need_weights": True}, False),
    ({"need_weights": False, "attn_mask": "float"}, False),
])
def test_fused_path_is_taken_where_documented(monkeypatch, case, fused):
    import llmfast.nn.attention as module

    calls = []
    real = module.attention
    monkeypatch.setattr(module, "attention", lambda *a, **k: calls.append(1) or real(*a, **k))
    ours = llmfast.nn.MultiheadAttention(EMBED, HEADS).to(DEVICE)
    x = _x(2, 6, EMBED)
    case = dict(case)
    if case.get("key_padding_mask") == "right":
        case["key_padding_mask"] = _right_padding([6, 4], 6)
    if case.get("attn_mask") == "float":
        case["attn_mask"] = _x(6, 6)
    ours(x, x, x, **case)
    assert bool(calls) == fused
