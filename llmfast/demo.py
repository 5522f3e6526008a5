"""`llmfast demo`: runs every op on every backend available here against the reference and prints
a table of max errors and timings."""
from __future__ import annotations

import time
from typing import Callable

import torch

import llmfast
from llmfast import ops
from llmfast.backends import resolve


def _cases(device: torch.device, dtype: torch.dtype) -> dict[str, Callable[[str], object]]:
    """One representative call per op: name -> fn(backend) -> output tensor(s)."""
    g = torch.Generator(device="cpu").manual_seed(0)

    def rand(*shape, dt=dtype):
        return torch.randn(*shape, generator=g, dtype=torch.float32).to(device=device, dtype=dt)

    tokens, hidden = 256, 1024
    x, r, w, b = rand(tokens, hidden), rand(tokens, hidden), rand(hidden), rand(hidden)
    q, k, v = rand(2, 128, 8, 64), rand(2, 128, 2, 64), rand(2, 128, 2, 64)

    num_blocks, block_size, seqs, context = 64, 16, 4, 100
    k_cache, v_cache = rand(num_blocks, block_size, 2, 64), rand(num_blocks, block_size, 2, 64)
    perm = torch.randperm(num_blocks, generator=g)[: seqs * 8]
    block_tables = perm.view(seqs, 8).to(device=device, dtype=torch.int32)
    context_lens = torch.full((seqs,), context, dtype=torch.int32, device=device)
    q_decode = rand(seqs, 8, 64)
    new_k, new_v = rand(seqs, 2, 64), rand(seqs, 2, 64)
    slots = (block_tables[:, (context - 1) // block_size].long() * block_size + (context - 1) % block_size)

    weight = rand(512, 1024)
    qw = llmfast.quant.quantize(weight, bits=4, group_size=128)
    xq = rand(8, 1024)

    def write(backend):
        kc, vc = k_cache.clone(), v_cache.clone()
        ops.write_kv_cache(new_k, new_v, kc, vc, slots, backend=backend)
        return kc, vc

    return {
        "add_layer_norm": lambda be: ops.add_layer_norm(x, r, w, b, backend=be),
        "add_rms_norm": lambda be: ops.add_rms_norm(x, r, w, backend=be),
        "attention": lambda be: ops.attention(q, k, v, causal=True, backend=be),
        "write_kv_cache": write,
        "paged_attention": lambda be: ops.paged_attention(q_decode, k_cache, v_cache, block_tables, context_lens, backend=be),
        "quant_matmul": lambda be: ops.quant_matmul(xq, qw, backend=be),
    }


def _max_error(out, ref) -> float:
    outs = out if isinstance(out, tuple) else (out,)
    refs = ref if isinstance(ref, tuple) else (ref,)
    return max((a.float() - b.float()).abs().max().item() for a, b in zip(outs, refs))


def _time_ms(fn: Callable[[], object], device: torch.device, budget_s: float = 0.2) -> float:
    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize()

    fn()
    sync()
    times = []
    start = time.perf_counter()
    while len(times) < 3 or (time.perf_counter() - start < budget_s and len(times) < 100):
        t0 = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t0)
    times.sort()
    return 1e3 * times[len(times) // 2]


def run_backend_check(device: torch.device | None = None) -> list[dict]:
    """Rows of (op, backend, max error vs reference, ms); prints nothing."""
    device = device or torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    rows = []
    for op, fn in _cases(device, dtype).items():
        ref = fn("reference")
        for backend in llmfast.available_backends(op):
            try:
                resolve(op, backend, device)
            except llmfast.BackendUnavailable:
                continue  # available on this machine, but not for tensors on this device
            out = fn(backend)
            rows.append({"op": op, "backend": backend, "max_error": _max_error(out, ref),
                         "ms": _time_ms(lambda: fn(backend), device)})
    return rows


def print_backend_table(rows: list[dict]) -> None:
    print(f"{'op':<16} {'backend':<10} {'max |err| vs reference':>24} {'ms':>10}")
    for row in rows:
        print(f"{row['op']:<16} {row['backend']:<10} {row['max_error']:>24.3e} {row['ms']:>10.3f}")


def main() -> None:
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    name = torch.cuda.get_device_name() if device.type == "cuda" else "CPU"
    print(f"llmfast {llmfast.__version__}: backend check on {name} (torch {torch.__version__})")
    print_backend_table(run_backend_check(device))
