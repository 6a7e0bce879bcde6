"""Between the wire and the engine: requests to ``GenRequest``, events to OpenAI responses.

Checks that need the model (the ``model`` name, the context window, token ids in range,
the chat template) live here, so the routes stay a few lines each.
"""

from __future__ import annotations

import json
import time
import uuid

from mlx_tune.server.engine import Delta, Done, GenRequest, TokenInfo
from mlx_tune.server.errors import bad_request
from mlx_tune.server.schemas import (
    DEFAULT_MAX_TOKENS,
    AssistantMessage,
    ChatChoice,
    ChatChunkChoice,
    ChatCompletion,
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChoiceLogprobs,
    Completion,
    CompletionChoice,
    CompletionLogprobs,
    CompletionRequest,
    SamplingFields,
    TokenLogprob,
    TopLogprob,
    Usage,
)
from mlx_tune.server.schemas import Delta as WireDelta


def context_window(model, info=None) -> int | None:
    """Positions the model was trained for (``max_position_embeddings``), when known."""
    config = getattr(info, "config", None) or {}
    args = getattr(model, "args", None)
    for value in (config.get("max_position_embeddings") if isinstance(config, dict) else None,
                  getattr(args, "max_position_embeddings", None)):
        if isinstance(value, int) and value > 0:
            return value
    return None


class Preparer:
    """Turns validated requests into engine requests for one registry."""

    def __init__(self, registry, context: int | None):
        self.registry = registry
        self.tokenizer = registry.tokenizer
        self.context = context
        self.vocab_size = _vocab_size(registry.model, self.tokenizer)

    # -- prompts ------------------------------------------------------------------------
    def chat_prompt(self, req: ChatCompletionRequest) -> list[int]:
        messages = []
        for m in req.messages:
            content = m.content if isinstance(m.content, str) or m.content is None else "".join(p.text for p in m.content)
            messages.append({"role": m.role, "content": content or ""})
        tok = self.tokenizer
        template = self.registry.chat_template(req.model)  # an adapter's own template wins
        if template or getattr(tok, "has_chat_template", False) or getattr(tok, "chat_template", None):
            try:
                extra = {"chat_template": template} if template else {}
                ids = tok.apply_chat_template(messages, add_generation_prompt=True, **extra)
            except Exception as exc:  # jinja templates raise for orders they do not accept
                raise bad_request(f"messages: the model's chat template refused them ({exc})", "messages") from None
            if isinstance(ids, dict) or hasattr(ids, "input_ids"):
                ids = ids["input_ids"]
            return list(ids)
        text = "".join(f"{m['role']}: {m['content']}\n" for m in messages) + "assistant: "
        return self.tokenizer.encode(text)

    def completion_prompt(self, req: CompletionRequest) -> list[int]:
        prompt = req.prompt
        if isinstance(prompt, list) and prompt and isinstance(prompt[0], int):
            bad = [t for t in prompt if t >= self.vocab_size]
            if bad:
                raise bad_request(f"prompt: token id {bad[0]} is out of range (vocabulary size {self.vocab_size})",
                                  "prompt")
            return list(prompt)
        text = prompt[0] if isinstance(prompt, list) else prompt
        ids = self.tokenizer.encode(text) if text else []
        if not ids:
            bos = getattr(self.tokenizer, "bos_token_id", None)
            if bos is None:
                raise bad_request("prompt: empty, and this model has no beginning-of-sequence token to start from",
                                  "prompt")
            ids = [bos]
        return ids

    # -- parameters -----------------------------------------------------------------------
    def gen_request(self, req: SamplingFields, prompt: list[int], *, max_tokens: int | None,
                    logprobs: int | None) -> GenRequest:
        adapter = self.registry.resolve(req.model)
        if self.context is not None and len(prompt) >= self.context:
            raise bad_request(f"the prompt is {len(prompt)} tokens; this model's context window is {self.context} "
                              "tokens (prompt + answer); shorten the prompt", "messages" if hasattr(req, "messages")
                              else "prompt", "context_length_exceeded")
        limit = max_tokens if max_tokens is not None else DEFAULT_MAX_TOKENS
        if self.context is not None:
            limit = min(limit, self.context - len(prompt))
        stops = [req.stop] if isinstance(req.stop, str) else list(req.stop or [])
        bias = None
        if req.logit_bias:
            bias = {}
            for key, value in req.logit_bias.items():
                if not key.isdigit() or int(key) >= self.vocab_size:
                    raise bad_request(f"logit_bias: key {key!r} is not a token id of this model "
                                      f"(0..{self.vocab_size - 1})", "logit_bias")
                bias[int(key)] = value
        temperature = 1.0 if req.temperature is None else req.temperature
        return GenRequest(
            prompt=prompt, adapter=adapter, max_tokens=max(1, limit), temperature=temperature,
            top_p=1.0 if req.top_p is None else req.top_p,
            top_k=0 if not req.top_k or req.top_k >= self.vocab_size else req.top_k,  # k >= vocabulary: no cut
            min_p=req.min_p or 0.0,
            stop=stops, seed=req.seed, logprobs=logprobs, logit_bias=bias,
            repetition_penalty=req.repetition_penalty, presence_penalty=req.presence_penalty,
            frequency_penalty=req.frequency_penalty,
        )

    def chat(self, req: ChatCompletionRequest) -> GenRequest:
        if req.response_format is not None and req.response_format.type != "text":
            raise bad_request("response_format: only {'type': 'text'} is supported", "response_format")
        max_tokens = req.max_completion_tokens if req.max_completion_tokens is not None else req.max_tokens
        logprobs = (req.top_logprobs or 0) if req.logprobs else None
        if req.top_logprobs and not req.logprobs:
            raise bad_request("top_logprobs: needs logprobs: true", "top_logprobs")
        return self.gen_request(req, self.chat_prompt(req), max_tokens=max_tokens, logprobs=logprobs)

    def completion(self, req: CompletionRequest) -> GenRequest:
        if req.echo:
            raise bad_request("echo: true is not supported", "echo")
        if req.suffix:
            raise bad_request("suffix: not supported (no fill-in-the-middle)", "suffix")
        return self.gen_request(req, self.completion_prompt(req), max_tokens=req.max_tokens, logprobs=req.logprobs)


