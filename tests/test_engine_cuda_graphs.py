"""Decode-step CUDA graphs: the capture ladder, the capture guard, and replay (static buffers, padding rows,
eager fallback) against the eager engine.

On CPU the replay logic runs with a stand-in for capture: each "graph" re-runs the captured forward on the
static buffers, as a real replay would, with the ops' value checks off as under capture and any host read of
a tensor's values failing the test, as it would end a real capture. The `gpu` tests capture real graphs.
"""
import contextlib
import copy

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from llmfast import backends
from llmfast.engine import LLM, SamplingParams
from llmfast.engine import cuda_graphs
from llmfast.engine.cuda_graphs import DecodeGraphs, capture_sizes, check_graph_safe
from llmfast.ops import trusted_index_values

transformers = pytest.importorskip("transformers")

GPU = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def tiny_llama(folder, dtype=torch.float32, hidden=64, layers=2):
    """A random Llama checkpoint (saved in ``dtype``) with weights larger than HF's init, which spreads the
    logits so that fewer greedy choices are near ties; returns the HF model, in ``dtype``."""
    config = transformers.AutoConfig.for_model(
        model_type="llama", vocab_size=384, hidden_size=hidden, intermediate_size=2 * hidden,
        num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
        eos_token_id=None, bos_token_id=None)
    torch.manual_seed(0)
    hf = transformers.AutoModelForCausalLM.from_config(config).eval()
    with torch.no_grad():
        for p in hf.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    hf.to(dtype).save_pretrained(folder)
    return hf


def mixed_requests(num, vocab, seed=0, max_tokens=24):
    """Prompts of 1..40 tokens and outputs of 1..max_tokens, so the running batch shrinks through many sizes."""
    g = torch.Generator().manual_seed(seed)
    prompt_lens = torch.randint(1, 41, (num,), generator=g)
    output_lens = torch.randint(1, max_tokens + 1, (num,), generator=g)
    prompts = [torch.randint(0, vocab, (int(n),), generator=g).tolist() for n in prompt_lens]
    return prompts, [SamplingParams(temperature=0, max_tokens=int(n), ignore_eos=True) for n in output_lens]


def assert_equal_but_near_ties(prompts, got, expected, hf):
    """Graph replays multiply padded batches (16 rows where eager has 13), and cuBLAS may round those
    differently, so bf16 greedy tokens may part after a near tie: where ``got`` parts from ``expected``,
    both must be near-best under the float32 oracle (test_engine_gpu's 2x rule), and most must agree."""
    from test_engine_gpu import check_greedy_against_hf

    peer = hf.cuda().eval()
    oracle = copy.deepcopy(hf).float().cpu()
    for prompt, ours, theirs in zip(prompts, got, expected):
        assert len(ours) == len(theirs)
        if ours != theirs:
            check_greedy_against_hf(prompt, ours, theirs, oracle, peer)
    same = sum(a == b for a, b in zip(got, expected))
    assert same >= 0.8 * len(prompts), f"only {same} of {len(prompts)} requests gave the eager tokens"


def record_replays(graphs: DecodeGraphs) -> list[int]:
    """Wraps ``graphs.run`` to log each replayed batch size."""
    sizes, run = [], graphs.run
    graphs.run = lambda ids, *rest: sizes.append(len(ids)) or run(ids, *rest)
    return sizes


@pytest.mark.parametrize("max_num_seqs, expected", [
    (1, [1]), (3, [1, 2, 3]), (40, [1, 2, 4, 8, 16, 32, 40]), (64, [1, 2, 4, 8, 16, 32, 48, 64]),
])
def test_capture_sizes(max_num_seqs, expected):
    assert capture_sizes(max_num_seqs) == expected


def test_capture_sizes_cap_at_512():
    sizes = capture_sizes(4096)
    assert sizes[-1] == 512 and sizes[:5] == [1, 2, 4, 8, 16] and all(b - a <= 16 for a, b in zip(sizes, sizes[1:]))


def test_a_backend_that_syncs_cannot_be_captured():
    # on CPU "auto" picks the C++ kernels, which are not graph-safe: the error says how to run anyway
    with pytest.raises(RuntimeError, match="enforce_eager=True"):
        check_graph_safe(torch.device("cpu"))


HOST_READ = "reads values back to the host, which would end a CUDA graph's capture"


