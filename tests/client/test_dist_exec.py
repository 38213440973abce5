"""Plan execution on 2 and 4 gloo CPU processes: dispatch, KV exchange, cp_attention, agreement.

One process group per group size runs every check (spawning costs seconds);
each rank writes its results to a JSON file and the tests below assert them.
References: the full packed tensors (exact checks), the planner's predicted
bytes, and torch SDPA in float64 with a block-diagonal causal mask over the
whole packed sequence. The kernels' torch path computes in float32, so
outputs and gradients are compared with ``atol=ATOL, rtol=RTOL`` below.
A run that does not finish within ``JOIN_TIMEOUT_S`` (a hung collective)
fails the tests.
"""

from __future__ import annotations

import os

import pytest
import torch
from dist_harness import assert_group_ok, run_group

N_HEADS, N_KV_HEADS, HEAD_DIM = 4, 2, 8
ATOL, RTOL = 2e-5, 1e-4
"""float32 kernel arithmetic vs a float64 reference on O(1) inputs, sequences under 50 tokens."""
TRITON_ATOL = 1e-4
"""Triton kernels (float32, exp2, another summation order) under the interpreter vs the float64 reference."""
JOIN_TIMEOUT_S = 120
BATCHES = {2: (41, 1, 9, 14, 5, 2, 17), 4: (37, 1, 9, 14, 5, 2, 17, 3, 26)}
STRATEGY_NAMES = ("zigzag", "contiguous", "per_doc", "whole_doc", "flashcp")
EXTRA_COMM = (("per_doc", "exact_need"), ("zigzag", "exact_need"), ("flashcp", "sharding_aware"),
              ("flashcp", "all_gather"), ("contiguous", "sharding_aware"))


MOVING_PLANS = ("per_doc/exact_need", "zigzag/exact_need", "contiguous/sharding_aware", "sub_group/exact_need",
                "per_doc/node_dedup", "sub_group/node_dedup")
"""Plans that must move KV without all-gather (so the exchange path is really exercised)."""
NODE_GPN = 2
"""Ranks per simulated node of the node_dedup plans (4-rank group: two nodes)."""


def _backend() -> str:
    return "auto" if os.environ.get("TRITON_INTERPRET") == "1" else "torch"


# --------------------------------------------------------------------------- plans


def _cost_model(gpus_per_node=8):
    from flashcp_planner import CostModel

    # Attention-dominated constants so that the FlashCP heuristic splits some of these short documents.
    return CostModel(name="test-small", num_heads=N_HEADS, num_kv_heads=N_KV_HEADS, head_dim=HEAD_DIM,
                     bytes_per_element=4, attention_segment_overhead_ms=0.0, intra_node_latency_ms=0.0,
                     inter_node_latency_ms=0.0, attention_tflops=1e-3, gemm_tflops=1e3, gpus_per_node=gpus_per_node)


def _request(lengths, n, strategy, comm, *, capacity=None, gpus_per_node=8):
    from flashcp_planner import PlanOptions, PlanRequest

    return PlanRequest(micro_batches=[list(lengths)], cp_size=n, cost_model=_cost_model(gpus_per_node),
                       strategy=strategy, capacity=capacity, options=PlanOptions(comm=comm))


def _plan(lengths, n, strategy, comm=None, **kwargs):
    from flashcp_planner import Infeasible, plan

    try:
        return plan(_request(lengths, n, strategy, comm, **kwargs))[0]
    except Infeasible:
        return plan(_request(lengths, n, strategy, comm, capacity=sum(lengths), **kwargs))[0]


def _hand_plan(name, lengths, n, comm, **kwargs):
    """``hand_plans.sub_group_plan`` (doc 0 on ranks 1..n-1, doc 1 per-doc, the rest whole) or
    ``hand_plans.node_local_plan`` (every document head-tail inside one node)."""
    import hand_plans

    ctx = _request(lengths, n, "flashcp", comm, capacity=sum(lengths), **kwargs).contexts()[0]
    return getattr(hand_plans, name)(ctx, comm)


