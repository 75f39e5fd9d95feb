"""Media loading for workers: images from URLs, data: URLs and local files; pre-computed embeddings.

Everything a client can point us at is untrusted, so every path through this module is bounded:
- http(s) URLs: the host is resolved and loopback / private / link-local / reserved addresses are
  refused (re-checked after every redirect, which we follow by hand up to a limit), the body is
  capped while it streams in, and the whole fetch has one deadline.
- local files: only under one allowed directory, after resolving symlinks and ``..``.
- images: the header's pixel count is checked before the pixels are decoded (decompression bombs).
- embedding files: ``torch.load(weights_only=True)``, so a pickle holding arbitrary objects is
  refused instead of executed; the tensor must match the model's hidden size.

Errors a client can cause are ``MediaError`` with an HTTP ``code`` (400 bad input, 403 forbidden
path or address, 413 too large) and a message saying what to fix.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import hashlib
import io
import ipaddress
import os
import socket
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urljoin, urlsplit

from PIL import Image, UnidentifiedImageError

from common.protocol import MediaRef

EMBEDDING_SUFFIXES = (".pt", ".pth", ".bin")
_REDIRECT_CODES = (301, 302, 303, 307, 308)


class MediaError(Exception):
    """A media item the client sent cannot be used; ``code`` is the HTTP status to answer with."""

    def __init__(self, message: str, code: int = 400) -> None:
        super().__init__(message)
        self.message = message
        self.code = code


@dataclass(frozen=True)
class MediaConfig:
    """Limits on what a worker may fetch, read and decode on a client's behalf."""

    allowed_local_media_path: str | None = None  # no local file access unless set
    max_file_size_mb: float = 50.0
    allow_private_media_urls: bool = False  # loopback, private, link-local, reserved
    allow_loopback_media_urls: bool = False  # loopback only (tests, local demos)
    fetch_timeout_s: float = 10.0
    max_redirects: int = 5
    max_image_pixels: int = 40_000_000

    def __post_init__(self) -> None:
        if self.max_file_size_mb <= 0:
            raise ValueError("max_file_size_mb must be > 0")
        if self.fetch_timeout_s <= 0:
            raise ValueError("fetch_timeout_s must be > 0")
        if self.max_redirects < 0 or self.max_image_pixels <= 0:
            raise ValueError("max_redirects must be >= 0 and max_image_pixels > 0")

    @property
    def max_bytes(self) -> int:
        return int(self.max_file_size_mb * 1024 * 1024)

    @classmethod
    def from_env(cls, **overrides: Any) -> "MediaConfig":
        """Defaults from ``ALLOWED_LOCAL_MEDIA_PATH`` and ``MAX_FILE_SIZE_MB``; overrides win."""
        env: dict[str, Any] = {}
        if os.environ.get("ALLOWED_LOCAL_MEDIA_PATH"):
            env["allowed_local_media_path"] = os.environ["ALLOWED_LOCAL_MEDIA_PATH"]
        if os.environ.get("MAX_FILE_SIZE_MB"):
            env["max_file_size_mb"] = float(os.environ["MAX_FILE_SIZE_MB"])
        env.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**env)


@dataclass(frozen=True)
class LoadedImage:
    image: Image.Image  # RGB, pixels decoded
    content_hash: str  # sha256 of the source bytes


@dataclass(frozen=True)
class LoadedEmbedding:
    embeds: Any  # torch.Tensor [n, hidden]
    content_hash: str
    aux: dict[str, Any] = field(default_factory=dict)  # other keys of a dict-format file, kept


