"""The HTTP routes (FastAPI). Generation lives in ``engine``, wire shapes in ``schemas``.

Every error a client can cause answers ``{"error": {"message", "type", "param", "code"}}``
with a 4xx status: validation errors become 400 naming the field (FastAPI's own 422 is
replaced), a missing or wrong API key 401, an unknown model or adapter 404, a body over
the limit 413, a full queue 429 with Retry-After.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import re

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from mlx_tune.server.engine import Delta, Done, Engine, Failed
from mlx_tune.server.errors import ApiError
from mlx_tune.server.protocol import Preparer, ResponseBuilder, context_window, total_usage
from mlx_tune.server.registry import ModelRegistry
from mlx_tune.server.schemas import (
    AdapterCard,
    AdapterLoadRequest,
    ChatCompletion,
    ChatCompletionRequest,
    Completion,
    CompletionRequest,
    ErrorResponse,
    Health,
    ModelCard,
    ModelList,
)

log = logging.getLogger(__name__)

DISCONNECT_POLL_S = 0.5  # how often a non-streaming request checks that its client is still there
KEYED_PATHS = ("/v1", "/studio/api")  # the studio page itself is static; its data is behind the key
_IDENT = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
_ERRORS = {status: {"model": ErrorResponse} for status in (400, 401, 404, 413, 429)}
_STREAMABLE = {200: {"content": {"text/event-stream": {"schema": {"type": "string"}}}}}


def error_response(exc: ApiError) -> JSONResponse:
    return JSONResponse(exc.body(), status_code=exc.status, headers=exc.headers)


def _field(loc) -> str | None:
    # pydantic puts union members (str, list[int], constrained-str, ...) in the location
    # too: they are not fields.
    skip = {"body", "query", "path", "header", "str", "int", "float", "bool", "list", "dict"}
    parts = [str(p) for p in loc if isinstance(p, int) or (_IDENT.match(str(p)) and p not in skip)]
    return ".".join(parts) or None


def validation_error(exc: RequestValidationError) -> ApiError:
    errors = exc.errors()
    if any(e.get("type") == "json_invalid" for e in errors):
        return ApiError(400, "the request body is not valid JSON", code="invalid_json")
    problems, first = [], None
    for e in errors:
        name = _field(e.get("loc", ()))
        first = first or name
        line = f"{name}: {e.get('msg')}" if name else str(e.get("msg"))
        if line not in problems:
            problems.append(line)
    message = "; ".join(problems[:5]) + (f" (and {len(problems) - 5} more)" if len(problems) > 5 else "")
    return ApiError(400, message or "invalid request", param=first, code="invalid_value")


class Guard:
    """ASGI middleware: API key on ``/v1/*`` and ``/studio/api/*`` and a request body limit, before any route runs."""

    def __init__(self, app, api_key: str | None, max_body_bytes: int):
        self.app = app
        self.api_key = api_key
        self.max_body_bytes = max_body_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", [])}
        if self.api_key and scope["path"].startswith(KEYED_PATHS) and scope.get("method") != "OPTIONS":
            given = headers.get("authorization", "")
            token = given[7:].strip() if given[:7].lower() == "bearer " else ""
            if not hmac.compare_digest(token.encode(), self.api_key.encode()):
                why = "missing" if not given else "wrong"
                err = ApiError(401, f"{why} API key: send 'Authorization: Bearer KEY' with the server's --api-key",
                               code="invalid_api_key")
                return await self._reply(err, scope, receive, send)
        length = headers.get("content-length")
        if length is not None and length.isdigit() and int(length) > self.max_body_bytes:
            return await self._reply(self._too_large(), scope, receive, send)
        if scope.get("method") in ("POST", "PUT", "PATCH"):
            # Read the body here (bounded), then hand it to the app: chunked bodies without
            # a length are limited too.
            chunks, size = [], 0
            while True:
                message = await receive()
                if message["type"] == "http.disconnect":
                    return
                chunk = message.get("body", b"")
                size += len(chunk)
                if size > self.max_body_bytes:
                    return await self._reply(self._too_large(), scope, receive, send)
                chunks.append(chunk)
                if not message.get("more_body", False):
                    break
            body = b"".join(chunks)
            sent = False

            async def replay():
                nonlocal sent
                if not sent:
                    sent = True
                    return {"type": "http.request", "body": body, "more_body": False}
                return await receive()

            return await self.app(scope, replay, send)
        return await self.app(scope, receive, send)

    def _too_large(self) -> ApiError:
        return ApiError(413, f"request body over {self.max_body_bytes} bytes", code="request_too_large")

    @staticmethod
    async def _reply(err: ApiError, scope, receive, send) -> None:
        await error_response(err)(scope, receive, send)


def create_app(registry: ModelRegistry, engine: Engine, *, api_key: str | None = None,
               max_body_bytes: int = 4_000_000, cors_origins: list[str] | None = None,
               context: int | None = None) -> FastAPI:
    """The FastAPI app; starts the engine's worker with the app and stops it at shutdown."""
    from contextlib import asynccontextmanager

    @asynccontextmanager
    async def lifespan(_app):
        engine.start()
        yield
        engine.stop()

    app = FastAPI(title="mlx_tune server", version="1", lifespan=lifespan,
                  description="OpenAI-compatible API over one base model and its LoRA adapters.")
    preparer = Preparer(registry, context if context is not None else context_window(registry.model, registry.info))
    app.state.registry, app.state.engine, app.state.preparer = registry, engine, preparer

    @app.exception_handler(ApiError)
    async def _api_error(_request, exc: ApiError):
        return error_response(exc)

    @app.exception_handler(RequestValidationError)
    async def _invalid(_request, exc: RequestValidationError):
        return error_response(validation_error(exc))

    @app.exception_handler(StarletteHTTPException)
    async def _http(_request, exc: StarletteHTTPException):
        err = ApiError(exc.status_code, str(exc.detail), code="not_found" if exc.status_code == 404 else None)
        return error_response(err)

    @app.exception_handler(Exception)
    async def _bug(_request, exc: Exception):
        log.exception("unhandled error")
        return error_response(ApiError(500, f"internal error: {type(exc).__name__}", code="internal_error"))

    # -- models and health ----------------------------------------------------------------
    def cards() -> list[ModelCard]:
        out = [ModelCard(id=name, created=registry.created, kind="base") for name in registry.base_names]
        out += [ModelCard(id=e.name, created=e.created, kind="adapter", resident=e.name in registry.resident)
                for _, e in sorted(registry.entries.items())]
        return out

    @app.get("/v1/models", response_model=ModelList, responses=_ERRORS)
    async def list_models():
        return ModelList(data=cards())

    @app.get("/v1/models/{model_id:path}", response_model=ModelCard, responses=_ERRORS)
    async def get_model(model_id: str):
        for card in cards():
            if card.id == model_id:
                return card
        registry.resolve(model_id)  # raises the 404 naming what is served
        raise ApiError(404, f"model '{model_id}' does not exist", param="model")

    @app.get("/health", response_model=Health)
    async def health():
        s = engine.stats()
        return Health(model=registry.source, adapters=sorted(registry.entries), queued=s["queued"],
                      running=s["running"])

    # -- generation ------------------------------------------------------------------------
    async def generate(kind: str, req, gen, request: Request, echo: tuple | None = None) -> object:
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue = asyncio.Queue()
        job = engine.submit(gen, lambda event: loop.call_soon_threadsafe(queue.put_nowait, event))
        include_usage = bool(req.stream_options and req.stream_options.include_usage)
        # One builder per answer (n > 1), all under one response id.
        builders = [ResponseBuilder(kind, req.model, gen.logprobs is not None, include_usage, gen, index=i)
                    for i in range(gen.n)]
        for b in builders[1:]:
            b.id, b.created = builders[0].id, builders[0].created
        if echo is not None:
            for b in builders:
                b.echo(*echo)
        if req.stream:
            return StreamingResponse(_stream(builders, queue, job), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        done: dict[int, Done] = {}
        try:
            checked = loop.time()
            while True:
                try:
                    event = await asyncio.wait_for(queue.get(), timeout=DISCONNECT_POLL_S)
                except asyncio.TimeoutError:
                    event = None
                if loop.time() - checked >= DISCONNECT_POLL_S:
                    checked = loop.time()
                    if await request.is_disconnected():  # nobody is waiting for the answer
                        job.cancel()
                        return JSONResponse({"error": "client disconnected"}, status_code=499)
                if isinstance(event, Delta):
                    builders[event.index].add(event)
                elif isinstance(event, Done):
                    done[event.index] = event
                    if len(done) == len(builders):
                        return _merged(builders, done)
                elif isinstance(event, Failed):
                    raise event.error
        finally:
            job.cancel()  # a no-op once finished; stops the work if the client went away
            engine.wake()

    def _merged(builders: list[ResponseBuilder], done: dict[int, Done]):
        response = builders[0].final(done[0])
        for i, b in enumerate(builders[1:], start=1):
            response.choices.append(b.final(done[i]).choices[0])
        if len(builders) > 1:
            response.usage = total_usage(done)
        return response

    async def _stream(builders: list[ResponseBuilder], queue: asyncio.Queue, job):
        try:
            for b in builders:
                first = b.first_chunk()
                if first:
                    yield first
            done: dict[int, Done] = {}
            while len(done) < len(builders):
                event = await queue.get()
                if isinstance(event, Delta):
                    yield builders[event.index].chunk(event)
                elif isinstance(event, Done):
                    done[event.index] = event
                    yield builders[event.index].chunk(None, event.finish_reason)
                elif isinstance(event, Failed):
                    yield builders[0].sse(json.dumps(event.error.body()))
                    break
            else:
                if builders[0].include_usage:
                    yield builders[0].usage_chunk(done[0], total_usage(done))
            yield "data: [DONE]\n\n"
        finally:
            job.cancel()
            engine.wake()

    @app.post("/v1/chat/completions", response_model=ChatCompletion, responses={**_ERRORS, **_STREAMABLE})
    async def chat_completions(req: ChatCompletionRequest, request: Request):
        return await generate("chat", req, preparer.chat(req), request)

    @app.post("/v1/completions", response_model=Completion, responses={**_ERRORS, **_STREAMABLE})
    async def completions(req: CompletionRequest, request: Request):
        gen = preparer.completion(req)
        echo = None
        if req.echo:  # the prompt comes back first, with its own tokens' logprobs when asked
            from mlx_tune.server.scoring import prompt_logprobs

            infos = None
            if req.logprobs is not None:
                infos = await run_in_threadpool(engine.call, prompt_logprobs, registry, gen.adapter, gen.prompt,
                                                req.logprobs)
            text = req.prompt if isinstance(req.prompt, str) else registry.tokenizer.decode(gen.prompt)
            echo = (text if isinstance(text, str) else text[0], infos, registry.tokenizer.decode(gen.prompt[:1]))
        return await generate("completion", req, gen, request, echo)

    # -- adapters --------------------------------------------------------------------------
    def card(entry) -> AdapterCard:
        return AdapterCard(name=entry.name, path=entry.path, rank=entry.rank, resident=entry.name in registry.resident)

    @app.get("/v1/adapters", response_model=list[AdapterCard], responses=_ERRORS)
    async def list_adapters():
        return [card(e) for _, e in sorted(registry.entries.items())]

    @app.post("/v1/adapters", response_model=AdapterCard, status_code=201,
              responses={**_ERRORS, 403: {"model": ErrorResponse}, 409: {"model": ErrorResponse}})
    async def load_adapter(req: AdapterLoadRequest):
        entry = await run_in_threadpool(engine.call, registry.add, req.name, req.path)
        return card(entry)

    @app.delete("/v1/adapters/{name}", response_model=AdapterCard, responses={**_ERRORS, 409: {"model": ErrorResponse}})
    async def unload_adapter(name: str):
        entry = await run_in_threadpool(engine.call, registry.remove, name)
        return AdapterCard(name=entry.name, path=entry.path, rank=entry.rank, resident=False)

    if cors_origins:
        from fastapi.middleware.cors import CORSMiddleware

        app.add_middleware(CORSMiddleware, allow_origins=list(cors_origins), allow_methods=["*"],
                           allow_headers=["*"])
    app.add_middleware(Guard, api_key=api_key, max_body_bytes=max_body_bytes)
    return app
