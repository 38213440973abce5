"""Closed forms of traffic and cost equal the explicit sums they replace (transfer lists, piece-by-piece shares)."""

from __future__ import annotations

import dataclasses
import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from flashcp_planner import PlanOptions, PlanRequest, plan
from flashcp_planner.comm import node_routes, transfers_and_traffic
from flashcp_planner.cost import rank_costs, rank_costs_of_traffic
from flashcp_planner.layout import head_tail_segments
from flashcp_planner.model import CommMode
from flashcp_planner.presets import PRESETS, get_preset
from flashcp_planner.strategies.shares import head_tail_shares, pieces_shares


@pytest.mark.parametrize("comm", list(CommMode))
def test_closed_form_traffic_equals_summing_the_transfers(comm):
    rng = random.Random(7)
    for _ in range(12):
        lengths = [rng.randint(1, 30000) for _ in range(rng.randint(1, 14))]
        cp_size, gpn = rng.choice([2, 3, 4, 6, 8]), rng.choice([1, 2, 3, 4, 8])
        cost_model = dataclasses.replace(get_preset("h100-llama8b"), gpus_per_node=gpn)
        for strategy in ("flashcp", "per_doc", "zigzag", "whole_doc"):
            request = PlanRequest(micro_batches=[lengths], cp_size=cp_size, strategy=strategy,
                                  cost_model=cost_model, capacity=sum(lengths), options=PlanOptions(comm=comm))
            (p,) = plan(request)
            segments = [rp.segments for rp in p.ranks]
            transfers, recv, send = transfers_and_traffic(segments, comm, gpn)
            if comm is CommMode.NODE_DEDUP:  # priced by its routes, both stages
                transfers = node_routes(segments, gpn).inter + node_routes(segments, gpn).intra
            from_transfers = rank_costs(segments, transfers, cost_model)
            assert rank_costs_of_traffic(segments, recv, send, cost_model) == from_transfers
            assert tuple(rp.cost for rp in p.ranks) == from_transfers


@settings(max_examples=150, deadline=None)
@given(doc=st.integers(0, 10**4), length=st.one_of(st.integers(1, 300), st.integers(1, 10**7)),
       k=st.integers(1, 80), first_rank=st.integers(0, 200), gpn=st.sampled_from([1, 2, 3, 4, 8, 16]),
       comm=st.sampled_from([m for m in CommMode if m is not CommMode.NODE_DEDUP]))  # (searched as exact_need)
def test_closed_form_head_tail_shares_equal_the_piece_by_piece_shares(doc, length, k, first_rank, gpn, comm):
    cost_model = dataclasses.replace(get_preset("h100-llama8b"), gpus_per_node=gpn)
    pieces = head_tail_segments(doc, length, range(first_rank, first_rank + k))
    expected = pieces_shares(pieces, cost_model, comm)
    got = head_tail_shares(doc, length, first_rank, k, cost_model, comm)
    assert got == expected
    assert [type(x) for share in got for x in share] == [type(x) for share in expected for x in share]


@settings(max_examples=60, deadline=None)
@given(bounds=st.lists(st.tuples(st.integers(0, 10**7), st.integers(1, 10**6)), min_size=1, max_size=40),
       preset=st.sampled_from(sorted(PRESETS)))
def test_bulk_attention_equals_segment_by_segment(bounds, preset):
    segments = [(start, start + size) for start, size in bounds]
    cost_model = dataclasses.replace(get_preset(preset))  # a fresh memo: attention_ms recomputes
    assert cost_model.attention_ms_of(segments) == [cost_model.attention_ms(s, e) for s, e in segments]
