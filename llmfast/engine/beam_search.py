"""Beam search as vLLM's ``LLM.beam_search`` does it: each step extends every live beam of every prompt in
one ``generate`` call (one token, its ``2 * beam_width`` most likely successors as logprobs); the prefix
cache keeps each beam's earlier tokens from being computed again."""
from __future__ import annotations

from typing import TYPE_CHECKING

from llmfast.engine.outputs import BeamSearchOutput, BeamSearchSequence
from llmfast.engine.sampling_params import BeamSearchParams, SamplingParams

if TYPE_CHECKING:
    from llmfast.engine.llm import LLM


def beam_score(beam: BeamSearchSequence, eos_token_ids: set[int], length_penalty: float) -> float:
    """``cum_logprob / len ** length_penalty``, the length counting the prompt but not a final eos (vLLM)."""
    length = len(beam.tokens) - (beam.tokens[-1] in eos_token_ids)
    return beam.cum_logprob / (length**length_penalty)


def run_beam_search(llm: LLM, prompts: list[list[int]], params: BeamSearchParams) -> list[BeamSearchOutput]:
    """The ``params.beam_width`` best beams of each prompt (token ids, already validated), best first."""
    width = params.beam_width
    step_params = SamplingParams(temperature=0.0, max_tokens=1, logprobs=2 * width)
    eos = set() if params.ignore_eos else llm.eos_token_ids

    def score(beam: BeamSearchSequence) -> float:
        return beam_score(beam, eos, params.length_penalty)

    live = [[BeamSearchSequence(tokens=list(ids))] for ids in prompts]
    done: list[list[BeamSearchSequence]] = [[] for _ in prompts]
    for _ in range(params.max_tokens):
        for beams, finished in zip(live, done):  # a beam as long as the engine allows cannot grow
            for beam in beams:
                if len(beam.tokens) >= llm.max_model_len:
                    beam.finish_reason = "length"
                    finished.append(beam)
            beams[:] = [b for b in beams if b.finish_reason is None]
        flat = [beam for beams in live for beam in beams]
        if not flat:
            break
        outputs = iter(llm.generate([b.tokens for b in flat], step_params, use_tqdm=False))
        for i, beams in enumerate(live):
            candidates = []
            for beam in beams:
                for token, logprob in next(outputs).outputs[0].logprobs[0].items():
                    candidate = BeamSearchSequence(tokens=beam.tokens + [token],
                                                   cum_logprob=beam.cum_logprob + logprob.logprob)
                    if token in eos:
                        candidate.finish_reason = "stop"
                        done[i].append(candidate)
                    else:
                        candidates.append(candidate)
            live[i] = sorted(candidates, key=score, reverse=True)[:width]
    results = []
    for beams, finished in zip(live, done):
        for beam in beams:
            beam.finish_reason = beam.finish_reason or "length"
        best = sorted(finished + beams, key=score, reverse=True)[:width]
        for beam in best:
            beam.text = None if llm.tokenizer is None else llm.tokenizer.decode(beam.tokens)
        results.append(BeamSearchOutput(sequences=best))
    return results
