"""Triton kernels (interpreter on CPU) against torch SDPA with a block-diagonal causal mask and the torch reference.

Tolerances: fp32 kernels vs fp32 SDPA differ only by summation order and exp2
vs exp, so 1e-4 absolute. fp16 follows the 2x rule: the kernel's error against
SDPA on fp32-upcast inputs must be at most twice SDPA-in-fp16's error (plus a
small floor for outputs where both errors are tiny).
"""

from __future__ import annotations

import pytest
import torch
from kernel_cases import make_qkv, run_all_ranks, sdpa_packed

from flashcp_kernels import (
    SegmentMeta,
    resolve_backend,
    segment_attention,
    segment_attention_backward,
    segment_attention_forward,
    segment_attention_ref,
)
from flashcp_kernels.reference import segment_attention_backward_ref

FP32_ATOL = 1e-4
DOCS = [1, 13, 5, 37, 1]  # length-1 docs, lengths not divisible by 2N, a doc spanning several 16-blocks


def _out_and_grads(q, k, v, out, g):
    q.grad = k.grad = v.grad = None
    (out.float() * g).sum().backward()
    return [out.detach().float(), q.grad.float(), k.grad.float(), v.grad.float()]


def _triton(ql, kw, vw, meta, **kwargs):
    return segment_attention(ql, kw, vw, meta, backend="triton", **kwargs)


# Heads kept small: the interpreter's cost grows with programs = blocks x heads.
@pytest.mark.parametrize("heads", [(2, 2), (4, 2), (2, 1)], ids=["mha", "gqa", "mqa"])
def test_triton_matches_sdpa_fp32(heads):
    q, k, v = make_qkv(sum(DOCS), *heads, 16, seed=1)
    g = torch.randn(q.shape, generator=torch.Generator().manual_seed(2))
    want = _out_and_grads(q, k, v, sdpa_packed(q, k, v, DOCS), g)
    got = _out_and_grads(q, k, v, run_all_ranks(q, k, v, DOCS, 2, _triton, whole_below=6), g)
    for name, a, b in zip(["out", "dq", "dk", "dv"], got, want, strict=True):
        torch.testing.assert_close(a, b, atol=FP32_ATOL, rtol=0, msg=name)


def test_triton_matches_sdpa_three_ranks_odd_head_dim_and_scale():
    docs = [7, 1, 23, 3, 17]
    q, k, v = make_qkv(sum(docs), 2, 1, 24, seed=3)  # head_dim 24: BLOCK_D 32 with masking
    g = torch.randn(q.shape, generator=torch.Generator().manual_seed(4))
    want = _out_and_grads(q, k, v, sdpa_packed(q, k, v, docs, softmax_scale=0.37), g)
    got = _out_and_grads(q, k, v, run_all_ranks(q, k, v, docs, 3,
                                                lambda *a: _triton(*a, softmax_scale=0.37), whole_below=5), g)
    for name, a, b in zip(["out", "dq", "dk", "dv"], got, want, strict=True):
        torch.testing.assert_close(a, b, atol=FP32_ATOL, rtol=0, msg=name)


def test_triton_fp16_two_x_rule_against_sdpa():
    docs = [1, 30, 6, 19]
    q32, k32, v32 = make_qkv(sum(docs), 2, 1, 32, seed=5)
    g = torch.randn(q32.shape, generator=torch.Generator().manual_seed(6))
    q16, k16, v16 = (t.detach().half().requires_grad_() for t in (q32, k32, v32))
    q_up, k_up, v_up = (t.detach().float().requires_grad_() for t in (q16, k16, v16))
    ref = _out_and_grads(q_up, k_up, v_up, sdpa_packed(q_up, k_up, v_up, docs), g)
    low = _out_and_grads(q16, k16, v16, sdpa_packed(q16, k16, v16, docs), g)
    got = _out_and_grads(q16, k16, v16, run_all_ranks(q16, k16, v16, docs, 2, _triton, whole_below=4), g)
    assert got[0].dtype == torch.float32  # compared in fp32; the kernel returned fp16
    for name, a, lo, r in zip(["out", "dq", "dk", "dv"], got, low, ref, strict=True):
        kernel_err = (a - r).abs().max().item()
        torch_err = (lo - r).abs().max().item()
        assert kernel_err <= 2 * torch_err + 1e-3, f"{name}: kernel {kernel_err:.2e} vs torch fp16 {torch_err:.2e}"