def plans_for(n):
    lengths = BATCHES[n]
    plans = {f"{s}/default": _plan(lengths, n, s) for s in STRATEGY_NAMES}
    plans.update({f"{s}/{c}": _plan(lengths, n, s, c) for s, c in EXTRA_COMM})
    if n >= 3:
        plans["sub_group/exact_need"] = _hand_plan("sub_group_plan", lengths, n, "exact_need")
        plans["sub_group/all_gather"] = _hand_plan("sub_group_plan", lengths, n, "all_gather")
    if n == 4:  # two simulated nodes of NODE_GPN ranks
        plans.update({f"{s}/node_dedup": _plan(lengths, n, s, "node_dedup", gpus_per_node=NODE_GPN)
                      for s in STRATEGY_NAMES})
        plans["sub_group/node_dedup"] = _hand_plan("sub_group_plan", lengths, n, "node_dedup",
                                                   gpus_per_node=NODE_GPN)
        plans["node_local/node_dedup"] = _hand_plan("node_local_plan", lengths, n, "node_dedup",
                                                    gpus_per_node=NODE_GPN)
    return plans


# --------------------------------------------------------------------------- reference


def reference_attention(lengths, q, k, v, dout):
    """SDPA over the whole packed sequence, block-diagonal causal mask, float64: out, dq, dk, dv."""
    import torch.nn.functional as F

    q64, k64, v64 = (t.double().requires_grad_() for t in (q, k, v))
    doc = torch.cat([torch.full((x,), d) for d, x in enumerate(lengths)])
    pos = torch.arange(doc.numel())
    mask = (doc[:, None] == doc[None, :]) & (pos[None, :] <= pos[:, None])
    groups = q.shape[1] // k.shape[1]
    out = F.scaled_dot_product_attention(
        q64.transpose(0, 1)[None], k64.repeat_interleave(groups, 1).transpose(0, 1)[None],
        v64.repeat_interleave(groups, 1).transpose(0, 1)[None], attn_mask=mask,
    )[0].transpose(0, 1)
    out.backward(dout.double())
    return out.detach(), q64.grad, k64.grad, v64.grad


# --------------------------------------------------------------------------- worker


