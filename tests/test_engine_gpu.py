"""The engine in bfloat16 on CUDA against Hugging Face ``generate`` in bfloat16 (both with and without CUDA
graphs). Two correct bf16 implementations round differently, so their greedy tokens may part after a near
tie; the test allows exactly that: every token we pick must be an argmax of the float32 oracle (the same
bf16-rounded weights, computed in float32) within twice HF bf16's own logit error at that step (the 2x rule),
and where HF's tokens part from ours, the two choices must be such a near tie."""
import copy
import os

import pytest
import torch

from llmfast.engine import LLM, SamplingParams

os.environ.setdefault("HF_HUB_OFFLINE", "1")
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


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("enforce_eager", [False, True])
def test_bf16_greedy_follows_hf_generate_until_a_near_tie(tmp_path, enforce_eager):
    peer = tiny_llama(tmp_path, torch.bfloat16, hidden=256, layers=4).cuda().eval()
    oracle = copy.deepcopy(peer).float().cpu()
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(0, 384, (n,), generator=g).tolist() for n in PROMPT_LENGTHS]
    llm = LLM(tmp_path, device="cuda", enforce_eager=enforce_eager)
    params = SamplingParams(temperature=0, max_tokens=MAX_TOKENS, ignore_eos=True)
    outs = llm.generate(prompts, params, use_tqdm=False)
    same = 0
    for prompt, out in zip(prompts, outs):
        ours = out.outputs[0].token_ids
        ids = torch.tensor([prompt], device="cuda")  # with a mask, so that token 0 is not taken for padding
        theirs = peer.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=MAX_TOKENS,
                               min_new_tokens=MAX_TOKENS, pad_token_id=0)[0, len(prompt):].tolist()
        assert len(ours) == len(theirs) == MAX_TOKENS
        check_greedy_against_hf(prompt, ours, theirs, oracle, peer)
        same += ours == theirs
    print(f"{same}/{len(prompts)} prompts gave HF's exact tokens")
