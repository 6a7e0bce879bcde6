"""Between the wire and the engine: requests to ``GenRequest``, events to OpenAI responses.

Checks that need the model (the ``model`` name, the context window, token ids in range,
the chat template) live here, so the routes stay a few lines each.
"""

from __future__ import annotations

import json
import time
import uuid

from mlx_tune.server import tools
from mlx_tune.server.engine import Delta, Done, GenRequest, TokenInfo
from mlx_tune.server.errors import bad_request
from mlx_tune.server.sampling import vocab_size
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
    DeltaFunction,
    DeltaToolCall,
    ResponseFormat,
    ResponseFunctionCall,
    ResponseToolCall,
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
        self.vocab_size = vocab_size(registry.model, self.tokenizer)

    # -- prompts ------------------------------------------------------------------------
    def chat_prompt(self, req: ChatCompletionRequest, offer_tools: bool = False) -> list[int]:
        messages = [tools.history_message(m) for m in req.messages]
        tok = self.tokenizer
        template = self.registry.chat_template(req.model)  # an adapter's own template wins
        if template or getattr(tok, "has_chat_template", False) or getattr(tok, "chat_template", None):
            extra = {"tools": tools.template_tools(req.tools)} if offer_tools else {}
            if template:
                extra["chat_template"] = template
            try:
                ids = tok.apply_chat_template(messages, add_generation_prompt=True, **extra)
            except Exception as exc:  # jinja templates raise for orders they do not accept
                raise bad_request(f"messages: the model's chat template refused them ({exc})", "messages") from None
            if isinstance(ids, dict) or hasattr(ids, "input_ids"):
                ids = ids["input_ids"]
            return list(ids)
        text = "".join(f"{m['role']}: {m['content']}\n" for m in messages) + "assistant: "
        return self.tokenizer.encode(text)

    def tool_plan(self, req: ChatCompletionRequest) -> tuple[bool, str | None, object]:
        """(offer the tools to the template, grammar forcing a call or None, call syntax or None)."""
        choice = req.tool_choice
        if not req.tools:
            if choice not in (None, "none", "auto"):
                raise bad_request("tool_choice: needs tools", "tool_choice")
            return False, None, None
        if choice == "none":
            return False, None, None
        if not tools.supports_tools(self.tokenizer, self.registry.chat_template(req.model)):
            raise bad_request("tools: this model's chat template has no tool support; serve it with "
                              "--chat-template (for example chatml) to use tools", "tools", "tools_unsupported")
        fmt = tools.syntax(self.tokenizer, self.registry.chat_template(req.model))
        if choice in (None, "auto"):
            return True, None, fmt
        name = None if choice == "required" else choice.function.name
        if name is not None and name not in {t.function.name for t in req.tools}:
            raise bad_request(f"tool_choice.function.name: '{name}' is not one of the tools", "tool_choice")
        if req.response_format is not None and req.response_format.type != "text":
            raise bad_request("response_format: cannot be combined with a required tool call", "response_format")
        from mlx_tune.server import constrain

        if not constrain.available():
            raise bad_request("tool_choice: forcing a call needs llguidance (pip install llguidance)", "tool_choice")
        grammar = tools.call_grammar(req.tools, name, req.parallel_tool_calls is not False and name is None, fmt)
        constrain.check_grammar(grammar, self.tokenizer, self.vocab_size, "tools")
        return True, grammar, fmt

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
            frequency_penalty=req.frequency_penalty, n=req.n,
        )

    def output_grammar(self, fmt: ResponseFormat | None) -> str | None:
        """The grammar ``response_format`` asks for (None: free text)."""
        if fmt is None or fmt.type == "text":
            return None
        from mlx_tune.server import constrain

        if not constrain.available():
            raise bad_request("response_format: structured output needs llguidance (pip install llguidance)",
                              "response_format", "unsupported")
        if fmt.type == "json_schema":
            if fmt.json_schema is None or fmt.json_schema.schema_ is None:
                raise bad_request("response_format.json_schema.schema: required for type json_schema",
                                  "response_format.json_schema.schema")
            grammar = constrain.schema_grammar(fmt.json_schema.schema_, "response_format.json_schema.schema")
        else:
            grammar = constrain.schema_grammar(None, "response_format")
        constrain.check_grammar(grammar, self.tokenizer, self.vocab_size, "response_format")
        return grammar

    def chat(self, req: ChatCompletionRequest) -> GenRequest:
        max_tokens = req.max_completion_tokens if req.max_completion_tokens is not None else req.max_tokens
        logprobs = (req.top_logprobs or 0) if req.logprobs else None
        if req.top_logprobs and not req.logprobs:
            raise bad_request("top_logprobs: needs logprobs: true", "top_logprobs")
        offer, call_grammar, fmt = self.tool_plan(req)
        gen = self.gen_request(req, self.chat_prompt(req, offer), max_tokens=max_tokens, logprobs=logprobs)
        gen.grammar = call_grammar or self.output_grammar(req.response_format)
        gen.tools, gen.tool_syntax = (req.tools, fmt) if fmt is not None else (None, None)
        return gen

    def completion(self, req: CompletionRequest) -> GenRequest:
        if req.suffix:
            raise bad_request("suffix: not supported (no fill-in-the-middle)", "suffix")
        gen = self.gen_request(req, self.completion_prompt(req), max_tokens=req.max_tokens, logprobs=req.logprobs)
        gen.grammar = self.output_grammar(req.response_format)
        return gen