def _vocab_size(model, tokenizer) -> int:
    args = getattr(model, "args", None)
    size = getattr(args, "vocab_size", None)
    return int(size) if isinstance(size, int) and size > 0 else len(tokenizer)


# ---------------------------------------------------------------------------
# Responses
# ---------------------------------------------------------------------------


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


def usage(done: Done) -> Usage:
    return Usage(prompt_tokens=done.prompt_tokens, completion_tokens=done.completion_tokens,
                 total_tokens=done.prompt_tokens + done.completion_tokens)


def _bytes(s: str) -> list[int]:
    return list(s.encode("utf-8"))


def chat_logprobs(infos: list[TokenInfo]) -> ChoiceLogprobs:
    return ChoiceLogprobs(content=[
        TokenLogprob(token=i.token, logprob=i.logprob, bytes=_bytes(i.token),
                     top_logprobs=[TopLogprob(token=t, logprob=v, bytes=_bytes(t)) for t, v in i.top])
        for i in infos
    ])


def completion_logprobs(infos: list[TokenInfo], offset: int = 0) -> CompletionLogprobs:
    offsets, at = [], offset
    for i in infos:
        offsets.append(at)
        at += len(i.token)
    return CompletionLogprobs(tokens=[i.token for i in infos], token_logprobs=[i.logprob for i in infos],
                              top_logprobs=[dict(i.top) for i in infos], text_offset=offsets)


class ResponseBuilder:
    """Collects or streams one request's events in the OpenAI shapes."""

    def __init__(self, kind: str, model: str, want_logprobs: bool, include_usage: bool = False):
        self.kind = kind  # "chat" | "completion"
        self.model = model
        self.id = new_id("chatcmpl" if kind == "chat" else "cmpl")
        self.created = int(time.time())
        self.want_logprobs = want_logprobs
        self.include_usage = include_usage
        self.text: list[str] = []
        self.infos: list[TokenInfo] = []
        self.sent_chars = 0

    # non-streaming
    def add(self, delta: Delta) -> None:
        self.text.append(delta.text)
        self.infos.extend(delta.logprobs)

    def final(self, done: Done) -> ChatCompletion | Completion:
        text = "".join(self.text)
        if self.kind == "chat":
            choice = ChatChoice(index=0, message=AssistantMessage(content=text), finish_reason=done.finish_reason,
                                logprobs=chat_logprobs(self.infos) if self.want_logprobs else None)
            return ChatCompletion(id=self.id, created=self.created, model=self.model, choices=[choice],
                                  usage=usage(done))
        choice = CompletionChoice(index=0, text=text, finish_reason=done.finish_reason,
                                  logprobs=completion_logprobs(self.infos) if self.want_logprobs else None)
        return Completion(id=self.id, created=self.created, model=self.model, choices=[choice], usage=usage(done))

    # streaming: each method returns one SSE event
    @staticmethod
    def sse(obj) -> str:
        data = obj if isinstance(obj, str) else json.dumps(obj.model_dump(exclude_none=False), separators=(",", ":"))
        return f"data: {data}\n\n"

    def first_chunk(self) -> str | None:
        if self.kind != "chat":
            return None
        choice = ChatChunkChoice(index=0, delta=WireDelta(role="assistant", content=""))
        return self.sse(ChatCompletionChunk(id=self.id, created=self.created, model=self.model, choices=[choice]))

    def chunk(self, delta: Delta | None = None, finish_reason: str | None = None) -> str:
        text = delta.text if delta else ""
        infos = delta.logprobs if delta else []
        if self.kind == "chat":
            choice = ChatChunkChoice(index=0, delta=WireDelta(content=text) if delta else WireDelta(),
                                     finish_reason=finish_reason,
                                     logprobs=chat_logprobs(infos) if self.want_logprobs and infos else None)
            out = ChatCompletionChunk(id=self.id, created=self.created, model=self.model, choices=[choice])
        else:
            choice = CompletionChoice(index=0, text=text, finish_reason=finish_reason,
                                      logprobs=completion_logprobs(infos, self.sent_chars)
                                      if self.want_logprobs and infos else None)
            out = Completion(id=self.id, created=self.created, model=self.model, choices=[choice])
        self.sent_chars += len(text)
        return self.sse(out)

    def usage_chunk(self, done: Done) -> str:
        cls = ChatCompletionChunk if self.kind == "chat" else Completion
        return self.sse(cls(id=self.id, created=self.created, model=self.model, choices=[], usage=usage(done)))
