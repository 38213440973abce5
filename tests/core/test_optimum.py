"""The CP-SAT optimum against exhaustive enumeration of the same option space, scored by the float evaluator."""

from __future__ import annotations

import dataclasses
import itertools
import sys

import pytest

from flashcp_planner import CommMode, PlanOptions, PlanRequest, plan
from flashcp_planner.comm import derive_transfers
from flashcp_planner.cost import rank_costs
from flashcp_planner.model import segments_by_rank
from flashcp_planner.presets import get_preset
from flashcp_planner.strategies.flashcp import placements_layout
from flashcp_planner.strategies.optimum import document_options

pytest.importorskip("ortools")

BASE = get_preset("h100-llama8b")

CASES = [
    # (lengths, N, comm, gpus_per_node, overlap)
    ([3000, 500, 1200, 90], 2, CommMode.EXACT_NEED, 8, 1.0),
    ([1052, 1030, 1405, 282], 4, CommMode.EXACT_NEED, 8, 1.0),
    ([8000, 300, 2000, 2100, 64], 4, CommMode.SHARDING_AWARE, 2, 0.5),
    ([4000, 4000, 100, 100, 100], 4, CommMode.ALL_GATHER, 2, 0.0),
    ([6000, 1500, 700, 20, 3000, 2500], 2, CommMode.EXACT_NEED, 1, 1.0),
    ([2500, 2600, 40, 900, 1100], 3, CommMode.EXACT_NEED, 8, 1.0),
]


def _brute_force_min(request):
    ctx = request.contexts()[0]
    comm = request.options.comm
    best = float("inf")
    for combo in itertools.product(*document_options(ctx)):
        layout = placements_layout(ctx, list(combo), {})
        rank_segments = segments_by_rank(layout.rank_segments)
        if any(sum(s.num_tokens for s in segs) > ctx.capacity for segs in rank_segments):
            continue
        costs = rank_costs(rank_segments, derive_transfers(rank_segments, comm), ctx.cost_model)
        best = min(best, max(c.total_ms for c in costs))
    return best


@pytest.mark.parametrize(("lengths", "cp_size", "comm", "gpn", "overlap"), CASES)
def test_cp_sat_equals_exhaustive_enumeration(lengths, cp_size, comm, gpn, overlap):
    cost_model = dataclasses.replace(BASE, gpus_per_node=gpn, overlap_fraction=overlap)
    options = PlanOptions(comm=comm, time_limit_s=30, num_workers=2, random_seed=0)
    request = PlanRequest(micro_batches=[lengths], cp_size=cp_size, cost_model=cost_model, strategy="optimum",
                          capacity_slack=0.5, options=options)
    (p,) = plan(request)
    opt = p.optimality
    assert opt is not None and opt.status == "optimal"
    expected = _brute_force_min(request)
    # Integer scaling rounds each coefficient to 1 ns: allow that much per term.
    assert p.makespan_ms == pytest.approx(expected, rel=1e-6, abs=1e-5)
    assert opt.objective_ms == p.makespan_ms
    assert p.makespan_ms >= p.lower_bound_ms
    assert opt.bound_ms <= opt.objective_ms
    assert opt.bound_ms == pytest.approx(opt.objective_ms, rel=1e-5)
    heuristic = plan(dataclasses.replace(request, strategy="flashcp"))[0].makespan_ms
    assert opt.heuristic_ms == pytest.approx(heuristic, rel=1e-12)
    assert heuristic >= p.makespan_ms * (1 - 1e-12)
    assert opt.heuristic_gap == pytest.approx(heuristic / p.makespan_ms - 1, abs=1e-12)


def test_time_limited_solve_reports_feasible_and_never_worse_than_the_heuristic():
    lengths = [13000, 900, 4500, 220, 3100, 7800, 610, 2900, 5100, 64, 1500, 8800, 3300, 120, 2600, 4100]
    options = PlanOptions(time_limit_s=0.05, num_workers=1, random_seed=0)
    (p,) = plan(PlanRequest(micro_batches=[lengths], cp_size=8, strategy="optimum", options=options))
    opt = p.optimality
    assert opt.status in ("optimal", "feasible")
    assert opt.objective_ms <= opt.heuristic_ms
    assert opt.bound_ms <= opt.objective_ms
    assert p.to_dict()["optimality"]["status"] == opt.status


def test_missing_ortools_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "ortools.sat.python", None)
    monkeypatch.setitem(sys.modules, "ortools.sat.python.cp_model", None)
    with pytest.raises(ImportError, match=r"flashcp\[ilp\]"):
        plan(PlanRequest(micro_batches=[[10, 20]], cp_size=2, strategy="optimum"))
