"""The CPU engine's linear layers: ``packed_linear_cpu`` and ``PackedLinear`` compute what ``nn.Linear`` does."""
import pytest
import torch
from torch import nn

from llmfast import _ext
from llmfast.engine.cpu_linear import PANEL_COLS, PackedLinear, pack_linears, pack_weight
from llmfast.nn.quant_linear import QuantLinear

pytestmark = pytest.mark.skipif(not _ext.has_op("packed_linear_cpu"), reason="needs the llmfast._C extension")


def _isas():
    isas = ["baseline"]
    if torch.backends.cpu.get_cpu_capability() in ("AVX2", "AVX512"):
        isas.append("avx2")
    if torch.backends.cpu.get_cpu_capability() == "AVX512":
        isas.append("avx512")
    return isas


def test_pack_weight_layout():
    w = torch.randn(70, 5)
    packed = pack_weight(w)
    assert packed.shape == (3, 5, PANEL_COLS) and packed.is_contiguous()
    for n in (0, 31, 32, 69):
        torch.testing.assert_close(packed[n // PANEL_COLS, :, n % PANEL_COLS], w[n], rtol=0, atol=0)
    assert (packed[2, :, 70 - 64:] == 0).all()


@pytest.mark.parametrize("isa", _isas())
# m: AVX2 takes whole-panel tiles below 8 rows, half-panel tiles of 6 rows from 8 (with 1..5-row tails)
@pytest.mark.parametrize("m", [1, 2, 7, 8, 9, 17, 40, 100])
# 50 ends inside a panel's second half; 4100: K runs in 5 blocks, and 100 rows in 2 blocks
@pytest.mark.parametrize("n,k", [(32, 16), (50, 24), (70, 33), (100, 4100)])
@pytest.mark.parametrize("bias", [True, False])
def test_packed_linear_matches_float64(isa, m, n, k, bias):
    x, w = torch.randn(m, k), torch.randn(n, k)
    b = torch.randn(n) if bias else None
    y = torch.ops.llmfast.packed_linear_cpu(x, pack_weight(w), n, b, isa)
    expected = x.double() @ w.double().T + (b.double() if bias else 0)
    # the kernel sums each output's k products in order (or in a few interleaved partial sums): within the
    # forward error bound of recursive summation, (k + 1) * eps * sum |x w|
    bound = (k + 1) * torch.finfo(torch.float32).eps * (x.double().abs() @ w.double().abs().T + 1)
    assert y.shape == (m, n) and y.dtype == torch.float32
    assert ((y.double() - expected).abs() <= bound).all()


def test_packed_linear_rejects_bad_inputs():
    x, packed = torch.randn(3, 16), pack_weight(torch.randn(40, 16))
    with pytest.raises(RuntimeError, match="does not match"):
        torch.ops.llmfast.packed_linear_cpu(x, packed, 70, None)
    with pytest.raises(RuntimeError, match="K = 8"):
        torch.ops.llmfast.packed_linear_cpu(torch.randn(3, 8), packed, 40, None)
    with pytest.raises(RuntimeError, match="float32"):
        torch.ops.llmfast.packed_linear_cpu(x.double(), packed, 40, None)
    with pytest.raises(RuntimeError, match="isa must be"):
        torch.ops.llmfast.packed_linear_cpu(x, packed, 40, None, "sse9")
    with pytest.raises(TypeError, match="float32 CPU weight"):
        PackedLinear(nn.Linear(4, 4, dtype=torch.bfloat16))


@pytest.mark.parametrize("shape", [(1, 48), (7, 48), (2, 5, 48)])
def test_packed_linear_module_matches_linear(shape):
    linear = nn.Linear(48, 80)
    layer = PackedLinear(linear)
    x = torch.randn(shape)
    out = layer(x)
    assert out.shape == (*shape[:-1], 80)
    torch.testing.assert_close(out, linear(x).detach(), rtol=1e-5, atol=1e-5)


def test_pack_linears_swaps_plain_float32_linears_only():
    class Tied(nn.Module):
        def __init__(self):
            super().__init__()
            self.embed = nn.Embedding(50, 16)
            self.proj = nn.Linear(16, 16)
            self.bf16 = nn.Linear(16, 16, dtype=torch.bfloat16)
            self.quant = QuantLinear.from_linear(nn.Linear(128, 16), bits=8, group_size=-1)
            self.head = nn.Linear(16, 50, bias=False)
            self.head.weight = self.embed.weight

    model = Tied()
    x = torch.randn(3, 16)
    expected = model.head(model.proj(x)).detach()
    assert pack_linears(model) == 2
    assert isinstance(model.proj, PackedLinear) and isinstance(model.head, PackedLinear)
    assert type(model.bf16) is nn.Linear and isinstance(model.quant, QuantLinear)
    torch.testing.assert_close(model.head(model.proj(x)), expected, rtol=1e-5, atol=1e-5)
    assert model.embed.weight.shape == (50, 16)  # the tied head got its own copy; the embedding is intact


def test_bench_linear_cpu_smoke(tmp_path):
    import json

    from llmfast_benchmarks import bench_linear_cpu  # benchmarks/, as installed

    assert bench_linear_cpu.main(["--m", "1,9", "--shapes", "64x96", "--repeats", "1", "--threads", "1",
                                  "--out-dir", str(tmp_path)]) == 0
    rows = json.loads(next(tmp_path.glob("cpu_linear*.json")).read_text())["results"]  # _avx2 without AVX-512
    assert {(r["impl"], r["m"]) for r in rows} == {(i, m) for i in ("F.linear", "x @ W.T (W.T contiguous)",
                                                                    "ours packed") for m in (1, 9)}
    assert list(tmp_path.glob("cpu_linear*.png"))
