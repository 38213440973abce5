"""The optimum is deterministic: a fixed request gives one plan, whatever the machine load (ranks plan alone)."""

from __future__ import annotations

import random

import pytest

pytest.importorskip("ortools")

from flashcp_planner import PlanOptions, PlanRequest, plan  # noqa: E402


def test_time_limited_optimum_returns_the_same_plan_every_call() -> None:
    rng = random.Random(11)
    lengths = [rng.randint(50, 4000) for _ in range(40)]
    # Too short a limit to prove optimality: the search is cut, and where it is cut must not depend on timing.
    options = PlanOptions(time_limit_s=1.0, num_workers=2, random_seed=5)
    request = PlanRequest(micro_batches=[lengths], cp_size=16, strategy="optimum", options=options)
    plans = [plan(request)[0] for _ in range(3)]
    assert plans[0].optimality.status == "feasible"
    assert len({p.fingerprint() for p in plans}) == 1
