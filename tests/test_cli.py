"""The `llmfast` command: `generate` (whole and streamed) prints what ``LLM.generate`` makes, `demo` runs on
its embedded model, `bench` reaches every benchmark, and bad arguments end with exit status 2 and a message.
(`eval ppl` is tested in test_eval.py, `serve` in test_server*.py.)"""
import os
import shutil
import subprocess
import sys

import pytest
import torch

from llmfast import available_backends, cli
from llmfast.engine import LLM, SamplingParams

pytest.importorskip("transformers")
ENV = {**os.environ, "HF_HUB_OFFLINE": "1"}
PROMPT = "The quick brown fox"


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    from llmfast.demo import build_tiny_checkpoint

    return build_tiny_checkpoint(tmp_path_factory.mktemp("tiny"), hidden_size=64, num_layers=2,
                                 max_position_embeddings=128)


def llmfast(*args, timeout=120):
    return subprocess.run([sys.executable, "-m", "llmfast", *map(str, args)], capture_output=True, text=True,
                          timeout=timeout, env=ENV)


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "stream"])
def test_generate_prints_the_engine_text(checkpoint, stream):
    expected = LLM(checkpoint).generate(PROMPT, SamplingParams(temperature=0, max_tokens=12, ignore_eos=True),
                                        use_tqdm=False)[0].outputs[0].text
    result = llmfast("generate", "--model", checkpoint, "--prompt", PROMPT, "--temperature", 0, "--max-tokens", 12,
                     "--ignore-eos", *(["--stream"] if stream else []))
    assert result.returncode == 0, result.stderr
    assert result.stdout == expected + "\n"


def test_generate_sampling_flags_and_batches(checkpoint, capsys):
    args = ["generate", "--model", str(checkpoint), "--prompt", "a", "--prompt", "b", "--n", "2", "--seed", "5",
            "--temperature", "0.8", "--top-k", "50", "--top-p", "0.9", "--min-p", "0.01", "--max-tokens", "6",
            "--stop", "zz", "--stop", "yy", "--presence-penalty", "0.5", "--frequency-penalty", "-0.3",
            "--repetition-penalty", "1.2"]
    params = SamplingParams(n=2, seed=5, temperature=0.8, top_k=50, top_p=0.9, min_p=0.01, max_tokens=6,
                            stop=["zz", "yy"], presence_penalty=0.5, frequency_penalty=-0.3, repetition_penalty=1.2)
    expected = LLM(checkpoint).generate(["a", "b"], params, use_tqdm=False)
    assert cli.main(args) == 0
    out = capsys.readouterr().out
    for i, request in enumerate(expected):
        for c in request.outputs:
            assert f"--- prompt {i}, completion {c.index} ({c.finish_reason}) ---\n{c.text}\n" in out


@pytest.mark.parametrize("extra,message", [
    (["--top-p", "2"], "top_p"),
    (["--n", "2", "--stream"], "--stream"),
    (["--max-tokens", "0"], "max_tokens"),
])
def test_generate_reports_bad_arguments(checkpoint, capsys, extra, message):
    assert cli.main(["generate", "--model", str(checkpoint), "--prompt", "a", *extra]) == 2
    assert message in capsys.readouterr().err


def test_generate_takes_generation_config_for_flags_left_out(checkpoint, tmp_path, capsys):
    import json
    import shutil

    folder = tmp_path / "with-generation-config"
    shutil.copytree(checkpoint, folder)
    (folder / "generation_config.json").write_text(json.dumps({"max_new_tokens": 3, "top_k": 1}))
    defaults = LLM(folder).generate(["a"], None, use_tqdm=False)[0].outputs[0]
    assert len(defaults.token_ids) == 3 or defaults.finish_reason == "stop"
    assert cli.main(["generate", "--model", str(folder), "--prompt", "a", "--seed", "1"]) == 0
    assert capsys.readouterr().out == defaults.text + "\n"  # top_k 1: greedy, whatever the seed
    assert cli.main(["generate", "--model", str(folder), "--prompt", "a", "--max-tokens", "5", "--ignore-eos"]) == 0
    expected = LLM(folder).generate(["a"], SamplingParams(top_k=1, max_tokens=5, ignore_eos=True), use_tqdm=False)
    assert capsys.readouterr().out == expected[0].outputs[0].text + "\n"


