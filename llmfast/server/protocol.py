"""The OpenAI wire format as vLLM serves it: request bodies (pydantic, strict types), their sampling
parameters, and the JSON of responses, stream chunks and errors.

Types are strict (``"0.5"`` is not a number, ``1.0`` not an int), so a client's mistake is answered with a
400 naming the field instead of being coerced; ranges are checked by ``SamplingParams`` itself.
"""
from __future__ import annotations

import time
import uuid
from typing import Any, ClassVar

from pydantic import BaseModel, ConfigDict, model_validator

from llmfast.engine import CompletionOutput, Logprob, SamplingParams

# what a union-typed field expects, in words (pydantic reports one error per member of the union)
EXPECTED = {
    "prompt": "a string, a list of strings, a list of token ids or a list of token-id lists",
    "stop": "a string or a list of strings",
    "messages": "a list of {role, content} objects",
    "content": "a string or a list of {type: text, text} parts",
}


class _Strict(BaseModel):
    model_config = ConfigDict(strict=True)  # unknown fields are ignored, as vLLM does

    null_kept: ClassVar[tuple[str, ...]] = ()  # fields whose null means something other than their default

    @model_validator(mode="before")
    @classmethod
    def _null_is_the_default(cls, data: Any) -> Any:
        """OpenAI's fields are "... or null": a null field takes its default (a required one stays missing)."""
        if not isinstance(data, dict):
            return data
        return {k: v for k, v in data.items() if v is not None or k in cls.null_kept}


class StreamOptions(_Strict):
    include_usage: bool = False


class SamplingFields(_Strict):
    """The body fields that both endpoints share: OpenAI's and vLLM's extra ones."""

    model: str | None = None
    n: int = 1
    temperature: float | None = None
    top_p: float | None = None
    max_tokens: int | None = None
    stop: str | list[str] | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    seed: int | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    logit_bias: dict[str, float] | None = None
    user: str | None = None
    # vLLM's extra body fields
    top_k: int | None = None
    min_p: float | None = None
    repetition_penalty: float | None = None
    ignore_eos: bool | None = None
    min_tokens: int | None = None
    stop_token_ids: list[int] | None = None

    def sampling_params(self, max_tokens: int | None, logprobs: int | None, defaults: dict) -> SamplingParams:
        """``SamplingParams`` from the fields that were given; the others take the model's ``defaults`` (from
        its generation_config.json, as vLLM's server) or else SamplingParams'. ``max_tokens`` None (a chat that
        sets neither max_tokens nor max_completion_tokens) takes its max_new_tokens, else runs up to the model's
        length; a completion's max_tokens defaults to 16 (OpenAI's and vLLM's) and may be null, as a chat's absent one. Raises ValueError naming the
        field for out-of-range values and for what llmfast does not support."""
        if self.logit_bias:
            raise ValueError("logit_bias: not supported by llmfast")
        if self.stream_options is not None and not self.stream:
            raise ValueError("stream_options: only allowed with stream=true (as vLLM)")
        names = ("n", "temperature", "top_p", "stop", "presence_penalty", "frequency_penalty", "seed", "top_k",
                 "min_p", "repetition_penalty", "ignore_eos", "min_tokens", "stop_token_ids")
        given = {name: getattr(self, name) for name in names if getattr(self, name) is not None}
        sampling_defaults = {name: value for name, value in defaults.items() if name in names}
        if max_tokens is None:
            max_tokens = defaults.get("max_tokens")
        return SamplingParams(**{**sampling_defaults, **given}, max_tokens=max_tokens, logprobs=logprobs)

    def field_named(self, name: str) -> str:
        """The body field (with its index, if any) that llmfast's ``name`` in an error message is about."""
        if name.startswith("sampling_params[") and "." in name:  # the engine's check of one prompt's params
            name = name.split(".", 1)[1]
        return self._body_field(name)

    def _body_field(self, name: str) -> str:
        return name


class CompletionRequest(SamplingFields):
    # max_tokens left out: OpenAI's default of 16; null: no limit but the model's length (as vLLM)
    null_kept: ClassVar[tuple[str, ...]] = ("max_tokens",)

    prompt: str | list[str] | list[int] | list[list[int]]
    max_tokens: int | None = 16
    logprobs: int | None = None
    echo: bool = False
    best_of: int | None = None
    suffix: str | None = None

    def prompts(self) -> list[str | list[int]]:
        """The prompts of the request: one string or token-id list each."""
        if self.echo or self.suffix is not None:
            raise ValueError(f"{'echo' if self.echo else 'suffix'}: not supported by llmfast")
        if self.best_of is not None and self.best_of != self.n:
            raise ValueError(f"best_of: only best_of == n is supported, got best_of={self.best_of}, n={self.n}")
        prompt = self.prompt
        prompts = [prompt] if isinstance(prompt, str) or (prompt and isinstance(prompt[0], int)) else list(prompt)
        if not prompts:
            raise ValueError("prompt: the list of prompts is empty")
        return prompts

    def _body_field(self, name: str) -> str:
        return "prompt" + name[len("prompts"):] if name.startswith("prompts[") else name  # the engine's prompts[i]


