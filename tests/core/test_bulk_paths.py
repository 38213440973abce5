"""The array paths of layout and evaluation equal the piece-by-piece ones they stand in for, exactly."""

from __future__ import annotations

import dataclasses
import pickle
import random

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from flashcp_planner import comm as comm_module
from flashcp_planner import layout as layout_module
from flashcp_planner import plan
from flashcp_planner.comm import (
    derive_transfers,
    kv_transfer_rows,
    kv_transfers,
    traffic_of_columns,
    transfer_rows,
    transfers_and_traffic,
)
from flashcp_planner.cost import _pairs_and_tokens, lower_bound_ms, rank_costs_of_columns, rank_costs_of_traffic
from flashcp_planner.layout import build_plan, head_tail_columns, head_tail_segments, placements_layout, sharding_of
from flashcp_planner.model import CommMode, DocSharding, RankColumns, Segment, Segments, ShardingKind, Shardings
from flashcp_planner.presets import PRESETS, get_preset
from flashcp_planner.request import PlanContext, PlanOptions, PlanRequest


def test_segments_over_arrays_behave_like_the_tuple_columns():
    records = (Segment(3, 0, 10), Segment(5, 4, 9), Segment(7, 0, 2))
    columns = [np.array(column, dtype=np.int64) for column in zip(*records, strict=True)]
    lazy, eager = Segments.of_arrays(*columns), Segments.of(records)
    assert len(lazy) == 3 and hash(lazy) == hash(eager) and lazy == eager == records
    assert lazy[1] == records[1] and lazy[1:] == records[1:] and list(lazy) == list(records)
    assert lazy.docs == (3, 5, 7) and type(lazy.docs[0]) is int and lazy.num_tokens == 17
    assert pickle.loads(pickle.dumps(lazy)) == eager and repr(lazy) == repr(eager)
    assert all(np.array_equal(a, b) for a, b in zip(eager.arrays(), columns, strict=True))
    flat = [3, 0, 10, 5, 4, 9, 7, 0, 2]
    assert Segments.of_arrays(*columns).flat() == Segments.of(records).flat() == flat
    assert all(type(x) is int for x in Segments.of_arrays(*columns).flat())
    assert Segments.of_arrays(*(c[:0] for c in columns)).flat() == Segments().flat() == []
    with pytest.raises(ValueError, match="columns"):
        Segments.of_arrays(columns[0], columns[1][:2], columns[2])


@given(whole_rank=st.lists(st.integers(-3, 3), max_size=8), split=st.sets(st.integers(-2, 9), max_size=5))
def test_shardings_check_equals_the_per_document_rule(whole_rank, split):
    records = {doc: DocSharding(doc, ShardingKind.PER_DOC, (0, 1)) for doc in split}
    consistent = not any((rank < 0) != (doc in records) for doc, rank in enumerate(whole_rank))
    if consistent:
        Shardings(whole_rank, records)
    else:
        with pytest.raises(ValueError, match="whole rank or a split record"):
            Shardings(whole_rank, records)


def test_whole_attention_table_equals_the_scalar_formula():
    cost_model = dataclasses.replace(get_preset("h100-llama8b"))  # a fresh memo
    rng = random.Random(3)
    for top in (5, 300, 70_000, 2_000_000):  # grows the table; the last goes past its largest size
        ends = [rng.randint(0, top) for _ in range(500)]
        expected = [cost_model.attention_ms(0, end) for end in ends]
        assert cost_model.whole_attention_array(np.array(ends, dtype=np.int64)).tolist() == expected
        assert cost_model.whole_attention_ms(ends) == expected
        assert cost_model.whole_attention_ms(ends * 3)[:len(ends)] == expected  # the bulk path
    assert cost_model.whole_attention_array(np.empty(0, dtype=np.int64)).shape == (0,)


