"""LLM end to end on tiny random checkpoints (float32, CPU) against Hugging Face transformers: greedy
tokens equal ``generate(do_sample=False)`` for every family, also under preemption, chunked prefill and
shared prefixes, and up to a sliding window; the eager path that trusts the runner's index values keeps them
(sampling options: test_engine_sampling_params.py; beams: test_engine_beam_search.py; streaming:
test_engine_stream.py; input checks: test_engine_request_checks.py, test_engine_arguments.py; failures:
test_engine_failures.py; the text, stops and detokenisation: test_engine_text.py)."""
import threading
import traceback

import pytest
import torch

from llmfast.engine import LLM
from llmfast.ops._checks import trusted_index_values, values_readable
from engine_setup import FAMILIES, GREEDY, PROMPT_LENGTHS, hf_greedy, random_prompts

pytest_plugins = ("engine_setup",)  # its fixtures: tokenizer, checkpoints, llama

transformers = pytest.importorskip("transformers")


SCENARIOS = {  # engine arguments, prompts
    "default": (dict(), dict(lengths=PROMPT_LENGTHS)),
    "preemption": (dict(num_kv_blocks=24, block_size=4), dict(lengths=PROMPT_LENGTHS)),
    "chunked": (dict(max_num_batched_tokens=7, block_size=8), dict(lengths=PROMPT_LENGTHS)),
    "shared_prefix": (dict(block_size=4, num_kv_blocks=48), dict(lengths=[1, 3, 9, 20], prefix=range(5, 30))),
}


@pytest.mark.parametrize("scenario", list(SCENARIOS))
@pytest.mark.parametrize("family", list(FAMILIES))
def test_greedy_matches_hf(checkpoints, family, scenario):
    folder, hf = checkpoints(family)
    engine_args, prompt_args = SCENARIOS[scenario]
    llm = LLM(folder, device="cpu", **engine_args)
    prompts = random_prompts(vocab=llm.vocab_size, **prompt_args)
    outs = llm.generate(prompts, GREEDY, use_tqdm=False)
    for prompt, out in zip(prompts, outs):
        assert out.prompt_token_ids == prompt
        assert out.outputs[0].token_ids == hf_greedy(hf, prompt)[0], f"prompt of {len(prompt)} tokens"
        assert out.outputs[0].finish_reason == "length"
    if scenario == "preemption":
        assert llm.scheduler.num_preemptions > 0
    if scenario == "shared_prefix":
        assert llm.block_manager.num_hit_blocks >= 3 * (25 // 4)
    assert llm.block_manager.num_free_blocks == llm.runner.num_kv_blocks and not llm.scheduler.has_unfinished()


def test_a_sliding_window_bounds_the_sequence(tmp_path, tokenizer):
    """llmfast's attention has no sliding-window mask: a Mistral with a window shorter than its maximum
    length equals HF up to the window, ends there with "length", and refuses a longer prompt naming it."""
    config = transformers.AutoConfig.for_model(**dict(FAMILIES["mistral"], sliding_window=8),
                                               vocab_size=len(tokenizer))
    torch.manual_seed(0)
    hf = transformers.AutoModelForCausalLM.from_config(config).eval()
    hf.save_pretrained(tmp_path)
    llm = LLM(tmp_path, device="cpu", num_kv_blocks=16)
    prompt = random_prompts([5], llm.vocab_size, seed=11)[0]
    out = llm.generate([prompt], GREEDY, use_tqdm=False)[0].outputs[0]
    assert out.token_ids == hf_greedy(hf, prompt, 3)[0] and out.finish_reason == "length"
    with pytest.raises(ValueError, match="sliding window 8"):
        llm.generate([prompt * 2], GREEDY, use_tqdm=False)


def test_trusted_index_values_read_nothing_back_and_keep_the_tokens(checkpoints, monkeypatch):
    """The engine's eager path on a GPU, run here: the ops trust the runner's indices, so no check reads a
    value back to the host (each read would be a device sync per layer), through chunked prefill,
    preemption and decode, and the greedy tokens stay HF's. (The CPU's prefill runs the reference
    attention, which reads cu_seqlens to loop over the sequences; a GPU runs the Triton kernel.)"""
    folder, hf = checkpoints("llama")
    llm = LLM(folder, device="cpu", block_size=4, num_kv_blocks=24, max_num_batched_tokens=7)
    llm.runner.check_index_values = False  # as on CUDA
    reads, trusted = [], []
    for method in ("tolist", "item", "__int__", "__bool__"):
        original = getattr(torch.Tensor, method)

        def recording(self, *args, _original=original, _method=method):
            caller = next((f for f in reversed(traceback.extract_stack()) if "/llmfast/" in f.filename), None)
            if not values_readable() and caller and not caller.name.endswith("_reference"):
                reads.append(f"{_method} in {caller.name} ({caller.filename}:{caller.lineno})")
            return _original(self, *args)

        monkeypatch.setattr(torch.Tensor, method, recording)
    forward = llm.runner.model.forward

    def spy(*args, **kwargs):
        trusted.append(not values_readable())
        return forward(*args, **kwargs)

    monkeypatch.setattr(llm.runner.model, "forward", spy)
    prompts = random_prompts(PROMPT_LENGTHS, llm.vocab_size)
    outs = llm.generate(prompts, GREEDY, use_tqdm=False)
    monkeypatch.undo()
    assert [o.outputs[0].token_ids for o in outs] == [hf_greedy(hf, p)[0] for p in prompts]
    assert trusted and all(trusted) and llm.scheduler.num_preemptions > 0
    assert reads == []


def test_trusted_index_values_hold_on_their_own_thread_only():
    seen = []
    with trusted_index_values():
        worker = threading.Thread(target=lambda: seen.append(values_readable()))
        worker.start()
        worker.join()
        assert not values_readable()
    assert values_readable() and seen == [True]
