"""Fused residual-add + LayerNorm/RMSNorm: every backend against a float64 reference."""
import pytest
import torch
import torch.nn.functional as F

import llmfast
from llmfast import BackendUnavailable
from llmfast.ops import add_layer_norm, add_rms_norm
from helpers import assert_close_2x, assert_close_2x_per_element, poison_allocations, require_backend

BACKENDS = ["reference", "triton", "cpu", "cuda"]
HIDDEN = [1, 7, 1000, 4097, 8192, 65536]
LEADING = [(3,), (2, 3), (2, 1, 2)]
# (residual, weight, bias): all present, each optional input left out, and none of them
AFFINE = [(True, True, True), (False, True, True), (True, False, True), (True, True, False), (True, False, False),
          (False, False, False)]


def _call(kind, x, r, w, b, backend):
    if kind == "layer":
        return add_layer_norm(x, r, w, b, 1e-5, backend=backend)
    return add_rms_norm(x, r, w, 1e-6, backend=backend)


def _torch_norm(kind, x, r, w, b):
    """Plain PyTorch in the inputs' dtype (the peer for the 2x-error rule), and float64 when given float64."""
    h = x if r is None else x + r
    if kind == "layer":
        return F.layer_norm(h, (h.shape[-1],), w, b, 1e-5), h
    return F.rms_norm(h, (h.shape[-1],), w, 1e-6), h


def _inputs(shape, dtype, device, with_r, with_w, with_b, kind):
    x = torch.randn(shape, dtype=dtype, device=device)
    r = torch.randn(shape, dtype=dtype, device=device) if with_r else None
    w = torch.randn(shape[-1], dtype=dtype, device=device) if with_w else None
    b = torch.randn(shape[-1], dtype=dtype, device=device) if with_b and kind == "layer" else None
    return x, r, w, b


def _f64(t):
    return None if t is None else t.detach().double()


def _check_forward(kind, backend, shape, dtype, affine, device):
    x, r, w, b = _inputs(shape, dtype, device, *affine, kind)
    with poison_allocations():
        y, h = _call(kind, x, r, w, b, backend)
    assert y.dtype == dtype and h.dtype == dtype and y.shape == x.shape and h.shape == x.shape
    h_exact = x if r is None else (x.float() + r.float()).to(dtype)
    # the interpreter casts float32 -> bfloat16 by truncation (the GPU rounds): one ulp apart at most
    truncates = backend == "triton" and device == "cpu" and dtype == torch.bfloat16
    torch.testing.assert_close(h, h_exact, rtol=2 ** -7 if truncates else 0, atol=0)
    # the norm is applied to the rounded h, so the float64 oracle starts from it too (from the kernel's
    # own h where the interpreter truncated it; that h was checked just above)
    h_in = h if truncates else h_exact
    y_ref, _ = _torch_norm(kind, _f64(h_in), None, _f64(w), _f64(b))
    y_peer, _ = _torch_norm(kind, h_in, None, w, b)
    assert_close_2x(y, y_peer, y_ref)
    if dtype != torch.float32:
        assert_close_2x_per_element(y, y_peer, y_ref)


