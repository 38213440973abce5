"""Layouts (who owns which tokens) and turning a layout into a scored, validated plan."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from operator import itemgetter

import numpy as np

from flashcp_planner.comm import Traffic, traffic_of_columns, transfers_and_traffic
from flashcp_planner.cost import (
    AttentionSums,
    attention_sums,
    attention_sums_of_columns,
    lower_bound_ms,
    makespan_of_sums,
    rank_costs_of_sums,
)
from flashcp_planner.errors import InvalidRequest
from flashcp_planner.model import (
    CommMode,
    DocSharding,
    Optimality,
    Plan,
    RankColumns,
    RankCost,
    RankPlan,
    Segment,
    Segments,
    ShardingKind,
    Shardings,
    int64_array,
    segments_by_rank,
)
from flashcp_planner.request import PlanContext

__all__ = ["FILL", "Layout", "head_tail_segments", "head_tail_sizes", "sharding_of", "whole", "build_plan",
           "placements_layout"]

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
    columns: RankColumns | None = None
    """``rank_segments`` as columns, when the strategy built them (trusted layouts only): spares
    :func:`build_plan` converting the segments."""
    doc_lengths: np.ndarray | None = None
    """The micro-batch's document lengths as an int64 array, when the strategy built it (trusted
    layouts only)."""


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


def build_plan(
    ctx: PlanContext, layout: Layout, *, strategy: str, comm: CommMode, costs: tuple[RankCost, ...] | None = None
) -> Plan:
    """Derive transfers and costs of ``layout`` and return the validated plan (``costs``: those of
    :func:`layout_pricing` under ``comm``, when the caller has them already)."""
    from flashcp_planner.validation import validate_plan

    rank_segments = _sorted_segments(layout)
    lengths = layout.doc_lengths if layout.trusted and layout.doc_lengths is not None else ctx.doc_lengths
    if costs is None:
        priced = _pricing(ctx, rank_segments, layout.columns if layout.trusted else None, (comm,))[comm]
        costs = rank_costs_of_sums(*priced, ctx.cost_model)
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
        lower_bound_ms=lower_bound_ms(lengths, ctx.cp_size, ctx.cost_model),
        optimality=layout.optimality,
        gpus_per_node=ctx.cost_model.gpus_per_node if comm is CommMode.NODE_DEDUP else None,
    )
    if layout.trusted:
        held = [c.tokens for c in costs]
        total = int(lengths.sum()) if isinstance(lengths, np.ndarray) else sum(lengths)
        if sum(held) != total or max(held) > ctx.capacity:
            validate_plan(plan, check_transfers=False)  # raises with the precise reason
            raise AssertionError("trusted layout failed its token check")  # pragma: no cover
    else:
        validate_plan(plan, check_transfers=False)
    return plan


def _sorted_segments(layout: Layout) -> tuple[Segments, ...]:
    if layout.trusted and all(isinstance(segments, Segments) for segments in layout.rank_segments):
        return tuple(layout.rank_segments)
    return segments_by_rank(layout.rank_segments)


def layout_crosses_nodes(ctx: PlanContext, layout: Layout) -> bool:
    """Whether a split document of ``layout`` has pieces on two nodes (only then can exact need and
    node_dedup differ), read from its sharding records (only the split ones of :class:`Shardings`)."""
    gpn = ctx.cost_model.gpus_per_node
    documents = layout.documents
    records = documents.split.values() if isinstance(documents, Shardings) else documents
    return any(len(d.ranks) > 1 and min(d.ranks) // gpn != max(d.ranks) // gpn for d in records)


Priced = tuple[AttentionSums, Traffic, Traffic]
"""A layout's per-rank attention sums and its traffic under one mode: its costs, not built yet."""


def layout_pricing(ctx: PlanContext, layout: Layout, comms: Sequence[CommMode]) -> dict[CommMode, Priced]:
    """What :func:`build_plan` prices ``layout`` with under each of ``comms`` (attention summed once);
    :func:`makespan_of_sums` and :func:`rank_costs_of_sums` turn it into a makespan and costs."""
    return _pricing(ctx, _sorted_segments(layout), layout.columns if layout.trusted else None, comms)


