"""Triton backward of causal segment attention (FlashAttention-2 style).

* ``delta = rowsum(dout * out)`` (torch, float32).
* dK/dV: one program per (key block of a key group, kv head); it loops over the
  query heads of its GQA group and over every segment of the key group (all
  chunks of one document on this rank), so a key row read by several segments
  and several query heads is summed in registers, without atomics.
* dQ: one program per (query block of a segment, query head), iterating the
  segment's key blocks like the forward.
Probabilities are recomputed from the forward log-sum-exp.
"""

from __future__ import annotations

import math

import torch
import triton.language as tl

from flashcp_kernels.blocks import key_blocks, query_blocks
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

__all__ = ["segment_attention_backward_triton", "backward_configs"]

LOG2E = tl.constexpr(1.4426950408889634)
"""log2(e), usable inside kernels."""


def _bwd_dkdv_kernel(
    Q, K, V, DO, Lse, Delta, DK, DV,
    QStart, QLen, QPos, KStart, Blocks, GroupPtr, GroupSegments, GroupEnd,
    stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh, stride_dot, stride_doh,
    stride_lt, stride_lh, stride_dkt, stride_dkh, stride_dvt, stride_dvh,
    qk_scale_log2, softmax_scale, num_groups, head_dim,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    pid = tl.program_id(0)
    kv_head = tl.program_id(1)
    group = tl.load(Blocks + 2 * pid)
    n0 = tl.load(Blocks + 2 * pid + 1)
    group_end = tl.load(GroupEnd + group)
    seg_lo = tl.load(GroupPtr + group)
    seg_hi = tl.load(GroupPtr + group + 1)

    offs_m = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    mask_d = offs_d < head_dim
    k_rows = n0 + tl.arange(0, BLOCK_N)
    mask_n = k_rows < group_end
    kv_mask = mask_n[:, None] & mask_d[None, :]
    k_rows64 = k_rows.to(tl.int64)
    k = tl.load(K + k_rows64[:, None] * stride_kt + kv_head * stride_kh + offs_d[None, :], mask=kv_mask, other=0.0)
    v = tl.load(V + k_rows64[:, None] * stride_vt + kv_head * stride_vh + offs_d[None, :], mask=kv_mask, other=0.0)
    dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)

    for i in range(seg_lo, seg_hi):
        seg = tl.load(GroupSegments + i)
        q_start = tl.load(QStart + seg)
        q_len = tl.load(QLen + seg)
        q_pos = tl.load(QPos + seg)
        k_pos = k_rows - tl.load(KStart + seg)  # document positions of this block's keys
        # query offset j sees key position p iff p <= q_pos + j: start at the first block with such a j
        m_first = (tl.maximum(n0 - tl.load(KStart + seg) - q_pos, 0) // BLOCK_M) * BLOCK_M
        for head_in_group in range(0, num_groups):
            head = kv_head * num_groups + head_in_group
            for m0 in range(m_first, q_len, BLOCK_M):
                offs = m0 + offs_m
                mask_m = offs < q_len
                q_rows = (q_start + offs).to(tl.int64)
                q_mask = mask_m[:, None] & mask_d[None, :]
                q = tl.load(Q + q_rows[:, None] * stride_qt + head * stride_qh + offs_d[None, :],
                            mask=q_mask, other=0.0)
                do = tl.load(DO + q_rows[:, None] * stride_dot + head * stride_doh + offs_d[None, :],
                             mask=q_mask, other=0.0)
                lse2 = tl.load(Lse + q_rows * stride_lt + head * stride_lh, mask=mask_m, other=0.0) * LOG2E
                delta = tl.load(Delta + q_rows * stride_lt + head * stride_lh, mask=mask_m, other=0.0)
                s_t = tl.dot(k, tl.trans(q), input_precision=DOT_PRECISION) * qk_scale_log2  # [BLOCK_N, BLOCK_M]
                visible = ((k_pos[:, None] >= 0) & (k_pos[:, None] <= q_pos + offs[None, :])
                           & mask_m[None, :] & mask_n[:, None])
                p_t = tl.where(visible, tl.exp2(s_t - lse2[None, :]), 0.0)
                dv += tl.dot(p_t.to(do.dtype), do, input_precision=DOT_PRECISION)
                dp_t = tl.dot(v, tl.trans(do), input_precision=DOT_PRECISION)
                ds_t = p_t * (dp_t - delta[None, :])
                dk += tl.dot(ds_t.to(q.dtype), q, input_precision=DOT_PRECISION)

    dk = dk * softmax_scale
    tl.store(DK + k_rows64[:, None] * stride_dkt + kv_head * stride_dkh + offs_d[None, :],
             dk.to(DK.dtype.element_ty), mask=kv_mask)
    tl.store(DV + k_rows64[:, None] * stride_dvt + kv_head * stride_dvh + offs_d[None, :],
             dv.to(DV.dtype.element_ty), mask=kv_mask)


def _bwd_dq_kernel(
    Q, K, V, DO, Lse, Delta, DQ,
    QStart, QLen, QPos, KStart, Blocks,
    stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh, stride_dot, stride_doh,
    stride_lt, stride_lh, stride_dqt, stride_dqh,
    qk_scale_log2, softmax_scale, num_groups, head_dim,
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
    q_mask = mask_m[:, None] & mask_d[None, :]
    q_rows = (q_start + offs_m).to(tl.int64)
    q = tl.load(Q + q_rows[:, None] * stride_qt + head * stride_qh + offs_d[None, :], mask=q_mask, other=0.0)
    do = tl.load(DO + q_rows[:, None] * stride_dot + head * stride_doh + offs_d[None, :], mask=q_mask, other=0.0)
    lse2 = tl.load(Lse + q_rows * stride_lt + head * stride_lh, mask=mask_m, other=0.0) * LOG2E
    delta = tl.load(Delta + q_rows * stride_lt + head * stride_lh, mask=mask_m, other=0.0)
    pos_m = q_pos + offs_m
    key_end = q_pos + tl.minimum(m0 + BLOCK_M, q_len)
    full_end = ((q_pos + m0) // BLOCK_N) * BLOCK_N

    dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    k_base = K + kv_head * stride_kh + offs_d[None, :]
    v_base = V + kv_head * stride_vh + offs_d[None, :]
    for n0 in range(0, full_end, BLOCK_N):
        k_rows = (k_start + n0 + offs_n).to(tl.int64)
        k = tl.load(k_base + k_rows[:, None] * stride_kt, mask=mask_d[None, :], other=0.0)
        v = tl.load(v_base + k_rows[:, None] * stride_vt, mask=mask_d[None, :], other=0.0)
        p = tl.exp2(tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * qk_scale_log2 - lse2[:, None])
        dp = tl.dot(do, tl.trans(v), input_precision=DOT_PRECISION)
        ds = p * (dp - delta[:, None])
        dq += tl.dot(ds.to(k.dtype), k, input_precision=DOT_PRECISION)
    for n0 in range(full_end, key_end, BLOCK_N):
        k_pos = n0 + offs_n
        mask_n = k_pos < key_end
        k_rows = (k_start + k_pos).to(tl.int64)
        kv_mask = mask_n[:, None] & mask_d[None, :]
        k = tl.load(k_base + k_rows[:, None] * stride_kt, mask=kv_mask, other=0.0)
        v = tl.load(v_base + k_rows[:, None] * stride_vt, mask=kv_mask, other=0.0)
        visible = (k_pos[None, :] <= pos_m[:, None]) & mask_n[None, :] & mask_m[:, None]
        s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * qk_scale_log2
        p = tl.where(visible, tl.exp2(s - lse2[:, None]), 0.0)
        dp = tl.dot(do, tl.trans(v), input_precision=DOT_PRECISION)
        ds = p * (dp - delta[:, None])
        dq += tl.dot(ds.to(k.dtype), k, input_precision=DOT_PRECISION)

    dq = dq * softmax_scale
    tl.store(DQ + q_rows[:, None] * stride_dqt + head * stride_dqh + offs_d[None, :],
             dq.to(DQ.dtype.element_ty), mask=q_mask)


def backward_configs(kind: str, head_dim: int, dtype: torch.dtype) -> list[BlockConfig]:
    """GPU tile configs of the ``"dkdv"`` or ``"dq"`` kernel, tried in order."""
    if dtype == torch.float32:
        return [BlockConfig(block_m=32, block_n=32, num_warps=4, num_stages=1),
                BlockConfig(block_m=16, block_n=16, num_warps=4, num_stages=1)]
    warps = 4 if head_dim <= 64 else 8
    if kind == "dkdv":
        return [BlockConfig(block_m=32, block_n=128 if head_dim <= 64 else 64, num_warps=warps, num_stages=3),
                BlockConfig(block_m=32, block_n=64, num_warps=4, num_stages=2),
                BlockConfig(block_m=16, block_n=32, num_warps=4, num_stages=1)]
    return [BlockConfig(block_m=128 if head_dim <= 64 else 64, block_n=32, num_warps=warps, num_stages=3),
            BlockConfig(block_m=64, block_n=32, num_warps=4, num_stages=2),
            BlockConfig(block_m=32, block_n=16, num_warps=4, num_stages=1)]


def segment_attention_backward_triton(
    dout: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor,
    meta: SegmentMeta,
    *,
    softmax_scale: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Triton backward; inputs already checked by the caller.

    Args:
        dout, q, out: [Tq, H, D]; k, v: [Tk, Hkv, D]; lse: [Tq, H] float32.

    Returns:
        ``(dq, dk, dv)`` in the input dtype; rows no segment touches get 0.
    """
    num_heads, num_kv_heads, head_dim = q.shape[1], k.shape[1], q.shape[2]
    assert num_heads % num_kv_heads == 0 and lse.dtype == torch.float32
    scale = 1.0 / math.sqrt(head_dim) if softmax_scale is None else float(softmax_scale)
    work_dtype = kernel_dtype(q.dtype)
    q_, k_, v_, do_ = (t.to(work_dtype).contiguous() for t in (q, k, v, dout))
    lse_ = lse.contiguous()
    delta = (dout.float() * out.float()).sum(-1).contiguous()
    dq = torch.zeros(q_.shape, dtype=work_dtype, device=q.device)
    dk = torch.zeros(k_.shape, dtype=work_dtype, device=q.device)
    dv = torch.zeros(v_.shape, dtype=work_dtype, device=q.device)
    groups = num_heads // num_kv_heads
    bd = block_d(head_dim)
    dkdv_kernel = jit_kernel(_bwd_dkdv_kernel)
    dq_kernel = jit_kernel(_bwd_dq_kernel)

    def launch_dkdv(config: BlockConfig) -> None:
        table = key_blocks(meta, config.block_n)
        if table.blocks.shape[0] == 0:
            return
        dkdv_kernel[(table.blocks.shape[0], num_kv_heads)](
            q_, k_, v_, do_, lse_, delta, dk, dv,
            meta.q_start, meta.q_len, meta.q_pos, meta.k_start,
            table.blocks, table.group_ptr, table.group_segments, table.group_end,
            q_.stride(0), q_.stride(1), k_.stride(0), k_.stride(1), v_.stride(0), v_.stride(1),
            do_.stride(0), do_.stride(1), lse_.stride(0), lse_.stride(1),
            dk.stride(0), dk.stride(1), dv.stride(0), dv.stride(1),
            scale * math.log2(math.e), scale, groups, head_dim,
            DOT_PRECISION=dot_precision(work_dtype),
            BLOCK_M=config.block_m, BLOCK_N=config.block_n, BLOCK_D=bd,
            num_warps=config.num_warps, num_stages=config.num_stages,
        )

    def launch_dq(config: BlockConfig) -> None:
        blocks = query_blocks(meta, config.block_m)
        if blocks.shape[0] == 0:
            return
        dq_kernel[(blocks.shape[0], num_heads)](
            q_, k_, v_, do_, lse_, delta, dq,
            meta.q_start, meta.q_len, meta.q_pos, meta.k_start, blocks,
            q_.stride(0), q_.stride(1), k_.stride(0), k_.stride(1), v_.stride(0), v_.stride(1),
            do_.stride(0), do_.stride(1), lse_.stride(0), lse_.stride(1), dq.stride(0), dq.stride(1),
            scale * math.log2(math.e), scale, groups, head_dim,
            DOT_PRECISION=dot_precision(work_dtype),
            BLOCK_M=config.block_m, BLOCK_N=config.block_n, BLOCK_D=bd,
            num_warps=config.num_warps, num_stages=config.num_stages,
        )

    with device_context(q):
        for kind, launch in (("dkdv", launch_dkdv), ("dq", launch_dq)):
            launch_with_fallback((kind, head_dim, work_dtype), backward_configs(kind, head_dim, work_dtype), launch)
    return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype)
