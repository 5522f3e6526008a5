"""The sampler on given logits: greedy, seeded reproducibility whatever the batch, the top-k / top-p /
min-p support sets, penalties (against Hugging Face's processors and OpenAI's formula), min_tokens and
logprobs."""
import math

import pytest
import torch

from llmfast.engine import SamplingParams
from llmfast.engine.sampler import Sampler
from llmfast.engine.sequence import Sequence

VOCAB = 32
EOS = 3


def seq(params, prompt=(1, 2), output=(), seed=None):
    generator = None if seed is None else torch.Generator().manual_seed(seed)
    s = Sequence("0", 0, list(prompt), params, generator)
    for t in output:
        s.append_token(t, 0.0, None)
    return s


def sample(logits, seqs, sampler=None):
    return (sampler or Sampler(torch.device("cpu"), seed=0))(logits, seqs, {EOS})


def draws(logits_row, params, count=400):
    """Tokens of ``count`` independent rows sampled from one logits row."""
    seqs = [seq(params) for _ in range(count)]
    return sample(logits_row.expand(count, -1).clone(), seqs).token_ids


def test_greedy_is_argmax_and_mixes_with_sampled_rows():
    logits = torch.randn(4, VOCAB)
    params = [SamplingParams(temperature=0), SamplingParams(temperature=1.0), SamplingParams(temperature=0),
              SamplingParams(temperature=0.7, top_k=5)]
    out = sample(logits, [seq(p) for p in params])
    assert out.token_ids[0] == logits[0].argmax() and out.token_ids[2] == logits[2].argmax()
    assert out.token_ids[3] in logits[3].topk(5).indices.tolist()


@pytest.mark.parametrize("kwargs, expected", [
    (dict(temperature=1.0), [0.5, 0.3, 0.15, 0.05]),
    (dict(temperature=0.5), [0.25, 0.09, 0.0225, 0.0025]),  # p ** 2, renormalised below
    (dict(temperature=1.0, top_k=2), [0.5, 0.3, 0, 0]),
    (dict(temperature=1.0, top_p=0.85), [0.5, 0.3, 0.15, 0]),
])
def test_sampled_frequencies_follow_the_distribution(kwargs, expected):
    """Not only the support: each token's frequency over 20000 draws is its probability after temperature
    and filtering (within 5 standard deviations)."""
    count = 20000
    logits = torch.full((VOCAB,), -math.inf)
    logits[[10, 11, 12, 13]] = torch.tensor([0.5, 0.3, 0.15, 0.05]).log()
    tokens = torch.tensor(draws(logits, SamplingParams(**kwargs), count=count))
    frequencies = torch.bincount(tokens - 10, minlength=4).double() / count
    probs = torch.tensor(expected, dtype=torch.float64) / sum(expected)
    sigma = (probs * (1 - probs) / count).sqrt()
    assert ((frequencies - probs).abs() <= 5 * sigma + 1e-9).all(), (frequencies.tolist(), probs.tolist())


def test_seeded_rows_do_not_depend_on_the_rest_of_the_batch():
    torch.manual_seed(0)
    row = torch.randn(VOCAB)
    params = SamplingParams(temperature=1.0, seed=7)

    def run(batch_size, position, other_seeds):
        # one sequence per step, its generator carried along, as the engine does
        mine = seq(params, seed=7)
        tokens = []
        sampler = Sampler(torch.device("cpu"), seed=batch_size)
        for _ in range(6):
            logits = torch.randn(batch_size, VOCAB)
            logits[position] = row
            others = [seq(SamplingParams(temperature=0.9, top_p=0.9), seed=s) for s in other_seeds]
            seqs = others[:position] + [mine] + others[position:]
            tokens.append(sample(logits, seqs, sampler).token_ids[position])
        return tokens

    alone = run(1, 0, [])
    assert run(5, 3, [None, 1, None, 2]) == alone
    assert run(3, 0, [7, None]) == alone
    assert len(set(alone)) > 1  # it did sample


@pytest.mark.parametrize("kwargs,support", [
    (dict(top_k=3), {0, 1, 2}),
    (dict(top_p=0.7), {0, 1}),
    (dict(top_p=0.85), {0, 1, 2}),
    (dict(min_p=0.5), {0, 1}),  # p >= 0.5 * 0.5
    (dict(top_k=3, top_p=0.6), {0, 1}),
    (dict(top_k=-1), {0, 1, 2, 3}),
    (dict(top_p=1e-50), {0}),  # rounds to 0 in float32: the most likely token still stays
])
def test_top_k_top_p_min_p_support_sets(kwargs, support):
    probs = torch.tensor([0.5, 0.3, 0.15, 0.05])
    logits = torch.full((VOCAB,), -math.inf)
    logits[[10, 11, 12, 13]] = probs.log()
    tokens = draws(logits, SamplingParams(temperature=1.0, **kwargs))
    assert {t - 10 for t in tokens} == support


