"""Derive the KV transfers a set of per-rank segments needs under each communication mode."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence

from flashcp_planner.model import CommMode, KVTransfer, Plan, Segment

__all__ = ["derive_transfers", "kv_transfers"]


def _owners_by_doc(rank_segments: Sequence[Sequence[Segment]]) -> dict[int, list[tuple[int, Segment]]]:
    owners: dict[int, list[tuple[int, Segment]]] = defaultdict(list)
    for rank, segments in enumerate(rank_segments):
        for seg in segments:
            owners[seg.doc].append((rank, seg))
    return owners


def derive_transfers(rank_segments: Sequence[Sequence[Segment]], comm: CommMode) -> tuple[KVTransfer, ...]:
    """Forward KV transfers implied by ``rank_segments`` under ``comm``.

    ``ALL_GATHER`` moves every remote token to every rank; ``SHARDING_AWARE``
    moves every piece of a split document to every other holder of that
    document; ``EXACT_NEED`` moves to rank r only keys ``[0, max end)`` of the
    documents its segments read. Whole documents never move except under
    ``ALL_GATHER``. Result sorted by ``(dst, doc, start, src)``.
    """
    transfers: list[KVTransfer] = []
    if comm is CommMode.ALL_GATHER:
        for dst in range(len(rank_segments)):
            for src, segments in enumerate(rank_segments):
                if src != dst:
                    transfers.extend(
                        KVTransfer(src=src, dst=dst, doc=s.doc, start=s.start, end=s.end) for s in segments
                    )
    else:
        first_holder: dict[int, int] = {}
        split_docs: set[int] = set()
        for rank, segments in enumerate(rank_segments):
            for seg in segments:
                if first_holder.setdefault(seg.doc, rank) != rank:
                    split_docs.add(seg.doc)
        owners: dict[int, list[tuple[int, Segment]]] = {doc: [] for doc in sorted(split_docs)}
        for rank, segments in enumerate(rank_segments):
            for seg in segments:
                if seg.doc in split_docs:
                    owners[seg.doc].append((rank, seg))
        for doc, owned in owners.items():
            holders = {rank for rank, _ in owned}
            for dst in holders:
                if comm is CommMode.EXACT_NEED:
                    need = max(seg.end for rank, seg in owned if rank == dst)
                else:
                    need = None
                for src, seg in owned:
                    if src == dst:
                        continue
                    end = seg.end if need is None else min(seg.end, need)
                    if seg.start < end:
                        transfers.append(KVTransfer(src=src, dst=dst, doc=doc, start=seg.start, end=end))
    transfers.sort(key=lambda t: (t.dst, t.doc, t.start, t.src))
    return tuple(transfers)


def kv_transfers(plan: Plan) -> tuple[KVTransfer, ...]:
    """Every forward transfer of ``plan``, materialised for every mode.

    ``Plan.transfers`` is left empty for ``ALL_GATHER`` (it is implied: every
    remote token to every rank, and listing it is O(N * segments)).
    """
    if plan.comm is CommMode.ALL_GATHER:
        return derive_transfers([rp.segments for rp in plan.ranks], plan.comm)
    return plan.transfers
