"""Structural validation of plans: every token of every document owned exactly once."""

from __future__ import annotations

from collections import defaultdict

from flashcp_planner.comm import derive_transfers
from flashcp_planner.errors import InvalidRequest
from flashcp_planner.model import Plan

__all__ = ["validate_plan"]


def validate_plan(plan: Plan, *, check_transfers: bool = True) -> None:
    """Raise :class:`InvalidRequest` unless ``plan`` is a valid plan of its own lengths.

    Checks: N ranks numbered 0..N-1; segments in range, non-empty, in local
    order; every token of every document covered exactly once; capacity
    respected; one sharding record per document whose ranks match the owners;
    and (``check_transfers``) the transfers equal those derived from the
    segments under the plan's communication mode.
    """
    n = plan.cp_size
    if n < 1 or len(plan.ranks) != n:
        raise InvalidRequest("plan.ranks", f"expected {n} ranks, got {len(plan.ranks)}")
    lengths = plan.doc_lengths
    pieces: dict[int, list[tuple[int, int, int]]] = defaultdict(list)
    for r, rp in enumerate(plan.ranks):
        if rp.rank != r:
            raise InvalidRequest(f"plan.ranks[{r}].rank", f"expected {r}, got {rp.rank}")
        tokens = 0
        previous = (-1, -1)
        for seg in rp.segments:
            if not 0 <= seg.doc < len(lengths):
                raise InvalidRequest(f"plan.ranks[{r}].segments", f"document {seg.doc} out of range")
            if not 0 <= seg.start < seg.end <= lengths[seg.doc]:
                raise InvalidRequest(
                    f"plan.ranks[{r}].segments",
                    f"segment {seg.as_list()} outside document of length {lengths[seg.doc]}",
                )
            if (seg.doc, seg.start) <= previous:
                raise InvalidRequest(f"plan.ranks[{r}].segments", "segments not in (doc, start) order")
            previous = (seg.doc, seg.start)
            tokens += seg.num_tokens
            pieces[seg.doc].append((seg.start, seg.end, r))
        if tokens > plan.capacity:
            raise InvalidRequest(f"plan.ranks[{r}]", f"{tokens} tokens exceed capacity {plan.capacity}")
        if rp.cost.tokens != tokens:
            raise InvalidRequest(f"plan.ranks[{r}].tokens", f"says {rp.cost.tokens}, segments hold {tokens}")
    for doc, length in enumerate(lengths):
        covered = 0
        for start, end, _ in sorted(pieces.get(doc, ())):
            if start != covered:
                raise InvalidRequest("plan.ranks", f"document {doc}: tokens from {min(start, covered)} covered "
                                     f"{'twice' if start < covered else 'by no rank'}")
            covered = end
        if covered != length:
            raise InvalidRequest("plan.ranks", f"document {doc}: tokens [{covered}, {length}) covered by no rank")
    if len(plan.documents) != len(lengths):
        raise InvalidRequest("plan.documents", f"expected {len(lengths)} entries, got {len(plan.documents)}")
    for d, sharding in enumerate(plan.documents):
        owners = {r for _, _, r in pieces[d]}
        if sharding.doc != d or set(sharding.ranks) != owners:
            raise InvalidRequest(f"plan.documents[{d}]", f"ranks {list(sharding.ranks)} do not match owners {sorted(owners)}")
    if check_transfers:
        derived = derive_transfers([rp.segments for rp in plan.ranks], plan.comm)
        expected = () if plan.comm.value == "all_gather" else derived
        if tuple(plan.transfers) != expected:
            raise InvalidRequest("plan.transfers", f"do not match the segments under comm mode {plan.comm.value}")
