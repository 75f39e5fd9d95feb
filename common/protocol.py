"""Typed, versioned messages for every hop of a request (DESIGN section 2).

Every message is a pydantic model with a ``kind`` tag; ``encode`` turns one into JSON bytes and
``decode`` validates bytes back into the model the tag names (or the type the caller expects).
Only small control messages travel this way: tensors never do (they move over UCX, see
``common.transfer``); a message carries handles that say where to pull them from.

Hops:
  frontend -> encode   EncodeRequest            -> EncodeResponse (EmbeddingHandle)
  frontend -> prefill  PrefillRequest           -> PrefillResponse (first token + KVHandle)
  frontend -> decode   DecodeRequest            -> stream of TokenDelta
  frontend -> agg      GenerateRequest          -> stream of TokenDelta
  anyone   -> owner    ReleaseRequest           (a puller tells an owner it may free a handle)
  frontend -> any      CancelRequest            (stop work and free state for a request)
  any      -> caller   ErrorReply               (code is an HTTP status: 4xx = the caller's fault)
"""

from __future__ import annotations

from enum import Enum
from typing import Annotated, Any, Literal, Union

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, ValidationError

PROTOCOL_VERSION = 1


class ProtocolError(ValueError):
    """A message could not be decoded or failed validation."""


class Role(str, Enum):
    AGG = "agg"
    ENCODE = "encode"
    PREFILL = "prefill"
    DECODE = "decode"


