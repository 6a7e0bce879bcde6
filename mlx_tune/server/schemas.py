"""The OpenAI wire format as pydantic models: requests, responses, stream chunks, errors.

Requests ignore unknown fields (as OpenAI does) and check types strictly: a string
where a number belongs is a 400 naming the field, never a silent conversion. The
``/openapi.json`` FastAPI builds from these models is then the true contract, which
``bench/fuzz_server.py`` checks with schemathesis.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field

DEFAULT_MAX_TOKENS = 512  # when a request gives neither max_tokens nor max_completion_tokens
MAX_STOP_STRINGS = 16
MAX_TOP_LOGPROBS = 20
MAX_N = 8


class _Request(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)


class _Response(BaseModel):
    model_config = ConfigDict(extra="forbid")


# ---------------------------------------------------------------------------
# Requests
# ---------------------------------------------------------------------------

Probability = Annotated[float, Field(ge=0.0, le=1.0)]
Penalty = Annotated[float, Field(ge=-2.0, le=2.0)]
StopList = Annotated[list[Annotated[str, Field(min_length=1)]], Field(max_length=MAX_STOP_STRINGS)]


class StreamOptions(_Request):
    include_usage: bool = False


class JsonSchemaFormat(_Request):
    name: Annotated[str, Field(min_length=1, max_length=64)] = "response"
    description: str | None = None
    schema_: dict | None = Field(None, alias="schema", description="the JSON schema the answer follows")
    strict: bool | None = Field(None, description="the answer always follows the schema (constrained decoding)")


class ResponseFormat(_Request):
    type: Literal["text", "json_object", "json_schema"] = "text"
    json_schema: JsonSchemaFormat | None = None


class SamplingFields(_Request):
    """Fields shared by chat and text completions."""

    model: str = Field(description="`base`, the base model's source, or a loaded adapter's name")
    max_tokens: Annotated[int, Field(ge=1)] | None = Field(
        None, description=f"tokens to generate at most (default {DEFAULT_MAX_TOKENS}, capped by the context window)")
    temperature: Annotated[float, Field(ge=0.0, le=2.0)] | None = Field(
        None, description="0 is greedy (argmax); default 1.0 as in OpenAI's API")
    top_p: Probability | None = None
    top_k: Annotated[int, Field(ge=0)] | None = None
    min_p: Probability | None = None
    presence_penalty: Penalty | None = None
    frequency_penalty: Penalty | None = None
    repetition_penalty: Annotated[float, Field(gt=0.0, le=10.0)] | None = None
    logit_bias: dict[str, Annotated[float, Field(ge=-100.0, le=100.0)]] | None = None
    stop: Annotated[str, Field(min_length=1)] | StopList | None = Field(
        None, description="string(s) that end the answer; never part of the returned text")
    seed: int | None = Field(None, description="same seed and request give the same text")
    n: Annotated[int, Field(ge=1, le=MAX_N, description="answers to generate (one prefill shared by them)")] = 1
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = None


class FunctionCall(_Request):
    name: Annotated[str, Field(min_length=1)]
    arguments: str = Field("", description="the arguments as a JSON string")


class ToolCall(_Request):
    id: str
    type: Literal["function"] = "function"
    function: FunctionCall


class ChatMessage(_Request):
    role: Literal["system", "user", "assistant", "tool", "developer"]
    content: str | list[ContentPart] | None = None
    name: str | None = None
    tool_calls: list[ToolCall] | None = Field(None, description="an assistant turn's calls (history)")
    tool_call_id: str | None = Field(None, description="the call a tool message answers")


class FunctionDef(_Request):
    name: Annotated[str, Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_.-]+$")]
    description: str | None = None
    parameters: dict | None = Field(None, description="JSON schema of the arguments")
    strict: bool | None = None


class Tool(_Request):
    type: Literal["function"]
    function: FunctionDef


class ToolChoiceFunction(_Request):
    name: str


class NamedToolChoice(_Request):
    type: Literal["function"]
    function: ToolChoiceFunction


class ContentPart(_Request):
    type: Literal["text"]
    text: str


class ChatCompletionRequest(SamplingFields):
    messages: Annotated[list[ChatMessage], Field(min_length=1)]
    max_completion_tokens: Annotated[int, Field(ge=1)] | None = Field(
        None, description="newer name of max_tokens; wins when both are given")
    logprobs: bool | None = False
    top_logprobs: Annotated[int, Field(ge=0, le=MAX_TOP_LOGPROBS)] | None = None
    response_format: ResponseFormat | None = None
    tools: Annotated[list[Tool], Field(max_length=128)] | None = None
    tool_choice: Literal["auto", "none", "required"] | NamedToolChoice | None = None
    parallel_tool_calls: bool | None = None


class CompletionRequest(SamplingFields):
    prompt: (
        str
        | Annotated[list[Annotated[int, Field(ge=0)]], Field(min_length=1)]
        | Annotated[list[str], Field(min_length=1, max_length=1)]
    ) = Field(description="text, or token ids; a list of several prompts is not supported (send one per request)")
    echo: bool = False
    logprobs: Annotated[int, Field(ge=0, le=MAX_TOP_LOGPROBS)] | None = Field(
        None, description="return this many top log-probabilities per token (0: only the chosen token's)")
    suffix: str | None = None
    response_format: ResponseFormat | None = None


class AdapterLoadRequest(_Request):
    name: Annotated[str, Field(min_length=1, max_length=128, pattern=r"^[A-Za-z0-9][A-Za-z0-9._:-]*$")]
    path: Annotated[str, Field(min_length=1, description="adapter folder, relative to the server's adapters root")]


# ---------------------------------------------------------------------------
# Responses
# ---------------------------------------------------------------------------


class ErrorBody(_Response):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(_Response):
    error: ErrorBody


class Usage(_Response):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class TopLogprob(_Response):
    token: str
    logprob: float
    bytes: list[int] | None = None


class TokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob] = Field(default_factory=list)


class ChoiceLogprobs(_Response):
    content: list[TokenLogprob] | None = None


class CompletionLogprobs(_Response):
    tokens: list[str]
    token_logprobs: list[float | None]  # None: the first echoed prompt token (nothing before it)
    top_logprobs: list[dict[str, float] | None] | None = None
    text_offset: list[int]


FinishReason = Literal["stop", "length", "tool_calls"]


class ResponseFunctionCall(_Response):
    name: str
    arguments: str


class ResponseToolCall(_Response):
    id: str
    type: Literal["function"] = "function"
    function: ResponseFunctionCall


class AssistantMessage(_Response):
    role: Literal["assistant"] = "assistant"
    content: str | None
    tool_calls: list[ResponseToolCall] | None = None


class ChatChoice(_Response):
    index: int
    message: AssistantMessage
    finish_reason: FinishReason
    logprobs: ChoiceLogprobs | None = None


class ChatCompletion(_Response):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage
    system_fingerprint: str | None = None


class DeltaFunction(_Response):
    name: str | None = None
    arguments: str | None = None


class DeltaToolCall(_Response):
    index: int
    id: str | None = None
    type: Literal["function"] | None = None
    function: DeltaFunction


class Delta(_Response):
    role: Literal["assistant"] | None = None
    content: str | None = None
    tool_calls: list[DeltaToolCall] | None = None


class ChatChunkChoice(_Response):
    index: int
    delta: Delta
    finish_reason: FinishReason | None = None
    logprobs: ChoiceLogprobs | None = None


class ChatCompletionChunk(_Response):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChatChunkChoice]
    usage: Usage | None = None
    system_fingerprint: str | None = None


class CompletionChoice(_Response):
    index: int
    text: str
    finish_reason: FinishReason | None = None
    logprobs: CompletionLogprobs | None = None


class Completion(_Response):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None = None
    system_fingerprint: str | None = None


class ModelCard(_Response):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "mlx_tune"
    kind: Literal["base", "adapter", "fused"] = "base"
    resident: bool = True


class ModelList(_Response):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class Health(_Response):
    status: Literal["ok"] = "ok"
    model: str
    adapters: list[str]
    queued: int
    running: int


class AdapterCard(_Response):
    name: str
    path: str
    rank: int | None = None
    resident: bool


ChatMessage.model_rebuild()
