"""The launch scripts fail loudly and clean up: a worker dying during start-up is named with its
log tail, the script exits non-zero, and nothing it started is left running."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from tests.e2e.launcher import REPO, TOPOLOGIES, Launch


def test_worker_dying_at_startup_is_reported(tmp_path: Path) -> None:
    broken = tmp_path / "broken-model"
    broken.mkdir()
    (broken / "config.json").write_text('{"architectures": ["NoSuchArchitecture"]}')
    launch = Launch(TOPOLOGIES["agg"], str(broken), tmp_path / "run")
    with pytest.raises(RuntimeError) as info:
        launch.start(timeout=120)
    out = str(info.value)
    assert "agg-0" in out and "exited during start-up" in out, out
    assert "last lines of" in out and "Error" in out, out  # the worker's own traceback
    assert launch.returncode not in (None, 0)
    assert launch.stop() == []  # etcd, nats and the frontend were stopped by the script itself
    assert {"etcd", "nats", "frontend", "agg-0"} <= set(launch.pids())


@pytest.mark.parametrize("env, message", [
    ({"NUM_DECODE": "0"}, "NUM_DECODE=0 must be a whole number >= 1"),
    ({"MODEL": "/nonexistent/model"}, "is not a directory"),
])
def test_bad_settings_rejected_before_starting_anything(tmp_path: Path, env: dict[str, str],
                                                        message: str) -> None:
    full = {"PATH": "/usr/bin:/bin", "HOME": str(tmp_path), "TRIAD_RUN_DIR": str(tmp_path / "run"),
            "MODEL": str(tmp_path), **env}
    (tmp_path / "config.json").write_text("{}")
    proc = subprocess.run(["bash", str(REPO / "launch" / "disagg.sh")], env=full, capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode != 0
    assert message in proc.stderr, proc.stderr
    assert (tmp_path / "run" / "pids").read_text() == ""  # nothing was started
