"""The C++ CPU quant_matmul kernel and QuantLinear: against x @ w.dequantize().T, over shapes, dtypes and formats."""
import pytest
import safetensors.torch
import torch
import torch.nn.functional as F

import llmfast
from llmfast.backends import resolve
from llmfast.nn.quant_linear import QuantLinear
from llmfast.ops.quant_matmul import quant_matmul
from llmfast.quant.quantize import quantize
from helpers import assert_close_2x, poison_allocations, require_backend

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
# (bits, group_size): int8 per channel and grouped, int4 grouped and per channel
QUANTS = [(8, -1), (8, 32), (8, 128), (4, 32), (4, 64), (4, 128), (4, -1)]
# the copies of the kernels the C++ op holds, widest first; the ones this CPU lacks are skipped
ISAS = ["avx512", "avx2", "baseline"]
FP32_RTOL = 1e-4  # of the largest output: the kernel and the reference sum in float32 in different orders


@pytest.fixture(autouse=True)
def _cpu_backend():
    require_backend("cpu", "quant_matmul", torch.device("cpu"))


def _weight(n, k, dtype, bits, group_size):
    return quantize(torch.randn(n, k, dtype=dtype) * 0.05, bits, group_size)


def _check(y, x, qw, bias):
    """``y`` against float64 ``x @ w.dequantize().T + bias``; 16-bit by the 2x rule against torch in that dtype."""
    w = qw.dequantize()
    ref = F.linear(x.double(), w.double(), None if bias is None else bias.double())
    assert y.dtype == x.dtype and y.shape == ref.shape
    if x.dtype == torch.float32:
        err = (y.double() - ref).abs().max().item()
        assert err <= FP32_RTOL * ref.abs().max().item(), f"max error {err:.3g}"
    else:
        assert_close_2x(y, F.linear(x, w, bias), ref)


def _isa_op(isa):
    def call(x, qw, bias=None):
        try:
            return torch.ops.llmfast.quant_matmul_cpu(x, qw.qweight, qw.scales, qw.zeros, bias, isa)
        except RuntimeError as exc:
            if "which this CPU lacks" in str(exc):
                pytest.skip(str(exc))
            raise
    return call


def test_auto_picks_the_cpu_kernel():
    assert resolve("quant_matmul", "auto", torch.device("cpu")) == "cpu"
    assert llmfast.available_backends("quant_matmul")[-2:] == ["cpu", "reference"]


