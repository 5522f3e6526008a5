"""`llmfast serve` as a subprocess on 127.0.0.1 (it picks a free port itself and logs it), over a tiny random
checkpoint with a chat template: the official openai client for completions, chat and streaming, compared
with offline ``LLM.generate``; raw HTTP for malformed bodies (400 with the error body, and the server keeps
serving), an unknown model (404), 64 concurrent requests batched together, and clients that disconnect
(their requests are aborted and leave no KV block behind)."""
import asyncio
import contextlib
import json
import os
import re
import shutil
import subprocess
import sys
import time

import pytest

from llmfast.engine import LLM, SamplingParams

openai = pytest.importorskip("openai")
httpx = pytest.importorskip("httpx")
pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
pytest.importorskip("transformers")

MODEL = "tiny-qwen3"
MAX_LEN = 1024
STARTUP_S = 90
PROMPTS = ["The quick brown fox", "Paged attention keeps keys", "A scheduler batches requests", "Héllo wörld",
           "Once upon a time", "Kernels fuse the residual add"]
GREEDY = dict(temperature=0, max_tokens=10, extra_body={"ignore_eos": True})


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    from llmfast.demo import build_tiny_checkpoint

    return build_tiny_checkpoint(tmp_path_factory.mktemp("tiny"), hidden_size=64, num_layers=2,
                                 max_position_embeddings=MAX_LEN)


@pytest.fixture(scope="module")
def llm(checkpoint):
    return LLM(checkpoint)


def _wait_until_serving(proc, log) -> str:
    deadline = time.monotonic() + STARTUP_S
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"the server exited with {proc.returncode}:\n{log.read_text()}")
        match = re.search(r"Uvicorn running on (http://127\.0\.0\.1:\d+)", log.read_text())
        if match and httpx.get(match.group(1) + "/health", timeout=5).status_code == 200:
            return match.group(1)
        time.sleep(0.2)
    pytest.fail(f"the server did not start within {STARTUP_S} s:\n{log.read_text()}")


@pytest.fixture(scope="module")
def server(checkpoint, tmp_path_factory):
    """The server's base URL; it is shut down after the module's tests, whatever happened."""
    log = tmp_path_factory.mktemp("server") / "server.log"
    command = [sys.executable, "-m", "llmfast", "serve", "--model", str(checkpoint), "--host", "127.0.0.1",
               "--port", "0", "--served-model-name", MODEL]  # port 0: uvicorn's startup line names the port
    with open(log, "w") as out:
        proc = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT,
                                env={**os.environ, "HF_HUB_OFFLINE": "1"})
    try:
        yield _wait_until_serving(proc, log)
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=20)


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server + "/v1", api_key="unused", max_retries=0, timeout=60)


def health(server) -> dict:
    response = httpx.get(server + "/health", timeout=10)
    assert response.status_code == 200
    return response.json()


def wait_idle(server, aborted: int | None = None, timeout_s: float = 30) -> dict:
    """/health once nothing runs and every block is free (and ``aborted`` requests were aborted)."""
    deadline = time.monotonic() + timeout_s
    while True:
        state = health(server)
        idle = state["num_running_seqs"] == state["num_waiting_seqs"] == 0
        if idle and state["num_free_kv_blocks"] == state["num_kv_blocks"] and (
                aborted is None or state["num_aborted_requests"] >= aborted):
            return state
        assert time.monotonic() < deadline, f"the server did not settle: {state}"
        time.sleep(0.1)


def test_models_and_health(server, client, llm):
    assert [(m.id, m.object) for m in client.models.list().data] == [(MODEL, "model")]
    state = health(server)
    assert state["status"] == "ok" and state["num_kv_blocks"] > 0
    assert httpx.head(server + "/health", timeout=10).status_code == 200


