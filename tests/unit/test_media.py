"""common.media against a real threaded HTTP server on a free loopback port and real files."""

from __future__ import annotations

import base64
import http.server
import io
import os
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from PIL import Image

from common.media import (
    LoadedEmbedding,
    LoadedImage,
    MediaConfig,
    MediaError,
    decode_image,
    load_media,
)
from common.protocol import MediaRef

HIDDEN = 64


def _png(w: int = 32, h: int = 24, color: tuple[int, int, int] = (200, 10, 30)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (w, h), color).save(buf, format="PNG")
    return buf.getvalue()


PNG = _png()


class _Handler(http.server.BaseHTTPRequestHandler):
    """Routes: /img.png, /text, /big, /big-nolen, /slow, /chain/<n>, /to/<url-path-rest>."""

    def log_message(self, *args: object) -> None:  # keep test output quiet
        pass

    def do_GET(self) -> None:  # noqa: N802 (http.server's name)
        path = self.path
        if path == "/img.png":
            self._send(200, PNG, "image/png")
        elif path == "/text":
            self._send(200, b"<html>not an image</html>", "text/html")
        elif path == "/big":
            self._send(200, b"\0" * (2 * 1024 * 1024), "image/png")
        elif path == "/big-nolen":
            self._stream_without_length(2 * 1024 * 1024)
        elif path == "/slow":
            time.sleep(3)
            self._send(200, PNG, "image/png")
        elif path.startswith("/chain/"):
            n = int(path.rsplit("/", 1)[1])
            self._redirect("/img.png" if n <= 1 else f"/chain/{n - 1}")  # n redirects
        elif path.startswith("/to/"):
            self._redirect("http://" + path[len("/to/"):])
        else:
            self._send(404, b"missing", "text/plain")

    def _send(self, code: int, body: bytes, ctype: str) -> None:
        self.send_response(code)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        try:
            self.wfile.write(body)
        except (BrokenPipeError, ConnectionResetError):
            pass  # the client gave up (size cap, timeout), as the test wants

    def _redirect(self, location: str) -> None:
        self.send_response(302)
        self.send_header("Location", location)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def _stream_without_length(self, size: int) -> None:
        self.send_response(200)
        self.send_header("Content-Type", "image/png")
        self.send_header("Connection", "close")
        self.end_headers()
        chunk = b"\0" * 65536
        try:
            for _ in range(size // len(chunk)):
                self.wfile.write(chunk)
        except (BrokenPipeError, ConnectionResetError):
            pass  # the client stopped reading at the cap, as it should


@pytest.fixture(scope="module")
def server() -> Iterator[str]:
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    httpd.daemon_threads = True
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()
    httpd.server_close()
    thread.join(5)


def _cfg(**kw: object) -> MediaConfig:
    base: dict[str, object] = dict(allow_loopback_media_urls=True, max_file_size_mb=1.0,
                                   fetch_timeout_s=1.5, max_redirects=3)
    base.update(kw)
    return MediaConfig(**base)  # type: ignore[arg-type]


async def _load(url: str, cfg: MediaConfig, kind: str = "url") -> LoadedImage | LoadedEmbedding:
    return await load_media(MediaRef(kind=kind, url=url), cfg, hidden_size=HIDDEN)


async def _error(url: str, cfg: MediaConfig, kind: str = "url") -> MediaError:
    with pytest.raises(MediaError) as info:
        await _load(url, cfg, kind)
    return info.value


# ----------------------------------------------------------------------------- http(s)


async def test_fetch_ok_gives_rgb_image_and_hash(server: str) -> None:
    out = await _load(f"{server}/img.png", _cfg())
    assert isinstance(out, LoadedImage)
    assert out.image.mode == "RGB" and out.image.size == (32, 24)
    assert out.image.getpixel((0, 0)) == (200, 10, 30)
    from common.media import content_hash
    assert out.content_hash == content_hash(PNG)


async def test_redirects_followed_within_limit(server: str) -> None:
    out = await _load(f"{server}/chain/3", _cfg(max_redirects=3))
    assert isinstance(out, LoadedImage)


async def test_redirect_chain_over_limit_refused(server: str) -> None:
    err = await _error(f"{server}/chain/4", _cfg(max_redirects=3))
    assert err.code == 400 and "redirected more than 3" in err.message


@pytest.mark.parametrize("target", ["10.255.255.1/x.png", "169.254.169.254/latest", "192.168.1.1/a"])
async def test_redirect_to_private_address_refused(server: str, target: str) -> None:
    err = await _error(f"{server}/to/{target}", _cfg())
    assert err.code == 403 and "internal address" in err.message


async def test_loopback_refused_by_default(server: str) -> None:
    err = await _error(f"{server}/img.png", MediaConfig())
    assert err.code == 403 and "--allow-private-media-urls" in err.message


async def test_allow_private_flag_allows_loopback(server: str) -> None:
    out = await _load(f"{server}/img.png", MediaConfig(allow_private_media_urls=True))
    assert isinstance(out, LoadedImage)


@pytest.mark.parametrize("path", ["/big", "/big-nolen"])
async def test_oversize_download_refused(server: str, path: str) -> None:
    err = await _error(f"{server}{path}", _cfg(max_file_size_mb=1.0))
    assert err.code == 413 and "--max-file-size-mb" in err.message


async def test_fetch_timeout(server: str) -> None:
    start = time.monotonic()
    err = await _error(f"{server}/slow", _cfg(fetch_timeout_s=0.5))
    assert time.monotonic() - start < 2.5
    assert err.code == 400 and "timed out" in err.message


async def test_http_error_status_reported(server: str) -> None:
    err = await _error(f"{server}/nope", _cfg())
    assert err.code == 400 and "HTTP 404" in err.message


async def test_non_image_bytes_refused(server: str) -> None:
    err = await _error(f"{server}/text", _cfg())
    assert err.code == 400 and "not a decodable image" in err.message


@pytest.mark.parametrize("url", ["ftp://example.com/a.png", "gopher://x/y", "javascript:alert(1)"])
async def test_unsupported_scheme(url: str) -> None:
    err = await _error(url, _cfg())
    assert err.code == 400 and "unsupported image URL scheme" in err.message


# ----------------------------------------------------------------------------- data: URLs


async def test_data_url_ok() -> None:
    url = "data:image/png;base64," + base64.b64encode(PNG).decode()
    out = await _load(url, _cfg())
    assert isinstance(out, LoadedImage) and out.image.size == (32, 24)


@pytest.mark.parametrize("url", ["data:image/png;base64,@@@not-base64!!",
                                 "data:image/png;base64,abc",  # bad padding
                                 "data:image/png,rawbytes", "data:image/png;base64"])
async def test_bad_data_url(url: str) -> None:
    err = await _error(url, _cfg())
    assert err.code == 400


async def test_data_url_non_image() -> None:
    url = "data:image/png;base64," + base64.b64encode(b"hello world, no image").decode()
    err = await _error(url, _cfg())
    assert err.code == 400 and "not a decodable image" in err.message


async def test_data_url_over_cap() -> None:
    url = "data:image/png;base64," + base64.b64encode(b"\0" * (1024 * 1024 + 10)).decode()
    err = await _error(url, _cfg(max_file_size_mb=1.0))
    assert err.code == 413


def test_pixel_cap_checked_before_decoding() -> None:
    big = _png(2000, 2000, (0, 0, 0))  # small file, 4 M pixels
    with pytest.raises(MediaError) as info:
        decode_image(big, MediaConfig(max_image_pixels=1_000_000))
    assert info.value.code == 413 and "pixel limit" in info.value.message
    assert decode_image(big, MediaConfig()).image.size == (2000, 2000)


# ----------------------------------------------------------------------------- local files


@pytest.fixture()
def media_dirs(tmp_path: Path) -> tuple[Path, Path]:
    allowed = tmp_path / "allowed"
    outside = tmp_path / "outside"
    allowed.mkdir()
    outside.mkdir()
    (allowed / "img.png").write_bytes(PNG)
    (outside / "secret.png").write_bytes(PNG)
    torch.save(torch.randn(5, HIDDEN), outside / "emb.pt")
    return allowed, outside


async def test_local_file_inside_allowed_dir(media_dirs: tuple[Path, Path]) -> None:
    allowed, _ = media_dirs
    out = await _load(str(allowed / "img.png"), _cfg(allowed_local_media_path=str(allowed)))
    assert isinstance(out, LoadedImage)
    out = await _load(f"file://{allowed}/img.png", _cfg(allowed_local_media_path=str(allowed)))
    assert isinstance(out, LoadedImage)


async def test_local_files_disabled_without_flag(media_dirs: tuple[Path, Path]) -> None:
    allowed, _ = media_dirs
    err = await _error(str(allowed / "img.png"), _cfg())
    assert err.code == 403 and "--allowed-local-media-path" in err.message


async def test_path_outside_allowed_dir(media_dirs: tuple[Path, Path]) -> None:
    allowed, outside = media_dirs
    cfg = _cfg(allowed_local_media_path=str(allowed))
    for path in (str(outside / "secret.png"), f"{allowed}/../outside/secret.png"):
        err = await _error(path, cfg)
        assert err.code == 403 and "outside the allowed directory" in err.message


async def test_symlink_escape_refused(media_dirs: tuple[Path, Path]) -> None:
    allowed, outside = media_dirs
    os.symlink(outside / "secret.png", allowed / "link.png")
    os.symlink(outside, allowed / "dirlink")
    cfg = _cfg(allowed_local_media_path=str(allowed))
    for path in (allowed / "link.png", allowed / "dirlink" / "emb.pt"):
        kind = "embedding_file" if path.suffix == ".pt" else "url"
        err = await _error(str(path), cfg, kind)
        assert err.code == 403


async def test_missing_local_file(media_dirs: tuple[Path, Path]) -> None:
    allowed, _ = media_dirs
    err = await _error(str(allowed / "nope.png"), _cfg(allowed_local_media_path=str(allowed)))
    assert err.code == 400 and "does not exist" in err.message


def test_env_config(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("ALLOWED_LOCAL_MEDIA_PATH", str(tmp_path))
    monkeypatch.setenv("MAX_FILE_SIZE_MB", "7")
    cfg = MediaConfig.from_env()
    assert cfg.allowed_local_media_path == str(tmp_path) and cfg.max_bytes == 7 * 1024 * 1024
    assert MediaConfig.from_env(max_file_size_mb=3.0).max_file_size_mb == 3.0
    with pytest.raises(ValueError):
        MediaConfig(max_file_size_mb=0)


# ----------------------------------------------------------------------------- embedding files


@pytest.fixture()
def emb_dir(tmp_path: Path) -> Path:
    return tmp_path


async def _load_emb(path: Path) -> LoadedEmbedding:
    out = await _load(str(path), _cfg(allowed_local_media_path=str(path.parent)), "embedding_file")
    assert isinstance(out, LoadedEmbedding)
    return out


async def test_bare_tensor_embedding(emb_dir: Path) -> None:
    t = torch.randn(7, HIDDEN)
    torch.save(t, emb_dir / "e.pt")
    out = await _load_emb(emb_dir / "e.pt")
    assert torch.equal(out.embeds, t) and out.aux == {} and len(out.content_hash) == 64


async def test_batched_embedding_squeezed(emb_dir: Path) -> None:
    t = torch.randn(1, 4, HIDDEN)
    torch.save(t, emb_dir / "e.pth")
    out = await _load_emb(emb_dir / "e.pth")
    assert out.embeds.shape == (4, HIDDEN) and torch.equal(out.embeds, t[0])


async def test_dict_embedding_keeps_aux_keys(emb_dir: Path) -> None:
    t = torch.randn(16, HIDDEN)
    grid = torch.tensor([1, 8, 8])
    torch.save({"mm_embeddings": t, "image_grid_thw": grid, "note": "x"}, emb_dir / "e.bin")
    out = await _load_emb(emb_dir / "e.bin")
    assert torch.equal(out.embeds, t)
    assert set(out.aux) == {"image_grid_thw", "note"} and torch.equal(out.aux["image_grid_thw"], grid)


class _Evil:
    def __reduce__(self) -> tuple[object, tuple[str]]:
        return (os.system, ("touch /tmp/triad-pwned-by-pickle",))


async def test_pickle_embedding_refused_not_executed(emb_dir: Path) -> None:
    marker = Path("/tmp/triad-pwned-by-pickle")
    marker.unlink(missing_ok=True)
    torch.save({"mm_embeddings": torch.randn(2, HIDDEN), "x": _Evil()}, emb_dir / "evil.pt")
    err = await _error(str(emb_dir / "evil.pt"), _cfg(allowed_local_media_path=str(emb_dir)),
                       "embedding_file")
    assert err.code == 400 and "could not be loaded safely" in err.message
    assert not marker.exists()


@pytest.mark.parametrize("tensor", [torch.randn(3, HIDDEN + 1), torch.randn(2, 3, HIDDEN),
                                    torch.randn(HIDDEN), torch.ones(3, HIDDEN, dtype=torch.long)])
async def test_wrong_embedding_shape(emb_dir: Path, tensor: torch.Tensor) -> None:
    torch.save(tensor, emb_dir / "bad.pt")
    err = await _error(str(emb_dir / "bad.pt"), _cfg(allowed_local_media_path=str(emb_dir)),
                       "embedding_file")
    assert err.code == 400 and ("hidden size" in err.message or "shape" in err.message
                                or "floating-point" in err.message)


async def test_embedding_dict_without_key_and_wrong_suffix(emb_dir: Path) -> None:
    cfg = _cfg(allowed_local_media_path=str(emb_dir))
    torch.save({"embeds": torch.randn(2, HIDDEN)}, emb_dir / "nokey.pt")
    err = await _error(str(emb_dir / "nokey.pt"), cfg, "embedding_file")
    assert "mm_embeddings" in err.message
    torch.save(torch.randn(2, HIDDEN), emb_dir / "e.npy")
    err = await _error(str(emb_dir / "e.npy"), cfg, "embedding_file")
    assert ".pt" in err.message
    (emb_dir / "garbage.pt").write_bytes(b"not a torch file at all")
    err = await _error(str(emb_dir / "garbage.pt"), cfg, "embedding_file")
    assert err.code == 400
