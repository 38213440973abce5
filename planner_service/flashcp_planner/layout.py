"""Layouts (who owns which tokens) and turning a layout into a scored, validated plan."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

from flashcp_planner.comm import transfers_and_traffic
from flashcp_planner.cost import lower_bound_ms, rank_costs_of_traffic
from flashcp_planner.errors import InvalidRequest
from flashcp_planner.model import (
    CommMode,
    DocSharding,
    Optimality,
    Plan,
    RankPlan,
    Segment,
    Segments,
    ShardingKind,
    segments_by_rank,
)
from flashcp_planner.request import PlanContext

__all__ = ["Layout", "head_tail_segments", "head_tail_sizes", "sharding_of", "whole", "build_plan"]

_new = tuple.__new__
"""Builds a named-tuple record from a tuple without the keyword constructor (hot loops only)."""


@dataclass(frozen=True, slots=True, kw_only=True)
class Layout:
    """What a strategy decides: the segments of every rank and each document's sharding."""

    rank_segments: tuple[Sequence[Segment], ...]
    """Per rank, its segments: any order (:func:`build_plan` sorts them), except in a trusted layout
    given as :class:`Segments`, which must already be in local order ``(doc, start)``."""
    documents: Sequence[DocSharding]
    """One entry per document, in document order."""
    optimality: Optimality | None = None
    trusted: bool = False
    """Set by strategies whose layouts are valid by construction (head-tail / whole / fill pieces of
    every document exactly once, capacity checked), with property tests that validate their plans.
    :func:`build_plan` then checks only token totals and capacity instead of full coverage."""


def head_tail_sizes(doc: int, length: int, k: int) -> tuple[list[int], list[int]]:
    """Sizes of the head and tail chunk of each of k positions (see :func:`head_tail_segments`)."""
    base, rem = divmod(length, 2 * k)
    head = [base] * k
    tail = [base] * k
    for i in range(rem):
        pos = (doc + i) % k
        if i < k:
            head[pos] += 1
        else:
            tail[pos] += 1
    return head, tail


def head_tail_segments(doc: int, length: int, ranks: Sequence[int]) -> list[tuple[int, Segment]]:
    """Head-tail split of one document over ``ranks`` (k of them): 2k chunks.

    Chunk sizes differ by at most one token, no padding. ``ranks[j]`` owns
    chunk j and chunk 2k-1-j. The ``length % 2k`` leftover tokens go one each
    to consecutive ranks starting at position ``doc % k`` (head chunks first,
    then tail chunks), so leftovers rotate across documents instead of piling
    up on one rank. Empty chunks are omitted. Returns ``(rank, segment)`` pairs
    in document order.
    """
    head, tail = head_tail_sizes(doc, length, len(ranks))
    sizes = head + tail[::-1]
    owners = list(ranks) + list(ranks)[::-1]
    out: list[tuple[int, Segment]] = []
    start = 0
    for size, rank in zip(sizes, owners, strict=True):
        if size:
            out.append((rank, _new(Segment, (doc, start, start + size))))
            start += size
    return out


def build_plan(ctx: PlanContext, layout: Layout, *, strategy: str, comm: CommMode) -> Plan:
    """Derive transfers and costs of ``layout`` and return the validated plan."""
    from flashcp_planner.validation import validate_plan

    if layout.trusted and all(isinstance(segments, Segments) for segments in layout.rank_segments):
        rank_segments = tuple(layout.rank_segments)
    else:
        rank_segments = segments_by_rank(layout.rank_segments)
    _, recv, send = transfers_and_traffic(rank_segments, comm, ctx.cost_model.gpus_per_node, list_transfers=False)
    costs = rank_costs_of_traffic(rank_segments, recv, send, ctx.cost_model)
    makespan = max(c.total_ms for c in costs)
    if not math.isfinite(makespan):
        raise InvalidRequest("cost_model", "its constants make the predicted time overflow (tiny throughputs?)")
    plan = Plan(
        strategy=strategy,
        cp_size=ctx.cp_size,
        doc_lengths=ctx.doc_lengths,
        capacity=ctx.capacity,
        comm=comm,
        cost_model=ctx.cost_model.name,
        ranks=tuple(
            RankPlan(rank=r, segments=segs, cost=c)
            for r, (segs, c) in enumerate(zip(rank_segments, costs, strict=True))
        ),
        documents=layout.documents,
        makespan_ms=makespan,
        lower_bound_ms=lower_bound_ms(ctx.doc_lengths, ctx.cp_size, ctx.cost_model),
        optimality=layout.optimality,
    )
    if layout.trusted:
        held = [c.tokens for c in costs]
        if sum(held) != sum(ctx.doc_lengths) or max(held) > ctx.capacity:
            validate_plan(plan, check_transfers=False)  # raises with the precise reason
            raise AssertionError("trusted layout failed its token check")  # pragma: no cover
    else:
        validate_plan(plan, check_transfers=False)
    return plan


def whole(doc: int, length: int, rank: int) -> tuple[Segment, DocSharding]:
    """The segment and sharding record of a document kept whole on ``rank``."""
    return Segment(doc=doc, start=0, end=length), DocSharding(doc=doc, kind=ShardingKind.WHOLE, ranks=(rank,))


def sharding_of(
    doc: int, group: Sequence[int], pieces: Sequence[tuple[int, Segment]], kind: ShardingKind
) -> DocSharding:
    """Sharding record of a head-tail split: ``group`` filtered to ranks that got tokens.

    A document too short to reach two ranks is recorded as whole.
    """
    holders = {rank for rank, _ in pieces}
    ranks = tuple(r for r in group if r in holders)
    return DocSharding(doc=doc, kind=ShardingKind.WHOLE if len(ranks) == 1 else kind, ranks=ranks)
