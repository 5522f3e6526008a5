"""The README stays true: its API tour runs, and CI runs exactly its test command."""
import pathlib
import re

ROOT = pathlib.Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()


def test_api_tour_runs():
    tour = re.search(r"```python\n(import torch, llmfast\n.*?)```", README, re.S).group(1)
    exec(compile(tour, "README.md", "exec"), {})


def test_ci_runs_the_readme_test_command():
    blocks = re.findall(r"```bash\n(.*?)```", README, re.S)
    test_command = next(line for b in blocks for line in b.splitlines() if "pytest" in line)
    ci = (ROOT / ".ci" / "run").read_text()
    # .ci/run adds -q to the pip installs only
    assert test_command.replace("pip install ", "pip install -q ") in ci
