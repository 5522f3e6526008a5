"""`llmfast serve`: vLLM's OpenAI-compatible HTTP API over one engine.

Why FastAPI on uvicorn: the server must hold many slow connections open at once (streams of server-sent
events) while one engine loop batches all of them, and notice when a client goes away. An asyncio server
does both in one process and one thread: each connection is a coroutine waiting on its request's queue,
and Starlette cancels a streaming response whose client disconnected, which aborts the request and frees
its KV blocks. A thread per connection (``http.server``) would need a lock around the engine and would only
learn of a disconnect when a write failed. FastAPI adds typed request bodies (pydantic), and the stack is
the one vLLM's own server uses, so SSE framing and error bodies behave as its clients expect.
"""
from __future__ import annotations

import asyncio
import json
import time
from contextlib import asynccontextmanager
from typing import AsyncIterator, Callable

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException

from llmfast.engine import LLM, CompletionOutput
from llmfast.server import protocol
from llmfast.server.async_engine import AsyncEngine, Request as EngineRequest
from llmfast.server.protocol import ChatCompletionRequest, CompletionRequest


Choice = Callable[[int, CompletionOutput], dict]


class APIError(Exception):
    def __init__(self, message: str, status: int = 400, param: str | None = None):
        super().__init__(message)
        self.status, self.param = status, param

    @classmethod
    def bad_value(cls, exc: ValueError, body: protocol.SamplingFields, fallback: str | None = None) -> APIError:
        """A 400 for an out-of-range value. llmfast's messages begin with the name they are about, which is
        rewritten to the body field it came from (a chat's ``max_tokens`` is its ``max_completion_tokens``);
        ``fallback`` is the param of a message that names no field."""
        name, sep, rest = str(exc).partition(":")
        field = body.field_named(name) if sep else name
        param = field.split("[", 1)[0]
        if param not in type(body).model_fields:
            return cls(str(exc), param=fallback)
        return cls(field + sep + rest, param=param)


def _error(message: str, status: int, param: str | None = None) -> JSONResponse:
    return JSONResponse(protocol.error_body(message, status, param), status_code=status)


async def _until_disconnected(request: Request) -> None:
    # the body has been read, so the next message the server hands over is the disconnect
    while (await request.receive())["type"] != "http.disconnect":
        pass


def _sse(payload: dict | str) -> str:
    return f"data: {payload if isinstance(payload, str) else json.dumps(payload)}\n\n"