# ---------------------------------------------------------------------------
# Responses
# ---------------------------------------------------------------------------


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


def usage(done: Done) -> Usage:
    return Usage(prompt_tokens=done.prompt_tokens, completion_tokens=done.completion_tokens,
                 total_tokens=done.prompt_tokens + done.completion_tokens)


def total_usage(done: dict[int, Done]) -> Usage:
    """The prompt once (its prefill is shared), the answers' tokens added up."""
    prompt = done[0].prompt_tokens
    completion = sum(d.completion_tokens for d in done.values())
    return Usage(prompt_tokens=prompt, completion_tokens=completion, total_tokens=prompt + completion)


def _bytes(s: str) -> list[int]:
    return list(s.encode("utf-8"))


def chat_logprobs(infos: list[TokenInfo]) -> ChoiceLogprobs:
    return ChoiceLogprobs(content=[
        TokenLogprob(token=i.token, logprob=i.logprob, bytes=_bytes(i.token),
                     top_logprobs=[TopLogprob(token=t, logprob=v, bytes=_bytes(t)) for t, v in i.top])
        for i in infos
    ])


def completion_logprobs(infos: list, offset: int = 0, first: str = "") -> CompletionLogprobs:
    """Legacy completions logprobs; a ``None`` info is the echoed first prompt token ``first``."""
    offsets, at, tokens, values, tops = [], offset, [], [], []
    for i in infos:
        token = first if i is None else i.token
        offsets.append(at)
        at += len(token)
        tokens.append(token)
        values.append(None if i is None else i.logprob)
        tops.append(None if i is None else dict(i.top))
    return CompletionLogprobs(tokens=tokens, token_logprobs=values, top_logprobs=tops, text_offset=offsets)


