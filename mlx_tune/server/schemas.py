"""The OpenAI wire format as pydantic models: requests, responses, stream chunks, errors.

Requests ignore unknown fields (as OpenAI does) and check types strictly: a string
where a number belongs is a 400 naming the field, never a silent conversion. The
``/openapi.json`` FastAPI builds from these models is then the true contract, which
``bench/fuzz_server.py`` checks with schemathesis.
"""

from __future__ import annotations

from typing import Annotated, Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field

DEFAULT_MAX_TOKENS = 512  # when a request gives neither max_tokens nor max_completion_tokens
MAX_STOP_STRINGS = 16
MAX_TOP_LOGPROBS = 20


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


class ResponseFormat(_Request):
    type: Literal["text", "json_object"] = "text"


class SamplingFields(_Request):
    """Fields shared by chat and text completions."""

    model: str = Field(description="`base`, the base model's source, or a loaded adapter's name")
    max_tokens: Optional[Annotated[int, Field(ge=1)]] = Field(
        None, description=f"tokens to generate at most (default {DEFAULT_MAX_TOKENS}, capped by the context window)")
    temperature: Optional[Annotated[float, Field(ge=0.0, le=2.0)]] = Field(
        None, description="0 is greedy (argmax); default 1.0 as in OpenAI's API")
    top_p: Optional[Probability] = None
    top_k: Optional[Annotated[int, Field(ge=0)]] = None
    min_p: Optional[Probability] = None
    presence_penalty: Optional[Penalty] = None
    frequency_penalty: Optional[Penalty] = None
    repetition_penalty: Optional[Annotated[float, Field(gt=0.0, le=10.0)]] = None
    logit_bias: Optional[dict[str, Annotated[float, Field(ge=-100.0, le=100.0)]]] = None
    stop: Optional[Union[Annotated[str, Field(min_length=1)], StopList]] = Field(
        None, description="string(s) that end the answer; never part of the returned text")
    seed: Optional[int] = Field(None, description="same seed and request give the same text")
    n: Annotated[int, Field(ge=1, le=1, description="only 1 is supported")] = 1
    stream: bool = False
    stream_options: Optional[StreamOptions] = None
    user: Optional[str] = None


class ChatMessage(_Request):
    role: Literal["system", "user", "assistant", "tool", "developer"]
    content: Optional[Union[str, list["ContentPart"]]] = None
    name: Optional[str] = None


class ContentPart(_Request):
    type: Literal["text"]
    text: str


class ChatCompletionRequest(SamplingFields):
    messages: Annotated[list[ChatMessage], Field(min_length=1)]
    max_completion_tokens: Optional[Annotated[int, Field(ge=1)]] = Field(
        None, description="newer name of max_tokens; wins when both are given")
    logprobs: Optional[bool] = False
    top_logprobs: Optional[Annotated[int, Field(ge=0, le=MAX_TOP_LOGPROBS)]] = None
    response_format: Optional[ResponseFormat] = None


class CompletionRequest(SamplingFields):
    prompt: Union[
        str,
        Annotated[list[Annotated[int, Field(ge=0)]], Field(min_length=1)],
        Annotated[list[str], Field(min_length=1, max_length=1)],
    ] = Field(description="text, or token ids; a list of several prompts is not supported (send one per request)")
    echo: bool = False
    logprobs: Optional[Annotated[int, Field(ge=0, le=MAX_TOP_LOGPROBS)]] = Field(
        None, description="return this many top log-probabilities per token (0: only the chosen token's)")
    suffix: Optional[str] = None


class AdapterLoadRequest(_Request):
    name: Annotated[str, Field(min_length=1, max_length=128, pattern=r"^[A-Za-z0-9][A-Za-z0-9._:-]*$")]
    path: Annotated[str, Field(min_length=1, description="adapter folder, relative to the server's adapters root")]


# ---------------------------------------------------------------------------
# Responses
# ---------------------------------------------------------------------------


class ErrorBody(_Response):
    message: str
    type: str
    param: Optional[str] = None
    code: Optional[str] = None


class ErrorResponse(_Response):
    error: ErrorBody


class Usage(_Response):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class TopLogprob(_Response):
    token: str
    logprob: float
    bytes: Optional[list[int]] = None


class TokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob] = Field(default_factory=list)


class ChoiceLogprobs(_Response):
    content: Optional[list[TokenLogprob]] = None


class CompletionLogprobs(_Response):
    tokens: list[str]
    token_logprobs: list[float]
    top_logprobs: Optional[list[dict[str, float]]] = None
    text_offset: list[int]


FinishReason = Literal["stop", "length"]


class AssistantMessage(_Response):
    role: Literal["assistant"] = "assistant"
    content: str


class ChatChoice(_Response):
    index: int
    message: AssistantMessage
    finish_reason: FinishReason
    logprobs: Optional[ChoiceLogprobs] = None


class ChatCompletion(_Response):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage
    system_fingerprint: Optional[str] = None


class Delta(_Response):
    role: Optional[Literal["assistant"]] = None
    content: Optional[str] = None


class ChatChunkChoice(_Response):
    index: int
    delta: Delta
    finish_reason: Optional[FinishReason] = None
    logprobs: Optional[ChoiceLogprobs] = None


class ChatCompletionChunk(_Response):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChatChunkChoice]
    usage: Optional[Usage] = None
    system_fingerprint: Optional[str] = None


class CompletionChoice(_Response):
    index: int
    text: str
    finish_reason: Optional[FinishReason] = None
    logprobs: Optional[CompletionLogprobs] = None


class Completion(_Response):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Optional[Usage] = None
    system_fingerprint: Optional[str] = None


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
    rank: Optional[int] = None
    resident: bool


ChatMessage.model_rebuild()
