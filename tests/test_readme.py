"""The README stays true: its API tour runs, and CI runs exactly its test command."""
import os
import pathlib
import re
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()


def test_api_tour_runs():
    tour = re.search(r"```python\n(import torch, llmfast\n.*?)```", README, re.S).group(1)
    names = {}
    exec(compile(tour, "README.md", "exec"), names)
    torch, qw, x = names["torch"], names["qw"], names["x"]
    assert names["h"].dtype == torch.bfloat16  # "h (and y) in x.dtype"
    expected = x.bfloat16().double() @ qw.dequantize().double().T  # bf16 inputs, outputs of size ~100
    torch.testing.assert_close(names["y"].double(), expected, atol=0.01 * expected.abs().max().item(), rtol=0)
    assert names["out"].shape == (2, 10, 256) and names["o"].shape == (2, 8, 64)


def test_api_tour_backend_list_is_what_a_cpu_machine_prints():
    """The tour says ['cpu', 'reference'] on a CPU machine (no TRITON_INTERPRET, which the tests set)."""
    line = next(line for line in README.splitlines() if line.startswith('llmfast.available_backends("add_rms_norm")'))
    printed = line.split("#")[1].split(" on a CPU machine")[0].strip()
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["CUDA_VISIBLE_DEVICES"] = ""  # what a CPU machine prints, also where this runs on a GPU machine
    code = "import llmfast; print(llmfast.available_backends('add_rms_norm'))"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert result.stdout.strip() == printed, result.stderr[-2000:]


def test_ci_runs_the_readme_test_command():
    blocks = re.findall(r"```bash\n(.*?)```", README, re.S)
    test_command = next(line for b in blocks for line in b.splitlines() if "pytest" in line)
    ci = (ROOT / ".ci" / "run").read_text()
    # .ci/run adds -q to the pip installs only
    assert test_command.replace("pip install ", "pip install -q ") in ci
