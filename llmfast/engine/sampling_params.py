"""How to sample one request (vLLM's SamplingParams) and how to beam-search (BeamSearchParams).

Every value is checked at construction, so a bad request fails before anything runs.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

GREEDY_EPS = 1e-5  # temperatures below this are greedy (vLLM's _SAMPLING_EPS)


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


MAX_N = 128  # samples per request (OpenAI's limit): each is a sequence the scheduler holds
MAX_LOGPROBS = 20  # top tokens per step (OpenAI's and vLLM's limit)
MIN_PENALTY = 1e-6  # the smallest repetition_penalty: float32 logits divided by it stay finite


def _check_int(name: str, value: object, low: int, allow_none: bool = False, high: int | None = None) -> None:
    if value is None and allow_none:
        return
    if not _is_int(value) or value < low or (high is not None and value > high):
        bound = f">= {low}" if high is None else f"in [{low}, {high}]"
        raise ValueError(f"{name}: expected an int {bound}{' or None' if allow_none else ''}, got {value!r}")


def _check_float(name: str, value: object, low: float, high: float, *, low_open: bool = False) -> None:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    ok = ok and (value > low if low_open else value >= low) and value <= high
    if not ok:
        if math.isinf(high):  # "in [0.0, inf]" would read as if inf were allowed
            bound = "" if math.isinf(low) else f" {'>' if low_open else '>='} {low}"
            raise ValueError(f"{name}: expected a finite number{bound}, got {value!r}")
        interval = f"{'(' if low_open else '['}{low}, {high}]"
        raise ValueError(f"{name}: expected a number in {interval}, got {value!r}")


@dataclass
class SamplingParams:
    """vLLM's sampling parameters. ``temperature=0`` is greedy; ``top_k`` 0 or -1 disables top-k;
    ``max_tokens=None`` generates up to the model's maximum length; ``stop`` strings end the text (and are
    left out of it); ``logprobs=k`` returns, per generated token, the k most likely tokens and the sampled
    one, from the model's distribution before any penalty or temperature."""

    n: int = 1
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    max_tokens: int | None = 16
    min_tokens: int = 0
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = None
    ignore_eos: bool = False
    seed: int | None = None
    logprobs: int | None = None

    def __post_init__(self) -> None:
        self.verify()

    def verify(self) -> None:
        """Checks every field (ValueError naming it) and makes ``stop``/``stop_token_ids`` lists. Run at
        construction, and again by the engine on each request: a field can be changed after construction."""
        _check_int("n", self.n, 1, high=MAX_N)
        _check_float("temperature", self.temperature, 0.0, math.inf)
        if not _is_int(self.top_k) or self.top_k < -1:
            raise ValueError(f"top_k: expected -1, 0 (both disable top-k) or a positive int, got {self.top_k!r}")
        _check_float("top_p", self.top_p, 0.0, 1.0, low_open=True)
        _check_float("min_p", self.min_p, 0.0, 1.0)
        _check_float("repetition_penalty", self.repetition_penalty, MIN_PENALTY, math.inf)
        _check_float("presence_penalty", self.presence_penalty, -2.0, 2.0)
        _check_float("frequency_penalty", self.frequency_penalty, -2.0, 2.0)
        _check_int("max_tokens", self.max_tokens, 1, allow_none=True)
        _check_int("min_tokens", self.min_tokens, 0)
        if self.max_tokens is not None and self.min_tokens > self.max_tokens:
            raise ValueError(f"min_tokens: expected at most max_tokens={self.max_tokens}, got {self.min_tokens}")
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        if self.stop is not None and not isinstance(self.stop, (list, tuple)):
            raise ValueError(f"stop: expected a non-empty string or a list of them, got {self.stop!r}")
        self.stop = list(self.stop or [])
        if not all(isinstance(s, str) and s for s in self.stop):
            raise ValueError(f"stop: expected a non-empty string or a list of them, got {self.stop!r}")
        if self.stop_token_ids is not None and not isinstance(self.stop_token_ids, (list, tuple)):
            raise ValueError(f"stop_token_ids: expected a list of token ids (ints >= 0), got {self.stop_token_ids!r}")
        self.stop_token_ids = list(self.stop_token_ids or [])
        if not all(_is_int(t) and t >= 0 for t in self.stop_token_ids):
            raise ValueError(f"stop_token_ids: expected a list of token ids (ints >= 0), got {self.stop_token_ids!r}")
        if not isinstance(self.ignore_eos, bool):
            raise ValueError(f"ignore_eos: expected a bool, got {self.ignore_eos!r}")
        # each of the n samples seeds a torch.Generator with seed + index, which must fit in 64 bits
        _check_int("seed", self.seed, -(2**63), allow_none=True, high=2**63 - 1 - self.n)
        _check_int("logprobs", self.logprobs, 0, allow_none=True, high=MAX_LOGPROBS)

    @property
    def greedy(self) -> bool:
        return self.temperature < GREEDY_EPS


@dataclass
class BeamSearchParams:
    """vLLM's beam search: keep the ``beam_width`` most likely sequences, at most ``max_tokens`` new tokens;
    finished beams are ranked by ``cum_logprob / len(tokens) ** length_penalty``."""

    beam_width: int
    max_tokens: int
    ignore_eos: bool = False
    length_penalty: float = 1.0

    def __post_init__(self) -> None:
        # each step reads the 2 * beam_width most likely tokens, within SamplingParams' logprobs limit
        _check_int("beam_width", self.beam_width, 1, high=MAX_LOGPROBS // 2)
        _check_int("max_tokens", self.max_tokens, 1)
        if not isinstance(self.ignore_eos, bool):
            raise ValueError(f"ignore_eos: expected a bool, got {self.ignore_eos!r}")
        _check_float("length_penalty", self.length_penalty, -math.inf, math.inf)
