"""The compiled search engine (strategies/_engine.pyx) against its Python reference (PlacementSearch).

The engine must give the very same placements, shares and floats as the reference it mirrors; these
tests run both on the same instances and compare exactly. Without a built engine they are skipped,
except in CI, which sets FLASHCP_REQUIRE_NATIVE=1 to make a missing build an error.
"""

from __future__ import annotations

import dataclasses
import math
import os
import random

import numpy as np
import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from flashcp_planner import CommMode, PlanOptions, PlanRequest
from flashcp_planner.presets import get_preset
from flashcp_planner.strategies import flashcp
from flashcp_planner.strategies.flashcp import PlacementSearch, group_sizes, heuristic_placements
from flashcp_planner.workloads import generate

BASE = get_preset("h100-llama8b")

if os.environ.get("FLASHCP_REQUIRE_NATIVE") == "1":
    assert flashcp.NATIVE_AVAILABLE, "FLASHCP_REQUIRE_NATIVE=1 but the compiled engine did not build"
pytestmark = pytest.mark.skipif(not flashcp.NATIVE_AVAILABLE, reason="compiled engine not built")


def _context(lengths, cp_size, **kwargs):
    return next(iter(PlanRequest(micro_batches=[lengths], cp_size=cp_size, **kwargs).contexts()))


def _cost_model(draw_gpn: int, overlap: float, curve_decreasing: bool):
    curve = ((64, 0.3), (1024, 0.2), (8192, 0.9)) if curve_decreasing else BASE.attention_efficiency
    return dataclasses.replace(BASE, gpus_per_node=draw_gpn, overlap_fraction=overlap, attention_efficiency=curve)


lengths_st = st.lists(
    st.one_of(st.integers(1, 64), st.integers(64, 4000), st.integers(4000, 60000), st.integers(60000, 400000)),
    min_size=33, max_size=120,
)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(lengths=lengths_st, cp_size=st.sampled_from([1, 2, 3, 4, 6, 8, 16, 32, 64]),
       slack=st.sampled_from([0.0, 0.02, 0.25]), comm=st.sampled_from(list(CommMode)),
       gpn=st.sampled_from([1, 2, 4, 8]), overlap=st.sampled_from([0.0, 0.5, 1.0]),
       curve_decreasing=st.booleans(), sub_group=st.booleans())
def test_same_placements_as_the_reference(lengths, cp_size, slack, comm, gpn, overlap, curve_decreasing,
                                          sub_group):
    ctx = _context(lengths, cp_size, capacity_slack=slack, cost_model=_cost_model(gpn, overlap, curve_decreasing),
                   options=PlanOptions(allow_sub_group=sub_group))
    assert heuristic_placements(ctx, comm, native=True) == heuristic_placements(ctx, comm, native=False)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(lengths=st.lists(st.one_of(st.integers(1, 64), st.integers(64, 4000), st.integers(4000, 100000)),
                        min_size=1, max_size=32),
       cp_size=st.sampled_from([2, 3, 4, 8, 16]), slack=st.sampled_from([0.0, 0.05, 0.25]),
       comm=st.sampled_from(list(CommMode)), gpn=st.sampled_from([2, 4, 8]), overlap=st.sampled_from([0.0, 1.0]))
def test_small_instances_same_placements_as_the_reference(lengths, cp_size, slack, comm, gpn, overlap):
    """Small instances run the compiled ruin-and-recreate search (strategies/recreate.py's _recreate)."""
    ctx = _context(lengths, cp_size, capacity_slack=slack, cost_model=_cost_model(gpn, overlap, False))
    assert PlacementSearch(ctx, CommMode.EXACT_NEED, native=True).small
    assert heuristic_placements(ctx, comm, native=True) == heuristic_placements(ctx, comm, native=False)


@pytest.mark.parametrize("workload", ["prolong", "web", "code", "longctx", "single", "half-plus-tiny", "equal", "ones"])
@pytest.mark.parametrize("cp_size", [8, 64])
def test_same_placements_on_generated_workloads(workload, cp_size):
    for seed in range(3):
        [lengths] = generate(workload, context=cp_size * (256 if workload == "ones" else 32768), seed=seed)
        ctx = _context(lengths, cp_size)
        for comm in (CommMode.EXACT_NEED, CommMode.SHARDING_AWARE):
            assert heuristic_placements(ctx, comm, native=True) == heuristic_placements(ctx, comm, native=False)


def test_greedy_and_improvement_phases_match_step_by_step():
    ctx = _context(generate("prolong", context=16 * 65536, seed=7)[0], 16)
    native = PlacementSearch(ctx, CommMode.EXACT_NEED, native=True)
    reference = PlacementSearch(ctx, CommMode.EXACT_NEED, native=False)
    assert native.engine is not None and reference.engine is None
    for name in ("length_array", "whole_ms_array", "whole_cost_array", "longest_first_array"):
        assert getattr(native, name).tolist() == getattr(reference, name).tolist(), name
    for alpha in (1.0, 0.0, 2.0):
        ours, theirs = native.greedy(alpha=alpha), reference.greedy(alpha=alpha)
        assert ours.placement == theirs.placement
        assert ours.state.totals() == theirs.state.totals()
        assert (ours.deviated, ours.split) == (theirs.deviated, theirs.split)
        native.improve(ours)
        reference.improve(theirs)
        assert ours.placement == theirs.placement
        assert ours.state.totals() == theirs.state.totals()
        makespan = max(theirs.state.totals())
        for factor in (0.5, 1.0, 2.0):
            assert native.lpt_may_beat(makespan * factor) == reference.lpt_may_beat(makespan * factor)