def _checks(rank, n, record):
    import torch.distributed as dist

    from flashcp_client import (
        CommStats,
        PlanMismatchError,
        cp_attention,
        dispatch,
        exchange_kv,
        rank_layout,
        undispatch,
        verify_plan_agreement,
    )
    from flashcp_planner import kv_transfers

    lengths = BATCHES[n]
    total = sum(lengths)
    gen = torch.Generator().manual_seed(1234)
    q = torch.randn(total, N_HEADS, HEAD_DIM, generator=gen)
    k = torch.randn(total, N_KV_HEADS, HEAD_DIM, generator=gen)
    v = torch.randn(total, N_KV_HEADS, HEAD_DIM, generator=gen)
    dout = torch.randn(total, N_HEADS, HEAD_DIM, generator=gen)
    x = torch.randn(total, 3, dtype=torch.float64, generator=gen)
    ref_out, ref_dq, ref_dk, ref_dv = reference_attention(lengths, q, k, v, dout)

    plans = plans_for(n)
    record("plans", True, {label: [d.kind.value for d in p.documents] for label, p in plans.items()})
    for label, p in plans.items():
        layout = rank_layout(p, rank)
        cost = p.ranks[rank].cost
        idx = layout.local_index
        verify_plan_agreement(p, local_tokens=layout.num_local_tokens, total_tokens=total)

        local_x = dispatch(x, p, rank).requires_grad_()
        back = undispatch(local_x, p)
        back.backward(torch.ones_like(back))
        record(f"{label}/roundtrip", torch.equal(back, x) and torch.equal(local_x.grad, torch.full_like(local_x, n)),
               "undispatch(dispatch(x)) == x; grad = n (one copy per rank)")

        stats = CommStats()
        recv_k, recv_v = exchange_kv(dispatch(k, p, rank), dispatch(v, p, rank), p, stats=stats)
        record(f"{label}/received_kv",
               torch.equal(recv_k, k[layout.recv_index]) and torch.equal(recv_v, v[layout.recv_index]),
               f"{recv_k.shape[0]} rows")
        record(f"{label}/bytes_exchange",
               (stats.forward_recv_bytes, stats.forward_send_bytes) == (cost.recv_bytes, cost.send_bytes),
               f"moved {stats.forward_recv_bytes}/{stats.forward_send_bytes}, "
               f"planned {cost.recv_bytes}/{cost.send_bytes}")

        ql, kl, vl = (dispatch(t, p, rank).requires_grad_() for t in (q, k, v))
        stats = CommStats()
        out = cp_attention(ql, kl, vl, p, backend=_backend(), stats=stats)
        out.backward(dispatch(dout, p, rank))
        full_out = undispatch(out.detach(), p)
        errors = {
            "out": (out.double() - ref_out[idx]).abs().max().item(),
            "dq": (ql.grad.double() - ref_dq[idx]).abs().max().item(),
            "dk": (kl.grad.double() - ref_dk[idx]).abs().max().item(),
            "dv": (vl.grad.double() - ref_dv[idx]).abs().max().item(),
        }
        close = all(
            torch.allclose(a.double(), b, atol=ATOL, rtol=RTOL)
            for a, b in ((out, ref_out[idx]), (ql.grad, ref_dq[idx]), (kl.grad, ref_dk[idx]), (vl.grad, ref_dv[idx]),
                         (full_out, ref_out))
        )
        record(f"{label}/attention", close, errors)
        record(f"{label}/bytes_attention",
               (stats.forward_recv_bytes, stats.forward_send_bytes, stats.backward_send_bytes,
                stats.backward_recv_bytes) == (cost.recv_bytes, cost.send_bytes, cost.recv_bytes, cost.send_bytes),
               f"fwd {stats.forward_recv_bytes}/{stats.forward_send_bytes} bwd {stats.backward_send_bytes}/"
               f"{stats.backward_recv_bytes}, planned recv/send {cost.recv_bytes}/{cost.send_bytes}")
        if label in MOVING_PLANS:
            record(f"{label}/moves_kv", bool(kv_transfers(p)) and layout.group_has_transfers,
                   "plan splits some document")
        if label.endswith("/node_dedup"):
            _node_stage_checks(rank, label, p, dispatch(k, p, rank), dispatch(v, p, rank), record)

    if n == 2:
        _triton_interpreter_case(rank, n, record)

    good, other = plans["flashcp/default"], plans["per_doc/default"]
    try:
        verify_plan_agreement(other if rank == 1 else good)
        record("mismatch/fingerprint", False, "no error raised")
    except PlanMismatchError as exc:
        record("mismatch/fingerprint", exc.field == "fingerprint", str(exc))

    right = good.ranks[rank].num_tokens
    try:
        verify_plan_agreement(good, local_tokens=right + 1 if rank == n - 1 else right)
        record("mismatch/local_tokens", False, "no error raised")
    except PlanMismatchError as exc:
        wrong = f"rank {n - 1} holds {good.ranks[n - 1].num_tokens + 1}"
        record("mismatch/local_tokens", exc.field == "q.shape[0]" and wrong in str(exc), str(exc))

    wrong_size = _plan(lengths, n + 1, "flashcp")
    ql, kl, vl = (dispatch(t, good, rank) for t in (q, k, v))
    calls = {
        "cp_size/cp_attention": lambda: cp_attention(ql, kl, vl, wrong_size),
        "cp_size/undispatch": lambda: undispatch(ql, wrong_size),
        "cp_size/exchange_kv": lambda: exchange_kv(kl, vl, wrong_size),
        "cp_size/verify": lambda: verify_plan_agreement(wrong_size),
        "tokens/cp_attention": lambda: cp_attention(ql[:-1], kl[:-1], vl[:-1], good),
        "tokens/cp_attention_k": lambda: cp_attention(ql, kl[:-1], vl[:-1], good),
        "tokens/undispatch": lambda: undispatch(ql[1:], good),
        "tokens/exchange_kv": lambda: exchange_kv(kl[1:], vl[1:], good),
        "tokens/dispatch": lambda: dispatch(x[1:], good, rank),
    }
    for name, call in calls.items():
        try:
            call()
            record(f"mismatch/{name}", False, "no error raised")
        except PlanMismatchError as exc:
            record(f"mismatch/{name}", True, str(exc))
    # Had any call above entered a collective, the group would now be out of step.
    fingerprint = verify_plan_agreement(good)
    check = torch.tensor([1.0])
    dist.all_reduce(check)
    record("mismatch/group_still_in_step", fingerprint == good.fingerprint() and check.item() == n, "")


