"""The pull plan of common.transfer_plan: made by the receiver, checked by the owner (no UCX)."""

from __future__ import annotations

import pytest
import torch

from common import transfer_plan as plan_mod


def test_receiver_plan_follows_its_runs_up_to_max_ops() -> None:
    whole = torch.zeros(1000, dtype=torch.uint8)
    contiguous = plan_mod.region_map([whole[0:100], whole[100:400], whole[400:1000]], "dst")
    assert plan_mod.receiver_plan(contiguous, max_ops=8) == [(0, 1000)]
    three_runs = plan_mod.region_map([whole[0:100], whole[200:300], whole[500:900]], "dst")
    plan = plan_mod.receiver_plan(three_runs, max_ops=8)
    assert plan == [(0, 100), (100, 200), (200, 600)]
    assert all(plan_mod.direct_run(three_runs, a, b) is not None for a, b in plan)
    assert plan_mod.plan_cuts(plan) == [100, 200]
    assert plan_mod.receiver_plan(three_runs, max_ops=3) == plan
    assert plan_mod.receiver_plan(three_runs, max_ops=2) == [(0, 600)]  # one staged message


def test_owner_checks_the_receivers_cuts() -> None:
    assert plan_mod.plan_from_cuts(600, [100, 200], 8) == [(0, 100), (100, 200), (200, 600)]
    assert plan_mod.plan_from_cuts(600, [], 1) == [(0, 600)]
    for cuts, match in (([200, 100], "increase"), ([0], "increase"), ([600], "increase"),
                        ([100, 100], "increase"), ("100", "list of integers"),
                        ([1.5], "list of integers"), ([True], "list of integers"),
                        (list(range(1, 10)), "at most 8")):
        with pytest.raises(ValueError, match=match):
            plan_mod.plan_from_cuts(600, cuts, 8)