def test_generate_accepts_min_tokens_above_16_when_generation_config_allows_it(checkpoint, tmp_path, capsys):
    """The flags are checked before the model loads, but max_tokens only once generation_config.json is read:
    --min-tokens 20 under its max_new_tokens 100 was refused as above SamplingParams' default of 16."""
    import json

    folder = tmp_path / "with-max-new-tokens"
    shutil.copytree(checkpoint, folder)
    (folder / "generation_config.json").write_text(json.dumps({"max_new_tokens": 100}))
    assert cli.main(["generate", "--model", str(folder), "--prompt", "a", "--temperature", "0",
                     "--min-tokens", "20"]) == 0, capsys.readouterr().err
    expected = LLM(folder).generate(["a"], SamplingParams(temperature=0, min_tokens=20, max_tokens=100),
                                    use_tqdm=False)[0].outputs[0]
    assert len(expected.token_ids) >= 20 and capsys.readouterr().out == expected.text + "\n"
    # without a max_new_tokens, SamplingParams' 16 stands and the flag is refused, naming it
    assert cli.main(["generate", "--model", str(checkpoint), "--prompt", "a", "--min-tokens", "20"]) == 2
    assert "min_tokens: expected at most max_tokens=16" in capsys.readouterr().err


@pytest.mark.parametrize("command", ["generate", "serve"])
def test_engine_flags_reach_llm_and_its_runtime_errors_are_reported(checkpoint, capsys, monkeypatch, command):
    """--enforce-eager, --gpu-memory-utilization (and serve's --seed) are LLM's arguments, as vLLM's CLI; a
    RuntimeError building it (a CUDA-graph capture that failed) ends with exit status 2 and its message."""
    import llmfast.engine

    if command == "serve":
        pytest.importorskip("fastapi")
    calls = []

    def failing_llm(model, **kwargs):
        calls.append(kwargs)
        raise RuntimeError("CUDA graph capture failed: pass enforce_eager=True to run every step eagerly")

    monkeypatch.setattr(llmfast.engine, "LLM", failing_llm)
    args = [command, "--model", str(checkpoint), *(["--prompt", "a"] if command == "generate" else ["--seed", "7"])]
    assert cli.main(args) == 2
    assert cli.main([*args, "--enforce-eager", "--gpu-memory-utilization", "0.5"]) == 2
    err = capsys.readouterr().err
    assert err.count(f"llmfast {command}: error: CUDA graph capture failed: pass enforce_eager=True") == 2, err
    seed = {"seed": 7} if command == "serve" else {}
    assert calls == [seed, dict(gpu_memory_utilization=0.5, enforce_eager=True, **seed)]


@pytest.mark.parametrize("device", ["tpu", "cuda:99"])
@pytest.mark.parametrize("command", ["demo", "generate"])
def test_a_device_this_machine_lacks_is_reported(checkpoint, capsys, command, device):
    args = [command, "--model", str(checkpoint), "--device", device, *(["--prompt", "a"] if command == "generate" else [])]
    assert cli.main(args) == 2
    assert f"llmfast {command}: error: device:" in capsys.readouterr().err


@pytest.mark.skipif(torch.cuda.is_available(), reason="the cuda backend may run on a GPU machine")
@pytest.mark.parametrize("command", ["generate", "serve"])
def test_a_forced_backend_that_cannot_run_is_reported_before_serving(checkpoint, capsys, monkeypatch, command):
    monkeypatch.setenv("LLMFAST_BACKEND", "cuda")
    if command == "serve":
        pytest.importorskip("fastapi")  # the server's optional dependency; llmfast.server itself must import
        import llmfast.server as server
        monkeypatch.setattr(server, "serve", lambda *a, **k: pytest.fail("the server started"))
    assert cli.main([command, "--model", str(checkpoint), *(["--prompt", "a"] if command == "generate" else [])]) == 2
    assert f"llmfast {command}: error: backend 'cuda' cannot run" in capsys.readouterr().err


