import atexit
import os
import shutil
import tempfile
import zlib

# The interpreter runs tl.dot through numpy: multi-threaded BLAS on those tiny matrices only waits on
# itself (17 ms instead of 0.05 ms per dot on a busy 2-core machine). Set before numpy loads.
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
# Every checkpoint the tests load is local. huggingface_hub reads this once, when first imported, which
# the first test module to import transformers would do: so here, before any.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
# Tests check results, not speed: each Triton autotuner tries one config of each kind (kernels/tuning.py), as
# gpu_check.sh's test steps ask. With the whole list, every new shape on a GPU compiled ~20 configs per kernel.
# Read by llmfast at import, so set before any test module imports it; the CPU interpreter has one config anyway.
os.environ.setdefault("LLMFAST_AUTOTUNE", "first")
# A fresh compile cache each session: torch's on-disk caches do not notice an edited custom op's Python
# backward, and replayed a compiled backward that called it with its old arguments.
if "TORCHINDUCTOR_CACHE_DIR" not in os.environ:
    _inductor_cache = tempfile.mkdtemp(prefix="llmfast_inductor_")
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = _inductor_cache
    atexit.register(shutil.rmtree, _inductor_cache, ignore_errors=True)

import pytest  # noqa: E402
import torch  # noqa: E402

# engine_setup and server_setup are both imported by their tests (constants, helpers) and their fixtures' plugins
pytest.register_assert_rewrite("engine_setup", "server_setup")

# The Triton interpreter must be switched on before any @triton.jit function is defined, so this
# runs before the test modules (and through them the kernels) are imported.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


# LLMFAST_REQUIRE_IMPORTS=1 (set by .ci/run and benchmarks/gpu_check.sh): tests or modules skipped by
# pytest.importorskip still run as skips, but the session fails and lists them at the end, so a machine
# missing a test dependency cannot pass by skipping.
REQUIRE_IMPORTS = os.environ.get("LLMFAST_REQUIRE_IMPORTS") == "1"
_import_skips: list[str] = []


def _note_import_skip(report) -> None:
    if report.skipped and "could not import" in str(report.longrepr):
        _import_skips.append(f"{report.nodeid}: {report.longrepr[-1] if isinstance(report.longrepr, tuple) else ''}")


def pytest_collectreport(report):  # a module skipped whole; xdist hands its workers' reports to this hook too
    _note_import_skip(report)


def pytest_runtest_logreport(report):
    _note_import_skip(report)


def pytest_terminal_summary(terminalreporter):
    if REQUIRE_IMPORTS and _import_skips:
        terminalreporter.section("skipped for a missing package (LLMFAST_REQUIRE_IMPORTS=1: a failure)")
        for line in _import_skips:
            terminalreporter.line(line)


def pytest_sessionfinish(session, exitstatus):
    if REQUIRE_IMPORTS and _import_skips and exitstatus in (0, pytest.ExitCode.NO_TESTS_COLLECTED):
        session.exitstatus = 1


@pytest.fixture(autouse=True)
def _seed_per_test(request):
    """Random inputs differ from test to test but repeat from run to run, so a failure reproduces
    (a seed derived from the test's id, e.g. test_attention.py::test_attention_dense[...])."""
    torch.manual_seed(zlib.crc32(request.node.nodeid.encode()))
