"""Triton kernels of llmfast, installed as the package ``llmfast_kernels``.

This folder is mapped to that name by setup.py. Importing it as ``kernels`` (for example from the
repository root) is refused: that name belongs to a PyPI package we must not shadow.
"""
if __name__ != "llmfast_kernels":
    raise ImportError(
        f"the llmfast Triton kernels must be imported as 'llmfast_kernels', not {__name__!r}; "
        "install llmfast with `pip install --no-build-isolation -e .`"
    )
