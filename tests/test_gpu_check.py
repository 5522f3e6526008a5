"""benchmarks/gpu_check.sh's time budget, without a GPU: a step that cannot start in what is left of
GPU_CHECK_BUDGET_S is skipped, counted as a failure and named in the summary, which still comes back."""
import os
import pathlib
import subprocess
import tarfile

ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_steps_past_the_budget_are_skipped_and_reported(tmp_path):
    env = dict(os.environ, OUT=str(tmp_path), GPU_CHECK_BUDGET_S="30")
    proc = subprocess.run(["bash", "benchmarks/gpu_check.sh", "tests:norm", "bench:norm"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0, proc.stdout
    summary = (tmp_path / "summary.txt").read_text()
    for step in ("pytest -m gpu norm", "bench norm"):
        assert any(line.startswith(step) and "skipped" in line for line in summary.splitlines()), summary
    with tarfile.open(tmp_path / "gpu_check.tgz") as tgz:
        assert not [name for name in tgz.getnames() if name.startswith("logs/") and name != "logs"]


def test_a_step_that_fits_runs_the_scripts_functions_in_its_time_limit(tmp_path):
    """A step runs under `timeout` in a child bash that is handed the script's functions (gpu_tests, ...): a
    test step over a file with no gpu tests is "ok" (pytest's exit 5 is no failure)."""
    env = dict(os.environ, OUT=str(tmp_path), GPU_CHECK_BUDGET_S="300")
    proc = subprocess.run(["bash", "benchmarks/gpu_check.sh", "tests:gpu_check"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    summary = (tmp_path / "summary.txt").read_text()
    assert any(line.startswith("pytest -m gpu gpu_check") and " ok " in line for line in summary.splitlines()), summary
    assert "no tests are marked gpu in tests/test_gpu_check.py" in proc.stdout, proc.stdout[-3000:]
