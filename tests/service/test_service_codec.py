"""flashcp.codec: lossless plan encoding and request decoding that validates like the core."""

from __future__ import annotations

import dataclasses
import random

import pytest

from flashcp import codec
from flashcp.v1 import planner_pb2 as pb
from flashcp_planner import STRATEGIES, CommMode, PlanOptions, PlanRequest, compare, get_preset, plan
from flashcp_planner.errors import InvalidRequest
from flashcp_planner.model import DocSharding, KVTransfer, Segment

HEURISTICS = [name for name, s in STRATEGIES.items() if not s.is_optimal]


def _request(seed: int, *, strategy: str = "flashcp", num_docs: int = 40, cp_size: int = 8) -> PlanRequest:
    rng = random.Random(seed)
    lengths = [rng.choice([rng.randint(1, 300), rng.randint(300, 9000)]) for _ in range(num_docs)]
    capacity = max(max(lengths), sum(lengths) * 3 // (2 * cp_size))  # whole_doc must fit too
    return PlanRequest(micro_batches=[lengths, lengths[: num_docs // 3]], cp_size=cp_size, strategy=strategy,
                       capacity=capacity)


@pytest.mark.parametrize("strategy", HEURISTICS)
@pytest.mark.parametrize("comm", [None, CommMode.ALL_GATHER, CommMode.EXACT_NEED, CommMode.NODE_DEDUP])
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
    bad_kind.documents.shardings[0] = 77
    with pytest.raises(InvalidRequest, match="sharding"):
        codec.plan_from_pb(bad_kind)
    tampered = pb.Plan()
    tampered.CopyFrom(message)
    tampered.ranks[0].segments[2] += 1  # the first segment's end
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


# ---------------------------------------------------------------- packed plan encoding


def _large_plans() -> list:
    rng = random.Random(11)
    # A private copy of the preset: planning fills the cost model's memo of document costs, and the shared
    # preset travels (pickled, memo included) to the search processes of later tests.
    cost_model = dataclasses.replace(get_preset("h100-llama8b"))
    per_doc = PlanRequest(micro_batches=[[rng.randint(64, 4000) for _ in range(256)]], cp_size=16,
                          strategy="per_doc", cost_model=cost_model, options=PlanOptions(comm=CommMode.EXACT_NEED))
    wide = PlanRequest(micro_batches=[[rng.randint(1, 30000) for _ in range(16384)]], cp_size=8,
                       cost_model=cost_model)
    return [plan(per_doc)[0], plan(wide)[0]]


def _flat(records) -> list[int]:
    return [x for record in records for x in record]


@pytest.fixture(scope="module")
def large_plans() -> list:
    return _large_plans()


def test_large_plans_round_trip_through_packed_fields(large_plans) -> None:
    from flashcp_planner import kv_transfers

    transfers_heavy, segment_heavy = large_plans
    assert len(kv_transfers(transfers_heavy)) > 50_000
    assert sum(len(rp.segments) for rp in segment_heavy.ranks) >= 16384
    for p in large_plans:
        message = codec.plan_to_pb(p)
        # The documented layout: flat triples, parallel sharding columns, flat quintuples.
        for rank_pb, rp in zip(message.ranks, p.ranks, strict=True):
            assert list(rank_pb.segments) == _flat(rp.segments)
        assert list(message.documents.docs) == [d.doc for d in p.documents]
        assert list(message.documents.rank_counts) == [len(d.ranks) for d in p.documents]
        assert list(message.documents.ranks) == _flat(d.ranks for d in p.documents)
        assert list(message.transfers) == _flat(kv_transfers(p))
        assert not message.transfers_omitted
        wire = pb.Plan.FromString(message.SerializeToString())
        decoded = codec.plan_from_pb(wire)
        assert decoded == p
        assert decoded.transfers == (kv_transfers(p) or None)
        assert all(type(s) is Segment for rp in decoded.ranks for s in rp.segments)
        assert all(type(d) is DocSharding and type(d.ranks) is tuple for d in decoded.documents)
        assert all(type(t) is KVTransfer for t in decoded.transfers or ())
        assert decoded.fingerprint() == p.fingerprint()
        assert codec.plan_pb_to_dict(wire) == p.to_dict()


def test_packed_encoding_is_smaller_than_a_message_per_record(large_plans) -> None:
    p = large_plans[0]
    records = sum(len(rp.segments) for rp in p.ranks) * 3 + len(p.documents) * 4 + len(p.transfers or ()) * 5
    # Packed varints: 1-3 bytes per value, no per-record tag or length prefix.
    assert len(codec.plan_to_pb(p).SerializeToString()) < 3 * records


@pytest.mark.parametrize("comm", [CommMode.ALL_GATHER, CommMode.SHARDING_AWARE, CommMode.EXACT_NEED])
def test_omitted_transfers_decode_as_unlisted(comm: CommMode) -> None:
    from flashcp_planner import kv_transfers

    request = dataclasses.replace(_request(7, strategy="per_doc"), options=PlanOptions(comm=comm))
    for p in plan(request):
        message = pb.Plan.FromString(codec.plan_to_pb(p, list_transfers=False).SerializeToString())
        assert message.transfers_omitted and len(message.transfers) == 0
        decoded = codec.plan_from_pb(message)
        assert decoded.transfers is None
        assert decoded == p
        assert kv_transfers(decoded) == kv_transfers(p)  # derived on the receiving side
        expected = p.to_dict()
        del expected["transfers"]
        assert codec.plan_pb_to_dict(message) == expected
        if comm is not CommMode.ALL_GATHER:
            assert len(codec.plan_to_pb(p).transfers) == 5 * len(kv_transfers(p)) > 0


def test_request_carries_omit_transfers() -> None:
    request = _request(5)
    assert not codec.request_to_pb(request).omit_transfers
    message = pb.PlanRequest.FromString(codec.request_to_pb(request, omit_transfers=True).SerializeToString())
    assert message.omit_transfers
    assert codec.request_from_pb(message) == request
    assert codec.compare_request_to_pb(request, HEURISTICS, omit_transfers=True).omit_transfers


def _tamper(message: pb.Plan, edit) -> pb.Plan:
    copy = pb.Plan()
    copy.CopyFrom(message)
    edit(copy)
    return copy


@pytest.mark.parametrize(
    ("edit", "field"),
    [
        (lambda m: m.ranks[1].segments.append(4), "plan.ranks[1].segments"),
        (lambda m: m.transfers.extend([0, 1, 2]), "plan.transfers"),
        (lambda m: m.documents.docs.append(9), "plan.documents"),
        (lambda m: m.documents.ranks.append(0), "plan.documents.ranks"),
        (lambda m: m.documents.rank_counts.__setitem__(0, -1), "plan.documents.rank_counts"),
        (lambda m: m.documents.shardings.__setitem__(0, 77), "plan.documents"),
    ],
)
def test_malformed_packed_fields_name_the_field(edit, field: str) -> None:
    request = dataclasses.replace(_request(7, strategy="per_doc"), options=PlanOptions(comm=CommMode.EXACT_NEED))
    message = _tamper(codec.plan_to_pb(plan(request)[0]), edit)
    for decode in (lambda m: codec.plan_from_pb(m, validate=False), codec.plan_pb_to_dict):
        with pytest.raises(InvalidRequest) as info:
            decode(message)
        assert info.value.field == field
