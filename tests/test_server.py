"""The server's HTTP API through the official openai client (completions, chat and streaming, vLLM's extra
fields), compared with offline ``LLM.generate``; 64 concurrent requests batched together, and clients that
disconnect (their requests are aborted and leave no KV block behind)."""
import asyncio
import json
import shutil

import pytest

from llmfast.engine import LLM, SamplingParams
from server_setup import GREEDY, MAX_LEN, MODEL, PROMPTS, health, wait_idle

pytest_plugins = ("server_setup",)  # its fixtures: checkpoint, llm, server, client
openai = pytest.importorskip("openai")
httpx = pytest.importorskip("httpx")


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
    with TestClient(build_app(LLM(folder, device="cpu"), MODEL)) as http:
        assert complete(http, ignore_eos=False)["finish_reason"] == "stop"
        ignored = complete(http)
        assert (ignored["finish_reason"], ignored["tokens"], ignored["text"]) == ("length", 6, greedy.text)


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
