"""Per-rank index maps of flashcp_client.layout against brute force (no torch.distributed).

The exchange is simulated in one process: every rank's send buffer is cut by
its send splits and delivered peer by peer, exactly as ``all_to_all_single``
would, and the received rows, the KV workspace and the attention (query, key)
pairs the kernel metadata describes are compared with what the full packed
sequence says they must be.
"""

from __future__ import annotations

import dataclasses
import random

import hand_plans
import pytest
import torch

from flashcp_client import PlanMismatchError, dispatch, packed_order, rank_layout
from flashcp_client.layout import doc_offsets
from flashcp_planner import CommMode, CostModel, PlanOptions, PlanRequest, kv_transfers, plan

COST_MODEL = CostModel(name="test-small", num_heads=4, num_kv_heads=2, head_dim=8, bytes_per_element=4)
STRATEGY_NAMES = ("zigzag", "contiguous", "per_doc", "whole_doc", "flashcp")


def _request(lengths, n, strategy, comm):
    return PlanRequest(micro_batches=[list(lengths)], cp_size=n, cost_model=COST_MODEL, strategy=strategy,
                       capacity=sum(lengths), options=PlanOptions(comm=comm))


def sub_group_plan(lengths, n, comm):
    assert n >= 3 and len(lengths) >= 2
    return hand_plans.sub_group_plan(_request(lengths, n, "flashcp", comm).contexts()[0], comm)


def all_plans(lengths, n):
    plans = []
    for comm in CommMode:
        plans += [plan(_request(lengths, n, s, comm))[0] for s in STRATEGY_NAMES]
        if n >= 3:
            plans.append(sub_group_plan(lengths, n, comm))
    return plans


def _simulate(p):
    """Every rank's layout, received packed indices and workspace packed indices via a simulated all-to-all."""
    n = p.cp_size
    layouts = [rank_layout(p, r) for r in range(n)]
    chunks = []  # chunks[src][dst]: packed indices src sends to dst
    for lay in layouts:
        sent = lay.local_index[lay.send_rows]
        chunks.append(list(torch.split(sent, list(lay.send_splits))))
    received = [torch.cat([chunks[src][dst] for src in range(n)]) for dst in range(n)]
    workspaces = [
        torch.cat([lay.local_index, rec])[lay.workspace_source] for lay, rec in zip(layouts, received, strict=True)
    ]
    return layouts, received, workspaces


def _check_plan(p):
    lengths = p.doc_lengths
    offsets = doc_offsets(lengths)
    pos_of = torch.cat([torch.arange(x) for x in lengths])
    layouts, received, workspaces = _simulate(p)

    order, counts = packed_order(p)
    assert sorted(order.tolist()) == list(range(sum(lengths)))
    assert list(counts) == [rp.num_tokens for rp in p.ranks]

    allowed = set()
    for r, (lay, rec, ws) in enumerate(zip(layouts, received, workspaces, strict=True)):
        naive = [offsets[s.doc] + i for s in p.ranks[r].segments for i in range(s.start, s.end)]
        assert lay.local_index.tolist() == naive
        assert rec.tolist() == lay.recv_index.tolist(), "sender and receiver disagree on row order"
        expected_ws = [offsets[w.doc] + i for w in lay.workspace_docs for i in range(w.need)]
        assert ws.tolist() == expected_ws

        kv = COST_MODEL.kv_bytes_per_token
        assert lay.num_recv_rows * kv == p.ranks[r].cost.recv_bytes
        assert lay.num_send_rows * kv == p.ranks[r].cost.send_bytes
        if p.comm is CommMode.EXACT_NEED:
            assert lay.recv_used == lay.num_recv_rows
        if p.comm is CommMode.ALL_GATHER:
            assert lay.num_recv_rows == sum(lengths) - lay.num_local_tokens

        covered = torch.zeros(lay.num_local_tokens, dtype=torch.int64)
        for part, key_index in ((lay.local_part, lay.local_index), (lay.remote_part, ws)):
            for qs, ql, qp, ks in zip(part.q_start, part.q_len, part.q_pos, part.k_start, strict=True):
                for i in range(ql):
                    local_row = int(part.query_rows[qs + i])
                    covered[local_row] += 1
                    gq = int(lay.local_index[local_row])
                    assert int(pos_of[gq]) == qp + i
                    for key_row in range(ks, ks + qp + i + 1):
                        allowed.add((gq, int(key_index[key_row])))
        assert covered.tolist() == [1] * lay.num_local_tokens
        owned = {(s.doc, i) for s in lay.segments for i in range(s.start, s.end)}
        keys_all_local = [all((s.doc, i) in owned for i in range(s.end)) for s in lay.segments]
        assert [i for i, loc in enumerate(keys_all_local) if loc] == list(lay.local_part.segments)

    expected = {
        (offsets[d] + i, offsets[d] + j) for d, x in enumerate(lengths) for i in range(x) for j in range(i + 1)
    }
    assert allowed == expected


