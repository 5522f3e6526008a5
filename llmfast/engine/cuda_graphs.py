"""CUDA graphs of the decode step (one new token per sequence), captured once per batch size in a ladder and
replayed for any batch up to the largest, padded to the next captured size (nano-vllm's scheme).

A captured step reads its inputs from static buffers the runner fills before each replay. Capture cannot
host-sync, so while a stream captures the ops check dtypes and shapes only (``values_readable`` is false):
the eager warm-up before each capture runs the same ops on the same buffers, validating their values.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from llmfast.backends import resolve
from llmfast.models.layers import KVCache
from llmfast.models.metadata import AttentionMetadata

MAX_GRAPH_BATCH = 512  # larger decode batches run eagerly: their launch overhead is small next to the math
GRAPH_SAFE_BACKENDS = ("triton", "cuda")  # the reference backends call .tolist(), which capture forbids


def capture_sizes(max_num_seqs: int) -> list[int]:
    """1, 2, 4, 8, then every multiple of 16 up to ``max_num_seqs`` (capped), and the cap itself: a batch pads
    by at most 15 rows, and a full batch has its own graph."""
    cap = min(max_num_seqs, MAX_GRAPH_BATCH)
    sizes = [s for s in (1, 2, 4, 8) if s <= cap] + list(range(16, cap + 1, 16))
    return sizes if sizes[-1] == cap else sizes + [cap]


def check_graph_safe(device: torch.device) -> None:
    """Raises unless ``write_kv_cache`` and ``paged_attention`` select, on ``device``, backends that never sync."""
    for op in ("write_kv_cache", "paged_attention"):
        backend = resolve(op, "auto", device)
        if backend not in GRAPH_SAFE_BACKENDS:
            raise RuntimeError(
                f"CUDA graphs need a {' or '.join(GRAPH_SAFE_BACKENDS)} backend for {op}, but {backend!r} is the "
                "one selected here (it syncs with the host); pass enforce_eager=True (the CLI's --enforce-eager) "
                "to run without CUDA graphs"
            )


class DecodeGraphs:
    """Decode-step graphs sharing one memory pool, over static inputs:

    ``input_ids, positions, slot_mapping`` int64 ``(max_batch,)``, ``block_tables`` int32
    ``(max_batch, max_blocks_per_seq)``, ``context_lens`` int32 ``(max_batch,)``, and the output
    ``hidden (max_batch, hidden_size)``. Padding rows write nowhere (slot -1) and attend over one token of
    block 0, so every read stays inside the cache; their outputs are dropped.
    """

    def __init__(self, model: nn.Module, kv_caches: Sequence[KVCache], *, max_num_seqs: int,
                 max_blocks_per_seq: int, max_model_len: int, device: torch.device):
        self.model, self.kv_caches, self.max_model_len = model, kv_caches, max_model_len
        self.batch_sizes = capture_sizes(max_num_seqs)
        max_batch = self.batch_sizes[-1]
        ints = dict(dtype=torch.int64, device=device)
        self.input_ids = torch.zeros(max_batch, **ints)
        self.positions = torch.zeros(max_batch, **ints)
        self.slot_mapping = torch.full((max_batch,), -1, **ints)
        self.block_tables = torch.zeros(max_batch, max_blocks_per_seq, dtype=torch.int32, device=device)
        self.context_lens = torch.ones(max_batch, dtype=torch.int32, device=device)
        # the model's dtype is the cache's (its linear layers may hold their weights in another form)
        self.hidden = torch.empty(max_batch, model.config.hidden_size, dtype=kv_caches[0][0].dtype, device=device)
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.num_replays = 0
        try:
            check_graph_safe(device)
            self._capture_all()
        except Exception as e:
            raise RuntimeError(f"capturing the decode step in CUDA graphs failed ({type(e).__name__}: {e}); "
                               "pass enforce_eager=True (the CLI's --enforce-eager) to run every step eagerly") from e

    @property
    def max_batch(self) -> int:
        return self.batch_sizes[-1]

    def _meta(self, batch: int) -> AttentionMetadata:
        return AttentionMetadata(
            slot_mapping=self.slot_mapping[:batch], block_tables=self.block_tables[:batch],
            context_lens=self.context_lens[:batch],
            max_context_len=self.max_model_len,  # a bound for every replay; only sliding-window checks read it
        )

    def _forward(self, batch: int) -> None:
        self.hidden[:batch] = self.model(self.input_ids[:batch], self.positions[:batch], self._meta(batch),
                                         self.kv_caches)

    @torch.inference_mode()
    def _capture_all(self) -> None:
        pool = None
        # largest first: the shared pool grows to the biggest step once, and the smaller ones reuse it
        for batch in reversed(self.batch_sizes):
            self._forward(batch)  # warm-up: the ops validate the buffers' values; kernels compile and tune
            self.graphs[batch] = self._capture(batch, pool)
            pool = self.graphs[batch].pool() if pool is None else pool

    def _capture(self, batch: int, pool) -> torch.cuda.CUDAGraph:
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=pool):
            self._forward(batch)
        return graph

    def fits(self, batch: int, max_blocks: int) -> bool:
        """Whether a decode of ``batch`` sequences whose longest block table has ``max_blocks`` blocks replays."""
        return batch <= self.max_batch and max_blocks <= self.block_tables.shape[1]

    def run(self, input_ids: list[int], positions: list[int], slots: list[int], block_tables: list[list[int]],
            context_lens: list[int]) -> torch.Tensor:
        """Replays the smallest graph that holds the batch; returns ``hidden (batch, hidden_size)`` (a view of
        the static output, valid until the next replay)."""
        batch = len(input_ids)
        size = next(s for s in self.batch_sizes if s >= batch)
        as_ints = lambda values: torch.tensor(values, dtype=torch.int64)  # noqa: E731
        self.input_ids[:batch] = as_ints(input_ids)
        self.positions[:batch] = as_ints(positions)
        self.slot_mapping[:batch] = as_ints(slots)
        self.slot_mapping[batch:size] = -1
        width = max(len(t) for t in block_tables)
        # entries past a context (stale ones from earlier steps included) are never read
        padded = [t + [0] * (width - len(t)) for t in block_tables]
        self.block_tables[:batch, :width] = torch.tensor(padded, dtype=torch.int32)
        self.block_tables[batch:size, 0] = 0
        self.context_lens[:batch] = torch.tensor(context_lens, dtype=torch.int32)
        self.context_lens[batch:size] = 1
        self.graphs[size].replay()
        self.num_replays += 1
        return self.hidden[:batch]
