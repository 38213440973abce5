"""Every registered strategy: valid plans on random inputs, costs and KV volumes against brute force."""

from __future__ import annotations

import dataclasses
import itertools

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from flashcp_planner import (
    STRATEGIES,
    CommMode,
    Infeasible,
    InvalidRequest,
    PlanOptions,
    PlanRequest,
    kv_transfers,
    plan,
)
from flashcp_planner.cost import lower_bound_ms
from flashcp_planner.layout import head_tail_segments
from flashcp_planner.presets import get_preset
from flashcp_planner.validation import validate_plan

HEURISTICS = [name for name, s in STRATEGIES.items() if not s.is_optimal]

lengths_st = st.lists(st.integers(min_value=1, max_value=3000), min_size=1, max_size=12)
cp_st = st.sampled_from([1, 2, 3, 4, 6, 8, 16])
comm_st = st.sampled_from([None, *CommMode])
slack_st = st.sampled_from([0.0, 0.1, 0.25, 1.0])


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(lengths=lengths_st, cp_size=cp_st, comm=comm_st, slack=slack_st)
def test_every_strategy_returns_a_valid_plan_or_a_legitimate_infeasible(lengths, cp_size, comm, slack):
    for name in HEURISTICS:
        request = PlanRequest(micro_batches=[lengths], cp_size=cp_size, strategy=name, capacity_slack=slack,
                              options=PlanOptions(comm=comm))
        try:
            (p,) = plan(request)
        except Infeasible:
            capacity = request.contexts()[0].capacity
            # Only whole-doc-only and the document-oblivious cuts may legitimately fail to fit.
            assert name in ("whole_doc", "zigzag", "contiguous", "per_doc"), name
            if name == "whole_doc":
                continue
            assert max(_max_share(lengths, cp_size, name)) > capacity
            continue
        validate_plan(p)  # includes the transfers check
        assert p.makespan_ms >= p.lower_bound_ms * (1 - 1e-12)
        assert p.lower_bound_ms == pytest.approx(lower_bound_ms(lengths, cp_size, request.cost_model), rel=1e-12)


