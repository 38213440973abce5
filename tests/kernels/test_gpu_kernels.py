"""Full-size Triton kernels on a CUDA GPU (skipped without one): fp16/bf16, head dims 64 and 128, GQA.

2x rule: the kernel's error against SDPA on fp32-upcast inputs must be at most
twice the error of torch SDPA run in the same low precision (plus a small floor).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from kernel_cases import make_qkv, run_all_ranks, sdpa_packed

from flashcp_kernels import SegmentMeta, segment_attention, segment_attention_forward

pytestmark = pytest.mark.gpu


def _out_and_grads(q, k, v, out, g):
    q.grad = k.grad = v.grad = None
    (out.float() * g).sum().backward()
    return [out.detach().float(), q.grad.float(), k.grad.float(), v.grad.float()]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("head_dim", [64, 128])
def test_gpu_kernels_two_x_rule_against_sdpa(dtype, head_dim):
    docs = [1, 127, 1000, 2049, 3, 513, 64]
    q32, k32, v32 = make_qkv(sum(docs), 16, 4, head_dim, device="cuda", seed=head_dim)
    g = torch.randn(q32.shape, device="cuda")
    q_lo, k_lo, v_lo = (t.detach().to(dtype).requires_grad_() for t in (q32, k32, v32))
    q_up, k_up, v_up = (t.detach().float().requires_grad_() for t in (q_lo, k_lo, v_lo))
    ref = _out_and_grads(q_up, k_up, v_up, sdpa_packed(q_up, k_up, v_up, docs), g)
    low = _out_and_grads(q_lo, k_lo, v_lo, sdpa_packed(q_lo, k_lo, v_lo, docs), g)

    def attention(ql, kw, vw, meta):
        return segment_attention(ql, kw, vw, meta, backend="triton")

    got = _out_and_grads(q_lo, k_lo, v_lo, run_all_ranks(q_lo, k_lo, v_lo, docs, 4, attention, whole_below=200), g)
    for name, a, lo, r in zip(["out", "dq", "dk", "dv"], got, low, ref, strict=True):
        kernel_err = (a - r).abs().max().item()
        torch_err = (lo - r).abs().max().item()
        assert kernel_err <= 2 * torch_err + 1e-3, f"{name}: kernel {kernel_err:.2e} vs torch {torch_err:.2e}"


@pytest.mark.parametrize("head_dim", [64, 128])
def test_gpu_long_document_forward_matches_causal_sdpa(head_dim):
    length = 16384
    gen = torch.Generator(device="cuda").manual_seed(0)
    q = torch.randn(length, 32, head_dim, device="cuda", generator=gen, dtype=torch.bfloat16)
    k = torch.randn(length, 8, head_dim, device="cuda", generator=gen, dtype=torch.bfloat16)
    v = torch.randn(length, 8, head_dim, device="cuda", generator=gen, dtype=torch.bfloat16)
    # Two head-tail chunks of one document on this rank, keys of the whole document.
    half = length // 4
    meta = SegmentMeta.from_lists([0, half], [half, half], [0, length - half], [0, 0], device="cuda")
    rows = torch.cat([torch.arange(half), torch.arange(length - half, length)]).cuda()
    out, lse = segment_attention_forward(q[rows], k, v, meta, backend="triton")

    def sdpa(dt):
        o = F.scaled_dot_product_attention(q.to(dt).transpose(0, 1)[None], k.to(dt).transpose(0, 1)[None],
                                           v.to(dt).transpose(0, 1)[None], is_causal=True, enable_gqa=True)
        return o[0].transpose(0, 1)[rows].float()

    ref, low = sdpa(torch.float32), sdpa(torch.bfloat16)
    assert (out.float() - ref).abs().max() <= 2 * (low - ref).abs().max() + 1e-3
    assert torch.isfinite(lse).all()
