"""OpenAI chat-completions request/response schemas (the subset Triad serves, plus extensions).

Extensions beyond OpenAI: ``top_k`` (int, -1 = off) and ``ignore_eos`` (bool, for benchmarks).
Unknown fields are ignored, as OpenAI-compatible servers usually do, so stock clients work.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from frontend.errors import APIError, bad_request

ACCEPTED_PARTS = "'text' and 'image_url'"


class TextPart(BaseModel):
    model_config = ConfigDict(extra="ignore", frozen=True)
    type: Literal["text"] = "text"
    text: str


class ImageURL(BaseModel):
    model_config = ConfigDict(extra="ignore", frozen=True)
    url: str = Field(min_length=1)
    detail: str | None = None


class ImagePart(BaseModel):
    model_config = ConfigDict(extra="ignore", frozen=True)
    type: Literal["image_url"] = "image_url"
    image_url: ImageURL


ContentPart = TextPart | ImagePart


def _parse_part(i: int, raw: Any) -> ContentPart:
    """One content part, with an error that names the part and what is accepted."""
    if not isinstance(raw, dict):
        raise ValueError(f"content part {i} must be an object with a 'type' ({ACCEPTED_PARTS})")
    kind = raw.get("type")
    if kind == "text":
        if not isinstance(raw.get("text"), str):
            raise ValueError(f"content part {i} of type 'text' needs a string field 'text'")
        return TextPart(text=raw["text"])
    if kind == "image_url":
        image = raw.get("image_url")
        if isinstance(image, str):  # some clients send the URL directly
            image = {"url": image}
        if not isinstance(image, dict) or not isinstance(image.get("url"), str) or not image["url"]:
            raise ValueError(f"content part {i} of type 'image_url' needs 'image_url': {{'url': '...'}}")
        return ImagePart(image_url=ImageURL(**image))
    raise ValueError(f"content part {i} has unsupported type {kind!r}; accepted types are {ACCEPTED_PARTS}")


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore", frozen=True)
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[ContentPart] | None = None

    @field_validator("content", mode="before")
    @classmethod
    def _content(cls, value: Any) -> Any:
        if value is None or isinstance(value, str):
            return value
        if not isinstance(value, list):
            raise ValueError("content must be a string or a list of content parts")
        return [_parse_part(i, part) for i, part in enumerate(value)]


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="ignore", frozen=True)
    include_usage: bool = False


class ChatCompletionRequest(BaseModel):
    """POST /v1/chat/completions body."""

    model_config = ConfigDict(extra="ignore", frozen=True)
    model: str = Field(min_length=1)
    messages: list[ChatMessage] = Field(min_length=1)
    stream: bool = False
    stream_options: StreamOptions | None = None
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0.0, le=2.0)
    top_p: float | None = Field(None, gt=0.0, le=1.0)
    top_k: int | None = Field(None, ge=-1)
    seed: int | None = None
    stop: str | list[str] | None = None
    n: int = 1
    ignore_eos: bool = False

    @field_validator("stop")
    @classmethod
    def _stop(cls, value: str | list[str] | None) -> str | list[str] | None:
        stops = [value] if isinstance(value, str) else (value or [])
        if any(s == "" for s in stops):
            raise ValueError("stop strings must not be empty")
        if len(stops) > 16:
            raise ValueError("at most 16 stop strings are accepted")
        return value

    @model_validator(mode="after")
    def _n(self) -> "ChatCompletionRequest":
        if self.n != 1:
            raise ValueError(f"n={self.n} is not supported: this server returns exactly one choice; "
                             "send n=1 or leave n out")
        return self

    def stop_strings(self) -> tuple[str, ...]:
        if self.stop is None:
            return ()
        return (self.stop,) if isinstance(self.stop, str) else tuple(self.stop)

    def requested_max_tokens(self) -> int | None:
        """``max_completion_tokens`` (the newer name) wins over ``max_tokens``."""
        return self.max_completion_tokens or self.max_tokens

    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)


def _error_param(loc: tuple[Any, ...]) -> str:
    return ".".join(str(p) for p in loc) if loc else "body"


def parse_chat_request(data: Any) -> ChatCompletionRequest:
    """Validate a decoded JSON body; raise a 400 APIError naming the first bad field."""
    if not isinstance(data, dict):
        raise bad_request("the request body must be a JSON object")
    if "messages" not in data:
        raise bad_request("'messages' is required: a list of chat messages", param="messages")
    if "model" not in data:
        raise bad_request("'model' is required: the name of a served model (see GET /v1/models)", param="model")
    try:
        return ChatCompletionRequest.model_validate(data)
    except ValidationError as exc:
        raise _validation_error(exc) from None


def _validation_error(exc: ValidationError) -> APIError:
    err = exc.errors()[0]
    loc = tuple(p for p in err["loc"] if not (isinstance(p, str) and p.startswith("function-")))
    param = _error_param(loc)
    msg = str(err["msg"]).removeprefix("Value error, ")
    if err["type"] == "value_error" and not loc:  # model-level validators (n)
        param = "n" if msg.startswith("n=") else "body"
    return bad_request(f"invalid '{param}': {msg}", param=param)


# ----------------------------------------------------------------------------- responses


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str


class Choice(BaseModel):
    index: int = 0
    message: AssistantMessage
    finish_reason: str | None
    logprobs: None = None


class ChatCompletion(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[Choice]
    usage: Usage


class Delta(BaseModel):
    role: Literal["assistant"] | None = None
    content: str | None = None


class ChunkChoice(BaseModel):
    index: int = 0
    delta: Delta
    finish_reason: str | None = None
    logprobs: None = None


class ChatCompletionChunk(BaseModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChunkChoice]
    usage: Usage | None = None


class ModelEntry(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "triad"
    max_model_len: int | None = None


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelEntry]
