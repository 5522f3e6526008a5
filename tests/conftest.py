import os
import zlib

# The interpreter runs tl.dot through numpy: multi-threaded BLAS on those tiny matrices only waits on
# itself (17 ms instead of 0.05 ms per dot on a busy 2-core machine). Set before numpy loads.
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

# engine_setup is both imported by the engine tests (constants, helpers) and their fixtures' plugin
pytest.register_assert_rewrite("engine_setup")

# The Triton interpreter must be switched on before any @triton.jit function is defined, so this
# runs before the test modules (and through them the kernels) are imported.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture(autouse=True)
def _seed_per_test(request):
    """Random inputs differ from test to test but repeat from run to run, so a failure reproduces
    (a seed derived from the test's id, e.g. test_attention.py::test_attention_dense[...])."""
    torch.manual_seed(zlib.crc32(request.node.nodeid.encode()))
