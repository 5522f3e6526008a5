"""One engine loop for every HTTP connection: continuous batching across requests.

A single asyncio task owns the ``LLM``. Between two steps it admits the requests whose prompts are
tokenized (checking them, so a bad prompt is refused before anything runs) and applies aborts; each step
runs on the engine's worker thread (the forward releases the GIL, so the event loop keeps serving
connections meanwhile); after a step, the new pieces of every running request go to that request's asyncio
queue. Only this task and that thread touch the engine and its tokenizer (which detokenizes each step;
the chat handler only renders a chat template with it, which runs no tokenizing).

A prompt is tokenized as soon as it arrives, on a second thread with a copy of the tokenizer of its own (a
Hugging Face fast tokenizer used from two threads at once fails: "Already borrowed"), so steps go on while
a megabyte prompt is tokenized. That thread tokenizes one request at a time in arrival order, and each
request is admitted at the first step boundary after its tokenizing ended.
"""
from __future__ import annotations

import asyncio
import copy
import logging
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from functools import partial
from typing import AsyncIterator

from llmfast.engine import LLM, CompletionOutput, SamplingParams
from llmfast.engine.llm_engine import encode_text
from llmfast.engine.sequence import Sequence

logger = logging.getLogger("llmfast.server")


@dataclass(eq=False)
class Request:
    """One HTTP request: its prompts (strings or token ids), all sampled with ``params``."""

    prompts: list[str | list[int]]
    params: SamplingParams
    add_special_tokens: bool
    admitted: asyncio.Future  # set once checked and queued; raises ValueError for a bad prompt
    tokenizing: asyncio.Future | None = None  # its tokenizing on the tokenizing thread
    tokenized: list | Exception | None = None  # (text, token ids) per prompt, or why tokenizing failed
    # max_tokens is the model's default, not the body's: each prompt takes at most what the model's length
    # leaves it (vLLM's rule), instead of being refused as too long
    cap_max_tokens: bool = False
    queue: asyncio.Queue = field(default_factory=asyncio.Queue)  # (prompt index, CompletionOutput), then None
    prompt_token_ids: list[list[int]] = field(default_factory=list)
    seqs: list[list[Sequence]] = field(default_factory=list)  # per prompt, its n sequences
    done: set[int] = field(default_factory=set)  # seq ids whose last piece was queued
    aborted: bool = False

    @property
    def finished(self) -> bool:
        return bool(self.seqs) and len(self.done) == sum(len(group) for group in self.seqs)