@pytest.mark.parametrize("with_bias", [False, True])
@pytest.mark.parametrize("k", [128, 256, 4096])
@pytest.mark.parametrize("m", [1, 5, 33, 257])
@pytest.mark.parametrize("quant", QUANTS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_matches_dequantized_matmul(dtype, quant, m, k, with_bias):
    n = 67 if k < 4096 else 17  # odd, so the last block of columns is partial
    qw = _weight(n, k, dtype, *quant)
    x = torch.randn(m, k, dtype=dtype)
    bias = torch.randn(n, dtype=dtype) if with_bias else None
    with poison_allocations():
        y = quant_matmul(x, qw, bias, backend="cpu")
    _check(y, x, qw, bias)


@pytest.mark.parametrize("bits, k", [(8, 8), (8, 24), (8, 100), (8, 1001), (4, 8), (4, 24), (4, 136), (4, 1000)])
def test_per_channel_k_not_a_multiple_of_the_vector_chunk(bits, k):
    """One group per row allows any K (a multiple of 8 for int4): the codes past the last whole chunk."""
    qw = _weight(19, k, torch.float32, bits, -1)
    x = torch.randn(6, k)
    with poison_allocations():
        y = quant_matmul(x, qw, backend="cpu")
    _check(y, x, qw, None)


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("m", [1, 3, 9, 40])
@pytest.mark.parametrize("quant, k", [(q, k) for q in QUANTS for k in (96, 136, 512) if q[1] == -1 or k % q[1] == 0])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_every_instruction_set(dtype, quant, k, m, isa):
    """Each copy of the kernels (vector width, rows per tile), including the ones "auto" does not pick here."""
    qw = _weight(37, k, dtype, *quant)
    x = torch.randn(m, k, dtype=dtype)
    bias = torch.randn(37, dtype=dtype)
    with poison_allocations():
        y = _isa_op(isa)(x, qw, bias)
    _check(y, x, qw, bias)


@pytest.mark.parametrize("bits", [8, 4])
def test_constant_groups_have_scale_zero(bits):
    weight = torch.randn(5, 128)
    weight[1] = 0.25
    weight[3, :32] = -1.5
    qw = quantize(weight, bits, 32)
    x = torch.randn(4, 128)
    _check(quant_matmul(x, qw, backend="cpu"), x, qw, None)


def test_cpu_ops_called_directly_refuse_an_empty_k():
    """K = 0 divided by zero in the C++ ops (SIGFPE) when called directly."""
    with pytest.raises(RuntimeError, match="K .* must be positive"):
        torch.ops.llmfast.quant_matmul_cpu(torch.randn(3, 0), torch.zeros(2, 0, dtype=torch.int8), torch.ones(2, 1),
                                           None, None)
    with pytest.raises(RuntimeError, match="K .* must be positive"):
        torch.ops.llmfast.packed_linear_cpu(torch.randn(2, 0), torch.zeros(1, 0, 32), 1, None)


@pytest.mark.parametrize("leading", [(2, 3), (1, 1, 4), (0,)])
@pytest.mark.parametrize("dtype", DTYPES)
def test_leading_dims(dtype, leading):
    qw = _weight(33, 256, dtype, 4, 64)
    x = torch.randn(*leading, 256, dtype=dtype)
    with poison_allocations():
        y = quant_matmul(x, qw, backend="cpu")
    assert y.shape == (*leading, 33) and y.dtype == dtype
    if x.numel():
        _check(y.reshape(-1, 33), x.reshape(-1, 256), qw, None)


def test_non_contiguous_x():
    qw = _weight(21, 128, torch.float32, 8, 32)
    x = torch.randn(7, 256)[:, ::2]
    _check(quant_matmul(x, qw, backend="cpu"), x.contiguous(), qw, None)


def test_does_not_depend_on_the_thread_count():
    qw = _weight(301, 1024, torch.float32, 4, 128)
    x = torch.randn(20, 1024)
    y = quant_matmul(x, qw, backend="cpu")
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        assert torch.equal(quant_matmul(x, qw, backend="cpu"), y)
    finally:
        torch.set_num_threads(threads)


def _matmul_args(**changes):
    args = dict(x=torch.randn(3, 128), w=quantize(torch.randn(16, 128), 4, 64), bias=torch.randn(16))
    return {**args, **changes}


BAD_MATMUL = [
    (lambda: _matmul_args(x=torch.randn(3, 64)), ValueError, "x: expected shape \\(\\.\\.\\., 128\\)"),
    (lambda: _matmul_args(x=torch.randn(128)[0]), ValueError, "x: expected shape"),
    (lambda: _matmul_args(x=torch.randint(0, 4, (3, 128))), TypeError, "x: expected dtype"),
    (lambda: _matmul_args(w=torch.randn(16, 128)), TypeError, "w: expected a llmfast.quant.QuantizedWeight"),
    (lambda: _matmul_args(bias=torch.randn(15)), ValueError, "bias: expected shape"),
    (lambda: _matmul_args(bias=torch.randn(16).long()), TypeError, "bias: expected dtype"),
]


@pytest.mark.parametrize("make_args, error, match", BAD_MATMUL)
def test_bad_inputs_are_caught_before_the_kernel(make_args, error, match):
    with pytest.raises(error, match=match):
        quant_matmul(**make_args(), backend="cpu")


def test_the_op_itself_rejects_bad_layouts():
    """Called directly, past the public op's checks, the C++ op raises instead of reading out of bounds."""
    qw = quantize(torch.randn(16, 128), 4, 64)
    op = torch.ops.llmfast.quant_matmul_cpu
    with pytest.raises(RuntimeError, match="x must be a contiguous"):
        op(torch.randn(3, 256)[:, ::2], qw.qweight, qw.scales, qw.zeros, None)
    with pytest.raises(RuntimeError, match="zeros must be given for int4"):
        op(torch.randn(3, 128), qw.qweight, qw.scales, None, None)
    with pytest.raises(RuntimeError, match="does not match K"):
        op(torch.randn(3, 120), qw.qweight, qw.scales, qw.zeros, None)
    with pytest.raises(RuntimeError, match="power of two"):
        op(torch.randn(3, 128), qw.qweight, torch.ones(16, 3), torch.zeros(16, 3), None)
    with pytest.raises(RuntimeError, match="isa must be"):
        op(torch.randn(3, 128), qw.qweight, qw.scales, qw.zeros, None, "sse9")


# ------------------------------------------------------------------------------------------------
# QuantLinear


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("quant", [(8, -1), (8, 128), (4, 32), (4, 128)])
@pytest.mark.parametrize("dtype", DTYPES)
def test_quant_linear_matches_linear_with_the_dequantized_weight(dtype, quant, bias):
    linear = torch.nn.Linear(256, 75, bias=bias, dtype=dtype)
    qlinear = QuantLinear.from_linear(linear, *quant)
    assert (qlinear.in_features, qlinear.out_features) == (256, 75)
    assert (qlinear.weight_q.bits, qlinear.weight_q.group_size, qlinear.weight_q.dtype) == (*quant, dtype)
    x = torch.randn(2, 9, 256, dtype=dtype)
    with torch.no_grad():
        y = qlinear(x)
        _check(y.reshape(-1, 75), x.reshape(-1, 256), qlinear.weight_q, linear.bias)


@pytest.mark.parametrize("quant", [(8, 64), (4, 128), (4, -1)])
def test_quant_linear_state_dict_round_trip(quant, tmp_path):
    qlinear = QuantLinear.from_linear(torch.nn.Linear(128, 48, dtype=torch.bfloat16), *quant)
    state = qlinear.state_dict()
    zeros = {"weight_q.zeros"} if quant[0] == 4 else set()
    assert set(state) == {"weight_q.qweight", "weight_q.scales", "bias"} | zeros

    path = tmp_path / "layer.safetensors"
    safetensors.torch.save_file(state, str(path))
    empty = QuantLinear(128, 48, bits=quant[0], group_size=quant[1], dtype=torch.bfloat16)
    empty.load_state_dict(safetensors.torch.load_file(str(path)))
    x = torch.randn(5, 128, dtype=torch.bfloat16)
    assert torch.equal(empty(x), qlinear(x))


def test_quant_linear_is_a_drop_in_for_linear():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(64, 128), torch.nn.GELU(), torch.nn.Linear(128, 32))
    x = torch.randn(4, 64)
    expected = model(x)
    for i in (0, 2):
        model[i] = QuantLinear.from_linear(model[i], bits=8, group_size=32)
    torch.testing.assert_close(model(x), expected, rtol=0.05, atol=0.02)
    # code that reads nn.Linear's attributes finds them; weight is the dequantized one, not a parameter
    layer = model[0]
    assert (layer.in_features, layer.out_features) == (64, 128) and layer.bias.shape == (128,)
    assert layer.weight.shape == (128, 64) and layer.weight.dtype == torch.float32 and layer.weight.device == x.device
    assert torch.equal(layer.weight, layer.weight_q.dequantize())
    assert "weight" not in dict(layer.named_parameters()) and "weight" not in layer.state_dict()