class ResponseBuilder:
    """Collects or streams one request's events in the OpenAI shapes.

    With tools offered, text passes through a ``tools.CallSplitter``: calls become
    ``message.tool_calls`` (streamed as OpenAI's deltas: index, id and name first, then the
    arguments in fragments) and the finish reason ``tool_calls``.
    """

    ARG_FRAGMENT = 24  # characters of arguments per streamed delta

    def __init__(self, kind: str, model: str, want_logprobs: bool, include_usage: bool = False, gen=None,
                 index: int = 0):
        self.kind = kind  # "chat" | "completion"
        self.index = index  # which of the request's n answers this builder writes
        self.model = model
        self.id = new_id("chatcmpl" if kind == "chat" else "cmpl")
        self.created = int(time.time())
        self.want_logprobs = want_logprobs
        self.include_usage = include_usage
        self.text: list[str] = []
        self.infos: list[TokenInfo] = []
        self.sent_chars = 0
        self.first_token = ""
        self.pending_echo: Delta | None = None
        syntax = getattr(gen, "tool_syntax", None)
        self.splitter = tools.CallSplitter(syntax, gen.tools) if syntax is not None and kind == "chat" else None

    def echo(self, text: str, infos: list | None, first: str) -> None:
        """Completions ``echo``: the prompt (and its tokens' logprobs) ahead of the answer."""
        self.first_token = first
        self.pending_echo = Delta(text, list(infos or []))
        self.add(self.pending_echo)

    # non-streaming
    def add(self, delta: Delta) -> None:
        self.text.append(delta.text)
        self.infos.extend(delta.logprobs)

    def final(self, done: Done) -> ChatCompletion | Completion:
        text = "".join(self.text)
        if self.kind == "chat":
            content, calls = text, []
            if self.splitter is not None:
                events = self.splitter.feed(text) + self.splitter.finish()
                content = "".join(v for k, v in events if k == "text")
                calls = [v for k, v in events if k == "call"]
                bare = None if calls else self.splitter.bare_call(text)
                if bare is not None:
                    calls, content = [bare], ""
                if calls and not content.strip():
                    content = None
            message = AssistantMessage(content=content, tool_calls=[_wire_call(c) for c in calls] or None)
            reason = "tool_calls" if calls and done.finish_reason == "stop" else done.finish_reason
            choice = ChatChoice(index=self.index, message=message, finish_reason=reason,
                                logprobs=chat_logprobs(self.infos) if self.want_logprobs else None)
            return ChatCompletion(id=self.id, created=self.created, model=self.model, choices=[choice],
                                  usage=usage(done))
        choice = CompletionChoice(index=self.index, text=text, finish_reason=done.finish_reason,
                                  logprobs=completion_logprobs(self.infos, first=self.first_token)
                                  if self.want_logprobs else None)
        return Completion(id=self.id, created=self.created, model=self.model, choices=[choice], usage=usage(done))

    # streaming: each method returns SSE text (one or more events)
    @staticmethod
    def sse(obj) -> str:
        data = obj if isinstance(obj, str) else json.dumps(obj.model_dump(exclude_none=False), separators=(",", ":"))
        return f"data: {data}\n\n"

    def first_chunk(self) -> str | None:
        if self.kind != "chat":
            echo, self.pending_echo = self.pending_echo, None
            return self.chunk(echo) if echo is not None else None
        choice = ChatChunkChoice(index=self.index, delta=WireDelta(role="assistant", content=""))
        return self.sse(ChatCompletionChunk(id=self.id, created=self.created, model=self.model, choices=[choice]))

    def _chat_chunk(self, delta: WireDelta, finish_reason: str | None = None, infos=None) -> str:
        choice = ChatChunkChoice(index=self.index, delta=delta, finish_reason=finish_reason,
                                 logprobs=chat_logprobs(infos) if self.want_logprobs and infos else None)
        return self.sse(ChatCompletionChunk(id=self.id, created=self.created, model=self.model, choices=[choice]))

    def _call_chunks(self, call: dict) -> str:
        index = self.splitter.calls.index(call) if self.splitter else 0
        head = DeltaToolCall(index=index, id=call["id"], type="function",
                             function=DeltaFunction(name=call["name"], arguments=""))
        out = [self._chat_chunk(WireDelta(tool_calls=[head]))]
        args = call["arguments"]
        for at in range(0, len(args), self.ARG_FRAGMENT):
            piece = DeltaToolCall(index=index, function=DeltaFunction(arguments=args[at: at + self.ARG_FRAGMENT]))
            out.append(self._chat_chunk(WireDelta(tool_calls=[piece])))
        return "".join(out)

    def _split_chunks(self, events, infos) -> str:
        out = []
        for kind, value in events:
            if kind == "text" and value:
                out.append(self._chat_chunk(WireDelta(content=value), infos=infos))
                infos = None
            elif kind == "call":
                out.append(self._call_chunks(value))
        return "".join(out)

    def chunk(self, delta: Delta | None = None, finish_reason: str | None = None) -> str:
        text = delta.text if delta else ""
        infos = delta.logprobs if delta else []
        if self.kind == "chat":
            if self.splitter is not None:
                if delta is not None:
                    return self._split_chunks(self.splitter.feed(text), infos)
                tail = self._split_chunks(self.splitter.finish(), None)
                reason = "tool_calls" if self.splitter.calls and finish_reason == "stop" else finish_reason
                return tail + self._chat_chunk(WireDelta(), reason)
            return self._chat_chunk(WireDelta(content=text) if delta else WireDelta(), finish_reason, infos)
        choice = CompletionChoice(index=self.index, text=text, finish_reason=finish_reason,
                                  logprobs=completion_logprobs(infos, self.sent_chars, self.first_token)
                                  if self.want_logprobs and infos else None)
        out = Completion(id=self.id, created=self.created, model=self.model, choices=[choice])
        self.sent_chars += len(text)
        return self.sse(out)

    def usage_chunk(self, done: Done, total: Usage | None = None) -> str:
        cls = ChatCompletionChunk if self.kind == "chat" else Completion
        return self.sse(cls(id=self.id, created=self.created, model=self.model, choices=[],
                            usage=total or usage(done)))


def _wire_call(call: dict) -> ResponseToolCall:
    return ResponseToolCall(id=call["id"], function=ResponseFunctionCall(name=call["name"], arguments=call["arguments"]))
