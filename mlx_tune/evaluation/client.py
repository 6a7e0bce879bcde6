"""A small OpenAI-compatible HTTP client (httpx; no ``openai`` package at run time).

Chat rows go to ``POST /v1/chat/completions``, prompt rows to ``POST /v1/completions``.
With ``stream=True`` the answer is read as server-sent events: ``data: {chunk}`` lines
until ``data: [DONE]``; the text is the concatenation of ``choices[0].delta.content``
(chat) or ``choices[0].text`` (completions), and ``usage`` comes from the chunk that
carries it (``stream_options.include_usage`` asks for it).

Errors the user must fix before anything runs (server down, bad API key, unknown
model) raise ``UserError``; a failure on one request is returned in ``Answer.error``
so the run can go on.
"""

from __future__ import annotations

import json
import sys
import time
from dataclasses import dataclass
from typing import Any

import httpx

from mlx_tune.errors import UserError
from mlx_tune.evaluation.prompts import PromptRow

START_HINT = "start it with `./convert_and_serve.sh CONFIG.yaml` or `mlx-tune serve --model SOURCE`"


class ServerUnreachable(UserError):
    """Nothing answers at the base URL."""


class UnknownModel(UserError):
    """The server does not list the requested model."""


@dataclass
class Answer:
    """What came back for one row: text, timing, token count (None when not reported)."""

    output: str = ""
    latency_s: float = 0.0
    completion_tokens: int | None = None
    ttft_s: float | None = None
    error: str | None = None


def api_root(base_url: str) -> str:
    """``http://host:port`` from a URL given with or without ``/v1`` and trailing slashes."""
    url = base_url.strip()
    if "://" not in url:
        url = "http://" + url
    url = url.rstrip("/")
    try:
        parsed = httpx.URL(url)
    except (httpx.InvalidURL, ValueError) as exc:
        raise UserError(f"--base-url {base_url!r} is not a valid URL ({exc}); e.g. http://127.0.0.1:8080") from None
    if parsed.scheme not in ("http", "https") or not parsed.host:
        raise UserError(f"--base-url {base_url!r} must be an http:// or https:// URL, e.g. http://127.0.0.1:8080")
    return url[: -len("/v1")] if url.endswith("/v1") else url


def _error_text(response: httpx.Response) -> str:
    """``HTTP 404: message`` using the OpenAI error body when there is one."""
    try:
        body = response.json()
        err = body.get("error") if isinstance(body, dict) else None
        message = err.get("message") if isinstance(err, dict) else (err or body.get("detail"))
        message = message if isinstance(message, str) else json.dumps(body)[:300]
    except (ValueError, AttributeError):
        message = response.text[:300] or response.reason_phrase
    return f"HTTP {response.status_code}: {message}"


