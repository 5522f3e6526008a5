"""Inputs shared by the paged-op tests (test_paged*.py): random tensors, sequences stored in shuffled blocks of
NaN-poisoned caches with their per-sequence reference, and valid argument sets that a test changes one of."""
import math

import torch

from helpers import DEVICE, attention_ref

DTYPES = [torch.float16, torch.bfloat16, torch.float32]
BLOCK_SIZES = [1, 8, 16, 32]


def _randn(*shape, dtype=torch.float32):
    return torch.randn(*shape, dtype=dtype, device=DEVICE)


def _paged_cache(contexts, block_size, kv_heads, head_dim, dtype):
    """Per-sequence keys/values stored in shuffled blocks of NaN-poisoned caches.

    Returns ``(k_seqs, v_seqs, k_cache, v_cache, block_tables)``. Slots past each context, spare blocks and
    the padding entries of ``block_tables`` (which point at a spare block) all hold NaN, so any read of
    them shows up in the output.
    """
    blocks_per_seq = [math.ceil(n / block_size) for n in contexts]
    num_blocks = sum(blocks_per_seq) + 2
    block_ids = torch.randperm(num_blocks).tolist()
    spare = block_ids.pop()
    max_blocks = max(blocks_per_seq) + 1
    block_tables = torch.full((len(contexts), max_blocks), spare, dtype=torch.int32)
    shape = (num_blocks, block_size, kv_heads, head_dim)
    k_cache = torch.full(shape, float("nan"), dtype=dtype, device=DEVICE)
    v_cache = torch.full(shape, float("nan"), dtype=dtype, device=DEVICE)
    k_seqs, v_seqs = [], []
    for i, n in enumerate(contexts):
        k_seqs.append(_randn(n, kv_heads, head_dim, dtype=dtype))
        v_seqs.append(_randn(n, kv_heads, head_dim, dtype=dtype))
        for j in range(blocks_per_seq[i]):
            block = block_ids.pop()
            block_tables[i, j] = block
            tokens = slice(j * block_size, min((j + 1) * block_size, n))
            used = tokens.stop - tokens.start
            k_cache[block, :used] = k_seqs[i][tokens]
            v_cache[block, :used] = v_seqs[i][tokens]
    return k_seqs, v_seqs, k_cache, v_cache, block_tables.to(DEVICE)


def _paged_ref(q_seqs, k_seqs, v_seqs, *, upcast):
    """Each sequence's queries attend causally (bottom-right) over its whole contiguous context."""
    outs = [
        attention_ref(q[None], k[None], v[None], causal=True, upcast=upcast)[0]
        for q, k, v in zip(q_seqs, k_seqs, v_seqs)
    ]
    return torch.cat(outs)


def _write_args(**changes):
    args = dict(
        k=_randn(5, 2, 32), v=_randn(5, 2, 32), k_cache=_randn(4, 8, 2, 32), v_cache=_randn(4, 8, 2, 32),
        slot_mapping=torch.tensor([0, 3, -1, 31, 8]),
    )
    return {**args, **changes}


def _paged_args(**changes):
    """Two sequences of 20 and 9 tokens in a cache of 6 blocks of 8; row 1's padding entry is -1."""
    args = dict(
        q=_randn(2, 4, 32), k_cache=_randn(6, 8, 2, 32), v_cache=_randn(6, 8, 2, 32),
        block_tables=torch.tensor([[0, 3, 5], [2, 1, -1]], dtype=torch.int32),
        context_lens=torch.tensor([20, 9], dtype=torch.int32),
    )
    return {**args, **changes}


def _chunked_args(**changes):
    args = dict(q=_randn(7, 4, 32), cu_seqlens_q=torch.tensor([0, 4, 7], dtype=torch.int32))
    return _paged_args(**{**args, **changes})


def _int32(*values):
    return torch.tensor(values, dtype=torch.int32)
