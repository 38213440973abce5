"""Torch backend (plain reference + explicit backward) against torch SDPA over the packed sequence."""

from __future__ import annotations

import pytest
import torch
from kernel_cases import make_qkv, run_all_ranks, sdpa_packed

from flashcp_kernels import (
    SegmentMeta,
    segment_attention,
    segment_attention_backward,
    segment_attention_forward,
    segment_attention_ref,
)

# Documents of length 1, lengths not divisible by 2N, docs shorter than 2N (empty chunks), long ones.
DOC_SETS = {
    "mixed": [1, 13, 5, 22, 1, 9],
    "ones": [1, 1, 1],
    "odd": [7, 11, 3, 17],
}
# fp32 vs fp32: both are exact up to summation order.
ATOL = 2e-5


def _grads(q, k, v, out, g):
    q.grad = k.grad = v.grad = None
    (out * g).sum().backward()
    return q.grad.clone(), k.grad.clone(), v.grad.clone()


@pytest.mark.parametrize("heads", [(4, 4), (4, 2), (4, 1)], ids=["mha", "gqa2", "mqa"])
@pytest.mark.parametrize("docs", list(DOC_SETS), ids=list(DOC_SETS))
@pytest.mark.parametrize("cp_size", [2, 3])
def test_torch_backend_matches_sdpa(heads, docs, cp_size):
    doc_lengths = DOC_SETS[docs]
    num_heads, num_kv_heads = heads
    q, k, v = make_qkv(sum(doc_lengths), num_heads, num_kv_heads, 16, seed=cp_size)
    g = torch.randn(q.shape, generator=torch.Generator().manual_seed(7))

    ref = sdpa_packed(q, k, v, doc_lengths)
    ref_grads = _grads(q, k, v, ref, g)

    def attention(ql, kw, vw, meta):
        return segment_attention(ql, kw, vw, meta, backend="torch")

    out = run_all_ranks(q, k, v, doc_lengths, cp_size, attention, whole_below=6)
    grads = _grads(q, k, v, out, g)
    torch.testing.assert_close(out, ref, atol=ATOL, rtol=0)
    for name, got, want in zip("qkv", grads, ref_grads, strict=True):
        torch.testing.assert_close(got, want, atol=ATOL, rtol=0, msg=f"d{name}")


def test_junk_workspace_rows_get_zero_gradient():
    doc_lengths = [9, 14, 1, 6]
    q, k, v = make_qkv(sum(doc_lengths), 2, 1, 8, seed=3)
    junk = torch.randn(2, 1, 8).requires_grad_()

    def attention(ql, kw, vw, meta):
        return segment_attention(ql, kw, vw, meta, backend="torch")

    out = run_all_ranks(q, k, v, doc_lengths, 2, attention, whole_below=4, junk=junk)
    out.sum().backward()
    assert junk.grad is not None and torch.count_nonzero(junk.grad) == 0
    torch.testing.assert_close(out, sdpa_packed(q, k, v, doc_lengths), atol=ATOL, rtol=0)


def test_lse_matches_logsumexp_of_masked_scores():
    # One segment at positions 3..6 of a 7-token document, keys at workspace row 2.
    meta = SegmentMeta.from_lists([0], [4], [3], [2])
    gen = torch.Generator().manual_seed(0)
    q = torch.randn(4, 2, 8, generator=gen)
    k, v = torch.randn(9, 1, 8, generator=gen), torch.randn(9, 1, 8, generator=gen)
    out, lse = segment_attention_ref(q, k, v, meta, softmax_scale=0.5)
    for i in range(4):
        scores = torch.einsum("hd,kd->hk", q[i], k[2:2 + 3 + i + 1, 0]) * 0.5
        torch.testing.assert_close(lse[i], torch.logsumexp(scores, -1))
        torch.testing.assert_close(out[i], torch.softmax(scores, -1) @ v[2:2 + 3 + i + 1, 0])


def test_uncovered_rows_are_zero_with_minus_inf_lse():
    meta = SegmentMeta.from_lists([1], [2], [0], [0])
    q, k, v = torch.randn(4, 1, 8), torch.randn(2, 1, 8), torch.randn(2, 1, 8)
    out, lse = segment_attention_forward(q, k, v, meta, backend="torch")
    assert torch.all(out[[0, 3]] == 0) and torch.all(torch.isneginf(lse[[0, 3]]))
    dq, dk, dv = segment_attention_backward(torch.ones_like(out), q, k, v, out, lse, meta, backend="torch")
    assert torch.all(dq[[0, 3]] == 0)


def test_softmax_scale_and_dtype_preserved():
    doc_lengths = [5, 12]
    q, k, v = make_qkv(sum(doc_lengths), 2, 2, 8, dtype=torch.float64)
    out = run_all_ranks(q, k, v, doc_lengths, 2,
                        lambda ql, kw, vw, m: segment_attention(ql, kw, vw, m, softmax_scale=0.3, backend="torch"))
    assert out.dtype == torch.float64
    torch.testing.assert_close(out, sdpa_packed(q, k, v, doc_lengths, softmax_scale=0.3), atol=1e-6, rtol=0)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        (dict(q_start=[0], q_len=[-1], q_pos=[0], k_start=[0]), ">= 0"),
        (dict(q_start=[0, 1], q_len=[1], q_pos=[0], k_start=[0]), "equal lengths"),
        (dict(q_start=[0, 3], q_len=[4, 2], q_pos=[0, 0], k_start=[0, 9]), "segments 0 and 1: query rows overlap"),
    ],
)
def test_meta_rejects_bad_lists(kwargs, match):
    with pytest.raises(ValueError, match=match):
        SegmentMeta.from_lists(**kwargs)


def test_bad_inputs_raise_value_error():
    meta = SegmentMeta.from_lists([0], [4], [0], [0])
    q, k = torch.randn(4, 4, 8), torch.randn(4, 3, 8)
    with pytest.raises(ValueError, match="multiple of kv heads"):
        segment_attention_forward(q, k, k, meta, backend="torch")
    with pytest.raises(ValueError, match="key rows"):
        segment_attention_forward(q, torch.randn(3, 2, 8), torch.randn(3, 2, 8), meta, backend="torch")
    with pytest.raises(ValueError, match="backend"):
        segment_attention_forward(q, q, q, meta, backend="cuda")
    with pytest.raises(ValueError, match="dtype"):
        segment_attention_forward(q, q.double(), q.double(), meta, backend="torch")


def test_query_chunking_matches_sdpa(monkeypatch):
    from flashcp_kernels import reference

    monkeypatch.setattr(reference, "_SCORE_ELEMENTS", 40)  # a few queries per chunk
    doc_lengths = [3, 29, 11]
    q, k, v = make_qkv(sum(doc_lengths), 4, 2, 8, seed=11)
    g = torch.randn(q.shape, generator=torch.Generator().manual_seed(12))
    ref_grads = _grads(q, k, v, sdpa_packed(q, k, v, doc_lengths), g)
    out = run_all_ranks(q, k, v, doc_lengths, 2, lambda *a: segment_attention(*a, backend="torch"), whole_below=4)
    for got, want in zip(_grads(q, k, v, out, g), ref_grads, strict=True):
        torch.testing.assert_close(got, want, atol=ATOL, rtol=0)
    torch.testing.assert_close(out, sdpa_packed(q, k, v, doc_lengths), atol=ATOL, rtol=0)
