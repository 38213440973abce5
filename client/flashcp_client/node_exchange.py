"""The KV exchange of ``node_dedup`` plans: two ``all_to_all_single`` stages, across nodes then inside them.

Forward, stage 1 runs over the CP group: every key range a node's ranks read
and no rank of the node holds goes from its owner to the node once, striped
over the node's ranks (:func:`flashcp_planner.comm.node_routes`). Stage 2 runs
over the node's own process group: each rank forwards its stripe's keys to the
ranks of its node that read them, and its own keys to the node peers that read
them. The received rows are then gathered into exactly the order of the
exact-need exchange (:attr:`RankLayout.recv_index`), so the workspace and the
kernels do not know which mode ran.

Backward mirrors it: the dK/dV of received rows go back to the rank that
forwarded them (stage 2, inside the node), which sums them with its own into
its stripe's rows, and only those sums cross back to the owners (stage 1).

Node process groups are created once per (CP group, node) and reused; a stage
that moves nothing in the whole group (stage 1) or node (stage 2) is skipped
by every rank concerned, as the plan says so.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from flashcp_planner import KVTransfer, Plan
from flashcp_planner.comm import node_routes, rank_kv_needs

__all__ = ["NodeExchangeLayout", "NodePending", "node_exchange_layout", "start_node_exchange", "start_node_grad_return"]


@dataclass(frozen=True, kw_only=True, eq=False)
class NodeExchangeLayout:
    """One rank's index maps for both stages (CPU int64 tensors), from the plan alone."""

    node_ranks: tuple[int, ...]
    """CP-group ranks of this rank's node, in order (stage 2 runs among them)."""
    inter_send_rows: torch.Tensor
    """Local rows sent in stage 1, grouped by destination in rank order."""
    inter_send_splits: tuple[int, ...]
    inter_recv_splits: tuple[int, ...]
    """Rows received in stage 1 from each rank: this rank's stripe."""
    intra_send_rows: torch.Tensor
    """Rows of ``cat(local, stripe)`` sent in stage 2, grouped by destination in node order."""
    intra_send_splits: tuple[int, ...]
    intra_recv_splits: tuple[int, ...]
    gather: torch.Tensor
    """Row of ``cat(stripe, stage-2 received)`` of each exact-need received row, in ``recv_index`` order."""
    group_crosses: bool
    """Whether any rank of the CP group receives in stage 1 (else stage 1 is skipped everywhere)."""
    node_forwards: bool
    """Whether any rank of this node receives in stage 2 (else the node skips it)."""

    @property
    def num_stripe_rows(self) -> int:
        return sum(self.inter_recv_splits)


