"""Context-parallel attention of one layer, executed from a plan.

``out = cp_attention(q, k, v, plan, group)`` with every tensor in the rank's
dispatch order. Forward: start the KV exchange (async), compute the segments
whose keys are all local while it is in flight, wait, assemble the KV
workspace, compute the remaining segments. Backward mirrors it: gradients of
the workspace segments first, start sending dK/dV of received rows home
(async), compute the local segments' gradients while that is in flight, wait,
sum the returned dK/dV into the local gradients. Every strategy (FlashCP,
whole-doc, per-doc, sub-group, static zigzag, contiguous) and every
communication mode runs through the same code: only the plan differs.
"""

from __future__ import annotations

from typing import Any

import torch

from flashcp_client.agreement import ensure_agreement
from flashcp_client.dispatch import group_rank_and_size
from flashcp_client.errors import PlanMismatchError
from flashcp_client.kv_exchange import (
    CommStats,
    add_returned_grads,
    build_workspace,
    start_grad_return,
    start_kv_exchange,
)
from flashcp_client.layout import AttentionPart, RankLayout, rank_layout
from flashcp_planner import Plan

__all__ = ["cp_attention"]


def cp_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    plan: Plan,
    group: Any = None,
    *,
    softmax_scale: float | None = None,
    backend: str = "auto",
    stats: CommStats | None = None,
    agreement: str | None = None,
    layer: int = -1,
) -> torch.Tensor:
    """Causal, document-masked attention of this rank's queries under ``plan``.

    Collective over ``group``: every rank calls it with the same plan. By
    default the first call with a plan object (and given shapes and dtypes)
    checks that every rank holds the same plan and matching ``q``, ``k``, ``v``
    (one fixed-size ``all_gather``, see :mod:`flashcp_client.agreement`): a
    mismatch raises the same :class:`PlanMismatchError` on every rank before
    any KV moves.

    Args:
        q: ``[local_tokens, heads, head_dim]`` in this rank's dispatch order.
        k: ``[local_tokens, kv_heads, head_dim]`` (``heads % kv_heads == 0``).
        v: same shape as ``k``.
        plan: the micro-batch's :class:`flashcp_planner.Plan`.
        group: the CP process group (default: the world); its size must be
            ``plan.cp_size`` and group rank ``r`` executes ``plan.ranks[r]``.
        softmax_scale: defaults to ``1 / sqrt(head_dim)``.
        backend: kernel backend passed to :mod:`flashcp_kernels`
            (``"auto"``, ``"triton"``, ``"torch"``).
        stats: if given, bytes moved by this rank are added to it.
        agreement: ``"first_use"`` (default, or ``FLASHCP_AGREEMENT``), ``"always"`` or ``"off"``.
        layer: identifies the call site (layer index) in the agreement record, so
            that a rank that skipped a layer is named; ``-1``: not given.

    Returns:
        ``[local_tokens, heads, head_dim]``, dtype of ``q``.

    Raises:
        PlanMismatchError: ranks disagree on the plan, the layer, or the shape
            or dtype of their inputs, or the inputs do not match the plan (on
            every rank, before any KV moves; with ``agreement="off"`` only the
            local checks run, on the rank that fails them).
        AgreementTimeout: the other ranks did not reach the agreement check.
        ValueError: inconsistent shapes, dtypes or devices.
    """
    ensure_agreement(plan, group, (q, k, v), mode=agreement, layer=layer)
    layout = checked_layout(q, k, v, plan, group)
    q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
    return _CPAttention.apply(q, k, v, layout, group, softmax_scale, backend, stats)


def checked_layout(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, plan: Plan, group: Any) -> RankLayout:
    """This rank's layout of ``plan``, after the local checks of ``q``, ``k``, ``v`` against it."""
    rank, _ = group_rank_and_size(plan, group)
    layout = rank_layout(plan, rank)
    _check_inputs(q, k, v, layout)
    return layout


def _check_inputs(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layout: RankLayout) -> None:
    if q.dim() != 3 or k.dim() != 3 or v.dim() != 3:
        raise ValueError(f"q, k, v must be [tokens, heads, head_dim], got {tuple(q.shape)}, {tuple(k.shape)}, "
                         f"{tuple(v.shape)}")
    for name, t in (("q", q), ("k", k), ("v", v)):
        if t.shape[0] != layout.num_local_tokens:
            raise PlanMismatchError(
                f"{name}.shape[0]",
                f"rank {layout.rank} owns {layout.num_local_tokens} tokens under the plan, {name} has {t.shape[0]}",
            )
    if k.shape != v.shape:
        raise ValueError(f"k and v must have the same shape, got {tuple(k.shape)} and {tuple(v.shape)}")
    if q.shape[2] != k.shape[2] or q.shape[1] % k.shape[1]:
        raise ValueError(f"q {tuple(q.shape)} and k {tuple(k.shape)}: head dims must match and kv heads divide heads")
    if not (q.dtype == k.dtype == v.dtype) or not (q.device == k.device == v.device):
        raise ValueError("q, k, v must share one dtype and one device")


