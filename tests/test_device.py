"""Device resolution: a GPU comes back with its index, checked before anything is allocated."""
import pytest
import torch

from llmfast.device import on_device, resolve_device


@pytest.fixture
def two_gpus_current_one(monkeypatch):
    """Pretend there are two GPUs and the current one is cuda:1 (nothing is allocated on them)."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 1)


def test_a_gpu_without_an_index_is_the_current_one(two_gpus_current_one):
    # a worker thread's current GPU is 0: tensors made there for "cuda" would land beside the model, not on it
    assert resolve_device("cuda") == torch.device("cuda", 1)
    assert resolve_device("auto") == torch.device("cuda", 1)
    assert resolve_device(torch.device("cuda")) == torch.device("cuda", 1)
    assert resolve_device("cuda:0") == torch.device("cuda", 0)
    with pytest.raises(ValueError, match="device: cuda:2 was asked for, but only 2 GPU"):
        resolve_device("cuda:2")


def test_cpu_and_bad_devices():
    assert resolve_device("cpu") == torch.device("cpu")
    with on_device(torch.device("cpu")):  # nothing to switch on the CPU
        pass
    for bad in ("tpu", "meta", 3.5):
        with pytest.raises(ValueError, match="device"):
            resolve_device(bad)
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="no CUDA GPU is available"):
            resolve_device("cuda")
