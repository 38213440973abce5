"""Per-rank index maps derived from a plan: local tokens, KV workspace, exchange splits, segment metadata.

Execution contract (shared with :mod:`flashcp_kernels`):

* A rank's *local order* is the concatenation of its plan segments in plan
  order; local row ``i`` holds packed token ``local_index[i]`` where the packed
  index of (doc ``d``, position ``p``) is ``sum(doc_lengths[:d]) + p``.
* A segment ``(d, s, e)`` is *local* when the rank owns keys ``[0, e)`` of
  ``d`` as one contiguous run of local rows (Whole-Doc documents, the head
  chunk of a split one): it reads keys straight from the local K/V and can run
  while the exchange is in flight. Every other segment reads keys from the
  *KV workspace*: for each document ``d`` of a remote segment, rows
  ``[0, need_d)`` (``need_d`` = largest end among the rank's segments of
  ``d``) laid out contiguously, gathered from ``cat(local K/V, received K/V)``.
* The exchange is one ``all_to_all_single``: rank ``r`` sends, peer by peer in
  rank order, the local rows of every transfer ``src == r`` sorted by
  ``(dst, doc, start)``; it receives, peer by peer, the rows of every transfer
  ``dst == r`` sorted by ``(src, doc, start)``. A ``node_dedup`` plan delivers
  the same rows in the same order in two stages (:mod:`flashcp_client.node_exchange`).

Everything here is computed from the plan alone (no communication), on CPU,
once per (plan, rank); :func:`rank_layout` caches it.
"""

from __future__ import annotations

import functools
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any

import torch

from flashcp_client.errors import PlanMismatchError
from flashcp_client.node_exchange import node_exchange_layout
from flashcp_planner import CommMode, KVTransfer, Plan, Segment, kv_transfers

__all__ = ["AttentionPart", "WorkspaceDoc", "RankLayout", "rank_layout", "packed_order", "doc_offsets"]


@dataclass(frozen=True, kw_only=True, eq=False)
class AttentionPart:
    """A subset of the rank's segments computed by one kernel call on compacted query rows.

    The kernel sees ``q[query_rows]``; segment ``j`` of the part has query rows
    ``q_start[j] .. q_start[j] + q_len[j] - 1`` of that compacted buffer and
    reads key rows from ``k_start[j]`` of its key buffer (the local K/V for the
    local part, the workspace for the remote part).
    """

    segments: tuple[int, ...]
    """Indices into :attr:`RankLayout.segments`."""
    query_rows: torch.Tensor
    """int64 [Q]: local rows of the part's queries, in segment order."""
    q_start: tuple[int, ...]
    q_len: tuple[int, ...]
    q_pos: tuple[int, ...]
    k_start: tuple[int, ...]

    @property
    def num_segments(self) -> int:
        return len(self.segments)

    @property
    def num_queries(self) -> int:
        return int(self.query_rows.numel())

    def meta_lists(self) -> tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...], tuple[int, ...]]:
        """``(q_start, q_len, q_pos, k_start)`` for ``SegmentMeta.from_lists``."""
        return self.q_start, self.q_len, self.q_pos, self.k_start


@dataclass(frozen=True, slots=True, kw_only=True)
class WorkspaceDoc:
    """Rows ``[offset, offset + need)`` of the workspace hold keys ``[0, need)`` of ``doc``."""

    doc: int
    offset: int
    need: int


@dataclass(frozen=True, kw_only=True, eq=False)
class RankLayout:
    """Everything one rank needs to execute a plan, as index maps (CPU int64 tensors)."""

    rank: int
    cp_size: int
    num_tokens: int
    """Tokens of the whole packed micro-batch (T)."""
    segments: tuple[Segment, ...]
    """The rank's segments in local order."""
    segment_rows: tuple[int, ...]
    """First local row of each segment."""
    local_index: torch.Tensor
    """int64 [L]: packed index of each local row."""
    local_part: AttentionPart
    """Segments whose keys are all local (no communication needed)."""
    remote_part: AttentionPart
    """Segments that read the KV workspace."""
    workspace_docs: tuple[WorkspaceDoc, ...]
    workspace_source: torch.Tensor
    """int64 [W]: row of ``cat(local KV, received KV)`` copied into each workspace row."""
    send_splits: tuple[int, ...]
    """Rows sent to each peer (forward)."""
    send_rows: torch.Tensor
    """int64 [sum(send_splits)]: local rows sent, grouped by destination in rank order."""
    recv_splits: tuple[int, ...]
    """Rows received from each peer (forward)."""
    recv_index: torch.Tensor
    """int64 [sum(recv_splits)]: packed index of each received row, in arrival order."""
    recv_used: int
    """Received rows that land in the workspace (the rest are read by no query: all-gather waste)."""
    group_has_transfers: bool
    """Whether any rank of the group exchanges KV (if not, the collective is skipped everywhere)."""
    node_exchange: Any = None
    """For ``node_dedup`` plans, the two stages that deliver the received rows
    (:class:`flashcp_client.node_exchange.NodeExchangeLayout`); None: one ``all_to_all_single``."""
    _device_cache: dict[Any, Any] = field(default_factory=dict, repr=False)

    @property
    def num_local_tokens(self) -> int:
        return int(self.local_index.numel())

    @property
    def num_send_rows(self) -> int:
        return sum(self.send_splits)

    @property
    def num_recv_rows(self) -> int:
        return sum(self.recv_splits)

    @property
    def num_workspace_rows(self) -> int:
        return int(self.workspace_source.numel())

    def cached(self, key: Any, build: Any) -> Any:
        """Memoise ``build()`` under ``key`` (device copies of the index maps, kernel metadata)."""
        value = self._device_cache.get(key)
        if value is None:
            value = build()
            self._device_cache[key] = value
        return value


