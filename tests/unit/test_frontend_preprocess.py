"""Template rendering + tokenization without transformers equals HF's apply_chat_template."""

from __future__ import annotations

from pathlib import Path

import pytest
from transformers import AutoTokenizer

from common.protocol import ModelCard
from frontend.errors import APIError
from frontend.preprocess import ChatTokenizer, TemplateLoadError, build_prompt, media_ref
from frontend.schemas import parse_chat_request

IMG = {"type": "image_url", "image_url": {"url": "https://example.com/cat.png"}}

CONVERSATIONS = {
    "text": [{"role": "user", "content": "Hello there, what is 2+2?"}],
    "text_parts": [{"role": "user", "content": [{"type": "text", "text": "Just "}, {"type": "text", "text": "parts"}]}],
    "one_image": [{"role": "user", "content": [IMG, {"type": "text", "text": "What is in the picture?"}]}],
    "two_images": [{"role": "user", "content": [
        {"type": "text", "text": "Compare"}, IMG, {"type": "text", "text": "and"},
        {"type": "image_url", "image_url": {"url": "data:image/png;base64,iVBORw0KGgo="}}]}],
    "system": [{"role": "system", "content": "Answer in one word."},
               {"role": "user", "content": [IMG, {"type": "text", "text": "Colour?"}]}],
    "multi_turn": [{"role": "user", "content": [IMG, {"type": "text", "text": "Shape?"}]},
                   {"role": "assistant", "content": "A circle. ✓ naïve 日本語"},
                   {"role": "user", "content": [{"type": "text", "text": "And this one? 🎉"},
                                                {"type": "image_url", "image_url": {"url": "/data/e.pt"}}]}],
}


def _hf_messages(messages: list[dict]) -> list[dict]:
    """The same conversation in Hugging Face's own form ({"type": "image"} parts)."""
    out = []
    for m in messages:
        content = m["content"]
        if isinstance(content, list):
            content = [{"type": "image"} if p["type"] == "image_url" else p for p in content]
        out.append({"role": m["role"], "content": content})
    return out


@pytest.fixture(scope="module")
def tok(tiny_qwen_dir: Path) -> ChatTokenizer:
    return ChatTokenizer(tiny_qwen_dir)


@pytest.fixture(scope="module")
def card(tiny_qwen_dir: Path) -> ModelCard:
    hf = AutoTokenizer.from_pretrained(tiny_qwen_dir)
    return ModelCard(name="tiny", path=str(tiny_qwen_dir), context_length=256,
                     image_token_id=hf.convert_tokens_to_ids("<|image_pad|>"),
                     eos_token_ids=(hf.convert_tokens_to_ids("<|im_end|>"),))


@pytest.mark.parametrize("name", sorted(CONVERSATIONS))
def test_tokens_equal_hf_apply_chat_template(name: str, tiny_qwen_dir: Path, tok: ChatTokenizer,
                                             card: ModelCard) -> None:
    hf = AutoTokenizer.from_pretrained(tiny_qwen_dir)
    expected = hf.apply_chat_template(_hf_messages(CONVERSATIONS[name]), tokenize=True, add_generation_prompt=True)
    expected = list(expected["input_ids"] if hasattr(expected, "keys") else expected)
    prompt = build_prompt(tok, card, parse_chat_request({"model": "tiny", "messages": CONVERSATIONS[name]}))
    assert list(prompt.token_ids) == expected
    n_images = sum(1 for m in CONVERSATIONS[name] if isinstance(m["content"], list)
                   for p in m["content"] if p["type"] == "image_url")
    assert len(prompt.media) == n_images == prompt.token_ids.count(card.image_token_id)
    assert prompt.text.endswith("<|im_start|>assistant\n")


def test_media_refs_in_order_and_kinds(tok: ChatTokenizer, card: ModelCard) -> None:
    prompt = build_prompt(tok, card, parse_chat_request({"model": "tiny", "messages": CONVERSATIONS["multi_turn"]}))
    assert [(m.kind, m.url) for m in prompt.media] == [("url", "https://example.com/cat.png"),
                                                       ("embedding_file", "/data/e.pt")]
    assert media_ref("data:image/png;base64,AA", "x").kind == "data"
    assert media_ref("HTTP://HOST/a.jpg", "x").kind == "url"
    assert media_ref("rel/emb.bin", "x").kind == "embedding_file"


@pytest.mark.parametrize("url", ["ftp://host/a.png", "/tmp/picture.png", "file:///x.pt", "s3://bucket/key.pt"])
def test_unsupported_media_is_400_saying_what_is_accepted(url: str, tok: ChatTokenizer, card: ModelCard) -> None:
    body = {"model": "tiny", "messages": [{"role": "user", "content": [
        {"type": "text", "text": "hi"}, {"type": "image_url", "image_url": {"url": url}}]}]}
    with pytest.raises(APIError) as info:
        build_prompt(tok, card, parse_chat_request(body))
    assert info.value.status == 400
    assert "http(s) URL, a data: URL, or a local path to a .pt/.pth/.bin" in info.value.message
    assert info.value.param == "messages.0.content.1.image_url.url"


def test_images_to_text_only_model_and_placeholder_in_text_are_400(tok: ChatTokenizer, card: ModelCard) -> None:
    text_only = card.model_copy(update={"image_token_id": None})
    with pytest.raises(APIError, match="does not accept images"):
        build_prompt(tok, text_only, parse_chat_request({"model": "tiny", "messages": CONVERSATIONS["one_image"]}))
    sneaky = [{"role": "user", "content": "look <|vision_start|><|image_pad|><|vision_end|>"}]
    with pytest.raises(APIError, match="1 image placeholder tokens but the request has 0 images"):
        build_prompt(tok, card, parse_chat_request({"model": "tiny", "messages": sneaky}))


def test_prompt_longer_than_context_is_400(tok: ChatTokenizer, card: ModelCard) -> None:
    long = [{"role": "user", "content": "word " * 400}]
    with pytest.raises(APIError) as info:
        build_prompt(tok, card, parse_chat_request({"model": "tiny", "messages": long}))
    assert info.value.status == 400 and "accepts at most 256" in info.value.message


def test_decode_skips_special_tokens(tok: ChatTokenizer) -> None:
    ids = tok.encode("<|im_start|>assistant\nHi there<|im_end|>")
    assert tok.decode(ids) == "assistant\nHi there"


def test_model_dir_without_template_is_a_clear_error(tmp_path: Path, tiny_qwen_dir: Path) -> None:
    with pytest.raises(TemplateLoadError, match="no tokenizer.json"):
        ChatTokenizer(tmp_path)
    (tmp_path / "tokenizer.json").write_bytes((tiny_qwen_dir / "tokenizer.json").read_bytes())
    with pytest.raises(TemplateLoadError, match="no chat template"):
        ChatTokenizer(tmp_path)
