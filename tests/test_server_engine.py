"""The server's AsyncEngine: prompts are tokenized on a thread of their own (with a tokenizer of its own) while
running requests keep stepping, a request aborted while being tokenized is dropped, and a tokenizer that
cannot be copied tokenizes between steps."""
import asyncio
import contextlib

import pytest

from llmfast.engine import SamplingParams
from server_setup import PROMPTS

pytest_plugins = ("server_setup",)  # its fixtures: checkpoint, llm


def test_prompts_are_tokenized_on_the_tokenizing_thread_not_the_event_loop(llm, monkeypatch):
    """A megabyte prompt takes seconds to tokenize: on the event loop it would stall every connection."""
    import threading

    from llmfast.server.async_engine import AsyncEngine

    threads = []
    tokenize = AsyncEngine._tokenize

    def recording_tokenize(*args, **kwargs):
        threads.append(threading.current_thread().name)
        return tokenize(*args, **kwargs)

    monkeypatch.setattr(AsyncEngine, "_tokenize", recording_tokenize)

    async def one_request():
        engine = AsyncEngine(llm)
        engine.start()
        try:
            request = await engine.add(["The quick brown fox"], SamplingParams(temperature=0, max_tokens=2))
            pieces = [piece async for _, piece in engine.results(request)]
        finally:
            await engine.stop()
        return pieces

    pieces = asyncio.run(one_request())
    assert pieces and pieces[-1].finish_reason == "length"
    assert threads and all(name.startswith("llmfast-tokenize") for name in threads), threads


BLOCKED_PROMPT = "The tokenizing of this prompt waits for the test"
HANG_S = 60  # only a guard, so that a deadlock (tokenizing that stalls the steps) fails: nothing is timed


@pytest.fixture
def blocked_tokenizing(llm, monkeypatch):
    """Tokenizing BLOCKED_PROMPT sets ``begun``, then waits for ``release``; every step of ``llm`` waits for
    ``begun``, so whatever the engine steps before ``release`` ran while that prompt was being tokenized."""
    import threading
    from types import SimpleNamespace

    from llmfast.server.async_engine import AsyncEngine

    events = SimpleNamespace(begun=threading.Event(), release=threading.Event())
    tokenize, step = AsyncEngine._tokenize, llm.step

    def blocking_tokenize(self, prompt, add_special_tokens):
        if prompt == BLOCKED_PROMPT:
            events.begun.set()
            events.release.wait()
        return tokenize(self, prompt, add_special_tokens)

    def gated_step():
        events.begun.wait()
        step()

    monkeypatch.setattr(AsyncEngine, "_tokenize", blocking_tokenize)
    monkeypatch.setattr(llm, "step", gated_step)
    return events


@contextlib.asynccontextmanager
async def started_engine(llm, events=None):
    from llmfast.server.async_engine import AsyncEngine

    engine = AsyncEngine(llm)
    engine.start()
    try:
        yield engine
    finally:
        if events is not None:  # stop() joins the threads: none may still wait for the test (after a failure)
            events.begun.set()
            events.release.set()
        await engine.stop()


async def pieces_of(engine, request) -> list:
    async def collect():
        return [piece async for _, piece in engine.results(request)]

    return await asyncio.wait_for(collect(), HANG_S)


def test_running_requests_keep_streaming_while_a_prompt_is_tokenized(llm, blocked_tokenizing):
    """A waits for no tokenizing: all its steps run while B's prompt is being tokenized (the steps wait until
    B's tokenizing has begun, and B's ends only after A finished); B is admitted once tokenized."""
    events = blocked_tokenizing
    params = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)

    async def run():
        async with started_engine(llm, events) as engine:
            a = await engine.add([PROMPTS[0]], params)
            adding_b = asyncio.create_task(engine.add([BLOCKED_PROMPT], params))
            a_pieces = await pieces_of(engine, a)
            b_admitted_before_tokenized = adding_b.done()
            events.release.set()
            b = await asyncio.wait_for(adding_b, HANG_S)
            return a_pieces, b_admitted_before_tokenized, await pieces_of(engine, b)

    a_pieces, b_admitted_before_tokenized, b_pieces = asyncio.run(run())
    assert not b_admitted_before_tokenized
    expected = llm.generate([PROMPTS[0], BLOCKED_PROMPT], params, use_tqdm=False)
    for pieces, out in zip((a_pieces, b_pieces), expected):
        assert [t for piece in pieces for t in piece.token_ids] == out.outputs[0].token_ids
        assert "".join(piece.text for piece in pieces) == out.outputs[0].text
        assert pieces[-1].finish_reason == "length"


