"""flashcp.codec: lossless plan encoding and request decoding that validates like the core."""

from __future__ import annotations

import dataclasses
import random

import pytest

from flashcp import codec
from flashcp.v1 import planner_pb2 as pb
from flashcp_planner import STRATEGIES, CommMode, PlanOptions, PlanRequest, compare, get_preset, plan
from flashcp_planner.errors import InvalidRequest

HEURISTICS = [name for name, s in STRATEGIES.items() if not s.is_optimal]


def _request(seed: int, *, strategy: str = "flashcp", num_docs: int = 40, cp_size: int = 8) -> PlanRequest:
    rng = random.Random(seed)
    lengths = [rng.choice([rng.randint(1, 300), rng.randint(300, 9000)]) for _ in range(num_docs)]
    capacity = max(max(lengths), sum(lengths) * 3 // (2 * cp_size))  # whole_doc must fit too
    return PlanRequest(micro_batches=[lengths, lengths[: num_docs // 3]], cp_size=cp_size, strategy=strategy,
                       capacity=capacity)


@pytest.mark.parametrize("strategy", HEURISTICS)
@pytest.mark.parametrize("comm", [None, CommMode.ALL_GATHER, CommMode.EXACT_NEED])
def test_plan_round_trip_is_lossless(strategy: str, comm: CommMode | None) -> None:
    request = dataclasses.replace(_request(3, strategy=strategy), options=PlanOptions(comm=comm))
    for p in plan(request):
        wire = pb.Plan.FromString(codec.plan_to_pb(p).SerializeToString())
        assert codec.plan_from_pb(wire) == p
        assert codec.plan_pb_to_dict(wire) == p.to_dict()
        assert codec.plan_from_pb(wire).fingerprint() == p.fingerprint()


def test_plan_with_optimality_round_trips() -> None:
    p = plan(PlanRequest(micro_batches=[[100, 200, 3000, 50]], cp_size=2, strategy="optimum",
                         options=PlanOptions(time_limit_s=5, num_workers=1)))[0]
    assert p.optimality is not None
    wire = codec.plan_to_pb(p)
    assert codec.plan_from_pb(wire) == p
    assert codec.plan_pb_to_dict(wire) == p.to_dict()
    assert "solve_time_s" not in codec.plan_pb_to_dict(wire, include_timing=False)["optimality"]


def test_request_round_trip_preset_and_custom_cost_model() -> None:
    request = _request(5, strategy="zigzag")
    message = codec.request_to_pb(request, request_id="abc")
    assert message.WhichOneof("cost_model") == "cost_model_preset"
    assert message.request_id == "abc"
    assert codec.request_from_pb(pb.PlanRequest.FromString(message.SerializeToString())) == request

    custom = dataclasses.replace(get_preset("h100-llama8b"), name="mine", inter_node_gbps=12.5,
                                 attention_efficiency=((64, 0.05), (8192, 1.0)))
    request = dataclasses.replace(request, cost_model=custom, capacity=20000,
                                  options=PlanOptions(comm=CommMode.SHARDING_AWARE, allow_sub_group=False))
    message = codec.request_to_pb(request)
    assert message.WhichOneof("cost_model") == "cost_model_custom"
    assert codec.request_from_pb(message) == request


def test_partial_cost_model_takes_base_preset_values() -> None:
    message = pb.CostModel(base="h200-llama8b", inter_node_gbps=10.0)
    cm = codec.cost_model_from_pb(message)
    assert cm == dataclasses.replace(get_preset("h200-llama8b"), inter_node_gbps=10.0, name="h200-llama8b+custom")
    assert codec.cost_model_from_pb(codec.cost_model_to_pb(cm)) == cm


def test_unset_fields_take_core_defaults() -> None:
    message = pb.PlanRequest(micro_batches=[pb.MicroBatch(doc_lengths=[10, 20])], cp_size=2)
    assert codec.request_from_pb(message) == PlanRequest(micro_batches=[[10, 20]], cp_size=2)


@pytest.mark.parametrize(
    ("message", "field"),
    [
        (pb.PlanRequest(cp_size=2), "micro_batches"),
        (pb.PlanRequest(micro_batches=[pb.MicroBatch()], cp_size=2), "micro_batches[0]"),
        (pb.PlanRequest(micro_batches=[pb.MicroBatch(doc_lengths=[5, 0])], cp_size=2), "micro_batches[0][1]"),
        (pb.PlanRequest(micro_batches=[pb.MicroBatch(doc_lengths=[5])], cp_size=0), "cp_size"),
        (pb.PlanRequest(micro_batches=[pb.MicroBatch(doc_lengths=[5])], cp_size=2, strategy="nope"), "strategy"),
        (pb.PlanRequest(micro_batches=[pb.MicroBatch(doc_lengths=[5])], cp_size=2, cost_model_preset="x"),
         "cost_model"),
        (pb.PlanRequest(micro_batches=[pb.MicroBatch(doc_lengths=[5])], cp_size=2,
                        cost_model_custom=pb.CostModel(num_heads=32, num_kv_heads=5)), "cost_model.num_kv_heads"),
        (pb.PlanRequest(micro_batches=[pb.MicroBatch(doc_lengths=[5])], cp_size=2, capacity_slack=float("nan")),
         "capacity_slack"),
        (pb.PlanRequest(micro_batches=[pb.MicroBatch(doc_lengths=[5])], cp_size=2, capacity=-3), "capacity"),
        (pb.PlanRequest(micro_batches=[pb.MicroBatch(doc_lengths=[5])], cp_size=2,
                        options=pb.PlanOptions(time_limit_s=-1)), "options.time_limit_s"),
        (pb.PlanRequest(micro_batches=[pb.MicroBatch(doc_lengths=[5])], cp_size=2,
                        options=pb.PlanOptions(comm=42)), "options.comm"),
    ],
)
def test_bad_requests_name_the_field(message: pb.PlanRequest, field: str) -> None:
    with pytest.raises(InvalidRequest) as info:
        codec.request_from_pb(message)
    assert info.value.field == field


def test_unknown_plan_version_and_enum_are_rejected() -> None:
    message = codec.plan_to_pb(plan(PlanRequest(micro_batches=[[10, 20]], cp_size=2))[0])
    bad_version = pb.Plan()
    bad_version.CopyFrom(message)
    bad_version.version = 99
    with pytest.raises(InvalidRequest, match="version"):
        codec.plan_from_pb(bad_version)
    bad_kind = pb.Plan()
    bad_kind.CopyFrom(message)
    bad_kind.documents[0].sharding = 77
    with pytest.raises(InvalidRequest, match="sharding"):
        codec.plan_from_pb(bad_kind)
    tampered = pb.Plan()
    tampered.CopyFrom(message)
    tampered.ranks[0].segments[0].end += 1
    with pytest.raises(InvalidRequest):
        codec.plan_from_pb(tampered)


def test_comparisons_round_trip() -> None:
    request = PlanRequest(micro_batches=[[3000, 10, 20], [5]], cp_size=2, capacity=1600)
    rows = compare(request, HEURISTICS)
    assert any(c.plan is None for row in rows for c in row), "expected an infeasible baseline in this instance"
    message = pb.CompareResponse(comparisons=codec.comparisons_to_pb(rows))
    assert codec.comparisons_from_pb(pb.CompareResponse.FromString(message.SerializeToString()).comparisons) == rows
    compare_message = codec.compare_request_to_pb(request, HEURISTICS)
    assert codec.compare_request_from_pb(compare_message) == (dataclasses.replace(request, strategy="flashcp"),
                                                               tuple(HEURISTICS))
