"""The FlashCP heuristic (placeholder greedy; the full search replaces it)."""

from __future__ import annotations

from typing import ClassVar

from flashcp_planner.layout import Layout, head_tail_segments, sharding_of, whole
from flashcp_planner.model import CommMode, DocSharding, Segment, ShardingKind
from flashcp_planner.request import PlanContext

__all__ = ["FlashCPHeuristic"]


class FlashCPHeuristic:
    """Whole-Doc for documents that fit, Per-Doc for the rest."""

    name: ClassVar[str] = "flashcp"
    description: ClassVar[str] = "FlashCP heuristic: whole-doc / per-doc / sub-group per document, exact-need KV"
    is_optimal: ClassVar[bool] = False
    default_comm: ClassVar[CommMode] = CommMode.EXACT_NEED

    def layout(self, ctx: PlanContext) -> Layout:
        n = ctx.cp_size
        cm = ctx.cost_model
        lengths = ctx.doc_lengths
        total = sum(cm.attention_ms(0, x) for x in lengths) / n
        rank_segments: list[list[Segment]] = [[] for _ in range(n)]
        documents: list[DocSharding | None] = [None] * len(lengths)
        tokens = [0] * n
        time = [0.0] * n
        for d in sorted(range(len(lengths)), key=lambda d: (-lengths[d], d)):
            length = lengths[d]
            r = min(range(n), key=lambda r: (time[r], r))
            if cm.attention_ms(0, length) > total or tokens[r] + length > ctx.capacity:
                pieces = head_tail_segments(d, length, range(n))
                for rank, seg in pieces:
                    rank_segments[rank].append(seg)
                    tokens[rank] += seg.num_tokens
                    time[rank] += cm.attention_ms(seg.start, seg.end)
                documents[d] = sharding_of(d, range(n), pieces, ShardingKind.PER_DOC)
            else:
                seg, documents[d] = whole(d, length, r)
                rank_segments[r].append(seg)
                tokens[r] += length
                time[r] += cm.attention_ms(0, length)
        return Layout(rank_segments=tuple(tuple(s) for s in rank_segments), documents=tuple(documents))  # type: ignore[arg-type]