def layout_makespan(ctx: PlanContext, layout: Layout, comm: CommMode) -> float:
    """The makespan :func:`build_plan` will report for ``layout`` under ``comm`` (no plan built)."""
    return makespan_of_sums(*layout_pricing(ctx, layout, (comm,))[comm], ctx.cost_model)


def _pricing(
    ctx: PlanContext, rank_segments: tuple[Segments, ...], columns: RankColumns | None, comms: Sequence[CommMode]
) -> dict[CommMode, Priced]:
    """Segment by segment for small layouts, in array passes over columns otherwise."""
    gpn = ctx.cost_model.gpus_per_node
    if columns is None and sum(map(len, rank_segments)) <= _SMALL:
        sums = attention_sums(rank_segments, ctx.cost_model)
        return {comm: (sums, *transfers_and_traffic(rank_segments, comm, gpn, list_transfers=False)[1:])
                for comm in comms}
    columns = RankColumns.of(rank_segments) if columns is None else columns
    sums = attention_sums_of_columns(columns, ctx.cost_model)
    return {comm: (sums, *traffic_of_columns(columns, comm, gpn)) for comm in comms}


_SMALL = 512
"""Documents (layouts) or segments (evaluation) up to which plain Python beats array passes."""
FILL = 0
"""Placement size ``k`` of a document cut into fill pieces (see :func:`placements_layout`)."""


def placements_layout(
    ctx: PlanContext, placement: Sequence[tuple[int, int]], fills: Mapping[int, Sequence[tuple[int, Segment]]]
) -> Layout:
    """Turn per-document placements into a trusted :class:`Layout` (segments per rank, sharding per document).

    Args:
        ctx: the micro-batch.
        placement: per document ``(first_rank, k)``: k = 1 whole on ``first_rank``; k >= 2 head-tail
            over ranks ``first_rank .. first_rank + k - 1`` (:func:`head_tail_segments`); k = 0 cut into
            the pieces ``fills[doc]``.
        fills: ``(rank, segment)`` pieces of the documents placed with k = 0.

    Built piece by piece for a few hundred documents, in array passes over the documents beyond
    (only split documents are visited one by one).
    """
    pieces = sum(2 * k if k > 1 else 1 for _, k in placement) if len(placement) <= _SMALL else _SMALL + 1
    if pieces <= _SMALL:  # (a few documents split over many ranks make many pieces)
        return _layout_of_lists(ctx, placement, fills)
    return _layout_of_arrays(ctx, placement, fills)


def _layout_of_lists(
    ctx: PlanContext, placement: Sequence[tuple[int, int]], fills: Mapping[int, Sequence[tuple[int, Segment]]]
) -> Layout:
    """:func:`placements_layout` document by document."""
    n, lengths = ctx.cp_size, ctx.doc_lengths
    held: list[list[tuple[int, int, int]]] = [[] for _ in range(n)]  # per rank, its (doc, start, end)
    whole_rank = [-1] * len(lengths)
    split: dict[int, DocSharding] = {}
    pieced: set[int] = set()  # ranks holding pieces of split documents
    bad_whole = False  # a whole document on a negative rank: let Shardings report it
    for d, (g0, k) in enumerate(placement):
        if k == 1:
            whole_rank[d] = g0
            if 0 <= g0 < n:
                held[g0].append((d, 0, lengths[d]))
            else:  # (rows of ranks outside 0..N-1, from a bad placement, are dropped)
                bad_whole = bad_whole or g0 < 0
            continue
        pieces, split[d] = _split_document(n, d, g0, k, lengths[d], fills)
        for rank, segment in pieces:
            if 0 <= rank < n:
                held[rank].append(segment)
                pieced.add(rank)
    for rank in pieced:
        held[rank].sort()
    return Layout(rank_segments=tuple(Segments.of(rows) for rows in held),
                  documents=Shardings(whole_rank, split, check=bad_whole), trusted=True)


