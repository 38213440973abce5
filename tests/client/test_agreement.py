"""The agreement diagnosis without processes: records of several 'ranks' built locally, one verdict for all."""

from __future__ import annotations

import pytest
import torch

from flashcp_client.agreement import RECORD_WORDS, _record, agreement_mode, agreement_timeout_s, diagnose
from flashcp_planner import PlanRequest, plan

N = 3


def _plan(lengths=(40, 9, 14, 5), strategy="per_doc"):
    return plan(PlanRequest(micro_batches=[list(lengths)], cp_size=N, strategy=strategy, capacity=sum(lengths)))[0]


def _rows(p, *, heads=4, kv_heads=2, dim=8, dtype=torch.float32, layer=0, tweak=None):
    rows = []
    for r in range(N):
        t = p.ranks[r].num_tokens
        q, k, v = torch.empty(t, heads, dim, dtype=dtype), torch.empty(t, kv_heads, dim, dtype=dtype), \
            torch.empty(t, kv_heads, dim, dtype=dtype)
        plan_r, layer_r = p, layer
        if tweak is not None and r == 1:
            plan_r, q, k, v, layer_r = tweak(p, q, k, v, layer)
        rows.append(_record(plan_r, N, layer=layer_r, tensors=(q, k, v), device=torch.device("cpu")))
    assert all(len(row) == RECORD_WORDS for row in rows)
    return rows


def test_agreeing_ranks_pass() -> None:
    p = _plan()
    assert diagnose(_rows(p), p) is None


@pytest.mark.parametrize("tweak, field", [
    (lambda p, q, k, v, layer: (_plan(strategy="zigzag"), q, k, v, layer), "fingerprint"),
    (lambda p, q, k, v, layer: (p, q, k, v, layer + 1), "layer"),
    (lambda p, q, k, v, layer: (p, q[:-1], k[:-1], v[:-1], layer), "q.shape[0]"),
    (lambda p, q, k, v, layer: (p, q, k.half(), v, layer), "dtype"),
    (lambda p, q, k, v, layer: (p, q[:, :2], k, v, layer), "q.shape[1:]"),
    (lambda p, q, k, v, layer: (p, q, k[:, :, :4], v[:, :, :4], layer), "k.shape[1:]"),
])
def test_each_disagreement_has_one_named_verdict(tweak, field) -> None:
    p = _plan()
    error = diagnose(_rows(p, tweak=tweak), p)
    assert error is not None and error.field == field, error


def test_shapes_wrong_on_every_rank_are_named() -> None:
    p = _plan()
    error = diagnose(_rows(p, heads=3), p)
    assert error is not None and error.field == "q.shape" and "kv heads divide heads" in str(error)


def test_modes_and_timeout_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("FLASHCP_AGREEMENT", raising=False)
    monkeypatch.delenv("FLASHCP_AGREEMENT_TIMEOUT_S", raising=False)
    assert agreement_mode() == "first_use" and agreement_timeout_s() == 300.0
    assert agreement_mode("off") == "off"
    monkeypatch.setenv("FLASHCP_AGREEMENT", "always")
    monkeypatch.setenv("FLASHCP_AGREEMENT_TIMEOUT_S", "2.5")
    assert agreement_mode() == "always" and agreement_timeout_s() == 2.5
    with pytest.raises(ValueError, match="agreement"):
        agreement_mode("sometimes")
    monkeypatch.setenv("FLASHCP_AGREEMENT_TIMEOUT_S", "-1")
    with pytest.raises(ValueError, match="FLASHCP_AGREEMENT_TIMEOUT_S"):
        agreement_timeout_s()
