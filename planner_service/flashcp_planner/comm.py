"""Derive the KV transfers a set of per-rank segments needs under each communication mode."""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from itertools import chain
from operator import itemgetter

from flashcp_planner.model import CommMode, KVTransfer, Plan, Segment

_new = tuple.__new__
"""Builds a named-tuple record from a tuple without the keyword constructor (hot loops only)."""

__all__ = ["derive_transfers", "kv_transfers"]


def derive_transfers(rank_segments: Sequence[Sequence[Segment]], comm: CommMode) -> tuple[KVTransfer, ...]:
    """Forward KV transfers implied by ``rank_segments`` under ``comm``.

    ``ALL_GATHER`` moves every remote token to every rank; ``SHARDING_AWARE``
    moves every piece of a split document to every other holder of that
    document; ``EXACT_NEED`` moves to rank r only keys ``[0, max end)`` of the
    documents its segments read. Whole documents never move except under
    ``ALL_GATHER``. Result sorted by ``(dst, doc, start, src)``.
    """
    n = len(rank_segments)
    if comm is CommMode.ALL_GATHER:
        transfers: list[KVTransfer] = []
        for dst in range(n):
            incoming = [_new(KVTransfer, (src, dst, s[0], s[1], s[2]))
                        for src, segments in enumerate(rank_segments) if src != dst for s in segments]
            incoming.sort(key=_doc_start_src)
            transfers.extend(incoming)
        return tuple(transfers)
    # Documents with several segments (counted in C); those held by one rank only yield no transfer.
    counts = Counter(map(itemgetter(0), chain.from_iterable(rank_segments)))
    split_docs = {doc for doc, count in counts.items() if count > 1}
    if not split_docs:
        return ()
    owners: dict[int, list[tuple[int, int, int]]] = {doc: [] for doc in sorted(split_docs)}
    for rank, segments in enumerate(rank_segments):
        for doc, start, end in segments:
            if doc in split_docs:
                owners[doc].append((start, end, rank))
    exact = comm is CommMode.EXACT_NEED
    by_dst: list[list[KVTransfer]] = [[] for _ in range(n)]
    for doc, owned in owners.items():  # docs ascending, so every dst list ends up sorted by (doc, start)
        owned.sort()
        need: dict[int, int] = {}  # holder -> index of its last piece in document order
        for index, (_, _, rank) in enumerate(owned):
            need[rank] = index
        last = len(owned) - 1
        for dst, upto in need.items():
            out = by_dst[dst]
            # Pieces are disjoint and cover the document, so every piece before dst's last one lies
            # entirely below dst's need: exact-need transfers never cut a piece.
            out += [_new(KVTransfer, (src, dst, doc, start, end))
                    for start, end, src in owned[:(upto if exact else last) + 1] if src != dst]
    return tuple(t for out in by_dst for t in out)


def _doc_start_src(t: KVTransfer) -> tuple[int, int, int]:
    return (t[2], t[3], t[0])


def kv_transfers(plan: Plan) -> tuple[KVTransfer, ...]:
    """Every forward transfer of ``plan``, materialised for every mode.

    ``Plan.transfers`` is left empty for ``ALL_GATHER`` (it is implied: every
    remote token to every rank, and listing it is O(N * segments)).
    """
    if plan.comm is CommMode.ALL_GATHER:
        return derive_transfers([rp.segments for rp in plan.ranks], plan.comm)
    return plan.transfers