def test_temperature_sharpens_and_flattens():
    logits = torch.zeros(VOCAB)
    logits[:2] = torch.tensor([1.0, 0.0])
    cold = draws(logits, SamplingParams(temperature=0.05))
    hot = draws(logits, SamplingParams(temperature=100.0), count=2000)
    assert set(cold) == {0}
    assert len(set(hot)) > VOCAB // 2


def test_repetition_penalty_matches_hugging_face():
    transformers = pytest.importorskip("transformers")
    logits = torch.randn(2, VOCAB)
    prompt, output = [1, 5, 9], [9, 4]
    sampler = Sampler(torch.device("cpu"), seed=0)
    seqs = [seq(SamplingParams(repetition_penalty=1.3), prompt, output),
            seq(SamplingParams(repetition_penalty=0.8), prompt, output)]
    ours = sampler._penalize(logits.clone(), seqs, {EOS})
    for row, penalty in enumerate((1.3, 0.8)):
        processor = transformers.RepetitionPenaltyLogitsProcessor(penalty)
        ref = processor(torch.tensor([prompt + output]), logits[row:row + 1].clone())
        torch.testing.assert_close(ours[row], ref[0])


def test_frequency_and_presence_penalties_count_output_tokens_only():
    logits = torch.randn(1, VOCAB)
    prompt, output = [6, 6, 7], [7, 7, 8]
    params = SamplingParams(frequency_penalty=0.5, presence_penalty=0.25)
    ours = Sampler(torch.device("cpu"), seed=0)._penalize(logits.clone(), [seq(params, prompt, output)], {EOS})
    expected = logits.clone()
    expected[0, 7] -= 2 * 0.5 + 0.25
    expected[0, 8] -= 0.5 + 0.25
    torch.testing.assert_close(ours, expected)


def test_min_tokens_bans_eos_and_stop_tokens_until_reached():
    logits = torch.zeros(3, VOCAB)
    logits[:, EOS] = 10.0
    logits[:, 20] = 9.0
    logits[:, 21] = 8.0
    params = SamplingParams(temperature=0, min_tokens=2, stop_token_ids=[20])
    early, late = seq(params, output=[1]), seq(params, output=[1, 2])
    ignoring = seq(SamplingParams(temperature=0, min_tokens=2, ignore_eos=True), output=[1])
    assert sample(logits, [early, late, ignoring]).token_ids == [21, EOS, EOS]


def test_logprobs_are_the_raw_log_softmax_with_ranks():
    logits = torch.randn(2, VOCAB)
    params = [SamplingParams(temperature=0.8, logprobs=3, presence_penalty=1.0), SamplingParams(temperature=0)]
    out = sample(logits, [seq(params[0], output=[int(logits[0].argmax())]), seq(params[1])])
    ref = torch.log_softmax(logits, dim=-1)
    for row in range(2):
        assert out.logprobs[row] == pytest.approx(ref[row, out.token_ids[row]].item(), abs=1e-6)
    top = out.top_logprobs[0]
    order = ref[0].argsort(descending=True).tolist()
    assert set(order[:3]) <= set(top) and len(top) in (3, 4)
    for token, entry in top.items():
        assert entry.logprob == pytest.approx(ref[0, token].item(), abs=1e-6)
        assert entry.rank == order.index(token) + 1
    assert out.top_logprobs[1] is None


@pytest.mark.parametrize("kwargs, match", [
    (dict(n=129), r"n: expected an int in \[1, 128\]"),  # each sample is a sequence the scheduler holds
    (dict(seed=2**64), "seed"),  # would overflow the 64-bit generator seed once the request runs
    (dict(n=2, seed=2**63 - 2), "seed"),  # seed + index for the second sample
    (dict(logprobs=21), r"logprobs: expected an int in \[0, 20\]"),
    (dict(stop_token_ids=5), "stop_token_ids"),
    (dict(repetition_penalty=1e-50), "repetition_penalty"),  # float32 logits divided by it overflow
])
def test_sampling_params_bounds_are_checked_at_construction(kwargs, match):
    with pytest.raises(ValueError, match=match):
        SamplingParams(**kwargs)
    SamplingParams(n=128, seed=-(2**63), logprobs=20, stop_token_ids=(3, 4))


def test_beam_width_is_bounded_by_the_logprobs_each_step_reads():
    from llmfast.engine import BeamSearchParams

    BeamSearchParams(beam_width=10, max_tokens=2)
    with pytest.raises(ValueError, match=r"beam_width: expected an int in \[1, 10\]"):
        BeamSearchParams(beam_width=11, max_tokens=2)


def test_profile_samples_with_every_rule_and_leaves_the_generator_alone():
    sampler = Sampler(torch.device("cpu"), seed=0)
    state = sampler.generator.get_state()
    sampler.profile(torch.randn(8, VOCAB))
    assert torch.equal(sampler.generator.get_state(), state)  # unseeded requests draw as if it never ran
