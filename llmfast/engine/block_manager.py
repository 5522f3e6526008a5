"""The paged KV cache's bookkeeping: which blocks each sequence holds, and which full blocks can be shared.

Blocks are reference counted. A block that fills up is published under the hash of its tokens and of all
the tokens before it (vLLM's prefix caching), so a later sequence with the same prefix takes the block
instead of computing it again. A full block is never written again, so sharing needs no copy-on-write.
Freed blocks keep their contents and hash until they are handed out again, least recently freed first.
"""
from __future__ import annotations

from collections import OrderedDict

from llmfast.engine.sequence import Sequence


class Block:
    def __init__(self, block_id: int):
        self.block_id = block_id
        self.ref_count = 0
        self.hash: int | None = None  # set while the block is published in the prefix cache
        self.token_ids: tuple[int, ...] = ()  # the tokens it was published with (to rule out hash collisions)


class BlockManager:
    """``num_blocks`` blocks of ``block_size`` token slots each (slot = block_id * block_size + offset)."""

    def __init__(self, num_blocks: int, block_size: int):
        self.block_size = block_size
        self.blocks = [Block(i) for i in range(num_blocks)]
        self.free_blocks: OrderedDict[int, None] = OrderedDict.fromkeys(range(num_blocks))  # front: evicted first
        self.cached: dict[int, int] = {}  # prefix hash -> block id
        self.num_hit_blocks = 0  # blocks taken from the prefix cache instead of being computed

    @property
    def num_free_blocks(self) -> int:
        return len(self.free_blocks)

    def _blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def _hashes(self, seq: Sequence, num_blocks: int) -> list[int]:
        """The prefix hashes of ``seq``'s first ``num_blocks`` blocks (which must be full)."""
        size = self.block_size
        for i in range(len(seq.block_hashes), num_blocks):
            prev = seq.block_hashes[-1] if seq.block_hashes else None
            seq.block_hashes.append(hash((prev, tuple(seq.token_ids[i * size:(i + 1) * size]))))
        return seq.block_hashes[:num_blocks]

    def prefix_hits(self, seq: Sequence) -> list[int]:
        """The cached blocks that hold ``seq``'s leading full blocks, in order. The block of its last
        token is never taken: that token must be computed to get logits, and a shared block is read-only."""
        hits = []
        for i, h in enumerate(self._hashes(seq, (seq.num_tokens - 1) // self.block_size)):
            block_id = self.cached.get(h)
            size = self.block_size
            if block_id is None or self.blocks[block_id].token_ids != tuple(seq.token_ids[i * size:(i + 1) * size]):
                break
            hits.append(block_id)
        return hits

    def can_allocate(self, hits: list[int], num_new_tokens: int) -> bool:
        """Whether a sequence without blocks can take ``hits`` and room for ``num_new_tokens`` more."""
        needed = self._blocks_for(len(hits) * self.block_size + num_new_tokens) - len(hits)
        hits_now_free = sum(1 for b in hits if self.blocks[b].ref_count == 0)
        return needed <= self.num_free_blocks - hits_now_free

    def allocate(self, seq: Sequence, hits: list[int], num_new_tokens: int) -> None:
        """Gives a sequence without blocks the cached ``hits`` (its first tokens count as computed) and
        room for ``num_new_tokens`` more."""
        assert not seq.block_table and seq.num_computed_tokens == 0, seq
        for block_id in hits:
            block = self.blocks[block_id]
            if block.ref_count == 0:
                del self.free_blocks[block_id]
            block.ref_count += 1
        seq.block_table = list(hits)
        self.num_hit_blocks += len(hits)
        seq.num_computed_tokens = len(hits) * self.block_size
        self.append(seq, num_new_tokens)

    def can_append(self, seq: Sequence, num_new_tokens: int) -> bool:
        """Whether there are blocks for ``seq``'s next ``num_new_tokens`` tokens."""
        needed = self._blocks_for(seq.num_computed_tokens + num_new_tokens) - len(seq.block_table)
        return needed <= self.num_free_blocks

    def append(self, seq: Sequence, num_new_tokens: int) -> None:
        """Adds the blocks that ``seq``'s next ``num_new_tokens`` tokens need, and publishes the blocks
        those tokens fill. Publishing before the tokens are computed is safe: a sequence that takes the
        block in this same step reads it in the same forward, where every layer writes the new keys
        before any attention reads them."""
        end = seq.num_computed_tokens + num_new_tokens
        for _ in range(self._blocks_for(end) - len(seq.block_table)):
            seq.block_table.append(self._take_free_block())
        size = self.block_size
        full = end // size
        hashes = self._hashes(seq, full)
        for i in range(seq.num_computed_tokens // size, full):
            block = self.blocks[seq.block_table[i]]
            if block.hash is None and hashes[i] not in self.cached:
                block.hash, block.token_ids = hashes[i], tuple(seq.token_ids[i * size:(i + 1) * size])
                self.cached[block.hash] = block.block_id

    def free(self, seq: Sequence) -> None:
        """Releases ``seq``'s blocks (last block first, so a prefix outlives its tail in the cache)."""
        for block_id in reversed(seq.block_table):
            block = self.blocks[block_id]
            block.ref_count -= 1
            if block.ref_count == 0:
                self.free_blocks[block_id] = None
        seq.block_table = []
        seq.num_computed_tokens = 0

    def unpublish_uncomputed(self, seq: Sequence) -> None:
        """Withdraws from the prefix cache the blocks of ``seq`` past its computed tokens: published in
        advance by ``append`` for a forward that did not complete."""
        for block_id in seq.block_table[seq.num_computed_tokens // self.block_size:]:
            block = self.blocks[block_id]
            if block.hash is not None:
                del self.cached[block.hash]
                block.hash, block.token_ids = None, ()

    def _take_free_block(self) -> int:
        block_id, _ = self.free_blocks.popitem(last=False)
        block = self.blocks[block_id]
        if block.hash is not None:  # evict its old contents from the prefix cache
            del self.cached[block.hash]
            block.hash, block.token_ids = None, ()
        block.ref_count = 1
        return block_id