@pytest.mark.parametrize("affine", AFFINE)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("hidden", HIDDEN)
@pytest.mark.parametrize("kind", ["layer", "rms"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_forward(backend, kind, hidden, dtype, affine):
    require_backend(backend, "add_rms_norm", torch.device("cpu"))
    leading = LEADING[(hidden + sum(affine)) % len(LEADING)] if hidden < 65536 else (2,)
    _check_forward(kind, backend, (*leading, hidden), dtype, affine, "cpu")


@pytest.mark.parametrize("affine", AFFINE)
@pytest.mark.parametrize("hidden", [1, 7, 1000, 4097, 8192, 65536])  # 4097: the wide rows' partial last chunk
@pytest.mark.parametrize("kind", ["layer", "rms"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_gradients_match_float64(backend, kind, hidden, affine):
    require_backend(backend, "add_rms_norm", torch.device("cpu"))
    shape = (3, hidden) if hidden < 65536 else (2, hidden)
    inputs = [t.requires_grad_() if t is not None else None for t in _inputs(shape, torch.float32, "cpu", *affine, kind)]
    ref_inputs = [None if t is None else t.detach().double().requires_grad_() for t in inputs]
    dy, dh = torch.randn(shape), torch.randn(shape)

    with poison_allocations():  # the backward's dx, dweight, ... and partial sums too
        y, h = _call(kind, *inputs, backend)
        ((y * dy).sum() + (h * dh).sum()).backward()
    y_ref, h_ref = _torch_norm(kind, *ref_inputs)
    ((y_ref * dy.double()).sum() + (h_ref * dh.double()).sum()).backward()

    for name, t, t_ref in zip(("x", "residual", "weight", "bias"), inputs, ref_inputs):
        if t is not None:
            tol = 1e-4 * max(1.0, t_ref.grad.abs().max().item())
            torch.testing.assert_close(t.grad.double(), t_ref.grad, rtol=1e-4, atol=tol, msg=f"d{name}")


@pytest.mark.parametrize("frozen", [("weight",), ("bias",), ("weight", "bias")])
@pytest.mark.parametrize("backend", ["triton", "cpu", "cuda"])
def test_a_frozen_weight_or_bias_gets_no_gradient_sums(backend, frozen, monkeypatch):
    """Norm weights are often frozen (LoRA fine-tuning): the backward then skips their column sums, asks
    the kernel for only the wanted ones, and the other gradients are those of the unfrozen run."""
    import llmfast.ops.norm as norm_ops
    from llmfast_kernels import norm as norm_kernels

    require_backend(backend, "add_layer_norm", torch.device("cpu"))
    asked = []

    def spy(real):
        def wrapper(*args):  # both take (dy, dh, h, weight, want_dweight, want_dbias, ...)
            asked.append(args[4:6])
            return real(*args)
        return wrapper

    monkeypatch.setattr(norm_kernels, "add_norm_bwd", spy(norm_kernels.add_norm_bwd))
    monkeypatch.setattr(norm_ops, "_norm_backward_torch", spy(norm_ops._norm_backward_torch))
    x, r, w, b = _inputs((5, 96), torch.float32, "cpu", True, True, True, "layer")
    dy = torch.randn_like(x)

    def grads(trainable):
        ts = [t.detach().clone().requires_grad_(name in trainable)
              for name, t in zip(("x", "residual", "weight", "bias"), (x, r, w, b))]
        y, _ = _call("layer", *ts, backend)
        (y * dy).sum().backward()
        return [t.grad for t in ts]

    full = grads({"x", "residual", "weight", "bias"})
    assert asked == [(True, True)]
    part = grads({"x", "residual"} | {"weight", "bias"} - set(frozen))
    assert asked[1] == ("weight" not in frozen, "bias" not in frozen)
    for name, g, g_full in zip(("x", "residual", "weight", "bias"), part, full):
        if name in frozen:
            assert g is None, name
        else:
            torch.testing.assert_close(g, g_full, rtol=1e-6, atol=1e-6, msg=name)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("kind", ["layer", "rms"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_low_precision_gradients_2x_rule(backend, kind, dtype):
    require_backend(backend, "add_rms_norm", torch.device("cpu"))
    _check_low_precision_gradients(backend, kind, dtype, (4, 37, 1000), "cpu")


def _check_low_precision_gradients(backend, kind, dtype, shape, device):
    x, r, w, b = _inputs(shape, dtype, device, True, True, True, kind)
    dy, dh = torch.randn_like(x), torch.randn_like(x)

    def grads(fn, *ts):
        ts = [None if t is None else t.detach().clone().requires_grad_() for t in ts]
        y, h = fn(*ts)
        torch.autograd.backward([y, h], [dy.to(y.dtype), dh.to(h.dtype)])
        return [None if t is None else t.grad for t in ts]

    with poison_allocations():
        ours = grads(lambda *ts: _call(kind, *ts, backend), x, r, w, b)
    peer = grads(lambda *ts: _torch_norm(kind, *ts), x, r, w, b)
    oracle = grads(lambda *ts: _torch_norm(kind, *ts), *(_f64(t) for t in (x, r, w, b)))
    for g, g_peer, g_ref in zip(ours, peer, oracle):
        if g is not None:
            assert_close_2x(g, g_peer, g_ref)


@pytest.mark.parametrize("backend", BACKENDS)
def test_non_contiguous_input_and_zero_rows(backend):
    require_backend(backend, "add_rms_norm", torch.device("cpu"))
    base = torch.randn(6, 2, 64)
    x, r = base[:, 0], torch.randn(6, 64)  # x has row stride 128
    w = torch.randn(64)
    y, h = add_rms_norm(x, r, w, backend=backend)
    y_ref, h_ref = add_rms_norm(x.contiguous(), r, w, backend="reference")
    torch.testing.assert_close(h, h_ref)
    torch.testing.assert_close(y, y_ref, rtol=1e-5, atol=1e-5)
    y0, h0 = add_layer_norm(torch.randn(0, 5), torch.randn(0, 5), backend=backend)
    assert y0.shape == (0, 5) and h0.shape == (0, 5)


def test_residual_none_returns_x_as_h():
    x = torch.randn(2, 8)
    _, h = add_rms_norm(x, None, None, backend="reference")
    assert h is x


@pytest.mark.parametrize("kind", ["layer", "rms"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_a_residual_of_another_dtype_is_rounded_to_x_dtype(backend, kind):
    """A float32 residual stream with bf16 activations: h (and y) in x.dtype, as if the residual came in
    x.dtype; its gradient comes back in its own dtype."""
    require_backend(backend, "add_layer_norm" if kind == "layer" else "add_rms_norm", torch.device("cpu"))
    x, r, w, b = _inputs((3, 256), torch.bfloat16, "cpu", True, True, True, kind)
    r32 = (r.float() + torch.randn_like(r.float()) * 1e-3).requires_grad_()  # not representable in bf16
    with poison_allocations():
        y, h = _call(kind, x, r32, w, b, backend)
    y_same, h_same = _call(kind, x, r32.detach().to(torch.bfloat16), w, b, backend)
    assert (y.dtype, h.dtype) == (torch.bfloat16, torch.bfloat16)
    assert torch.equal(h, h_same) and torch.equal(y, y_same)
    y_ref, _ = _torch_norm(kind, _f64(h), None, _f64(w), _f64(b))
    assert_close_2x(y, _torch_norm(kind, h, None, w, b)[0], y_ref)  # the norm of that h, not just consistent
    (y.float().sum() + h.float().sum()).backward()
    assert r32.grad.dtype == torch.float32 and torch.isfinite(r32.grad).all() and r32.grad.abs().sum() > 0


# --- bad inputs ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        ({"residual": torch.randn(4, 9)}, ValueError, "residual: expected shape"),
        ({"residual": torch.randn(4, 8, dtype=torch.float64)}, TypeError, "residual: expected dtype"),
        ({"residual": torch.ones(4, 8, dtype=torch.int64)}, TypeError, "residual: expected dtype"),
        ({"weight": torch.randn(9)}, ValueError, "weight: expected shape"),
        ({"bias": torch.randn(4, 8)}, ValueError, "bias: expected shape"),
        ({"weight": torch.randn(8, device="meta")}, ValueError, "weight: expected a tensor on cpu"),
        ({"x": torch.ones(4, 8, dtype=torch.int32)}, TypeError, "x: expected dtype"),
        ({"x": torch.randn(4, 0)}, ValueError, "x: expected a hidden size"),
        ({"x": [1.0, 2.0]}, TypeError, "x: expected a torch.Tensor"),
        ({"eps": -1.0}, ValueError, "eps"),
        ({"eps": float("inf")}, ValueError, "eps"),
        ({"eps": float("nan")}, ValueError, "eps"),
        ({"eps": "1e-5"}, TypeError, "eps"),
        ({"backend": "fastest"}, ValueError, "backend: expected"),
        ({"backend": 3}, TypeError, "backend: expected a str"),
    ],
)
def test_bad_inputs(kwargs, error, match):
    args = {"x": torch.randn(4, 8), "residual": None, "weight": None, "bias": None, "eps": 1e-5}
    args.update(kwargs)
    with pytest.raises(error, match=match):
        add_layer_norm(args["x"], args["residual"], args["weight"], args["bias"], args["eps"],
                       backend=args.get("backend", "reference"))


def test_unavailable_backend_raises(monkeypatch):
    x = torch.randn(2, 8)
    if torch.cuda.is_available():
        pytest.skip("every backend may run on a GPU machine")
    with pytest.raises(BackendUnavailable, match="cuda"):
        add_rms_norm(x, backend="cuda")
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(BackendUnavailable, match="TRITON_INTERPRET"):
        add_rms_norm(x, backend="triton")
    assert "triton" not in llmfast.available_backends("add_rms_norm")


# --- GPU: real sizes in bf16/fp16 ----------------------------------------------------------------

gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("shape", [(4096, 4096), (2, 1024, 8192), (512, 16384), (64, 65536), (1000, 1), (333, 4097)])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("kind", ["layer", "rms"])
@pytest.mark.parametrize("backend", ["triton", "cuda"])
def test_gpu_forward(backend, kind, dtype, shape):
    require_backend(backend, "add_rms_norm", torch.device("cuda"))
    for affine in AFFINE:
        _check_forward(kind, backend, shape, dtype, affine, "cuda")


@pytest.mark.gpu
@gpu
# (1000, 4097) and (128, 12304): wide rows in column chunks whose last chunk is partial
@pytest.mark.parametrize("shape", [(4096, 4096), (256, 65536), (1000, 7), (1000, 4097), (128, 12304)])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("kind", ["layer", "rms"])
@pytest.mark.parametrize("backend", ["triton", "cuda"])
def test_gpu_gradients(backend, kind, dtype, shape):
    require_backend(backend, "add_rms_norm", torch.device("cuda"))
    _check_low_precision_gradients(backend, kind, dtype, shape, "cuda")


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("x_dtype, w_dtype", [(torch.bfloat16, torch.float32), (torch.float32, torch.bfloat16),
                                              (torch.float32, torch.float32), (torch.float16, torch.float16)])
@pytest.mark.parametrize("kind", ["layer", "rms"])
@pytest.mark.parametrize("backend", ["triton", "cuda"])
def test_gpu_mixed_dtypes_odd_sizes_strides_and_empty(backend, kind, x_dtype, w_dtype):
    """What the CPU tests cover only under the interpreter, compiled: weights in another dtype than x (the
    modules' case under autocast), float32, odd hidden sizes, a strided x, a float32 residual, no rows."""
    require_backend(backend, "add_rms_norm", torch.device("cuda"))
    for rows, hidden in ((1000, 1), (1000, 7), (333, 4097), (0, 64)):
        x = torch.randn(rows, 2, hidden, dtype=x_dtype, device="cuda")[:, 0]  # row stride 2 * hidden
        r = torch.randn(rows, hidden, dtype=torch.float32, device="cuda")
        w = torch.randn(hidden, dtype=w_dtype, device="cuda")
        b = torch.randn(hidden, dtype=w_dtype, device="cuda") if kind == "layer" else None
        with poison_allocations():
            y, h = _call(kind, x, r, w, b, backend)
        y_peer, h_peer = _call(kind, x, r, w, b, "reference")
        assert (y.dtype, h.dtype) == (y_peer.dtype, h_peer.dtype) == (x_dtype, x_dtype)
        torch.testing.assert_close(h, h_peer, rtol=0, atol=0)
        if rows:
            y_ref, _ = _torch_norm(kind, _f64(h), None, _f64(w), _f64(b))
            assert_close_2x(y, y_peer, y_ref)
