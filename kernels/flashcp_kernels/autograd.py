"""Backend dispatch and the autograd function of segment attention."""

from __future__ import annotations

from typing import Any

import torch

from flashcp_kernels.env import triton_interpret
from flashcp_kernels.meta import SegmentMeta
from flashcp_kernels.reference import check_inputs, segment_attention_backward_ref, segment_attention_ref

__all__ = ["resolve_backend", "segment_attention_forward", "segment_attention_backward", "segment_attention"]

_BACKENDS = ("auto", "triton", "torch")


def resolve_backend(backend: str, q: torch.Tensor) -> str:
    """``"auto"`` -> ``"triton"`` when q is on CUDA or TRITON_INTERPRET=1, else ``"torch"``.

    Raises:
        ValueError: unknown backend, or ``"triton"`` for a CPU tensor without TRITON_INTERPRET=1.
    """
    if backend not in _BACKENDS:
        raise ValueError(f"backend must be one of {_BACKENDS}, got {backend!r}")
    if backend == "auto":
        return "triton" if q.is_cuda or triton_interpret() else "torch"
    if backend == "triton" and not q.is_cuda and not triton_interpret():
        raise ValueError("backend='triton' needs CUDA tensors or TRITON_INTERPRET=1")
    return backend


def segment_attention_forward(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    meta: SegmentMeta,
    *,
    softmax_scale: float | None = None,
    backend: str = "auto",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Forward of causal segment attention.

    Args:
        q: [Tq, H, D] queries.
        k: [Tk, Hkv, D] keys of the KV workspace (``H % Hkv == 0``).
        v: [Tk, Hkv, D] values.
        meta: segments (see :class:`SegmentMeta`), tensors on q's device.
        softmax_scale: defaults to ``1/sqrt(D)``.
        backend: ``"triton"``, ``"torch"`` or ``"auto"``.

    Returns:
        ``(out [Tq, H, D] in q.dtype, lse [Tq, H] float32, natural log)``.

    Raises:
        ValueError: inconsistent shapes, dtypes, devices or segments.
    """
    if resolve_backend(backend, q) == "torch":
        return segment_attention_ref(q, k, v, meta, softmax_scale=softmax_scale, upcast=True)
    from flashcp_kernels.triton_fwd import segment_attention_forward_triton

    check_inputs(q, k, v, meta)
    return segment_attention_forward_triton(q, k, v, meta, softmax_scale=softmax_scale)


def segment_attention_backward(
    dout: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor,
    meta: SegmentMeta,
    *,
    softmax_scale: float | None = None,
    backend: str = "auto",
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Backward of causal segment attention.

    Args:
        dout: [Tq, H, D] gradient of ``out``.
        q, k, v, meta, softmax_scale, backend: as in :func:`segment_attention_forward`.
        out: [Tq, H, D] forward output.
        lse: [Tq, H] float32 forward log-sum-exp.

    Returns:
        ``(dq [Tq, H, D], dk [Tk, Hkv, D], dv [Tk, Hkv, D])`` in the input dtype;
        dk/dv of a key row are summed over every segment that reads it.
    """
    if dout.shape != q.shape or out.shape != q.shape:
        raise ValueError(f"dout and out must have q's shape {tuple(q.shape)}")
    if lse.shape != q.shape[:2] or lse.dtype != torch.float32:
        raise ValueError(f"lse must be float32 [{q.shape[0]}, {q.shape[1]}]")
    if resolve_backend(backend, q) == "torch":
        return segment_attention_backward_ref(dout, q, k, v, out, lse, meta, softmax_scale=softmax_scale)
    from flashcp_kernels.triton_bwd import segment_attention_backward_triton

    check_inputs(q, k, v, meta)
    return segment_attention_backward_triton(dout, q, k, v, out, lse, meta, softmax_scale=softmax_scale)


class SegmentAttentionFunction(torch.autograd.Function):
    """out = segment attention of (q, k, v); backward returns dq, dk, dv."""

    @staticmethod
    def forward(ctx: Any, q, k, v, meta: SegmentMeta, softmax_scale: float | None, backend: str):
        out, lse = segment_attention_forward(q, k, v, meta, softmax_scale=softmax_scale, backend=backend)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.meta = meta
        ctx.softmax_scale = softmax_scale
        ctx.backend = backend
        return out

    @staticmethod
    def backward(ctx: Any, dout):
        q, k, v, out, lse = ctx.saved_tensors
        dq, dk, dv = segment_attention_backward(
            dout.contiguous(), q, k, v, out, lse, ctx.meta, softmax_scale=ctx.softmax_scale, backend=ctx.backend
        )
        return dq, dk, dv, None, None, None


def segment_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    meta: SegmentMeta,
    *,
    softmax_scale: float | None = None,
    backend: str = "auto",
) -> torch.Tensor:
    """Differentiable causal segment attention: ``out [Tq, H, D]`` (see :func:`segment_attention_forward`)."""
    return SegmentAttentionFunction.apply(q, k, v, meta, softmax_scale, backend)