def test_serve_names_the_model_by_its_model_argument(checkpoint, monkeypatch):
    """The model id clients send is the --model string unless --served-model-name is given (API.md)."""
    pytest.importorskip("fastapi")
    import llmfast.server as server

    names = []
    monkeypatch.setattr(server, "serve", lambda llm, model_name, **kwargs: names.append(model_name))
    assert cli.main(["serve", "--model", str(checkpoint)]) == 0
    assert cli.main(["serve", "--model", str(checkpoint), "--served-model-name", "tiny"]) == 0
    assert names == [str(checkpoint), "tiny"]


def test_a_forced_cpu_backend_keeps_auto_for_ops_without_one(checkpoint, capsys, monkeypatch):
    """attention has no C++ CPU kernel: LLMFAST_BACKEND=cpu forces the ops that have one."""
    greedy = ["generate", "--model", str(checkpoint), "--prompt", "a", "--temperature", "0", "--max-tokens", "4",
              "--device", "cpu"]  # the forced cpu backend runs on CPU tensors only (auto is cuda on a GPU machine)
    assert cli.main(greedy) == 0
    expected = capsys.readouterr().out
    monkeypatch.setenv("LLMFAST_BACKEND", "cpu" if "cpu" in available_backends("add_rms_norm") else "reference")
    assert cli.main(greedy) == 0
    assert capsys.readouterr().out == expected


def test_generate_and_serve_report_a_missing_checkpoint(tmp_path, capsys):
    assert cli.main(["generate", "--model", str(tmp_path / "missing"), "--prompt", "a"]) == 2
    assert "missing" in capsys.readouterr().err
    assert cli.main(["serve", "--model", str(tmp_path / "missing")]) == 2  # (or fastapi is not installed)
    assert "llmfast serve: error:" in capsys.readouterr().err


def test_serve_refuses_a_port_out_of_range(checkpoint):
    result = llmfast("serve", "--model", checkpoint, "--port", 99999)
    assert result.returncode == 2 and "--port: expected a port in 0..65535" in result.stderr, result.stderr


def test_demo_runs_on_the_embedded_model():
    # no wall-clock assertion (speed belongs in benchmarks); the subprocess timeout only catches a hang
    result = llmfast("demo", timeout=300)
    assert result.returncode == 0, result.stderr
    assert "output tok/s" in result.stdout and "32 requests" in result.stdout
    assert "Processed prompts" in result.stderr  # the progress bar
    assert "max |err| vs reference" in result.stdout and "add_rms_norm" in result.stdout


def test_demo_runs_on_a_checkpoint(checkpoint, capsys):
    assert cli.main(["demo", "--model", str(checkpoint), "--num-prompts", "3", "--max-tokens", "4"]) == 0
    out = capsys.readouterr().out
    assert f"model: {checkpoint}" in out and "3 requests" in out and "max |err| vs reference" in out


@pytest.mark.skipif(shutil.which("llmfast") is None, reason="the package is not installed (no console script)")
def test_console_script():
    result = subprocess.run(["llmfast", "--help"], capture_output=True, text=True, timeout=60, env=ENV)
    assert result.returncode == 0 and all(c in result.stdout for c in ("demo", "generate", "serve", "bench", "eval"))