@settings(max_examples=200, deadline=None)
@given(docs=st.lists(st.tuples(st.integers(0, 10**4), st.one_of(st.integers(1, 300), st.integers(1, 10**6)),
                               st.integers(2, 80), st.integers(0, 100)), max_size=6),
       n=st.sampled_from([2, 8, 64, 80]))
def test_head_tail_columns_and_records_equal_the_piece_by_piece_split(docs, n):
    docs = sorted({doc: (doc, length, k, first) for doc, length, k, first in docs}.values())
    expected = []
    for doc, length, k, first in docs:
        pieces = head_tail_segments(doc, length, range(first, first + k))
        expected += [(rank, *segment) for rank, segment in pieces]
        kind = ShardingKind.PER_DOC if k == n else ShardingKind.SUB_GROUP
        assert layout_module._head_tail_record(n, doc, first, k, length) == sharding_of(
            doc, range(first, first + k), pieces, kind)
    arrays = [np.array(column, dtype=np.int64) for column in zip(*docs, strict=True)] or [np.empty(0, np.int64)] * 4
    got = head_tail_columns(arrays[0], arrays[1], arrays[3], arrays[2])
    assert list(zip(*(column.tolist() for column in got), strict=True)) == expected


def _random_layout(rng: random.Random, n: int) -> list[Segments]:
    """Random documents cut at random points, pieces on random ranks (runs of contiguous pieces included)."""
    held: list[list[tuple[int, int, int]]] = [[] for _ in range(n)]
    for doc in range(rng.randint(1, 40)):
        length = rng.choice([1, 3, rng.randint(1, 5000)])
        cuts = sorted({0, length, *(rng.randint(1, length) for _ in range(rng.choice([0, 0, 1, 3, 12])))})
        owners = [rng.randrange(n)] * 3 + [rng.randrange(n) for _ in range(3)]
        for start, end in zip(cuts, cuts[1:], strict=False):
            held[rng.choice(owners)].append((doc, start, end))
    return [Segments.of(sorted(rows)) for rows in held]


@pytest.mark.parametrize("few_pieces", [0, 10**9])
def test_columns_evaluation_equals_the_segment_by_segment_reference(monkeypatch, few_pieces):
    monkeypatch.setattr(comm_module, "_FEW_PIECES", few_pieces)
    rng = random.Random(11)
    for trial in range(120):
        n = rng.choice([1, 2, 3, 8, 16])
        cost_model = dataclasses.replace(PRESETS[sorted(PRESETS)[trial % len(PRESETS)]],
                                         gpus_per_node=rng.choice([1, 2, 4, 8]), overlap_fraction=rng.random())
        rank_segments = _random_layout(rng, n)
        columns = RankColumns.of(rank_segments)
        assert columns.segments() == tuple(rank_segments) and columns.tokens() == [s.num_tokens for s in rank_segments]
        for comm in CommMode:
            _, recv, send = transfers_and_traffic(rank_segments, comm, cost_model.gpus_per_node, list_transfers=False)
            assert traffic_of_columns(columns, comm, cost_model.gpus_per_node) == (recv, send)
            expected = rank_costs_of_traffic(rank_segments, recv, send, cost_model)
            got = rank_costs_of_columns(columns, recv, send, cost_model)
            assert got == expected
            assert [type(v) for c in got for v in dataclasses.astuple(c)] == [
                type(v) for c in expected for v in dataclasses.astuple(c)]


def test_transfer_rows_equal_the_listed_transfers():
    rng = random.Random(13)
    for _ in range(150):
        rank_segments = _random_layout(rng, rng.choice([1, 2, 3, 8, 16]))
        columns = RankColumns.of(rank_segments)
        for comm in (CommMode.EXACT_NEED, CommMode.SHARDING_AWARE):
            rows = transfer_rows(columns, comm)
            assert rows.dtype == np.int64 and rows.shape[1:] == (5,)
            assert rows.tolist() == [list(t) for t in derive_transfers(rank_segments, comm)]