class _NoHostReads(TorchDispatchMode):
    """Fails on the ops that sync a CUDA stream with the host, which a capture forbids: reading a value
    (``item``, ``bool``, ``int``: under inference mode the mode sees ``item``/``is_nonzero`` themselves) or
    producing a shape that depends on values (boolean-mask indexing, ``nonzero``, ``unique``...)."""

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        aten = torch.ops.aten
        reads = func in (aten._local_scalar_dense.default, aten.item.default, aten.is_nonzero.default) or any(
            tag in func.tags for tag in (torch.Tag.data_dependent_output, torch.Tag.dynamic_output_shape))
        indexing = func in (aten.index.Tensor, aten.index_put.default, aten.index_put_.default,
                            aten._index_put_impl_.default)
        if reads or (indexing and any(i is not None and i.dtype in (torch.bool, torch.uint8) for i in args[1])):
            raise AssertionError(f"{func} {HOST_READ}")
        return func(*args, **(kwargs or {}))


@contextlib.contextmanager
def as_if_capturing(monkeypatch):
    """Inside: no host reads, and the ops see ``values_readable()`` false, as while a CUDA stream captures.
    The Python-level methods are patched too, because a custom op's body runs with dispatch modes off."""

    def refuse(name):
        def method(self, *args, **kwargs):
            raise AssertionError(f"Tensor.{name} {HOST_READ}")
        return method

    with monkeypatch.context() as patch, trusted_index_values(), _NoHostReads():
        for name in ("tolist", "item", "numpy", "cpu", "__bool__", "__int__", "__float__", "__index__"):
            patch.setattr(torch.Tensor, name, refuse(name))
        yield


@pytest.mark.parametrize("read", [
    lambda t: int(t[0]), lambda t: bool(t[0]), lambda t: float(t[0]), lambda t: t[0].item(), lambda t: t.tolist(),
    lambda t: t[t > 1], lambda t: t.nonzero(), lambda t: t.unique(), lambda t: t.cpu(),
], ids=["int", "bool", "float", "item", "tolist", "mask", "nonzero", "unique", "cpu"])
def test_the_capture_stand_in_refuses_every_host_read(read, monkeypatch):
    t = torch.arange(4)
    with torch.inference_mode(), pytest.raises(AssertionError, match="CUDA graph's capture"):
        with as_if_capturing(monkeypatch):
            read(t)


class _ReplayByRerun:
    """Stands in for a captured graph on CPU: replaying re-runs the captured forward on the static buffers."""

    def __init__(self, graphs, batch, monkeypatch):
        def replay():
            with as_if_capturing(monkeypatch):
                graphs._forward(batch)

        replay()  # the capture
        self.replay = replay

    def pool(self):
        return None


@pytest.fixture(params=["cpu"])
def rerun_graphs(request, monkeypatch):
    """Graphs replayed by re-running, with the paged ops on ``request.param``'s backend ("cpu": the C++ ops,
    which stand in for the CUDA ones; "triton": its wrappers and launchers, under the interpreter)."""
    if request.param == "cpu":
        monkeypatch.setattr(cuda_graphs, "GRAPH_SAFE_BACKENDS", ("cpu",))
    else:
        if not backends._triton_interpreting():
            pytest.skip("Triton runs on CPU tensors only under TRITON_INTERPRET=1 (set by conftest without a GPU)")
        auto = backends._auto
        monkeypatch.setattr(backends, "_auto", lambda op, device: request.param if op in (
            "write_kv_cache", "paged_attention") else auto(op, device))
    monkeypatch.setattr(DecodeGraphs, "_capture", lambda self, batch, pool: _ReplayByRerun(self, batch, monkeypatch))


def generate_with_rerun_graphs(folder, prompts, params, max_blocks_per_seq):
    """(eager tokens, tokens with graphs of max_num_seqs 12 on blocks of 4, the replayed batch sizes)."""
    eager = LLM(folder, block_size=4, max_num_seqs=12, enforce_eager=True, device="cpu")
    expected = [o.outputs[0].token_ids for o in eager.generate(prompts, params, use_tqdm=False)]
    llm = LLM(folder, block_size=4, max_num_seqs=12, enforce_eager=True, device="cpu")
    runner = llm.runner
    runner.graphs = DecodeGraphs(runner.model, runner.kv_caches, max_num_seqs=12, max_blocks_per_seq=max_blocks_per_seq,
                                 max_model_len=runner.max_model_len, device=runner.device)
    assert sorted(runner.graphs.graphs) == [1, 2, 4, 8, 12]
    replayed = record_replays(runner.graphs)
    return expected, [o.outputs[0].token_ids for o in llm.generate(prompts, params, use_tqdm=False)], replayed