CASES = [
    ((7, 1, 13, 5, 2, 9), 1),
    ((7, 1, 13, 5, 2, 9), 2),
    ((7, 1, 13, 5, 2, 9), 3),
    ((23, 3, 1, 11, 6), 4),
    ((1, 1, 1, 40), 4),
]


@pytest.mark.parametrize(("lengths", "n"), CASES)
def test_index_maps_match_brute_force(lengths, n):
    for p in all_plans(lengths, n):
        _check_plan(p)


def test_index_maps_random_batches():
    rng = random.Random(7)
    for _ in range(6):
        n = rng.randint(2, 4)
        lengths = tuple(rng.choice([1, 2, 3, rng.randint(4, 30)]) for _ in range(rng.randint(2, 6)))
        if len(lengths) < 2:
            continue
        for p in all_plans(lengths, n):
            _check_plan(p)


def test_whole_doc_and_head_chunks_need_no_communication():
    p = plan(_request((12, 5, 9, 3), 2, "whole_doc", CommMode.EXACT_NEED))[0]
    for r in range(2):
        lay = rank_layout(p, r)
        assert not lay.group_has_transfers and lay.num_recv_rows == lay.num_send_rows == 0
        assert lay.remote_part.num_segments == 0 and lay.num_workspace_rows == 0
    p = plan(_request((40,), 4, "per_doc", CommMode.EXACT_NEED))[0]
    lay0 = rank_layout(p, 0)
    # rank 0 owns the head chunk (keys all local) and the tail chunk (reads everything before it).
    assert [lay0.segments[i].start for i in lay0.local_part.segments] == [0]
    assert [lay0.segments[i].end for i in lay0.remote_part.segments] == [40]
    lay3 = rank_layout(p, 3)
    assert lay3.local_part.num_segments == 0  # its head chunk starts mid-document
    # exact-need: rank r reads 2N-2-r remote chunks of 5 tokens.
    assert [rank_layout(p, r).num_recv_rows for r in range(4)] == [5 * (6 - r) for r in range(4)]


def test_dispatch_is_a_gather_of_the_local_index():
    p = plan(_request((7, 1, 13, 5), 3, "zigzag", CommMode.ALL_GATHER))[0]
    x = torch.randn(26, 2, 3)
    parts = [dispatch(x, p, r) for r in range(3)]
    order, _ = packed_order(p)
    back = torch.empty_like(x)
    back[order] = torch.cat(parts)
    assert torch.equal(back, x)
    with pytest.raises(PlanMismatchError, match=r"x\.shape\[0\]"):
        dispatch(x[:-1], p, 0)
    with pytest.raises(PlanMismatchError, match="rank"):
        dispatch(x, p, 3)


def test_plan_whose_transfers_miss_needed_keys_is_rejected():
    p = plan(_request((40, 6), 2, "per_doc", CommMode.EXACT_NEED))[0]
    listed = kv_transfers(p)
    dropped = listed[0]
    tampered = dataclasses.replace(p, transfers=listed[1:])
    with pytest.raises(PlanMismatchError, match="neither owns nor receives"):
        rank_layout(tampered, dropped.dst)
    bogus = dropped._replace(src=dropped.dst, dst=dropped.src)
    wrong_sender = dataclasses.replace(p, transfers=(*listed, bogus))
    with pytest.raises(PlanMismatchError, match="does not own"):
        rank_layout(wrong_sender, bogus.src)
