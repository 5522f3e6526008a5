"""Backend selection: available_backends, the backend= keyword, LLMFAST_BACKEND, BackendUnavailable."""
import pytest
import torch

import llmfast
from llmfast.backends import resolve

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
