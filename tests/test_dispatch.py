"""Backend selection: available_backends, the backend= keyword, LLMFAST_BACKEND, BackendUnavailable."""
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import llmfast
from llmfast import ops
from llmfast.backends import resolve
from llmfast.quant import quantize
from helpers import require_backend

PUBLIC_OPS = ["add_layer_norm", "add_rms_norm", "attention", "write_kv_cache", "paged_attention", "quant_matmul"]


@pytest.mark.parametrize("op", PUBLIC_OPS)
def test_every_public_op_has_a_reference(op):
    backends = llmfast.available_backends(op)
    assert backends[-1] == "reference"
    assert set(backends) <= {"triton", "cuda", "cpu", "reference"}


def test_unknown_op_is_a_value_error():
    with pytest.raises(ValueError, match="op_name: unknown op 'softmax'"):
        llmfast.available_backends("softmax")


def test_backend_unavailable_is_a_runtime_error_naming_what_is_missing():
    assert issubclass(llmfast.BackendUnavailable, RuntimeError)
    if torch.cuda.is_available():
        pytest.skip("the cuda backend may exist on a GPU machine")
    with pytest.raises(llmfast.BackendUnavailable, match="_C_cuda|CUDA"):
        resolve("add_rms_norm", "cuda", torch.device("cpu"))


def test_auto_never_picks_the_interpreter_on_cpu():
    assert resolve("add_rms_norm", "auto", torch.device("cpu")) in ("cpu", "reference")


def test_env_var_overrides_auto(monkeypatch):
    monkeypatch.setenv("LLMFAST_BACKEND", "reference")
    assert resolve("add_rms_norm", "auto", torch.device("cpu")) == "reference"
    # an explicit backend= still wins over the environment
    monkeypatch.setenv("LLMFAST_BACKEND", "cuda")
    assert resolve("add_rms_norm", "reference", torch.device("cpu")) == "reference"


def test_env_var_keeps_auto_for_an_op_without_that_backend(monkeypatch):
    monkeypatch.setenv("LLMFAST_BACKEND", "cpu")
    expected = resolve("attention", "reference", torch.device("cpu"))
    assert "cpu" not in llmfast.backends._REGISTRY["attention"]
    assert resolve("attention", "auto", torch.device("cpu")) == expected


def test_env_var_naming_an_unknown_backend(monkeypatch):
    monkeypatch.setenv("LLMFAST_BACKEND", "fastest")
    with pytest.raises(ValueError, match="LLMFAST_BACKEND"):
        llmfast.ops.add_rms_norm(torch.randn(2, 4))


def test_env_var_naming_an_unavailable_backend(monkeypatch):
    if torch.cuda.is_available():
        pytest.skip("the cuda backend may exist on a GPU machine")
    monkeypatch.setenv("LLMFAST_BACKEND", "cuda")
    with pytest.raises(llmfast.BackendUnavailable):
        llmfast.ops.add_rms_norm(torch.randn(2, 4))


def test_cpu_extension_is_listed_when_built():
    from llmfast import _ext

    if _ext.cpu_loaded():
        assert "cpu" in llmfast.available_backends("add_rms_norm")
    else:
        assert "cpu" not in llmfast.available_backends("add_rms_norm")


class _LlmfastOpsCalled(TorchDispatchMode):
    """Records the ``llmfast::`` ops (the compiled C++ ops and the Triton custom ops) that run inside it."""

    def __init__(self):
        super().__init__()
        self.names = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.namespace == "llmfast":
            self.names.add(func.name())
        return func(*args, **(kwargs or {}))


def _sample_call(op: str):
    """A small valid call of ``op`` on CPU tensors, as ``fn(backend)``."""
    torch.manual_seed(0)
    x, q = torch.randn(3, 64), torch.randn(1, 5, 4, 32)
    k, v = torch.randn(5, 2, 32), torch.randn(5, 2, 32)
    k_cache, v_cache = torch.randn(4, 16, 2, 32), torch.randn(4, 16, 2, 32)
    block_tables = torch.tensor([[0, 1], [2, 3]], dtype=torch.int32)
    context_lens = torch.tensor([20, 5], dtype=torch.int32)
    weight = quantize(torch.randn(16, 64), 8, 64)
    calls = {
        "add_layer_norm": lambda b: ops.add_layer_norm(x, x, torch.randn(64), torch.randn(64), backend=b),
        "add_rms_norm": lambda b: ops.add_rms_norm(x, x, torch.randn(64), backend=b),
        "attention": lambda b: ops.attention(q, q, q, causal=True, backend=b),
        "write_kv_cache": lambda b: ops.write_kv_cache(k, v, k_cache, v_cache, torch.arange(5), backend=b),
        "paged_attention": lambda b: ops.paged_attention(q[0, :2], k_cache, v_cache, block_tables, context_lens,
                                                         backend=b),
        "quant_matmul": lambda b: ops.quant_matmul(x, weight, backend=b),
    }
    return calls[op]


@pytest.mark.parametrize("op", PUBLIC_OPS)
def test_each_backend_runs_its_own_kernel(op):
    """backend="triton" runs a Triton custom op, "cpu" the C++ op it registered, "reference" none of ours;
    "auto" on CPU runs the C++ op where there is one (never the interpreter)."""
    call, impls = _sample_call(op), llmfast.backends._REGISTRY[op]
    cpu = torch.device("cpu")
    # the calls are on CPU tensors: on a GPU machine "cuda" (and "triton", without the interpreter) is
    # available but cannot run them
    on_cpu = [b for b in llmfast.available_backends(op) if llmfast.backends._missing(op, b, cpu) is None]
    expected = {}
    for backend in on_cpu + ["auto"]:
        with _LlmfastOpsCalled() as called:
            call(backend)
        expected[backend] = called.names
        if backend == "reference":
            assert not called.names, (op, called.names)
        elif backend == "triton":
            assert called.names and all(name.endswith("_triton") for name in called.names), (op, called.names)
        elif backend == "cpu":
            assert called.names == {f"llmfast::{impls['cpu'][1]}"}, (op, called.names)
    if "cpu" in impls and "cpu" in on_cpu:
        assert expected["auto"] == expected["cpu"], op
    assert "cpu" in impls or op == "attention", f"{op} has no C++ CPU kernel"


@pytest.mark.parametrize("op", PUBLIC_OPS)
def test_triton_ops_launch_on_their_tensors_device(op, monkeypatch):
    """Triton launches on the current GPU, whatever device the tensors are on (a model on cuda:1): each
    Triton custom op makes the tensors' device current first (llmfast.device.on_device)."""
    import contextlib
    import importlib

    require_backend("triton", op, torch.device("cpu"))  # _sample_call's CPU tensors: the interpreter only
    devices = []

    @contextlib.contextmanager
    def spy(device):
        devices.append(device)
        yield

    for name in ("attention", "kv_cache", "norm", "paged", "quant_matmul"):
        monkeypatch.setattr(importlib.import_module(f"llmfast.ops.{name}"), "on_device", spy)
    _sample_call(op)("triton")
    assert devices and set(devices) == {torch.device("cpu")}, devices
