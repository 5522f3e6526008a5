"""The throughput benchmark's smoke run (--quick): a tiny model, ours against HF generate, results in a temp folder."""
import json

import pytest

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
