"""Fixture for the Slurm deploy tests: one real 2-node Slurm cluster per module.

Run them with `.venv/bin/python -m pytest -m slurm tests/slurm` (root installs the Debian Slurm
packages when missing; without root and without Slurm the tests skip and say why).
"""
from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

import pytest

from tests.support.slurm import SlurmCluster, ensure_slurm_installed


@pytest.fixture(scope="module")
def slurm_cluster():
    """A running 2-node cluster (node1, node2); torn down and checked for leftovers after."""
    why = ensure_slurm_installed()
    if why:
        pytest.skip(why)
    # Not under pytest's tmp dir: munged runs as the munge user and must traverse every parent.
    root = Path(tempfile.mkdtemp(prefix="triad-slurm-"))
    cluster = SlurmCluster(root).start()
    try:
        yield cluster
    finally:
        cluster.stop()
        left = cluster.leftover_pids()
        shutil.rmtree(root, ignore_errors=True)
    assert not left, f"processes left after the Slurm cluster stopped: {left}"
