"""Continuous batching: which sequences run in the next forward, and how many of their tokens.

Every step fills one flattened batch of at most ``max_num_batched_tokens`` tokens: first the running
sequences, oldest first (a decode is one token; a prompt still being prefilled takes what budget is left,
so a long prompt is prefilled in chunks), then waiting sequences while budget, blocks and
``max_num_seqs`` allow. When a running sequence needs a block and none is free, the newest running
sequence is preempted: its blocks are freed and it goes back to the front of the queue, to be recomputed
when it runs again (the prefix cache often still holds most of it). Nothing is dropped.
"""
from __future__ import annotations

from collections import deque

from llmfast.engine.block_manager import BlockManager
from llmfast.engine.sequence import Sequence, SequenceStatus

ScheduledBatch = list[tuple[Sequence, int]]  # (sequence, number of its tokens computed in this step)


class Scheduler:
    def __init__(self, block_manager: BlockManager, max_num_seqs: int, max_num_batched_tokens: int):
        self.block_manager = block_manager
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.num_preemptions = 0

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    def schedule(self) -> ScheduledBatch:
        """The sequences of the next forward, each with its count of new tokens (its tokens
        ``num_computed_tokens : num_computed_tokens + count``), running ones first."""
        budget = self.max_num_batched_tokens
        batch: ScheduledBatch = []
        preempted = False
        i = 0
        while i < len(self.running) and budget > 0:
            seq = self.running[i]
            num_new = min(seq.num_tokens - seq.num_computed_tokens, budget)
            while not self.block_manager.can_append(seq, num_new):
                # the victim is the newest running sequence; those before i are already in the batch
                victim = self.running.pop()
                self._preempt(victim)
                preempted = True
                if victim is seq:
                    break
            else:
                self.block_manager.append(seq, num_new)
                batch.append((seq, num_new))
                budget -= num_new
                i += 1
                continue
            break
        # a step that had to preempt admits nobody new: the freed blocks go to the preempted ones first
        while not preempted and self.waiting and budget > 0 and len(self.running) < self.max_num_seqs:
            seq = self.waiting[0]
            hits = self.block_manager.prefix_hits(seq)
            num_new = min(seq.num_tokens - len(hits) * self.block_manager.block_size, budget)
            if not self.block_manager.can_allocate(hits, num_new):
                break
            self.block_manager.allocate(seq, hits, num_new)
            self.waiting.popleft()
            seq.status = SequenceStatus.RUNNING
            self.running.append(seq)
            batch.append((seq, num_new))
            budget -= num_new
        return batch

    def _preempt(self, seq: Sequence) -> None:
        self.block_manager.free(seq)
        seq.status = SequenceStatus.WAITING
        self.waiting.appendleft(seq)
        self.num_preemptions += 1

    def requeue(self, batch: ScheduledBatch) -> None:
        """Puts back a batch whose forward failed (an error, an interrupt): its sequences go back to the
        queue to be recomputed, and the blocks it was filling leave the prefix cache."""
        for seq, _ in batch:
            self.block_manager.unpublish_uncomputed(seq)
        for seq, _ in reversed(batch):
            self.running.remove(seq)
            self._preempt(seq)

    def finish(self, seq: Sequence) -> None:
        """Ends ``seq`` (finished, or aborted while waiting or running) and frees its blocks."""
        if seq.status == SequenceStatus.RUNNING:
            self.running.remove(seq)
            self.block_manager.free(seq)
        elif seq.status == SequenceStatus.WAITING:
            self.waiting.remove(seq)
        seq.status = SequenceStatus.FINISHED