def _max_share(lengths, cp_size, name):
    """Tokens per rank of the document-oblivious strategies (for the legitimacy check of Infeasible)."""
    total = sum(lengths)
    if name == "contiguous":
        bounds = [total * i // cp_size for i in range(cp_size + 1)]
        return [bounds[i + 1] - bounds[i] for i in range(cp_size)]
    if name == "zigzag":
        bounds = [total * i // (2 * cp_size) for i in range(2 * cp_size + 1)]
        sizes = [bounds[i + 1] - bounds[i] for i in range(2 * cp_size)]
        return [sizes[r] + sizes[2 * cp_size - 1 - r] for r in range(cp_size)]
    shares = [0] * cp_size
    for doc, length in enumerate(lengths):
        for rank, seg in head_tail_segments(doc, length, range(cp_size)):
            shares[rank] += seg.num_tokens
    return shares


def test_flashcp_is_infeasible_only_when_the_tokens_do_not_fit():
    with pytest.raises(Infeasible):
        PlanRequest(micro_batches=[[10, 10, 11]], cp_size=2, capacity=15).contexts()
    # Exactly enough room: a plan must exist even though no document fits whole with the others.
    (p,) = plan(PlanRequest(micro_batches=[[7, 7, 7, 7, 1]], cp_size=3, capacity=10))
    validate_plan(p)
    assert max(rp.num_tokens for rp in p.ranks) <= 10


def _brute_force(p):
    """Token-by-token enumeration of causal pairs and of the KV tokens each rank must receive."""
    owner = {}
    for rp in p.ranks:
        for seg in rp.segments:
            for i in range(seg.start, seg.end):
                owner[(seg.doc, i)] = rp.rank
    n = p.cp_size
    pairs = [0] * n
    recv = [[0] * n for _ in range(n)]  # recv[dst][src] in tokens
    split_docs = {d for d in range(len(p.doc_lengths)) if len({owner[(d, i)] for i in range(p.doc_lengths[d])}) > 1}
    for r in range(n):
        owned = [(d, i) for (d, i), o in owner.items() if o == r]
        docs = {d for d, _ in owned}
        if p.comm in (CommMode.EXACT_NEED, CommMode.NODE_DEDUP):  # (one node here: node_dedup moves the same)
            need = set()
            for d, i in owned:
                pairs[r] += i + 1
                need.update((d, j) for j in range(i + 1))
        else:
            for _, i in owned:
                pairs[r] += i + 1
            if p.comm is CommMode.SHARDING_AWARE:
                need = {(d, j) for d in docs if d in split_docs for j in range(p.doc_lengths[d])}
            else:
                need = set(owner)
        for key in need:
            if owner[key] != r:
                recv[r][owner[key]] += 1
    return pairs, recv


@settings(max_examples=40, deadline=None)
@given(lengths=st.lists(st.integers(min_value=1, max_value=60), min_size=1, max_size=6),
       cp_size=st.sampled_from([1, 2, 3, 4]), comm=st.sampled_from(list(CommMode)),
       strategy=st.sampled_from(["flashcp", "per_doc", "zigzag", "contiguous", "whole_doc"]))
def test_pairs_and_kv_volumes_match_token_by_token_enumeration(lengths, cp_size, comm, strategy):
    try:
        (p,) = plan(PlanRequest(micro_batches=[lengths], cp_size=cp_size, strategy=strategy, capacity_slack=1.0,
                                options=PlanOptions(comm=comm)))
    except Infeasible:
        return
    pairs, recv = _brute_force(p)
    kv = PlanRequest(micro_batches=[[1]], cp_size=1).cost_model.kv_bytes_per_token
    transfers = kv_transfers(p)
    for rp in p.ranks:
        r = rp.rank
        assert sum(seg.pairs for seg in rp.segments) == pairs[r]
        assert rp.cost.recv_bytes == sum(recv[r]) * kv
        assert rp.cost.send_bytes == sum(recv[dst][r] for dst in range(cp_size)) * kv
        for src in range(cp_size):
            assert sum(t.num_tokens for t in transfers if t.dst == r and t.src == src) == recv[r][src]
    owned = {(rp.rank, seg.doc, i) for rp in p.ranks for seg in rp.segments for i in range(seg.start, seg.end)}
    for t in transfers:  # every transfer moves tokens its source owns
        assert all((t.src, t.doc, i) in owned for i in range(t.start, t.end))
    total_pairs = sum(length * (length + 1) // 2 for length in lengths)
    assert sum(pairs) == total_pairs


def test_all_gather_receives_every_remote_token():
    lengths = [5, 9, 3, 12]
    (p,) = plan(PlanRequest(micro_batches=[lengths], cp_size=4, strategy="zigzag"))
    assert p.transfers is None and kv_transfers(p) and p.to_dict()["transfers"] == []
    kv = p.ranks[0].cost.recv_bytes // (sum(lengths) - p.ranks[0].num_tokens)
    for rp in p.ranks:
        assert rp.cost.recv_bytes == (sum(lengths) - rp.num_tokens) * kv


@pytest.mark.parametrize("name", sorted(STRATEGIES))
def test_strategy_interface(name):
    s = STRATEGIES[name]
    assert s.name == name and isinstance(s.description, str) and s.description
    assert isinstance(s.default_comm, CommMode)
    assert s.is_optimal == (name == "optimum")


def test_optimum_is_registered_and_plans_tiny_inputs():
    (p,) = plan(PlanRequest(micro_batches=[[300, 40, 900]], cp_size=2, strategy="optimum",
                            options=PlanOptions(time_limit_s=5, num_workers=1)))
    validate_plan(p)
    assert p.optimality is not None and p.optimality.status in ("optimal", "feasible")


def test_every_sub_group_is_an_aligned_power_of_two_block():
    lengths = [20000, 9000, 7000, 300, 200, 100, 5000, 4000, 64, 3000]
    for cp_size, gpn in itertools.product([8, 16], [4, 8]):
        cost_model = dataclasses.replace(get_preset("h100-llama8b"), gpus_per_node=gpn)
        (p,) = plan(PlanRequest(micro_batches=[lengths], cp_size=cp_size, cost_model=cost_model))
        for d in p.documents:
            if d.kind.value in ("sub_group", "per_doc"):
                k = len(d.ranks)
                assert k & (k - 1) == 0 or k == cp_size
                assert d.ranks[0] % k == 0 and list(d.ranks) == list(range(d.ranks[0], d.ranks[0] + k))


def test_request_validation_names_the_document_after_the_bulk_check():
    for bad, index, message in (([5, 0, 7], 1, ">= 1"), ([5, 2.0, 7], 1, "integer"), ([5, 6, True], 2, "integer"),
                                ([1 << 40, 5], 0, "<=")):
        with pytest.raises(InvalidRequest, match=message) as info:
            PlanRequest(micro_batches=[[3], bad], cp_size=2)
        assert info.value.field == f"micro_batches[1][{index}]"
