"""node_dedup: its routes against a token-by-token brute force, its priced traffic against its routes,
the planner's choice of it, its plans on the wire."""

from __future__ import annotations

import dataclasses
import json
import random

import pytest

from flashcp_planner import CommMode, Infeasible, InvalidRequest, Plan, PlanOptions, PlanRequest, compare, plan
from flashcp_planner.cli import main
from flashcp_planner.comm import (
    _owners_of_rows,
    _Pieces,
    _split_rows,
    derive_transfers,
    node_dedup_traffic,
    node_kv_needs,
    node_routes,
    rank_kv_needs,
    traffic_of_columns,
    transfers_and_traffic,
)
from flashcp_planner.model import RankColumns
from flashcp_planner.presets import get_preset

BASE = get_preset("h100-llama8b")
STRATEGIES = ("flashcp", "per_doc", "zigzag", "contiguous", "whole_doc")


def _plan(lengths, n, gpn, strategy, comm=CommMode.NODE_DEDUP, **kwargs) -> Plan:
    cost_model = dataclasses.replace(BASE, gpus_per_node=gpn)
    return plan(PlanRequest(micro_batches=[lengths], cp_size=n, strategy=strategy, cost_model=cost_model,
                            options=PlanOptions(comm=comm), **kwargs))[0]


def _small_plans(count: int):
    rng = random.Random(13)
    for _ in range(count):
        n, gpn = rng.choice([2, 3, 4, 5, 6, 8]), rng.choice([1, 2, 3, 4])
        lengths = [rng.randint(1, 70) for _ in range(rng.randint(1, 6))]
        try:
            yield _plan(lengths, n, gpn, rng.choice(STRATEGIES), capacity_slack=rng.choice([0.0, 1.0])), gpn
        except Infeasible:
            continue


def _tokens(doc: int, start: int, end: int) -> set[tuple[int, int]]:
    return {(doc, i) for i in range(start, end)}


