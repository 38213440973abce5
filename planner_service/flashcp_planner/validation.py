"""Structural validation of plans: every token of every document owned exactly once."""

from __future__ import annotations

from collections import defaultdict

from flashcp_planner.comm import derive_transfers
from flashcp_planner.errors import InvalidRequest
from flashcp_planner.model import CommMode, Plan

__all__ = ["validate_plan"]


def validate_plan(plan: Plan, *, check_transfers: bool = True) -> None:
    """Raise :class:`InvalidRequest` unless ``plan`` is a valid plan of its own lengths.

    Checks: N ranks numbered 0..N-1; segments in range, non-empty, in local
    order; every token of every document covered exactly once; capacity
    respected; one sharding record per document whose ranks match the owners;
    and (``check_transfers``) the transfers equal those derived from the
    segments under the plan's communication mode; ``gpus_per_node`` set (positive) exactly for
    ``NODE_DEDUP`` plans.
    """
    n = plan.cp_size
    if n < 1 or len(plan.ranks) != n:
        raise InvalidRequest("plan.ranks", f"expected {n} ranks, got {len(plan.ranks)}")
    gpn = plan.gpus_per_node
    if (plan.comm is CommMode.NODE_DEDUP) != (gpn is not None):
        raise InvalidRequest("plan.gpus_per_node", "must be set exactly when comm is node_dedup")
    if gpn is not None and (isinstance(gpn, bool) or not isinstance(gpn, int) or gpn < 1):
        raise InvalidRequest("plan.gpus_per_node", f"must be a positive integer, got {gpn!r}")
    lengths = plan.doc_lengths
    num_docs = len(lengths)
    first: dict[int, tuple[int, int, int]] = {}  # doc -> its first piece (start, end, rank)
    more: dict[int, list[tuple[int, int, int]]] = defaultdict(list)  # doc -> every piece, split docs only
    for r, rp in enumerate(plan.ranks):
        if rp.rank != r:
            raise InvalidRequest(f"plan.ranks[{r}].rank", f"expected {r}, got {rp.rank}")
        tokens = 0
        previous = (-1, -1)
        for seg in rp.segments:
            doc, start, end = seg.doc, seg.start, seg.end
            if not 0 <= doc < num_docs:
                raise InvalidRequest(f"plan.ranks[{r}].segments", f"document {doc} out of range")
            if not 0 <= start < end <= lengths[doc]:
                raise InvalidRequest(
                    f"plan.ranks[{r}].segments",
                    f"segment {seg.as_list()} outside document of length {lengths[doc]}",
                )
            if (doc, start) <= previous:
                raise InvalidRequest(f"plan.ranks[{r}].segments", "segments not in (doc, start) order")
            previous = (doc, start)
            tokens += end - start
            piece = first.setdefault(doc, (start, end, r))
            if piece[2] != r or piece[0] != start:
                pieces = more[doc]
                if not pieces:
                    pieces.append(piece)
                pieces.append((start, end, r))
        if tokens > plan.capacity:
            raise InvalidRequest(f"plan.ranks[{r}]", f"{tokens} tokens exceed capacity {plan.capacity}")
        if rp.cost.tokens != tokens:
            raise InvalidRequest(f"plan.ranks[{r}].tokens", f"says {rp.cost.tokens}, segments hold {tokens}")
    if len(plan.documents) != num_docs:
        raise InvalidRequest("plan.documents", f"expected {num_docs} entries, got {len(plan.documents)}")
    for doc, length in enumerate(lengths):
        sharding = plan.documents[doc]
        piece = first.get(doc)
        if piece is None:
            raise InvalidRequest("plan.ranks", f"document {doc}: tokens [0, {length}) covered by no rank")
        if doc not in more:
            start, end, rank = piece
            if start != 0:
                raise InvalidRequest("plan.ranks", f"document {doc}: tokens from 0 covered by no rank")
            if end != length:
                raise InvalidRequest("plan.ranks", f"document {doc}: tokens [{end}, {length}) covered by no rank")
            owners = {rank}
        else:
            covered = 0
            for start, end, _ in sorted(more[doc]):
                if start != covered:
                    raise InvalidRequest("plan.ranks", f"document {doc}: tokens from {min(start, covered)} covered "
                                         f"{'twice' if start < covered else 'by no rank'}")
                covered = end
            if covered != length:
                raise InvalidRequest("plan.ranks", f"document {doc}: tokens [{covered}, {length}) covered by no rank")
            owners = {r for _, _, r in more[doc]}
        if sharding.doc != doc or set(sharding.ranks) != owners:
            raise InvalidRequest(f"plan.documents[{doc}]",
                                 f"ranks {list(sharding.ranks)} do not match owners {sorted(owners)}")
    if check_transfers and plan.transfers is not None:  # unlisted transfers are derived, hence right
        if plan.comm is CommMode.ALL_GATHER:  # implied by the mode, never listed
            expected: tuple = ()
        else:
            expected = derive_transfers([rp.segments for rp in plan.ranks], plan.comm)
        if tuple(plan.transfers) != expected:
            raise InvalidRequest("plan.transfers", f"do not match the segments under comm mode {plan.comm.value}")
