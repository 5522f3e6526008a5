"""The engine's bookkeeping without a model: sampling-parameter checks, the block manager's reference counts
and prefix cache, and the scheduler (chunked prefill, max_num_seqs, preemption) driven by a fake model
that writes token ids into a fake KV cache and checks every context it reads."""
import random

import pytest

from llmfast.engine import BeamSearchParams, SamplingParams
from llmfast.engine.block_manager import BlockManager
from llmfast.engine.scheduler import Scheduler
from llmfast.engine.sequence import Sequence, SequenceStatus

BAD_SAMPLING = [
    dict(n=0), dict(temperature=-0.1), dict(temperature=float("nan")), dict(top_k=-2), dict(top_k=1.5),
    dict(top_p=0.0), dict(top_p=1.1), dict(min_p=-0.1), dict(min_p=1.5), dict(repetition_penalty=0.0),
    dict(presence_penalty=2.5), dict(frequency_penalty=-3.0), dict(max_tokens=0), dict(min_tokens=-1),
    dict(max_tokens=4, min_tokens=5), dict(stop=""), dict(stop=["ok", 3]), dict(stop_token_ids=[-1]),
    dict(seed=1.5), dict(logprobs=-1), dict(ignore_eos="yes"), dict(n=True), dict(stop=3), dict(stop=b"x"),
]


@pytest.mark.parametrize("kwargs", BAD_SAMPLING, ids=[str(k) for k in BAD_SAMPLING])
def test_invalid_sampling_params_raise_at_construction(kwargs):
    name = next(iter(kwargs))
    with pytest.raises(ValueError, match=name):
        SamplingParams(**kwargs)


def test_sampling_params_normalise_and_accept_vllm_values():
    p = SamplingParams(stop="###", top_k=-1, temperature=0, max_tokens=None)
    assert p.stop == ["###"] and p.stop_token_ids == [] and p.greedy
    assert not SamplingParams().greedy
    for kwargs, match in ((dict(beam_width=0, max_tokens=2), r"beam_width: expected an int in \[1, 10\]"),
                          (dict(beam_width=2, max_tokens=0), "max_tokens: expected an int >= 1"),
                          (dict(beam_width=2, max_tokens=2, length_penalty=float("inf")),
                           "length_penalty: expected a finite number, got inf")):
        with pytest.raises(ValueError, match=match):
            BeamSearchParams(**kwargs)
    with pytest.raises(ValueError, match=r"temperature: expected a finite number >= 0.0, got inf"):
        SamplingParams(temperature=float("inf"))


def make_seq(tokens, max_tokens=4, **kwargs):
    return Sequence("0", 0, list(tokens), SamplingParams(max_tokens=max_tokens, **kwargs))


def test_block_manager_reference_counts_prefix_hits_and_freeing():
    bm = BlockManager(num_blocks=8, block_size=4)
    a = make_seq(range(10))
    assert bm.prefix_hits(a) == []
    bm.allocate(a, [], 10)
    assert len(a.block_table) == 3 and bm.num_free_blocks == 5
    assert [bm.blocks[b].ref_count for b in a.block_table] == [1, 1, 1]
    b = make_seq([*range(9), 99])  # shares a's first two full blocks
    hits = bm.prefix_hits(b)
    assert hits == a.block_table[:2]
    bm.allocate(b, hits, 2)
    assert b.num_computed_tokens == 8 and b.block_table[:2] == hits and b.block_table[2] != a.block_table[2]
    assert [bm.blocks[x].ref_count for x in hits] == [2, 2] and bm.num_free_blocks == 4
    assert bm.prefix_hits(make_seq(range(8))) == hits[:1]  # the block of the last token is never shared
    bm.free(a)
    assert [bm.blocks[x].ref_count for x in hits] == [1, 1] and bm.num_free_blocks == 5
    bm.free(b)
    assert bm.num_free_blocks == 8 and all(blk.ref_count == 0 for blk in bm.blocks)
    c = make_seq(range(12))  # freed blocks keep their contents: hits, taken back out of the free list
    hits = bm.prefix_hits(c)
    assert len(hits) == 2 and bm.can_allocate(hits, 4)
    bm.allocate(c, hits, 4)
    assert bm.num_free_blocks == 5 and c.num_computed_tokens == 8


def test_block_manager_evicts_least_recently_freed_and_refuses_when_full():
    bm = BlockManager(num_blocks=4, block_size=2)
    a = make_seq(range(8))
    bm.allocate(a, [], 8)
    a.num_computed_tokens = 8  # as the engine counts them after the forward
    assert not bm.can_append(a, 1) and not bm.can_allocate([], 3)
    bm.free(a)  # tail first: a's last blocks are evicted before its prefix
    other = make_seq([50, 51, 52, 53, 54])
    bm.allocate(other, [], 4)  # takes two free blocks: a's last two
    assert len(bm.prefix_hits(make_seq(range(9)))) == 2
    table = list(other.block_table)
    bm.free(other)
    assert bm.prefix_hits(make_seq([50, 51, 52, 53, 54])) == table