def test_routes_deliver_exactly_the_needs_crossing_each_node_once():
    checked = 0
    for p, gpn in _small_plans(150):
        n = p.cp_size
        segments = [rp.segments for rp in p.ranks]
        owned = [set().union(*(_tokens(*s) for s in segs)) for segs in segments]
        # Brute force: a rank reads keys [0, e) of every split document it holds a piece of, e the
        # end of its last piece; a node needs what its ranks read and none of them holds.
        pieces_of = {}
        for r, segs in enumerate(segments):
            for doc, start, _ in segs:
                pieces_of.setdefault(doc, set()).add((start, r))
        split = {doc for doc, pieces in pieces_of.items() if len(pieces) > 1}
        reads = [set().union(*(_tokens(doc, 0, end) for doc, _, end in segs if doc in split)) for segs in segments]
        nodes = range((n - 1) // gpn + 1)
        node_of = [r // gpn for r in range(n)]
        node_reads = [set().union(*(reads[r] for r in range(n) if node_of[r] == m)) for m in nodes]
        node_owned = [set().union(*(owned[r] for r in range(n) if node_of[r] == m)) for m in nodes]
        assert [dict(x) for x in rank_kv_needs(segments)] == [
            {doc: max(e for d, _, e in segs if d == doc) for doc, _, _ in segs if doc in split} for segs in segments]
        assert node_kv_needs(rank_kv_needs(segments), gpn) == [
            {doc: max(i for d, i in node_reads[m] if d == doc) + 1 for doc in {d for d, _ in node_reads[m]}}
            for m in nodes]

        routes = node_routes(segments, gpn)
        held = [set(x) for x in owned]
        crossed = {m: [] for m in nodes}
        for t in routes.inter:  # stage 1: from the owner, across nodes
            assert node_of[t.src] != node_of[t.dst]
            moved = _tokens(t.doc, t.start, t.end)
            assert moved <= owned[t.src]
            crossed[node_of[t.dst]] += sorted(moved)
            held[t.dst] |= moved
        for m in nodes:  # once per node, exactly what it lacks
            assert len(crossed[m]) == len(set(crossed[m]))
            assert set(crossed[m]) == node_reads[m] - node_owned[m]
        after_stage_1 = [set(x) for x in held]
        for t in routes.intra:  # stage 2: inside nodes, from what the sender holds after stage 1
            assert node_of[t.src] == node_of[t.dst] and t.src != t.dst
            moved = _tokens(t.doc, t.start, t.end)
            assert moved <= after_stage_1[t.src] and not moved & held[t.dst]
            held[t.dst] |= moved
        for r in range(n):
            assert reads[r] <= held[r]
            assert held[r] - owned[r] - reads[r] <= after_stage_1[r] - owned[r]  # surplus: its stripe only
        # Stripes: a node's crossing tokens spread over its ranks within one token.
        for m in nodes:
            stripe = [sum(t.num_tokens for t in routes.inter if t.dst == r) for r in range(n) if node_of[r] == m]
            assert max(stripe) - min(stripe) <= 1
        # Logical deliveries stay those of exact need.
        assert derive_transfers(segments, CommMode.NODE_DEDUP) == derive_transfers(segments, CommMode.EXACT_NEED)
        checked += 1
    assert checked > 100


def test_priced_traffic_equals_the_routes_stage_by_stage():
    kv = BASE.kv_bytes_per_token
    for p, gpn in _small_plans(120):
        n = p.cp_size
        segments = [rp.segments for rp in p.ranks]
        routes = node_routes(segments, gpn)
        recv = [[0, 0] for _ in range(n)]
        send = [[0, 0] for _ in range(n)]
        for stage, transfers in ((1, routes.inter), (0, routes.intra)):  # [intra, inter] = [stage 2, stage 1]
            for t in transfers:
                recv[t.dst][stage] += t.num_tokens
                send[t.src][stage] += t.num_tokens
        _, closed_recv, closed_send = transfers_and_traffic(segments, CommMode.NODE_DEDUP, gpn, list_transfers=False)
        assert (closed_recv, closed_send) == (recv, send)
        assert traffic_of_columns(RankColumns.of(segments), CommMode.NODE_DEDUP, gpn) == (recv, send)
        cm = dataclasses.replace(BASE, gpus_per_node=gpn)
        for r, rp in enumerate(p.ranks):
            assert rp.cost.recv_bytes == sum(recv[r]) * kv and rp.cost.send_bytes == sum(send[r]) * kv
            assert rp.cost.comm_ms == cm.link_ms(recv[r][0] * kv, recv[r][1] * kv) + cm.link_ms(
                send[r][0] * kv, send[r][1] * kv)


def test_inside_one_node_it_moves_what_exact_need_moves():
    for p, _ in _small_plans(40):
        segments = [rp.segments for rp in p.ranks]
        gpn = p.cp_size  # every rank on one node
        assert node_routes(segments, gpn).inter == ()
        assert transfers_and_traffic(segments, CommMode.NODE_DEDUP, gpn)[1:] == \
            transfers_and_traffic(segments, CommMode.EXACT_NEED, gpn)[1:]


def test_a_layout_without_cross_node_reads_crosses_nothing():
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).parents[1] / "client"))
    import hand_plans

    request = PlanRequest(micro_batches=[[4000, 3000, 50, 6000]], cp_size=4, capacity_slack=1.0,
                          cost_model=dataclasses.replace(BASE, gpus_per_node=2))
    p = hand_plans.node_local_plan(request.contexts()[0], CommMode.NODE_DEDUP)
    segments = [rp.segments for rp in p.ranks]
    routes = node_routes(segments, 2)
    assert routes.inter == () and routes.intra  # keys move, inside nodes only
    assert all(t.src // 2 == t.dst // 2 for t in derive_transfers(segments, CommMode.NODE_DEDUP))


def test_dedup_cuts_inter_node_bytes_of_a_node_spanning_document():
    # One document per-doc over 16 ranks, 8 per node: under exact need every rank of a node fetches
    # the other node's keys it reads; under node_dedup each such key crosses once per node.
    exact = _plan([64000], 16, 8, "per_doc", comm=CommMode.EXACT_NEED)
    dedup = _plan([64000], 16, 8, "per_doc")
    segments = [rp.segments for rp in dedup.ranks]
    _, exact_recv, _ = transfers_and_traffic(segments, CommMode.EXACT_NEED, 8)
    _, dedup_recv, _ = transfers_and_traffic(segments, CommMode.NODE_DEDUP, 8)
    inter_exact = sum(r[1] for r in exact_recv)
    inter_dedup = sum(r[1] for r in dedup_recv)
    assert inter_dedup < inter_exact / 3  # readers per node share one copy
    # 32 chunks of 2000; node 0 holds chunks 0-7 and 24-31 and reads them all: it lacks 8-23. Node 1
    # holds 8-23 and reads up to chunk 23: it lacks 0-7.
    assert inter_dedup == (16 + 8) * 2000
    assert dedup.makespan_ms < exact.makespan_ms


def test_the_planner_takes_node_dedup_when_it_wins_and_never_loses():
    rng = random.Random(3)
    chose = 0
    for _ in range(6):
        lengths = [rng.randint(20000, 90000)] + [rng.randint(200, 6000) for _ in range(30)]
        cost_model = dataclasses.replace(BASE, gpus_per_node=4)
        request = PlanRequest(micro_batches=[lengths], cp_size=16, cost_model=cost_model)
        (auto,) = plan(request)
        forced = {comm: plan(dataclasses.replace(request, options=PlanOptions(comm=comm)))[0]
                  for comm in (CommMode.EXACT_NEED, CommMode.NODE_DEDUP)}
        assert auto.comm in (CommMode.EXACT_NEED, CommMode.NODE_DEDUP)
        assert auto.makespan_ms <= forced[CommMode.EXACT_NEED].makespan_ms
        assert (auto.comm is CommMode.NODE_DEDUP) == (auto.gpus_per_node == 4)
        chose += auto.comm is CommMode.NODE_DEDUP
    assert chose  # these node-spanning batches gain from it
    # Inside one node there is nothing to choose; baselines keep their default.
    (single,) = plan(PlanRequest(micro_batches=[[30000, 500]], cp_size=8))
    assert single.comm is CommMode.EXACT_NEED
    (baseline,) = plan(PlanRequest(micro_batches=[[30000, 500]], cp_size=16, strategy="per_doc"))
    assert baseline.comm is CommMode.ALL_GATHER


def test_compare_rescores_baselines_under_node_dedup():
    request = PlanRequest(micro_batches=[[50000, 3000, 700, 20000]], cp_size=16,
                          cost_model=dataclasses.replace(BASE, gpus_per_node=4))
    exact = compare(dataclasses.replace(request, options=PlanOptions(comm=CommMode.EXACT_NEED)), ["per_doc", "zigzag"])
    dedup = compare(dataclasses.replace(request, options=PlanOptions(comm=CommMode.NODE_DEDUP)), ["per_doc", "zigzag"])
    for a, b in zip(exact[0], dedup[0], strict=True):
        assert b.plan.comm is CommMode.NODE_DEDUP
        assert [rp.segments for rp in a.plan.ranks] == [rp.segments for rp in b.plan.ranks]  # same placement
        assert b.plan.makespan_ms < a.plan.makespan_ms


def test_json_round_trip_and_validation():
    p = _plan([9000, 4000, 300], 4, 2, "per_doc")
    data = p.to_dict()
    assert data["comm"] == "node_dedup" and data["gpus_per_node"] == 2
    again = Plan.from_dict(json.loads(json.dumps(data)))
    assert again == p and again.gpus_per_node == 2
    assert "gpus_per_node" not in _plan([9000, 4000, 300], 4, 2, "per_doc", comm=CommMode.EXACT_NEED).to_dict()
    with pytest.raises(InvalidRequest, match="gpus_per_node"):
        Plan.from_dict({k: v for k, v in data.items() if k != "gpus_per_node"})
    with pytest.raises(InvalidRequest, match="gpus_per_node"):
        Plan.from_dict({**data, "gpus_per_node": 0})


def test_cli_accepts_the_mode(capsys: pytest.CaptureFixture[str], tmp_path):
    lengths = tmp_path / "lengths.json"
    lengths.write_text(json.dumps([[40000, 3000, 500, 9000]]))
    assert main(["plan", "--lengths", str(lengths), "--cp", "16", "--comm", "node_dedup", "--format", "json"]) == 0
    (p,) = json.loads(capsys.readouterr().out)["plans"]
    assert p["comm"] == "node_dedup" and p["gpus_per_node"] == BASE.gpus_per_node


def test_optimum_under_node_dedup_is_scored_exactly_and_claims_no_proof():
    pytest.importorskip("ortools")
    lengths = [6000, 3000, 1200, 800, 90]
    p = plan(PlanRequest(
        micro_batches=[lengths], cp_size=4, strategy="optimum",
        cost_model=dataclasses.replace(BASE, gpus_per_node=2),
        options=PlanOptions(comm=CommMode.NODE_DEDUP, time_limit_s=2.0, num_workers=1)))[0]
    assert p.comm is CommMode.NODE_DEDUP and p.optimality.status == "feasible"
    assert p.optimality.objective_ms == p.makespan_ms
    assert p.optimality.bound_ms <= p.makespan_ms


def test_array_passes_equal_the_piece_by_piece_sums():
    rng = random.Random(5)
    checked = 0
    for _ in range(60):
        n, gpn = rng.choice([8, 12, 16, 32, 64]), rng.choice([1, 2, 3, 4, 8])
        lengths = [rng.randint(1, rng.choice([50, 3000, 60000])) for _ in range(rng.randint(1, 40))]
        try:
            p = _plan(lengths, n, gpn, rng.choice(["per_doc", "zigzag", "flashcp"]),
                      capacity_slack=rng.choice([0.0, 0.3]))
        except Infeasible:
            continue
        segments = [rp.segments for rp in p.ranks]
        columns = RankColumns.of(segments)
        split_rows = _split_rows(columns)
        if split_rows is None:
            continue
        arrays = _Pieces.of(columns, *split_rows, gpn).node_dedup_traffic(n, gpn)
        assert arrays == node_dedup_traffic(_owners_of_rows(columns, *split_rows), n, gpn)
        checked += 1
    assert checked > 30
    # And against the routes themselves, on a layout past the array-pass threshold.
    p = _plan([5000, 3000, 7000], 64, 8, "per_doc")
    segments = [rp.segments for rp in p.ranks]
    assert sum(map(len, segments)) > 256
    routes = node_routes(segments, 8)
    recv = [[0, 0] for _ in range(64)]
    for stage, transfers in ((1, routes.inter), (0, routes.intra)):
        for t in transfers:
            recv[t.dst][stage] += t.num_tokens
    assert traffic_of_columns(RankColumns.of(segments), CommMode.NODE_DEDUP, 8)[0] == recv


def test_the_search_proxy_charges_node_routing_for_inter_node_bytes():
    from flashcp_planner.cost import node_dedup_proxy

    cost_model = dataclasses.replace(BASE, gpus_per_node=8, inter_node_gbps=45.0, intra_node_gbps=300.0)
    proxy = node_dedup_proxy(cost_model)
    assert proxy.inter_node_gbps == pytest.approx(1 / (1 / (8 * 45) + 7 / (8 * 300)))  # 175.6 GB/s
    assert dataclasses.replace(proxy, inter_node_gbps=45.0) == cost_model


def test_makespan_in_array_passes_is_the_same_float():
    from flashcp_planner.cost import attention_sums, makespan_of_sums, rank_costs_of_sums

    for p, gpn in _small_plans(60):
        segments = [rp.segments for rp in p.ranks]
        cost_model = dataclasses.replace(BASE, gpus_per_node=gpn, overlap_fraction=0.5)
        sums = attention_sums(segments, cost_model)
        for comm in (CommMode.EXACT_NEED, CommMode.NODE_DEDUP):
            _, recv, send = transfers_and_traffic(segments, comm, gpn, list_transfers=False)
            costs = rank_costs_of_sums(sums, recv, send, cost_model)
            assert makespan_of_sums(sums, recv, send, cost_model) == max(c.total_ms for c in costs)
