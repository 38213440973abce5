"""Move token-major tensors between packed order and each rank's local order.

``dispatch`` is a local gather (no communication); ``undispatch`` gathers every
rank's rows back into packed order on every rank. Both are differentiable.
Collectives use only what gloo supports (equal-shape ``all_gather`` after
padding to the largest rank, ``all_reduce``), so they run on CPU as on GPU.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist

from flashcp_client.errors import PlanMismatchError
from flashcp_client.layout import packed_order, rank_layout
from flashcp_planner import Plan

__all__ = ["dispatch", "undispatch", "group_rank_and_size"]


def group_rank_and_size(plan: Plan, group: Any) -> tuple[int, int]:
    """This process's rank in ``group`` and the group size, checked against ``plan.cp_size``.

    Raises:
        PlanMismatchError: the group size differs from the plan's CP size.
        RuntimeError: torch.distributed is not initialised.
    """
    if not dist.is_available() or not dist.is_initialized():
        raise RuntimeError("torch.distributed is not initialised: call init_process_group first")
    size = dist.get_world_size(group)
    rank = dist.get_rank(group)
    if size != plan.cp_size:
        raise PlanMismatchError("cp_size", f"plan is for {plan.cp_size} ranks but the process group has {size}")
    if rank < 0:
        raise PlanMismatchError("rank", "this process is not a member of the process group")
    return rank, size


def dispatch(x: torch.Tensor, plan: Plan, rank: int) -> torch.Tensor:
    """This rank's tokens of a packed tensor, in local order.

    Args:
        x: ``[T, ...]`` tensor in packed order (T = the plan's total tokens).
        plan: the micro-batch's plan.
        rank: rank in the CP group.

    Returns:
        ``[L, ...]`` with ``L`` the rank's token count: ``x[local_index]``.

    Raises:
        PlanMismatchError: ``x.shape[0]`` is not the plan's token count, or
            ``rank`` is outside the plan's group.
    """
    layout = rank_layout(plan, rank)
    if x.dim() < 1 or x.shape[0] != plan.num_tokens:
        raise PlanMismatchError(
            "x.shape[0]", f"plan covers {plan.num_tokens} tokens, tensor has shape {tuple(x.shape)}"
        )
    index = layout.cached(("local_index", x.device), lambda: layout.local_index.to(x.device))
    return x.index_select(0, index)


def undispatch(local: torch.Tensor, plan: Plan, group: Any = None) -> torch.Tensor:
    """Gather every rank's local rows back into packed order (the inverse of :func:`dispatch`).

    Collective: every rank of ``group`` must call it with the same plan. The
    result, ``[T, ...]`` in packed order, is the same on every rank. The
    gradient of ``local`` is the sum over ranks of the gradient of their copy
    of the result at this rank's rows (``all_gather`` semantics).

    Raises:
        PlanMismatchError: the group size differs from the plan's CP size or
            ``local`` does not hold this rank's token count (checked before
            any collective).
    """
    rank, _ = group_rank_and_size(plan, group)
    expected = plan.ranks[rank].num_tokens
    if local.dim() < 1 or local.shape[0] != expected:
        raise PlanMismatchError(
            "local.shape[0]",
            f"rank {rank} owns {expected} tokens under the plan, tensor has shape {tuple(local.shape)}",
        )
    return _Undispatch.apply(local, plan, rank, group)


def _gather_packed(local: torch.Tensor, plan: Plan, group: Any) -> torch.Tensor:
    order, counts = packed_order(plan)
    width = max(counts)
    padded = local.new_zeros((width, *local.shape[1:]))
    padded[: local.shape[0]] = local
    gathered = [torch.empty_like(padded) for _ in counts]
    dist.all_gather(gathered, padded.contiguous(), group=group)
    rows = torch.cat([g[:c] for g, c in zip(gathered, counts, strict=True)])
    out = torch.empty_like(rows)
    out[order.to(local.device)] = rows
    return out


class _Undispatch(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, local: torch.Tensor, plan: Plan, rank: int, group: Any) -> torch.Tensor:
        ctx.plan, ctx.rank, ctx.group = plan, rank, group
        return _gather_packed(local.detach(), plan, group)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, None, None, None]:
        total = grad.contiguous().clone()
        dist.all_reduce(total, group=ctx.group)
        return dispatch(total, ctx.plan, ctx.rank), None, None, None
