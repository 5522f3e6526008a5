"""Every Triton kernel compiles for the H100 (sm_90) and for sm_80, on this machine, without a GPU.

The interpreter tests check what the kernels compute; these check what only the GPU compiler sees:
lowering errors, shared memory over the SM's limit, and register spills (tests/compile_kernels.py).
The autotuned kernels are compiled at the last config of each list, the small one that must fit
everywhere; `python tests/compile_kernels.py --arch 90` compiles every config.
"""
import json
import os
import pathlib
import re
import subprocess
import sys

import pytest

from compile_kernels import SHARED_LIMIT

SCRIPT = pathlib.Path(__file__).with_name("compile_kernels.py")
# kernels whose every launch must stay in registers: issue 2 asks the norms for no spills at any hidden
# size; the paged kernels are bandwidth-bound and a spill adds local-memory traffic to every key tile
NO_SPILLS = ("_add_norm", "_paged_attention", "_write_kv_cache")


@pytest.fixture(scope="module", params=[90, 80], ids=lambda arch: f"sm_{arch}")
def compiled(request, tmp_path_factory):
    pytest.importorskip("triton.backends.nvidia.compiler")
    out = tmp_path_factory.mktemp(f"sm{request.param}")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = str(out / "cache")
    env["LLMFAST_AUTOTUNE"] = "all"  # every config is a candidate ("last" below picks from all of them)
    result = subprocess.run(
        [sys.executable, str(SCRIPT), "--arch", str(request.param), "--quick", "--configs", "last",
         "--json", str(out / "kernels.json")],
        capture_output=True, text=True, env=env,
    )
    report = out / "kernels.json"  # written whether or not problems were found; absent after a crash
    return request.param, result, json.loads(report.read_text()) if report.exists() else []


def test_every_launch_compiles_and_fits_shared_memory(compiled):
    arch, result, kernels = compiled
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    families = {k["case"].split()[0] for k in kernels}
    assert families == {"norm", "attention", "write_kv_cache", "paged", "quant"}
    assert all(not k["error"] and k["shared"] <= SHARED_LIMIT[arch] for k in kernels)


def test_norm_and_paged_kernels_do_not_spill(compiled):
    arch, result, kernels = compiled
    checked = [k for k in kernels if k["kernel"].startswith(NO_SPILLS)]
    assert len(checked) > 30
    spilling = [f"{k['case']}: {k['kernel']} {k['spill_bytes']} bytes" for k in checked if k["spill_bytes"]]
    assert not spilling, spilling


def test_shared_memory_prune_never_drops_a_config_that_fits(compiled):
    """The attention autotuners prune 16-bit configs by a shared-memory estimate before compiling them
    (kernels/attention.py, fits_shared_memory): no compiled config the estimate puts over the limit may
    fit. (In a full sm_90 run of every config, the estimate dropped 52 configs, all over the limit.)"""
    from llmfast_kernels.attention import block_d, fwd_tiles, tile_bytes
    from llmfast_kernels.attention_bwd import dkdv_tiles, dq_tiles

    tiles = {"_attn_fwd_kernel": fwd_tiles, "_attn_bwd_dkdv_kernel": dkdv_tiles, "_attn_bwd_dq_kernel": dq_tiles}
    arch, result, kernels = compiled
    limit = SHARED_LIMIT[arch]
    checked = [k for k in kernels if k["kernel"] in tiles]
    assert len(checked) >= 20
    for k in checked:
        p = k["params"]
        width = block_d(int(re.search(r"D=(\d+)", k["case"]).group(1)))
        element_size = 4 if "float32" in k["case"] else 2
        estimate = tile_bytes(tiles[k["kernel"]], p["BLOCK_M"], p["BLOCK_N"], p["num_stages"], width, element_size)
        assert estimate <= limit or k["shared"] > limit, (k["case"], k["kernel"], p, estimate)
