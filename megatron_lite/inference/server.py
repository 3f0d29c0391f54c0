"""OpenAI-compatible HTTP API over one loaded model (FastAPI + uvicorn).

    POST /v1/chat/completions   messages, max_tokens, temperature, top_p, stop, seed, stream (SSE)
    POST /v1/completions        prompt, same sampling fields, stream
    GET  /v1/models             the one model served

Extensions accepted in the body: top_k, repetition_penalty. Errors use OpenAI's shape,
{"error": {"message", "type", "param", "code"}}, with 400 for bad requests, 413 for oversized bodies.

One generation runs at a time (an asyncio lock): requests queue instead of competing for the same
cores, and each keeps its own KV cache and RNG so concurrent clients never see each other's tokens.
Streaming steps run in a worker thread, so the event loop keeps accepting connections meanwhile.
"""
from __future__ import annotations

import asyncio
import json
import time
import uuid
from dataclasses import dataclass
from typing import AsyncIterator

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from megatron_lite.data.chat_format import MessageError, normalize_messages
from megatron_lite.errors import UserError
from megatron_lite.inference.chat import chat_prompt_ids
from megatron_lite.inference.generate import Completion, SamplingParams, StreamEvent, generate, stream


@dataclass
class Limits:
    max_tokens: int = 1024  # largest max_tokens a request may ask for (also capped by the context window)
    default_max_tokens: int = 256
    max_body_bytes: int = 1 << 20
    max_prompt_tokens: int | None = None  # default: the model's max_seq_len - 1
    body_timeout_s: float = 30.0  # a client that sends its body slower than this gets 408 (slowloris)
    queue_timeout_s: float = 300.0  # a request waiting longer than this for the model gets 503
    max_concurrency: int = 64  # open connections; uvicorn answers 503 beyond (bounds memory under load)


class ApiError(Exception):
    def __init__(self, message: str, param: str | None = None, status: int = 400, code: str | None = None,
                 kind: str = "invalid_request_error"):
        super().__init__(message)
        self.message, self.param, self.status, self.code, self.kind = message, param, status, code, kind


def error_body(e: ApiError) -> dict:
    return {"error": {"message": e.message, "type": e.kind, "param": e.param, "code": e.code}}


# ---------------------------------------------------------------- request validation

def _number(body, key, default, lo, hi, integer=False, lo_open=False):
    v = body.get(key, default)
    if v is None:
        return default
    if isinstance(v, bool) or not isinstance(v, (int, float)) or (integer and not isinstance(v, int)):
        raise ApiError(f"'{key}' must be {'an integer' if integer else 'a number'}", key)
    if v < lo or (lo_open and v == lo) or v > hi:
        raise ApiError(f"'{key}' must be in {'(' if lo_open else '['}{lo}, {hi}], got {v}", key)
    return v


def sampling_from_body(body: dict, limits: Limits) -> SamplingParams:
    max_tokens = body.get("max_completion_tokens", body.get("max_tokens"))
    key = "max_completion_tokens" if "max_completion_tokens" in body else "max_tokens"
    max_tokens = _number({key: max_tokens}, key, limits.default_max_tokens, 1, limits.max_tokens, integer=True)
    if _number(body, "n", 1, 1, 1, integer=True) != 1:
        raise ApiError("only n = 1 is supported", "n")
    stop = body.get("stop") or []
    if isinstance(stop, str):
        stop = [stop]
    if not isinstance(stop, list) or len(stop) > 4 or not all(isinstance(s, str) for s in stop):
        raise ApiError("'stop' must be a string or a list of at most 4 strings", "stop")
    seed = body.get("seed")
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
        raise ApiError("'seed' must be an integer", "seed")
    for ignored in ("presence_penalty", "frequency_penalty"):
        _number(body, ignored, 0.0, -2.0, 2.0)
    if not isinstance(body.get("stream", False), bool):
        raise ApiError("'stream' must be a boolean", "stream")
    return SamplingParams(
        max_new_tokens=max_tokens,
        temperature=float(_number(body, "temperature", 1.0, 0.0, 2.0)),
        top_p=float(_number(body, "top_p", 1.0, 0.0, 1.0, lo_open=True)),
        top_k=_number(body, "top_k", 0, 0, 1 << 20, integer=True),
        repetition_penalty=float(_number(body, "repetition_penalty", 1.0, 0.0, 10.0, lo_open=True)),
        stop=tuple(stop), seed=seed)


def messages_from_body(body: dict) -> list[dict]:
    if body.get("messages") is None:
        raise ApiError("'messages' is required", "messages")
    try:
        return normalize_messages(body["messages"])
    except MessageError as e:
        raise ApiError(str(e), e.param) from None