class AsyncEngine:
    def __init__(self, llm: LLM):
        self.llm = llm
        self._pending: list[Request] = []  # arrived, not admitted yet
        self._aborts: list[Request] = []
        self._running: list[Request] = []
        self._wake = asyncio.Event()
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="llmfast-engine")
        self._tokenizing = ThreadPoolExecutor(max_workers=1, thread_name_prefix="llmfast-tokenize")
        self._tokenizer = None  # the tokenizing thread's own, copied by start()
        self._task: asyncio.Task | None = None
        self.num_aborted = 0  # requests ended early because their client went away
        self.peak_running_seqs = 0  # the largest batch of running sequences seen (continuous batching at work)

    def start(self) -> None:
        try:
            self._tokenizer = copy.deepcopy(self.llm.tokenizer)  # the engine's own is the engine thread's
        except Exception as exc:  # a tokenizer that cannot be copied tokenizes on the engine thread, between steps
            logger.warning("the tokenizer cannot be copied (%s): prompts are tokenized between engine steps", exc)
            self._tokenizer, self._tokenizing = self.llm.tokenizer, self._executor
        self._task = asyncio.get_running_loop().create_task(self._loop(), name="llmfast-engine-loop")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        self._tokenizing.shutdown(wait=True, cancel_futures=True)  # nothing will admit what it tokenizes
        self._executor.shutdown(wait=True)  # a step under way ends before the engine goes away

    async def add(self, prompts: list[str | list[int]], params: SamplingParams,
                  add_special_tokens: bool = True, cap_max_tokens: bool = False) -> Request:
        """Queues a request and waits until the engine loop has checked and admitted it. Raises
        ValueError (the message names the prompt) for an empty, unknown-token or too long prompt.
        ``cap_max_tokens``: ``params.max_tokens`` is a default that each prompt may shorten to fit."""
        loop = asyncio.get_running_loop()
        request = Request(prompts, params, add_special_tokens, admitted=loop.create_future(),
                          cap_max_tokens=cap_max_tokens)
        self._pending.append(request)
        request.tokenizing = loop.run_in_executor(self._tokenizing, self._tokenize_request, request)
        request.tokenizing.add_done_callback(partial(self._tokenized, request))
        try:
            await request.admitted
        except asyncio.CancelledError:  # the client left before its request was admitted
            self.abort(request)
            raise
        return request

    async def results(self, request: Request) -> AsyncIterator[tuple[int, CompletionOutput]]:
        """The request's new pieces as they come: ``(prompt index, CompletionOutput)`` whose ``text`` and
        ``token_ids`` hold only what is new; the last piece of each completion has ``finish_reason``."""
        while (item := await request.queue.get()) is not None:
            if isinstance(item, Exception):
                raise item
            yield item

    def abort(self, request: Request) -> None:
        """Ends ``request`` (a no-op once it finished): its sequences and KV blocks are freed between steps."""
        if not request.aborted and not request.finished:
            request.aborted = True
            request.tokenizing.cancel()  # a tokenizing not begun yet never runs (one under way ends unheeded)
            self._aborts.append(request)
            self._wake.set()

    async def _loop(self) -> None:
        loop = asyncio.get_running_loop()
        scheduler = self.llm.scheduler
        while True:
            self._admit()
            if not scheduler.has_unfinished():
                # nothing to step: sleep until a tokenizing ends or an abort comes (both set the event on the
                # event loop, so never between this _admit and the clear: no wake-up is lost)
                self._wake.clear()
                await self._wake.wait()
                continue
            try:
                await loop.run_in_executor(self._executor, self.llm.step)
            except Exception as exc:  # the engine's fault, not a client's: fail what runs, keep serving
                logger.exception("engine step failed")
                self._fail_running(RuntimeError(f"the engine failed: {exc}"))
                continue
            self.peak_running_seqs = max(self.peak_running_seqs, len(scheduler.running))
            self._publish()

    def _admit(self) -> None:
        for request in self._aborts:
            if request in self._running:
                self._running.remove(request)
                self.llm.abort([seq for group in request.seqs for seq in group])
                request.queue.put_nowait(None)
                self.num_aborted += 1
        self._aborts.clear()
        pending, self._pending = self._pending, []
        for request in pending:
            if request.aborted:
                continue
            if request.tokenized is None:  # still being tokenized: next time round
                self._pending.append(request)
                continue
            try:
                if isinstance(request.tokenized, Exception):
                    raise request.tokenized
                checked = self.llm.check_requests(request.tokenized, [request.params] * len(request.prompts))
                if request.cap_max_tokens:
                    checked = [(text, ids, self._fit(params, len(ids))) for text, ids, params in checked]
                for _, ids, params in checked:
                    self._check_length(ids, params.max_tokens)
                request.prompt_token_ids = [ids for _, ids, _ in checked]
                for text, ids, params in checked:
                    request.seqs.append(self.llm.add_request(text, ids, params))
            except Exception as exc:
                self.llm.abort([seq for group in request.seqs for seq in group])
                if not isinstance(exc, ValueError):  # a bug of ours: this request fails, the loop keeps serving
                    logger.exception("admitting a request failed")
                    exc = RuntimeError(f"the engine failed: {exc}")
                request.admitted.set_exception(exc)
                continue
            self._running.append(request)
            request.admitted.set_result(None)

    def _tokenize_request(self, request: Request) -> list | Exception:
        """On the tokenizing thread: the request's prompts as (text, token ids), or the error that stopped it."""
        try:
            return [self._tokenize(p, request.add_special_tokens) for p in request.prompts]
        except Exception as exc:  # raised when the request is admitted, as a check's error would be
            return exc

    def _tokenize(self, prompt: str | list[int], add_special_tokens: bool) -> tuple[str | None, list[int]]:
        if not isinstance(prompt, str):
            return None, list(prompt)
        return prompt, encode_text(self._tokenizer, prompt, "prompt", add_special_tokens)

    def _tokenized(self, request: Request, tokenizing: asyncio.Future) -> None:
        """On the event loop once ``request``'s tokenizing ended: the engine loop may admit it now."""
        if not tokenizing.cancelled():
            request.tokenized = tokenizing.exception() or tokenizing.result()  # BaseExceptions too: no hang
            self._wake.set()

    def _check_length(self, ids: list[int], max_tokens: int | None) -> None:
        """vLLM's rule: the prompt and ``max_tokens`` together must fit the model's length."""
        limit = self.llm.max_model_len
        if max_tokens is not None and len(ids) + max_tokens > limit:
            raise ValueError(f"this model's maximum context length is {limit} tokens, but {len(ids) + max_tokens}"
                             f" were requested ({len(ids)} in the prompt, {max_tokens} in the completion)")

    def _fit(self, params: SamplingParams, prompt_len: int) -> SamplingParams:
        """``params`` with a default max_tokens cut to what the model's length leaves a prompt of ``prompt_len``."""
        limit = self.llm.max_model_len
        room = limit - prompt_len
        if room < 1:
            raise ValueError(f"this model's maximum context length is {limit} tokens, and the prompt has "
                             f"{prompt_len}: no room is left for a completion")
        if params.min_tokens > room:  # also where max_tokens is None (a chat runs to the model's length)
            raise ValueError(f"min_tokens: the prompt leaves room for {room} tokens of the model's {limit}, "
                             f"fewer than min_tokens={params.min_tokens}")
        if params.max_tokens is None or params.max_tokens <= room:
            return params
        return replace(params, max_tokens=room)

    def _publish(self) -> None:
        """Queues each running request's new pieces; a request whose completions all ended leaves."""
        for request in list(self._running):
            for index, group in enumerate(request.seqs):
                for seq in group:
                    if seq.seq_id not in request.done and (delta := self.llm.delta(seq)) is not None:
                        if delta.finished():
                            request.done.add(seq.seq_id)
                        request.queue.put_nowait((index, delta))
            if request.finished:
                self._running.remove(request)
                request.queue.put_nowait(None)

    def _fail_running(self, error: Exception) -> None:
        for request in self._running:
            self.llm.abort([seq for group in request.seqs for seq in group])
            request.queue.put_nowait(error)
        self._running.clear()