def test_completions_equal_offline_generate(client, llm):
    offline_params = SamplingParams(n=2, temperature=0, max_tokens=10, ignore_eos=True)
    for prompts in ([PROMPTS[0], PROMPTS[5]], [[5, 17, 3, 99], [8, 1]]):  # texts, then token ids
        response = client.completions.create(model=MODEL, prompt=prompts, n=2, **GREEDY)
        offline = llm.generate(prompts, offline_params, use_tqdm=False)
        assert [c.index for c in response.choices] == [0, 1, 2, 3]  # prompt-major, as OpenAI's
        for choice in response.choices:
            expected = offline[choice.index // 2].outputs[choice.index % 2]
            assert choice.text == expected.text and choice.finish_reason == "length"
        assert response.usage.prompt_tokens == sum(len(out.prompt_token_ids) for out in offline)
        assert response.usage.completion_tokens == 4 * 10
        assert response.usage.total_tokens == response.usage.prompt_tokens + 40


def test_streamed_text_equals_the_whole_response(client):
    whole = client.completions.create(model=MODEL, prompt=PROMPTS[1], **GREEDY)
    chunks = list(client.completions.create(model=MODEL, prompt=PROMPTS[1], stream=True,
                                            stream_options={"include_usage": True}, **GREEDY))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == whole.choices[0].text
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].usage.completion_tokens == whole.usage.completion_tokens == 10
    assert chunks[-1].usage.prompt_tokens == whole.usage.prompt_tokens

    messages = [{"role": "user", "content": PROMPTS[2]}]
    whole = client.chat.completions.create(model=MODEL, messages=messages, **GREEDY)
    chunks = list(client.chat.completions.create(model=MODEL, messages=messages, stream=True, **GREEDY))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == whole.choices[0].message.content
    assert chunks[-1].choices[0].finish_reason == whole.choices[0].finish_reason == "length"


def test_a_stop_string_ends_the_stream_where_it_ends_the_whole_response(client, llm):
    """A stop string the greedy text holds (across two tokens, after the first, where it first occurs) cuts
    the stream there; the last chunk says "stop" and which string."""
    out = llm.generate(PROMPTS[1], SamplingParams(temperature=0, max_tokens=10, ignore_eos=True),
                       use_tqdm=False)[0].outputs[0]
    full = out.text
    prefixes = [llm.tokenizer.decode(out.token_ids[:k]) for k in range(2, len(out.token_ids))]
    ends = [len(prefix) for prefix in prefixes if full.startswith(prefix)]  # token boundaries after the first
    stop = next(full[end - 1:end + 1] for end in ends
                if full.find(full[end - 1:end + 1]) == end - 1 and "\ufffd" not in full[end - 1:end + 1])
    whole = client.completions.create(model=MODEL, prompt=PROMPTS[1], stop=stop, **GREEDY).choices[0]
    chunks = [c.choices[0] for c in client.completions.create(model=MODEL, prompt=PROMPTS[1], stop=[stop],
                                                               stream=True, **GREEDY) if c.choices]
    assert "".join(c.text for c in chunks) == whole.text == full[:full.index(stop)]
    assert (chunks[-1].finish_reason, chunks[-1].stop_reason) == (whole.finish_reason, whole.stop_reason) \
        == ("stop", stop)


def test_sse_framing_ends_with_done(server):
    body = {"model": MODEL, "prompt": PROMPTS[0], "max_tokens": 3, "stream": True}
    with httpx.stream("POST", server + "/v1/completions", json=body, timeout=30) as response:
        assert response.headers["content-type"].startswith("text/event-stream")
        events = [line for line in response.iter_lines() if line]
    assert all(line.startswith("data: ") for line in events) and events[-1] == "data: [DONE]"
    assert all(json.loads(line[6:])["object"] == "text_completion" for line in events[:-1])


def test_chat_renders_the_template_without_adding_special_tokens_again(client, llm):
    tokenizer = llm.tokenizer
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": PROMPTS[3]}]
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    ids = tokenizer(text, add_special_tokens=False).input_ids
    assert ids.count(tokenizer.bos_token_id) == 1  # the template's bos; adding special tokens would double it
    response = client.chat.completions.create(model=MODEL, messages=messages, **GREEDY)
    offline = llm.generate([ids], SamplingParams(temperature=0, max_tokens=10, ignore_eos=True), use_tqdm=False)
    assert response.usage.prompt_tokens == len(ids)
    assert response.choices[0].message.role == "assistant"
    assert response.choices[0].message.content == offline[0].outputs[0].text
    # content given as text parts is the same conversation
    parts = [{"role": "system", "content": [{"type": "text", "text": "Be brief."}]}, messages[1]]
    again = client.chat.completions.create(model=MODEL, messages=parts, **GREEDY)
    assert again.choices[0].message.content == response.choices[0].message.content