class _Msg(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    version: int = PROTOCOL_VERSION


# ----------------------------------------------------------------------------- shared pieces


class SamplingParams(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    max_tokens: int = Field(16, ge=1)
    temperature: float = Field(1.0, ge=0.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    top_k: int = Field(-1, ge=-1)  # -1 = off
    seed: int | None = None
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False


class MediaRef(BaseModel):
    """Where one media item comes from, as the client gave it."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    kind: Literal["url", "data", "embedding_file"]
    url: str  # http(s) URL, data: URL, or a local path to a .pt/.pth/.bin embedding file


class TransferAddress(BaseModel):
    """How to reach the UCX agent that owns a tensor (published in etcd by its worker)."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    instance_id: str
    ucx_address: str  # base64 of the UCX worker address


class EmbeddingHandle(BaseModel):
    """One media item's embedding, held (registered with UCX) by the worker that made it."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    owner: TransferAddress
    key: str
    shape: tuple[int, ...]
    dtype: str  # torch dtype name without the "torch." prefix, e.g. "float32", "bfloat16"
    num_tokens: int  # LM tokens this item expands to
    extras: dict[str, Any] = Field(default_factory=dict)  # model-specific, e.g. {"grid_thw": [1, 16, 16]}
    content_hash: str
    remote: dict[str, Any] = Field(default_factory=dict)  # transfer-layer descriptor (rkeys, addresses)


class KVLayout(BaseModel):
    """Shape of one KV block (block-major: [layers, 2, block_size, kv_heads, head_dim])."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    num_layers: int
    block_size: int
    num_kv_heads: int
    head_dim: int
    dtype: str


class KVHandle(BaseModel):
    """A prefilled request's KV blocks, pinned by their owner until released or timed out."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    owner: TransferAddress
    key: str
    block_ids: tuple[int, ...]
    num_tokens: int
    layout: KVLayout
    remote: dict[str, Any] = Field(default_factory=dict)


class ImageInput(BaseModel):
    """An image of a prefill/generate request: either already encoded (a handle) or a reference."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    handle: EmbeddingHandle | None = None
    media: MediaRef | None = None


# ----------------------------------------------------------------------------- requests


class EncodeRequest(_Msg):
    kind: Literal["encode"] = "encode"
    request_id: str
    model: str
    media: MediaRef


class EncodeResponse(_Msg):
    kind: Literal["encode_response"] = "encode_response"
    request_id: str
    handle: EmbeddingHandle


class PrefillRequest(_Msg):
    kind: Literal["prefill"] = "prefill"
    request_id: str
    model: str
    token_ids: tuple[int, ...]  # one placeholder token per image; the prefill worker expands them
    images: tuple[ImageInput, ...] = ()
    sampling: SamplingParams = SamplingParams()


class PrefillResponse(_Msg):
    kind: Literal["prefill_response"] = "prefill_response"
    request_id: str
    first_token: int
    prompt_tokens: int  # after placeholder expansion
    kv: KVHandle | None  # None when the request finished at its first token
    finish_reason: Literal["stop", "length"] | None = None
    extras: dict[str, Any] = Field(default_factory=dict)  # e.g. {"rope_delta": -3} for mRoPE


class DecodeRequest(_Msg):
    kind: Literal["decode"] = "decode"
    request_id: str
    model: str
    prompt_tokens: int
    first_token: int
    kv: KVHandle
    sampling: SamplingParams = SamplingParams()
    extras: dict[str, Any] = Field(default_factory=dict)


class GenerateRequest(_Msg):
    """Aggregated: one worker encodes, prefills and decodes."""

    kind: Literal["generate"] = "generate"
    request_id: str
    model: str
    token_ids: tuple[int, ...]
    images: tuple[ImageInput, ...] = ()
    sampling: SamplingParams = SamplingParams()


class TokenDelta(_Msg):
    kind: Literal["token_delta"] = "token_delta"
    request_id: str
    token_ids: tuple[int, ...]
    finish_reason: Literal["stop", "length", "abort"] | None = None
    prompt_tokens: int | None = None  # set on the first delta


class ReleaseRequest(_Msg):
    kind: Literal["release"] = "release"
    key: str


class CancelRequest(_Msg):
    kind: Literal["cancel"] = "cancel"
    request_id: str


class ErrorReply(_Msg):
    kind: Literal["error"] = "error"
    code: int = 500  # HTTP status the frontend should answer with
    type: str = "internal_error"
    message: str
    param: str | None = None


class Ack(_Msg):
    kind: Literal["ack"] = "ack"


Message = Annotated[
    Union[
        EncodeRequest,
        EncodeResponse,
        PrefillRequest,
        PrefillResponse,
        DecodeRequest,
        GenerateRequest,
        TokenDelta,
        ReleaseRequest,
        CancelRequest,
        ErrorReply,
        Ack,
    ],
    Field(discriminator="kind"),
]
_ADAPTER: TypeAdapter[Any] = TypeAdapter(Message)


def encode(msg: _Msg) -> bytes:
    """Serialize a message to JSON bytes."""
    return msg.model_dump_json().encode()


def decode(data: bytes | str, expect: type[_Msg] | tuple[type[_Msg], ...] | None = None) -> Any:
    """Validate bytes into the message its ``kind`` names; check it is one of ``expect``.

    Raises ProtocolError for malformed JSON, an unknown kind, a failed field check, a version from
    the future, or a message of a type the caller did not expect.
    """
    try:
        msg = _ADAPTER.validate_json(data)
    except ValidationError as exc:
        raise ProtocolError(f"invalid message: {exc.errors()[0].get('msg', exc)}") from exc
    if msg.version > PROTOCOL_VERSION:
        raise ProtocolError(f"message version {msg.version} is newer than {PROTOCOL_VERSION}")
    if expect is not None and not isinstance(msg, expect):
        names = expect.__name__ if isinstance(expect, type) else "/".join(t.__name__ for t in expect)
        raise ProtocolError(f"expected {names}, got {type(msg).__name__}")
    return msg


class InstanceRecord(BaseModel):
    """What a worker publishes in etcd under <namespace>/instances/<role>/<instance_id>."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    instance_id: str
    role: Role
    model: str
    subject: str  # NATS subject addressing this instance alone
    ucx_address: str = ""  # base64; empty when the role owns no transferable tensors
    host: str = "127.0.0.1"
    capacity: int = 1
    pid: int = 0
    version: int = PROTOCOL_VERSION


class ModelCard(BaseModel):
    """What the frontend needs to serve a model: published in etcd under <namespace>/models/<name>."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    name: str
    path: str  # directory holding tokenizer.json / tokenizer_config.json / chat template
    context_length: int
    image_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()
    version: int = PROTOCOL_VERSION


# ----------------------------------------------------------------------------- subjects
# Worker endpoints: encode (unary EncodeRequest), prefill (unary PrefillRequest), decode (stream
# DecodeRequest -> TokenDelta), generate (agg; stream GenerateRequest -> TokenDelta), cancel
# (publish CancelRequest to an instance). A role subject is served in queue group <role>.

ENDPOINTS = ("encode", "prefill", "decode", "generate", "cancel")


def model_slug(model: str) -> str:
    """A NATS-token-safe form of a served model name."""
    return "".join(c if c.isalnum() or c in "-_" else "_" for c in model) or "_"


def role_subject(namespace: str, role: Role, model: str, endpoint: str) -> str:
    return f"{namespace}.{Role(role).value}.{model_slug(model)}.{endpoint}"


def instance_prefix(namespace: str, instance_id: str) -> str:
    return f"{namespace}.inst.{model_slug(instance_id)}"


def instance_subject(prefix: str, endpoint: str) -> str:
    """``prefix`` is InstanceRecord.subject."""
    return f"{prefix}.{endpoint}"
