"""The Triton quant_matmul kernels: each path forced, the path picked by M, its dequantize, torch.compile (under
the interpreter on CPU), and real sizes on a GPU."""
import importlib

import pytest
import torch
import torch.nn.functional as F

from llmfast.ops.quant_matmul import quant_matmul
from llmfast.quant.quantize import quantize
from helpers import DEVICE, assert_close_2x, poison_allocations, require_backend
from quant_cases import DTYPES, _check_matmul, _randn


def _triton_kernels():
    require_backend("triton", "quant_matmul")
    return importlib.import_module("llmfast_kernels.quant_matmul")


def _path(kernels, name):
    """(x, qw, bias) -> y through one Triton path, past the dispatcher."""
    if name == "tiled":
        return lambda x, qw, bias: kernels.quant_matmul_tiled(x, qw.qweight, qw.scales, qw.zeros, bias)
    split_k = {"splitk": None, "splitk x1": 1, "splitk x3": 3}[name]
    return lambda x, qw, bias: kernels.quant_matmul_splitk(x, qw.qweight, qw.scales, qw.zeros, bias, split_k)


@pytest.mark.parametrize("m", [1, 5, 33])
@pytest.mark.parametrize("quant", [(8, -1), (8, 32), (4, 32), (4, 128)])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("path", ["splitk x1", "splitk x3", "tiled"])
def test_triton_paths(path, dtype, quant, m):
    """Both paths at every M (the dispatcher would send M=33 to tiled and M<=16 to splitk); split-K with
    one slice (y written directly) and with three (fp32 partial sums, then the reduction)."""
    kernels = _triton_kernels()
    n, k = 35, (136 if quant[1] == -1 else 256)  # per channel: a K that is not a multiple of the K tile
    qw = quantize(_randn(n, k, dtype=dtype) * 0.05, *quant)
    x, bias = _randn(m, k, dtype=dtype), _randn(n, dtype=dtype)
    with poison_allocations():
        y = _path(kernels, path)(x, qw, bias)
    _check_matmul(y, x, qw, bias)


@pytest.mark.parametrize("k", [40, 136])
def test_triton_per_channel_k_not_a_multiple_of_the_tile(k):
    """One group per row allows any K (a multiple of 8 for int4): masked rows past K in the last tile."""
    kernels = _triton_kernels()
    for bits in (8, 4):
        qw = quantize(_randn(19, k, dtype=torch.float16), bits, -1)
        x = _randn(6, k, dtype=torch.float16)
        for path in ("splitk x3", "tiled"):
            _check_matmul(_path(kernels, path)(x, qw, None), x, qw, None)


@pytest.mark.parametrize("quant", [(8, -1), (8, 64), (4, 32), (4, 64), (4, 128), (4, -1)])
@pytest.mark.parametrize("dtype", DTYPES)
def test_triton_dequantize(dtype, quant):
    """Equal to QuantizedWeight.dequantize() (fp32 math, one rounding), but for one unit in the last place
    where the kernel rounds differently: the interpreter rounds fp32 to bf16 by truncation (Triton 3.6 to
    3.9); on a GPU, int4's (q - 8) * scale + zero may become one FMA, which rounds once where PyTorch
    rounds twice (the product is exact, so this shows only with float32 scales)."""
    kernels = _triton_kernels()
    qw = quantize(_randn(37, 256, dtype=dtype), *quant)
    with poison_allocations():
        w = kernels.dequantize(qw.qweight, qw.scales, qw.zeros, dtype)
    expected = qw.dequantize()
    one_ulp = dtype == (torch.float32 if DEVICE.type == "cuda" else torch.bfloat16)
    if one_ulp:
        ulp = torch.finfo(dtype).eps * expected.double().abs()
        assert ((w.double() - expected.double()).abs() <= ulp).all()
    else:
        assert torch.equal(w, expected)


@pytest.mark.parametrize("m, path", [(1, "splitk"), (16, "splitk"), (17, "tiled"), (1023, "tiled"),
                                     (1024, "dequantize" if DEVICE.type == "cuda" else "tiled")])
def test_triton_picks_the_path_by_m(m, path, monkeypatch):
    kernels = _triton_kernels()
    qw = quantize(_randn(8, 64, dtype=torch.float16), 4, 64)
    calls = []
    results = {
        "quant_matmul_splitk": lambda x, *rest: torch.zeros(x.shape[0], 8, dtype=x.dtype, device=x.device),
        "quant_matmul_tiled": lambda x, *rest: torch.zeros(x.shape[0], 8, dtype=x.dtype, device=x.device),
        "dequantize": lambda *args: qw.dequantize(),
    }
    for launcher, result in results.items():
        def record(*args, launcher=launcher, result=result):
            calls.append(launcher.removeprefix("quant_matmul_"))
            return result(*args)
        monkeypatch.setattr(kernels, launcher, record)
    quant_matmul(_randn(m, 64, dtype=torch.float16), qw, backend="triton")
    assert calls == [path]