def test_the_tokenizing_thread_has_a_tokenizer_of_its_own(llm, monkeypatch):
    """A Hugging Face fast tokenizer used from two threads at once raises "Already borrowed": the tokenizing
    thread encodes with a tokenizer no other thread uses, the engine thread decodes with the engine's."""
    import threading

    uses = set()  # (method, id of the tokenizer, thread)
    cls = type(llm.tokenizer)
    for method in ("__call__", "decode"):
        def recording(self, *args, _method=method, _original=getattr(cls, method), **kwargs):
            uses.add((_method, id(self), threading.current_thread().name))
            return _original(self, *args, **kwargs)

        monkeypatch.setattr(cls, method, recording)

    async def run():
        async with started_engine(llm) as engine:
            request = await engine.add([PROMPTS[3]], SamplingParams(temperature=0, max_tokens=4, ignore_eos=True))
            return await pieces_of(engine, request)

    assert asyncio.run(run())[-1].finish_reason == "length"
    encoders = {(tokenizer, thread) for method, tokenizer, thread in uses if method == "__call__"}
    decoders = {(tokenizer, thread) for method, tokenizer, thread in uses if method == "decode"}
    assert len(encoders) == len(decoders) == 1, uses
    ((encoder, encoding_thread),), ((decoder, decoding_thread),) = encoders, decoders
    assert decoder == id(llm.tokenizer), uses
    assert encoding_thread != decoding_thread, uses  # tokenizing does not wait for steps...
    assert encoder != decoder, uses  # ...so it must not share their tokenizer


def test_a_request_aborted_while_its_prompt_is_tokenized_is_dropped(llm, blocked_tokenizing, monkeypatch):
    """B's client leaves while B's prompt is being tokenized: A goes on meanwhile, B is never queued in the
    engine once its tokenizing ends, and the engine serves the next request, leaving every KV block free."""
    events = blocked_tokenizing
    queued = []  # the prompts that reached the engine's scheduler
    add_request = llm.add_request

    def recording_add_request(prompt, prompt_token_ids, params):
        queued.append(prompt)
        return add_request(prompt, prompt_token_ids, params)

    monkeypatch.setattr(llm, "add_request", recording_add_request)
    params = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)

    async def run():
        loop = asyncio.get_running_loop()
        async with started_engine(llm, events) as engine:
            a = await engine.add([PROMPTS[1]], params)
            adding_b = asyncio.create_task(engine.add([BLOCKED_PROMPT], params))
            await asyncio.wait_for(loop.run_in_executor(None, events.begun.wait), HANG_S)
            adding_b.cancel()  # the client went away
            a_pieces = await pieces_of(engine, a)
            events.release.set()
            c = await asyncio.wait_for(engine.add([PROMPTS[2]], params), HANG_S)
            return adding_b, a_pieces, await pieces_of(engine, c)

    adding_b, a_pieces, c_pieces = asyncio.run(run())
    assert adding_b.cancelled()
    assert a_pieces[-1].finish_reason == c_pieces[-1].finish_reason == "length"
    assert queued == [PROMPTS[1], PROMPTS[2]]
    assert not llm.scheduler.has_unfinished()
    assert llm.block_manager.num_free_blocks == llm.runner.num_kv_blocks


def test_a_tokenizer_that_cannot_be_copied_tokenizes_between_steps(llm, monkeypatch):
    """The tokenizing thread needs a tokenizer of its own; one that deepcopy refuses is used on the engine
    thread instead, between steps, rather than the server failing to start."""
    import threading

    from llmfast.server import async_engine

    def refuse(obj, memo=None):
        raise TypeError("cannot pickle 'Tokenizer' object")

    threads = []
    tokenize = async_engine.AsyncEngine._tokenize

    def recording_tokenize(*args, **kwargs):
        threads.append(threading.current_thread().name)
        return tokenize(*args, **kwargs)

    monkeypatch.setattr(async_engine.copy, "deepcopy", refuse)
    monkeypatch.setattr(async_engine.AsyncEngine, "_tokenize", recording_tokenize)
    params = SamplingParams(temperature=0, max_tokens=4, ignore_eos=True)

    async def run():
        async with started_engine(llm) as engine:
            request = await engine.add([PROMPTS[1]], params)
            return await pieces_of(engine, request)

    pieces = asyncio.run(run())
    assert [t for piece in pieces for t in piece.token_ids] == \
        llm.generate([PROMPTS[1]], params, use_tqdm=False)[0].outputs[0].token_ids
    assert threads and all(name.startswith("llmfast-engine") for name in threads), threads
