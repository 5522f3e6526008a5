"""Builds llmfast with its compiled ops.

- ``llmfast._C``: the C++ CPU ops in csrc/ops.cpp + csrc/cpu/*.cpp; always built.
- ``llmfast._C_cuda``: the CUDA ops in csrc/cuda/*.cu; built only when torch has CUDA and nvcc is found.
  ``LLMFAST_CUDA_ARCHS`` (e.g. ``90a`` or ``80;90a``) picks the GPU architectures to compile for.

Install with ``pip install --no-build-isolation -e .`` so the build uses the torch already installed
(an isolated build would fetch another torch and build against it).
"""
import glob
import os

import torch
from setuptools import find_packages, setup
from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension

ROOT = os.path.dirname(os.path.abspath(__file__))
DEFAULT_CUDA_ARCHS = "80;90a"  # A100 and H100 (90a: the Hopper-only instructions such as wgmma)

# No -march=native: the wheel must run on other CPUs of the same kind, so -O3 auto-vectorisation of the
# simple float loops targets the baseline ISA (SSE2 on x86-64). No -ffast-math: it would reorder the
# reductions the norms depend on, and break the bit tricks in csrc/cpu/half_convert.h.
# No -std flag: torch adds the standard its own headers need (C++20 since torch 2.10).
CXX_FLAGS = ["-O3", "-fopenmp"]
NVCC_FLAGS = ["-O3", "-lineinfo"]  # no --use_fast_math: its approximate rsqrt/division cost accuracy


def sources(pattern: str) -> list[str]:
    """Files matching ``pattern`` under the repository root, as the relative paths setuptools wants."""
    return sorted(glob.glob(pattern, root_dir=ROOT))


def cuda_arch_flags() -> list[str]:
    archs = os.environ.get("LLMFAST_CUDA_ARCHS", DEFAULT_CUDA_ARCHS).replace(",", ";").split(";")
    flags = []
    for arch in filter(None, (a.strip().replace(".", "") for a in archs)):
        flags += ["-gencode", f"arch=compute_{arch},code=sm_{arch}"]
    return flags


def cuda_build_blocker(torch_cuda: str | None, cuda_home: str | None, cuda_sources: list[str]) -> str | None:
    """Why llmfast._C_cuda cannot be built here, or None. torch finds a CUDA_HOME wherever /usr/local/cuda
    exists, also a runtime-only one without the compiler: that would fail the whole install."""
    if torch_cuda is None:
        return "torch is a CPU build"
    if cuda_home is None:
        return "no CUDA toolkit found (set CUDA_HOME)"
    nvcc = os.path.join(cuda_home, "bin", "nvcc")
    if not os.access(nvcc, os.X_OK):
        return f"no nvcc at {nvcc} (a CUDA runtime without the toolkit?)"
    # torch takes CUDA_HOME from the nvcc on PATH: /usr/local for a wrapper script in /usr/local/bin, where the
    # compiling works and the link (-lcudart) fails the whole install
    headers = os.path.join(cuda_home, "include", "cuda_runtime.h")
    runtime = glob.glob(os.path.join(cuda_home, "lib64", "libcudart.so*")) + glob.glob(
        os.path.join(cuda_home, "lib", "libcudart.so*"))
    if not os.path.exists(headers) or not runtime:
        return (f"CUDA_HOME={cuda_home} lacks include/cuda_runtime.h or lib64/libcudart.so (set CUDA_HOME to the "
                "toolkit's folder, e.g. /usr/local/cuda)")
    if not cuda_sources:
        return "no csrc/cuda/*.cu"
    return None


def extensions() -> list:
    exts = [
        CppExtension(
            "llmfast._C",
            sources("csrc/ops.cpp") + sources("csrc/cpu/*.cpp"),
            extra_compile_args=CXX_FLAGS,
            extra_link_args=["-fopenmp"],
        )
    ]
    cuda_sources = sources("csrc/cuda/*.cu")
    blocker = cuda_build_blocker(torch.version.cuda, CUDA_HOME, cuda_sources)
    if blocker is not None:
        print(f"llmfast: skipping llmfast._C_cuda: {blocker}")
        return exts
    exts.append(
        CUDAExtension(
            "llmfast._C_cuda",
            cuda_sources + sources("csrc/cuda/*.cpp"),  # module.cpp: the PyInit an import needs
            # An -gencode flag here stops torch from adding its own arch list (TORCH_CUDA_ARCH_LIST).
            extra_compile_args={"cxx": ["-O3"], "nvcc": NVCC_FLAGS + cuda_arch_flags()},
        )
    )
    return exts


setup(
    name="llmfast",
    version="0.1.0",
    # kernels/ and benchmarks/ ship under names of ours: a top-level `kernels` would shadow a PyPI package
    packages=find_packages(include=["llmfast", "llmfast.*"]) + ["llmfast_kernels", "llmfast_benchmarks"],
    package_dir={"llmfast_kernels": "kernels", "llmfast_benchmarks": "benchmarks"},
    python_requires=">=3.10",
    install_requires=["torch>=2.4", "triton", "numpy", "safetensors", "transformers", "tqdm"],
    ext_modules=extensions(),
    cmdclass={"build_ext": BuildExtension.with_options(use_ninja=True)},
    entry_points={"console_scripts": ["llmfast=llmfast.cli:main"]},
)
