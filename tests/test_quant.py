"""quantize / QuantizedWeight / quant_matmul: error bounds, the int4 bit layout, serialisation, bad inputs, and
quant_matmul on every backend (the Triton kernels' own paths: test_quant_triton.py)."""
import pytest
import safetensors.torch
import torch
import torch.nn.functional as F

from llmfast.nn.quant_linear import QuantLinear
from llmfast.ops.quant_matmul import quant_matmul
from llmfast.quant.quantize import quantize
from llmfast.quant.weight import QuantizedWeight, pack_int4, unpack_int4
from helpers import BACKENDS, DEVICE, assert_close_2x, poison_allocations, require_backend
from quant_cases import DTYPES, _check_matmul, _randn

GROUP_SIZES = [32, 64, 128, -1]


def _scale_per_element(qw):
    """``scales (N, groups)`` repeated to ``(N, K)`` in float64."""
    n, k = qw.shape
    return qw.scales.double().repeat_interleave(k // qw.scales.shape[1], dim=1)


@pytest.mark.parametrize("shape", [(1, 128), (67, 256), (130, 384)])
@pytest.mark.parametrize("group_size", GROUP_SIZES)
@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("spread,offset", [(0.05, 0.01), (0.01, 1.0), (0.01, -3.0), (1e-6, 0.0)],
                         ids=["centred", "offset", "negative-offset", "tiny"])
def test_quantize_round_to_nearest_bound(dtype, bits, group_size, shape, spread, offset):
    # groups far from 0 test int4's zero point, stored rounded; tiny weights test scales that would underflow
    weight = (_randn(*shape) * spread + offset).to(dtype)
    qw = quantize(weight, bits, group_size)
    assert (qw.bits, qw.shape, qw.dtype) == (bits, shape, dtype)
    assert qw.group_size == (-1 if group_size in (-1, shape[1]) else group_size)
    deq = qw.dequantize()
    assert deq.dtype == dtype and deq.shape == shape
    # each element is within half a step of its group's grid, plus one rounding of the result to dtype
    w, scale = weight.double(), _scale_per_element(qw)
    bound = 0.5 * scale * (1 + 1e-6) + torch.finfo(dtype).eps * w.abs()
    assert ((deq.double() - w).abs() <= bound).all()
    assert (qw.scales > 0).all()


@pytest.mark.parametrize("bits", [8, 4])
def test_quantize_codes_span_their_range(bits):
    qw = quantize(_randn(16, 256), bits, 64)
    if bits == 8:
        codes = qw.qweight.view(16, 4, 64)
        assert qw.qweight.dtype == torch.int8 and qw.zeros is None
        # symmetric absmax scaling: every group's largest magnitude maps to +-127
        assert torch.equal(codes.abs().amax(dim=-1), torch.full((16, 4), 127, dtype=torch.int8, device=DEVICE))
    else:
        codes = unpack_int4(qw.qweight).view(16, 4, 64)
        assert qw.qweight.shape == (16, 32) and qw.qweight.dtype == torch.int32
        # asymmetric min/max scaling: every group uses codes 0 and 15
        assert (codes.amin(dim=-1) == 0).all() and (codes.amax(dim=-1) == 15).all()


@pytest.mark.parametrize("bits", [8, 4])
def test_quantize_constant_groups(bits):
    """A group whose values are all equal has scale 0 and must dequantize exactly, not to NaN."""
    weight = _randn(4, 64)
    weight[1] = 0.75
    weight[2, :32] = -2.0
    deq = quantize(weight, bits, 32).dequantize()
    assert torch.equal(deq[1], weight[1]) and torch.equal(deq[2, :32], weight[2, :32])
    assert not deq.isnan().any()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_int4_group_spanning_the_dtype_range(dtype):
    """A finite group from -3e38 to 3e38: its range overflowed float32 (scales inf, dequantized NaN)."""
    weight = torch.randn(4, 64).to(dtype)
    weight[0, :16], weight[0, 16:32], weight[0, 5] = -3e38, 3e38, 1e37
    qw = quantize(weight, 4, 32)
    w = qw.dequantize().double()
    assert torch.isfinite(qw.scales.float()).all() and torch.isfinite(w).all()
    step = qw.scales.double().repeat_interleave(32, dim=1)  # (N, K)
    assert ((w - weight.double()).abs() <= step / 2 * (1 + 2**-6)).all()


@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("dtype", DTYPES)
def test_weights_at_the_dtype_maximum_dequantize_finite(dtype, bits):
    """A scale rounded up put a group's top code past the dtype's largest value (fp16 65504 -> inf): the
    weight stays finite, within a step there and within half a step elsewhere."""
    big = torch.finfo(dtype).max
    weight = torch.randn(4, 32).to(dtype)
    weight[0, 0], weight[1, 3], weight[2] = big, -big, big
    weight[3] = torch.tensor(65472.0 if dtype == torch.float16 else big / 2, dtype=dtype)
    qw = quantize(weight, bits, 32)
    w, deq, step = weight.double(), qw.dequantize().double(), _scale_per_element(qw)
    assert torch.isfinite(deq).all() and torch.isfinite(quant_matmul(torch.eye(32, dtype=dtype)[:1], qw, backend="reference")).all()
    assert ((deq - w).abs() <= step * (1 + 1e-6) + torch.finfo(dtype).eps * w.abs()).all()
    near_max = w.abs() > big - step
    half_step = 0.5 * step * (1 + 1e-6) + torch.finfo(dtype).eps * w.abs()
    assert ((deq - w).abs() <= half_step)[~near_max].all()


def test_a_non_contiguous_int4_qweight_dequantizes():
    qw = quantize(torch.randn(8, 64), 4, 32)
    strided = QuantizedWeight(qw.qweight.t().contiguous().t(), qw.scales, qw.zeros)
    assert not strided.qweight.is_contiguous()
    assert torch.equal(strided.dequantize(), qw.dequantize())


def test_documented_defaults():
    """quantize's group_size and QuantLinear.from_linear's bits and group_size default to API.md's values."""
    assert quantize(torch.randn(8, 256), 8).group_size == 128
    layer = QuantLinear.from_linear(torch.nn.Linear(256, 8))
    assert (layer.weight_q.bits, layer.weight_q.group_size) == (4, 128)


def test_int4_bit_layout():
    """Code ``k`` of a row sits in bits ``4 * (k % 8)`` .. ``+3`` of int32 word ``k // 8``."""
    codes = torch.randint(0, 16, (3, 32), dtype=torch.uint8, device=DEVICE)
    codes[0, 7] = 15  # the top nibble sets the sign bit of the int32 word
    words = pack_int4(codes)
    assert words.shape == (3, 4) and words.dtype == torch.int32
    for row in range(3):
        for k in range(32):
            word = int(words[row, k // 8]) & 0xFFFFFFFF
            assert (word >> (4 * (k % 8))) & 0xF == int(codes[row, k])
    assert torch.equal(unpack_int4(words), codes)


@pytest.mark.parametrize("dtype", DTYPES)
def test_int4_dequantize_formula(dtype):
    """w = (q - 8) * scale + zero, per group, computed in float32 and rounded once to dtype."""
    qw = quantize(_randn(5, 128, dtype=dtype), 4, 32)
    codes = unpack_int4(qw.qweight).float().view(5, 4, 32)
    expected = (codes - 8) * qw.scales.float()[..., None] + qw.zeros.float()[..., None]
    assert torch.equal(qw.dequantize(), expected.view(5, 128).to(dtype))


@pytest.mark.parametrize("with_bias", [False, True])
@pytest.mark.parametrize("m", [1, 5, 33, 257])
@pytest.mark.parametrize("quant", [(8, -1), (8, 128), (4, 32), (4, 64), (4, 128), (4, -1)])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("backend", BACKENDS)
def test_quant_matmul(backend, dtype, quant, m, with_bias):
    require_backend(backend, "quant_matmul")
    n, k = 67, 256
    qw = quantize(_randn(n, k, dtype=dtype) * 0.05, *quant)
    x = _randn(m, k, dtype=dtype)
    bias = _randn(n, dtype=dtype) if with_bias else None
    with poison_allocations():
        y = quant_matmul(x, qw, bias, backend=backend)
    _check_matmul(y, x, qw, bias)


@pytest.mark.parametrize("leading", [(2, 3), (1, 1, 4), (0,)])
@pytest.mark.parametrize("backend", BACKENDS)
def test_quant_matmul_leading_dims(backend, leading):
    require_backend(backend, "quant_matmul")
    qw = quantize(_randn(33, 64, dtype=torch.bfloat16), 4, 64)
    x = _randn(*leading, 64, dtype=torch.bfloat16)
    with poison_allocations():
        y = quant_matmul(x, qw, backend=backend)
    assert y.shape == (*leading, 33)
    if x.numel():
        _check_matmul(y.reshape(-1, 33), x.reshape(-1, 64), qw, None)


@pytest.mark.parametrize("dtypes", [(torch.float16, torch.float32), (torch.float32, torch.bfloat16),
                                    (torch.bfloat16, torch.float16)], ids=lambda d: f"x-{d[0]}-w-{d[1]}")
@pytest.mark.parametrize("backend", BACKENDS)
def test_quant_matmul_uses_a_weight_of_another_dtype_in_x_dtype(backend, dtypes):
    """As under autocast: the weight's scales and zero points and the bias are used in x's dtype."""
    require_backend(backend, "quant_matmul")
    x_dtype, w_dtype = dtypes
    qw = quantize(_randn(40, 128, dtype=w_dtype) * 0.05, 4, 64)
    x, bias = _randn(7, 128, dtype=x_dtype), _randn(40, dtype=w_dtype).requires_grad_()
    with poison_allocations():
        y = quant_matmul(x, qw, bias, backend=backend)
    assert y.dtype == x_dtype and qw.dtype == w_dtype  # the caller's weight is left as it was
    cast = QuantizedWeight(qw.qweight, qw.scales.to(x_dtype), qw.zeros.to(x_dtype))
    _check_matmul(y, x, cast, bias.detach().to(x_dtype))
    y.sum().backward()
    assert bias.grad.dtype == w_dtype and torch.allclose(bias.grad.float(), torch.full((40,), 7.0))


@pytest.mark.parametrize("quant", [(8, 32), (4, 64), (4, -1)])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("backend", BACKENDS)
def test_quant_matmul_gradients_reach_x_and_bias(backend, dtype, quant):
    """As a frozen nn.Linear: ``x`` and ``bias`` get F.linear's gradients over the dequantized weight."""
    require_backend(backend, "quant_matmul")
    qw = quantize(_randn(40, 128, dtype=dtype) * 0.05, *quant)
    x = _randn(2, 5, 128, dtype=dtype).requires_grad_()
    bias = _randn(40, dtype=dtype).requires_grad_()
    grad_y = _randn(2, 5, 40, dtype=dtype)
    quant_matmul(x, qw, bias, backend=backend).backward(grad_y)
    x_ref, bias_ref = x.detach().double().requires_grad_(), bias.detach().double().requires_grad_()
    F.linear(x_ref, qw.dequantize().double(), bias_ref).backward(grad_y.double())
    x_peer, bias_peer = x.detach().clone().requires_grad_(), bias.detach().clone().requires_grad_()
    F.linear(x_peer, qw.dequantize(), bias_peer).backward(grad_y)
    assert_close_2x(x.grad, x_peer.grad, x_ref.grad, slack_ulps=1.0 if dtype != torch.float32 else 16.0)
    assert_close_2x(bias.grad, bias_peer.grad, bias_ref.grad, slack_ulps=1.0 if dtype != torch.float32 else 16.0)


@pytest.mark.parametrize("group_size", [64, -1])
@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("dtype", DTYPES)
def test_state_dict_round_trip(dtype, bits, group_size, tmp_path):
    qw = quantize(_randn(48, 128, dtype=dtype), bits, group_size)
    state = qw.state_dict()
    assert set(state) == ({"qweight", "scales"} if bits == 8 else {"qweight", "scales", "zeros"})

    path = tmp_path / "w.safetensors"
    safetensors.torch.save_file(state, str(path))
    for rebuilt in (QuantizedWeight.from_state_dict(state),
                    QuantizedWeight.from_state_dict(safetensors.torch.load_file(str(path), device=str(DEVICE)))):
        assert (rebuilt.bits, rebuilt.group_size, rebuilt.shape, rebuilt.dtype) == (bits, group_size, (48, 128), dtype)
        assert torch.equal(rebuilt.dequantize(), qw.dequantize())

    other = quantize(_randn(48, 128, dtype=dtype), bits, group_size)
    other.load_state_dict(state)
    assert torch.equal(other.dequantize(), qw.dequantize())


BAD_QUANTIZE = [
    (lambda: quantize(_randn(128), 8), ValueError, "weight: expected 2 dims"),
    (lambda: quantize(_randn(4, 128).long(), 8), TypeError, "weight: expected dtype"),
    (lambda: quantize(_randn(4, 128), 3), ValueError, "bits"),
    (lambda: quantize(_randn(4, 128), "4"), ValueError, "bits"),
    (lambda: quantize(_randn(4, 128), 4, 48), ValueError, "group_size: expected one of"),
    (lambda: quantize(_randn(4, 96), 8, 64), ValueError, "group_size: K = weight.shape\\[1\\] = 96 is not a multiple"),
    (lambda: quantize(_randn(4, 12), 4, -1), ValueError, "weight: 4-bit packing needs K"),
    (lambda: quantize(_randn(4, 0), 8, -1), ValueError, "weight: expected a non-empty"),
    (lambda: quantize(torch.full((4, 64), float("nan")), 8, 64), ValueError, "weight: expected finite"),
    (lambda: QuantizedWeight.from_state_dict({"qweight": torch.zeros(4, 8, dtype=torch.int8)}), ValueError,
     "state_dict: expected a 'scales'"),
    (lambda: QuantizedWeight(torch.zeros(4, 8, dtype=torch.int32), torch.ones(4, 2)), ValueError, "zeros"),
    (lambda: QuantizedWeight(torch.zeros(4, 64, dtype=torch.int8), torch.ones(4, 3)), ValueError, "scales: expected"),
    (lambda: QuantizedWeight(torch.zeros(4, 64, dtype=torch.uint8), torch.ones(4, 1)), TypeError, "qweight"),
]


@pytest.mark.parametrize("call, error, match", BAD_QUANTIZE)
def test_quantize_bad_inputs(call, error, match):
    with pytest.raises(error, match=match):
        call()


def _matmul_args(**changes):
    args = dict(x=_randn(3, 128), w=quantize(_randn(16, 128), 4, 64), bias=_randn(16))
    return {**args, **changes}


BAD_MATMUL = [
    (lambda: _matmul_args(x=_randn(3, 64)), ValueError, "x: expected shape \\(\\.\\.\\., 128\\)"),
    (lambda: _matmul_args(x=_randn(3, 128).long()), TypeError, "x: expected dtype"),
    (lambda: _matmul_args(x=_randn(3, 128).to("meta")), ValueError, "x: expected a tensor on"),
    (lambda: _matmul_args(w=_randn(16, 128)), TypeError, "w: expected a llmfast.quant.QuantizedWeight"),
    (lambda: _matmul_args(bias=_randn(15)), ValueError, "bias: expected shape"),
    (lambda: _matmul_args(bias=_randn(16).int()), TypeError, "bias: expected dtype"),
]


@pytest.mark.parametrize("make_args, error, match", BAD_MATMUL)
@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_quant_matmul_bad_inputs(backend, make_args, error, match):
    require_backend(backend, "quant_matmul")
    args = make_args()
    with pytest.raises(error, match=match):
        quant_matmul(**args, backend=backend)
