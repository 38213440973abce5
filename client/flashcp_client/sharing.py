"""Plan once, share it: one rank plans a micro-batch and broadcasts the plan to its CP group.

Every rank planning the same batch on its own wastes planner time and, with a
planner that is not deterministic, makes ranks disagree. ::

    plans = plan_once(client, [[4096, 517, 12000]], cp_size=8, group=cp_group)   # collective

    dataset = PackedCPDataset(docs, context_size=..., cp_size=8, rank=cp_rank, plan_on_rank=0)
    for item in DataLoader(dataset, batch_size=None, num_workers=2):
        batch = share_plan(item, cp_group)                                       # collective

Plans travel with ``broadcast_object_list`` (pickle, within the job only).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.distributed as dist

from flashcp_client.agreement import _collective_device
from flashcp_client.dataloader import rank_batch
from flashcp_client.errors import PlanMismatchError
from flashcp_client.plan_client import PlannerClient
from flashcp_planner import Plan

__all__ = ["broadcast_plans", "plan_once", "share_plan"]


def _require_dist() -> None:
    if not dist.is_available() or not dist.is_initialized():
        raise RuntimeError("torch.distributed is not initialised: call init_process_group first")


def broadcast_plans(plans: Sequence[Plan] | None, group: Any = None, *, src: int = 0) -> tuple[Plan, ...]:
    """The plans of group rank ``src``, on every rank of ``group`` (collective).

    Args:
        plans: on ``src``, the plans to share; ignored elsewhere (pass ``None``).
        group: the CP process group (default: the world).
        src: the group rank that holds the plans.

    Raises:
        ValueError: ``src`` passed no plans (raised on every rank).
    """
    _require_dist()
    box: list[Any] = [tuple(plans) if plans is not None and dist.get_rank(group) == src else None]
    dist.broadcast_object_list(box, group=group, group_src=src, device=_collective_device(group))
    if box[0] is None:
        raise ValueError(f"broadcast_plans: group rank {src} passed no plans")
    return box[0]


def plan_once(
    client: PlannerClient, micro_batches: Sequence[Sequence[int]], *, cp_size: int, group: Any = None, src: int = 0,
    **plan_kwargs: Any,
) -> tuple[Plan, ...]:
    """Plan ``micro_batches`` on group rank ``src`` only and broadcast the plans (collective).

    A planning error on ``src`` (invalid or infeasible request) raises the same
    exception type on every rank.
    """
    _require_dist()
    plans: tuple[Plan, ...] | BaseException | None = None
    if dist.get_rank(group) == src:
        try:
            plans = client.plan(micro_batches, cp_size=cp_size, **plan_kwargs)
        except ValueError as exc:
            plans = exc
    box: list[Any] = [plans]
    dist.broadcast_object_list(box, group=group, group_src=src, device=_collective_device(group))
    if isinstance(box[0], BaseException):
        raise box[0]
    return box[0]


def share_plan(item: dict[str, Any], group: Any = None) -> dict[str, Any]:
    """Complete a :class:`~flashcp_client.PackedCPDataset` item built with ``plan_on_rank`` (collective).

    The planning rank's item holds the plan; every other rank's holds only its
    packed micro-batch. The plan is broadcast from the planning rank, each rank
    builds its :func:`~flashcp_client.rank_batch` from its own packed tokens, and
    one ``all_reduce`` checks that every rank packed the same micro-batch.

    Raises:
        PlanMismatchError: on every rank, if some rank's packed micro-batch is not the plan's.
    """
    _require_dist()
    rank = dist.get_rank(group)
    src = item.get("plan_on_rank")
    if src is None:
        raise ValueError("share_plan: the item was not built with plan_on_rank (its dataset planned it already)")
    (plan,) = broadcast_plans([item["plan"]] if rank == src else None, group, src=src)
    packed = item["packed"]
    fits = tuple(packed["doc_lengths"]) == plan.doc_lengths
    verdict = torch.tensor([int(fits)], device=_collective_device(group))
    dist.all_reduce(verdict, op=dist.ReduceOp.MIN, group=group)
    if not verdict.item():
        raise PlanMismatchError("doc_lengths", f"some rank of the CP group packed another micro-batch than group "
                                               f"rank {src} planned (micro-batch {item.get('micro_batch')})")
    if rank == src:
        return item
    batch = rank_batch(packed["tokens"], plan, rank, ignore_index=packed["ignore_index"],
                       micro_batch=item["micro_batch"], starts=packed["starts"], next_tokens=packed["next_tokens"])
    return {**batch, "packing": item["packing"], "packed": packed, "plan_on_rank": src}
