"""Triton forward of causal segment attention (online softmax, fp32 accumulation, writes out and lse).

One program per (query block of a segment, query head). Key blocks entirely
below the block's first query position need no causal mask; the remaining
(diagonal) blocks are masked. Scores are kept in base 2 (``exp2``) and the
log-sum-exp is returned in natural log.
"""

from __future__ import annotations

import math

import torch
import triton.language as tl

from flashcp_kernels.blocks import query_blocks
from flashcp_kernels.meta import SegmentMeta
from flashcp_kernels.triton_common import (
    BlockConfig,
    block_d,
    device_context,
    dot_precision,
    jit_kernel,
    kernel_dtype,
    launch_with_fallback,
)

__all__ = ["segment_attention_forward_triton", "forward_configs"]

LOG2E = tl.constexpr(1.4426950408889634)
"""log2(e), usable inside kernels."""


def _fwd_kernel(
    Q, K, V, Out, Lse,
    QStart, QLen, QPos, KStart, Blocks,
    stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh, stride_ot, stride_oh, stride_lt, stride_lh,
    qk_scale_log2, num_groups, head_dim,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    pid = tl.program_id(0)
    head = tl.program_id(1)
    seg = tl.load(Blocks + 2 * pid)
    m0 = tl.load(Blocks + 2 * pid + 1)
    q_start = tl.load(QStart + seg)
    q_len = tl.load(QLen + seg)
    q_pos = tl.load(QPos + seg)
    k_start = tl.load(KStart + seg)
    kv_head = head // num_groups

    offs_m = m0 + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    mask_m = offs_m < q_len
    mask_d = offs_d < head_dim
    q_rows = (q_start + offs_m).to(tl.int64)
    q = tl.load(Q + q_rows[:, None] * stride_qt + head * stride_qh + offs_d[None, :],
                mask=mask_m[:, None] & mask_d[None, :], other=0.0)
    pos_m = q_pos + offs_m
    key_end = q_pos + tl.minimum(m0 + BLOCK_M, q_len)
    full_end = ((q_pos + m0) // BLOCK_N) * BLOCK_N

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    k_base = K + kv_head * stride_kh + offs_d[None, :]
    v_base = V + kv_head * stride_vh + offs_d[None, :]
    for n0 in range(0, full_end, BLOCK_N):
        k_rows = (k_start + n0 + offs_n).to(tl.int64)
        k = tl.load(k_base + k_rows[:, None] * stride_kt, mask=mask_d[None, :], other=0.0)
        v = tl.load(v_base + k_rows[:, None] * stride_vt, mask=mask_d[None, :], other=0.0)
        s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * qk_scale_log2
        m_new = tl.maximum(m_i, tl.max(s, 1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
        m_i = m_new
    for n0 in range(full_end, key_end, BLOCK_N):
        k_pos = n0 + offs_n
        mask_n = k_pos < key_end
        k_rows = (k_start + k_pos).to(tl.int64)
        kv_mask = mask_n[:, None] & mask_d[None, :]
        k = tl.load(k_base + k_rows[:, None] * stride_kt, mask=kv_mask, other=0.0)
        v = tl.load(v_base + k_rows[:, None] * stride_vt, mask=kv_mask, other=0.0)
        s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * qk_scale_log2
        s = tl.where((k_pos[None, :] <= pos_m[:, None]) & mask_n[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
        m_i = m_new

    acc = acc / l_i[:, None]
    lse = (m_i + tl.log2(l_i)) / LOG2E
    tl.store(Out + q_rows[:, None] * stride_ot + head * stride_oh + offs_d[None, :],
             acc.to(Out.dtype.element_ty), mask=mask_m[:, None] & mask_d[None, :])
    tl.store(Lse + q_rows * stride_lt + head * stride_lh, lse, mask=mask_m)


def forward_configs(head_dim: int, dtype: torch.dtype) -> list[BlockConfig]:
    """GPU tile configs to try in order (first that compiles wins)."""
    if dtype == torch.float32:
        return [BlockConfig(block_m=64, block_n=32, num_warps=4, num_stages=2),
                BlockConfig(block_m=32, block_n=16, num_warps=4, num_stages=1)]
    if head_dim <= 64:
        return [BlockConfig(block_m=128, block_n=64, num_warps=4, num_stages=3),
                BlockConfig(block_m=64, block_n=64, num_warps=4, num_stages=2)]
    return [BlockConfig(block_m=128, block_n=64, num_warps=8, num_stages=3),
            BlockConfig(block_m=64, block_n=64, num_warps=4, num_stages=2),
            BlockConfig(block_m=64, block_n=32, num_warps=4, num_stages=1)]


def segment_attention_forward_triton(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    meta: SegmentMeta,
    *,
    softmax_scale: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Triton forward; inputs already checked by the caller.

    Args:
        q: [Tq, H, D]; k, v: [Tk, Hkv, D]; meta on q's device.

    Returns:
        ``(out [Tq, H, D] q.dtype, lse [Tq, H] float32)``; rows of no segment: 0 and -inf.
    """
    num_heads, head_dim = q.shape[1], q.shape[2]
    assert num_heads % k.shape[1] == 0 and meta.device.type == q.device.type
    scale = 1.0 / math.sqrt(head_dim) if softmax_scale is None else float(softmax_scale)
    work_dtype = kernel_dtype(q.dtype)
    q_, k_, v_ = (t.to(work_dtype).contiguous() for t in (q, k, v))
    out = torch.zeros(q_.shape, dtype=work_dtype, device=q.device)
    lse = torch.full(q.shape[:2], float("-inf"), dtype=torch.float32, device=q.device)
    kernel = jit_kernel(_fwd_kernel)

    def launch(config: BlockConfig) -> None:
        blocks = query_blocks(meta, config.block_m)
        if blocks.shape[0] == 0:
            return
        kernel[(blocks.shape[0], num_heads)](
            q_, k_, v_, out, lse,
            meta.q_start, meta.q_len, meta.q_pos, meta.k_start, blocks,
            q_.stride(0), q_.stride(1), k_.stride(0), k_.stride(1), v_.stride(0), v_.stride(1),
            out.stride(0), out.stride(1), lse.stride(0), lse.stride(1),
            scale * math.log2(math.e), num_heads // k.shape[1], head_dim,
            DOT_PRECISION=dot_precision(work_dtype),
            BLOCK_M=config.block_m, BLOCK_N=config.block_n, BLOCK_D=block_d(head_dim),
            num_warps=config.num_warps, num_stages=config.num_stages,
        )

    with device_context(q):
        launch_with_fallback(("fwd", head_dim, q_.dtype), forward_configs(head_dim, q_.dtype), launch)
    return out.to(q.dtype), lse
