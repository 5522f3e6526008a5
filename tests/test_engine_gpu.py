"""The engine in bfloat16 on CUDA against Hugging Face ``generate`` in bfloat16: with and without CUDA
graphs, under preemption, chunked prefill and shared prefixes, and quantized (against HF holding the
dequantized weights); then seeded sampling. Two correct bf16 implementations round differently, so their
greedy tokens may part after a near tie; the tests allow exactly that: every token we pick must be an
argmax of the float32 oracle (the same bf16-rounded weights, computed in float32) within twice HF bf16's
own logit error at that step (the 2x rule), and where HF's tokens part from ours, the two choices must be
such a near tie."""
import copy
import gc

import pytest
import torch

from llmfast.engine import LLM, SamplingParams

transformers = pytest.importorskip("transformers")

from test_engine_cuda_graphs import tiny_llama  # noqa: E402

PROMPT_LENGTHS = [1, 5, 17, 33, 64, 100]
MAX_TOKENS = 16


def oracle_and_tolerance(prompt, tokens, oracle, peer):
    """Teacher-forced on ``prompt + tokens``: the oracle's logits ``(len(tokens), vocab)`` float64 at each step
    that chose a token, and the tolerance of each step, twice the peer's largest logit error plus one bf16
    rounding of the largest logit."""
    seq = torch.tensor([prompt + tokens[:-1]])
    start = len(prompt) - 1
    with torch.no_grad():
        ref = oracle(seq).logits[0, start:].double()
        err = (peer(seq.to(peer.device)).logits[0, start:].double().cpu() - ref).abs().amax(-1)
    return ref, 2 * err + torch.finfo(torch.bfloat16).eps * ref.abs().amax(-1)


def check_greedy_against_hf(prompt, ours, theirs, oracle, peer):
    ref, tol = oracle_and_tolerance(prompt, ours, oracle, peer)
    steps = torch.arange(len(ours))
    gap = ref.amax(-1) - ref[steps, torch.tensor(ours)]  # how far below the oracle's best each choice is
    assert (gap <= tol).all(), f"step {int((gap > tol).nonzero()[0])}: a token far from the oracle's argmax"
    parted = next((t for t, (a, b) in enumerate(zip(ours, theirs)) if a != b), None)
    if parted is not None:
        near = abs(ref[parted, ours[parted]] - ref[parted, theirs[parted]])
        assert near <= tol[parted], f"HF's tokens part from ours at step {parted} without a near tie"


def generate_and_check(llm, prompts, peer, oracle) -> int:
    """Greedy-generates ``prompts`` with the engine and with ``peer.generate``, checks every prompt with
    ``check_greedy_against_hf``; returns how many gave HF's exact tokens."""
    params = SamplingParams(temperature=0, max_tokens=MAX_TOKENS, ignore_eos=True)
    same = 0
    for prompt, out in zip(prompts, llm.generate(prompts, params, use_tqdm=False)):
        ours = out.outputs[0].token_ids
        ids = torch.tensor([prompt], device="cuda")  # with a mask, so that token 0 is not taken for padding
        theirs = peer.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=MAX_TOKENS,
                               min_new_tokens=MAX_TOKENS, pad_token_id=0)[0, len(prompt):].tolist()
        assert len(ours) == len(theirs) == MAX_TOKENS
        check_greedy_against_hf(prompt, ours, theirs, oracle, peer)
        same += ours == theirs
    return same


def random_prompts(lengths, seed=0, prefix=()):
    g = torch.Generator().manual_seed(seed)
    return [list(prefix) + torch.randint(0, 384, (n,), generator=g).tolist() for n in lengths]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("enforce_eager", [False, True])
def test_bf16_greedy_follows_hf_generate_until_a_near_tie(tmp_path, enforce_eager):
    peer = tiny_llama(tmp_path, torch.bfloat16, hidden=256, layers=4).cuda().eval()
    oracle = copy.deepcopy(peer).float().cpu()
    llm = LLM(tmp_path, device="cuda", enforce_eager=enforce_eager)
    prompts = random_prompts(PROMPT_LENGTHS)
    print(f"{generate_and_check(llm, prompts, peer, oracle)}/{len(prompts)} prompts gave HF's exact tokens")
    graphs = llm.runner.graphs
    assert (graphs is None) if enforce_eager else graphs.num_replays >= MAX_TOKENS - 1  # the decodes replayed


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_default_kv_cache_fills_its_memory_share_and_no_more(tmp_path):
    config = transformers.AutoConfig.for_model(
        model_type="llama", vocab_size=384, hidden_size=256, intermediate_size=512, num_hidden_layers=4,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1 << 20)  # no cap from lengths
    transformers.AutoModelForCausalLM.from_config(config).to(torch.bfloat16).save_pretrained(tmp_path)
    gc.collect()  # earlier tests' engines, graphs and cached blocks: released, or the share check is vacuous
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    free, total = torch.cuda.mem_get_info()
    in_use_before, share = total - free, 0.05
    assert in_use_before < 0.5 * share * total, f"{in_use_before / 2**30:.2f} GiB in use before the engine"
    llm = LLM(tmp_path, device="cuda", gpu_memory_utilization=share, enforce_eager=True)
    assert llm.device == torch.device("cuda", torch.cuda.current_device())
    cache_bytes = llm.runner.kv_cache.numel() * llm.runner.kv_cache.element_size()
    in_use = total - torch.cuda.mem_get_info()[0]
    assert in_use <= share * total, f"{in_use / 2**30:.2f} GiB in use, more than {share} of {total / 2**30:.0f} GiB"
    assert cache_bytes >= 0.8 * (share * total - in_use_before), "the cache leaves most of its share unused"


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_default_kv_cache_of_a_short_model_is_capped(tmp_path):
    tiny_llama(tmp_path, torch.bfloat16, hidden=256, layers=4)  # max_position_embeddings 256
    llm = LLM(tmp_path, device="cuda", max_num_seqs=8)
    # what 8 sequences of 256 tokens can use, not millions of blocks of a tiny model on a large GPU
    assert llm.runner.num_kv_blocks == 8 * 256 // 16