@settings(max_examples=80, deadline=None)
@given(doc=st.integers(0, 1000), length=st.integers(1, 1 << 31), k=st.sampled_from([2, 4, 6, 8, 12, 16, 64, 256]),
       groups=st.sampled_from([1, 4]), first=st.integers(0, 3), gpn=st.sampled_from([1, 2, 4, 8, 16]),
       comm=st.sampled_from([CommMode.EXACT_NEED, CommMode.SHARDING_AWARE]))
def test_head_tail_shares_match_the_reference(doc, length, k, groups, first, gpn, comm):
    n = k * groups
    assume(k in group_sizes(n, allow_sub_group=True))  # a power of two dividing n, or n itself
    first = first % groups
    lengths = [1] * 40
    lengths[doc % 40] = length
    ctx = _context(lengths, n, cost_model=dataclasses.replace(BASE, gpus_per_node=gpn), capacity_slack=1.0)
    search = PlacementSearch(ctx, comm, native=False)
    engine = PlacementSearch(ctx, comm, native=True).engine
    g0 = first * k
    assert engine.shares(doc % 40, g0, k) == search.shares(doc % 40, g0, k)
    assert engine.shares(doc % 40, g0, 1) == search.shares(doc % 40, g0, 1)


@settings(max_examples=40, deadline=None)
@given(lengths=st.lists(st.integers(1, 1 << 31), min_size=1, max_size=50), curve_decreasing=st.booleans(),
       overhead=st.sampled_from([0.0, 0.002]), tflops=st.sampled_from([500.0, 1, 3.5e-3]))
def test_whole_document_attention_is_the_cost_models_float_for_float(lengths, curve_decreasing, overhead, tflops):
    cm = dataclasses.replace(_cost_model(8, 1.0, curve_decreasing), attention_segment_overhead_ms=overhead,
                             attention_tflops=tflops)
    array = np.array(lengths, dtype=np.int64)
    assert flashcp.Attention(cm).ms_of(np.zeros_like(array), array).tolist() == [
        cm.attention_ms(0, length) for length in lengths]


def test_per_doc_lower_bound_agrees_with_the_array_formula():
    rng = random.Random(3)
    for _ in range(30):
        lengths = [rng.choice([1, 7, 300, 5000, 70000, 1 << 20]) for _ in range(rng.randint(40, 400))]
        ctx = _context(lengths, rng.choice([2, 8, 64, 256]))
        ours = flashcp._per_doc_lower_bound(PlacementSearch(ctx, CommMode.EXACT_NEED, native=True))
        theirs = flashcp._per_doc_lower_bound(PlacementSearch(ctx, CommMode.EXACT_NEED, native=False))
        assert math.isclose(ours, theirs, rel_tol=1e-12)


@pytest.mark.parametrize(("workload", "cp_size"), [("prolong", 8), ("web", 16), ("longctx", 64)])
def test_plans_scored_through_the_seeded_memo_equal_fresh_scoring(workload, cp_size):
    """The engine seeds the cost model's whole-document memo with its own attention times; scoring with
    an empty memo (the Python formulas) must give the same plan, float for float."""
    from flashcp_planner import plan
    from flashcp_planner.layout import build_plan, placements_layout

    [lengths] = generate(workload, context=cp_size * 32768, seed=5)
    seeded = plan(PlanRequest(micro_batches=[lengths], cp_size=cp_size, cost_model=dataclasses.replace(BASE),
                              options=PlanOptions(comm=CommMode.EXACT_NEED)))[0]  # (by default: maybe node_dedup)
    fresh = _context(lengths, cp_size, cost_model=dataclasses.replace(BASE))
    layout = placements_layout(fresh, *heuristic_placements(fresh, CommMode.EXACT_NEED, native=False))
    reference = build_plan(fresh, layout, strategy="flashcp", comm=CommMode.EXACT_NEED)
    assert seeded.to_json() == reference.to_json()


def test_flashcp_native_0_runs_the_python_search_with_the_same_plans():
    """``FLASHCP_NATIVE=0`` (read at import) switches a whole process to the Python search; the CLI's
    JSON plans are the same either way."""
    import json
    import subprocess
    import sys

    [lengths] = generate("prolong", context=16 * 32768, seed=11)
    text = json.dumps([lengths[:24], lengths])  # a small and a large micro-batch
    script = ("import sys; from flashcp_planner.cli import main; from flashcp_planner.strategies import flashcp; "
              "print(flashcp._NATIVE_DEFAULT, file=sys.stderr); sys.exit(main(sys.argv[1:]))")
    outputs = {}
    for value in ("1", "0"):
        run = subprocess.run(
            [sys.executable, "-c", script, "plan", "--lengths", "-", "--cp", "16", "--format", "json"],
            input=text, capture_output=True, text=True, check=True,
            env={**os.environ, "FLASHCP_NATIVE": value},
        )
        assert run.stderr.strip().splitlines()[-1] == str(value == "1")
        outputs[value] = run.stdout
    assert outputs["1"] == outputs["0"]
    assert len(json.loads(outputs["1"])["plans"]) == 2
