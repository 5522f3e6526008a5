from setuptools import find_packages, setup

setup(
    name="llmfast",
    version="0.1.0",
    packages=find_packages(include=["llmfast", "llmfast.*"]) + ["llmfast_kernels"],
    package_dir={"llmfast_kernels": "kernels"},
    python_requires=">=3.10",
    entry_points={"console_scripts": ["llmfast=llmfast.cli:main"]},
)