def test_bench_norm_writes_its_results_where_told(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("LLMFAST_RESULTS_DIR", str(tmp_path))
    code = cli.main(["bench", "norm", "--device", "cpu", "--ops", "rmsnorm", "--sizes", "64x256", "--no-compile"])
    assert code == 0
    assert "add+RMSNorm" in capsys.readouterr().out
    assert list(tmp_path.glob("cpu_norm*.json"))  # cpu_norm_avx2.json on a CPU without AVX-512


def test_bench_all_skips_the_gpu_only_benchmarks_without_a_gpu(monkeypatch, capsys):
    ran = []
    stub = lambda name: type("Bench", (), {"main": staticmethod(lambda argv: ran.append((name, argv)) or 0)})  # noqa: E731
    monkeypatch.setattr(cli.importlib, "import_module", lambda module: stub(module.rsplit("bench_", 1)[1]))
    monkeypatch.setattr(cli, "_cuda_available", lambda: False)
    assert cli.main(["bench", "all", "--quick"]) == 0
    assert ran == [(name, ["--quick"]) for name in ("norm", "quant", "paged", "throughput")]
    err = capsys.readouterr().err
    assert "bench attention: skipped (needs a CUDA GPU)" in err and "bench paged: skipped" not in err


@pytest.mark.parametrize("name", cli.BENCHMARKS)
def test_every_benchmark_has_a_cli_entry_with_help(name):
    result = llmfast("bench", name, "--help", timeout=60)
    assert result.returncode == 0, result.stderr
    assert "--quick" in result.stdout and "--out-dir" in result.stdout  # `bench all --out-dir` passes it to each


@pytest.mark.parametrize("name", ["norm", "attention"])
def test_an_out_dir_that_cannot_be_a_folder_is_refused_before_measuring(name, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(cli, "_cuda_available", lambda: True)  # attention: the argument is checked before the GPU
    not_a_folder = tmp_path / "file"
    not_a_folder.write_text("")
    assert cli.main(["bench", name, "--quick", "--out-dir", str(not_a_folder / "sub")]) == 2
    err = capsys.readouterr().err
    assert f"argument --out-dir: cannot create folder {not_a_folder / 'sub'}: Not a directory" in err


def test_ctrl_c_ends_a_command_with_a_line_and_status_130(monkeypatch, capsys):
    def interrupted(args):
        raise KeyboardInterrupt
    monkeypatch.setattr(cli, "_demo", interrupted)
    assert cli.main(["demo"]) == 130
    assert capsys.readouterr().err == "llmfast: interrupted\n"


def test_every_generate_flag_has_help():
    import argparse

    parser = cli.build_parser()
    subcommands = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    undocumented = [a.option_strings for a in subcommands.choices["generate"]._actions if a.help is None]
    assert not undocumented


def test_bench_all_help_describes_all(capsys):
    assert cli.main(["bench", "all", "--help"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: llmfast bench all") and "bench_norm" not in out


def test_bench_rejects_an_unknown_name():
    result = llmfast("bench", "nope", timeout=60)
    assert result.returncode == 2 and "invalid choice" in result.stderr


@pytest.mark.parametrize("file,text,message", [
    ("config.json", "[]", "config.json: expected a JSON object, got list"),
    ("config.json", "{", "config.json: not valid JSON"),
    ("generation_config.json", "[1]", "generation_config.json: expected a JSON object, got list"),
    ("tokenizer.json", "garbage", "the tokenizer files in"),
])
def test_broken_checkpoint_files_are_named_without_a_traceback(checkpoint, tmp_path, capsys, file, text, message):
    broken = tmp_path / "broken"
    shutil.copytree(checkpoint, broken)
    (broken / file).write_text(text)
    assert cli.main(["generate", "--model", str(broken), "--prompt", "a"]) == 2
    assert message in capsys.readouterr().err


def test_demo_refuses_a_count_below_one(capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["demo", "--num-prompts", "0"])
    assert exit_info.value.code == 2 and "--num-prompts: expected a positive int, got '0'" in capsys.readouterr().err


def test_eval_names_a_file_that_is_not_utf8(checkpoint, tmp_path, capsys):
    binary = tmp_path / "bin.txt"
    binary.write_bytes(b"ok \xff\xfe")
    assert cli.main(["eval", "ppl", "--model", str(checkpoint), "--file", str(binary)]) == 2
    assert f"--file: {binary} is not UTF-8 text" in capsys.readouterr().err