def _node_stage_checks(rank, label, p, kl, vl, record):
    """Bytes of each node_dedup stage, both directions, against the planner's per-stage traffic."""
    from flashcp_client import rank_layout
    from flashcp_client.kv_exchange import start_grad_return, start_kv_exchange
    from flashcp_planner import CommMode
    from flashcp_planner.comm import transfers_and_traffic

    layout = rank_layout(p, rank)
    _, recv, send = transfers_and_traffic([rp.segments for rp in p.ranks], CommMode.NODE_DEDUP, p.gpus_per_node,
                                          list_transfers=False)
    kv = 2 * N_KV_HEADS * HEAD_DIM * kl.element_size()
    planned = (recv[rank][1] * kv, send[rank][1] * kv, recv[rank][0] * kv, send[rank][0] * kv)
    forward = start_kv_exchange(kl, vl, layout)
    forward.wait()
    moved = (forward.inter_received_bytes, forward.inter_sent_bytes, forward.intra_received_bytes,
             forward.intra_sent_bytes)
    record(f"{label}/stage_bytes_forward", moved == planned, f"inter recv/send, intra recv/send: moved {moved}, "
           f"planned {planned}")
    d_ws = torch.randn(layout.num_workspace_rows, N_KV_HEADS, HEAD_DIM)
    _, backward = start_grad_return(d_ws, d_ws.clone(), layout)
    backward.wait()
    moved = (backward.inter_sent_bytes, backward.inter_received_bytes, backward.intra_sent_bytes,
             backward.intra_received_bytes)
    record(f"{label}/stage_bytes_backward", moved == planned, f"mirror of forward: moved {moved}, planned {planned}")
    if label.startswith("node_local/"):
        record(f"{label}/nothing_crosses", not layout.node_exchange.group_crosses and planned[:2] == (0, 0)
               and sum(s[0] for s in recv) > 0, f"planned intra recv {[s[0] for s in recv]}")
    elif label == "per_doc/node_dedup":
        record(f"{label}/crosses", layout.node_exchange.group_crosses and sum(s[1] for s in recv) > 0,
               f"planned inter recv {[s[1] for s in recv]}")


def _triton_interpreter_case(rank, n, record):
    """A small per-doc plan through the Triton kernels under the CPU interpreter (local and workspace segments)."""
    from flashcp_client import cp_attention, dispatch, rank_layout

    os.environ["TRITON_INTERPRET"] = "1"  # read when the Triton kernels are first imported
    lengths = (19, 1, 6)
    p = _plan(lengths, n, "per_doc", "exact_need")
    gen = torch.Generator().manual_seed(99)
    q, dout = (torch.randn(sum(lengths), 2, HEAD_DIM, generator=gen) for _ in range(2))
    k, v = (torch.randn(sum(lengths), 1, HEAD_DIM, generator=gen) for _ in range(2))
    refs = reference_attention(lengths, q, k, v, dout)
    idx = rank_layout(p, rank).local_index
    ql, kl, vl = (dispatch(t, p, rank).requires_grad_() for t in (q, k, v))
    out = cp_attention(ql, kl, vl, p, backend="triton")
    out.backward(dispatch(dout, p, rank))
    got = (out, ql.grad, kl.grad, vl.grad)
    errors = [(a.double() - b[idx]).abs().max().item() for a, b in zip(got, refs, strict=True)]
    record("triton_interpret/attention", all(e <= TRITON_ATOL for e in errors), errors)