def build_app(llm: LLM, model_name: str) -> FastAPI:
    """The FastAPI app serving ``llm`` under the model id ``model_name``."""
    engine = AsyncEngine(llm)
    created = int(time.time())

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        engine.start()
        yield
        await engine.stop()

    app = FastAPI(title="llmfast", lifespan=lifespan)
    app.state.engine = engine

    @app.exception_handler(RequestValidationError)
    async def _bad_body(request: Request, exc: RequestValidationError) -> JSONResponse:
        message, param = protocol.validation_message(list(exc.errors()), request.headers.get("content-type"))
        return _error(message, 400, param)

    @app.exception_handler(APIError)
    async def _api_error(request: Request, exc: APIError) -> JSONResponse:
        return _error(str(exc), exc.status, exc.param)

    @app.exception_handler(HTTPException)
    async def _http_error(request: Request, exc: HTTPException) -> JSONResponse:
        return _error(str(exc.detail), exc.status_code)

    @app.exception_handler(Exception)
    async def _server_error(request: Request, exc: Exception) -> JSONResponse:  # a bug of ours, never a client's
        return _error(f"internal server error: {type(exc).__name__}: {exc}", 500)

    @app.api_route("/health", methods=["GET", "HEAD"])  # HEAD too: load balancers probe with it
    async def health() -> dict:
        """Liveness, with the KV cache and queue counts (a disconnected client leaves no block behind)."""
        return {"status": "ok", "num_kv_blocks": llm.runner.num_kv_blocks,
                "num_free_kv_blocks": llm.block_manager.num_free_blocks,
                "num_running_seqs": len(llm.scheduler.running), "num_waiting_seqs": len(llm.scheduler.waiting),
                "num_aborted_requests": engine.num_aborted, "peak_running_seqs": engine.peak_running_seqs}

    @app.get("/v1/models")
    async def models() -> dict:
        return {"object": "list", "data": [{"id": model_name, "object": "model", "created": created,
                                            "owned_by": "llmfast", "max_model_len": llm.max_model_len}]}

    def check_model(model: str | None) -> None:
        if model is not None and model != model_name:
            raise APIError(f"The model `{model}` does not exist; this server serves `{model_name}`.", 404, "model")

    async def submit(body: protocol.SamplingFields, prompts: list, params, add_special_tokens: bool,
                     cap_max_tokens: bool = False) -> EngineRequest:
        try:
            return await engine.add(prompts, params, add_special_tokens, cap_max_tokens)
        except ValueError as exc:  # about the prompts (their tokens, their length)
            raise APIError.bad_value(exc, body, fallback=body.field_named("prompt")) from None

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, raw: Request) -> Response:
        check_model(body.model)
        try:
            prompts = body.prompts()
            params = body.sampling_params(body.max_tokens, body.logprobs, llm.sampling_defaults)
        except ValueError as exc:
            raise APIError.bad_value(exc, body) from None
        request = await submit(body, prompts, params, add_special_tokens=True, cap_max_tokens=body.max_tokens is None)
        offsets: dict[int, int] = {}  # per choice, the length of its text so far (logprobs' text_offset)

        def choice(index: int, out: CompletionOutput) -> dict:
            i = index * params.n + out.index
            logprobs = protocol.completion_logprobs(out, offsets.get(i, 0))
            offsets[i] = offsets.get(i, 0) + len(out.text)
            return {"index": i, "text": out.text, "logprobs": logprobs, "finish_reason": out.finish_reason,
                    "stop_reason": out.stop_reason}

        return await respond(raw, body, request, "text_completion", "cmpl", choice)

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatCompletionRequest, raw: Request) -> Response:
        check_model(body.model)
        tokenizer = llm.tokenizer
        if not body.messages:
            raise APIError("messages: expected at least one message", param="messages")
        if tokenizer is None or not getattr(tokenizer, "chat_template", None):
            raise APIError("this model's tokenizer has no chat template; use /v1/completions", param="messages")
        try:
            params = body.sampling_params(body.max_new_tokens(), body.num_logprobs(), llm.sampling_defaults)
            messages = [m.for_template() for m in body.messages]
            # the template writes the special tokens (bos, role markers): they are not added again
            text = tokenizer.apply_chat_template(messages, tokenize=False,
                                                 add_generation_prompt=body.add_generation_prompt)
        except ValueError as exc:
            raise APIError.bad_value(exc, body) from None
        except Exception as exc:  # the template itself refused the conversation (jinja's raise_exception)
            raise APIError(f"messages: the chat template failed: {exc}", param="messages") from None
        # no max_tokens in the body: the model's default (generation_config.json), cut to fit each prompt
        request = await submit(body, [text], params, add_special_tokens=False,
                               cap_max_tokens=body.max_new_tokens() is None)
        top = body.top_logprobs or 0
        started: set[int] = set()

        def choice(index: int, out: CompletionOutput) -> dict:
            logprobs = protocol.chat_logprobs(out, top)
            if body.stream:
                delta = {"content": out.text} if out.text or out.finish_reason is None else {}
                if out.index not in started:  # the first chunk of a choice names the role
                    started.add(out.index)
                    delta = {"role": "assistant", **delta}
                return {"index": out.index, "delta": delta, "logprobs": logprobs,
                        "finish_reason": out.finish_reason, "stop_reason": out.stop_reason}
            return {"index": out.index, "message": {"role": "assistant", "content": out.text},
                    "logprobs": logprobs, "finish_reason": out.finish_reason, "stop_reason": out.stop_reason}

        return await respond(raw, body, request, "chat.completion", "chatcmpl", choice)

    async def respond(raw: Request, body, request: EngineRequest, kind: str, prefix: str, choice: Choice) -> Response:
        """The whole response, or with ``stream: true`` an SSE stream of chunks ending ``data: [DONE]``;
        the request is aborted if the client disconnects first. ``choice(prompt index, output)`` is the JSON
        of one choice (of its new piece when streaming)."""
        request_id, created_at = protocol.new_id(prefix), int(time.time())
        num_prompt_tokens = sum(len(ids) for ids in request.prompt_token_ids)
        if body.stream:
            include_usage = body.stream_options is not None and body.stream_options.include_usage
            return StreamingResponse(stream(request, kind + ".chunk" if kind == "chat.completion" else kind,
                                            request_id, created_at, num_prompt_tokens, include_usage, choice),
                                     media_type="text/event-stream")
        outputs: dict[tuple[int, int], list] = {}
        collect = asyncio.ensure_future(_collect(request, outputs))
        watch = asyncio.ensure_future(_until_disconnected(raw))
        try:
            await asyncio.wait({collect, watch}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            watch.cancel()
            if not collect.done():  # the client left (or this handler was cancelled)
                collect.cancel()
                engine.abort(request)
        if not collect.done() or collect.cancelled():
            return Response(status_code=499)
        if collect.exception() is not None:
            return _error(str(collect.exception()), 500)
        choices, num_tokens = [], 0
        for (index, _), pieces in sorted(outputs.items()):
            last = pieces[-1]
            last.text = "".join(p.text for p in pieces)
            last.token_ids = [t for p in pieces for t in p.token_ids]
            if last.logprobs is not None:
                last.logprobs = [entry for p in pieces for entry in p.logprobs]
            num_tokens += len(last.token_ids)
            choices.append(choice(index, last))
        response = protocol.envelope(kind, request_id, model_name, choices, created_at)
        return JSONResponse({**response, "usage": protocol.usage(num_prompt_tokens, num_tokens)})

    async def _collect(request: EngineRequest, outputs: dict) -> None:
        async for index, piece in engine.results(request):
            outputs.setdefault((index, piece.index), []).append(piece)

    async def stream(request: EngineRequest, kind: str, request_id: str, created_at: int, num_prompt_tokens: int,
                     include_usage: bool, choice: Choice) -> AsyncIterator[str]:
        num_tokens = 0
        try:
            async for index, piece in engine.results(request):
                num_tokens += len(piece.token_ids)
                chunk = protocol.envelope(kind, request_id, model_name, [choice(index, piece)], created_at)
                yield _sse(chunk)
            if include_usage:
                chunk = protocol.envelope(kind, request_id, model_name, [], created_at)
                yield _sse({**chunk, "usage": protocol.usage(num_prompt_tokens, num_tokens)})
        except RuntimeError as exc:  # the engine failed mid-stream: say so in the stream
            yield _sse(protocol.error_body(str(exc), 500))
        finally:  # also when Starlette cancels the stream because the client disconnected
            engine.abort(request)
        yield _sse("[DONE]")

    return app


def serve(llm: LLM, model_name: str, host: str = "127.0.0.1", port: int = 8000, log_level: str = "info") -> None:
    """Serves ``llm`` until interrupted (SIGINT or SIGTERM)."""
    import uvicorn

    uvicorn.run(build_app(llm, model_name), host=host, port=port, log_level=log_level, timeout_graceful_shutdown=5)
