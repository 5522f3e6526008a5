"""LLM after a failure on tiny random checkpoints (float32, CPU): a failed model step, a failed sampling and
an interrupt while queueing leave no block held, nothing queued and no uncomputed block in the prefix cache;
the next requests still get HF's greedy tokens."""
import pytest

from llmfast.engine import LLM
from engine_setup import GREEDY, MAX_TOKENS, hf_greedy, random_prompts

pytest_plugins = ("engine_setup",)  # its fixtures: tokenizer, checkpoints, llama

pytest.importorskip("transformers")


def test_a_failed_step_leaves_no_uncomputed_block_in_the_prefix_cache(checkpoints, monkeypatch):
    folder, hf = checkpoints("llama")
    llm = LLM(folder, device="cpu", block_size=4, num_kv_blocks=256)  # its own: the NaN fill would poison a shared prefix cache
    prompts = random_prompts([3, 6], llm.vocab_size, seed=12, prefix=range(40, 60))
    llm.runner.kv_cache.fill_(float("nan"))  # a block read before it is written poisons the output
    real_run = llm.runner.run

    def interrupted(batch):
        raise KeyboardInterrupt

    monkeypatch.setattr(llm.runner, "run", interrupted)
    with pytest.raises(KeyboardInterrupt):
        llm.generate(prompts, GREEDY, use_tqdm=False)
    assert not llm.scheduler.has_unfinished() and llm.block_manager.num_free_blocks == llm.runner.num_kv_blocks
    monkeypatch.setattr(llm.runner, "run", real_run)
    outs = llm.generate(prompts, GREEDY, use_tqdm=False)
    assert [o.outputs[0].token_ids for o in outs] == [hf_greedy(hf, p)[0] for p in prompts]


def test_a_failed_sampling_puts_its_batch_back_to_be_recomputed(llama, monkeypatch):
    llm, hf = llama
    prompt = random_prompts([7], llm.vocab_size, seed=13)[0]
    real_sampler = llm.sampler
    calls = []

    def fails_once(*args):
        calls.append(1)
        if len(calls) == 2:  # the first decode step
            raise RuntimeError("CUDA error: an illegal memory access was encountered")
        return real_sampler(*args)

    monkeypatch.setattr(llm, "sampler", fails_once)
    seq, = llm.add_request(None, prompt, GREEDY)
    failures = 0
    for _ in range(4 * MAX_TOKENS):
        if not llm.scheduler.has_unfinished():
            break
        try:
            llm.step()
        except RuntimeError:
            failures += 1
            assert seq.num_computed_tokens == 0 and llm.block_manager.num_free_blocks == llm.runner.num_kv_blocks
    assert failures == 1 and seq.output_token_ids == hf_greedy(hf, prompt)[0]


def test_an_interrupt_while_queueing_leaves_nothing_queued(llama, monkeypatch):
    llm, _ = llama
    real_add = llm.add_request
    calls = []

    def add_then_interrupt(*args):
        calls.append(args)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real_add(*args)

    monkeypatch.setattr(llm, "add_request", add_then_interrupt)
    with pytest.raises(KeyboardInterrupt):
        llm.generate([[1, 2], [3, 4], [5, 6]], GREEDY, use_tqdm=False)
    assert not llm.scheduler.has_unfinished() and llm.block_manager.num_free_blocks == llm.runner.num_kv_blocks
