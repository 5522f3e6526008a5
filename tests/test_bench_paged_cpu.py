"""benchmarks/bench_paged_cpu.py (and bench_paged on CPU): its smoke cases really run, and its checks refuse a
kernel that computes or writes the wrong values before anything is timed."""
import json

import pytest
import torch

from llmfast_benchmarks import bench_paged, bench_paged_cpu  # benchmarks/, as installed
from helpers import require_backend


@pytest.fixture(autouse=True)
def _cpu_backend():
    for op in ("paged_attention", "write_kv_cache"):
        require_backend("cpu", op, torch.device("cpu"))


def test_bench_paged_on_cpu_runs_the_cpu_comparison(tmp_path, capsys):
    assert bench_paged.main(["--device", "cpu", "--quick", "--out-dir", str(tmp_path)]) == 0
    (path,) = tmp_path.glob("cpu_paged*.json")  # cpu_paged_avx2.json on a CPU without AVX-512
    rows = json.loads(path.read_text())["results"]
    impls = {(r["op"], r["impl"]) for r in rows}
    assert impls == {(op, impl) for op in ("decode", "prefill")
                     for impl in (bench_paged_cpu.OURS, bench_paged_cpu.SDPA, bench_paged_cpu.GATHER)} | {
        ("write_kv_cache", bench_paged_cpu.OURS), ("write_kv_cache", bench_paged_cpu.WRITE_PEER)}
    for row in rows:
        assert row["ms"] > 0 and row["gb_s"] == pytest.approx(row["bytes"] / row["ms"] / 1e6)
        if row["ours"] and row["op"] != "write_kv_cache":
            assert row["rel_err_vs_sdpa"] <= 1e-4  # float32
    assert list(tmp_path.glob("cpu_paged*.png")) or "matplotlib is not installed" in capsys.readouterr().out


def test_a_wrong_attention_output_stops_the_benchmark(monkeypatch):
    real = bench_paged_cpu.paged_attention
    monkeypatch.setattr(bench_paged_cpu, "paged_attention", lambda *args, **kwargs: real(*args, **kwargs) * 1.01)
    shapes, decode, prefill, _ = bench_paged_cpu.QUICK
    with pytest.raises(AssertionError, match="relative error"):
        bench_paged_cpu.run(shapes, decode, prefill, [], repeats=1)


def test_a_write_that_misses_slots_stops_the_benchmark(monkeypatch):
    real = bench_paged_cpu.write_kv_cache
    monkeypatch.setattr(bench_paged_cpu, "write_kv_cache",
                        lambda k, v, k_cache, v_cache, slots, **kwargs: real(k[1:], v[1:], k_cache, v_cache, slots[1:],
                                                                              **kwargs))
    shapes, _, _, write_tokens = bench_paged_cpu.QUICK
    with pytest.raises(AssertionError, match="wrong values"):
        bench_paged_cpu.run(shapes, [], [], write_tokens, repeats=1)


def test_threads_option_leaves_torch_as_it_found_it(tmp_path):
    before = torch.get_num_threads()
    assert bench_paged_cpu.main(["--quick", "--threads", "1", "--out-dir", str(tmp_path)]) == 0
    assert torch.get_num_threads() == before
    assert json.loads(next(tmp_path.glob("cpu_paged*.json")).read_text())["threads"] == 1
