"""The Triton kernels ship as llmfast_kernels; no top-level `kernels` is installed or importable."""
import pathlib
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _python(code, cwd):
    return subprocess.run([sys.executable, "-c", code], cwd=cwd, capture_output=True, text=True)


def test_kernels_folder_is_not_importable_as_kernels_from_the_repo_root():
    result = _python("import kernels", ROOT)
    assert result.returncode != 0
    assert "llmfast_kernels" in result.stderr


def test_llmfast_and_its_kernels_import_from_the_repo_root_and_elsewhere(tmp_path):
    for cwd in (ROOT, tmp_path):
        result = _python("import llmfast, llmfast_kernels.norm; print(llmfast.available_backends('add_rms_norm'))", cwd)
        assert result.returncode == 0, result.stderr


def test_built_packages_map_kernels_to_llmfast_kernels(tmp_path):
    # build_py copies the Python packages exactly as a wheel would hold them (no compilation)
    result = subprocess.run(
        [sys.executable, "setup.py", "-q", "build_py", "--build-lib", str(tmp_path)],
        cwd=ROOT, capture_output=True, text=True,
    )
    assert result.returncode == 0, result.stderr
    top = sorted(p.name for p in tmp_path.iterdir())
    assert top == ["llmfast", "llmfast_benchmarks", "llmfast_kernels"], top
    assert (tmp_path / "llmfast_kernels" / "norm.py").exists()
