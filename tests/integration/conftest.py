"""Fixtures starting real etcd and NATS servers on free loopback ports (stopped by PID after).

``etcd_server`` / ``nats_server`` are shared by a test module (tests keep apart by namespace);
``own_etcd`` / ``own_nats`` belong to one test, for tests that stop or restart the server.
"""

from __future__ import annotations

import sys
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[2]
if str(REPO_ROOT) not in sys.path:  # `tests.support` importable however pytest is started
    sys.path.insert(0, str(REPO_ROOT))

from tests.support.servers import ServerProc, start_etcd, start_nats  # noqa: E402


@pytest.fixture(scope="module")
def etcd_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProc]:
    with start_etcd(tmp_path_factory.mktemp("etcd")) as server:
        yield server


@pytest.fixture(scope="module")
def nats_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProc]:
    with start_nats(tmp_path_factory.mktemp("nats")) as server:
        yield server


@pytest.fixture
def own_etcd(tmp_path: Path) -> Iterator[ServerProc]:
    with start_etcd(tmp_path / "own-etcd") as server:
        yield server


@pytest.fixture
def own_nats(tmp_path: Path) -> Iterator[ServerProc]:
    with start_nats(tmp_path / "own-nats") as server:
        yield server


@pytest.fixture
def namespace() -> str:
    """A namespace no other test uses, so tests can share one server."""
    return f"t{uuid.uuid4().hex[:10]}"
