"""Turns each sequence's next-token logits into a token, every rule applied to the whole batch at once.

Order (as vLLM and Hugging Face): log-probabilities of the raw model output (what ``logprobs`` and
``cumulative_logprob`` report), then min_tokens (eos and stop tokens banned), repetition, frequency and
presence penalties, then greedy rows take the argmax; the others divide by the temperature, keep the
top-k, the top-p nucleus and the tokens above min_p times the most likely one's probability, and sample.
Sampling is an exponential race, ``argmax(probs / E)`` with ``E ~ Exp(1)``: a seeded request draws its
``E`` from its own generator, one row per token, so its tokens do not depend on the rest of the batch.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from llmfast.engine.outputs import Logprob
from llmfast.engine.sampling_params import SamplingParams
from llmfast.engine.sequence import Sequence

# every rule on at once: the sampler's largest working set, for the engine's memory profile
PROFILE_PARAMS = SamplingParams(temperature=1.0, top_k=50, top_p=0.9, min_p=0.05, repetition_penalty=1.1,
                                presence_penalty=0.1, frequency_penalty=0.1, logprobs=20)


@dataclass
class SamplerOutput:
    token_ids: list[int]  # one per row
    logprobs: list[float]  # the sampled token's log-probability under the raw model output
    top_logprobs: list[dict[int, Logprob] | None]  # for rows whose request asked for logprobs


class Sampler:
    def __init__(self, device: torch.device, seed: int):
        self.device = device
        self.generator = torch.Generator(device=device).manual_seed(seed)  # for requests without a seed

    def __call__(self, logits: torch.Tensor, seqs: list[Sequence], eos_token_ids: set[int]) -> SamplerOutput:
        """``logits (num_seqs, vocab)``, row ``i`` for ``seqs[i]``'s next token."""
        raw = logits.float()  # the model output; _penalize copies before it changes anything
        logits = self._penalize(raw, seqs, eos_token_ids)
        params = [seq.params for seq in seqs]
        greedy = torch.tensor([p.greedy for p in params], device=self.device)
        tokens = logits.argmax(dim=-1)  # (num_seqs,)
        if not greedy.all():
            temperature = torch.tensor([1.0 if p.greedy else p.temperature for p in params], device=self.device)
            probs = self._filtered_probs(logits / temperature[:, None], params)
            tokens = torch.where(greedy, tokens, self._race(probs, seqs))
        # one fused kernel: logsumexp, then a subtraction and a gather, took ~1.5x as long on CPU (32 x 32k)
        raw_logprobs = torch.log_softmax(raw, dim=-1)  # (num_seqs, vocab)
        sampled = raw_logprobs.gather(1, tokens[:, None])[:, 0]  # (num_seqs,)
        top = self._top_logprobs(raw_logprobs, tokens, sampled, params)
        return SamplerOutput(tokens.tolist(), sampled.tolist(), top)

    def profile(self, logits: torch.Tensor) -> None:
        """Samples ``logits (rows, vocab)`` once with every rule on, so that a memory profile around this call
        sees the sampler's largest working set; the shared generator is left as it was."""
        seqs = [Sequence("profile", 0, [0], PROFILE_PARAMS) for _ in range(logits.shape[0])]
        state = self.generator.get_state()
        self(logits, seqs, set())
        self.generator.set_state(state)

    def _penalize(self, logits: torch.Tensor, seqs: list[Sequence], eos_token_ids: set[int]) -> torch.Tensor:
        num_seqs, vocab = logits.shape
        under_min = [row for row, seq in enumerate(seqs) if seq.num_output_tokens < seq.params.min_tokens]
        if under_min:  # few rows at most
            logits = logits.clone()
        for row in under_min:
            p = seqs[row].params
            banned = set(p.stop_token_ids) | (set() if p.ignore_eos else eos_token_ids)
            logits[row, [t for t in banned if t < vocab]] = float("-inf")
        params = [seq.params for seq in seqs]
        if all(p.repetition_penalty == 1.0 for p in params) and all(
            p.presence_penalty == 0.0 and p.frequency_penalty == 0.0 for p in params
        ):
            return logits
        output_counts = self._token_counts([seq.output_token_ids for seq in seqs], vocab)  # (num_seqs, vocab)
        prompt_seen = self._token_counts([seq.prompt_token_ids for seq in seqs], vocab) > 0
        seen = prompt_seen | (output_counts > 0)
        # repetition penalty on prompt and output tokens (HF, vLLM): shrink positive logits, grow negative
        rep = torch.tensor([p.repetition_penalty for p in params], device=self.device)[:, None]
        penalized = torch.where(logits > 0, logits / rep, logits * rep)
        logits = torch.where(seen, penalized, logits)
        # OpenAI's frequency and presence penalties count output tokens only
        freq = torch.tensor([p.frequency_penalty for p in params], device=self.device)[:, None]
        presence = torch.tensor([p.presence_penalty for p in params], device=self.device)[:, None]
        return logits - freq * output_counts - presence * (output_counts > 0)

    def _token_counts(self, token_lists: list[list[int]], vocab: int) -> torch.Tensor:
        """``(len(token_lists), vocab)`` float: how often each token occurs in each list."""
        width = max((len(t) for t in token_lists), default=0)
        padded = torch.full((len(token_lists), width + 1), vocab, dtype=torch.int64)  # vocab: padding column
        for row, tokens in enumerate(token_lists):
            padded[row, : len(tokens)] = torch.tensor(tokens, dtype=torch.int64)
        padded = padded.to(self.device)
        counts = torch.zeros(len(token_lists), vocab + 1, device=self.device)
        counts.scatter_add_(1, padded, torch.ones_like(padded, dtype=counts.dtype))
        return counts[:, :vocab]

    def _filtered_probs(self, logits: torch.Tensor, params: list) -> torch.Tensor:
        """Softmax of ``logits (num_seqs, vocab)`` over each row's top-k, top-p and min-p support."""
        vocab = logits.shape[-1]
        top_k = torch.tensor([p.top_k if 0 < p.top_k < vocab else vocab for p in params], device=self.device)
        top_p = torch.tensor([p.top_p for p in params], device=self.device)
        if (top_k < vocab).any() or (top_p < 1.0).any():
            sorted_logits, order = logits.sort(dim=-1, descending=True)  # (num_seqs, vocab)
            ranks = torch.arange(vocab, device=self.device)[None, :]
            sorted_logits = sorted_logits.masked_fill(ranks >= top_k[:, None], float("-inf"))
            sorted_probs = sorted_logits.softmax(dim=-1)
            # keep the smallest prefix whose mass reaches top_p: a token stays if the mass before it is short
            mass_before = sorted_probs.cumsum(dim=-1) - sorted_probs
            # (rows with top_p = 1 skip it: rounding can push the cumulative mass of the tail past 1)
            outside = (mass_before >= top_p[:, None]) & (top_p[:, None] < 1.0)
            outside[:, 0] = False  # the most likely token always stays (a top_p that rounds to 0 in float32)
            sorted_logits = sorted_logits.masked_fill(outside, float("-inf"))
            logits = torch.empty_like(logits).scatter_(1, order, sorted_logits)
        probs = logits.softmax(dim=-1)
        min_p = torch.tensor([p.min_p for p in params], device=self.device)
        if (min_p > 0).any():
            probs = probs.masked_fill(probs < min_p[:, None] * probs.max(dim=-1, keepdim=True).values, 0.0)
        return probs

    def _race(self, probs: torch.Tensor, seqs: list[Sequence]) -> torch.Tensor:
        """One token per row of ``probs (num_seqs, vocab)``: ``argmax(probs / E)``, ``E ~ Exp(1)``."""
        race = torch.empty_like(probs).exponential_(generator=self.generator)
        for row, seq in enumerate(seqs):
            if seq.generator is not None and not seq.params.greedy:
                race[row].exponential_(generator=seq.generator)
        # E = 0 would turn a zero probability into 0/0 = NaN, which argmax takes for the largest
        return (probs / race.clamp_min(torch.finfo(probs.dtype).tiny)).argmax(dim=-1)

    def _top_logprobs(self, raw_logprobs, tokens, sampled, params) -> list[dict[int, Logprob] | None]:
        wanted = [p.logprobs for p in params]
        if all(k is None for k in wanted):
            return [None] * len(params)
        k_max = min(max(k or 0 for k in wanted), raw_logprobs.shape[-1])
        top_values, top_ids = raw_logprobs.topk(k_max, dim=-1)  # (num_seqs, k_max), sorted
        sampled_rank = (raw_logprobs > sampled[:, None]).sum(dim=-1) + 1  # (num_seqs,)
        top_values, top_ids, sampled_rank = top_values.tolist(), top_ids.tolist(), sampled_rank.tolist()
        tokens, sampled = tokens.tolist(), sampled.tolist()
        out: list[dict[int, Logprob] | None] = []
        for row, k in enumerate(wanted):
            if k is None:
                out.append(None)
                continue
            entry = {tokens[row]: Logprob(sampled[row], sampled_rank[row])}
            for rank, (token, value) in enumerate(zip(top_ids[row][:k], top_values[row][:k]), start=1):
                entry.setdefault(token, Logprob(value, rank))
            out.append(entry)
        return out
