"""Sampling defaults: fields a request leaves out take the checkpoint's generation_config values, and a
default max_tokens is cut to what the model's length leaves the prompt while a given one that does not fit
is refused."""
import asyncio
import json
import shutil

import pytest

from llmfast.engine import LLM, SamplingParams
from server_setup import MODEL

pytest_plugins = ("server_setup",)  # its fixtures: checkpoint, llm


def test_absent_fields_and_a_chats_max_tokens_take_the_models_generation_config_defaults():
    """As vLLM's server: a field the body leaves out takes the value the checkpoint's generation_config.json
    gives it (LLM.sampling_defaults), a field it sets wins; a chat without max_tokens or max_completion_tokens
    takes its max_new_tokens (it ran to the model's length), a completion keeps OpenAI's default of 16."""
    from llmfast.server.protocol import ChatCompletionRequest, CompletionRequest

    defaults = {"temperature": 0.0, "top_k": 5, "repetition_penalty": 1.3, "max_tokens": 7}
    completion = CompletionRequest(prompt="a", top_k=3)
    params = completion.sampling_params(completion.max_tokens, None, defaults)
    assert (params.temperature, params.top_k, params.repetition_penalty, params.max_tokens) == (0.0, 3, 1.3, 16)
    chat = ChatCompletionRequest(messages=[{"role": "user", "content": "hi"}], temperature=0.5)
    params = chat.sampling_params(chat.max_new_tokens(), None, defaults)
    assert (params.temperature, params.top_k, params.max_tokens) == (0.5, 5, 7)
    for given in (dict(max_tokens=3), dict(max_completion_tokens=3), dict(max_tokens=9, max_completion_tokens=3)):
        chat = ChatCompletionRequest(messages=[{"role": "user", "content": "hi"}], **given)
        assert chat.sampling_params(chat.max_new_tokens(), None, defaults).max_tokens == 3
    assert chat.sampling_params(chat.max_new_tokens(), None, {}).max_tokens == 3
    chat = ChatCompletionRequest(messages=[{"role": "user", "content": "hi"}])
    assert chat.sampling_params(chat.max_new_tokens(), None, {}).max_tokens is None  # up to the model's length


def test_a_default_max_tokens_is_cut_to_fit_the_prompt_a_given_one_is_refused(llm):
    """vLLM's rule: a chat without max_tokens takes the model's max_new_tokens, at most what the model's length
    leaves its prompt; a max_tokens the body gives that does not fit is a 400 ("maximum context length")."""
    from llmfast.server.async_engine import AsyncEngine

    prompt = list(range(5, 25)) * 50  # 1000 tokens
    room = llm.max_model_len - len(prompt)
    params = SamplingParams(temperature=0, max_tokens=llm.max_model_len, ignore_eos=True)

    async def run():
        engine = AsyncEngine(llm)
        engine.start()
        try:
            request = await engine.add([prompt], params, cap_max_tokens=True)
            pieces = [piece async for _, piece in engine.results(request)]
            with pytest.raises(ValueError, match="maximum context length"):
                await engine.add([prompt], params)
        finally:
            await engine.stop()
        return request, pieces

    request, pieces = asyncio.run(run())
    seq = request.seqs[0][0]
    assert seq.params.max_tokens == room and seq.num_output_tokens == room
    assert pieces[-1].finish_reason == "length"


def test_a_default_max_tokens_that_cannot_fit_names_why():
    from types import SimpleNamespace

    from llmfast.server.async_engine import AsyncEngine

    engine = AsyncEngine(SimpleNamespace(max_model_len=64))
    params = SamplingParams(max_tokens=1000, min_tokens=10)
    assert engine._fit(params, 40).max_tokens == 24 and engine._fit(params, 40).min_tokens == 10
    with pytest.raises(ValueError, match="the prompt has 64: no room is left for a completion"):
        engine._fit(params, 64)
    with pytest.raises(ValueError, match="min_tokens: the prompt leaves room for 4 tokens of the model's 64"):
        engine._fit(params, 60)
    unbounded = SamplingParams(max_tokens=None, min_tokens=10)  # a chat without max_tokens: to the model's length
    assert engine._fit(unbounded, 54) is unbounded
    with pytest.raises(ValueError, match="min_tokens: the prompt leaves room for 9 tokens of the model's 64"):
        engine._fit(unbounded, 55)


def test_a_chat_without_max_tokens_runs_to_the_model_length_under_a_larger_max_new_tokens(checkpoint, tmp_path):
    """And so does a completion whose max_tokens is null."""
    from fastapi.testclient import TestClient

    from llmfast.server.app import build_app

    folder = tmp_path / "long_default"
    shutil.copytree(checkpoint, folder)
    (folder / "generation_config.json").write_text(json.dumps({"max_new_tokens": 100000}))
    llm = LLM(folder, block_size=16, num_kv_blocks=4)  # a 64-token model
    chat = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "temperature": 0, "ignore_eos": True}
    with TestClient(build_app(llm, MODEL)) as http:
        response = http.post("/v1/chat/completions", json=chat)
        assert response.status_code == 200, response.text
        usage = response.json()["usage"]
        assert usage["prompt_tokens"] + usage["completion_tokens"] == llm.max_model_len == 64
        assert response.json()["choices"][0]["finish_reason"] == "length"
        response = http.post("/v1/chat/completions", json=dict(chat, max_tokens=100000))
        assert response.status_code == 400 and "maximum context length" in response.text
        # a completion's max_tokens: absent, OpenAI's 16; null, as a chat's absent one (vLLM)
        completion = {"model": MODEL, "prompt": "hi", "temperature": 0, "ignore_eos": True}
        usage = http.post("/v1/completions", json=completion).json()["usage"]
        assert usage["completion_tokens"] == 16
        response = http.post("/v1/completions", json=dict(completion, max_tokens=None))
        assert response.status_code == 200, response.text
        usage = response.json()["usage"]
        assert usage["prompt_tokens"] + usage["completion_tokens"] == 64
