"""How much the autotuned kernels search: every config that fits (the default), or, with ``FIRST_ONLY``,
the first of each kind (pointer or TMA loads). The GPU tests run many (dtype, shape) sets, and compiling and
timing every attention config for each takes tens of minutes. Kernels read no environment: llmfast sets
``FIRST_ONLY`` from ``LLMFAST_AUTOTUNE=first`` when it is imported (``llmfast.backends``;
benchmarks/gpu_check.sh sets it for its test steps)."""
from __future__ import annotations

FIRST_ONLY = False


def limit(configs: list) -> list:
    """``configs`` as the autotuner should try them: all, or the first of each ``USE_TMA`` kind."""
    if not FIRST_ONLY:
        return configs
    kinds: set = set()
    kept = []
    for config in configs:
        kind = config.kwargs.get("USE_TMA")
        if kind not in kinds:
            kinds.add(kind)
            kept.append(config)
    return kept