def doc_offsets(doc_lengths: tuple[int, ...]) -> list[int]:
    """Packed index of position 0 of every document."""
    offsets, total = [], 0
    for length in doc_lengths:
        offsets.append(total)
        total += length
    return offsets


def packed_order(plan: Plan) -> tuple[torch.Tensor, tuple[int, ...]]:
    """Packed indices of every rank's local tokens, ranks concatenated in order, and tokens per rank.

    ``packed_order(plan)[0]`` is a permutation of ``range(T)``.
    """
    offsets = doc_offsets(plan.doc_lengths)
    pieces = [
        torch.arange(offsets[s.doc] + s.start, offsets[s.doc] + s.end, dtype=torch.int64)
        for rp in plan.ranks
        for s in rp.segments
    ]
    counts = tuple(rp.num_tokens for rp in plan.ranks)
    return (torch.cat(pieces) if pieces else torch.empty(0, dtype=torch.int64)), counts


def rank_layout(plan: Plan, rank: int) -> RankLayout:
    """The (cached) :class:`RankLayout` of ``rank`` under ``plan``.

    Raises:
        PlanMismatchError: ``rank`` is outside the plan's group, or the plan's
            transfers do not deliver every key the rank reads or ask it to send
            tokens it does not own.
    """
    if isinstance(rank, bool) or not isinstance(rank, int) or not 0 <= rank < plan.cp_size:
        raise PlanMismatchError("rank", f"rank {rank!r} is outside the plan's CP group of size {plan.cp_size}")
    return _rank_layout_cached(plan, rank)


@functools.lru_cache(maxsize=16)  # device copies hang off each layout: keep the cache small
def _rank_layout_cached(plan: Plan, rank: int) -> RankLayout:
    return _build_rank_layout(plan, rank)


def _arange(start: int, end: int) -> torch.Tensor:
    return torch.arange(start, end, dtype=torch.int64)


def _cat(pieces: list[torch.Tensor]) -> torch.Tensor:
    return torch.cat(pieces) if pieces else torch.empty(0, dtype=torch.int64)


def _build_rank_layout(plan: Plan, rank: int) -> RankLayout:
    n = plan.cp_size
    segments = plan.ranks[rank].segments
    offsets = doc_offsets(plan.doc_lengths)

    segment_rows: list[int] = []
    row = 0
    for seg in segments:
        segment_rows.append(row)
        row += seg.num_tokens
    local_index = _cat([_arange(offsets[s.doc] + s.start, offsets[s.doc] + s.end) for s in segments])

    # Owned prefix of every document: keys [0, end) at local rows base + p.
    prefix_end: dict[int, int] = {}
    prefix_base: dict[int, int] = {}
    for seg, seg_row in zip(segments, segment_rows, strict=True):
        if seg.start == 0 and seg.doc not in prefix_end:
            prefix_end[seg.doc], prefix_base[seg.doc] = seg.end, seg_row
        elif prefix_end.get(seg.doc) == seg.start and prefix_base[seg.doc] + seg.start == seg_row:
            prefix_end[seg.doc] = seg.end
    is_local = [seg.end <= prefix_end.get(seg.doc, 0) for seg in segments]

    # Workspace: documents of remote segments, keys [0, need_d).
    need: dict[int, int] = {}
    for seg, local in zip(segments, is_local, strict=True):
        if not local:
            need[seg.doc] = max(need.get(seg.doc, 0), seg.end)
    workspace_docs: list[WorkspaceDoc] = []
    ws_offset: dict[int, int] = {}
    total = 0
    for doc in sorted(need):
        workspace_docs.append(WorkspaceDoc(doc=doc, offset=total, need=need[doc]))
        ws_offset[doc] = total
        total += need[doc]

    local_part = _attention_part(segments, segment_rows, [i for i, loc in enumerate(is_local) if loc],
                                 lambda seg: prefix_base[seg.doc])
    remote_part = _attention_part(segments, segment_rows, [i for i, loc in enumerate(is_local) if not loc],
                                  lambda seg: ws_offset[seg.doc])

    transfers = kv_transfers(plan)
    sends = sorted((t for t in transfers if t.src == rank), key=lambda t: (t.dst, t.doc, t.start, t.end))
    recvs = sorted((t for t in transfers if t.dst == rank), key=lambda t: (t.src, t.doc, t.start, t.end))
    for t in transfers:
        if not (0 <= t.src < n and 0 <= t.dst < n and t.src != t.dst and 0 <= t.start < t.end
                and 0 <= t.doc < len(plan.doc_lengths) and t.end <= plan.doc_lengths[t.doc]):
            raise PlanMismatchError("plan.transfers", f"malformed transfer {_fmt(t)}")

    send_splits = [0] * n
    for t in sends:
        send_splits[t.dst] += t.num_tokens
    send_rows = _cat([_owned_rows(segments, segment_rows, t, rank) for t in sends])
    recv_splits = [0] * n
    for t in recvs:
        recv_splits[t.src] += t.num_tokens
    recv_index = _cat([_arange(offsets[t.doc] + t.start, offsets[t.doc] + t.end) for t in recvs])

    workspace_source, recv_used = _workspace_source(
        rank, segments, segment_rows, workspace_docs, recvs, num_local=int(local_index.numel())
    )
    return RankLayout(
        rank=rank,
        cp_size=n,
        num_tokens=plan.num_tokens,
        segments=segments,
        segment_rows=tuple(segment_rows),
        local_index=local_index,
        local_part=local_part,
        remote_part=remote_part,
        workspace_docs=tuple(workspace_docs),
        workspace_source=workspace_source,
        send_splits=tuple(send_splits),
        send_rows=send_rows,
        recv_splits=tuple(recv_splits),
        recv_index=recv_index,
        recv_used=recv_used,
        group_has_transfers=bool(transfers),
        node_exchange=node_exchange_layout(plan, rank, local_index, recv_index)
        if plan.comm is CommMode.NODE_DEDUP else None,
    )


