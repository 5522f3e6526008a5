"""Runs a scheduled batch through the model: flattened inputs, slot mappings and block tables in, the
next-token logits of the sequences that reached their last token out. Owns the model and the KV cache."""
from __future__ import annotations

import contextlib
import os
from pathlib import Path

import torch
from torch import nn

from llmfast.engine.cpu_linear import pack_linears
from llmfast.engine.cuda_graphs import DecodeGraphs
from llmfast.engine.sampler import Sampler
from llmfast.engine.scheduler import ScheduledBatch
from llmfast.engine.sequence import Sequence
from llmfast.models import AttentionMetadata, load_model
from llmfast.nn.quant_linear import QuantLinear, warn_kept_in_full_precision
from llmfast.nn.replace import replace_children
from llmfast.ops._checks import trusted_index_values

QUANT_BITS = {"int8": 8, "int4": 4}
CPU_KV_CACHE_BYTES = 4 << 30  # the most the KV cache takes on CPU without num_kv_blocks (API.md)
CPU_KV_CACHE_RAM_FRACTION = 0.3  # and at most this share of the RAM available when the engine starts


class ModelRunner:
    def __init__(self, path: str | Path, *, dtype, device: torch.device, quantization: str | None, block_size: int,
                 num_kv_blocks: int | None, gpu_memory_utilization: float, max_num_seqs: int,
                 max_num_batched_tokens: int, enforce_eager: bool = False, sampler: Sampler | None = None):
        self.device, self.block_size = device, block_size
        # On CUDA the ops trust the indices this runner builds from its block manager: their value checks
        # would sync with the host a few times per layer. The CPU keeps them (no syncs; tests catch bugs).
        self.check_index_values = device.type == "cpu"
        self.model = load_model(path, dtype=dtype, device=device)
        if not hasattr(self.model, "compute_logits"):
            raise ValueError(f"model: {type(self.model).__name__} is not a decoder; the engine generates text "
                             "with causal language models only")
        if quantization is not None:
            _quantize_linears(self.model, QUANT_BITS[quantization])
        self.dtype = self.model.lm_head.weight.dtype
        if device.type == "cpu":
            pack_linears(self.model)
        cfg = self.model.config
        self.vocab_size = cfg.vocab_size
        # llmfast's attention has no sliding-window mask, so a model with a window is limited to it
        window = getattr(cfg, "sliding_window", None)
        self.max_model_len = min(cfg.max_position_embeddings, window or 1 << 62)
        self.max_model_len_source = (
            f"the model's sliding window {window} (llmfast's attention has no sliding-window mask)"
            if window and window < cfg.max_position_embeddings else f"the model's maximum length {self.max_model_len}")
        self.num_kv_blocks = num_kv_blocks or self._default_num_blocks(
            gpu_memory_utilization, max_num_seqs, max_num_batched_tokens, sampler)
        # one tensor (2, layers, blocks, block_size, kv_heads, head_dim); each layer gets views of it. On CPU
        # it stays uninitialised (no page is touched before it is used): only written slots are ever read.
        shape = (2, cfg.num_layers, self.num_kv_blocks, block_size, cfg.num_kv_heads, cfg.head_dim)
        alloc = torch.empty if device.type == "cpu" else torch.zeros
        self.kv_cache = alloc(shape, dtype=self.dtype, device=device)
        self.kv_caches = [(self.kv_cache[0, i], self.kv_cache[1, i]) for i in range(cfg.num_layers)]
        self.graphs = None
        if device.type == "cuda" and not enforce_eager:
            max_len = min(self.max_model_len, self.num_kv_blocks * block_size)
            self.graphs = DecodeGraphs(self.model, self.kv_caches, max_num_seqs=max_num_seqs,
                                       max_blocks_per_seq=-(-max_len // block_size), max_model_len=max_len,
                                       device=device)

    def _block_bytes(self) -> int:
        cfg = self.model.config
        elem = torch.empty((), dtype=self.dtype).element_size()
        return 2 * cfg.num_layers * self.block_size * cfg.num_kv_heads * cfg.head_dim * elem

    def _default_num_blocks(self, gpu_memory_utilization: float, max_num_seqs: int, max_num_batched_tokens: int,
                            sampler: Sampler | None) -> int:
        if self.device.type == "cuda":
            budget = self._cuda_kv_budget(gpu_memory_utilization, max_num_seqs, max_num_batched_tokens, sampler)
            if budget < self._block_bytes():
                raise ValueError(f"gpu_memory_utilization={gpu_memory_utilization} leaves no memory for the KV "
                                 "cache after the weights and activations; raise it or lower max_num_batched_tokens")
        else:
            available = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
            budget = min(CPU_KV_CACHE_BYTES, int(available * CPU_KV_CACHE_RAM_FRACTION))
        # no more than every running sequence at full length can use (a small model on a large GPU would
        # otherwise get millions of blocks, each a Python object in the block manager)
        useful = max_num_seqs * -(-self.max_model_len // self.block_size)
        return max(1, min(budget // self._block_bytes(), useful))

    def _cuda_kv_budget(self, gpu_memory_utilization: float, max_num_seqs: int, max_num_batched_tokens: int,
                        sampler: Sampler | None) -> int:
        """Bytes left for the KV cache: the utilisation share of the GPU, minus what is in use and the peak
        of a step of max_num_batched_tokens tokens sampling max_num_seqs of them (nano-vllm's profile run;
        the sampler with every rule on, as vLLM's)."""
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(self.device)
        num_tokens = min(max_num_batched_tokens, 1 << 16)
        seq_len = min(num_tokens, self.max_model_len)
        lengths = [seq_len] * (num_tokens // seq_len) or [num_tokens]
        ids = torch.zeros(sum(lengths), dtype=torch.int64, device=self.device)
        positions = torch.cat([torch.arange(n, device=self.device) for n in lengths])
        with torch.inference_mode():
            hidden = self.model(ids, positions, AttentionMetadata.prefill(lengths, self.device))
            logits = self.model.compute_logits(hidden[:max_num_seqs])
            del hidden
            if sampler is not None:
                sampler.profile(logits)
            del logits
        # give the step's blocks back to the GPU: mem_get_info would count them in use, and the peak again
        torch.cuda.synchronize(self.device)
        torch.cuda.empty_cache()
        free, total = torch.cuda.mem_get_info(self.device)
        stats = torch.cuda.memory_stats(self.device)
        current, peak = stats["allocated_bytes.all.current"], stats["allocated_bytes.all.peak"]
        return int(total * gpu_memory_utilization - (total - free) - peak + current)

    @torch.inference_mode()
    def run(self, batch: ScheduledBatch) -> tuple[torch.Tensor | None, list[Sequence]]:
        """One forward over ``batch``; returns ``(logits (num_sampled, vocab), sampled sequences)`` for the
        sequences whose every token is computed after this step (those in mid-prompt are not sampled)."""
        ids, positions, slots, block_tables, context_lens, counts = [], [], [], [], [], []
        sample_rows, sampled = [], []
        size = self.block_size
        for seq, num_new in batch:
            start, end = seq.num_computed_tokens, seq.num_computed_tokens + num_new
            ids.extend(seq.token_ids[start:end])
            positions.extend(range(start, end))
            table = seq.block_table
            slots.extend(table[p // size] * size + p % size for p in range(start, end))
            block_tables.append(table)
            context_lens.append(end)
            counts.append(num_new)
            if end == seq.num_tokens:
                sample_rows.append(len(ids) - 1)
                sampled.append(seq)
        tensor = lambda values: torch.tensor(values, dtype=torch.int64, device=self.device)  # noqa: E731
        if self._replays(counts, block_tables):
            hidden = self.graphs.run(ids, positions, slots, block_tables, context_lens)  # (tokens, hidden)
        else:
            meta = self._metadata(batch, slots, block_tables, context_lens, counts)
            with contextlib.nullcontext() if self.check_index_values else trusted_index_values():
                hidden = self.model(tensor(ids), tensor(positions), meta, self.kv_caches)  # (tokens, hidden)
        if not sampled:
            return None, []
        if len(sample_rows) == len(ids):  # decode: every row is sampled
            return self.model.compute_logits(hidden), sampled
        return self.model.compute_logits(hidden[tensor(sample_rows)]), sampled

    def _replays(self, counts: list[int], block_tables: list[list[int]]) -> bool:
        """Whether this step is a decode (one token per sequence) that a captured CUDA graph can run."""
        return (self.graphs is not None and all(n == 1 for n in counts)
                and self.graphs.fits(len(counts), max(len(t) for t in block_tables)))

    def _metadata(self, batch, slots, block_tables, context_lens, counts) -> AttentionMetadata:
        slot_mapping = torch.tensor(slots, dtype=torch.int64, device=self.device)
        if all(seq.num_computed_tokens == 0 for seq, _ in batch):  # whole or first chunks: no cached context
            return AttentionMetadata.prefill(counts, self.device, slot_mapping=slot_mapping)
        width = max(len(t) for t in block_tables)
        padded = [t + [0] * (width - len(t)) for t in block_tables]  # entries past a context are never read
        decode = all(n == 1 for n in counts)
        cu_seqlens_q = None
        if not decode:
            offsets = [0]
            for n in counts:
                offsets.append(offsets[-1] + n)
            cu_seqlens_q = torch.tensor(offsets, dtype=torch.int32, device=self.device)
        return AttentionMetadata(
            cu_seqlens_q=cu_seqlens_q,
            max_seqlen_q=None if decode else max(counts),
            slot_mapping=slot_mapping,
            block_tables=torch.tensor(padded, dtype=torch.int32, device=self.device),
            context_lens=torch.tensor(context_lens, dtype=torch.int32, device=self.device),
            max_context_len=max(context_lens),
        )


def _quantize_linears(model: nn.Module, bits: int) -> None:
    """Swaps every ``nn.Linear`` but the output head (often tied to the embedding) for a ``QuantLinear``; warns
    about those int4 cannot pack."""
    kept: list[int] = []  # in_features of the layers int4 cannot pack

    def build(child: nn.Module) -> QuantLinear | None:
        if not isinstance(child, nn.Linear) or child is model.lm_head:
            return None
        layer = QuantLinear.from_linear_auto(child, bits)
        if layer is None:
            kept.append(child.in_features)
        return layer

    replace_children(model, build)
    warn_kept_in_full_precision(kept, bits, "quantization")
