"""The benchmarks' target bookkeeping (BENCHMARKS.md), on hand-made rows: no timing involved."""
import pytest

from llmfast_benchmarks import bench_norm, bench_quant  # benchmarks/, as installed


def norm_row(mode: str, impl: str, ms: float, ours: bool = True) -> dict:
    nbytes = (4 if mode == "fwd" else 8) * 1024 * 4096 * 2
    return {"op": "rmsnorm", "mode": mode, "n": 1024, "hidden": 4096, "impl": impl, "ours": ours,
            "bytes": nbytes, "ms": ms, "tb_s": nbytes / ms / 1e9}


def test_norm_backward_alone_is_fwd_bwd_minus_fwd():
    fast = [norm_row("fwd", "ours (triton)", 1.0), norm_row("fwd+bwd", "ours (triton)", 2.4)]
    slow = [norm_row("fwd", "ours (triton)", 1.0), norm_row("fwd+bwd", "ours (triton)", 2.6)]
    peer = [norm_row("fwd", "eager", 1.0, ours=False), norm_row("fwd+bwd", "eager", 3.0, ours=False)]
    bench_norm.add_backward_rates(fast + peer)
    bench_norm.add_backward_rates(slow)
    row = fast[1]
    assert row["bwd_ms"] == pytest.approx(1.4)  # the backward moves as many bytes as the forward
    assert row["fwd_over_bwd_tb_s"] == pytest.approx(1.4) and row["meets_bwd_target"]
    assert slow[1]["fwd_over_bwd_tb_s"] == pytest.approx(1.6) and not slow[1]["meets_bwd_target"]
    assert "bwd_ms" not in peer[1] and "bwd_ms" not in fast[0]


def test_quant_targets_apply_to_the_large_shapes_only(monkeypatch):
    monkeypatch.setattr(bench_quant, "check", lambda name, y, x, w: 0.0)
    monkeypatch.setattr(bench_quant, "bench_ms", lambda fn, device: fn())
    impls = {bench_quant.PEER: (lambda x: 1.0, 1, None), "ours int4 g128": (lambda x: 0.25, 1, None)}
    small = bench_quant.run_case(64, 64, 1, impls, "cpu")  # K x N 64 x 64: not a target shape
    assert all("meets_target" not in r for r in small)
    k, n = bench_quant.TARGET_SHAPES[0]
    large = {r["impl"]: r for r in bench_quant.run_case(k, n, 1, impls, "cpu") if r["impl"] != bench_quant.PEER}
    assert large["ours int4 g128"]["x_bf16"] == pytest.approx(4.0)
    assert large["ours int4 g128"]["target_x_bf16"] == 3.3 and large["ours int4 g128"]["meets_target"]


@pytest.mark.parametrize("without_avx512, expected", [(False, "cpu_quant.json"), (True, "cpu_quant_avx2.json")])
def test_cpu_results_of_a_cpu_without_avx512_are_named_apart(tmp_path, monkeypatch, without_avx512, expected):
    from llmfast_benchmarks import common

    monkeypatch.setattr(common, "cpu_without_avx512", lambda: without_avx512)
    with common.results_dir(tmp_path):
        assert common.results_path("quant", ".json", "cpu") == tmp_path / expected