def test_vllm_extra_fields_and_logprobs(client, llm):
    extra = dict(top_k=20, min_p=0.01, repetition_penalty=1.2, min_tokens=4, ignore_eos=True, stop_token_ids=[7])
    response = client.completions.create(model=MODEL, prompt=PROMPTS[4], temperature=0.9, top_p=0.95, seed=-1234,
                                         max_tokens=12, logprobs=2, extra_body=extra)
    params = SamplingParams(temperature=0.9, top_p=0.95, seed=-1234, max_tokens=12, logprobs=2, **extra)
    expected = llm.generate(PROMPTS[4], params, use_tqdm=False)[0].outputs[0]
    choice = response.choices[0]
    assert choice.text == expected.text and choice.finish_reason == expected.finish_reason
    assert len(choice.logprobs.tokens) == len(expected.token_ids) == response.usage.completion_tokens
    for got, entries, token in zip(choice.logprobs.token_logprobs, expected.logprobs, expected.token_ids):
        assert got == pytest.approx(entries[token].logprob, abs=1e-4)

    chat = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}], logprobs=True,
                                          top_logprobs=3, **GREEDY)
    content = chat.choices[0].logprobs.content
    assert len(content) == 10 and all(len(entry.top_logprobs) == 3 for entry in content)
    assert all(entry.logprob == pytest.approx(entry.top_logprobs[0].logprob) for entry in content)  # greedy


def test_each_vllm_extra_field_changes_the_output(server, llm, checkpoint, tmp_path):
    """Probes where leaving a field out would change the answer: stop_token_ids ends at the first greedy token,
    min_tokens keeps it out of the first 3, repetition_penalty=5 changes the greedy text, min_p=1.0 makes
    temperature 1 greedy, and ignore_eos runs past an eos that ends the request otherwise."""
    from fastapi.testclient import TestClient

    from llmfast.server.app import build_app

    prompt, base = PROMPTS[4], dict(temperature=0, max_tokens=6, ignore_eos=True)

    def complete(http, **fields) -> dict:
        response = http.post("/v1/completions", json={"prompt": prompt, **base, **fields})
        assert response.status_code == 200, response.text
        return {**response.json()["choices"][0], "tokens": response.json()["usage"]["completion_tokens"]}

    def offline(**fields):
        return llm.generate(prompt, SamplingParams(**{**base, **fields}), use_tqdm=False)[0].outputs[0]

    greedy = offline()
    first = greedy.token_ids[0]
    with httpx.Client(base_url=server, timeout=60) as http:
        assert complete(http)["text"] == greedy.text
        stopped = complete(http, stop_token_ids=[first])
        assert (stopped["finish_reason"], stopped["stop_reason"], stopped["tokens"]) == ("stop", first, 1)
        deferred = complete(http, stop_token_ids=[first], min_tokens=3)
        expected = offline(stop_token_ids=[first], min_tokens=3)
        assert deferred["tokens"] >= 3 and first not in expected.token_ids[:3] and deferred["text"] == expected.text
        penalized = complete(http, repetition_penalty=5.0)
        assert penalized["text"] != greedy.text and penalized["text"] == offline(repetition_penalty=5.0).text
        assert complete(http, temperature=1.0, seed=3, min_p=1.0)["text"] == greedy.text
        assert complete(http, temperature=1.0, seed=3)["text"] != greedy.text  # the seed alone does not give greedy
    # an engine whose eos is the first greedy token: the request ends at once unless ignore_eos
    folder = tmp_path / "eos"
    shutil.copytree(checkpoint, folder)
    (folder / "generation_config.json").write_text(json.dumps({"eos_token_id": first}))
    with TestClient(build_app(LLM(folder), MODEL)) as http:
        assert complete(http, ignore_eos=False)["finish_reason"] == "stop"
        ignored = complete(http)
        assert (ignored["finish_reason"], ignored["tokens"], ignored["text"]) == ("length", 6, greedy.text)