def _layout_of_arrays(
    ctx: PlanContext, placement: Sequence[tuple[int, int]], fills: Mapping[int, Sequence[tuple[int, Segment]]]
) -> Layout:
    """:func:`placements_layout` in array passes."""
    n = ctx.cp_size
    num_docs = len(ctx.doc_lengths)
    first = np.fromiter(map(itemgetter(0), placement), dtype=np.int64, count=num_docs)
    size = np.fromiter(map(itemgetter(1), placement), dtype=np.int64, count=num_docs)
    length = int64_array(ctx.doc_lengths)
    split_docs = np.flatnonzero(size != 1)
    whole_rank = first.copy()
    whole_rank[split_docs] = -1
    # Whole documents by rank, then document; split ones (-1) and ranks outside 0..N-1 (a bad placement) drop out.
    order = _stable_order(whole_rank)
    by_rank = whole_rank[order]
    bounds = np.searchsorted(by_rank, np.arange(n + 1))
    lo, hi = int(bounds[0]), int(bounds[-1])
    columns = (order[lo:hi], np.zeros(hi - lo, dtype=np.int64), length[order[lo:hi]])
    bounds -= lo
    split: dict[int, DocSharding] = {}
    if len(split_docs):
        pieces, split = _split_pieces(n, split_docs, first, size, length, fills)
        columns, bounds = _insert_pieces(columns, by_rank[lo:hi], bounds, pieces, n)
    ranks = RankColumns(docs=columns[0], starts=columns[1], ends=columns[2], bounds=tuple(bounds.tolist()))
    bad_whole = lo != len(split_docs)  # whole documents on negative ranks: let Shardings report them
    return Layout(rank_segments=ranks.segments(), documents=Shardings(whole_rank.tolist(), split, check=bad_whole),
                  trusted=True, columns=ranks, doc_lengths=length)


def _stable_order(ranks: np.ndarray) -> np.ndarray:
    """Stable argsort of ranks (a radix sort when they fit 16 bits)."""
    if len(ranks) and -(2**15) <= int(ranks.min()) and int(ranks.max()) < 2**15:
        ranks = ranks.astype(np.int16)
    return np.argsort(ranks, kind="stable")


def _insert_pieces(
    columns: tuple[np.ndarray, ...], rank: np.ndarray, bounds: np.ndarray, pieces: tuple[np.ndarray, ...], n: int
) -> tuple[tuple[np.ndarray, ...], np.ndarray]:
    """Merge pieces ``(rank, doc, start, end)`` in (doc, start) order into rows ``(doc, start, end)`` of
    whole documents held by ``rank``, sorted by (rank, doc); returns the merged rows and rank bounds."""
    piece_rank, docs = pieces[0], columns[0]
    inside = (piece_rank >= 0) & (piece_rank < n)  # (pieces on ranks outside 0..N-1 drop out)
    num_docs = int(max(docs.max(initial=0), pieces[1].max(initial=0))) + 1
    key = np.concatenate([rank * num_docs + docs, (piece_rank * num_docs + pieces[1])[inside]])
    order = np.argsort(key, kind="stable")  # two sorted runs; a piece's own (doc, start) order kept
    merged = tuple(np.concatenate([column, piece[inside]])[order] for column, piece in zip(columns, pieces[1:],
                                                                                          strict=True))
    return merged, bounds + np.searchsorted(np.sort(piece_rank[inside]), np.arange(n + 1))


