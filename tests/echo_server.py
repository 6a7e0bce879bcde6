"""A small, real OpenAI-compatible HTTP server for testing the evaluation client.

Deterministic and rule-based, no model: each served model answers from its lookup
table (prompt text or last user message -> answer) and otherwise echoes the prompt in
upper case. It speaks the same wire format as ``mlx-tune serve``: ``GET /v1/models``,
``POST /v1/chat/completions``, ``POST /v1/completions``, ``GET /health``, streaming as
server-sent events ending in ``data: [DONE]``, ``usage`` (one token per character, so a
test can tell it from word counting), OpenAI error bodies (404 unknown model, 401 bad
key) a 500 for any prompt containing ``FAIL`` (a server fault on one row), and a
3 s pause for any prompt containing ``SLOW`` (a request that times out).

``serve_in_thread(app)`` runs it with uvicorn on a free 127.0.0.1 port.
"""

from __future__ import annotations

import asyncio
import json
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel


@dataclass
class FakeModel:
    answers: dict[str, str] = field(default_factory=dict)
    usage: bool = True  # False: a server that sends no token counts


class ChatMessage(BaseModel):
    role: str
    content: str


class StreamOptions(BaseModel):
    include_usage: bool = False


class ChatRequest(BaseModel):
    model: str
    messages: list[ChatMessage]
    max_tokens: int = 16
    temperature: float = 1.0
    stream: bool = False
    stream_options: StreamOptions | None = None


class CompletionRequest(BaseModel):
    model: str
    prompt: str
    max_tokens: int = 16
    temperature: float = 1.0
    stream: bool = False
    stream_options: StreamOptions | None = None


def _error(status: int, message: str, type_: str, code: str | None = None) -> JSONResponse:
    body = {"error": {"message": message, "type": type_, "param": None, "code": code}}
    return JSONResponse(body, status_code=status)


def make_app(models: dict[str, FakeModel], *, api_key: str | None = None, delay_s: float = 0.0) -> FastAPI:
    """The app; ``app.state.stats`` counts requests and the most ever in flight at once."""
    app = FastAPI()
    app.state.stats = {"requests": 0, "in_flight": 0, "max_in_flight": 0, "bodies": []}
    stats = app.state.stats

    @app.middleware("http")
    async def auth_and_count(request: Request, call_next):
        if api_key and request.headers.get("authorization") != f"Bearer {api_key}":
            return _error(401, "invalid or missing API key", "authentication_error", "invalid_api_key")
        if request.method != "POST":
            return await call_next(request)
        stats["requests"] += 1
        stats["in_flight"] += 1
        stats["max_in_flight"] = max(stats["max_in_flight"], stats["in_flight"])
        try:
            return await call_next(request)
        finally:
            stats["in_flight"] -= 1

    @app.get("/health")
    async def health():
        return {"status": "ok"}

    @app.get("/v1/models")
    async def list_models():
        data = [{"id": name, "object": "model", "created": 0, "owned_by": "echo"} for name in models]
        return {"object": "list", "data": data}

    def answer_for(model: str, text: str) -> str | JSONResponse:
        if model not in models:
            return _error(404, f"model '{model}' not found", "invalid_request_error", "model_not_found")
        if "FAIL" in text:
            return _error(500, "the echo server was told to fail on this prompt", "server_error")
        return models[model].answers.get(text, text.upper())

    def usage(model: str, prompt: str, answer: str) -> dict[str, int] | None:
        if not models[model].usage:
            return None
        return {"prompt_tokens": len(prompt), "completion_tokens": len(answer),
                "total_tokens": len(prompt) + len(answer)}

    async def respond(req, text: str, chat: bool):
        stats["bodies"].append(req.model_dump())
        if delay_s:
            await asyncio.sleep(delay_s)  # lets concurrent requests overlap
        if "SLOW" in text:
            await asyncio.sleep(3.0)  # longer than the client's --timeout in the tests
        answer = answer_for(req.model, text)
        if isinstance(answer, JSONResponse):
            return answer
        answer = answer[: req.max_tokens]  # one "token" per character
        use = usage(req.model, text, answer)
        base = {"id": "echo-1", "created": int(time.time()), "model": req.model}
        if not req.stream:
            choice = ({"index": 0, "message": {"role": "assistant", "content": answer}, "finish_reason": "stop"}
                      if chat else {"index": 0, "text": answer, "finish_reason": "stop"})
            obj = "chat.completion" if chat else "text_completion"
            return {**base, "object": obj, "choices": [choice], **({"usage": use} if use else {})}

        def chunk(piece: str | None, finish: str | None = None) -> str:
            if chat:
                choice = {"index": 0, "delta": {} if piece is None else {"content": piece}, "finish_reason": finish}
            else:
                choice = {"index": 0, "text": piece or "", "finish_reason": finish}
            obj = "chat.completion.chunk" if chat else "text_completion"
            return f"data: {json.dumps({**base, 'object': obj, 'choices': [choice]})}\n\n"

        async def events():
            yield ": keep-alive comment\n\n"
            if chat:
                yield f"data: {json.dumps({**base, 'choices': [{'index': 0, 'delta': {'role': 'assistant'}}]})}\n\n"
            for i, word in enumerate(answer.split(" ")):
                yield chunk(word if i == 0 else " " + word)
            yield chunk(None, "stop")
            if use and req.stream_options and req.stream_options.include_usage:
                yield f"data: {json.dumps({**base, 'choices': [], 'usage': use})}\n\n"
            yield "data: [DONE]\n\n"

        return StreamingResponse(events(), media_type="text/event-stream")

    @app.post("/v1/chat/completions")
    async def chat(req: ChatRequest):
        users = [m.content for m in req.messages if m.role == "user"]
        return await respond(req, users[-1] if users else "", chat=True)

    @app.post("/v1/completions")
    async def completions(req: CompletionRequest):
        return await respond(req, req.prompt, chat=False)

    return app


@contextmanager
def serve_in_thread(app: FastAPI) -> Iterator[str]:
    """Run ``app`` with uvicorn on a free 127.0.0.1 port; yields its base URL."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="off"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started:
        if time.monotonic() > deadline or not thread.is_alive():
            raise RuntimeError("echo server did not start")
        time.sleep(0.01)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=5)
        sock.close()


def free_port() -> int:
    """A port nothing listens on (bound then released)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