# name -> (body, the error's param as OpenAI names the field: the body's own field, never llmfast's)
BAD_BODIES = {
    "malformed json": (b'{"model": "tiny-qwen3", "prompt": ', None),
    "not an object": (b"[1, 2]", None),
    "missing prompt": ({"model": MODEL}, "prompt"),
    "prompt of wrong type": ({"prompt": 5}, "prompt"),
    "temperature as string": ({"prompt": "x", "temperature": "hot"}, "temperature"),
    "max_tokens as float": ({"prompt": "x", "max_tokens": 1.5}, "max_tokens"),
    "negative temperature": ({"prompt": "x", "temperature": -1}, "temperature"),
    "top_p out of range": ({"prompt": "x", "top_p": 2}, "top_p"),
    "n zero": ({"prompt": "x", "n": 0}, "n"),
    "bad top_k": ({"prompt": "x", "top_k": -3}, "top_k"),
    "stop of wrong type": ({"prompt": "x", "stop": [1]}, "stop"),
    "stream as string": ({"prompt": "x", "stream": "yes"}, "stream"),
    "stream_options without stream": ({"prompt": "x", "stream_options": {"include_usage": True}}, "stream_options"),
    "empty token list in a list": ({"prompt": [[]]}, "prompt"),
    "token outside the vocabulary": ({"prompt": [1, 10**6]}, "prompt"),
    "prompt too long": ({"prompt": [3] * (MAX_LEN + 1)}, "prompt"),
    "prompt and max_tokens too long": ({"prompt": [3] * 100, "max_tokens": MAX_LEN}, "prompt"),
    "seed out of range": ({"prompt": "x", "seed": 2**70}, "seed"),
    "lone surrogate": (b'{"prompt": "a\\ud800b"}', "prompt"),
    "lone surrogate in a list": (b'{"prompt": ["fine", "\\udc80"]}', "prompt"),
}
HI = [{"role": "user", "content": "hi"}]
BAD_CHAT_BODIES = {
    "missing messages": ({"model": MODEL}, "messages"),
    "messages as string": ({"messages": "hi"}, "messages"),
    "no messages": ({"messages": []}, "messages"),
    "message without role": ({"messages": [{"content": "hi"}]}, "messages"),
    "image content": ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]},
                      "messages"),
    "top_logprobs without logprobs": ({"messages": HI, "top_logprobs": 2}, "top_logprobs"),
    "top_logprobs too many": ({"messages": HI, "logprobs": True, "top_logprobs": 50}, "top_logprobs"),
    "max_completion_tokens negative": ({"messages": HI, "max_completion_tokens": -1}, "max_completion_tokens"),
    "max_tokens negative": ({"messages": HI, "max_tokens": -1}, "max_tokens"),
    "lone surrogate in a message": (b'{"messages": [{"role": "user", "content": "hi \\ud800"}]}', "messages"),
}


@pytest.mark.parametrize("path,body,param", [("/v1/completions", *b) for b in BAD_BODIES.values()]
                         + [("/v1/chat/completions", *b) for b in BAD_CHAT_BODIES.values()],
                         ids=[*BAD_BODIES, *BAD_CHAT_BODIES])
def test_bad_requests_answer_400_naming_the_field_and_the_server_keeps_serving(server, client, path, body, param):
    kwargs = {"content": body, "headers": {"content-type": "application/json"}} if isinstance(body, bytes) \
        else {"json": body}
    response = httpx.post(server + path, timeout=30, **kwargs)
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["code"] == 400 and error["type"] == "BadRequestError" and error["param"] == param, error
    assert param is None or error["message"].startswith(param) or "maximum context length" in error["message"]
    assert client.completions.create(model=MODEL, prompt="still", max_tokens=2).choices[0].text is not None


def test_null_fields_take_their_defaults_and_an_empty_text_is_tokenized(server, llm):
    """OpenAI's fields are "... or null"; "" is a prompt when the tokenizer gives it tokens (this one adds bos)."""
    assert llm.tokenizer("").input_ids, "the test needs a tokenizer that adds a token to an empty text"
    body = {"prompt": "", "max_tokens": 3, "temperature": 0, "n": None, "stream": None, "echo": None, "seed": None}
    response = httpx.post(server + "/v1/completions", json=body, timeout=60)
    assert response.status_code == 200, response.text
    expected = llm.generate("", SamplingParams(temperature=0, max_tokens=3), use_tqdm=False)[0].outputs[0].text
    assert [c["text"] for c in response.json()["choices"]] == [expected]
    chat = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2, "n": None, "logprobs": None,
            "add_generation_prompt": None, "stream": None}
    response = httpx.post(server + "/v1/chat/completions", json=chat, timeout=60)
    assert response.status_code == 200, response.text
    assert len(response.json()["choices"]) == 1 and response.json()["choices"][0]["logprobs"] is None


