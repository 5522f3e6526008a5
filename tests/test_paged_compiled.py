"""The paged ops' index values (slots, block ids, lengths) where Python does not read them: in a torch.compile
graph (each op checks them when it runs, unless inside trusted_index_values), during CUDA graph capture,
and in the C++ ops called directly."""
import pytest
import torch

from llmfast.ops import paged_attention, write_kv_cache
from helpers import DEVICE, require_backend
from paged_cases import _chunked_args, _int32, _paged_args, _write_args


DIRECT_CPU_CALLS = [  # torch.ops.llmfast.* called directly: out-of-range indices read or wrote anywhere
    (lambda L, kc: L.write_kv_cache_cpu(torch.randn(1, 2, 8), torch.randn(1, 2, 8), kc, kc.clone(),
                                        torch.tensor([10**9])), r"slot_mapping\[0\] = 1000000000 is outside"),
    (lambda L, kc: L.paged_attention_cpu(torch.randn(1, 2, 8), kc, kc, _int32([10**8]), _int32(4), None, 1.0),
     r"block_tables\[0, 0\] = 100000000 is outside"),
    (lambda L, kc: L.paged_attention_cpu(torch.randn(1, 2, 8), kc, kc, _int32([0]), _int32(10**8), None, 1.0),
     r"context_lens\[0\] = 100000000 is outside"),
    (lambda L, kc: L.paged_attention_cpu(torch.randn(1, 2, 8), torch.zeros(2, 4, 0, 8), torch.zeros(2, 4, 0, 8),
                                         _int32([0]), _int32(1), None, 1.0), "kv_heads must be positive"),
    (lambda L, kc: L.paged_attention_cpu(torch.randn(1, 2, 8), kc, kc, torch.zeros(9, 1, dtype=torch.int32),
                                         torch.full((9,), 4, dtype=torch.int32), None, 1.0), "one query row per"),
    (lambda L, kc: L.paged_attention_cpu(torch.randn(1, 2, 8), kc, kc, _int32([0]), _int32(4), _int32(0, 10**7),
                                         1.0), "cu_seqlens_q must run from 0"),
]


@pytest.mark.parametrize("call, match", DIRECT_CPU_CALLS)
def test_cpu_ops_called_directly_check_their_indices(call, match):
    """The C++ ops check what the Python wrappers check (a direct call, or a compiled graph whose values
    Python could not read, crashed the process: segfault, or SIGFPE for zero kv heads)."""
    require_backend("cpu", "paged_attention", torch.device("cpu"))
    with pytest.raises(RuntimeError, match=match):
        call(torch.ops.llmfast, torch.zeros(2, 4, 2, 8))


COMPILED_BAD_INDICES = [  # (call, the ValueError's message): values a compiled graph could not read when traced
    (lambda b, q, kc, bt, cl, cu, slots: write_kv_cache(q[:, :2], q[:, :2], kc, kc.clone(), slots, backend=b),
     r"slot_mapping: expected slots in \[0, 64\)"),
    (lambda b, q, kc, bt, cl, cu, slots: paged_attention(q, kc, kc, bt, cl, backend=b),
     r"block_tables: expected block ids in \[0, 8\)"),
    (lambda b, q, kc, bt, cl, cu, slots: paged_attention(q, kc, kc, bt * 0, cl + 4, backend=b),
     r"context_lens: expected lengths in \[0, 8\]"),
    (lambda b, q, kc, bt, cl, cu, slots: paged_attention(q, kc, kc, bt * 0, cl, cu_seqlens_q=cu, max_seqlen_q=1,
                                                         backend=b),
     "cu_seqlens_q: expected to end at the number of tokens 1"),
]
KERNEL_BACKENDS = ["triton", "cuda", "cpu"]  # what a compiled graph calls as opaque custom ops


def _kernel_device(backend):
    return torch.device("cpu") if backend == "cpu" else DEVICE


@pytest.mark.parametrize("call, match", COMPILED_BAD_INDICES)
@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_ops_in_a_compiled_graph_check_the_index_values_when_they_run(backend, call, match):
    """torch.compile traces the ops without their values; the compiled graph's ops read them when they run.
    Unchecked, a block id of 10**6 made the Triton interpreter's process segfault (on a GPU, the Triton and
    CUDA kernels make an illegal access), and the CPU kernels' own checks raised a RuntimeError."""
    device = _kernel_device(backend)
    require_backend(backend, "paged_attention", device)
    q, kc = torch.randn(1, 4, 8, device=device), torch.randn(8, 8, 2, 8, device=device)
    bt, cl = _int32([10**6]).view(1, 1).to(device), _int32(5).to(device)
    cu, slots = _int32(0, 2).to(device), torch.tensor([10**6], device=device)
    compiled = torch.compile(call, fullgraph=True, backend="eager")
    with pytest.raises(ValueError, match=match):
        compiled(backend, q, kc, bt, cl, cu, slots)


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_trusted_index_values_skip_the_compiled_graphs_checks(backend, monkeypatch):
    """Inside trusted_index_values a compiled graph's ops read no index value (the engine on a GPU, where each
    read is a host sync per layer); outside it, each op checks its values every time it runs."""
    from llmfast.ops import kv_cache, paged, trusted_index_values

    device = _kernel_device(backend)
    require_backend(backend, "paged_attention", device)
    write_args = {name: t.to(device) for name, t in _write_args().items()}
    paged_args = {name: t.to(device) if torch.is_tensor(t) else t for name, t in _chunked_args(max_seqlen_q=4).items()}
    expected = paged_attention(**paged_args, backend="reference")
    checked = []

    def spy(check):
        def record(*args):
            checked.append(check.__name__)
            return check(*args)
        return record

    for module, name in ((kv_cache, "_check_slot_values"), (paged, "_check_paged_index_values")):
        monkeypatch.setattr(module, name, spy(getattr(module, name)))

    def step(write_args, paged_args):
        write_kv_cache(**write_args, backend=backend)
        return paged_attention(**paged_args, backend=backend)

    compiled = torch.compile(step, fullgraph=True, backend="eager")
    with trusted_index_values():
        out = compiled(write_args, paged_args)
    assert checked == []
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)
    compiled(write_args, paged_args)
    assert checked == ["_check_slot_values", "_check_paged_index_values"]


def test_no_value_is_read_while_a_cuda_graph_is_captured(monkeypatch):
    """A host read ends a CUDA graph capture: the checks read only shapes and dtypes then (as traced)."""
    from llmfast.ops._checks import values_readable

    assert values_readable()
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: True)
    assert not values_readable()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("backend", ["triton", "cuda"])
def test_gpu_public_paged_ops_can_be_captured_in_a_cuda_graph(backend):
    require_backend(backend, "paged_attention", torch.device("cuda"))
    args = {name: t.cuda() for name, t in _paged_args().items()}
    k, v = torch.randn(2, 2, 32, device="cuda"), torch.randn(2, 2, 32, device="cuda")
    slots = torch.tensor([43, 8], device="cuda")  # the last token of each sequence: (block 5, 3), (block 1, 0)

    def step():
        write_kv_cache(k, v, args["k_cache"], args["v_cache"], slots, backend=backend)
        return paged_attention(**args, backend=backend)

    expected = step()  # eager: validated, compiled, tuned
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = step()
    k.normal_(), v.normal_()
    graph.replay()
    torch.testing.assert_close(out, step(), atol=1e-5, rtol=1e-5)  # the replay read the new k, v
    assert not torch.equal(out, expected)
