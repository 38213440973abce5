"""What frameworks do today: static zigzag, contiguous, all per-doc, whole-doc only."""

from __future__ import annotations

import heapq
from typing import ClassVar

from flashcp_planner.errors import Infeasible
from flashcp_planner.layout import Layout, head_tail_segments, sharding_of, whole
from flashcp_planner.model import CommMode, DocSharding, Segment, ShardingKind
from flashcp_planner.request import PlanContext

__all__ = ["StaticZigzag", "Contiguous", "AllPerDoc", "WholeDocOnly"]


def _cut_packed(ctx: PlanContext, chunk_owner: list[int], num_chunks: int) -> Layout:
    """Cut the packed sequence into ``num_chunks`` near-equal chunks; chunk i goes to ``chunk_owner[i]``."""
    lengths = ctx.doc_lengths
    total = sum(lengths)
    bounds = [total * i // num_chunks for i in range(num_chunks + 1)]
    rank_segments: list[list[Segment]] = [[] for _ in range(ctx.cp_size)]
    owners: list[set[int]] = [set() for _ in lengths]
    doc, doc_start = 0, 0
    for chunk in range(num_chunks):
        lo, hi = bounds[chunk], bounds[chunk + 1]
        rank = chunk_owner[chunk]
        pos = lo
        while pos < hi:
            while doc_start + lengths[doc] <= pos:
                doc_start += lengths[doc]
                doc += 1
            end = min(hi, doc_start + lengths[doc])
            rank_segments[rank].append(Segment(doc=doc, start=pos - doc_start, end=end - doc_start))
            owners[doc].add(rank)
            pos = end
    _merge_adjacent(rank_segments)
    documents = tuple(
        DocSharding(doc=d, kind=ShardingKind.WHOLE if len(o) == 1 else ShardingKind.PACKED, ranks=tuple(sorted(o)))
        for d, o in enumerate(owners)
    )
    _check_capacity(ctx, rank_segments)
    return Layout(rank_segments=tuple(tuple(s) for s in rank_segments), documents=documents)


def _merge_adjacent(rank_segments: list[list[Segment]]) -> None:
    for r, segs in enumerate(rank_segments):
        merged: list[Segment] = []
        for s in sorted(segs, key=lambda s: (s.doc, s.start)):
            if merged and merged[-1].doc == s.doc and merged[-1].end == s.start:
                merged[-1] = Segment(doc=s.doc, start=merged[-1].start, end=s.end)
            else:
                merged.append(s)
        rank_segments[r] = merged


def _check_capacity(ctx: PlanContext, rank_segments: list[list[Segment]]) -> None:
    for r, segs in enumerate(rank_segments):
        tokens = sum(s.num_tokens for s in segs)
        if tokens > ctx.capacity:
            raise Infeasible(f"rank {r} would hold {tokens} tokens, capacity is {ctx.capacity}")


class StaticZigzag:
    """Megatron-LM ``get_batch_on_this_cp_rank``: 2N equal chunks of the packed sequence, rank r gets r and 2N-1-r."""

    name: ClassVar[str] = "zigzag"
    description: ClassVar[str] = "static zigzag of the packed sequence (Megatron-LM), all-gather KV"
    is_optimal: ClassVar[bool] = False
    default_comm: ClassVar[CommMode] = CommMode.ALL_GATHER

    def layout(self, ctx: PlanContext) -> Layout:
        n = ctx.cp_size
        owner = list(range(n)) + list(range(n - 1, -1, -1))
        return _cut_packed(ctx, owner, 2 * n)


class Contiguous:
    """ring-flash-attention "llama3": rank r gets the r-th T/N slice, KV all-gathered."""

    name: ClassVar[str] = "contiguous"
    description: ClassVar[str] = "contiguous T/N slices (llama3 varlen CP), all-gather KV"
    is_optimal: ClassVar[bool] = False
    default_comm: ClassVar[CommMode] = CommMode.ALL_GATHER

    def layout(self, ctx: PlanContext) -> Layout:
        return _cut_packed(ctx, list(range(ctx.cp_size)), ctx.cp_size)


class AllPerDoc:
    """Every document head-tail over all ranks (WLB-LLM, TE THD, torch per-document head-tail)."""

    name: ClassVar[str] = "per_doc"
    description: ClassVar[str] = "every document head-tail over all ranks (WLB-LLM), all-gather KV"
    is_optimal: ClassVar[bool] = False
    default_comm: ClassVar[CommMode] = CommMode.ALL_GATHER

    def layout(self, ctx: PlanContext) -> Layout:
        n = ctx.cp_size
        ranks = tuple(range(n))
        rank_segments: list[list[Segment]] = [[] for _ in range(n)]
        documents = []
        for doc, length in enumerate(ctx.doc_lengths):
            pieces = head_tail_segments(doc, length, ranks)
            for rank, seg in pieces:
                rank_segments[rank].append(seg)
            documents.append(sharding_of(doc, ranks, pieces, ShardingKind.PER_DOC))
        _check_capacity(ctx, rank_segments)
        return Layout(rank_segments=tuple(tuple(s) for s in rank_segments), documents=tuple(documents))


class WholeDocOnly:
    """Every document whole on one rank: longest first onto the least-loaded rank that has room (LPT)."""

    name: ClassVar[str] = "whole_doc"
    description: ClassVar[str] = "every document whole on one rank, LPT by predicted time under capacity"
    is_optimal: ClassVar[bool] = False
    default_comm: ClassVar[CommMode] = CommMode.EXACT_NEED

    def layout(self, ctx: PlanContext) -> Layout:
        cm = ctx.cost_model
        n = ctx.cp_size
        lengths = ctx.doc_lengths
        order = sorted(range(len(lengths)), key=lambda d: (-lengths[d], d))
        time = [0.0] * n
        tokens = [0] * n
        heap = [(0.0, r) for r in range(n)]
        rank_segments: list[list[Segment]] = [[] for _ in range(n)]
        documents: list[DocSharding | None] = [None] * len(lengths)
        for d in order:
            length = lengths[d]
            if length > ctx.capacity:
                raise Infeasible(
                    f"document {d} has {length} tokens, more than the per-rank capacity {ctx.capacity}: "
                    "it cannot be kept whole"
                )
            skipped = []
            while heap:
                t, r = heapq.heappop(heap)
                if tokens[r] + length <= ctx.capacity:
                    break
                skipped.append((t, r))
            else:
                raise Infeasible(f"no rank has room for document {d} ({length} tokens) under capacity {ctx.capacity}")
            seg, sharding = whole(d, length, r)
            rank_segments[r].append(seg)
            documents[d] = sharding
            tokens[r] += length
            time[r] += cm.attention_ms(0, length) + length * cm.linear_ms_per_token
            heapq.heappush(heap, (time[r], r))
            for item in skipped:
                heapq.heappush(heap, item)
        return Layout(
            rank_segments=tuple(tuple(s) for s in rank_segments),
            documents=tuple(d for d in documents if d is not None),
        )