_CACHE: dict[int, tuple[list[int], dict]] = {}


@pytest.fixture(scope="module", params=[2, 4], ids=["2ranks", "4ranks"])
def group_results(request, tmp_path_factory):
    n = request.param
    if n not in _CACHE:
        _CACHE[n] = run_group(_checks, n, tmp_path_factory.mktemp(f"dist{n}"), join_timeout_s=JOIN_TIMEOUT_S)
    hung, results = _CACHE[n]
    assert_group_ok(hung, results, JOIN_TIMEOUT_S)
    return n, results


def _assert_checks(group_results, suffix, minimum):
    n, results = group_results
    seen = 0
    for rank, res in results.items():
        for name, entry in res.items():
            if name.endswith(suffix) or name.startswith(suffix):
                seen += 1
                assert entry["ok"], f"rank {rank} {name}: {entry['detail']}"
    assert seen >= minimum * n, f"only {seen} '{suffix}' checks ran on {n} ranks"


def test_every_strategy_planned(group_results):
    n, results = group_results
    labels = results[0]["plans"]["detail"]
    for s in STRATEGY_NAMES:
        assert f"{s}/default" in labels
    if n >= 3:
        assert "sub_group/exact_need" in labels


def test_dispatch_undispatch_round_trip(group_results):
    _assert_checks(group_results, "/roundtrip", len(STRATEGY_NAMES))


def test_received_kv_equals_reference_rows(group_results):
    _assert_checks(group_results, "/received_kv", len(STRATEGY_NAMES))


def test_bytes_moved_equal_planner_prediction(group_results):
    _assert_checks(group_results, "/bytes_exchange", len(STRATEGY_NAMES))
    _assert_checks(group_results, "/bytes_attention", len(STRATEGY_NAMES))
    _assert_checks(group_results, "/moves_kv", 2)


def test_cp_attention_matches_sdpa_over_packed_sequence(group_results):
    _assert_checks(group_results, "/attention", len(STRATEGY_NAMES))


def test_node_dedup_stages_move_the_planned_bytes(group_results):
    n, _ = group_results
    if n != 4:
        pytest.skip("node_dedup plans run in the 4-rank group (two nodes of 2 ranks)")
    _assert_checks(group_results, "/stage_bytes_forward", len(STRATEGY_NAMES) + 2)
    _assert_checks(group_results, "/stage_bytes_backward", len(STRATEGY_NAMES) + 2)
    _assert_checks(group_results, "/nothing_crosses", 1)
    _assert_checks(group_results, "/crosses", 1)


def test_triton_interpreter_case(group_results):
    n, _ = group_results
    if n != 2:
        pytest.skip("the interpreter case runs in the 2-rank group only")
    _assert_checks(group_results, "triton_interpret/attention", 1)


def test_fingerprint_mismatch_raises_on_every_rank(group_results):
    _assert_checks(group_results, "mismatch/fingerprint", 1)
    _assert_checks(group_results, "mismatch/local_tokens", 1)


def test_plan_batch_mismatch_raises_before_collectives(group_results):
    _assert_checks(group_results, "mismatch/cp_size", 4)
    _assert_checks(group_results, "mismatch/tokens", 5)
    _assert_checks(group_results, "mismatch/group_still_in_step", 1)
