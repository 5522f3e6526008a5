"""llmfast.nn norm modules are drop-ins: same parameters as torch.nn, same outputs, state dicts load."""
import pytest
import torch

import llmfast
from helpers import require_backend

BACKENDS = ["reference", "cpu", "triton"]


def _randomize(module):
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn_like(p))
    return module


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shape, kwargs", [
    (8, {}), ((4, 8), {}), (8, {"bias": False}), (8, {"elementwise_affine": False}), (8, {"eps": 1e-3}),
])
def test_layer_norm_matches_torch_and_loads_its_state_dict(backend, shape, kwargs):
    require_backend(backend, "add_layer_norm", torch.device("cpu"))
    theirs = _randomize(torch.nn.LayerNorm(shape, **kwargs))
    ours = llmfast.nn.LayerNorm(shape, **kwargs, backend=backend)
    assert [n for n, _ in ours.named_parameters()] == [n for n, _ in theirs.named_parameters()]
    ours.load_state_dict(theirs.state_dict())
    x = torch.randn(3, 5, 4, 8) if shape == (4, 8) else torch.randn(3, 5, 8)
    torch.testing.assert_close(ours(x), theirs(x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("eps", [1e-6, None])
def test_rms_norm_matches_torch_and_loads_its_state_dict(backend, eps):
    require_backend(backend, "add_rms_norm", torch.device("cpu"))
    theirs = _randomize(torch.nn.RMSNorm(16, eps=eps))
    ours = llmfast.nn.RMSNorm(16, eps=eps, backend=backend)
    ours.load_state_dict(theirs.state_dict())
    x = torch.randn(2, 7, 16)
    torch.testing.assert_close(ours(x), theirs(x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_rms_norm_default_eps_in_half_precision_is_float32s(backend, dtype):
    """torch.nn.RMSNorm(eps=None) computes fp16/bf16 in float32 with float32's epsilon: on small inputs the
    input dtype's epsilon (bf16's is 65536x larger) changes the result completely."""
    require_backend(backend, "add_rms_norm", torch.device("cpu"))
    theirs = torch.nn.RMSNorm(16, eps=None, dtype=dtype)
    ours = llmfast.nn.RMSNorm(16, eps=None, dtype=dtype, backend=backend)
    x = (torch.randn(3, 16) * 1e-3).to(dtype)
    torch.testing.assert_close(ours(x).float(), theirs(x).float(), rtol=2 ** -7, atol=0)


@pytest.mark.parametrize("ours_cls, theirs_cls", [
    (llmfast.nn.LayerNorm, torch.nn.LayerNorm), (llmfast.nn.RMSNorm, torch.nn.RMSNorm),
])
def test_norms_are_torchs_classes_and_reset_like_them(ours_cls, theirs_cls):
    """Code that finds norms by type (HF Trainer's weight-decay groups, ``_init_weights``) must find ours."""
    ours = _randomize(ours_cls(8))
    assert isinstance(ours, theirs_cls)
    ours.reset_parameters()
    theirs = theirs_cls(8)
    for (name, p), (their_name, q) in zip(ours.named_parameters(), theirs.named_parameters(), strict=True):
        assert name == their_name
        torch.testing.assert_close(p, q, rtol=0, atol=0)
    assert ours(torch.randn(2, 8)).shape == (2, 8)


@pytest.mark.parametrize("backend", BACKENDS)
def test_fused_add_modules_return_norm_of_the_sum_and_the_sum(backend):
    require_backend(backend, "add_rms_norm", torch.device("cpu"))
    x, r = torch.randn(2, 3, 32), torch.randn(2, 3, 32)
    rms = _randomize(llmfast.nn.FusedAddRMSNorm(32, backend=backend))
    ln = _randomize(llmfast.nn.FusedAddLayerNorm(32, backend=backend))
    for module, plain in ((rms, torch.nn.RMSNorm(32, eps=1e-6)), (ln, torch.nn.LayerNorm(32))):
        plain.load_state_dict(module.state_dict())
        y, h = module(x, r)
        torch.testing.assert_close(h, x + r)
        torch.testing.assert_close(y, plain(x + r), rtol=1e-5, atol=1e-5)
        y0, h0 = module(x)
        assert h0.data_ptr() == x.data_ptr() and h0.shape == x.shape  # h is x itself, not a copy
        torch.testing.assert_close(y0, plain(x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("make, match", [
    (lambda: llmfast.nn.RMSNorm(-1), "hidden_size: expected a positive int"),
    (lambda: llmfast.nn.RMSNorm(0), "hidden_size"),
    (lambda: llmfast.nn.LayerNorm((4, 0)), "normalized_shape"),
    (lambda: llmfast.nn.LayerNorm(()), "normalized_shape: expected at least one dim"),
    (lambda: llmfast.nn.FusedAddLayerNorm(2.5), "normalized_shape"),
])
def test_bad_sizes_are_refused_when_built(make, match):
    with pytest.raises(ValueError, match=match):
        make()


def test_modules_name_the_argument_on_bad_input():
    with pytest.raises(ValueError, match="x: expected trailing dims"):
        llmfast.nn.LayerNorm(8)(torch.randn(2, 9))
    with pytest.raises(ValueError, match="residual: expected shape"):
        llmfast.nn.FusedAddRMSNorm(8)(torch.randn(2, 8), torch.randn(3, 8))
    with pytest.raises(TypeError, match="x: expected dtype"):
        llmfast.nn.RMSNorm(8)(torch.ones(2, 8, dtype=torch.int64))


@pytest.mark.parametrize("ours_cls, theirs", [
    (llmfast.nn.LayerNorm, torch.nn.LayerNorm(16)), (llmfast.nn.RMSNorm, torch.nn.RMSNorm(16, eps=1e-6)),
])
def test_float64_modules_compute_in_float64_as_torch(ours_cls, theirs):
    """No kernel takes float64: ``module.double()`` runs torch's own norm, exactly as the module replaced."""
    theirs = _randomize(theirs).double()
    ours = ours_cls(16).double()
    ours.load_state_dict(theirs.state_dict())
    x = torch.randn(3, 16, dtype=torch.float64, requires_grad=True)
    y = ours(x)
    assert y.dtype == torch.float64
    torch.testing.assert_close(y, theirs(x), rtol=1e-12, atol=1e-12)
    assert torch.autograd.gradcheck(ours, (x,))


def test_float64_fused_add_returns_the_sum():
    module = _randomize(llmfast.nn.FusedAddRMSNorm(8)).double()
    x, r = torch.randn(2, 8, dtype=torch.float64), torch.randn(2, 8, dtype=torch.float64)
    y, h = module(x, r)
    torch.testing.assert_close(h, x + r, rtol=0, atol=0)
    torch.testing.assert_close(y, torch.nn.functional.rms_norm(x + r, (8,), module.weight, 1e-6), rtol=0, atol=0)
    with pytest.raises(ValueError, match="residual: expected shape"):
        module(x, r[:1])


def _layer_norm_pair(hidden, device):
    theirs = _randomize(torch.nn.LayerNorm(hidden)).to(device)
    ours = llmfast.nn.LayerNorm(hidden).to(device)
    ours.load_state_dict(theirs.state_dict())
    return ours, theirs


def test_layer_norm_under_cpu_autocast_keeps_the_input_dtype_as_torch():
    ours, theirs = _layer_norm_pair(64, "cpu")
    x = torch.randn(4, 64).to(torch.bfloat16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        mine, ref = ours(x), theirs(x)
    assert mine.dtype == ref.dtype == torch.bfloat16
    torch.testing.assert_close(mine, ref)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_layer_norm_under_cuda_autocast_returns_float32_as_torch(dtype):
    ours, theirs = _layer_norm_pair(1024, "cuda")
    x = torch.randn(256, 1024, device="cuda").to(dtype)
    with torch.autocast("cuda", dtype=dtype):
        mine, ref = ours(x), theirs(x)
    assert mine.dtype == ref.dtype == torch.float32
    torch.testing.assert_close(mine, ref, rtol=1e-5, atol=1e-5)  # both compute on the same float32 input


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_rms_norm_under_cuda_autocast_returns_the_dtype_torchs_does(dtype):
    theirs = _randomize(torch.nn.RMSNorm(1024, eps=1e-6)).to("cuda")
    ours = llmfast.nn.RMSNorm(1024).to("cuda")
    ours.load_state_dict(theirs.state_dict())
    x = torch.randn(256, 1024, device="cuda").to(dtype)
    with torch.autocast("cuda", dtype=dtype):
        mine, ref = ours(x), theirs(x)
    assert mine.dtype == ref.dtype  # float32 where torch's rms_norm is on autocast's float32 list (2.12 on)
    torch.testing.assert_close(mine.float(), ref.float(), rtol=2e-2, atol=2e-2)
