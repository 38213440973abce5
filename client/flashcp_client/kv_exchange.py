"""KV movement driven by a plan: one uneven ``all_to_all_single`` forward, its mirror backward.

Forward, every rank sends the K and V rows other ranks read (K and V
concatenated on the head dimension, so one collective moves both) and receives
the rows it reads; the receiver assembles its KV workspace from local and
received rows. Backward, the dK/dV of received rows travel back to their owners
and are summed into the owners' local gradients. Which rows move is decided
entirely by :func:`flashcp_planner.kv_transfers`, so the same code executes
all-gather, sharding-aware and exact-need plans, and Whole-Doc documents move
nothing; ``node_dedup`` plans deliver the same rows in two stages, across
nodes then inside them (:mod:`flashcp_client.node_exchange`). Works with NCCL
(GPU) and gloo (CPU).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from flashcp_client.errors import PlanMismatchError
from flashcp_client.layout import RankLayout, rank_layout
from flashcp_client.node_exchange import NodePending, start_node_exchange, start_node_grad_return
from flashcp_planner import Plan

__all__ = [
    "CommStats",
    "PendingExchange",
    "start_kv_exchange",
    "build_workspace",
    "start_grad_return",
    "add_returned_grads",
    "exchange_kv",
]


@dataclass(kw_only=True)
class CommStats:
    """Bytes moved by one rank; an accumulator that :func:`flashcp_client.cp_attention` adds to.

    Mutable on purpose: pass one instance to several calls (layers, steps) and
    read the totals. Forward bytes equal the planner's ``RankCost.recv_bytes`` /
    ``send_bytes`` when the element size and KV head shape match its cost model;
    backward moves the same bytes in the other direction.
    """

    forward_send_bytes: int = 0
    """K/V bytes sent to readers."""
    forward_recv_bytes: int = 0
    """K/V bytes received from owners."""
    backward_send_bytes: int = 0
    """dK/dV bytes sent back to owners."""
    backward_recv_bytes: int = 0
    """dK/dV bytes received from readers."""
    exchanges: int = 0
    """Collectives issued (forward and backward)."""

    @property
    def total_bytes(self) -> int:
        """Every byte this rank sent or received."""
        return self.forward_send_bytes + self.forward_recv_bytes + self.backward_send_bytes + self.backward_recv_bytes


class PendingExchange:
    """An ``all_to_all_single`` in flight; :meth:`wait` returns the received rows."""

    def __init__(self, received: torch.Tensor, work: Any, *, sent_bytes: int) -> None:
        self._received = received
        self._work = work
        self.sent_bytes = sent_bytes
        """Bytes this rank put on the wire."""
        self.received_bytes = received.numel() * received.element_size()
        """Bytes this rank receives."""

    def wait(self) -> torch.Tensor:
        if self._work is not None:
            self._work.wait()
            self._work = None
        return self._received


def _all_to_all(
    send: torch.Tensor, send_splits: tuple[int, ...], recv_splits: tuple[int, ...], group: Any, *, skip: bool
) -> PendingExchange:
    received = send.new_empty((sum(recv_splits), *send.shape[1:]))
    if skip:
        return PendingExchange(received, None, sent_bytes=0)
    work = dist.all_to_all_single(
        received, send.contiguous(), output_split_sizes=list(recv_splits), input_split_sizes=list(send_splits),
        group=group, async_op=True,
    )
    return PendingExchange(received, work, sent_bytes=send.numel() * send.element_size())


def _check_kv(k: torch.Tensor, v: torch.Tensor, layout: RankLayout) -> None:
    if k.dim() != 3 or k.shape != v.shape:
        raise ValueError(
            f"k and v must both be [local_tokens, kv_heads, head_dim], got {tuple(k.shape)} and {tuple(v.shape)}"
        )
    if k.shape[0] != layout.num_local_tokens:
        raise PlanMismatchError(
            "k.shape[0]", f"rank {layout.rank} owns {layout.num_local_tokens} tokens under the plan, k has {k.shape[0]}"
        )


def start_kv_exchange(
    k: torch.Tensor, v: torch.Tensor, layout: RankLayout, group: Any = None
) -> PendingExchange | NodePending:
    """Send the K/V rows other ranks read and start receiving the rows this rank reads (async).

    Collective over ``group`` (skipped on every rank when the plan moves no KV).
    The received tensor is ``[sum(recv_splits), 2 * kv_heads, head_dim]``:
    K heads then V heads, rows in :attr:`RankLayout.recv_index` order.
    """
    _check_kv(k, v, layout)
    if layout.node_exchange is not None:
        return start_node_exchange(torch.cat([k, v], dim=1), layout.node_exchange, group)
    rows = layout.cached(("send_rows", k.device), lambda: layout.send_rows.to(k.device))
    send = torch.cat([k, v], dim=1).index_select(0, rows)
    return _all_to_all(send, layout.send_splits, layout.recv_splits, group, skip=not layout.group_has_transfers)


def build_workspace(
    k: torch.Tensor, v: torch.Tensor, received: torch.Tensor, layout: RankLayout
) -> tuple[torch.Tensor, torch.Tensor]:
    """The KV workspace ``(k_ws, v_ws)``, each ``[workspace_rows, kv_heads, head_dim]``, contiguous."""
    kv_heads = k.shape[1]
    source = layout.cached(("workspace_source", k.device), lambda: layout.workspace_source.to(k.device))
    k_ws = torch.cat([k, received[:, :kv_heads]]).index_select(0, source)
    v_ws = torch.cat([v, received[:, kv_heads:]]).index_select(0, source)
    return k_ws, v_ws


def start_grad_return(
    dk_ws: torch.Tensor, dv_ws: torch.Tensor, layout: RankLayout, group: Any = None
) -> tuple[torch.Tensor, PendingExchange | NodePending]:
    """Scatter workspace gradients onto local and received rows; send the received rows' share home (async).

    Returns ``(d_local, pending)``: ``d_local`` ``[local_tokens, 2 * kv_heads,
    head_dim]`` holds the gradient of local rows read through the workspace;
    once ``pending.wait()`` returns, pass both to :func:`add_returned_grads`.
    """
    num_local = layout.num_local_tokens
    source = layout.cached(("workspace_source", dk_ws.device), lambda: layout.workspace_source.to(dk_ws.device))
    d_all = dk_ws.new_zeros((num_local + layout.num_recv_rows, 2 * dk_ws.shape[1], dk_ws.shape[2]))
    if source.numel():
        d_all.index_add_(0, source, torch.cat([dk_ws, dv_ws], dim=1))
    if layout.node_exchange is not None:
        return d_all[:num_local], start_node_grad_return(d_all[num_local:], num_local, layout.node_exchange, group)
    pending = _all_to_all(d_all[num_local:], layout.recv_splits, layout.send_splits, group,
                          skip=not layout.group_has_transfers)
    return d_all[:num_local], pending


def add_returned_grads(d_local: torch.Tensor, returned: torch.Tensor, layout: RankLayout) -> torch.Tensor:
    """Sum dK/dV returned by readers into the owner's local rows (in place, returned for chaining)."""
    if layout.node_exchange is not None:  # already summed onto every local row
        return d_local.add_(returned)
    if returned.shape[0]:
        rows = layout.cached(("send_rows", d_local.device), lambda: layout.send_rows.to(d_local.device))
        d_local.index_add_(0, rows, returned)
    return d_local


def exchange_kv(
    k: torch.Tensor, v: torch.Tensor, plan: Plan, group: Any = None, *, stats: CommStats | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Blocking forward exchange: the K and V rows this rank receives, ``[rows, kv_heads, head_dim]`` each.

    Row ``i`` holds packed token ``rank_layout(plan, rank).recv_index[i]``.
    Collective over ``group``.

    Raises:
        PlanMismatchError: the group does not match the plan or ``k``/``v``
            do not hold this rank's tokens (before the collective).
    """
    from flashcp_client.dispatch import group_rank_and_size

    rank, _ = group_rank_and_size(plan, group)
    layout = rank_layout(plan, rank)
    pending = start_kv_exchange(k, v, layout, group)
    received = pending.wait()
    if stats is not None:
        stats.forward_send_bytes += pending.sent_bytes
        stats.forward_recv_bytes += pending.received_bytes
        stats.exchanges += int(layout.group_has_transfers)
    kv_heads = k.shape[1]
    return received[:, :kv_heads], received[:, kv_heads:]