class OpenAIClient:
    """Sends rows to one server; safe to share between threads (httpx pools connections)."""

    def __init__(self, base_url: str, *, api_key: str | None = None, timeout: float = 120.0,
                 concurrency: int = 1):
        self.root = api_root(base_url)
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self._http = httpx.Client(
            base_url=self.root,
            headers=headers,
            timeout=httpx.Timeout(timeout, connect=min(timeout, 10.0)),
            limits=httpx.Limits(max_connections=max(concurrency, 1) + 2),
            # Never pick up a proxy for a local server from the environment.
            trust_env=False,
        )
        self.timeout = timeout

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> OpenAIClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- models ---------------------------------------------------------------------------
    def list_models(self) -> tuple[list[str] | None, str]:
        """``(ids, "")`` from ``GET /v1/models``, or ``(None, why)`` when the server gives no list.

        Some servers have no such route or a broken one (mlx_lm.server answers an empty
        200 when the Hugging Face cache is absent); that is not fatal when ``--model``
        names the model. Unreachable servers and refused keys are.
        """
        url = f"{self.root}/v1/models"
        try:
            response = self._http.get("/v1/models")
        except httpx.TransportError as exc:
            raise ServerUnreachable(
                f"cannot reach the server at {url} ({type(exc).__name__}: {exc or 'no answer'}); {START_HINT}"
            ) from None
        if response.status_code in (401, 403):
            raise UserError(
                f"the server at {url} refused the request ({_error_text(response)}); "
                "pass --api-key KEY or set MLX_TUNE_API_KEY"
            )
        if response.status_code >= 400:
            return None, _error_text(response)
        try:
            data = response.json()["data"]
            return [m["id"] for m in data if isinstance(m, dict) and "id" in m], ""
        except (ValueError, KeyError, TypeError):
            return None, f"not an OpenAI model list: {response.text[:100]!r}"

    def resolve_model(self, name: str | None, *, check: bool = True) -> str:
        """The model to ask for: ``name`` checked against ``/v1/models``, or the first listed."""
        if name is not None and not check:
            return name
        models, why = self.list_models()
        url = f"{self.root}/v1/models"
        if models is None:
            if name is None:
                raise UserError(f"GET {url} gave no model list ({why}); pass --model NAME")
            print(f"warning: GET {url} gave no model list ({why}); using --model {name} unchecked",
                  file=sys.stderr)
            return name
        if name is None:
            if not models:
                raise UnknownModel(f"the server at {self.root} lists no models at {url}; pass --model NAME")
            return models[0]
        if name in models:
            return name
        if f"{name}:latest" in models:  # Ollama tags
            return f"{name}:latest"
        listed = ", ".join(models) if models else "(none)"
        raise UnknownModel(
            f"model '{name}' is not served at {self.root}; known models: {listed} "
            "(--skip-model-check for servers that load models on demand)"
        )

    # -- one request ----------------------------------------------------------------------
    def ask(self, row: PromptRow, model: str, *, max_tokens: int, temperature: float,
            stream: bool = False) -> Answer:
        """Send one row; never raises for a server or network failure (see ``Answer.error``)."""
        route = "/v1/chat/completions" if row.is_chat else "/v1/completions"
        body: dict[str, Any] = {"model": model, "max_tokens": max_tokens, "temperature": temperature}
        body.update({"messages": row.messages} if row.is_chat else {"prompt": row.prompt})
        if stream:
            body["stream"] = True
            body["stream_options"] = {"include_usage": True}
        start = time.perf_counter()
        try:
            if stream:
                answer = self._ask_stream(route, body, row.is_chat, start)
            else:
                answer = self._ask_once(route, body, row.is_chat)
        except httpx.TimeoutException:
            answer = Answer(error=f"timed out after {self.timeout:g} s")
        except httpx.TransportError as exc:
            answer = Answer(error=f"connection failed: {type(exc).__name__}: {exc}")
        answer.latency_s = time.perf_counter() - start
        return answer

    def _ask_once(self, route: str, body: dict, is_chat: bool) -> Answer:
        response = self._http.post(route, json=body)
        if response.status_code >= 400:
            return Answer(error=_error_text(response))
        try:
            payload = response.json()
            choice = payload["choices"][0]
            text = (choice.get("message") or {}).get("content") if is_chat else choice.get("text")
        except (ValueError, KeyError, IndexError, TypeError, AttributeError):
            return Answer(error=f"malformed response from {route}: {response.text[:200]}")
        return Answer(output=text or "", completion_tokens=_completion_tokens(payload))

    def _ask_stream(self, route: str, body: dict, is_chat: bool, start: float) -> Answer:
        answer = Answer()
        parts: list[str] = []
        with self._http.stream("POST", route, json=body) as response:
            if response.status_code >= 400:
                response.read()
                return Answer(error=_error_text(response))
            done = False
            for line in response.iter_lines():
                if not line.startswith("data:"):
                    continue  # comments (": ping"), event names and blank separators
                data = line[len("data:"):].strip()
                if data == "[DONE]":
                    done = True
                    break
                try:
                    chunk = json.loads(data)
                except ValueError:
                    return Answer(error=f"malformed stream chunk from {route}: {data[:200]}")
                if isinstance(chunk, dict) and "error" in chunk:
                    err = chunk["error"]
                    return Answer(error=f"stream error: {err.get('message', err) if isinstance(err, dict) else err}")
                for choice in chunk.get("choices") or []:
                    piece = (choice.get("delta") or {}).get("content") if is_chat else choice.get("text")
                    if piece:
                        if answer.ttft_s is None:
                            answer.ttft_s = time.perf_counter() - start
                        parts.append(piece)
                tokens = _completion_tokens(chunk)
                if tokens is not None:
                    answer.completion_tokens = tokens
            if not done:
                answer.error = "stream ended without 'data: [DONE]'"
        answer.output = "".join(parts)
        return answer


def _completion_tokens(payload: Any) -> int | None:
    usage = payload.get("usage") if isinstance(payload, dict) else None
    tokens = usage.get("completion_tokens") if isinstance(usage, dict) else None
    return tokens if isinstance(tokens, int) and not isinstance(tokens, bool) else None
