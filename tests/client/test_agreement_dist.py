"""Agreement by default: every disagreement that used to hang, abort or silently corrupt raises on every rank.

One 3-rank gloo group runs every scenario of issue 14's table through plain
``cp_attention`` calls (no explicit ``verify_plan_agreement``): rank 1 deviates,
and every rank must raise the *same* ``PlanMismatchError`` before any KV moves,
after which the group must still be in step. The parent waits at most
``JOIN_TIMEOUT_S`` (the process-group timeout is ``PG_TIMEOUT_S``, 600 s), so a
hang fails the test instead of stalling it.
"""

from __future__ import annotations

import time

import pytest
import torch
from dist_harness import assert_group_ok, run_group

N = 3
JOIN_TIMEOUT_S = 120
AGREEMENT_TIMEOUT_S = 3
LENGTHS = (40, 9, 14, 5, 2, 17)
OTHER_LENGTHS = (40, 9, 14, 5, 3, 16)  # same total, different documents
HEADS, KV_HEADS, HEAD_DIM = 4, 2, 8

SCENARIOS = {
    # name: (field every rank must report, which deviation rank 1 makes)
    "lengths_same_total": "fingerprint",
    "other_strategy": "fingerprint",
    "other_comm_mode": "fingerprint",
    "dtype": "dtype",
    "k_dtype": "dtype",
    "one_token_too_few": "q.shape[0]",
    "other_cp_size": "cp_size",
    "heads": "q.shape[1:]",
    "skips_first_layer": "layer",
    "skips_later_layer_always": "layer",
}


def _plan(lengths, n, strategy="flashcp", comm=None):
    from flashcp_planner import PlanOptions, PlanRequest, plan

    request = PlanRequest(micro_batches=[list(lengths)], cp_size=n, strategy=strategy, capacity=sum(lengths),
                          options=PlanOptions(comm=comm))
    return plan(request)[0]


def _inputs(p, rank, *, heads=HEADS, dtype=torch.float32, seed=0):
    from flashcp_client import dispatch

    gen = torch.Generator().manual_seed(seed)
    total = p.num_tokens
    q = torch.randn(total, heads, HEAD_DIM, generator=gen, dtype=torch.float64).to(dtype)
    k = torch.randn(total, KV_HEADS, HEAD_DIM, generator=gen, dtype=torch.float64).to(dtype)
    v = torch.randn(total, KV_HEADS, HEAD_DIM, generator=gen, dtype=torch.float64).to(dtype)
    return tuple(dispatch(t, p, rank) for t in (q, k, v))


