"""Requests the server refuses over raw HTTP: malformed or invalid bodies (400 naming the body's field, and the
server keeps serving), an unknown model or path (404), huge or mistyped inputs; and the null fields and empty
text it accepts."""
import pytest

from llmfast.engine import SamplingParams
from server_setup import MAX_LEN, MODEL, wait_idle

pytest_plugins = ("server_setup",)  # its fixtures: checkpoint, llm, server, client
openai = pytest.importorskip("openai")
httpx = pytest.importorskip("httpx")


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


def test_errors_do_not_echo_huge_inputs_and_name_a_wrong_content_type(server):
    response = httpx.post(server + "/v1/completions", json={"prompt": [1.5] * 20000}, timeout=30)
    assert response.status_code == 400 and len(response.json()["error"]["message"]) < 300, response.text[:500]
    response = httpx.post(server + "/v1/completions", content=b'{"prompt": "x", "max_tokens": 2}',
                          headers={"content-type": "text/plain"}, timeout=30)
    assert response.status_code == 400
    assert "application/json, got 'text/plain'" in response.json()["error"]["message"], response.text


def test_refused_requests_leave_nothing_running_and_every_block_free(server):
    """Last in this module, after every refused request above: none of them left a sequence or a block behind."""
    state = wait_idle(server)
    assert state["num_kv_blocks"] > 0, state
