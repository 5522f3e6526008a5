"""One sequence being generated: its tokens, how many of them sit in the KV cache, and where."""
from __future__ import annotations

import itertools
from enum import Enum, auto

import torch

from llmfast.engine.outputs import Logprob
from llmfast.engine.sampling_params import SamplingParams


class SequenceStatus(Enum):
    WAITING = auto()  # not started, or preempted: holds no KV blocks
    RUNNING = auto()  # holds KV blocks for its first num_computed_tokens tokens
    FINISHED = auto()


class Sequence:
    """The state of one completion of a request (a request with ``n > 1`` has ``n`` sequences).

    ``token_ids`` is the prompt followed by the generated tokens. The first ``num_computed_tokens`` of them
    have their keys and values in the KV cache blocks ``block_table``; the rest are computed in later steps
    (a prompt in chunks, then one token per step). Preemption frees the blocks and sets the count back to
    zero, so the tokens are computed again (the prefix cache may still hold them).
    """

    _ids = itertools.count()

    def __init__(
        self,
        request_id: str,
        index: int,
        prompt_token_ids: list[int],
        params: SamplingParams,
        generator: torch.Generator | None = None,
        prompt: str | None = None,
    ):
        self.seq_id = next(Sequence._ids)
        self.request_id, self.index, self.prompt = request_id, index, prompt
        self.token_ids = list(prompt_token_ids)
        self.num_prompt_tokens = len(prompt_token_ids)
        self.params = params
        self.generator = generator  # per-request RNG (seeded requests); None: the engine's shared one
        self.status = SequenceStatus.WAITING
        self.num_computed_tokens = 0
        self.block_table: list[int] = []
        self.block_hashes: list[int] = []  # prefix hash of each full block of token_ids, filled lazily
        self.cumulative_logprob = 0.0
        self.logprobs: list[dict[int, Logprob]] | None = [] if params.logprobs is not None else None
        self.finish_reason: str | None = None
        self.stop_reason: int | str | None = None
        # incremental detokenisation (vLLM's offsets into token_ids) and the text produced so far
        self.text = ""
        self.prefix_offset = max(self.num_prompt_tokens - 5, 0)
        self.read_offset = self.num_prompt_tokens
        self.held_chars = 0  # text already given out beyond read_offset's (decoded before a character ended)
        # what stream() has handed out already
        self.num_streamed_tokens = 0
        self.num_streamed_chars = 0

    def __repr__(self) -> str:
        return (f"Sequence(id={self.seq_id}, {self.status.name}, tokens={len(self)}, "
                f"computed={self.num_computed_tokens}, blocks={self.block_table})")

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def prompt_token_ids(self) -> list[int]:
        return self.token_ids[: self.num_prompt_tokens]

    @property
    def output_token_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt_tokens:]

    @property
    def num_output_tokens(self) -> int:
        return len(self.token_ids) - self.num_prompt_tokens

    @property
    def is_finished(self) -> bool:
        return self.status == SequenceStatus.FINISHED

    def append_token(self, token_id: int, logprob: float, top_logprobs: dict[int, Logprob] | None) -> None:
        self.token_ids.append(token_id)
        self.cumulative_logprob += logprob
        if self.logprobs is not None:
            self.logprobs.append(top_logprobs or {})
