"""Wire messages: every kind round-trips through encode/decode; bad input is refused clearly."""

from __future__ import annotations

import json

import pytest

from common import protocol as p

OWNER = p.TransferAddress(instance_id="enc-1", ucx_address="YWJj")
LAYOUT = p.KVLayout(num_layers=2, block_size=16, num_kv_heads=2, head_dim=32, dtype="bfloat16")
EMB = p.EmbeddingHandle(owner=OWNER, key="emb-1", shape=(64, 128), dtype="float32", num_tokens=64,
                        extras={"grid_thw": [1, 16, 16]}, content_hash="abc", remote={"rkey": "x"})
KV = p.KVHandle(owner=OWNER, key="kv-1", block_ids=(3, 4, 9), num_tokens=40, layout=LAYOUT)
SAMPLING = p.SamplingParams(max_tokens=8, temperature=0.0, top_k=5, seed=1, stop_token_ids=(2,))

MESSAGES = [
    p.EncodeRequest(request_id="r", model="m", media=p.MediaRef(kind="url", url="http://x/a.png")),
    p.EncodeResponse(request_id="r", handle=EMB),
    p.PrefillRequest(request_id="r", model="m", token_ids=(1, 2, 3),
                     images=(p.ImageInput(handle=EMB), p.ImageInput(media=p.MediaRef(kind="data", url="data:,"))),
                     sampling=SAMPLING),
    p.PrefillResponse(request_id="r", first_token=5, prompt_tokens=130, kv=KV, extras={"rope_delta": -3}),
    p.PrefillResponse(request_id="r", first_token=2, prompt_tokens=3, kv=None, finish_reason="stop"),
    p.DecodeRequest(request_id="r", model="m", prompt_tokens=130, first_token=5, kv=KV, sampling=SAMPLING),
    p.GenerateRequest(request_id="r", model="m", token_ids=(1,), sampling=SAMPLING),
    p.TokenDelta(request_id="r", token_ids=(7, 8), finish_reason="length", prompt_tokens=3),
    p.ReleaseRequest(key="kv-1"),
    p.CancelRequest(request_id="r"),
    p.ErrorReply(code=400, type="invalid_request", message="bad image", param="messages[0]"),
    p.Ack(),
]


@pytest.mark.parametrize("msg", MESSAGES, ids=lambda m: type(m).__name__)
def test_round_trip(msg: p._Msg) -> None:
    data = p.encode(msg)
    assert isinstance(data, bytes)
    back = p.decode(data)
    assert type(back) is type(msg) and back == msg
    assert p.decode(data.decode(), expect=type(msg)) == msg  # str accepted too


def _tamper(msg: p._Msg, **changes: object) -> bytes:
    raw = json.loads(p.encode(msg))
    raw.update(changes)
    return json.dumps(raw).encode()


@pytest.mark.parametrize("data, match", [
    (b"{not json", "invalid message"),
    (b"[]", "invalid message"),
    (json.dumps({"kind": "teleport", "request_id": "r"}).encode(), "invalid message"),
    (_tamper(p.CancelRequest(request_id="r"), extra_field=1), "invalid message"),
    (_tamper(p.TokenDelta(request_id="r", token_ids=(1,)), token_ids="abc"), "invalid message"),
    (_tamper(p.TokenDelta(request_id="r", token_ids=(1,)), finish_reason="bored"), "invalid message"),
    (_tamper(p.CancelRequest(request_id="r"), request_id=None), "invalid message"),
    (_tamper(p.CancelRequest(request_id="r"), version=p.PROTOCOL_VERSION + 1), "newer"),
])
def test_rejects_bad_messages(data: bytes, match: str) -> None:
    with pytest.raises(p.ProtocolError, match=match):
        p.decode(data)


def test_rejects_unexpected_type() -> None:
    data = p.encode(p.CancelRequest(request_id="r"))
    with pytest.raises(p.ProtocolError, match="expected TokenDelta, got CancelRequest"):
        p.decode(data, expect=p.TokenDelta)
    with pytest.raises(p.ProtocolError, match="expected TokenDelta/ErrorReply"):
        p.decode(data, expect=(p.TokenDelta, p.ErrorReply))
    assert isinstance(p.decode(data, expect=(p.TokenDelta, p.CancelRequest)), p.CancelRequest)


def test_protocol_error_is_value_error() -> None:
    assert issubclass(p.ProtocolError, ValueError)


@pytest.mark.parametrize("bad", [{"max_tokens": 0}, {"temperature": -0.1}, {"top_p": 0.0},
                                 {"top_p": 1.5}, {"top_k": -2}, {"unknown": 1}])
def test_sampling_params_validate(bad: dict[str, object]) -> None:
    with pytest.raises(ValueError):
        p.SamplingParams(**bad)  # type: ignore[arg-type]


def test_messages_are_frozen() -> None:
    msg = p.CancelRequest(request_id="r")
    with pytest.raises(ValueError):
        msg.request_id = "other"  # type: ignore[misc]


def test_records_round_trip() -> None:
    rec = p.InstanceRecord(instance_id="w1", role=p.Role.PREFILL, model="m", subject="triad.inst.w1")
    assert p.InstanceRecord.model_validate_json(rec.model_dump_json()) == rec
    card = p.ModelCard(name="m", path="/m", context_length=4096, eos_token_ids=(1, 2))
    assert p.ModelCard.model_validate_json(card.model_dump_json()) == card
    with pytest.raises(ValueError):
        p.InstanceRecord.model_validate_json(rec.model_dump_json().replace('"prefill"', '"cook"'))


def test_subjects() -> None:
    assert p.model_slug("Qwen/Qwen2.5-VL-7B") == "Qwen_Qwen2_5-VL-7B"
    assert p.model_slug("") == "_"
    assert p.role_subject("triad", p.Role.DECODE, "a.b", "decode") == "triad.decode.a_b.decode"
    prefix = p.instance_prefix("triad", "host:1.2")
    assert prefix == "triad.inst.host_1_2"
    assert p.instance_subject(prefix, "cancel") == "triad.inst.host_1_2.cancel"
