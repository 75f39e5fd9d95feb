"""Chat template rendering and tokenization without transformers (so the frontend needs no torch).

The model dir a ModelCard points at holds ``tokenizer.json`` (loaded with ``tokenizers``) and a
chat template (``chat_template.jinja``, ``tokenizer_config.json``'s ``chat_template`` or
``chat_template.json``), rendered with a sandboxed jinja2 environment set up the way Hugging Face
renders templates (trim_blocks, lstrip_blocks, ``raise_exception``, a non-escaping ``tojson``), so
token ids equal ``AutoTokenizer.apply_chat_template(..., tokenize=True)``.

Each image becomes one ``{"type": "image"}`` part for the template, which renders one placeholder
(Qwen: ``<|vision_start|><|image_pad|><|vision_end|>``); the worker expands it to the image's tokens.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import jinja2
from jinja2.ext import loopcontrols
from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers import Tokenizer

from common.protocol import MediaRef, ModelCard
from frontend.errors import APIError, bad_request
from frontend.schemas import ChatCompletionRequest, ImagePart, TextPart

EMBEDDING_SUFFIXES = (".pt", ".pth", ".bin")
ACCEPTED_MEDIA = "an http(s) URL, a data: URL, or a local path to a .pt/.pth/.bin embedding file"
_SPECIAL_NAMES = ("bos_token", "eos_token", "pad_token", "unk_token")


class TemplateLoadError(RuntimeError):
    """The model dir has no usable tokenizer or chat template (an operator's problem, not a client's)."""


def _read_json(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text()) if path.is_file() else {}


def _pick_template(value: Any) -> str | None:
    """tokenizer_config's chat_template is a string or a list of {name, template}: take 'default'."""
    if isinstance(value, str):
        return value
    if isinstance(value, list):
        named = {t.get("name"): t.get("template") for t in value if isinstance(t, dict)}
        return named.get("default") or next(iter(named.values()), None)
    return None


def find_chat_template(model_dir: Path) -> str:
    jinja_file = model_dir / "chat_template.jinja"
    if jinja_file.is_file():
        return jinja_file.read_text()
    for candidate in (model_dir / "tokenizer_config.json", model_dir / "chat_template.json"):
        template = _pick_template(_read_json(candidate).get("chat_template"))
        if template:
            return template
    raise TemplateLoadError(f"{model_dir} has no chat template (chat_template.jinja, tokenizer_config.json "
                            "'chat_template' or chat_template.json)")


def _token_text(value: Any) -> str | None:
    if isinstance(value, dict):  # AddedToken form {"content": ...}
        value = value.get("content")
    return value if isinstance(value, str) else None


def _raise_exception(message: str) -> None:
    raise jinja2.exceptions.TemplateError(message)


def _tojson(x: Any, ensure_ascii: bool = False, indent: int | None = None, separators: Any = None,
            sort_keys: bool = False) -> str:
    # Jinja's own tojson escapes HTML characters, which would change the prompt.
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def compile_template(source: str) -> jinja2.Template:
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    return env.from_string(source)


class ChatTokenizer:
    """A model's tokenizer + chat template, loaded from its model dir."""

    def __init__(self, model_dir: str | Path) -> None:
        path = Path(model_dir)
        if not (path / "tokenizer.json").is_file():
            raise TemplateLoadError(f"{path} has no tokenizer.json")
        self.tokenizer = Tokenizer.from_file(str(path / "tokenizer.json"))
        self.template = compile_template(find_chat_template(path))
        config = _read_json(path / "tokenizer_config.json")
        self.special_tokens = {n: t for n in _SPECIAL_NAMES if (t := _token_text(config.get(n))) is not None}

    def render(self, messages: list[dict[str, Any]], add_generation_prompt: bool = True) -> str:
        return self.template.render(messages=messages, add_generation_prompt=add_generation_prompt,
                                    **self.special_tokens)

    def encode(self, text: str) -> list[int]:
        # Special tokens come from the template itself, as apply_chat_template does.
        return self.tokenizer.encode(text, add_special_tokens=False).ids

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=skip_special_tokens)


@dataclass(frozen=True)
class Prompt:
    """A rendered, tokenized request: one placeholder token per media item, media in order."""

    text: str
    token_ids: tuple[int, ...]
    media: tuple[MediaRef, ...]


def media_ref(url: str, where: str) -> MediaRef:
    """Classify one image_url.url; anything unsupported is a 400 that says what is accepted."""
    lowered = url.strip().lower()
    if lowered.startswith(("http://", "https://")):
        return MediaRef(kind="url", url=url.strip())
    if lowered.startswith("data:"):
        return MediaRef(kind="data", url=url.strip())
    if lowered.endswith(EMBEDDING_SUFFIXES) and "://" not in lowered:
        return MediaRef(kind="embedding_file", url=url.strip())
    shown = url if len(url) <= 80 else url[:77] + "..."
    raise bad_request(f"{where}: unsupported image URL {shown!r}; give {ACCEPTED_MEDIA}", param=where)


def template_messages(request: ChatCompletionRequest) -> tuple[list[dict[str, Any]], list[MediaRef]]:
    """OpenAI messages -> the Hugging Face message form templates expect, plus the media in order."""
    out: list[dict[str, Any]] = []
    media: list[MediaRef] = []
    for i, msg in enumerate(request.messages):
        if msg.content is None or isinstance(msg.content, str):
            out.append({"role": msg.role, "content": msg.content or ""})
            continue
        parts: list[dict[str, Any]] = []
        for j, part in enumerate(msg.content):
            if isinstance(part, TextPart):
                parts.append({"type": "text", "text": part.text})
            elif isinstance(part, ImagePart):
                media.append(media_ref(part.image_url.url, f"messages.{i}.content.{j}.image_url.url"))
                parts.append({"type": "image"})
        out.append({"role": msg.role, "content": parts})
    return out, media


def build_prompt(tok: ChatTokenizer, card: ModelCard, request: ChatCompletionRequest) -> Prompt:
    """Render + tokenize a chat request and check it against the model card."""
    messages, media = template_messages(request)
    if media and card.image_token_id is None:
        raise bad_request(f"model {card.name!r} does not accept images; send text content only", param="messages")
    try:
        text = tok.render(messages)
    except jinja2.exceptions.TemplateError as exc:
        raise bad_request(f"the chat template of {card.name!r} rejected the messages: {exc}",
                          param="messages") from None
    ids = tok.encode(text)
    _check_placeholders(ids, len(media), card)
    if len(ids) >= card.context_length:
        raise bad_request(f"the prompt has {len(ids)} tokens but {card.name!r} accepts at most "
                          f"{card.context_length} (prompt + output); shorten the messages", param="messages")
    return Prompt(text=text, token_ids=tuple(ids), media=tuple(media))


def _check_placeholders(ids: list[int], num_media: int, card: ModelCard) -> None:
    if card.image_token_id is None:
        return
    found = sum(1 for t in ids if t == card.image_token_id)
    if found != num_media:
        raise APIError(400, f"the rendered prompt holds {found} image placeholder tokens but the request has "
                       f"{num_media} images; do not write image placeholder tokens in message text",
                       param="messages")