class _Part:
    """Device-side view of an :class:`AttentionPart`: query rows and kernel metadata."""

    def __init__(self, part: AttentionPart, device: torch.device, num_local: int) -> None:
        from flashcp_kernels import SegmentMeta

        self.empty = part.num_segments == 0
        self.identity = part.num_queries == num_local and bool(
            torch.equal(part.query_rows, torch.arange(num_local, dtype=torch.int64))
        )
        self.rows = part.query_rows.to(device)
        self.meta = SegmentMeta.from_lists(*part.meta_lists(), device=device)

    def take(self, x: torch.Tensor) -> torch.Tensor:
        return x if self.identity else x.index_select(0, self.rows)

    def put(self, dst: torch.Tensor, values: torch.Tensor) -> None:
        if self.identity:
            dst.copy_(values)
        else:
            dst.index_copy_(0, self.rows, values)


def _parts(layout: RankLayout, device: torch.device) -> tuple[_Part, _Part]:
    return layout.cached(
        ("parts", device),
        lambda: (_Part(layout.local_part, device, layout.num_local_tokens),
                 _Part(layout.remote_part, device, layout.num_local_tokens)),
    )


class Saved:
    """What the backward of one ``cp_attention`` call needs from its forward."""

    __slots__ = ("tensors", "layout", "group", "kwargs", "stats")

    def __init__(self, tensors: tuple[torch.Tensor, ...], layout: RankLayout, group: Any, kwargs: dict[str, Any],
                 stats: CommStats | None) -> None:
        self.tensors = tensors
        self.layout = layout
        self.group = group
        self.kwargs = kwargs
        self.stats = stats


def attention_forward(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    layout: RankLayout,
    group: Any,
    softmax_scale: float | None,
    backend: str,
    stats: CommStats | None,
) -> tuple[torch.Tensor, Saved]:
    """Forward of one layer on checked, contiguous inputs: ``(out, saved)`` (no autograd)."""
    from flashcp_kernels import segment_attention_forward

    local, remote = _parts(layout, q.device)
    kwargs = {"softmax_scale": softmax_scale, "backend": backend}
    pending = start_kv_exchange(k, v, layout, group)

    out = torch.zeros_like(q)
    out_local = lse_local = out_remote = lse_remote = None
    if not local.empty:
        out_local, lse_local = segment_attention_forward(local.take(q), k, v, local.meta, **kwargs)
        local.put(out, out_local)
    received = pending.wait()
    if not remote.empty:
        k_ws, v_ws = build_workspace(k, v, received, layout)
        out_remote, lse_remote = segment_attention_forward(remote.take(q), k_ws, v_ws, remote.meta, **kwargs)
        remote.put(out, out_remote)

    if stats is not None:
        stats.forward_send_bytes += pending.sent_bytes
        stats.forward_recv_bytes += pending.received_bytes
        stats.exchanges += int(layout.group_has_transfers)
    kept = tuple(t if t is not None else q.new_empty(0) for t in (out_local, lse_local, out_remote, lse_remote))
    return out, Saved((q, k, v, received, *kept), layout, group, kwargs, stats)


def attention_backward(saved: Saved, dout: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(dq, dk, dv)`` of one layer from its forward's :class:`Saved` (collective, like the forward)."""
    from flashcp_kernels import segment_attention_backward

    q, k, v, received, out_local, lse_local, out_remote, lse_remote = saved.tensors
    layout = saved.layout
    local, remote = _parts(layout, q.device)
    dout = dout.contiguous()
    kv_heads = k.shape[1]

    dq = torch.zeros_like(q)
    if not remote.empty:
        k_ws, v_ws = build_workspace(k, v, received, layout)
        dq_r, dk_ws, dv_ws = segment_attention_backward(
            remote.take(dout), remote.take(q), k_ws, v_ws, out_remote, lse_remote, remote.meta, **saved.kwargs
        )
        remote.put(dq, dq_r)
    else:
        dk_ws = dv_ws = k.new_zeros((0, *k.shape[1:]))
    d_local, pending = start_grad_return(dk_ws, dv_ws, layout, saved.group)

    if not local.empty:
        dq_l, dk_l, dv_l = segment_attention_backward(
            local.take(dout), local.take(q), k, v, out_local, lse_local, local.meta, **saved.kwargs
        )
        local.put(dq, dq_l)
        d_local[:, :kv_heads] += dk_l
        d_local[:, kv_heads:] += dv_l
    returned = pending.wait()
    add_returned_grads(d_local, returned, layout)

    if saved.stats is not None:
        saved.stats.backward_send_bytes += pending.sent_bytes
        saved.stats.backward_recv_bytes += pending.received_bytes
        saved.stats.exchanges += int(layout.group_has_transfers)
    return dq, d_local[:, :kv_heads].contiguous(), d_local[:, kv_heads:].contiguous()


class _CPAttention(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx: Any,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        layout: RankLayout,
        group: Any,
        softmax_scale: float | None,
        backend: str,
        stats: CommStats | None,
    ) -> torch.Tensor:
        out, saved = attention_forward(q, k, v, layout, group, softmax_scale, backend, stats)
        ctx.save_for_backward(*saved.tensors)
        ctx.saved = saved
        saved.tensors = ()  # autograd holds the tensors (and checks they were not modified in place)
        return out

    @staticmethod
    def backward(ctx: Any, dout: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        saved = ctx.saved
        saved.tensors = ctx.saved_tensors
        dq, dk, dv = attention_backward(saved, dout)
        return dq, dk, dv, None, None, None, None, None
