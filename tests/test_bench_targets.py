"""The benchmarks' target bookkeeping (BENCHMARKS.md), on hand-made rows: no timing involved."""
import json
import tempfile

import pytest
import torch

import llmfast
from llmfast_benchmarks import bench_norm, bench_paged, bench_quant, common  # benchmarks/, as installed

SDPA = "sdpa (contiguous cache)"


def norm_row(mode: str, impl: str, ms: float | None, ours: bool = True, n: int = 1024, hidden: int = 4096) -> dict:
    nbytes = (4 if mode == "fwd" else 8) * n * hidden * 2
    return {"op": "rmsnorm", "mode": mode, "n": n, "hidden": hidden, "impl": impl, "ours": ours,
            "bytes": nbytes, "ms": ms, "tb_s": None if ms is None else nbytes / ms / 1e9}


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


def norm_case(n: int, hidden: int, ms: dict[str, tuple[float | None, float]]) -> list[dict]:
    """impl -> (fwd ms, fwd+bwd ms) at n x hidden; ours are the impls named "ours ..."."""
    return [norm_row(mode, impl, times[i], impl.startswith("ours"), n, hidden)
            for impl, times in ms.items() for i, mode in enumerate(bench_norm.MODES)]


def test_norm_forward_and_forward_backward_targets():
    # 16384x4096 forward: 0.18 ms is 2.98 TB/s (>= 2.7) and 1.39x the best peer (compile, 0.25 ms)
    big = norm_case(16384, 4096, {"eager": (0.30, 1.0), "torch.compile": (0.25, 0.9), "ours (triton)": (0.18, 0.6)})
    # 1024x4096: no TB/s target; 1.2x the only measured peer (eager), 1.4x eager forward+backward
    small = norm_case(1024, 4096, {"eager": (0.024, 0.07), "torch.compile": (None, 0.06),
                                   "ours (triton)": (0.02, 0.05)})
    # 16384x4096 again: 1.36x the peers, but 2.44 TB/s
    slow = norm_case(16384, 4096, {"eager": (0.30, 1.0), "ours (triton)": (0.22, 0.6)})
    for rows in (big + small, slow):
        bench_norm.add_ratios(rows)
        bench_norm.add_targets(rows)
    (big_fwd, big_fb), (small_fwd, small_fb), (slow_fwd, _) = ([r for r in rows if r["ours"]]
                                                                for rows in (big, small, slow))
    assert big_fwd["best_peer"] == "torch.compile" and big_fwd["vs_best_peer"] == pytest.approx(0.25 / 0.18)
    assert big_fwd["target_tb_s"] == 2.7 and big_fwd["meets_fwd_tb_s"]
    assert big_fwd["meets_fwd_vs_peer"] and big_fwd["meets_fwd_target"]
    assert big_fb["vs_eager"] == pytest.approx(1.0 / 0.6) and big_fb["meets_fwd_bwd_target"]
    assert "meets_fwd_tb_s" not in small_fwd and "target_tb_s" not in small_fwd  # 2.7 TB/s: 16384x4096 and above
    assert small_fwd["best_peer"] == "eager" and not small_fwd["meets_fwd_vs_peer"]
    assert not small_fwd["meets_fwd_target"]
    assert small_fb["vs_eager"] == pytest.approx(1.4) and not small_fb["meets_fwd_bwd_target"]
    assert slow_fwd["meets_fwd_vs_peer"] and not slow_fwd["meets_fwd_tb_s"] and not slow_fwd["meets_fwd_target"]
    assert "meets_fwd_target" not in big_fb and "meets_fwd_bwd_target" not in big_fwd
    assert not any(k.startswith("meets_") for r in big + small + slow if not r["ours"] for k in r)
    wide = norm_case(4096, 65536, {"eager": (1.2, 4.0), "ours (triton)": (0.8, 2.4)})  # 4x the elements: 2.68 TB/s
    bench_norm.add_ratios(wide)
    bench_norm.add_targets(wide)
    assert wide[2]["target_tb_s"] == 2.7 and not wide[2]["meets_fwd_tb_s"]
    # on a GPU that copies at 2.8 TB/s, "90% of the measured copy" is 2.52 TB/s, which 2.68 meets
    bench_norm.add_targets(wide, copy_tb_s=2.8)
    assert wide[2]["target_tb_s"] == pytest.approx(2.52) and wide[2]["meets_fwd_tb_s"]