SCENARIOS = {  # engine arguments, prompts: each forces the path it names on a 16-token block
    "preemption": (dict(num_kv_blocks=12), dict(lengths=PROMPT_LENGTHS)),
    "chunked": (dict(max_num_batched_tokens=32), dict(lengths=PROMPT_LENGTHS)),
    "shared_prefix": (dict(num_kv_blocks=64), dict(lengths=[1, 3, 9, 20], prefix=range(5, 45))),
}


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("scenario", list(SCENARIOS))
def test_bf16_scheduling_paths_follow_hf_generate_until_a_near_tie(tmp_path, scenario):
    peer = tiny_llama(tmp_path, torch.bfloat16, hidden=256, layers=4).cuda().eval()
    oracle = copy.deepcopy(peer).float().cpu()
    engine_args, prompt_args = SCENARIOS[scenario]
    llm = LLM(tmp_path, device="cuda", block_size=16, **engine_args)
    generate_and_check(llm, random_prompts(**prompt_args), peer, oracle)
    if scenario == "preemption":
        assert llm.scheduler.num_preemptions > 0
    if scenario == "shared_prefix":
        assert llm.block_manager.num_hit_blocks >= 3 * (40 // 16)
    assert llm.block_manager.num_free_blocks == llm.runner.num_kv_blocks and not llm.scheduler.has_unfinished()


def dequantized_copy(hf, bits: int):
    """``hf`` with each linear but the head holding its quantized-then-dequantized weight, quantized as the
    engine quantizes it: the float model that a quantized engine computes."""
    from llmfast.nn.quant_linear import QuantLinear

    model = copy.deepcopy(hf)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, torch.nn.Linear) and module is not model.lm_head:
                quantized = QuantLinear.from_linear_auto(module, bits)
                if quantized is not None:
                    module.weight.copy_(quantized.weight_q.dequantize())
    return model


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("quantization", ["int8", "int4"])
def test_quantized_engine_follows_its_dequantized_hf_model_until_a_near_tie(tmp_path, quantization):
    # the Triton quant_matmul kernels inside the engine, against HF holding the weights they compute with
    from llmfast.engine.model_runner import QUANT_BITS
    from llmfast.nn.quant_linear import QuantLinear

    hf = tiny_llama(tmp_path, torch.bfloat16, hidden=256, layers=4)
    peer = dequantized_copy(hf, QUANT_BITS[quantization]).cuda().eval()
    oracle = copy.deepcopy(peer).float().cpu()
    llm = LLM(tmp_path, device="cuda", quantization=quantization)
    assert sum(isinstance(m, QuantLinear) for m in llm.runner.model.modules()) >= 4 * 4  # (fused qkv, o, up, down)
    generate_and_check(llm, random_prompts(PROMPT_LENGTHS, seed=3), peer, oracle)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_seeded_sampling_on_cuda_repeats_and_siblings_differ(tmp_path):
    tiny_llama(tmp_path, torch.bfloat16, hidden=256, layers=4)
    llm = LLM(tmp_path, device="cuda")
    prompts = random_prompts([5, 33], seed=4)
    params = SamplingParams(n=4, temperature=1.0, top_p=0.95, seed=11, max_tokens=12, ignore_eos=True)
    first, again = (llm.generate(prompts, params, use_tqdm=False) for _ in range(2))
    for a, b in zip(first, again):
        assert [c.token_ids for c in a.outputs] == [c.token_ids for c in b.outputs]
        assert len({tuple(c.token_ids) for c in a.outputs}) > 1
        assert all(0 <= t < 384 for c in a.outputs for t in c.token_ids)
    top1 = SamplingParams(temperature=1.0, top_k=1, seed=0, max_tokens=12, ignore_eos=True)
    greedy = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
    sampled, argmax = (llm.generate(prompts, p, use_tqdm=False) for p in (top1, greedy))
    assert [o.outputs[0].token_ids for o in sampled] == [o.outputs[0].token_ids for o in argmax]
