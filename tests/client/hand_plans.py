"""Plans built by hand for the client tests, covering shardings the heuristic may not pick."""

from __future__ import annotations

from flashcp_planner import CommMode, Plan, PlanContext, ShardingKind
from flashcp_planner.layout import Layout, build_plan, head_tail_segments, sharding_of, whole


def sub_group_plan(ctx: PlanContext, comm: CommMode | str) -> Plan:
    """Doc 0 head-tail over ranks 1..N-1 (a sub-group), doc 1 per-doc, the rest whole round-robin."""
    n = ctx.cp_size
    rank_segments = [[] for _ in range(n)]
    documents = []
    for doc, length in enumerate(ctx.doc_lengths):
        if doc in (0, 1):
            group = tuple(range(1, n)) if doc == 0 else tuple(range(n))
            pieces = head_tail_segments(doc, length, group)
            for r, seg in pieces:
                rank_segments[r].append(seg)
            kind = ShardingKind.SUB_GROUP if doc == 0 else ShardingKind.PER_DOC
            documents.append(sharding_of(doc, group, pieces, kind))
        else:
            seg, sharding = whole(doc, length, doc % n)
            rank_segments[doc % n].append(seg)
            documents.append(sharding)
    layout = Layout(rank_segments=tuple(tuple(s) for s in rank_segments), documents=tuple(documents))
    return build_plan(ctx, layout, strategy="flashcp", comm=CommMode(comm))


def node_local_plan(ctx: PlanContext, comm: CommMode | str) -> Plan:
    """Document d head-tail over the ranks of node ``d % num_nodes``: no key crosses nodes."""
    n, gpn = ctx.cp_size, ctx.cost_model.gpus_per_node
    num_nodes = (n - 1) // gpn + 1
    rank_segments = [[] for _ in range(n)]
    documents = []
    for doc, length in enumerate(ctx.doc_lengths):
        node = doc % num_nodes
        group = tuple(range(node * gpn, min(n, (node + 1) * gpn)))
        pieces = head_tail_segments(doc, length, group)
        for r, seg in pieces:
            rank_segments[r].append(seg)
        documents.append(sharding_of(doc, group, pieces, ShardingKind.SUB_GROUP))
    layout = Layout(rank_segments=tuple(tuple(s) for s in rank_segments), documents=tuple(documents))
    return build_plan(ctx, layout, strategy="flashcp", comm=CommMode(comm))