def prompt_from_body(body: dict) -> str:
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
        prompt = prompt[0]
    if not isinstance(prompt, str):
        raise ApiError("'prompt' is required and must be a string", "prompt")
    return prompt


def _body_too_large(limits: Limits) -> ApiError:
    return ApiError(f"request body over {limits.max_body_bytes} bytes", status=413, code="body_too_large")


async def _read_body(request: Request, limits: Limits) -> bytes:
    raw = b""
    async for chunk in request.stream():
        raw += chunk
        if len(raw) > limits.max_body_bytes:
            raise _body_too_large(limits)
    return raw


async def read_json(request: Request, limits: Limits) -> dict:
    """The request's JSON object body: 413 when too large, 408 when too slow, 400 when not a JSON object."""
    length = request.headers.get("content-length")
    if length is not None and length.isdigit() and int(length) > limits.max_body_bytes:
        raise _body_too_large(limits)
    try:
        raw = await asyncio.wait_for(_read_body(request, limits), limits.body_timeout_s)
    except asyncio.TimeoutError:
        raise ApiError(f"request body not received within {limits.body_timeout_s:g} s", status=408,
                       code="timeout") from None
    try:
        body = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ApiError(f"request body is not valid JSON: {e}") from None
    except RecursionError:  # [[[[...]]]] nested deeper than the parser's stack: not a 500
        raise ApiError("request body is nested too deeply") from None
    if not isinstance(body, dict):
        raise ApiError("request body must be a JSON object")
    return body


# ---------------------------------------------------------------- the model, one request at a time

class ModelRunner:
    """Prompts checked against the context window, and generations run one at a time under a lock."""

    def __init__(self, model, tokenizer, limits: Limits):
        self.model, self.tokenizer, self.limits = model, tokenizer, limits
        self.max_prompt = limits.max_prompt_tokens or model.config.max_seq_len - 1
        self.lock = asyncio.Lock()

    def chat_prompt(self, messages: list[dict]) -> list[int]:
        try:
            ids = chat_prompt_ids(self.tokenizer, messages)
        except Exception as e:  # a template that rejects this conversation (e.g. role order)
            raise ApiError(f"cannot apply the chat template: {e}", "messages") from None
        return self._checked(ids, "messages")

    def text_prompt(self, prompt: str) -> list[int]:
        return self._checked(self.tokenizer(prompt, add_special_tokens=False)["input_ids"], "prompt")

    def _checked(self, ids: list[int], param: str) -> list[int]:
        if not ids:
            raise ApiError("prompt is empty", param)
        if len(ids) > self.max_prompt:
            raise ApiError(f"prompt is {len(ids)} tokens; this model takes at most {self.max_prompt}", param,
                           code="context_length_exceeded")
        return ids

    async def complete(self, ids: list[int], params: SamplingParams) -> Completion:
        # Requests queue for the one model; a queue that does not move within the timeout gets a clear 503
        # instead of a client-side timeout with no answer.
        try:
            await asyncio.wait_for(self.lock.acquire(), self.limits.queue_timeout_s)
        except asyncio.TimeoutError:
            raise ApiError(f"server busy: no slot within {self.limits.queue_timeout_s:g} s; retry later",
                           status=503, code="server_busy", kind="server_error") from None
        try:
            return (await asyncio.to_thread(generate, self.model, self.tokenizer, [ids], params))[0]
        finally:
            self.lock.release()

    async def stream_events(self, ids: list[int], params: SamplingParams) -> AsyncIterator[StreamEvent]:
        """StreamEvents generated step by step in a worker thread under the lock."""
        end = object()
        async with self.lock:
            it = stream(self.model, self.tokenizer, ids, params)
            while (event := await asyncio.to_thread(next, it, end)) is not end:
                yield event


# ---------------------------------------------------------------- responses

def response_head(id_prefix: str, kind: str, body: dict, model_name: str) -> dict:
    return {"id": f"{id_prefix}-{uuid.uuid4().hex}", "object": kind, "created": int(time.time()),
            "model": body.get("model") or model_name}


def usage(c: Completion) -> dict:
    return {"prompt_tokens": c.prompt_tokens, "completion_tokens": c.completion_tokens,
            "total_tokens": c.prompt_tokens + c.completion_tokens}


def sse(obj) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"


SSE_DONE = "data: [DONE]\n\n"


def event_stream(chunks: AsyncIterator[str]) -> StreamingResponse:
    return StreamingResponse(chunks, media_type="text/event-stream")