@pytest.mark.parametrize("rerun_graphs", ["cpu", "triton"], indirect=True)
def test_replay_with_padding_matches_eager(tmp_path, rerun_graphs):
    tiny_llama(tmp_path)
    prompts, params = mixed_requests(11, 384, max_tokens=12)
    expected, got, replayed = generate_with_rerun_graphs(tmp_path, prompts, params, max_blocks_per_seq=16)
    assert got == expected
    assert set(replayed) - {1, 2, 4, 8, 12}, f"no batch needed padding: {replayed}"
    # every decode step replayed, the first (all requests that outlive their prefill) included
    assert max(replayed) == sum(p.max_tokens > 1 for p in params)
    assert len(replayed) == max(p.max_tokens for p in params) - 1


def test_sequences_past_the_captured_block_table_width_decode_eagerly(tmp_path, rerun_graphs):
    tiny_llama(tmp_path)
    prompts = [[7 * i + 1] for i in range(6)]  # one token, then 20 more: past 12 tokens (3 blocks of 4)
    params = SamplingParams(temperature=0, max_tokens=20, ignore_eos=True)
    expected, got, replayed = generate_with_rerun_graphs(tmp_path, prompts, params, max_blocks_per_seq=3)
    assert got == expected
    # steps with contexts of 1..12 tokens fit (the one-token prompts' prefill is a decode-shaped step too);
    # the 8 steps after ran eagerly
    assert replayed == [6] * 12, replayed


@pytest.mark.gpu
@GPU
def test_graphs_and_eager_give_the_same_greedy_tokens_in_bf16(tmp_path):
    hf = tiny_llama(tmp_path, torch.bfloat16, hidden=256, layers=4)
    prompts, params = mixed_requests(40, 384)
    eager = LLM(tmp_path, device="cuda", max_num_seqs=48, num_kv_blocks=512, enforce_eager=True)
    expected = [o.outputs[0].token_ids for o in eager.generate(prompts, params, use_tqdm=False)]
    del eager
    llm = LLM(tmp_path, device="cuda", max_num_seqs=48, num_kv_blocks=512)
    assert llm.runner.graphs is not None and sorted(llm.runner.graphs.graphs) == [1, 2, 4, 8, 16, 32, 48]
    replayed = record_replays(llm.runner.graphs)
    got = [o.outputs[0].token_ids for o in llm.generate(prompts, params, use_tqdm=False)]
    assert_equal_but_near_ties(prompts, got, expected, hf)
    assert set(replayed) - set(llm.runner.graphs.graphs), "no batch size outside the capture set was replayed"
    assert len(set(replayed)) >= 5, f"continuous batching should cross several graph sizes: {sorted(set(replayed))}"


def stream_interleaved(llm, prompts, params):
    """Streams every request, one piece per live stream per round, so requests join and leave the running
    batch at different steps; returns each request's tokens."""
    streams = [llm.stream(p, s) for p, s in zip(prompts, params)]
    tokens = [[] for _ in prompts]
    active = list(range(len(streams)))
    while active:
        for i in list(active):
            piece = next(streams[i], None)
            if piece is None:
                active.remove(i)
            else:
                tokens[i] += piece.token_ids
    return tokens


@pytest.mark.gpu
@GPU
def test_graphs_serve_requests_joining_a_running_batch(tmp_path):
    hf = tiny_llama(tmp_path, torch.bfloat16, hidden=256, layers=4)
    prompts, params = mixed_requests(24, 384, seed=1)
    eager = LLM(tmp_path, device="cuda", max_num_seqs=32, num_kv_blocks=256, enforce_eager=True)
    expected = stream_interleaved(eager, prompts, params)
    del eager
    llm = LLM(tmp_path, device="cuda", max_num_seqs=32, num_kv_blocks=256)
    replayed = record_replays(llm.runner.graphs)
    assert_equal_but_near_ties(prompts, stream_interleaved(llm, prompts, params), expected, hf)
    assert len(set(replayed)) >= 3, f"graph sizes replayed: {sorted(set(replayed))}"


@pytest.mark.gpu
@GPU
def test_a_batch_larger_than_the_largest_graph_runs_eagerly(tmp_path):
    tiny_llama(tmp_path, torch.bfloat16)
    prompts = [[i % 384, (7 * i) % 384] for i in range(520)]
    params = SamplingParams(temperature=0, max_tokens=3, ignore_eos=True)
    eager = LLM(tmp_path, device="cuda", max_num_seqs=520, num_kv_blocks=1100, enforce_eager=True)
    expected = [o.outputs[0].token_ids for o in eager.generate(prompts, params, use_tqdm=False)]
    del eager
    llm = LLM(tmp_path, device="cuda", max_num_seqs=520, num_kv_blocks=1100)
    assert llm.runner.graphs.max_batch == 512
    replayed = record_replays(llm.runner.graphs)
    assert [o.outputs[0].token_ids for o in llm.generate(prompts, params, use_tqdm=False)] == expected
    assert replayed == [], "decode batches of 520 sequences must run eagerly"