class ContentPart(BaseModel):
    model_config = ConfigDict(strict=True, extra="allow")
    type: str
    text: str | None = None


class ChatMessage(BaseModel):
    model_config = ConfigDict(strict=True, extra="allow")  # tool calls and the like reach the template
    role: str
    content: str | list[ContentPart] | None = None

    def for_template(self) -> dict[str, Any]:
        """The message as the chat template reads it; text parts are joined with newlines (as vLLM)."""
        message = self.model_dump(exclude_none=True)
        if isinstance(self.content, list):
            if any(part.type != "text" or part.text is None for part in self.content):
                raise ValueError("messages: only text content parts ({type: text, text}) are supported")
            message["content"] = "\n".join(part.text for part in self.content)
        return message


class ChatCompletionRequest(SamplingFields):
    messages: list[ChatMessage]
    max_completion_tokens: int | None = None
    logprobs: bool = False
    top_logprobs: int | None = None
    add_generation_prompt: bool = True  # vLLM's extra field

    def max_new_tokens(self) -> int | None:
        """``max_completion_tokens`` or else ``max_tokens``; None: the model's default (see ``sampling_params``)."""
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens

    def _body_field(self, name: str) -> str:
        if name == "prompt" or name.startswith("prompts["):  # the one prompt is the rendered conversation
            return "messages"
        if name == "max_tokens" and self.max_completion_tokens is not None:
            return "max_completion_tokens"
        return "top_logprobs" if name == "logprobs" else name

    def num_logprobs(self) -> int | None:
        if self.top_logprobs is not None and not self.logprobs:
            raise ValueError("top_logprobs: needs logprobs=true")
        return (self.top_logprobs or 0) if self.logprobs else None


def error_body(message: str, status: int, param: str | None = None) -> dict:
    kind = {400: "BadRequestError", 404: "NotFoundError", 405: "MethodNotAllowedError"}.get(status)
    return {"error": {"message": message, "type": kind or ("InternalServerError" if status >= 500 else "Error"),
                      "param": param, "code": status}}


def _shown(value, limit: int = 80) -> str:
    """``repr(value)``, cut to ``limit`` characters: a message need not echo a megabyte of prompt back."""
    text = repr(value)
    return text if len(text) <= limit else f"{text[:limit - 3]}..."


def validation_message(errors: list[dict], content_type: str | None = None) -> tuple[str, str | None]:
    """One readable message (and the offending field) from pydantic's errors about a request body."""
    error = errors[0]
    loc = [str(part) for part in error["loc"] if part != "body"]
    if error["type"] == "json_invalid":
        return f"the request body is not valid JSON: {error.get('ctx', {}).get('error', error['msg'])}", None
    if not loc:
        if content_type and "json" not in content_type.lower():
            return f"the request body must be a JSON object sent as application/json, got {content_type!r}", None
        return "the request body must be a JSON object", None
    field = loc[0]
    if error["type"] == "missing":
        return f"{'.'.join(loc)}: this field is required", field
    got = error.get("input")
    union = next((part for part in reversed(loc) if part in EXPECTED), None)
    if union is not None:
        path = ".".join(loc[:loc.index(union) + 1])
        return f"{path}: expected {EXPECTED[union]}, got {_shown(got)}", field
    return f"{'.'.join(loc)}: {error['msg'].lower()}, got {_shown(got)}", field


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def completion_logprobs(out: CompletionOutput, text_offset: int) -> dict | None:
    """OpenAI's legacy ``{tokens, token_logprobs, top_logprobs, text_offset}`` of ``out``'s tokens; the
    engine's entries hold the sampled token and the top ones."""
    if out.logprobs is None:
        return None
    tokens = [entries[token].decoded_token or "" for token, entries in zip(out.token_ids, out.logprobs)]
    offsets = [text_offset + sum(len(t) for t in tokens[:i]) for i in range(len(tokens))]
    return {"tokens": tokens,
            "token_logprobs": [entries[token].logprob for token, entries in zip(out.token_ids, out.logprobs)],
            "top_logprobs": [{(p.decoded_token or ""): p.logprob for p in entries.values()}
                             for entries in out.logprobs],
            "text_offset": offsets}


def chat_logprobs(out: CompletionOutput, top: int) -> dict | None:
    """OpenAI's chat ``{content: [{token, logprob, bytes, top_logprobs}]}`` of ``out``'s tokens."""
    if out.logprobs is None:
        return None

    def entry(p: Logprob) -> dict:
        text = p.decoded_token or ""
        return {"token": text, "logprob": p.logprob, "bytes": list(text.encode())}

    return {"content": [
        {**entry(entries[token]),
         "top_logprobs": [entry(p) for p in sorted(entries.values(), key=lambda p: p.rank) if p.rank <= top]}
        for token, entries in zip(out.token_ids, out.logprobs)]}


def envelope(kind: str, request_id: str, model: str, choices: list[dict], created: int | None = None) -> dict:
    return {"id": request_id, "object": kind, "created": created or int(time.time()), "model": model,
            "choices": choices}