def paged_row(batch: int, context: int, impl: str, ms: float) -> dict:
    nbytes = 2 * batch * context * 8 * 128 * 2  # K + V of 8 kv heads, head dim 128, bf16
    return {"op": "decode", "batch": batch, "context": context, "impl": impl, "ours": impl.startswith("ours"),
            "bytes": nbytes, "ms": ms, "tb_s": nbytes / ms / 1e9, "roofline": nbytes / ms / 1e9 / common.COPY_TB_S}


def test_paged_targets_tb_s_at_two_cases_and_sdpa_everywhere():
    rows = [paged_row(64, 4096, SDPA, 0.39), paged_row(64, 4096, "ours (triton)", 0.38),  # 2.83 TB/s
            paged_row(64, 4096, "ours (cuda)", 0.42),  # 2.56 TB/s, slower than SDPA
            paged_row(1, 4096, SDPA, 0.044), paged_row(1, 4096, "ours (triton)", 0.010),  # 1.68 TB/s
            paged_row(64, 1024, SDPA, 0.10), paged_row(64, 1024, "ours (triton)", 0.11),
            {"op": "write_kv_cache", "tokens": 256, "impl": "ours (triton)", "ours": True, "ms": 0.01, "tb_s": 0.4}]
    bench_paged.mark_targets(rows)
    triton, cuda, one, short = (rows[i] for i in (1, 2, 4, 6))
    assert triton["target_tb_s"] == 2.7 and triton["meets_target"] and triton["meets_sdpa"]
    assert triton["vs_sdpa"] == pytest.approx(0.39 / 0.38)
    assert cuda["target_tb_s"] == 2.7 and not cuda["meets_target"] and not cuda["meets_sdpa"]
    assert one["target_tb_s"] == 1.5 and one["meets_target"] and one["meets_sdpa"]
    assert "meets_target" not in short and not short["meets_sdpa"]  # no TB/s target at 64 x 1024
    assert not any(k.startswith("meets_") for r in (rows[0], rows[3], rows[5], rows[7]) for k in r)
    bench_paged.mark_targets(rows, copy_tb_s=4.5)  # an H200-like copy rate: 1.5x the H100's targets
    assert triton["target_tb_s"] == pytest.approx(4.05) and not triton["meets_target"]
    assert one["target_tb_s"] == pytest.approx(2.25) and not one["meets_target"]


def test_paged_quick_run_writes_to_a_temporary_folder(tmp_path, monkeypatch, capsys):
    """--quick, with the GPU and the timed work stubbed: the results go to a fresh temporary folder."""
    monkeypatch.setenv(common.RESULTS_DIR_ENV, str(tmp_path / "default"))
    monkeypatch.setattr(tempfile, "mkdtemp", lambda prefix="": str(tmp_path / "quick"))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA H200")
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: None)
    monkeypatch.setattr(llmfast, "available_backends", lambda op: ["reference", "triton"])
    monkeypatch.setattr(bench_paged, "measure_copy_tb_s", lambda: 4.0)
    monkeypatch.setattr(bench_paged, "run_decode", lambda batch, context, runnable: [
        paged_row(batch, context, SDPA, 0.05), paged_row(batch, context, "ours (triton)", 0.04)])
    monkeypatch.setattr(bench_paged, "run_write", lambda tokens, runnable: [])
    monkeypatch.setattr(bench_paged, "plot_bars", lambda *args, **kwargs: None)
    assert bench_paged.main(["--quick"]) == 0
    assert not (tmp_path / "default").exists()  # nor benchmarks/results/
    rows = json.loads((tmp_path / "quick" / "h200_paged_partial.json").read_text())["results"]
    assert [r["meets_sdpa"] for r in rows if r["ours"]] == [True, True]
    out = capsys.readouterr().out
    assert ">= sdpa" in out and "yes" in out


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
    monkeypatch.setattr(common, "cpu_without_avx512", lambda: without_avx512)
    with common.results_dir(tmp_path):
        assert common.results_path("quant", ".json", "cpu") == tmp_path / expected