@pytest.mark.parametrize("make_args, match", [
    (lambda qw: (_randn(4, 256)[:, ::2], qw.qweight, qw.scales, qw.zeros, None), "x: expected a contiguous"),
    (lambda qw: (_randn(4, 128), qw.qweight, qw.scales, None, None), "zeros: expected"),
    (lambda qw: (_randn(4, 120), qw.qweight, qw.scales, qw.zeros, None), "x: expected \\(M, 128\\)"),
    (lambda qw: (_randn(4, 128), qw.qweight, torch.ones(16, 3), torch.ones(16, 3), None), "scales: expected"),
    (lambda qw: (_randn(4, 128), qw.qweight, qw.scales, qw.zeros, _randn(15)), "bias: expected"),
])
def test_triton_launchers_reject_bad_layouts(make_args, match):
    """Called past the public op's checks, the launchers raise instead of reading out of bounds."""
    kernels = _triton_kernels()
    args = make_args(quantize(_randn(16, 128), 4, 64))
    for launch in (kernels.quant_matmul_splitk, kernels.quant_matmul_tiled):
        with pytest.raises(ValueError, match=match):
            launch(*args)


def test_triton_fullgraph_compile_is_one_node():
    require_backend("triton", "quant_matmul")
    qw = quantize(_randn(24, 64, dtype=torch.float16), 4, 32)
    bias = _randn(24, dtype=torch.float16)
    graphs = []

    def record(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    torch._dynamo.reset()
    compiled = torch.compile(lambda x: quant_matmul(x, qw, bias, backend="triton"), fullgraph=True, backend=record)
    x = _randn(2, 3, 64, dtype=torch.float16)
    assert torch.equal(compiled(x), quant_matmul(x, qw, bias, backend="triton"))
    targets = [node.target for node in graphs[0].graph.nodes if node.op == "call_function"]
    assert targets.count(torch.ops.llmfast.quant_matmul_triton.default) == 1


needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("m", [1, 4, 16, 17, 64, 256, 1024])
@pytest.mark.parametrize("quant", [(4, 128), (4, 32), (8, -1), (8, 128)])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_triton_real_sizes_on_gpu(dtype, quant, m):
    """Llama-sized layer with an odd N, every path the dispatcher picks (M=1024: dequantize + cuBLAS),
    by the 2x rule against fp32 ``x @ w.dequantize().T``."""
    require_backend("triton", "quant_matmul", torch.device("cuda"))
    n, k = 4096 + 17, 4096
    qw = quantize(torch.randn(n, k, dtype=dtype, device="cuda") * 0.02, *quant)
    x = torch.randn(m, k, dtype=dtype, device="cuda")
    bias = torch.randn(n, dtype=dtype, device="cuda")
    with poison_allocations():
        y = quant_matmul(x, qw, bias, backend="triton")
    w = qw.dequantize()
    ref = x.float() @ w.float().T + bias.float()
    assert_close_2x(y, F.linear(x, w, bias), ref)


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("m", [1, 64, 1024])
def test_triton_output_keeps_x_dtype_under_autocast(m):
    """Eager custom ops still run under autocast: the M >= 1024 path (dequantize + F.linear) would
    return bf16 for a float32 x, where the kernels and the fake return float32."""
    require_backend("triton", "quant_matmul", torch.device("cuda"))
    qw = quantize(torch.randn(256, 512, device="cuda") * 0.02, 4, 128)
    x = torch.randn(m, 512, device="cuda")
    with torch.autocast("cuda", dtype=torch.bfloat16):
        y = quant_matmul(x, qw, backend="triton")
    assert y.dtype == torch.float32
    torch.testing.assert_close(y, x @ qw.dequantize().T, atol=1e-4, rtol=1e-4)


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("m", [1, 5, 16, 33, 128])
@pytest.mark.parametrize("path", ["splitk", "splitk x1", "tiled"])
def test_triton_paths_real_sizes_on_gpu(path, m):
    """Each path forced at K = 14336 (the MLP down projection), int4 g128, bf16."""
    kernels = _triton_kernels()
    n, k = 4096 + 3, 14336
    qw = quantize(torch.randn(n, k, dtype=torch.bfloat16, device="cuda") * 0.02, 4, 128)
    x = torch.randn(m, k, dtype=torch.bfloat16, device="cuda")
    with poison_allocations():
        y = _path(kernels, path)(x, qw, None)
    w = qw.dequantize()
    assert_close_2x(y, F.linear(x, w), x.float() @ w.float().T)
    # reproducible: the split-K reduction adds the slices in a fixed order
    assert torch.equal(_path(kernels, path)(x, qw, None), y)