@pytest.mark.parametrize("strategy", ["flashcp", "per_doc", "zigzag", "whole_doc"])
def test_kv_transfer_rows_equal_kv_transfers(strategy):
    rng = random.Random(17)
    for n in (1, 4, 16):
        lengths = [rng.choice([1, 7, rng.randint(1, 3000), rng.randint(1, 60_000)]) for _ in range(rng.randint(1, 40))]
        for comm in CommMode:
            p = plan(PlanRequest(micro_batches=[lengths], cp_size=n, strategy=strategy, capacity=sum(lengths),
                                 options=PlanOptions(comm=comm)))[0]
            expected = [list(t) for t in kv_transfers(dataclasses.replace(p))]
            assert kv_transfer_rows(p).tolist() == expected and kv_transfer_rows(p).shape == (len(expected), 5)
            listed = dataclasses.replace(p, transfers=None if comm is CommMode.ALL_GATHER else kv_transfers(p))
            assert kv_transfer_rows(listed).tolist() == expected


@pytest.mark.parametrize("few_chunks", [0, 10**9])
def test_layout_from_lists_equals_layout_from_arrays(monkeypatch, few_chunks):
    monkeypatch.setattr(layout_module, "_FEW_CHUNKS", few_chunks)  # head-tail pieces cut in arrays, or not
    rng = random.Random(5)
    cost_model = get_preset("h100-llama8b")
    for _ in range(60):
        n = rng.choice([1, 2, 4, 8, 16])
        lengths = tuple(rng.choice([1, 2, rng.randint(1, 40), rng.randint(1, 9000)]) for _ in range(rng.randint(1, 30)))
        ctx = PlanContext(doc_lengths=lengths, cp_size=n, capacity=sum(lengths), cost_model=cost_model,
                          options=PlanOptions())
        placement, fills = [], {}
        for doc, length in enumerate(lengths):
            k = rng.choice([1, 1, 0, *(size for size in (2, 4, n) if 1 < size <= n)])
            placement.append((rng.randrange(0, n - k + 1) if k else 0, k))
            if k == 0:  # cut into pieces on random ranks, listed in any order
                cuts = sorted({0, length, *(rng.randint(1, length) for _ in range(2))})
                fills[doc] = [(rng.randrange(n), Segment(doc, a, b)) for a, b in zip(cuts, cuts[1:], strict=False)]
                rng.shuffle(fills[doc])
        from_lists = layout_module._layout_of_lists(ctx, placement, fills)
        from_arrays = layout_module._layout_of_arrays(ctx, placement, fills)
        assert from_lists.rank_segments == from_arrays.rank_segments
        assert tuple(from_lists.documents) == tuple(from_arrays.documents)
        assert placements_layout(ctx, placement, fills).rank_segments == from_lists.rank_segments
        for comm in CommMode:  # the segment-by-segment and the columns evaluation
            expected = build_plan(ctx, from_lists, strategy="flashcp", comm=comm).to_json()
            plan = build_plan(ctx, from_arrays, strategy="flashcp", comm=comm)
            assert plan.to_json() == expected
            # The compact documents' JSON equals the records' (whole documents have no record).
            assert dataclasses.replace(plan, documents=tuple(plan.documents)).to_json() == expected


@given(lengths=st.lists(st.one_of(st.integers(1, 2000), st.integers(1, 2**31)), min_size=1, max_size=3000),
       cp_size=st.integers(1, 64))
@settings(max_examples=40, deadline=None)
def test_lower_bound_over_an_array_equals_the_python_sums(lengths, cp_size):
    cost_model = get_preset("h100-llama8b")
    python = (sum(x * (x + 1) for x in lengths) // 2, sum(lengths))
    assert _pairs_and_tokens(np.array(lengths, dtype=np.int64)) == python == _pairs_and_tokens(lengths)
    assert lower_bound_ms(np.array(lengths, dtype=np.int64), cp_size, cost_model) == lower_bound_ms(
        lengths, cp_size, cost_model)
