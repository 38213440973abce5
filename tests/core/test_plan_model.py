"""Plan JSON round trip and rejection of corrupt plans."""

from __future__ import annotations

import copy
import json

import pytest

from flashcp_planner import InvalidRequest, Plan, PlanOptions, PlanRequest, kv_transfers, plan
from flashcp_planner.model import PLAN_FORMAT_VERSION


@pytest.fixture(scope="module")
def plans():
    lengths = [12000, 300, 4096, 77, 9000, 1500, 64, 20000]
    out = []
    for strategy in ("flashcp", "per_doc", "zigzag", "whole_doc", "contiguous"):
        out.extend(plan(PlanRequest(micro_batches=[lengths], cp_size=4, strategy=strategy, capacity_slack=1.0)))
    out.extend(plan(PlanRequest(micro_batches=[[900, 400, 60]], cp_size=2, strategy="optimum",
                                options=PlanOptions(time_limit_s=5, num_workers=1))))
    return out


def test_round_trip_is_identical(plans):
    for p in plans:
        again = Plan.from_dict(json.loads(p.to_json()))
        assert again == p
        assert again.to_json() == p.to_json()
        assert again.fingerprint() == p.fingerprint()


def test_fingerprint_ignores_solver_time_only(plans):
    p = plans[-1]
    assert p.optimality is not None
    data = p.to_dict()
    data["optimality"]["solve_time_s"] += 1.0
    assert Plan.from_dict(data).fingerprint() == p.fingerprint()
    data["makespan_ms"] += 1.0
    assert Plan.from_dict(data).fingerprint() != p.fingerprint()


def _corrupt(p, mutate):
    data = copy.deepcopy(p.to_dict())
    mutate(data)
    with pytest.raises(InvalidRequest) as info:
        Plan.from_dict(data)
    return info.value


def test_corrupt_plans_are_rejected(plans):
    p = plans[0]

    def overlap(d):
        seg = d["ranks"][0]["segments"][0]
        d["ranks"][1]["segments"].insert(0, [seg[0], seg[1], seg[2]])
        d["ranks"][1]["tokens"] += seg[2] - seg[1]

    def gap(d):
        for r in d["ranks"]:
            if r["segments"] and r["segments"][-1][2] - r["segments"][-1][1] > 1:
                r["segments"][-1][2] -= 1
                r["tokens"] -= 1
                return

    def version(d):
        d["version"] = PLAN_FORMAT_VERSION + 1

    def missing(d):
        del d["ranks"]

    def bad_type(d):
        d["ranks"][0]["segments"][0] = "oops"

    def wrong_owner(d):
        d["documents"][0]["ranks"] = [d["documents"][0]["ranks"][0] + 1 % 4]

    def over_capacity(d):
        d["capacity"] = 1

    assert "covered" in str(_corrupt(p, overlap))
    assert "covered" in str(_corrupt(p, gap))
    assert _corrupt(p, version).field == "version"
    assert _corrupt(p, missing).field == "plan.ranks"
    assert _corrupt(p, bad_type).field == "plan"
    assert _corrupt(p, wrong_owner).field.startswith("plan.documents")
    assert "capacity" in str(_corrupt(p, over_capacity))


def test_tampered_transfers_are_rejected(plans):
    p = next(x for x in plans if kv_transfers(x))
    data = p.to_dict()
    data["transfers"] = data["transfers"][1:]
    with pytest.raises(InvalidRequest) as info:
        Plan.from_dict(data)
    assert info.value.field == "plan.transfers"


def test_bulk_records_keep_their_record_interface():
    import pickle

    from flashcp_planner.model import DocSharding, KVTransfer, Segment, ShardingKind

    seg = Segment(doc=3, start=5, end=9)
    assert (seg.doc, seg.start, seg.end, seg.num_tokens, seg.pairs, seg.as_list()) == (3, 5, 9, 4, 30, [3, 5, 9])
    assert seg._replace(end=7) == Segment(doc=3, start=5, end=7)
    assert Segment._fields == ("doc", "start", "end")
    transfer = KVTransfer(src=0, dst=1, doc=3, start=0, end=5)
    assert transfer._replace(src=1, dst=0) == KVTransfer(src=1, dst=0, doc=3, start=0, end=5)
    assert transfer.num_tokens == 5
    sharding = DocSharding(doc=3, kind=ShardingKind.WHOLE, ranks=(2,))
    for record in (seg, transfer, sharding):
        assert pickle.loads(pickle.dumps(record)) == record
        assert hash(copy.copy(record)) == hash(record)
        with pytest.raises(AttributeError):
            record.doc = 0


def test_compact_plan_records_behave_like_the_tuples_they_replace():
    import pickle

    from flashcp_planner.model import DocSharding, Segment, Segments, ShardingKind, Shardings

    records = (Segment(3, 0, 10), Segment(5, 4, 9), Segment(7, 0, 2))
    segments = Segments.of(records)
    assert segments == records and list(segments) == list(records) and len(segments) == 3
    assert segments[1] == Segment(5, 4, 9) and segments[-1] == records[-1] and segments[1:] == records[1:]
    assert hash(segments) == hash(records) and segments.num_tokens == 17
    assert pickle.loads(pickle.dumps(segments)) == segments and Segments.of([]) == ()
    assert segments != records[:2] and segments != Segments.of(records[:2])
    with pytest.raises(ValueError, match="columns"):
        Segments((1, 2), (0,), (5, 6))

    split = DocSharding(1, ShardingKind.PER_DOC, (0, 1))
    shardings = Shardings([2, -1, 0], {1: split})
    expected = (DocSharding(0, ShardingKind.WHOLE, (2,)), split, DocSharding(2, ShardingKind.WHOLE, (0,)))
    assert shardings == expected and tuple(shardings) == expected and shardings[-1] == expected[-1]
    assert shardings[:2] == expected[:2] and hash(shardings) == hash(expected) and len(shardings) == 3
    assert pickle.loads(pickle.dumps(shardings)) == shardings
    with pytest.raises(ValueError, match="whole rank or a split record"):
        Shardings([2, -1, 0], {})


def test_heuristic_plans_use_the_compact_records_and_round_trip(plans):
    from flashcp_planner.model import Segments, Shardings

    p = next(x for x in plans if x.strategy == "flashcp")
    assert isinstance(p.documents, Shardings) and all(isinstance(rp.segments, Segments) for rp in p.ranks)
    again = Plan.from_dict(json.loads(p.to_json()))
    assert again == p and again.fingerprint() == p.fingerprint()