def content_hash(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


# ----------------------------------------------------------------------------- entry points


async def load_media(ref: MediaRef, cfg: MediaConfig, hidden_size: int | None = None
                     ) -> LoadedImage | LoadedEmbedding:
    """Fetch/read, validate and decode one media reference (blocking work runs in a thread)."""
    if ref.kind == "embedding_file":
        data = await asyncio.to_thread(read_local_file, ref.url, cfg, EMBEDDING_SUFFIXES)
        return await asyncio.to_thread(load_embedding_bytes, data, hidden_size)
    data = await load_image_bytes(ref.url, cfg)
    return await asyncio.to_thread(decode_image, data, cfg)


async def load_image_bytes(url: str, cfg: MediaConfig) -> bytes:
    """The raw bytes behind an image reference: http(s) URL, data: URL, or allowed local path."""
    scheme = urlsplit(url).scheme.lower()
    if scheme in ("http", "https"):
        return await fetch_url(url, cfg)
    if scheme == "data":
        return decode_data_url(url, cfg)
    if scheme in ("file", ""):
        return await asyncio.to_thread(read_local_file, url, cfg, None)
    raise MediaError(f"unsupported image URL scheme {scheme!r}: use http(s)://, data:, or a "
                     "local path under the allowed media directory")


# ----------------------------------------------------------------------------- http(s)


def check_host_allowed(host: str, port: int, cfg: MediaConfig) -> None:
    """Resolve ``host``; refuse it if any address is internal and the config does not allow it."""
    if cfg.allow_private_media_urls:
        return
    try:
        infos = socket.getaddrinfo(host, port, proto=socket.IPPROTO_TCP)
    except (socket.gaierror, UnicodeError) as exc:
        raise MediaError(f"cannot resolve host {host!r} of the image URL: {exc}") from exc
    for info in infos:
        addr = ipaddress.ip_address(str(info[4][0]).split("%")[0])
        if addr.is_loopback and cfg.allow_loopback_media_urls:
            continue
        if _is_internal(addr):
            raise MediaError(
                f"image URL host {host!r} resolves to the internal address {addr}; internal "
                "addresses are refused (start the worker with --allow-private-media-urls to "
                "allow them)", 403)


def _is_internal(addr: ipaddress.IPv4Address | ipaddress.IPv6Address) -> bool:
    mapped = getattr(addr, "ipv4_mapped", None)
    if mapped is not None:
        addr = mapped
    return (addr.is_loopback or addr.is_private or addr.is_link_local or addr.is_reserved
            or addr.is_multicast or addr.is_unspecified)


async def fetch_url(url: str, cfg: MediaConfig) -> bytes:
    """GET ``url`` with redirects followed by hand (each hop's host re-checked), one deadline."""
    try:
        return await asyncio.wait_for(_fetch_following(url, cfg), cfg.fetch_timeout_s)
    except (asyncio.TimeoutError, TimeoutError) as exc:
        raise MediaError(f"fetching the image URL timed out after {cfg.fetch_timeout_s:g}s: "
                         "use a faster host or send the image inline as a data: URL") from exc


async def _fetch_following(url: str, cfg: MediaConfig) -> bytes:
    import httpx  # the frontend may import this module for its checks without an HTTP client

    async with httpx.AsyncClient(follow_redirects=False, timeout=cfg.fetch_timeout_s,
                                 trust_env=False) as client:
        for _ in range(cfg.max_redirects + 1):
            parts = urlsplit(url)
            if parts.scheme.lower() not in ("http", "https") or not parts.hostname:
                raise MediaError(f"image URL {url!r} is not an http(s) URL with a host")
            port = parts.port or (443 if parts.scheme.lower() == "https" else 80)
            await asyncio.to_thread(check_host_allowed, parts.hostname, port, cfg)
            try:
                body, location = await _get_once(client, url, cfg)
            except httpx.HTTPError as exc:
                raise MediaError(f"fetching the image URL failed: {type(exc).__name__}: {exc}") from exc
            if location is None:
                return body
            url = urljoin(url, location)
    raise MediaError(f"the image URL redirected more than {cfg.max_redirects} times")


async def _get_once(client: Any, url: str, cfg: MediaConfig) -> tuple[bytes, str | None]:
    """One GET: (body, None), or (b"", location) for a redirect. The body is capped as it streams."""
    async with client.stream("GET", url) as resp:
        if resp.status_code in _REDIRECT_CODES and resp.headers.get("location"):
            return b"", resp.headers["location"]
        if resp.status_code != 200:
            raise MediaError(f"the image URL answered HTTP {resp.status_code}; check the URL")
        declared = resp.headers.get("content-length")
        if declared and declared.isdigit() and int(declared) > cfg.max_bytes:
            raise _too_large(int(declared), cfg)
        chunks, total = [], 0
        async for chunk in resp.aiter_bytes():
            total += len(chunk)
            if total > cfg.max_bytes:
                raise _too_large(total, cfg)
            chunks.append(chunk)
        return b"".join(chunks), None


def _too_large(size: int, cfg: MediaConfig) -> MediaError:
    return MediaError(f"media is larger than the {cfg.max_file_size_mb:g} MB limit (at least "
                      f"{size} bytes); send a smaller file or raise --max-file-size-mb", 413)


# ----------------------------------------------------------------------------- data: and files


def decode_data_url(url: str, cfg: MediaConfig) -> bytes:
    """Bytes of a ``data:<mime>;base64,<payload>`` URL (size checked before decoding)."""
    header, sep, payload = url.partition(",")
    if not sep or not header.lower().startswith("data:"):
        raise MediaError("malformed data: URL; expected data:image/<type>;base64,<payload>")
    if not header.lower().endswith(";base64"):
        raise MediaError("data: URLs must be base64-encoded (data:image/<type>;base64,<payload>)")
    payload = "".join(payload.split())
    if len(payload) * 3 // 4 > cfg.max_bytes:
        raise _too_large(len(payload) * 3 // 4, cfg)
    try:
        return base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise MediaError(f"the data: URL payload is not valid base64 ({exc}); encode the file "
                         "with standard base64") from exc


def resolve_local_path(path: str, cfg: MediaConfig) -> Path:
    """The real path of ``path`` if it lies under the allowed directory, else MediaError 403."""
    if path.startswith("file://"):
        path = unquote(urlsplit(path).path)
    if not cfg.allowed_local_media_path:
        raise MediaError("local media files are disabled; start the worker with "
                         "--allowed-local-media-path DIR (or ALLOWED_LOCAL_MEDIA_PATH)", 403)
    root = Path(cfg.allowed_local_media_path).resolve()
    try:
        real = Path(path).resolve(strict=True)  # follows symlinks and '..'
    except (OSError, RuntimeError) as exc:
        raise MediaError(f"local media file {path!r} does not exist", 400) from exc
    if not real.is_relative_to(root):
        raise MediaError(f"local media file {path!r} is outside the allowed directory {root}", 403)
    if not real.is_file():
        raise MediaError(f"local media path {path!r} is not a regular file")
    return real


def read_local_file(path: str, cfg: MediaConfig, suffixes: tuple[str, ...] | None) -> bytes:
    """Read an allowed local file, capped at the size limit."""
    real = resolve_local_path(path, cfg)
    if suffixes and real.suffix.lower() not in suffixes:
        raise MediaError(f"embedding file {path!r} must end in one of {', '.join(suffixes)}")
    size = real.stat().st_size
    if size > cfg.max_bytes:
        raise _too_large(size, cfg)
    with open(real, "rb") as f:
        return f.read(cfg.max_bytes + 1)


# ----------------------------------------------------------------------------- decoding


def decode_image(data: bytes, cfg: MediaConfig) -> LoadedImage:
    """Decode image bytes to an RGB PIL image; the pixel count is checked before decoding."""
    try:
        img = Image.open(io.BytesIO(data))  # reads the header only
    except Image.DecompressionBombError as exc:
        raise MediaError(f"image has too many pixels ({exc}); downscale it", 413) from exc
    except (UnidentifiedImageError, OSError, ValueError) as exc:
        raise MediaError("the media is not a decodable image (PNG, JPEG, WebP, GIF, ...); "
                         "check the URL or the data: payload") from exc
    width, height = img.size
    if width * height > cfg.max_image_pixels:
        raise MediaError(f"image is {width}x{height} = {width * height} pixels, over the "
                         f"{cfg.max_image_pixels} pixel limit; downscale it", 413)
    try:
        img.load()
        rgb = img.convert("RGB")
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as exc:
        raise MediaError(f"the image could not be decoded ({exc}); it may be truncated") from exc
    return LoadedImage(image=rgb, content_hash=content_hash(data))


def load_embedding_bytes(data: bytes, hidden_size: int | None) -> LoadedEmbedding:
    """Parse a ``torch.save``d tensor, or a dict with ``mm_embeddings`` (other keys kept)."""
    import pickle

    import torch

    try:
        obj = torch.load(io.BytesIO(data), weights_only=True, map_location="cpu")
    except (pickle.UnpicklingError, RuntimeError, EOFError, ValueError, TypeError) as exc:
        raise MediaError("embedding file could not be loaded safely: it must be torch.save() of "
                         "a tensor or of a dict {'mm_embeddings': tensor, ...} holding only "
                         f"tensors and plain values ({str(exc).splitlines()[0][:200]})") from exc
    aux: dict[str, Any] = {}
    if isinstance(obj, dict):
        if "mm_embeddings" not in obj:
            raise MediaError("embedding dict has no 'mm_embeddings' key; save "
                             "{'mm_embeddings': tensor[n, hidden], ...}")
        aux = {k: v for k, v in obj.items() if k != "mm_embeddings"}
        obj = obj["mm_embeddings"]
    embeds = check_embedding_tensor(obj, hidden_size)
    return LoadedEmbedding(embeds=embeds, content_hash=content_hash(data), aux=aux)


def check_embedding_tensor(obj: Any, hidden_size: int | None) -> Any:
    """Accept a float tensor [n, hidden] or [1, n, hidden]; return it as [n, hidden]."""
    import torch

    if not isinstance(obj, torch.Tensor) or not obj.is_floating_point():
        raise MediaError("embedding must be a floating-point tensor of shape [n, hidden]")
    if obj.dim() == 3 and obj.shape[0] == 1:
        obj = obj[0]
    if obj.dim() != 2 or obj.shape[0] < 1:
        raise MediaError(f"embedding has shape {tuple(obj.shape)}; expected [n, hidden] or "
                         "[1, n, hidden] with n >= 1")
    if hidden_size is not None and obj.shape[1] != hidden_size:
        raise MediaError(f"embedding hidden size is {obj.shape[1]} but the model's is "
                         f"{hidden_size}; compute the embedding with the served model")
    return obj.contiguous()
