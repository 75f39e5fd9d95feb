"""GPU tests: everything here needs CUDA (and triton) and is skipped cleanly without it."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tools.tinyvlm.build import make_random_checkpoint

requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def pytest_collection_modifyitems(config, items):
    """Mark every test in this folder as needing CUDA (one rule, not one decorator per test)."""
    here = Path(__file__).parent
    for item in items:
        if Path(str(item.fspath)).parent == here:
            item.add_marker(requires_cuda)


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    """||out - ref|| / ||ref|| in float64 (NaN anywhere gives NaN, which fails any bound)."""
    out, ref = out.double(), ref.double()
    return float((out - ref).norm() / ref.norm())


@pytest.fixture(scope="session")
def tiny_gpu_qwen_dir(tmp_path_factory) -> Path:
    """A tiny random Qwen2.5-VL checkpoint (built offline in a temp dir)."""
    return make_random_checkpoint(tmp_path_factory.mktemp("tiny_gpu_qwen"), seed=3, arch="qwen2_5_vl")