def chat_completion(head: dict, c: Completion) -> dict:
    return {**head, "choices": [{"index": 0, "message": {"role": "assistant", "content": c.text},
                                 "finish_reason": c.finish_reason, "logprobs": None}],
            "usage": usage(c)}


async def chat_completion_chunks(head: dict, events: AsyncIterator[StreamEvent],
                                 include_usage: bool) -> AsyncIterator[str]:
    """SSE lines: the assistant role, content deltas, the finish reason, usage when asked, [DONE]."""
    head = {**head, "object": "chat.completion.chunk"}
    yield sse({**head, "choices": [{"index": 0, "delta": {"role": "assistant", "content": ""},
                                    "finish_reason": None}]})
    async for ev in events:
        if ev.text:
            yield sse({**head, "choices": [{"index": 0, "delta": {"content": ev.text}, "finish_reason": None}]})
        if ev.finish_reason:
            yield sse({**head, "choices": [{"index": 0, "delta": {}, "finish_reason": ev.finish_reason}]})
            if include_usage:
                yield sse({**head, "choices": [], "usage": usage(ev.completion)})
    yield SSE_DONE


def text_completion(head: dict, c: Completion) -> dict:
    return {**head, "choices": [{"index": 0, "text": c.text, "finish_reason": c.finish_reason,
                                 "logprobs": None}], "usage": usage(c)}


async def text_completion_chunks(head: dict, events: AsyncIterator[StreamEvent]) -> AsyncIterator[str]:
    async for ev in events:
        if ev.text or ev.finish_reason:
            yield sse({**head, "choices": [{"index": 0, "text": ev.text, "logprobs": None,
                                            "finish_reason": ev.finish_reason}]})
    yield SSE_DONE


# ---------------------------------------------------------------- app

def add_error_handlers(app: FastAPI):
    """Every error, ours or the framework's, in OpenAI's error shape."""

    @app.exception_handler(ApiError)
    async def _api_error(_req, e: ApiError):
        return JSONResponse(error_body(e), status_code=e.status)

    @app.exception_handler(UserError)
    async def _user_error(_req, e: UserError):
        return JSONResponse(error_body(ApiError(str(e))), status_code=400)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(_req, e):
        kind = "not_found_error" if e.status_code == 404 else "invalid_request_error"
        return JSONResponse(error_body(ApiError(str(e.detail), status=e.status_code, kind=kind)),
                            status_code=e.status_code)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(_req, e):
        return JSONResponse(error_body(ApiError(str(e.errors()[:1]))), status_code=400)


def create_app(model, tokenizer, model_name: str = "megatron-lite", limits: Limits | None = None):
    limits = limits or Limits()
    runner = ModelRunner(model, tokenizer, limits)
    created = int(time.time())
    app = FastAPI(title="megatron_lite", docs_url=None, redoc_url=None)
    add_error_handlers(app)

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": model_name, "object": "model", "created": created,
                                            "owned_by": "megatron_lite"}]}

    @app.get("/health")
    async def health():
        return {"status": "ok"}

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        body = await read_json(request, limits)
        messages = messages_from_body(body)
        params = sampling_from_body(body, limits)
        ids = runner.chat_prompt(messages)
        head = response_head("chatcmpl", "chat.completion", body, model_name)
        if not body.get("stream"):
            return chat_completion(head, await runner.complete(ids, params))
        include_usage = bool((body.get("stream_options") or {}).get("include_usage"))
        return event_stream(chat_completion_chunks(head, runner.stream_events(ids, params), include_usage))

    @app.post("/v1/completions")
    async def completions(request: Request):
        body = await read_json(request, limits)
        prompt = prompt_from_body(body)
        params = sampling_from_body({"max_tokens": 16, **body}, limits)
        ids = runner.text_prompt(prompt)
        head = response_head("cmpl", "text_completion", body, model_name)
        if not body.get("stream"):
            return text_completion(head, await runner.complete(ids, params))
        return event_stream(text_completion_chunks(head, runner.stream_events(ids, params)))

    return app


def serve(model, tokenizer, host: str = "127.0.0.1", port: int = 8000, model_name: str = "megatron-lite",
          limits: Limits | None = None, log_level: str = "info"):
    import uvicorn

    if limits is None:
        limits = Limits(max_tokens=model.config.max_seq_len)
    uvicorn.run(create_app(model, tokenizer, model_name, limits), host=host, port=port, log_level=log_level,
                limit_concurrency=limits.max_concurrency, timeout_keep_alive=5)


__all__ = ["create_app", "serve", "Limits", "ApiError"]