def _random_case(seed, *, num_heads=2, num_kv_heads=1, head_dim=16, dtype=torch.float32):
    # Two documents: doc A (length 37) has three segments on this rank, sharing key rows 0..36;
    # doc B (length 20) is whole, its keys at rows 40..59 after 3 junk rows; query rows 5, 6, 52 uncovered.
    meta = SegmentMeta.from_lists(q_start=[0, 7, 18, 38], q_len=[5, 11, 20, 14], q_pos=[0, 12, 0, 23],
                                  k_start=[0, 0, 40, 0])
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(53, num_heads, head_dim, generator=gen).to(dtype)
    k = torch.randn(60, num_kv_heads, head_dim, generator=gen).to(dtype)
    v = torch.randn(60, num_kv_heads, head_dim, generator=gen).to(dtype)
    return q, k, v, meta


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_triton_equals_reference_with_shared_keys_and_uncovered_rows(dtype):
    q, k, v, meta = _random_case(7, dtype=dtype)
    out, lse = segment_attention_forward(q, k, v, meta, backend="triton")
    out_ref, lse_ref = segment_attention_ref(q, k, v, meta)
    assert out.dtype == dtype and lse.dtype == torch.float32
    uncovered = [5, 6, 52]
    assert torch.all(out[uncovered] == 0) and torch.all(torch.isneginf(lse[uncovered]))
    covered = [i for i in range(53) if i not in uncovered]
    atol = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}[dtype]
    torch.testing.assert_close(out.float(), out_ref.float(), atol=atol, rtol=0)
    torch.testing.assert_close(lse[covered], lse_ref[covered], atol=1e-4, rtol=0)

    dout = torch.randn(q.shape, generator=torch.Generator().manual_seed(8)).to(dtype)
    grads = segment_attention_backward(dout, q, k, v, out_ref, lse_ref, meta, backend="triton")
    grads_ref = segment_attention_backward_ref(dout, q, k, v, out_ref, lse_ref, meta)
    for name, a, b in zip(["dq", "dk", "dv"], grads, grads_ref, strict=True):
        assert a.dtype == dtype
        torch.testing.assert_close(a.float(), b.float(), atol=5 * atol, rtol=0, msg=name)
    assert torch.all(grads[1][37:40] == 0) and torch.all(grads[2][37:40] == 0)  # junk key rows


def test_triton_overlapping_key_ranges_of_different_documents():
    # Not produced by plans, but allowed by SegmentMeta: two segments read overlapping rows
    # at different positions (k_start 0 and 5). dK/dV must still sum both.
    meta = SegmentMeta.from_lists(q_start=[0, 18], q_len=[18, 21], q_pos=[0, 0], k_start=[0, 5])
    gen = torch.Generator().manual_seed(9)
    q = torch.randn(39, 2, 16, generator=gen)
    k, v = torch.randn(26, 2, 16, generator=gen), torch.randn(26, 2, 16, generator=gen)
    out, lse = segment_attention_forward(q, k, v, meta, backend="triton")
    out_ref, lse_ref = segment_attention_ref(q, k, v, meta)
    torch.testing.assert_close(out, out_ref, atol=1e-5, rtol=0)
    dout = torch.randn(q.shape, generator=gen)
    grads = segment_attention_backward(dout, q, k, v, out, lse, meta, backend="triton")
    for a, b in zip(grads, segment_attention_backward_ref(dout, q, k, v, out_ref, lse_ref, meta), strict=True):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=0)


def test_auto_backend_uses_the_interpreter_here():
    from flashcp_kernels import triton_common

    q = torch.zeros(1, 1, 16)
    assert resolve_backend("auto", q) == "triton"
    segment_attention_forward(q, q, q, SegmentMeta.from_lists([0], [1], [0], [0]))
    interpreted = [fn for (_, interp), fn in triton_common._JIT_CACHE.items() if interp]
    assert interpreted and all(type(fn).__name__ == "InterpretedFunction" for fn in interpreted)


def test_empty_meta_and_unsupported_dtype():
    q = torch.randn(3, 2, 16)
    out, lse = segment_attention_forward(q, q, q, SegmentMeta.from_lists([], [], [], []), backend="triton")
    assert torch.all(out == 0) and torch.all(torch.isneginf(lse))
    with pytest.raises(ValueError, match="supports float16"):
        segment_attention_forward(q.double(), q.double(), q.double(), SegmentMeta.from_lists([0], [1], [0], [0]),
                                  backend="triton")