def node_exchange_layout(plan: Plan, rank: int, local_index: torch.Tensor,
                         recv_index: torch.Tensor) -> NodeExchangeLayout:
    """The stage index maps of ``rank`` under the ``node_dedup`` plan ``plan``.

    ``local_index`` / ``recv_index``: packed index of every local row and of every row the
    exact-need exchange would deliver (:class:`~flashcp_client.layout.RankLayout`).
    """
    assert plan.gpus_per_node is not None, "node_dedup plans record their node size"
    n, gpn = plan.cp_size, plan.gpus_per_node
    segments = [rp.segments for rp in plan.ranks]
    routes = node_routes(segments, gpn, rank_kv_needs(segments))  # (node needs: their union per node)
    offsets = torch.tensor([0, *plan.doc_lengths], dtype=torch.int64).cumsum(0)
    node = rank // gpn
    node_ranks = tuple(range(node * gpn, min(n, (node + 1) * gpn)))

    inter_sends = sorted((t for t in routes.inter if t.src == rank), key=lambda t: (t.dst, t.doc, t.start))
    inter_recvs = sorted((t for t in routes.inter if t.dst == rank), key=lambda t: (t.src, t.doc, t.start))
    intra_sends = sorted((t for t in routes.intra if t.src == rank), key=lambda t: (t.dst, t.doc, t.start))
    intra_recvs = sorted((t for t in routes.intra if t.dst == rank), key=lambda t: (t.src, t.doc, t.start))
    stripe_index = _packed(inter_recvs, offsets)
    intra_index = _packed(intra_recvs, offsets)
    return NodeExchangeLayout(
        node_ranks=node_ranks,
        inter_send_rows=_rows_of(_packed(inter_sends, offsets), local_index),
        inter_send_splits=_splits(inter_sends, n, lambda t: t.dst),
        inter_recv_splits=_splits(inter_recvs, n, lambda t: t.src),
        intra_send_rows=_rows_of(_packed(intra_sends, offsets), torch.cat([local_index, stripe_index])),
        intra_send_splits=_splits(intra_sends, len(node_ranks), lambda t: t.dst - node_ranks[0]),
        intra_recv_splits=_splits(intra_recvs, len(node_ranks), lambda t: t.src - node_ranks[0]),
        gather=_rows_of(recv_index, torch.cat([stripe_index, intra_index])),
        group_crosses=bool(routes.inter),
        node_forwards=any(t.dst // gpn == node for t in routes.intra),
    )


def _packed(transfers: list[KVTransfer], offsets: torch.Tensor) -> torch.Tensor:
    """Packed index of every token of ``transfers``, in their order."""
    pieces = [torch.arange(int(offsets[t.doc]) + t.start, int(offsets[t.doc]) + t.end) for t in transfers]
    return torch.cat(pieces) if pieces else torch.empty(0, dtype=torch.int64)


def _rows_of(packed: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """Position in ``index`` (distinct packed indices) of every entry of ``packed``, which must occur."""
    order = torch.argsort(index)
    at = torch.searchsorted(index[order], packed).clamp_(max=max(index.numel() - 1, 0))
    rows = order[at] if index.numel() else at
    assert packed.numel() == 0 or torch.equal(index[rows], packed), "a route names a token its rank lacks"
    return rows


def _splits(transfers: list[KVTransfer], size: int, peer: Any) -> tuple[int, ...]:
    splits = [0] * size
    for t in transfers:
        splits[peer(t)] += t.num_tokens
    return tuple(splits)


_NODE_GROUPS: dict[tuple[Any, tuple[int, ...]], Any] = {}
"""Node process groups by (CP group, the node's global ranks): created once, reused by every plan."""


def _node_group(group: Any, node_ranks: tuple[int, ...]) -> Any:
    """The process group of ``node_ranks`` (CP-group ranks) of ``group``; only its members call this."""
    members = dist.get_process_group_ranks(group) if group is not None else list(range(dist.get_world_size()))
    global_ranks = tuple(members[r] for r in node_ranks)
    key = (group, global_ranks)
    if key not in _NODE_GROUPS:
        _NODE_GROUPS[key] = dist.new_group(list(global_ranks), use_local_synchronization=True)
    return _NODE_GROUPS[key]


def _stage(send: torch.Tensor, send_splits: tuple[int, ...], recv_splits: tuple[int, ...], group: Any,
           *, skip: bool) -> tuple[torch.Tensor, Any]:
    received = send.new_empty((sum(recv_splits), *send.shape[1:]))
    if skip:
        return received, None
    work = dist.all_to_all_single(received, send.contiguous(), output_split_sizes=list(recv_splits),
                                  input_split_sizes=list(send_splits), group=group, async_op=True)
    return received, work


class NodePending:
    """Both stages of one direction in flight; :meth:`wait` runs what is left and returns the result.

    Bytes this rank sends and receives in each stage (``inter_*``: stage 1, ``intra_*``: stage 2)
    are known from the start; ``sent_bytes`` / ``received_bytes`` are their sums, as for the
    single-stage exchange.
    """

    def __init__(self, finish: Any, *, inter: tuple[int, int], intra: tuple[int, int]) -> None:
        self._finish = finish
        self._result: torch.Tensor | None = None
        self.inter_sent_bytes, self.inter_received_bytes = inter
        self.intra_sent_bytes, self.intra_received_bytes = intra
        self.sent_bytes = self.inter_sent_bytes + self.intra_sent_bytes
        self.received_bytes = self.inter_received_bytes + self.intra_received_bytes

    def wait(self) -> torch.Tensor:
        if self._result is None:
            self._result = self._finish()
            self._finish = None
        return self._result


def _pair_bytes(send_splits: tuple[int, ...], recv_splits: tuple[int, ...], row_bytes: int) -> tuple[int, int]:
    return sum(send_splits) * row_bytes, sum(recv_splits) * row_bytes


def start_node_exchange(kv: torch.Tensor, nodes: NodeExchangeLayout, group: Any = None) -> NodePending:
    """Forward: start stage 1 with the local ``kv`` rows ``[local_tokens, 2 * kv_heads, head_dim]``;
    :meth:`NodePending.wait` runs stage 2 and returns the rows in ``recv_index`` order."""
    row_bytes = kv.shape[1] * kv.shape[2] * kv.element_size()
    rows = nodes.inter_send_rows.to(kv.device)
    stripe, work = _stage(kv.index_select(0, rows), nodes.inter_send_splits, nodes.inter_recv_splits, group,
                          skip=not nodes.group_crosses)

    def finish() -> torch.Tensor:
        if work is not None:
            work.wait()
        source = torch.cat([kv, stripe]).index_select(0, nodes.intra_send_rows.to(kv.device))
        forwarded, work2 = _stage(source, nodes.intra_send_splits, nodes.intra_recv_splits,
                                  _node_group(group, nodes.node_ranks) if nodes.node_forwards else None,
                                  skip=not nodes.node_forwards)
        if work2 is not None:
            work2.wait()
        return torch.cat([stripe, forwarded]).index_select(0, nodes.gather.to(kv.device))

    return NodePending(finish, inter=_pair_bytes(nodes.inter_send_splits, nodes.inter_recv_splits, row_bytes),
                       intra=_pair_bytes(nodes.intra_send_splits, nodes.intra_recv_splits, row_bytes))


def start_node_grad_return(d_recv: torch.Tensor, num_local: int, nodes: NodeExchangeLayout,
                           group: Any = None) -> NodePending:
    """Backward: start stage 2 in reverse with the gradients of the received rows (``recv_index``
    order); :meth:`NodePending.wait` sums them into the stripes, runs stage 1 in reverse and returns
    every local row's returned gradient, ``[num_local, 2 * kv_heads, head_dim]``."""
    row_bytes = d_recv.shape[1] * d_recv.shape[2] * d_recv.element_size()
    num_stripe = nodes.num_stripe_rows
    gathered = d_recv.new_zeros((num_stripe + sum(nodes.intra_recv_splits), *d_recv.shape[1:]))
    if d_recv.shape[0]:
        gathered.index_add_(0, nodes.gather.to(d_recv.device), d_recv)
    returned, work = _stage(gathered[num_stripe:], nodes.intra_recv_splits, nodes.intra_send_splits,
                            _node_group(group, nodes.node_ranks) if nodes.node_forwards else None,
                            skip=not nodes.node_forwards)

    def finish() -> torch.Tensor:
        if work is not None:
            work.wait()
        d_held = d_recv.new_zeros((num_local + num_stripe, *d_recv.shape[1:]))
        d_held[num_local:] = gathered[:num_stripe]
        if returned.shape[0]:
            d_held.index_add_(0, nodes.intra_send_rows.to(d_recv.device), returned)
        crossed, work1 = _stage(d_held[num_local:], nodes.inter_recv_splits, nodes.inter_send_splits, group,
                                skip=not nodes.group_crosses)
        if work1 is not None:
            work1.wait()
        d_local = d_held[:num_local]
        if crossed.shape[0]:
            d_local.index_add_(0, nodes.inter_send_rows.to(d_recv.device), crossed)
        return d_local

    return NodePending(finish, inter=_pair_bytes(nodes.inter_recv_splits, nodes.inter_send_splits, row_bytes),
                       intra=_pair_bytes(nodes.intra_recv_splits, nodes.intra_send_splits, row_bytes))