@pytest.mark.parametrize("quant", [(8, 64), (4, 128)])
def test_quant_linear_under_autocast_runs_like_linear(quant):
    """Inside autocast a float32 layer computes in the autocast dtype and returns it, as nn.Linear does."""
    linear = torch.nn.Linear(256, 40)
    qlinear = QuantLinear.from_linear(linear, *quant)
    dequantized = torch.nn.Linear(256, 40)
    dequantized.load_state_dict({"weight": qlinear.weight, "bias": linear.bias})
    x = torch.randn(3, 7, 256)
    with torch.no_grad():
        exact = dequantized(x)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out, peer = qlinear(x), dequantized(x)
    assert out.dtype == peer.dtype == torch.bfloat16
    assert_close_2x(out, peer, exact)


def test_quant_linear_compiles_fullgraph():
    qlinear = QuantLinear.from_linear(torch.nn.Linear(128, 40), bits=4, group_size=64)
    x = torch.randn(3, 128)
    torch._dynamo.reset()
    compiled = torch.compile(qlinear, fullgraph=True)
    assert torch.equal(compiled(x), qlinear(x))


@pytest.mark.parametrize("kwargs, match", [
    (dict(in_features=100, out_features=8, bits=4, group_size=-1), "in_features: 4-bit packing"),
    (dict(in_features=96, out_features=8, bits=8, group_size=64), "group_size: in_features = 96"),
    (dict(in_features=128, out_features=8, bits=3), "bits: expected one of"),
    (dict(in_features=128, out_features=8, group_size=48), "group_size: expected one of"),
    (dict(in_features=0, out_features=8), "in_features: expected a positive int"),
])
def test_quant_linear_bad_layouts(kwargs, match):
    with pytest.raises(ValueError, match=match):
        QuantLinear(**kwargs)


def test_from_linear_needs_a_linear():
    with pytest.raises(TypeError, match="linear: expected a torch.nn.Linear"):
        QuantLinear.from_linear(torch.nn.Conv1d(4, 4, 1))
