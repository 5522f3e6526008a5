"""LLMFAST_AUTOTUNE=first: the GPU tests' autotuners try one config of each kind, not the whole list."""
import os
import subprocess
import sys

import pytest
import triton

from llmfast import backends
from llmfast_kernels import attention, attention_bwd, quant_matmul, tuning


def _set(monkeypatch, value):
    """LLMFAST_AUTOTUNE=value, applied as ``import llmfast`` applies it."""
    monkeypatch.setenv(backends.AUTOTUNE_ENV_VAR, value)
    monkeypatch.setattr(tuning, "FIRST_ONLY", tuning.FIRST_ONLY)  # restored after the test
    backends.configure_triton_autotune()


def _configs():
    pairs = [(128, False), (64, False), (128, True), (64, True)]
    return [triton.Config({"BLOCK_M": m, "USE_TMA": tma}) for m, tma in pairs]


def test_all_is_the_default_and_keeps_every_config(monkeypatch):
    monkeypatch.delenv(backends.AUTOTUNE_ENV_VAR, raising=False)
    assert not backends.autotune_first_only()
    configs = _configs()
    _set(monkeypatch, "all")
    assert tuning.limit(configs) == configs


def test_first_keeps_the_first_config_of_each_load_kind(monkeypatch):
    _set(monkeypatch, "first")
    configs = _configs()
    assert tuning.limit(configs) == [configs[0], configs[2]]
    plain = [triton.Config({"BLOCK_N": n}) for n in (32, 64)]  # kernels without USE_TMA
    assert tuning.limit(plain) == plain[:1]


def test_a_bad_value_names_the_variable_and_import_still_works(monkeypatch):
    monkeypatch.setenv(backends.AUTOTUNE_ENV_VAR, "fast")
    with pytest.raises(ValueError, match="LLMFAST_AUTOTUNE"):
        backends.autotune_first_only()
    monkeypatch.setattr(tuning, "FIRST_ONLY", True)  # restored after the test
    with pytest.warns(UserWarning, match="LLMFAST_AUTOTUNE: expected 'all' or 'first', got 'fast'"):
        backends.configure_triton_autotune()
    assert tuning.FIRST_ONLY is False


def test_importing_llmfast_applies_the_variable_and_no_kernel_file_reads_the_environment():
    code = "import llmfast; from llmfast_kernels import tuning; print(tuning.FIRST_ONLY)"
    for value, expected in (("first", "True"), ("all", "False")):
        env = dict(os.environ, LLMFAST_AUTOTUNE=value)
        out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
        assert out.stdout.strip() == expected
    for path in os.listdir(os.path.dirname(tuning.__file__)):
        if path.endswith(".py"):
            with open(os.path.join(os.path.dirname(tuning.__file__), path)) as f:
                source = f.read()
            assert "os.environ" not in source and "getenv" not in source, path


@pytest.mark.parametrize("value, expected", [("all", None), ("first", 1)])
def test_the_quant_and_attention_autotuners_take_the_limit(monkeypatch, value, expected):
    _set(monkeypatch, value)
    tuner = quant_matmul._autotuned.__wrapped__("tiled", 128)
    assert len(tuner.configs) == (expected or len(quant_matmul._tiled_cuda_configs()))
    # attention prunes on the GPU; properties without a shared-memory limit skip the check, so this runs here
    handle = attention._attn_fwd_sm90_either
    prune = handle.early_config_prune
    q = type("FakeQ", (), {"element_size": lambda self: 4, "device": None})()
    monkeypatch.setattr(attention.torch.cuda, "get_device_properties", lambda device: object())
    kept = prune(handle.configs, {"Q": q}, BLOCK_D=64)
    assert len(kept) == (2 if value == "first" else len(handle.configs))  # pointer and TMA loads


def test_fp32_attention_tiles_are_pruned_at_four_bytes_an_element(monkeypatch):
    """Unpruned, an fp32 backward at head dim 128 on an H100 tried only configs over its shared memory
    (compiled for sm_90: 295 KB for the first dk/dv config), and LLMFAST_AUTOTUNE=first launched one."""
    _set(monkeypatch, "first")
    limit = 232448  # sm_90's shared memory per block
    props = type("Props", (), {"shared_memory_per_block_optin": limit})()
    monkeypatch.setattr(attention.torch.cuda, "get_device_properties", lambda device: props)
    handle = attention_bwd._attn_bwd_dkdv_sm90
    kept = {}
    for element_size in (2, 4):
        q = type("FakeQ", (), {"element_size": lambda self, e=element_size: e, "device": None})()
        (kept[element_size],) = handle.early_config_prune(handle.configs, {"Q": q}, BLOCK_D=128)
    shape = lambda c: (c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.num_stages)  # noqa: E731
    assert shape(kept[2]) == shape(handle.configs[0])  # the first config fits in 16 bits
    assert shape(kept[4]) != shape(kept[2])
    assert attention.tile_bytes(attention_bwd.dkdv_tiles, *shape(kept[2]), 128, element_size=4) > limit
    assert attention.tile_bytes(attention_bwd.dkdv_tiles, *shape(kept[4]), 128, element_size=4) <= limit