class FakeModel:
    """Writes each scheduled token's id into its slot of a fake KV cache, then checks that every context
    read through the block tables is the sequence's own tokens; the next token is a hash of the context."""

    def __init__(self, num_blocks, block_size, vocab=50):
        self.cache = [None] * (num_blocks * block_size)
        self.block_size, self.vocab = block_size, vocab
        self.tokens_per_step = []

    def step(self, batch):
        bs = self.block_size
        for seq, n in batch:  # every layer writes the whole batch before any attention reads
            for p in range(seq.num_computed_tokens, seq.num_computed_tokens + n):
                self.cache[seq.block_table[p // bs] * bs + p % bs] = seq.token_ids[p]
        sampled = []
        for seq, n in batch:
            end = seq.num_computed_tokens + n
            context = [self.cache[seq.block_table[p // bs] * bs + p % bs] for p in range(end)]
            assert context == seq.token_ids[:end], f"corrupted context of {seq}"
            seq.num_computed_tokens = end
            if end == seq.num_tokens:
                sampled.append((seq, hash(tuple(context)) % self.vocab))
        self.tokens_per_step.append(sum(n for _, n in batch))
        return sampled


def reference_output(prompt, max_tokens, vocab=50):
    tokens = list(prompt)
    for _ in range(max_tokens):
        tokens.append(hash(tuple(tokens)) % vocab)
    return tokens[len(prompt):]


def run_to_completion(scheduler, model, seqs, max_running=None):
    for seq in seqs:
        scheduler.add(seq)
    steps = 0
    while scheduler.has_unfinished():
        batch = scheduler.schedule()
        assert batch, "nothing scheduled although requests are unfinished"
        assert len({id(s) for s, _ in batch}) == len(batch)
        assert all(s.status == SequenceStatus.RUNNING for s, _ in batch)
        if max_running is not None:
            assert len(scheduler.running) <= max_running
        for seq, token in model.step(batch):
            seq.append_token(token, 0.0, None)
            if seq.num_output_tokens == seq.params.max_tokens:
                scheduler.finish(seq)
        check_reference_counts(scheduler)
        steps += 1
    return steps


def check_reference_counts(scheduler):
    bm = scheduler.block_manager
    counts = [0] * len(bm.blocks)
    for seq in scheduler.running:
        for b in seq.block_table:
            counts[b] += 1
    assert counts == [blk.ref_count for blk in bm.blocks]
    assert set(bm.free_blocks) == {i for i, c in enumerate(counts) if c == 0}
    assert all(not s.block_table for s in scheduler.waiting)


@pytest.mark.parametrize("budget", [1, 3, 8, 64])
def test_chunked_prefill_respects_max_num_batched_tokens(budget):
    scheduler = Scheduler(BlockManager(64, 4), max_num_seqs=8, max_num_batched_tokens=budget)
    model = FakeModel(64, 4)
    prompts = [[random.randrange(50) for _ in range(n)] for n in (20, 1, 33, 7)]
    seqs = [make_seq(p, max_tokens=5) for p in prompts]
    run_to_completion(scheduler, model, seqs)
    assert max(model.tokens_per_step) <= budget
    assert [s.output_token_ids for s in seqs] == [reference_output(p, 5) for p in prompts]


def test_max_num_seqs_bounds_the_running_batch():
    scheduler = Scheduler(BlockManager(64, 4), max_num_seqs=2, max_num_batched_tokens=64)
    seqs = [make_seq([i, i + 1, i + 2], max_tokens=3) for i in range(5)]
    run_to_completion(scheduler, FakeModel(64, 4), seqs, max_running=2)
    assert all(s.is_finished and s.num_output_tokens == 3 for s in seqs)


@pytest.mark.parametrize("num_blocks,budget", [(6, 64), (9, 5), (12, 16)])
def test_preemption_under_a_tiny_cache_never_drops_or_corrupts(num_blocks, budget):
    random.seed(num_blocks)
    bm = BlockManager(num_blocks, 4)
    scheduler = Scheduler(bm, max_num_seqs=8, max_num_batched_tokens=budget)
    prompts = [[random.randrange(50) for _ in range(n)] for n in (9, 3, 14, 6, 11, 2)]
    prompts.append(prompts[2][:10] + [1, 2])  # a shared prefix
    seqs = [make_seq(p, max_tokens=8) for p in prompts]
    run_to_completion(scheduler, FakeModel(num_blocks, 4), seqs)
    assert scheduler.num_preemptions > 0
    assert [s.output_token_ids for s in seqs] == [reference_output(p, 8) for p in prompts]
    assert bm.num_free_blocks == num_blocks


def test_shared_prefixes_are_computed_once():
    bm = BlockManager(32, 4)
    scheduler = Scheduler(bm, max_num_seqs=8, max_num_batched_tokens=256)
    model = FakeModel(32, 4)
    prefix = list(range(16))
    seqs = [make_seq(prefix + [40 + i], max_tokens=2) for i in range(4)]
    run_to_completion(scheduler, model, seqs)
    # the first sequence computes 17 prompt tokens; the others take its 4 blocks and compute 1 each
    assert model.tokens_per_step[0] == 17 + 3
    assert [s.output_token_ids for s in seqs] == [reference_output(s.prompt_token_ids, 2) for s in seqs]