def _attention_part(
    segments: tuple[Segment, ...], segment_rows: list[int], chosen: list[int], key_base: Any
) -> AttentionPart:
    q_start, q_len, q_pos, k_start, rows = [], [], [], [], []
    compact = 0
    for i in chosen:
        seg = segments[i]
        q_start.append(compact)
        q_len.append(seg.num_tokens)
        q_pos.append(seg.start)
        k_start.append(key_base(seg))
        rows.append(_arange(segment_rows[i], segment_rows[i] + seg.num_tokens))
        compact += seg.num_tokens
    return AttentionPart(
        segments=tuple(chosen), query_rows=_cat(rows),
        q_start=tuple(q_start), q_len=tuple(q_len), q_pos=tuple(q_pos), k_start=tuple(k_start),
    )


def _fmt(t: KVTransfer) -> str:
    return f"(src={t.src}, dst={t.dst}, doc={t.doc}, tokens [{t.start}, {t.end}))"


def _owned_rows(segments: tuple[Segment, ...], segment_rows: list[int], t: KVTransfer, rank: int) -> torch.Tensor:
    """Local rows of tokens ``[t.start, t.end)`` of ``t.doc``, which ``rank`` must own."""
    pieces, covered = [], 0
    for seg, seg_row in zip(segments, segment_rows, strict=True):
        if seg.doc != t.doc:
            continue
        lo, hi = max(seg.start, t.start), min(seg.end, t.end)
        if lo < hi:
            pieces.append((lo, _arange(seg_row + lo - seg.start, seg_row + hi - seg.start)))
            covered += hi - lo
    if covered != t.num_tokens:
        raise PlanMismatchError(
            "plan.transfers", f"rank {rank} is asked to send {_fmt(t)} but does not own those tokens"
        )
    return _cat([rows for _, rows in sorted(pieces, key=lambda p: p[0])])


def _workspace_source(
    rank: int,
    segments: tuple[Segment, ...],
    segment_rows: list[int],
    workspace_docs: list[WorkspaceDoc],
    recvs: list[KVTransfer],
    *,
    num_local: int,
) -> tuple[torch.Tensor, int]:
    """Row of ``cat(local, received)`` for every workspace row, and how many received rows are used."""
    source: dict[int, torch.Tensor] = {w.doc: torch.full((w.need,), -1, dtype=torch.int64) for w in workspace_docs}
    for seg, seg_row in zip(segments, segment_rows, strict=True):
        src = source.get(seg.doc)
        if src is not None:
            src[seg.start:seg.end] = _arange(seg_row, seg_row + seg.num_tokens)
    recv_row = num_local
    used = 0
    received: dict[int, list[tuple[int, int, int]]] = defaultdict(list)
    for t in recvs:
        received[t.doc].append((t.start, t.end, recv_row))
        recv_row += t.num_tokens
    for doc, pieces in received.items():
        src = source.get(doc)
        if src is None:
            continue
        for start, end, first in pieces:
            hi = min(end, src.numel())
            if start >= hi:
                continue
            window = src[start:hi]
            free = window < 0
            window[free] = _arange(first, first + hi - start)[free]
            used += int(free.sum())
    for w in workspace_docs:
        missing = (source[w.doc] < 0).nonzero()
        if missing.numel():
            raise PlanMismatchError(
                "plan.transfers",
                f"rank {rank} reads key {int(missing[0])} of document {w.doc}, which it neither owns nor receives",
            )
    return _cat([source[w.doc] for w in workspace_docs]), used
