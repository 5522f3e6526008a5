"""LLM.beam_search on tiny random checkpoints (float32, CPU): width 1 equals greedy, wider beams score as the
sum of HF's log-probabilities, eos and length_penalty rank finished beams, ignore_eos and the model's
maximum length end them."""
import json
import shutil

import pytest
import torch

from llmfast.engine import LLM, BeamSearchParams, SamplingParams
from engine_setup import GREEDY, random_prompts

pytest_plugins = ("engine_setup",)  # its fixtures: tokenizer, checkpoints, llama

pytest.importorskip("transformers")


def test_beam_search_with_eos_length_penalty_and_ignore_eos(llama, tmp_path, checkpoints):
    """With an eos the beams meet: finished beams rank by cum_logprob / len ** length_penalty (vLLM's
    formula, a final eos not counted); ignore_eos=True grows every beam to max_tokens."""
    from llmfast.engine.beam_search import beam_score

    llm, _ = llama
    prompt = random_prompts([7], llm.vocab_size, seed=15)[0]
    greedy = llm.generate([prompt], GREEDY, use_tqdm=False)[0].outputs[0].token_ids
    folder = tmp_path / "eos"
    shutil.copytree(checkpoints("llama")[0], folder)
    (folder / "generation_config.json").write_text(json.dumps({"eos_token_id": greedy[1]}))
    eos_llm = LLM(folder, device="cpu", num_kv_blocks=128)
    for penalty in (0.0, 1.0, 2.0):
        beams = eos_llm.beam_search([prompt], BeamSearchParams(beam_width=4, max_tokens=6,
                                                               length_penalty=penalty))[0].sequences
        assert any(b.finish_reason == "stop" and b.tokens[-1] == greedy[1] for b in beams)
        scores = [beam_score(b, eos_llm.eos_token_ids, penalty) for b in beams]
        assert scores == sorted(scores, reverse=True)
    beams = eos_llm.beam_search([prompt], BeamSearchParams(beam_width=4, max_tokens=6, ignore_eos=True))[0].sequences
    assert all(len(b.tokens) == len(prompt) + 6 and b.finish_reason == "length" for b in beams)
    assert any(greedy[1] in b.tokens[len(prompt):] for b in beams)


def test_beams_that_reach_the_maximum_length_finish_with_length(checkpoints, tmp_path):
    """A beam stopped by the model's length (16 here) before max_tokens ends with "length" (it had None)."""
    folder = tmp_path / "short"
    shutil.copytree(checkpoints("llama")[0], folder)
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "max_position_embeddings": 16}))
    llm = LLM(folder, device="cpu", block_size=4, num_kv_blocks=32)
    assert llm.max_model_len == 16
    prompt = random_prompts([14], llm.vocab_size, seed=16)[0]
    beams = llm.beam_search([prompt], BeamSearchParams(beam_width=2, max_tokens=5, ignore_eos=True))[0].sequences
    assert len(beams) == 2 and all(len(b.tokens) == 16 for b in beams)
    assert [b.finish_reason for b in beams] == ["length", "length"]


def test_beam_search(llama, tokenizer):
    llm, hf = llama
    prompts = random_prompts([3, 12], llm.vocab_size, seed=6)
    greedy = llm.generate(prompts, SamplingParams(temperature=0, max_tokens=6), use_tqdm=False)
    single = llm.beam_search(prompts, BeamSearchParams(beam_width=1, max_tokens=6))
    for prompt, g, b in zip(prompts, greedy, single):
        assert b.sequences[0].tokens == prompt + g.outputs[0].token_ids
        assert b.sequences[0].cum_logprob == pytest.approx(g.outputs[0].cumulative_logprob, abs=1e-4)
    wide = llm.beam_search(prompts, BeamSearchParams(beam_width=3, max_tokens=4, length_penalty=0.0))
    for prompt, out in zip(prompts, wide):
        beams = out.sequences
        assert len(beams) == 3 and len({tuple(b.tokens) for b in beams}) == 3
        scores = [b.cum_logprob for b in beams]
        assert scores == sorted(scores, reverse=True)
        for beam in beams:  # each score is the sum of HF's log-probabilities along the beam
            with torch.no_grad():
                ref = torch.log_softmax(hf(torch.tensor([beam.tokens])).logits[0].float(), dim=-1)
            n = len(prompt)
            expected = sum(ref[i - 1, beam.tokens[i]].item() for i in range(n, len(beam.tokens)))
            assert beam.cum_logprob == pytest.approx(expected, abs=1e-3)
            assert beam.tokens[:n] == prompt and beam.text == tokenizer.decode(beam.tokens)