def _split_pieces(
    n: int, split_docs: np.ndarray, first: np.ndarray, size: np.ndarray, length: np.ndarray,
    fills: Mapping[int, Sequence[tuple[int, Segment]]],
) -> tuple[tuple[np.ndarray, ...], dict[int, DocSharding]]:
    """Pieces ``(rank, doc, start, end)`` of the split documents in (doc, start) order, and their
    sharding records. Head-tail splits are cut in array passes when they make many chunks."""
    docs, firsts, sizes = split_docs.tolist(), first[split_docs].tolist(), size[split_docs].tolist()
    in_arrays = sum(sizes) > _FEW_CHUNKS
    rows: list[tuple[int, int, int, int]] = []  # pieces cut here, in (doc, start) order
    split: dict[int, DocSharding] = {}
    for d, g0, k, doc_length in zip(docs, firsts, sizes, length[split_docs].tolist(), strict=True):
        if in_arrays and k != FILL:
            split[d] = _head_tail_record(n, d, g0, k, doc_length)
            continue
        pieces, split[d] = _split_document(n, d, g0, k, doc_length, fills)
        rows += sorted((segment[1], rank, d, segment[2]) for rank, segment in pieces)
    start, rank, doc, end = np.array(rows, dtype=np.int64).reshape(-1, 4).T
    pieces = (rank, doc, start, end)
    if in_arrays:
        head_tail = split_docs[size[split_docs] != FILL]
        cut = head_tail_columns(head_tail, length[head_tail], first[head_tail], size[head_tail])
        pieces = tuple(np.concatenate(pair) for pair in zip(cut, pieces, strict=True))
        order = np.argsort(pieces[1], kind="stable")
        pieces = tuple(column[order] for column in pieces)
    return pieces, split


def _split_document(
    n: int, d: int, g0: int, k: int, length: int, fills: Mapping[int, Sequence[tuple[int, Segment]]]
) -> tuple[Sequence[tuple[int, Segment]], DocSharding]:
    """Pieces ``(rank, segment)`` and sharding record of document ``d`` placed ``(g0, k)``, k != 1."""
    if k == FILL:
        pieces = fills[d]
        return pieces, sharding_of(d, [rank for rank, _ in pieces], pieces, ShardingKind.PACKED)
    return head_tail_segments(d, length, range(g0, g0 + k)), _head_tail_record(n, d, g0, k, length)


def _head_tail_record(n: int, d: int, g0: int, k: int, length: int) -> DocSharding:
    """:func:`sharding_of` a head-tail split of document ``d`` over ranks ``g0 .. g0 + k - 1``, in
    closed form: a document shorter than k reaches only the positions given a leftover token."""
    ranks = tuple(range(g0, g0 + k)) if length >= k else tuple(g0 + p for p in range(k) if (p - d) % k < length)
    kind = ShardingKind.WHOLE if len(ranks) == 1 else ShardingKind.PER_DOC if k == n else ShardingKind.SUB_GROUP
    return tuple.__new__(DocSharding, (d, kind, ranks))


_FEW_CHUNKS = 64
"""Split documents whose group sizes sum up to this are cut piece by piece (array passes cost more below)."""


def head_tail_columns(
    docs: np.ndarray, lengths: np.ndarray, first_ranks: np.ndarray, ks: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """:func:`head_tail_segments` of many documents at once, as ``(rank, doc, start, end)`` arrays.

    Document ``docs[i]`` of length ``lengths[i]`` is split over ranks ``first_ranks[i] ..
    first_ranks[i] + ks[i] - 1``; rows in document order (``docs`` ascending gives (doc, start) order).
    Closed form of the leftover rule: position p gets a leftover head token iff
    ``(p - doc) mod k < min(rem, k)``, a leftover tail token iff ``(p - doc) mod k < rem - k``.
    """
    chunks = 2 * ks
    owner = np.repeat(np.arange(len(docs)), chunks)
    k, doc, length = ks[owner], docs[owner], lengths[owner]
    first_chunk = np.cumsum(chunks) - chunks
    chunk = np.arange(len(owner)) - first_chunk[owner]  # 0 .. 2k-1 in each document
    head = chunk < k
    pos = np.where(head, chunk, 2 * k - 1 - chunk)
    base, rem = np.divmod(length, 2 * k)
    turn = (pos - doc) % k
    sizes = base + np.where(head, turn < np.minimum(rem, k), turn < rem - k)
    end = np.cumsum(sizes)
    end -= (end - sizes)[first_chunk][owner]  # tokens of the documents before
    keep = sizes > 0
    return (first_ranks[owner] + pos)[keep], doc[keep], (end - sizes)[keep], end[keep]


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
