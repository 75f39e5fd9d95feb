"""Request validation of the OpenAI schemas and the error body shape (no servers needed)."""

from __future__ import annotations

import pytest

from frontend.errors import APIError, from_worker
from frontend.schemas import ImagePart, TextPart, parse_chat_request

MSG = [{"role": "user", "content": "hi"}]


def _err(body: object) -> APIError:
    with pytest.raises(APIError) as info:
        parse_chat_request(body)
    return info.value


def test_minimal_request_defaults() -> None:
    req = parse_chat_request({"model": "m", "messages": MSG})
    assert req.stream is False and req.n == 1 and req.stop_strings() == ()
    assert req.requested_max_tokens() is None and req.include_usage() is False


def test_full_request_with_extensions_and_unknown_fields() -> None:
    req = parse_chat_request({
        "model": "m", "messages": MSG, "stream": True, "stream_options": {"include_usage": True},
        "max_tokens": 5, "max_completion_tokens": 7, "temperature": 0.5, "top_p": 0.9, "top_k": 20,
        "seed": 3, "stop": ["a", "bc"], "ignore_eos": True, "frequency_penalty": 0, "user": "x"})
    assert req.requested_max_tokens() == 7  # the newer name wins
    assert req.include_usage() and req.top_k == 20 and req.ignore_eos
    assert req.stop_strings() == ("a", "bc")
    assert parse_chat_request({"model": "m", "messages": MSG, "stop": "x"}).stop_strings() == ("x",)


def test_content_parts_are_typed_in_order() -> None:
    req = parse_chat_request({"model": "m", "messages": [{"role": "user", "content": [
        {"type": "text", "text": "a"}, {"type": "image_url", "image_url": {"url": "http://x/1.png"}},
        {"type": "image_url", "image_url": "data:image/png;base64,AAAA"}]}]})
    parts = req.messages[0].content
    assert isinstance(parts[0], TextPart) and isinstance(parts[1], ImagePart)
    assert parts[2].image_url.url.startswith("data:")


@pytest.mark.parametrize("body, param, words", [
    ({"model": "m"}, "messages", "'messages' is required"),
    ({"messages": MSG}, "model", "'model' is required"),
    ({"model": "m", "messages": []}, "messages", "at least 1"),
    ({"model": "m", "messages": MSG, "max_tokens": 0}, "max_tokens", "greater than or equal to 1"),
    ({"model": "m", "messages": MSG, "max_completion_tokens": -3}, "max_completion_tokens", ">= 1"),
    ({"model": "m", "messages": MSG, "n": 2}, "n", "n=2 is not supported"),
    ({"model": "m", "messages": MSG, "temperature": 3}, "temperature", "less than or equal to 2"),
    ({"model": "m", "messages": MSG, "top_p": 0}, "top_p", "greater than 0"),
    ({"model": "m", "messages": MSG, "stop": [""]}, "stop", "must not be empty"),
    ({"model": "m", "messages": [{"role": "robot", "content": "x"}]}, "messages.0.role", "user"),
    ({"model": "m", "messages": [{"role": "user", "content": [{"type": "audio"}]}]},
     "messages.0.content", "unsupported type 'audio'"),
    ({"model": "m", "messages": [{"role": "user", "content": [{"type": "image_url"}]}]},
     "messages.0.content", "needs 'image_url'"),
    ({"model": "m", "messages": [{"role": "user", "content": [{"type": "text", "text": 5}]}]},
     "messages.0.content", "needs a string field 'text'"),
    ({"model": "m", "messages": [{"role": "user", "content": 12}]}, "messages.0.content", "string or a list"),
    ([1, 2], None, "JSON object"),
])
def test_invalid_requests_are_400_with_param(body: object, param: str | None, words: str) -> None:
    err = _err(body)
    assert err.status == 400 and err.type == "invalid_request_error"
    if param is not None:
        assert err.param == param
    assert words.replace(">= 1", "greater than or equal to 1") in err.message


def test_error_body_shape() -> None:
    body = APIError(404, "nope", param="model", code="model_not_found").body()
    assert body == {"error": {"message": "nope", "type": "not_found_error", "param": "model",
                              "code": "model_not_found"}}
    worker = from_worker(413, "image_too_large", "the image is 9000x9000")
    assert worker.status == 413 and worker.type == "image_too_large"
    assert from_worker(0, "", "odd").status == 500
