"""Compile every Triton kernel's GPU launches for sm_90 or sm_80 on a machine without a GPU.

CI runs the kernels in the interpreter, which checks what they compute but never lowers them to PTX.
A kernel that does not compile for the GPU, that needs more shared memory than an SM has in every
config the autotuner may pick, or that spills registers would first show up on the H100. This script
runs the launchers on fake CUDA tensors (no data, no driver), catches each launch before it reaches the
driver, and compiles what the launch would have compiled - every config an autotuned kernel keeps
after its pruning - for the target, reading shared memory from the compiled kernel and spills from
cuobjdump.

    python tests/compile_kernels.py --arch 90 [--quick] [--configs all|last] [--json FILE]

Run without TRITON_INTERPRET (it needs the real compiler); tests/test_compile_kernels.py runs it.
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import re
import subprocess
import sys
import tempfile
import time
import types
from unittest import mock

import torch
import triton
from torch._subclasses.fake_tensor import FakeTensorMode
from triton.backends.compiler import GPUTarget
from triton.backends.nvidia.compiler import get_ptxas
from triton.compiler import ASTSource
from triton.runtime.autotuner import Autotuner
from triton.runtime.jit import JITFunction
from triton.tools.tensor_descriptor import TensorDescriptor

# Largest dynamic shared memory one block may use (CUDA occupancy tables): H100 227 KB, A100 163 KB.
SHARED_LIMIT = {90: 232448, 80: 166912}
MULTIPROCESSORS = {90: 132, 80: 108}
POINTER_TYPES = {
    torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32", torch.float64: "fp64",
    torch.int8: "i8", torch.uint8: "u8", torch.int16: "i16", torch.int32: "i32", torch.int64: "i64",
}


@dataclasses.dataclass
class Launch:
    """One launch caught before the driver: the kernel, its arguments and the configs it may run."""
    case: str
    fn: JITFunction
    args: tuple
    kwargs: dict
    configs: list  # triton.Config for an autotuned launch, [None] for a plain one


@dataclasses.dataclass
class Compiled:
    case: str
    kernel: str
    autotuned: bool
    params: dict  # the autotune config's meta-parameters and options; {} for a plain launch
    shared: int = 0
    registers: int = 0
    spill_bytes: int = 0
    error: str = ""


def fake_cuda(arch: int):
    """Context: torch believes a GPU of compute capability ``arch`` is present, and kernel launches are
    recorded into the yielded list instead of running."""
    launches: list[Launch] = []
    case = {"name": ""}

    def jit_run(self, *args, grid, warmup, **kwargs):
        launches.append(Launch(case["name"], self, args, kwargs, [None]))

    def autotune_run(self, *args, grid=None, warmup=False, **kwargs):
        self.nargs = dict(zip(self.arg_names, args))
        configs = self.prune_configs(kwargs)  # what the autotuner would compile for this launch
        self.nargs = None
        launches.append(Launch(case["name"], self.fn, args, kwargs, list(configs)))

    props = types.SimpleNamespace(multi_processor_count=MULTIPROCESSORS[arch], major=arch // 10, minor=arch % 10,
                                  shared_memory_per_block_optin=SHARED_LIMIT[arch])
    stack = contextlib.ExitStack()
    stack.enter_context(mock.patch.object(JITFunction, "run", jit_run))
    stack.enter_context(mock.patch.object(Autotuner, "run", autotune_run))
    stack.enter_context(mock.patch("torch.cuda.get_device_capability", lambda *a, **k: (arch // 10, arch % 10)))
    stack.enter_context(mock.patch("torch.cuda.get_device_properties", lambda *a, **k: props))
    stack.enter_context(mock.patch("torch.cuda.current_device", lambda: 0))
    stack.enter_context(FakeTensorMode())
    return stack, launches, case


def _scalar_type(value) -> str:
    if isinstance(value, bool):
        return "u1"
    if isinstance(value, int):
        return "i32" if -2**31 <= value < 2**31 else "i64"
    if isinstance(value, float):
        return "fp32"
    raise TypeError(f"unsupported kernel argument {value!r}")


def source(launch: Launch, config) -> tuple[ASTSource, dict]:
    """(what to compile, compile options) for ``launch`` under ``config``, specialized as a launch on
    the GPU would be: 16-byte aligned pointers, integers divisible by 16 marked so, integers equal to 1
    made constants (a unit stride)."""
    fn = launch.fn
    values = dict(zip([p.name for p in fn.params], launch.args))
    values.update(launch.kwargs)
    options = {"num_warps": values.pop("num_warps", 4), "num_stages": values.pop("num_stages", 3)}
    if config is not None:
        values.update(config.kwargs)
        options = {"num_warps": config.num_warps, "num_stages": config.num_stages}
        if config.pre_hook is not None:  # e.g. sets the tensor descriptors' boxes for this config
            config.pre_hook(values)
    signature, constexprs, attrs = {}, {}, {}
    for i, p in enumerate(fn.params):
        value = values.get(p.name, p.default)
        if p.is_constexpr or value is None or (type(value) is int and value == 1 and not p.do_not_specialize):
            signature[p.name] = "constexpr"
            constexprs[p.name] = value
        elif isinstance(value, TensorDescriptor):
            signature[p.name] = f"tensordesc<{POINTER_TYPES[value.base.dtype]}{list(value.block_shape)}>"
        elif isinstance(value, torch.Tensor):
            signature[p.name] = "*" + POINTER_TYPES[value.dtype]
            attrs[(i,)] = [["tt.divisibility", 16]]
        else:
            signature[p.name] = _scalar_type(value)
            if type(value) is int and value % 16 == 0 and not p.do_not_specialize:
                attrs[(i,)] = [["tt.divisibility", 16]]
    return ASTSource(fn, signature, constexprs, attrs), options


def resources(cubin: bytes, arch: int) -> tuple[int, int]:
    """(registers per thread, stack + local-memory bytes per thread: where spills go) from cuobjdump."""
    tool = os.path.join(os.path.dirname(get_ptxas(arch).path), "cuobjdump")
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        out = subprocess.run([tool, "-res-usage", f.name], capture_output=True, text=True, check=True).stdout
    usage = {key: int(value) for key, value in re.findall(r"(REG|STACK|LOCAL):(\d+)", out)}
    return usage.get("REG", 0), usage.get("STACK", 0) + usage.get("LOCAL", 0)


def compile_launch(launch: Launch, config, src: ASTSource, options: dict, arch: int) -> Compiled:
    result = Compiled(launch.case, launch.fn.__name__, config is not None,
                      {} if config is None else dict(config.all_kwargs()))
    try:
        kernel = triton.compile(src, target=GPUTarget("cuda", arch, 32), options=options)
    except Exception as e:  # the message is the result: it is reported, not raised
        result.error = f"{type(e).__name__}: {str(e).strip().splitlines()[-1] if str(e).strip() else ''}"
        return result
    result.shared = kernel.metadata.shared
    result.registers, result.spill_bytes = resources(kernel.asm["cubin"], arch)
    return result


# ----------------------------------------------------------------------------------------------
# the launches: shapes the ops take on the GPU (tests at real sizes, benchmarks, the engine)


def norm_cases(quick: bool):
    from llmfast_kernels.norm import add_norm_bwd, add_norm_fwd

    if quick:  # each launch path once, and the widest rows held in registers, where spills start
        bf16, fp32 = torch.bfloat16, torch.float32
        cases = [(n, bf16) for n in (7, 4096, 4097, 8192, 16384, 65536)] + [(4096, fp32)]
    else:
        sizes = (1, 7, 1000, 4096, 4097, 8192, 16384, 65536)
        cases = [(n, dtype) for n in sizes for dtype in (torch.bfloat16, torch.float16, torch.float32)]
    for n, dtype in cases:
        for is_rms in (True, False):
            x = torch.empty(4096, n, dtype=dtype, device="cuda")
            w = torch.empty(n, dtype=dtype, device="cuda")
            kind = "rms" if is_rms else "layer"
            yield f"norm fwd {kind} N={n} {dtype}", lambda: add_norm_fwd(x, x, w, w, 1e-5, is_rms)
            stats = x.new_empty(4096, dtype=torch.float32)
            yield f"norm bwd {kind} N={n} {dtype}", lambda: add_norm_bwd(x, x, x, w, True, True, stats, stats, is_rms)


def attention_cases(quick: bool):
    from llmfast_kernels.attention import attention_fwd
    from llmfast_kernels.attention_bwd import attention_bwd

    head_dims = (64, 128, 256) if quick else (32, 64, 80, 96, 128, 192, 256)
    grid = [(d, causal, False, torch.bfloat16) for d in head_dims for causal in (True, False)]
    grid += [(128, True, True, torch.bfloat16), (128, True, False, torch.float16), (128, True, False, torch.float32)]
    for head_dim, causal, varlen, dtype in grid:
        batch, seqlen, heads, kv_heads = 2, 4096, 32, 8
        if varlen:
            q = torch.empty(batch * seqlen, heads, head_dim, dtype=dtype, device="cuda")
            k = torch.empty(batch * seqlen, kv_heads, head_dim, dtype=dtype, device="cuda")
            cu = torch.empty(batch + 1, dtype=torch.int32, device="cuda")
        else:
            q = torch.empty(batch, seqlen, heads, head_dim, dtype=dtype, device="cuda")
            k = torch.empty(batch, seqlen, kv_heads, head_dim, dtype=dtype, device="cuda")
            cu = None
        args = (cu, cu, seqlen, seqlen, causal, head_dim ** -0.5)
        name = f"attention D={head_dim} causal={causal} varlen={varlen} {dtype}"
        yield f"{name} fwd", lambda: attention_fwd(q, k, k, *args)
        lse = torch.empty(heads, q.numel() // (heads * head_dim), dtype=torch.float32, device="cuda")
        yield f"{name} bwd", lambda: attention_bwd(q, q, k, k, q, lse, *args)


def paged_cases(quick: bool):
    from llmfast_kernels.paged import paged_attention, write_kv_cache

    head_dims = (64, 128, 256) if quick else (64, 80, 128, 256)
    for head_dim in head_dims:
        for block_size in (16,) if quick else (1, 16, 256):
            for group in (1, 4) if quick else (1, 4, 8):
                kv_heads, dtype = 8, torch.bfloat16
                cache = torch.empty(4096, block_size, kv_heads, head_dim, dtype=dtype, device="cuda")
                kv = torch.empty(64, kv_heads, head_dim, dtype=dtype, device="cuda")
                slots = torch.empty(64, dtype=torch.int64, device="cuda")
                name = f"D={head_dim} block={block_size} group={group}"
                yield f"write_kv_cache {name}", lambda: write_kv_cache(kv, kv, cache, cache, slots)
                for batch, context in ((1, 32768), (256, 2048)):  # split (flash-decoding), single pass
                    q = torch.empty(batch, kv_heads * group, head_dim, dtype=dtype, device="cuda")
                    tables = torch.empty(batch, context // block_size, dtype=torch.int32, device="cuda")
                    lens = torch.empty(batch, dtype=torch.int32, device="cuda")
                    yield (f"paged decode {name} batch={batch}",
                           lambda: paged_attention(q, cache, cache, tables, lens, None, None, 0.1))
                q = torch.empty(1024, kv_heads * group, head_dim, dtype=dtype, device="cuda")
                cu = torch.empty(9, dtype=torch.int32, device="cuda")
                tables = torch.empty(8, 4096 // block_size, dtype=torch.int32, device="cuda")
                lens = torch.empty(8, dtype=torch.int32, device="cuda")
                yield (f"paged prefill {name}",
                       lambda: paged_attention(q, cache, cache, tables, lens, cu, 128, 0.1))


def quant_cases(quick: bool):
    from llmfast_kernels import quant_matmul as kernels

    weights = [(4, 128), (8, 0)] if quick else [(4, 32), (4, 64), (4, 128), (8, 0), (8, 128)]
    dtypes = (torch.bfloat16,) if quick else (torch.bfloat16, torch.float16, torch.float32)
    n, k = 4096, 4096
    for bits, group_size in weights:
        for dtype in dtypes:
            groups = k // group_size if group_size else 1
            qweight = (torch.empty(n, k, dtype=torch.int8, device="cuda") if bits == 8
                       else torch.empty(n, k // 8, dtype=torch.int32, device="cuda"))
            scales = torch.empty(n, groups, dtype=dtype, device="cuda")
            zeros = torch.empty(n, groups, dtype=dtype, device="cuda") if bits == 4 else None
            bias = torch.empty(n, dtype=dtype, device="cuda")
            name = f"int{bits} g{group_size} {dtype}"
            for m in (1, 16):
                x = torch.empty(m, k, dtype=dtype, device="cuda")
                yield f"quant splitk {name} M={m}", lambda: kernels.quant_matmul_splitk(x, qweight, scales, zeros, bias)
            x256 = torch.empty(256, k, dtype=dtype, device="cuda")
            yield f"quant tiled {name} M=256", lambda: kernels.quant_matmul_tiled(x256, qweight, scales, zeros, bias)
            yield f"quant dequantize {name}", lambda: kernels.dequantize(qweight, scales, zeros, dtype)


FAMILIES = {"norm": norm_cases, "attention": attention_cases, "paged": paged_cases, "quant": quant_cases}


def record(arch: int, families: list[str], quick: bool) -> list[Launch]:
    stack, launches, case = fake_cuda(arch)
    with stack:
        for family in families:
            for name, launch in FAMILIES[family](quick):
                case["name"] = name
                launch()
    return launches


def compile_all(launches: list[Launch], arch: int) -> tuple[list[Compiled], int]:
    """(one result per launch and config, under the launch's case; how many kernels were compiled: each
    specialization once, as many cases launch the same one)."""
    compiled: dict[tuple, Compiled] = {}
    results = []
    for launch in launches:
        for config in launch.configs:
            src, options = source(launch, config)
            key = (launch.fn.__name__, src.hash(), tuple(sorted(options.items())))
            if key not in compiled:
                compiled[key] = compile_launch(launch, config, src, options, arch)
            results.append(dataclasses.replace(compiled[key], case=launch.case))
    return results, len(compiled)


def label(r: Compiled) -> str:
    return ", ".join(f"{k}={v}" for k, v in r.params.items()) or "plain"


def check(results: list[Compiled], arch: int) -> list[str]:
    """What would fail on the GPU: a compile error; a plain launch over the shared-memory limit; an
    autotuned launch with no config under it (the autotuner drops those that do not fit)."""
    limit = SHARED_LIMIT[arch]
    problems = [f"{r.case}: {r.kernel} [{label(r)}] does not compile: {r.error}" for r in results if r.error]
    problems += [f"{r.case}: {r.kernel} needs {r.shared} bytes of shared memory (limit {limit})"
                 for r in results if not r.error and not r.autotuned and r.shared > limit]
    by_launch: dict[tuple[str, str], list[Compiled]] = {}
    for r in results:
        if r.autotuned:
            by_launch.setdefault((r.case, r.kernel), []).append(r)
    for (case, kernel), group in by_launch.items():
        if not any(not r.error and r.shared <= limit for r in group):
            problems.append(f"{case}: {kernel}: no autotune config fits {limit} bytes of shared memory")
    return problems


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", type=int, choices=sorted(SHARED_LIMIT), default=90)
    parser.add_argument("--families", default=",".join(FAMILIES), help="comma-separated: " + ", ".join(FAMILIES))
    parser.add_argument("--quick", action="store_true", help="fewer shapes and dtypes (CI)")
    parser.add_argument("--configs", choices=("all", "last"), default="all",
                        help="compile every autotune config, or only the last of each list (the small one "
                             "kept because it always fits; then it alone must fit)")
    parser.add_argument("--json", help="write every compiled kernel's resources here")
    args = parser.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        parser.error("unset TRITON_INTERPRET: the interpreter does not compile")
    start = time.perf_counter()
    launches = record(args.arch, args.families.split(","), args.quick)
    if args.configs == "last":
        launches = [dataclasses.replace(launch, configs=launch.configs[-1:]) for launch in launches]
    results, kernels = compile_all(launches, args.arch)
    problems = check(results, args.arch)
    spills = sorted(f"{r.case}: {r.kernel} [{label(r)}]: {r.spill_bytes} bytes" for r in results if r.spill_bytes)
    print(f"sm_{args.arch}: {len(launches)} launches, {kernels} kernels compiled in "
          f"{time.perf_counter() - start:.0f} s, {len(problems)} problems, {len(spills)} spilling")
    for line in problems:
        print("PROBLEM", line)
    for line in spills:
        print("SPILLS", line)
    if args.json:
        with open(args.json, "w") as f:
            json.dump([dataclasses.asdict(r) for r in results], f, indent=1)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