def _checks(rank, n, record):
    import torch.distributed as dist

    import flashcp_client.agreement as agreement
    from flashcp_client import AgreementTimeout, PlanMismatchError, cp_attention

    good = _plan(LENGTHS, n, "per_doc", "exact_need")  # moves KV: a disagreement would reach the exchange
    deviant = rank == 1

    def attempt(name, call):
        try:
            call()
            record(f"scenario/{name}", False, "no error raised")
        except PlanMismatchError as exc:
            record(f"scenario/{name}", True, {"field": exc.field, "message": str(exc)})

    def attention(p, q, k, v, **kwargs):
        return cp_attention(q, k, v, p, backend="torch", **kwargs)

    q, k, v = _inputs(good, rank)
    scenarios = {
        "lengths_same_total": lambda: attention(_plan(OTHER_LENGTHS, n, "per_doc", "exact_need") if deviant
                                                else good, *_inputs(good, rank)),
        "other_strategy": lambda: attention(_plan(LENGTHS, n, "zigzag", "exact_need") if deviant else good,
                                            *_inputs(good, rank)),
        "other_comm_mode": lambda: attention(_plan(LENGTHS, n, "per_doc", "all_gather") if deviant else good,
                                             *_inputs(good, rank)),
        "dtype": lambda: attention(good, *_inputs(good, rank, dtype=torch.float64 if deviant else torch.float32)),
        "k_dtype": lambda: attention(good, q, k.double() if deviant else k, v),
        "one_token_too_few": lambda: attention(good, *(t[:-1] if deviant else t for t in (q, k, v))),
        "other_cp_size": lambda: attention(_plan(LENGTHS, n + 1) if deviant else good, q, k, v),
        "heads": lambda: attention(good, *_inputs(good, rank, heads=2 if deviant else HEADS)),
        # Rank 1 skips layer 0: its first call (layer 1) meets the others' layer 0.
        "skips_first_layer": lambda: [attention(good, *_inputs(good, rank), layer=layer)
                                      for layer in ((1, 2) if deviant else (0, 1, 2))],
        # After a first check passed, rank 1 skips layer 1; "always" checks every call.
        "skips_later_layer_always": lambda: [attention(good, *_inputs(good, rank), layer=layer, agreement="always")
                                             for layer in ((0, 2) if deviant else (0, 1, 2))],
    }
    for name, call in scenarios.items():
        attempt(name, call)

    # One collective per plan object and signature, whatever the number of layers.
    calls = []
    real = agreement.exchange_records

    def counting(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    agreement.exchange_records = counting
    try:
        outs = []
        for p in (_plan(LENGTHS, n, "per_doc", "exact_need"), _plan(LENGTHS, n, "per_doc", "exact_need")):
            q, k, v = _inputs(p, rank)
            outs += [attention(p, q, k, v, layer=layer) for layer in range(4)]
        off = attention(p, q, k, v, agreement="off")
    finally:
        agreement.exchange_records = real
    record("cache/one_check_per_plan_object", len(calls) == 2, f"{len(calls)} checks for 2 plans x 4 layers")
    record("cache/off_matches_checked", torch.equal(off, outs[-1]), "")

    # A rank that never reaches the check: the others raise AgreementTimeout after the bounded wait.
    if deviant:
        record("timeout/absent_rank", True, "rank 1 skipped the call")
        time.sleep(AGREEMENT_TIMEOUT_S + 1)  # the others' bounded wait expires meanwhile
        agreement.exchange_records([0] * agreement.RECORD_WORDS, None)  # completes their abandoned gather
    else:
        try:
            attention(_plan(LENGTHS, n, "per_doc", "exact_need"), q, k, v)
            record("timeout/absent_rank", False, "no error raised")
        except AgreementTimeout as exc:
            record("timeout/absent_rank", "did not reach the plan agreement check" in str(exc), str(exc))

    check = torch.tensor([1.0])
    dist.all_reduce(check)
    q, k, v = _inputs(good, rank)
    out = attention(good, q, k, v, agreement="always")
    record("group_still_in_step", check.item() == n and torch.isfinite(out).all().item(), "")


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    hung, res = run_group(_checks, N, tmp_path_factory.mktemp("agreement"), join_timeout_s=JOIN_TIMEOUT_S,
                          env={"FLASHCP_AGREEMENT_TIMEOUT_S": str(AGREEMENT_TIMEOUT_S)})
    assert_group_ok(hung, res, JOIN_TIMEOUT_S)
    return res


@pytest.mark.parametrize("scenario", sorted(SCENARIOS))
def test_disagreement_raises_the_same_error_on_every_rank(results, scenario):
    entries = [results[r][f"scenario/{scenario}"] for r in range(N)]
    for r, entry in enumerate(entries):
        assert entry["ok"], f"rank {r}: {entry['detail']}"
        assert entry["detail"]["field"] == SCENARIOS[scenario], f"rank {r}: {entry['detail']}"
    messages = {entry["detail"]["message"] for entry in entries}
    assert len(messages) == 1, f"ranks raised different errors: {messages}"


def test_one_agreement_collective_per_plan_object(results):
    for r in range(N):
        for name in ("cache/one_check_per_plan_object", "cache/off_matches_checked"):
            assert results[r][name]["ok"], f"rank {r} {name}: {results[r][name]['detail']}"


def test_absent_rank_gives_a_bounded_wait_then_group_recovers(results):
    for r in range(N):
        for name in ("timeout/absent_rank", "group_still_in_step"):
            assert results[r][name]["ok"], f"rank {r} {name}: {results[r][name]['detail']}"
