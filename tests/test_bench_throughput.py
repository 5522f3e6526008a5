"""The throughput benchmark: its smoke run (--quick; a tiny model, ours against HF generate, results in a temp
folder) and part (c)'s roofline, with the GPU stubbed."""
import json
from types import SimpleNamespace

import pytest
import torch

pytest.importorskip("transformers")

from llmfast_benchmarks import bench_throughput, common  # noqa: E402  (benchmarks/, as installed)


def test_quick_run_writes_results_elsewhere_with_hf_tokens(tmp_path, capsys):
    results_dir = common.RESULTS_DIR
    assert bench_throughput.main(["--quick", "--device", "cpu", "--out-dir", str(tmp_path)]) == 0
    assert common.RESULTS_DIR == results_dir  # the real results folder is left alone
    rows = json.loads(next(tmp_path.glob("cpu_throughput*.json")).read_text())["results"]  # _avx2 without AVX-512
    assert [r["system"] for r in rows] == ["llmfast LLM.generate", "HF generate, padded batch",
                                           "HF generate, one request at a time"]
    for row in rows:
        assert row["output_tokens"] > 0 and row["tok_s"] > 0
        if row["system"] != "llmfast LLM.generate":
            assert row["same_tokens"] == row["requests"], "greedy tokens differ from HF generate's"
    assert "llmfast LLM.generate" in capsys.readouterr().out  # the printed table


def test_bad_arguments_exit_with_a_message(capsys):
    for args, message in ((["--parts", "x"], "--parts: expected a comma-separated subset of a,b,c"),
                          (["--repeats", "0"], "--repeats: expected a positive int")):
        with pytest.raises(SystemExit) as exit_info:
            bench_throughput.main(args)
        assert exit_info.value.code == 2 and message in capsys.readouterr().err


def test_decode_roofline_uses_the_measured_copy_rate(tmp_path, monkeypatch):
    """Part (c) with the GPU's copy rate, the engine and the clock stubbed: 6 TB/s over 3 GB of weights."""
    weight_bytes = 3 * 10**9
    monkeypatch.setattr(bench_throughput, "measure_copy_tb_s", lambda: 6.0)
    engine = SimpleNamespace(runner=SimpleNamespace(model=None))
    monkeypatch.setattr(bench_throughput, "LLM", lambda *args, **kwargs: engine)
    monkeypatch.setattr(bench_throughput, "decode_weight_bytes", lambda model: weight_bytes)
    # a run of n new tokens "takes" n ms: 256 decoded tokens in 257 ms - 1 ms, 1000 tok/s
    monkeypatch.setattr(bench_throughput, "run_llmfast", lambda llm, requests: requests[0][1] / 1000)
    monkeypatch.setattr(bench_throughput, "timed", lambda fn, device: (fn(), None))
    rows = bench_throughput.part_c(tmp_path, 1, torch.device("cpu"))
    assert [r["system"] for r in rows] == ["llmfast bf16", "llmfast int8", "llmfast int4"]
    for row in rows:
        assert row["tok_s"] == pytest.approx(1000)
        assert row["roofline_tok_s"] == pytest.approx(6e12 / weight_bytes) and row["roofline_tb_s"] == 6.0
        assert row["of_roofline"] == pytest.approx(0.5)
        assert row["h100_roofline_tok_s"] == pytest.approx(common.COPY_TB_S * 1e12 / weight_bytes)
