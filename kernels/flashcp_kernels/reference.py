"""Plain-torch segment attention (forward and explicit backward).

The reference for the Triton kernels and the ``backend="torch"`` path. Each
segment is computed separately with an explicit causal mask, in query chunks
sized so that one chunk's ``H x chunk x keys`` scores stay under
``_SCORE_ELEMENTS`` (at most ``_QUERY_CHUNK`` queries).
"""

from __future__ import annotations

import math

import torch

from flashcp_kernels.meta import SegmentMeta

__all__ = ["segment_attention_ref", "segment_attention_backward_ref", "check_inputs"]

_QUERY_CHUNK = 1024
_SCORE_ELEMENTS = 1 << 26


def check_inputs(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, meta: SegmentMeta) -> None:
    """Raise ValueError unless q [Tq,H,D], k/v [Tk,Hkv,D] and ``meta`` agree."""
    if q.dim() != 3 or k.dim() != 3 or v.dim() != 3:
        raise ValueError(f"q, k, v must be [tokens, heads, head_dim], got {tuple(q.shape)}, {tuple(k.shape)}, "
                         f"{tuple(v.shape)}")
    if k.shape != v.shape:
        raise ValueError(f"k and v must have the same shape, got {tuple(k.shape)} and {tuple(v.shape)}")
    if q.shape[2] != k.shape[2]:
        raise ValueError(f"q head_dim {q.shape[2]} != k head_dim {k.shape[2]}")
    if q.shape[1] % k.shape[1]:
        raise ValueError(f"query heads {q.shape[1]} must be a multiple of kv heads {k.shape[1]}")
    if not (q.dtype == k.dtype == v.dtype):
        raise ValueError(f"q, k, v must share a dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    if not (q.device == k.device == v.device):
        raise ValueError("q, k, v must be on one device")
    if meta.device != q.device:
        raise ValueError(f"meta tensors are on {meta.device}, q is on {q.device} (use meta.to(q.device))")
    meta.check_shapes(q.shape[0], k.shape[0])


def _scale(softmax_scale: float | None, head_dim: int) -> float:
    return 1.0 / math.sqrt(head_dim) if softmax_scale is None else float(softmax_scale)


def _segment_blocks(meta: SegmentMeta, num_heads: int):
    """Yield (q_row, num_q, first_key_row, num_keys, first_query_pos) per query chunk of every segment."""
    for qs, ql, qp, ks in meta.host:
        chunk = max(1, min(_QUERY_CHUNK, _SCORE_ELEMENTS // (num_heads * max(1, qp + ql))))
        for c in range(0, ql, chunk):
            n = min(chunk, ql - c)
            yield qs + c, n, ks, qp + c + n, qp + c


def _scores(q_blk: torch.Tensor, k_blk: torch.Tensor, first_pos: int, scale: float) -> torch.Tensor:
    """Masked scaled scores [H, n, K] of queries at positions first_pos.. against keys 0..K-1."""
    groups = q_blk.shape[1] // k_blk.shape[1]
    k_rep = k_blk.repeat_interleave(groups, dim=1)
    s = torch.einsum("qhd,khd->hqk", q_blk, k_rep) * scale
    q_positions = torch.arange(q_blk.shape[0], device=q_blk.device) + first_pos
    k_positions = torch.arange(k_blk.shape[0], device=q_blk.device)
    return s.masked_fill(k_positions[None, None, :] > q_positions[None, :, None], float("-inf"))


def segment_attention_ref(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    meta: SegmentMeta,
    *,
    softmax_scale: float | None = None,
    upcast: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Causal attention of every segment, one at a time, in plain torch.

    Args:
        q: [Tq, H, D] queries.
        k: [Tk, Hkv, D] keys (``H % Hkv == 0``).
        v: [Tk, Hkv, D] values.
        meta: the segments (see :class:`SegmentMeta`).
        softmax_scale: defaults to ``1/sqrt(D)``.
        upcast: compute in float32 (True) or in the input dtype (False, a
            low-precision reference for the 2x error rule).

    Returns:
        ``(out [Tq, H, D] in q.dtype, lse [Tq, H] float32)``; rows of no
        segment get out 0 and lse -inf.
    """
    check_inputs(q, k, v, meta)
    scale = _scale(softmax_scale, q.shape[2])
    compute = torch.float32 if upcast else q.dtype
    out = torch.zeros(q.shape, dtype=compute, device=q.device)
    lse = torch.full(q.shape[:2], float("-inf"), dtype=torch.float32, device=q.device)
    for q_row, n, k_row, num_keys, first_pos in _segment_blocks(meta, q.shape[1]):
        q_blk = q[q_row:q_row + n].to(compute)
        k_blk = k[k_row:k_row + num_keys].to(compute)
        v_blk = v[k_row:k_row + num_keys].to(compute)
        groups = q.shape[1] // k.shape[1]
        s = _scores(q_blk, k_blk, first_pos, scale)
        lse_blk = torch.logsumexp(s.float(), dim=-1)  # [H, n]
        p = torch.softmax(s, dim=-1)
        out[q_row:q_row + n] = torch.einsum("hqk,khd->qhd", p, v_blk.repeat_interleave(groups, dim=1))
        lse[q_row:q_row + n] = lse_blk.transpose(0, 1)
    return out.to(q.dtype), lse


def segment_attention_backward_ref(
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
    """Explicit backward of :func:`segment_attention_ref` in float32 (FA2 formulas).

    ``P = exp(S - lse)``, ``dV = P^T dO``, ``dS = P * (dO V^T - rowsum(dO * O))``,
    ``dQ = scale dS K``, ``dK = scale dS^T Q``; dK/dV of a key row are summed
    over every segment that reads it and over the query heads of its group.

    Returns:
        ``(dq [Tq, H, D], dk [Tk, Hkv, D], dv [Tk, Hkv, D])`` in the input dtype.
    """
    check_inputs(q, k, v, meta)
    scale = _scale(softmax_scale, q.shape[2])
    num_kv_heads = k.shape[1]
    groups = q.shape[1] // num_kv_heads
    dq = torch.zeros(q.shape, dtype=torch.float32, device=q.device)
    dk = torch.zeros(k.shape, dtype=torch.float32, device=q.device)
    dv = torch.zeros(v.shape, dtype=torch.float32, device=q.device)
    delta = (dout.float() * out.float()).sum(-1)  # [Tq, H]
    for q_row, n, k_row, num_keys, first_pos in _segment_blocks(meta, q.shape[1]):
        q_blk = q[q_row:q_row + n].float()
        do_blk = dout[q_row:q_row + n].float()
        k_blk = k[k_row:k_row + num_keys].float()
        v_blk = v[k_row:k_row + num_keys].float()
        s = _scores(q_blk, k_blk, first_pos, scale)  # [H, n, K]
        p = torch.exp(s - lse[q_row:q_row + n].transpose(0, 1)[:, :, None])
        v_rep = v_blk.repeat_interleave(groups, dim=1)
        k_rep = k_blk.repeat_interleave(groups, dim=1)
        dp = torch.einsum("qhd,khd->hqk", do_blk, v_rep)
        ds = p * (dp - delta[q_row:q_row + n].transpose(0, 1)[:, :, None])
        dq[q_row:q_row + n] += torch.einsum("hqk,khd->qhd", ds, k_rep) * scale
        dk_heads = torch.einsum("hqk,qhd->khd", ds, q_blk) * scale  # [K, H, D]
        dv_heads = torch.einsum("hqk,qhd->khd", p, do_blk)
        dk[k_row:k_row + num_keys] += dk_heads.view(num_keys, num_kv_heads, groups, -1).sum(2)
        dv[k_row:k_row + num_keys] += dv_heads.view(num_keys, num_kv_heads, groups, -1).sum(2)
    return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype)
