"""What the engine returns (vLLM's RequestOutput, CompletionOutput, BeamSearchOutput): plain data."""
from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class Logprob:
    """One token's log-probability under the model, its rank among the vocabulary (1 = most likely) and
    its text (None without a tokenizer)."""

    logprob: float
    rank: int | None = None
    decoded_token: str | None = None


@dataclass
class CompletionOutput:
    """One of a request's ``n`` completions. ``token_ids`` include the eos or stop token that ended it;
    ``text`` leaves it out, and any stop string. ``finish_reason`` is ``"stop"`` (eos, stop token or stop
    string; ``stop_reason`` says which token or string, None for eos) or ``"length"`` (``max_tokens`` or
    the model's maximum length), None while it runs. ``logprobs``: per token, ``{token_id: Logprob}``,
    only when ``SamplingParams.logprobs`` is set."""

    index: int
    text: str
    token_ids: list[int]
    cumulative_logprob: float | None
    logprobs: list[dict[int, Logprob]] | None
    finish_reason: str | None = None
    stop_reason: int | str | None = None

    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclass
class RequestOutput:
    """The result of one prompt: its ``n`` completions, in index order."""

    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]
    finished: bool = True


@dataclass
class BeamSearchSequence:
    """One beam: ``tokens`` holds the prompt and the generated ids, ``text`` their decoded text."""

    tokens: list[int]
    cum_logprob: float = 0.0
    text: str | None = None
    finish_reason: str | None = None


@dataclass
class BeamSearchOutput:
    """The beams of one prompt, best first."""

    sequences: list[BeamSearchSequence] = field(default_factory=list)
