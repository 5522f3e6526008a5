"""The Triton kernels ship as llmfast_kernels; no top-level `kernels` is installed or importable."""
import pathlib
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _python(code, cwd):
    return subprocess.run([sys.executable, "-c", code], cwd=cwd, capture_output=True, text=True)


def test_kernels_folder_never_shadows_a_kernels_package(tmp_path):
    # kernels/ has no __init__.py: from the repo root it is at most an empty namespace portion, which
    # a regular package of that name (the PyPI `kernels`) outranks wherever it sits on sys.path, and
    # which transformers' availability check recognises as "not installed".
    result = _python("import kernels; print(kernels.__file__, hasattr(kernels, 'norm'))", ROOT)
    assert result.stdout.split() == ["None", "False"], result.stdout + result.stderr

    real = tmp_path / "site" / "kernels"
    real.mkdir(parents=True)
    (real / "__init__.py").write_text("WHO = 'the kernels package'\n")
    code = f"import sys; sys.path.append({str(real.parent)!r}); import kernels; print(kernels.WHO)"
    result = _python(code, ROOT)
    assert result.stdout.strip() == "the kernels package", result.stderr


def test_transformers_does_not_mistake_the_folder_for_its_kernels_dependency():
    pytest.importorskip("transformers")
    code = "import transformers.utils.import_utils as u; print(u.is_kernels_available())"
    result = _python(code, ROOT)
    assert result.stdout.strip() == "False", result.stderr


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
