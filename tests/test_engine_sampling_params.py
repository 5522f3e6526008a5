"""SamplingParams end to end on tiny random checkpoints (float32, CPU): generation-config defaults (against
HF's generate), min_tokens, logprobs equal to HF's log-softmax, and seeded requests and n > 1 independent of
the batch (the sampler on given logits: test_engine_sampler.py)."""
import json
import shutil

import pytest
import torch

from llmfast.engine import LLM, SamplingParams
from engine_setup import GREEDY, MAX_TOKENS, hf_greedy, random_prompts

pytest_plugins = ("engine_setup",)  # its fixtures: tokenizer, checkpoints, llama

pytest.importorskip("transformers")


def test_no_sampling_params_takes_the_generation_config_defaults(checkpoints, tmp_path, tokenizer):
    """sampling_params=None: SamplingParams with generation_config.json's sampling fields, as vLLM; here a
    greedy one with a repetition penalty, which HF's generate applies too (it was ignored)."""
    folder, hf = checkpoints("llama")
    shutil.copytree(folder, tmp_path / "model")
    config = {"eos_token_id": tokenizer.eos_token_id, "temperature": 0.0, "repetition_penalty": 1.5,
              "max_new_tokens": 7, "do_sample": False}
    (tmp_path / "model" / "generation_config.json").write_text(json.dumps(config))
    llm = LLM(tmp_path / "model", device="cpu", num_kv_blocks=64)
    defaults = llm.get_default_sampling_params()
    assert (defaults.temperature, defaults.repetition_penalty, defaults.max_tokens) == (0.0, 1.5, 7)
    prompt = random_prompts([6], llm.vocab_size, seed=13)[0]
    expected = hf.generate(torch.tensor([prompt]), do_sample=False, max_new_tokens=7, repetition_penalty=1.5,
                           eos_token_id=tokenizer.eos_token_id, pad_token_id=0)[0, len(prompt):].tolist()
    assert llm.generate([prompt], use_tqdm=False)[0].outputs[0].token_ids == expected
    assert expected != hf_greedy(hf, prompt, 7)[0]  # the penalty changed the tokens
    (tmp_path / "model" / "generation_config.json").write_text(json.dumps({"top_p": 5.0}))
    with pytest.raises(ValueError, match="generation_config.json: top_p"):
        LLM(tmp_path / "model", num_kv_blocks=64)


def test_min_tokens_defers_stops(llama):
    llm, _ = llama
    prompt = random_prompts([6], llm.vocab_size, seed=4)[0]
    first = llm.generate([prompt], GREEDY, use_tqdm=False)[0].outputs[0].token_ids[0]
    out = llm.generate([prompt], SamplingParams(temperature=0, max_tokens=MAX_TOKENS, stop_token_ids=[first],
                                                min_tokens=3), use_tqdm=False)[0].outputs[0]
    assert first not in out.token_ids[:3] and len(out.token_ids) >= 3
    assert out.finish_reason == "length" or (out.token_ids[-1] == first and out.finish_reason == "stop")


def test_logprobs_equal_hf_log_softmax(llama, tokenizer):
    llm, hf = llama
    prompts = random_prompts([5, 30], llm.vocab_size, seed=5)
    outs = llm.generate(prompts, SamplingParams(temperature=0, max_tokens=8, ignore_eos=True, logprobs=4),
                        use_tqdm=False)
    for prompt, out in zip(prompts, outs):
        tokens, ref = hf_greedy(hf, prompt, 8)
        completion = out.outputs[0]
        assert completion.token_ids == tokens and len(completion.logprobs) == 8
        for step, entries in enumerate(completion.logprobs):
            assert set(entries) == set(ref[step].topk(4).indices.tolist())
            for token, entry in entries.items():
                assert entry.logprob == pytest.approx(ref[step, token].item(), abs=1e-4)
                assert entry.decoded_token == tokenizer.decode([token], skip_special_tokens=True)
        assert completion.cumulative_logprob == pytest.approx(ref[range(8), tokens].sum().item(), abs=1e-3)


def test_seeded_requests_and_n_do_not_depend_on_the_batch(llama):
    llm, _ = llama
    prompt = random_prompts([21], llm.vocab_size, seed=8)[0]
    params = SamplingParams(n=3, temperature=1.0, seed=1234, max_tokens=10, ignore_eos=True)
    hits_before = llm.block_manager.num_hit_blocks
    alone = llm.generate([prompt], params, use_tqdm=False)[0]
    assert [c.index for c in alone.outputs] == [0, 1, 2]
    assert llm.block_manager.num_hit_blocks - hits_before >= 2 * (20 // 4)  # siblings share the prompt's blocks
    others = random_prompts([4, 40, 9], llm.vocab_size, seed=9)
    mixed = llm.generate([others[0], prompt, others[1], others[2]],
                         [SamplingParams(temperature=0.7), params, SamplingParams(seed=1), GREEDY], use_tqdm=False)
    assert [c.token_ids for c in mixed[1].outputs] == [c.token_ids for c in alone.outputs]
    assert len({tuple(c.token_ids) for c in alone.outputs}) > 1
