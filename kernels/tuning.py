"""How much the autotuned kernels search. ``LLMFAST_AUTOTUNE=first`` keeps, of each kernel's configs that
fit, the first of each kind (pointer or TMA loads) instead of timing them all: the GPU tests run many
(dtype, shape) sets, and compiling and timing every attention config for each takes tens of minutes
(benchmarks/gpu_check.sh sets it for its test steps). Unset, or ``all``, searches everything."""
from __future__ import annotations

import os

ENV_VAR = "LLMFAST_AUTOTUNE"


def first_only() -> bool:
    value = os.environ.get(ENV_VAR, "all")
    if value not in ("all", "first"):
        raise ValueError(f"{ENV_VAR}: expected 'all' or 'first', got {value!r}")
    return value == "first"


def limit(configs: list) -> list:
    """``configs`` as the autotuner should try them: all, or the first of each ``USE_TMA`` kind."""
    if not first_only():
        return configs
    kinds: set = set()
    kept = []
    for config in configs:
        kind = config.kwargs.get("USE_TMA")
        if kind not in kinds:
            kinds.add(kind)
            kept.append(config)
    return kept