def test_engine_names_map_to_the_body_fields():
    """The engine's messages name its own arguments; a 400 names the field of the body that was sent."""
    from llmfast.server.protocol import ChatCompletionRequest, CompletionRequest

    completion = CompletionRequest(prompt=[[1], [2]], stop="x")
    assert [completion.field_named(n) for n in ("sampling_params[1].stop", "prompts[1]", "max_tokens")] == \
        ["stop", "prompt[1]", "max_tokens"]
    chat = ChatCompletionRequest(messages=[{"role": "user", "content": "hi"}], max_completion_tokens=3)
    assert [chat.field_named(n) for n in ("sampling_params[0].stop", "prompts[0]", "prompt", "max_tokens",
                                          "logprobs")] == ["stop", "messages", "messages", "max_completion_tokens",
                                                           "top_logprobs"]


def test_unknown_model_is_404(server, client):
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="no-such-model", prompt="x", max_tokens=2)
    response = httpx.post(server + "/v1/chat/completions", timeout=30,
                          json={"model": "no-such-model", "messages": [{"role": "user", "content": "x"}]})
    assert response.status_code == 404 and response.json()["error"]["code"] == 404
    assert httpx.get(server + "/v1/nowhere", timeout=10).json()["error"]["code"] == 404


def test_64_concurrent_requests_are_batched_and_equal_offline_generate(server, llm):
    prompts = [f"{i}: {PROMPTS[i % len(PROMPTS)]}" + " more" * (i % 7) for i in range(64)]

    async def run():
        async with openai.AsyncOpenAI(base_url=server + "/v1", api_key="unused", max_retries=0, timeout=90) as aclient:
            calls = [aclient.completions.create(model=MODEL, prompt=p, temperature=0, max_tokens=8) for p in prompts]
            return await asyncio.wait_for(asyncio.gather(*calls), timeout=120)

    responses = asyncio.run(run())
    offline = llm.generate(prompts, SamplingParams(temperature=0, max_tokens=8), use_tqdm=False)
    for response, expected in zip(responses, offline):
        assert response.choices[0].text == expected.outputs[0].text
        assert response.choices[0].finish_reason == expected.outputs[0].finish_reason
        assert response.usage.prompt_tokens == len(expected.prompt_token_ids)
    assert len({r.choices[0].text for r in responses}) > 1
    state = wait_idle(server)
    assert state["peak_running_seqs"] > 1  # requests from different connections shared steps


def test_clients_that_disconnect_are_aborted_and_free_their_blocks(server):
    aborted = health(server)["num_aborted_requests"]
    long = {"model": MODEL, "prompt": PROMPTS[0], "max_tokens": MAX_LEN - 32, "ignore_eos": True}
    with httpx.Client(timeout=30) as http:
        with http.stream("POST", server + "/v1/completions", json={**long, "stream": True}) as response:
            lines = response.iter_lines()
            assert next(line for line in lines if line).startswith("data: {")
            assert health(server)["num_running_seqs"] == 1
    # the stream was closed after its first chunk
    wait_idle(server, aborted=aborted + 1)
    # a non-streaming client that gives up waiting
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(server + "/v1/chat/completions", timeout=httpx.Timeout(30, read=0.3),
                   json={**{k: v for k, v in long.items() if k != "prompt"},
                         "messages": [{"role": "user", "content": PROMPTS[1]}]})
    wait_idle(server, aborted=aborted + 2)


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


def test_a_chat_without_max_tokens_runs_to_the_model_length_under_a_larger_max_new_tokens(checkpoint, tmp_path):
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


def test_errors_do_not_echo_huge_inputs_and_name_a_wrong_content_type(server):
    response = httpx.post(server + "/v1/completions", json={"prompt": [1.5] * 20000}, timeout=30)
    assert response.status_code == 400 and len(response.json()["error"]["message"]) < 300, response.text[:500]
    response = httpx.post(server + "/v1/completions", content=b'{"prompt": "x", "max_tokens": 2}',
                          headers={"content-type": "text/plain"}, timeout=30)
    assert response.status_code == 400
    assert "application/json, got 'text/plain'" in response.json()["error"]["message"], response.text


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
