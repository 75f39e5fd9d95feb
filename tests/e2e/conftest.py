"""Shared e2e fixtures: the model, test media (a local HTTP server, embedding files), the offline
reference outputs, and one launched cluster per named topology (module scope)."""

from __future__ import annotations

import base64
import http.server
import io
import os
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from PIL import Image

from tests.e2e.launcher import REPO, TOPOLOGIES, Launch

LEASE_TTL_S = 3.0
MAX_FILE_MB = 0.25  # the workers' media cap in these tests: a 400x400 noise PNG is over it
MAX_MODEL_LEN = 1024
MAX_TOKENS = 10


def _png(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def _shape_image(size: tuple[int, int], color: str, shape: str) -> Image.Image:
    from PIL import ImageDraw

    img = Image.new("RGB", size, "white")
    draw = ImageDraw.Draw(img)
    w, h = size
    box = (w // 4, h // 4, 3 * w // 4, 3 * h // 4)
    if shape == "circle":
        draw.ellipse(box, fill=color)
    else:
        draw.rectangle(box, fill=color)
    return img


class _Files(http.server.BaseHTTPRequestHandler):
    files: dict[str, bytes] = {}

    def log_message(self, *args: object) -> None:
        pass

    def do_GET(self) -> None:  # noqa: N802
        body = self.files.get(self.path)
        self.send_response(200 if body is not None else 404)
        self.send_header("Content-Type", "image/png")
        self.send_header("Content-Length", str(len(body or b"")))
        self.end_headers()
        self.wfile.write(body or b"")


@dataclass(frozen=True)
class Media:
    img1: Image.Image
    img2: Image.Image
    data_url1: str
    http_url2: str
    allowed_dir: Path
    embedding1: Path  # img1's embedding, computed offline, dict format with grid_thw
    embedding1_bare: Path  # the same rows as a bare [1, n, hidden] tensor: a flat run of n tokens
    item1_flat: object  # what the workers should make of it: MMItem with grid (1, 2, 2n)
    outside_embedding: Path
    wrong_hidden: Path
    pickle_file: Path
    big_data_url: str


@pytest.fixture(scope="session")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> str:
    """The shipped tiny VLM when present (TRIAD_E2E_MODEL overrides), else a random checkpoint."""
    chosen = os.environ.get("TRIAD_E2E_MODEL") or str(REPO / "models" / "triad-tiny-vlm")
    if (Path(chosen) / "config.json").exists():
        return chosen
    from tools.tinyvlm.build import make_random_checkpoint

    return str(make_random_checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny-random-vlm"))


@pytest.fixture(scope="session")
def offline_engine(model_dir: str) -> object:
    from workers.engine.config import EngineConfig
    from workers.engine.engine import LLMEngine

    torch.set_num_threads(1)  # the workers run with OMP_NUM_THREADS=1: same kernels, same bits
    return LLMEngine(EngineConfig(model=model_dir, max_model_len=MAX_MODEL_LEN))


@pytest.fixture(scope="session")
def media(tmp_path_factory: pytest.TempPathFactory, offline_engine: object) -> Iterator[Media]:
    base = tmp_path_factory.mktemp("media")
    allowed, outside = base / "allowed", base / "outside"
    allowed.mkdir()
    outside.mkdir()
    img1 = _shape_image((112, 84), "red", "circle")
    img2 = _shape_image((96, 128), "blue", "square")
    _Files.files = {"/img2.png": _png(img2)}
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Files)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    item = offline_engine.encode_images([img1])[0]  # type: ignore[attr-defined]
    hidden = int(item.embeds.shape[1])
    torch.save({"mm_embeddings": item.embeds, "grid_thw": torch.tensor(item.extras["grid_thw"])},
               allowed / "img1.pt")
    torch.save(item.embeds, outside / "img1.pt")
    torch.save(item.embeds[None], allowed / "img1_bare.pt")
    n = item.num_tokens
    flat = type(item)(embeds=item.embeds, num_tokens=n, extras={"grid_thw": [1, 2, 2 * n]})
    torch.save(torch.randn(4, hidden + 3), allowed / "wrong.pt")
    torch.save({"mm_embeddings": torch.randn(4, hidden), "obj": _Evil()}, allowed / "evil.pt")
    noise = Image.frombytes("RGB", (400, 400), os.urandom(400 * 400 * 3))
    yield Media(img1=img1, img2=img2,
                data_url1="data:image/png;base64," + base64.b64encode(_png(img1)).decode(),
                http_url2=f"http://127.0.0.1:{httpd.server_address[1]}/img2.png",
                allowed_dir=allowed, embedding1=allowed / "img1.pt",
                embedding1_bare=allowed / "img1_bare.pt", item1_flat=flat,
                outside_embedding=outside / "img1.pt", wrong_hidden=allowed / "wrong.pt",
                pickle_file=allowed / "evil.pt",
                big_data_url="data:image/png;base64," + base64.b64encode(_png(noise)).decode())
    httpd.shutdown()
    httpd.server_close()


class _Evil:
    def __reduce__(self) -> tuple[object, tuple[str]]:
        return (os.system, ("touch /tmp/triad-e2e-pickle-ran",))


@pytest.fixture(scope="module", params=list(TOPOLOGIES))
def cluster(request: pytest.FixtureRequest, model_dir: str, media: Media,
            tmp_path_factory: pytest.TempPathFactory) -> Iterator[Launch]:
    """One launched cluster per topology, shared by the module's tests."""
    topology = TOPOLOGIES[request.param]
    worker_args = (f"--allowed-local-media-path {media.allowed_dir} --allow-loopback-media-urls "
                   f"--max-file-size-mb {MAX_FILE_MB} --max-model-len {MAX_MODEL_LEN} "
                   "--kv-cache-mb 64 --handle-ttl-s 30 --drain-timeout-s 10")
    launch = Launch(topology, model_dir, tmp_path_factory.mktemp(f"run-{topology.name}"),
                    worker_args=worker_args, lease_ttl_s=LEASE_TTL_S,
                    extra_env={"OMP_NUM_THREADS": "1", "FRONTEND_ARGS": "--model-refresh 0.5"})
    launch.start(timeout=400)
    yield launch
    leftovers = launch.stop()
    assert not leftovers, f"processes left running after the launch script stopped: {leftovers}"
    assert launch.returncode == 0, "\n".join(launch.output[-40:])
    assert not launch.unclean_workers(), f"workers that did not drain: {launch.unclean_workers()}"
